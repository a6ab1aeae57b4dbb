//! `projector status` and `status --watch`: one table for both, one rule for a projection
//! name that is not known, a quiet end on Ctrl-C, and lag read in one snapshot with the
//! checkpoint and the head; and every command's quiet end on a closed stdout.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::util::{TestSchema, eventually, run_within, signal, text, wait_within};

const LIMIT: Duration = Duration::from_secs(60);

/// Runs the binary with `args` in `schema`; returns its exit code, stdout and stderr.
fn run(schema: &TestSchema, args: &[&str]) -> (Option<i32>, String, String) {
    let output = run_within(schema.projector(args), LIMIT);
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// `aggregate-stats` on partitions 0-1 of 2, to the head.
fn catch_up(schema: &TestSchema) {
    let output = run_within(
        schema.aggregate_stats("0-1", "2", &["--exit-when-caught-up"]),
        LIMIT,
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

#[test]
fn a_projection_that_is_not_known_exits_2_on_every_command_that_takes_one() {
    let schema = TestSchema::migrated("unknown_projection");
    schema.seed(4, 2);
    catch_up(&schema);
    let commands: [&[&str]; 9] = [
        &["status", "--projection", "nope"],
        &["status", "--projection", "nope", "--json"],
        &["status", "--projection", "nope", "--watch", "1"],
        &["dead-letters", "list", "--projection", "nope"],
        &[
            "dead-letters",
            "drop",
            "--projection",
            "nope",
            "--aggregate",
            "a",
        ],
        &["wait", "--projection", "nope", "--position", "1"],
        &["repartition", "--projection", "nope", "--to", "2"],
        &["reset", "--projection", "nope"],
        &["--partition-key", "0", "--projection", "nope"],
    ];
    for args in commands {
        let (code, stdout, stderr) = run(&schema, args);
        assert_eq!(code, Some(2), "{args:?}: {stdout}{stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains("'nope'"),
            "{args:?}: {stderr}"
        );
    }
    // Known projections: a built-in that never ran, one with checkpoints.
    let (code, stdout, stderr) = run(&schema, &["status", "--projection", "noop"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "no checkpoints yet for 'noop'\n");
    let (code, stdout, stderr) = run(&schema, &["status", "--projection", "aggregate-stats"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
}

/// The words of each line of `table` that starts with `projection`, and its header's.
fn header_and_rows(table: &str, projection: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let words = |line: &str| line.split_whitespace().map(str::to_owned).collect();
    let header = table
        .lines()
        .find(|line| line.starts_with("PROJECTION"))
        .map(words)
        .unwrap_or_default();
    let rows = table
        .lines()
        .filter(|line| line.starts_with(projection))
        .map(words)
        .collect();
    (header, rows)
}

/// The lines `status --watch 1` prints on a pipe until its second table, then stops it with
/// SIGINT (Ctrl-C); returns its first table and its output once ended.
fn watch_then_interrupt(schema: &TestSchema) -> (String, std::process::Output) {
    let mut child: Child = schema
        .projector(&["status", "--watch", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start status --watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut first = String::new();
    let mut headers = 0;
    for line in lines.by_ref() {
        let line = line.expect("a line of the table");
        headers += usize::from(line.starts_with("PROJECTION"));
        if headers == 2 {
            break;
        }
        if headers == 1 {
            first.push_str(&line);
            first.push('\n');
        }
    }
    signal(&child, "INT");
    // Keep reading what it prints on its way out.
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).count());
    let output = wait_within(child, Duration::from_secs(10));
    let _ = rest.join();
    (first, output)
}

#[test]
fn status_watch_shows_the_status_table_with_rate_and_eta_and_ends_0_on_ctrl_c() {
    let schema = TestSchema::migrated("watch_table");
    schema.seed(4, 2);
    catch_up(&schema);
    let live = crate::newcomer::spawn_holder(&schema, "noop");
    // Caught up, so that both tables show the same checkpoints (a partition with nothing to
    // apply writes its checkpoint within a second).
    eventually("the live process to catch up", LIMIT, || {
        schema.count(
            "SELECT COUNT(*) FROM projector_checkpoints \
             WHERE projection = 'noop' AND last_position = 8",
        ) == 2
    });
    let (_, table, stderr) = run(&schema, &["status"]);
    let (watched, output) = watch_then_interrupt(&schema);
    signal(&live, "TERM");
    let _ = wait_within(live, LIMIT);
    assert!(stderr.is_empty(), "{stderr}");

    let (header, rows) = header_and_rows(&table, "noop");
    let (watch_header, watch_rows) = header_and_rows(&watched, "noop");
    let mut expected = header.clone();
    let held_by = expected.pop().expect("HELD-BY last");
    expected.extend(["RATE".to_owned(), "ETA".to_owned(), held_by]);
    assert_eq!(watch_header, expected, "{table}\n{watched}");
    assert_eq!(rows.len(), 2, "{table}");
    assert_eq!(watch_rows.len(), 2, "{watched}");
    for (row, watched_row) in rows.iter().zip(&watch_rows) {
        // The same partition, checkpoint, head, lag, parked events and holder (AGE and
        // LAG-TIME move with the clock).
        for column in [0, 1, 2, 3, 4, 7] {
            assert_eq!(row[column], watched_row[column], "{table}\n{watched}");
        }
        assert_eq!(row[8..], watched_row[10..], "HELD-BY: {table}\n{watched}");
        assert!(row[8].starts_with("pid="), "{table}");
    }

    assert_eq!(
        output.status.code(),
        Some(0),
        "Ctrl-C ends status --watch with 0: {}",
        text(&output.stderr)
    );
    assert!(output.stderr.is_empty(), "{}", text(&output.stderr));
}

#[test]
fn lag_is_read_in_one_snapshot_with_the_checkpoint_and_the_head() {
    let schema = TestSchema::migrated("status_snapshot");
    schema.seed(5, 2);
    catch_up(&schema);
    // Hold `status` between its reads: a lock on a table it reads, taken by another session.
    let mut blocker = schema.client();
    let mut blocking = blocker.transaction().expect("begin");
    blocking
        .batch_execute("LOCK TABLE projector_prior_layouts IN ACCESS EXCLUSIVE MODE")
        .expect("lock");
    let database = schema.database.clone();
    let reader = std::thread::spawn(move || {
        let mut client = database.connect().expect("connect");
        projector::status(&mut client, Some("aggregate-stats")).expect("status")
    });
    eventually("status to wait for the lock", LIMIT, || {
        schema.count(
            "SELECT COUNT(*) FROM pg_locks WHERE NOT granted \
             AND relation = 'projector_prior_layouts'::regclass",
        ) > 0
    });
    // Meanwhile, events are appended and applied: the checkpoints move to the new head, as a
    // worker's commit moves them.
    schema.seed(5, 2);
    schema
        .client()
        .execute(
            "UPDATE projector_checkpoints SET last_position = 20 \
             WHERE projection = 'aggregate-stats'",
            &[],
        )
        .expect("move the checkpoints");
    blocking.rollback().expect("release the lock");
    let rows = reader.join().expect("status");
    let mut client = schema.client();
    for row in &rows {
        assert!(
            row.last_position <= row.head_position,
            "checkpoint {} above head {}",
            row.last_position,
            row.head_position
        );
        let behind: i64 = client
            .query_one(
                "SELECT COUNT(*) FROM events WHERE global_position > $1 AND global_position <= $2",
                &[&row.last_position, &row.head_position],
            )
            .expect("count")
            .get(0);
        assert_eq!(row.lag_events, behind, "{row:?}");
    }
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|row| row.head_position == 20), "{rows:?}");
}

/// A write end of a pipe whose read end is already closed: every write to it fails with a
/// broken pipe, as `projector status | head -1` meets once `head` has had its line.
fn closed_pipe() -> Stdio {
    let mut reader = std::process::Command::new("true")
        .stdin(Stdio::piped())
        .spawn()
        .expect("run true");
    let writer = reader.stdin.take().expect("stdin of true");
    reader.wait().expect("true ends");
    Stdio::from(writer)
}

#[test]
fn a_closed_stdout_ends_every_command_quietly_as_it_would_have() {
    let schema = TestSchema::migrated("closed_stdout");
    schema.seed(4, 2);
    let output = run_within(
        schema.projector(&[
            "--partition-key",
            "0",
            "--total-partitions",
            "1",
            "--projection",
            "noop",
            "--exit-when-caught-up",
        ]),
        LIMIT,
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let commands: [&[&str]; 7] = [
        &["--help"],
        &["status"],
        &["status", "--json"],
        &["status", "--watch", "1"],
        &["dead-letters", "list"],
        &["wait", "--projection", "noop", "--position", "8"],
        &["repartition", "--projection", "noop", "--to", "1"],
    ];
    for args in commands {
        let output = wait_within(
            schema
                .projector(args)
                .stdout(closed_pipe())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start the projector"),
            LIMIT,
        );
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
    // The outcome is the command's own: a failure still fails, and says why on stderr.
    let output = wait_within(
        schema
            .projector(&[
                "wait",
                "--projection",
                "noop",
                "--position",
                "9",
                "--timeout",
                "1",
            ])
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the projector"),
        LIMIT,
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: projection 'noop'"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
