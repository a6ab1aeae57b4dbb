//! `projector rewind`: a projection's checkpoints moved back to a position or a time, so that
//! it applies every later event once more and none before, refused while it runs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use projector::{Builder, partition_of};

use crate::dead_letters::{Flaky, parked, quick_retries};
use crate::newcomer::run_expecting;
use crate::util::{TestSchema, eventually, signal, text, wait_within};

const LIMIT: Duration = Duration::from_secs(60);
const FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/count_applications.sql"
);

/// Runs the counting projection (`applications`) on partitions `keys` of 4 until caught up.
fn catch_up(schema: &TestSchema, keys: &str) {
    catch_up_of(schema, keys, "4");
}

/// Runs the counting projection on partitions `keys` of `total` until caught up.
fn catch_up_of(schema: &TestSchema, keys: &str, total: &str) {
    run_expecting(
        schema,
        &[
            "--projection-file",
            FILE,
            "--partition-key",
            keys,
            "--total-partitions",
            total,
            "--exit-when-caught-up",
        ],
        0,
    );
}

/// Every event with how many times the projection applied it (0: never), in position order.
fn times_applied(schema: &TestSchema) -> Vec<(i64, String, i32)> {
    schema
        .client()
        .query(
            "SELECT e.global_position, e.aggregate_id, COALESCE(a.times, 0) \
             FROM events e LEFT JOIN applications a USING (global_position) \
             ORDER BY e.global_position",
            &[],
        )
        .expect("read the applications")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// The checkpoints of `projection`, by partition key.
fn checkpoints(schema: &TestSchema, projection: &str) -> Vec<i64> {
    schema
        .client()
        .query(
            "SELECT last_position FROM projector_checkpoints WHERE projection = $1 \
             ORDER BY partition_key",
            &[&projection],
        )
        .expect("read the checkpoints")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn rewind(schema: &TestSchema, extra: &[&str], code: i32) -> (String, String) {
    let mut args = vec!["rewind", "--projection", "applications"];
    args.extend_from_slice(extra);
    run_expecting(schema, &args, code)
}

#[test]
fn rewind_to_a_position_applies_every_later_event_once_more_and_none_before_it() {
    let schema = TestSchema::migrated("rewind_position");
    schema.seed(10, 5);
    // Partitions 0 and 1 reach the head; 2 and 3 stay at 0, below where the rewind goes.
    catch_up(&schema, "0-1");
    assert_eq!(checkpoints(&schema, "applications"), [50, 50, 0, 0]);

    let (_, stderr) = rewind(&schema, &["--to-position", "20"], 2);
    assert!(
        stderr.starts_with(
            "error: rewind would move the checkpoints of projection 'applications' (4 \
             partitions) back to global position 20: partition 0/4 from 50, partition 1/4 from \
             50; partitions 2/4, 3/4 stay where they are (at or below 20)"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("its read model is NOT cleared")
            && stderr.ends_with("; pass --yes to go ahead\n"),
        "{stderr}"
    );
    assert_eq!(
        checkpoints(&schema, "applications"),
        [50, 50, 0, 0],
        "nothing moves without --yes"
    );

    let (stdout, _) = rewind(&schema, &["--to-position", "20", "--yes"], 0);
    assert!(
        stdout.starts_with(
            "projection 'applications' (4 partitions) rewound to global position 20: partition \
             0/4 from 50, partition 1/4 from 50; partitions 2/4, 3/4 stay where they are (at or \
             below 20)\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("its read model was NOT cleared"),
        "{stdout}"
    );
    assert_eq!(checkpoints(&schema, "applications"), [20, 20, 0, 0]);

    catch_up(&schema, "0-3");
    for (position, aggregate, times) in times_applied(&schema) {
        let rewound = partition_of(&aggregate, 4) < 2;
        let expected = if rewound && position > 20 { 2 } else { 1 };
        assert_eq!(
            times,
            expected,
            "event at {position} ({aggregate}, partition {})",
            partition_of(&aggregate, 4)
        );
    }
}

#[test]
fn rewind_during_a_repartitioning_moves_the_earlier_layouts_back_too() {
    let schema = TestSchema::migrated("rewind_repartitioning");
    schema.seed(10, 5);
    // Under 4 partitions, 0 and 1 applied everything and 2 and 3 nothing; the 2 partitions
    // that replace them start at 0 and skip what 0 and 1 of 4 applied, up to 50.
    catch_up(&schema, "0-1");
    run_expecting(
        &schema,
        &["repartition", "--projection", "applications", "--to", "2"],
        0,
    );
    assert_eq!(checkpoints(&schema, "applications"), [0, 0]);

    let (stdout, _) = rewind(&schema, &["--to-position", "20", "--yes"], 0);
    assert!(
        stdout.starts_with(
            "projection 'applications' (2 partitions) rewound to global position 20: \
             partitions 0/2, 1/2 stay where they are (at or below 20); the earlier layout of 4 \
             partitions (a re-partitioning is in progress) moves back too: what it applied \
             after 20 is applied again\n"
        ),
        "{stdout}"
    );
    assert_eq!(
        schema.count(
            "SELECT MAX(x) FROM projector_prior_layouts, unnest(prior_positions) AS x \
             WHERE projection = 'applications'"
        ),
        20
    );

    catch_up_of(&schema, "0-1", "2");
    for (position, aggregate, times) in times_applied(&schema) {
        let applied_before = partition_of(&aggregate, 4) < 2;
        let expected = if applied_before && position > 20 {
            2
        } else {
            1
        };
        assert_eq!(times, expected, "event at {position} ({aggregate})");
    }
}

#[test]
fn rewind_to_a_time_goes_back_to_the_last_event_stored_before_it() {
    let schema = TestSchema::migrated("rewind_time");
    schema.seed(10, 4);
    // Event N was stored at N minutes past midnight.
    schema
        .client()
        .execute(
            "UPDATE events SET created_at = \
                 '2026-01-01T00:00:00Z'::timestamptz + global_position * interval '1 minute'",
            &[],
        )
        .expect("date the events");
    catch_up(&schema, "0-3");

    // 01:20 at +01:00 is event 20's time: only events stored before it count, so event 19.
    let (stdout, _) = rewind(
        &schema,
        &["--to-time", "2026-01-01T01:20:00+01:00", "--yes"],
        0,
    );
    assert!(
        stdout.starts_with(
            "projection 'applications' (4 partitions) rewound to global position 19, the last \
             event stored before 2026-01-01T00:20:00Z (stored at 2026-01-01T00:19:00Z): \
             partition 0/4 from 40, partition 1/4 from 40, partition 2/4 from 40, partition 3/4 \
             from 40\n"
        ),
        "{stdout}"
    );
    assert_eq!(checkpoints(&schema, "applications"), [19, 19, 19, 19]);
    catch_up(&schema, "0-3");
    for (position, _, times) in times_applied(&schema) {
        assert_eq!(
            times,
            if position > 19 { 2 } else { 1 },
            "event at {position}"
        );
    }

    // A time before every event goes back to the start.
    let (stdout, _) = rewind(&schema, &["--to-time", "2025-12-31T23:59:59Z", "--yes"], 0);
    assert!(
        stdout.starts_with(
            "projection 'applications' (4 partitions) rewound to global position 0 (no event \
             was stored before 2025-12-31T23:59:59Z): "
        ),
        "{stdout}"
    );
    catch_up(&schema, "0-3");
    for (position, _, times) in times_applied(&schema) {
        assert_eq!(
            times,
            if position > 19 { 3 } else { 2 },
            "event at {position}"
        );
    }
}

/// A live process of the counting projection on partitions `keys` of 4.
fn spawn_live(schema: &TestSchema, keys: &str) -> Child {
    schema
        .projector(&[
            "--projection-file",
            FILE,
            "--partition-key",
            keys,
            "--total-partitions",
            "4",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a projector")
}

/// A live process of the counting projection holding partition 2 of 4.
fn spawn_holder(schema: &TestSchema) -> Child {
    let child = schema
        .projector(&[
            "--projection-file",
            FILE,
            "--partition-key",
            "2",
            "--total-partitions",
            "4",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a projector");
    eventually("the process to hold its partition", LIMIT, || {
        schema.count(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 \
             AND granted AND classid = hashtext('projector ' || current_schema() || ' applications')::oid",
        ) == 1
    });
    child
}

#[test]
fn rewind_is_refused_while_a_process_holds_a_partition() {
    let schema = TestSchema::migrated("rewind_held");
    schema.seed(4, 2);
    catch_up(&schema, "0-3");
    let live = spawn_holder(&schema);
    let process = format!(", process {})", live.id());

    let (_, refused) = rewind(&schema, &["--to-position", "3", "--yes"], 2);
    let (_, dry_run) = rewind(&schema, &["--to-position", "3"], 2);
    signal(&live, "TERM");
    let stopped = wait_within(live, LIMIT);
    assert_eq!(stopped.status.code(), Some(0), "{}", text(&stopped.stderr));

    assert!(
        refused.starts_with(
            "error: projection 'applications' is running: live processes hold partition(s) 2/4 \
             (server pid "
        ) && refused.contains(&process)
            && refused.contains("stop them first"),
        "{refused}"
    );
    assert!(
        dry_run.contains("; --yes would be refused for now: projection 'applications' is running")
            && dry_run.contains(&process),
        "{dry_run}"
    );
    assert_eq!(checkpoints(&schema, "applications"), [8, 8, 8, 8]);
}

#[test]
fn a_standby_that_takes_over_after_a_rewind_stops_fenced_instead_of_skipping_events() {
    let schema = TestSchema::migrated("rewind_standby");
    schema.seed(10, 4);
    let holder = spawn_live(&schema, "0-3");
    eventually("the holder to catch up", LIMIT, || {
        checkpoints(&schema, "applications") == [40, 40, 40, 40]
    });
    // The standby follows the holder's checkpoints (40) and would take over from there.
    let mut standby = spawn_live(&schema, "0-3");
    let lines = Arc::new(Mutex::new(String::new()));
    let stderr = standby.stderr.take().expect("piped stderr");
    let collector = {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut lines = lines.lock().expect("the log");
                lines.push_str(&line);
                lines.push('\n');
            }
        })
    };
    eventually("the second process to stand by", LIMIT, || {
        lines
            .lock()
            .expect("the log")
            .matches("standing by")
            .count()
            == 4
    });
    // Frozen, it holds nothing while the holder stops and the rewind runs; then it goes on.
    signal(&standby, "STOP");
    signal(&holder, "TERM");
    let stopped = wait_within(holder, LIMIT);
    assert_eq!(stopped.status.code(), Some(0), "{}", text(&stopped.stderr));
    rewind(&schema, &["--to-position", "10", "--yes"], 0);
    signal(&standby, "CONT");
    let fenced = wait_within(standby, LIMIT);
    collector.join().expect("the log collector");
    let log = lines.lock().expect("the log").clone();
    assert_eq!(fenced.status.code(), Some(2), "{log}");
    assert!(
        log.contains(
            "fenced: projection 'applications' was reset, rewound or re-partitioned after this \
             process started"
        ),
        "{log}"
    );

    catch_up(&schema, "0-3");
    for (position, _, times) in times_applied(&schema) {
        assert_eq!(
            times,
            if position > 10 { 2 } else { 1 },
            "event at {position}"
        );
    }
}

#[test]
fn rewind_refuses_bad_flags_naming_them() {
    let schema = TestSchema::migrated("rewind_flags");
    schema.seed(4, 2);
    catch_up(&schema, "0-3");
    let refusals = [
        (
            vec![
                "--to-position",
                "3",
                "--to-time",
                "2026-01-01T00:00:00Z",
                "--yes",
            ],
            "error: invalid value '2026-01-01T00:00:00Z' for --to-time: --to-position is given \
             too: give exactly one of --to-position N (to apply again every event after global \
             position N) and --to-time TIME (every event after the last one stored before TIME, \
             an RFC 3339 time such as 2026-01-31T09:30:00Z)\n",
        ),
        (
            vec!["--yes"],
            "error: --to-position or --to-time is not set: give exactly one of --to-position N \
             (to apply again every event after global position N) and --to-time TIME (every \
             event after the last one stored before TIME, an RFC 3339 time such as \
             2026-01-31T09:30:00Z)\n",
        ),
        (
            vec!["--to-position", "-5", "--yes"],
            "error: invalid value '-5' for --to-position: expected a global position, a whole \
             number of 0 or more\n",
        ),
        (
            vec!["--to-position", "soon", "--yes"],
            "error: invalid value 'soon' for --to-position: expected a global position, a whole \
             number of 0 or more\n",
        ),
        (
            vec!["--to-time", "yesterday", "--yes"],
            "error: invalid value 'yesterday' for --to-time: expected an RFC 3339 time with its \
             offset, such as 2026-01-31T09:30:00Z or 2026-01-31T10:30:00+01:00\n",
        ),
        (
            vec!["--to-time", "2026-01-31T09:30:00", "--yes"],
            "error: invalid value '2026-01-31T09:30:00' for --to-time: expected an RFC 3339 time \
             with its offset, such as 2026-01-31T09:30:00Z or 2026-01-31T10:30:00+01:00\n",
        ),
    ];
    for (extra, expected) in refusals {
        let (_, stderr) = rewind(&schema, &extra, 2);
        assert_eq!(stderr, expected, "{extra:?}");
    }
    let (_, stderr) = run_expecting(
        &schema,
        &["rewind", "--projection", "nope", "--to-position", "3"],
        2,
    );
    assert!(
        stderr.starts_with(
            "error: invalid value 'nope' for --projection: no projection of that name has \
             checkpoints in this schema"
        ),
        "{stderr}"
    );
    assert_eq!(checkpoints(&schema, "applications"), [8, 8, 8, 8]);
}

#[test]
fn rewind_leaves_parked_events_parked_and_their_aggregate_set_aside() {
    let schema = TestSchema::migrated("rewind_parked");
    schema.seed(10, 4);
    let run_flaky = || {
        Builder::new(schema.database.clone(), Flaky::new())
            .partitions(0..4)
            .total_partitions(4)
            .settings(quick_retries())
            .exit_when_caught_up(true)
            .start()
            .expect("start")
            .join()
            .expect("caught up")
    };
    run_flaky();
    // thing-7 applied versions 1 and 2, and parked 3 and 4.
    let before = parked(&schema, "flaky");
    assert_eq!(before.len(), 2);

    let (stdout, _) = run_expecting(
        &schema,
        &[
            "rewind",
            "--projection",
            "flaky",
            "--to-position",
            "0",
            "--yes",
        ],
        0,
    );
    assert!(
        stdout.contains(
            "1 aggregate(s) with 2 parked event(s) stay parked: the replay sets their events \
             after global position 0 aside with them"
        ),
        "{stdout}"
    );
    assert_eq!(
        parked(&schema, "flaky"),
        before,
        "the rewind deletes nothing"
    );

    run_flaky();
    // Every other aggregate applied its 4 events once more; thing-7's events are all parked,
    // in order, for a retry to apply.
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM recorded WHERE aggregate_id <> 'thing-7' AND n = 8"),
        9
    );
    assert_eq!(
        schema.count("SELECT n FROM recorded WHERE aggregate_id = 'thing-7'"),
        2
    );
    let positions: Vec<i64> = parked(&schema, "flaky").iter().map(|p| p.0).collect();
    assert_eq!(
        positions,
        schema
            .client()
            .query(
                "SELECT global_position FROM events WHERE aggregate_id = 'thing-7' ORDER BY 1",
                &[]
            )
            .expect("read thing-7")
            .iter()
            .map(|row| row.get::<_, i64>(0))
            .collect::<Vec<_>>()
    );
}
