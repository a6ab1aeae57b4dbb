//! Processes started with `--partition-key auto` share the partitions among themselves: fair
//! shares, moving when a process comes, goes, dies or freezes, every event applied once, in
//! order, while writers append. Who holds what is read from `pg_locks`, not from logs.

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::operations::{free_port, get, samples};
use crate::util::{TestSchema, eventually, signal, text, wait_within};

const PARTITIONS: &str = "12";
const SETTLE: Duration = Duration::from_secs(45);

/// One sharing process of `aggregate-stats`.
fn start_member(schema: &TestSchema) -> Child {
    start_member_with(schema, &[])
}

/// One sharing process of `aggregate-stats`, with `extra` flags.
fn start_member_with(schema: &TestSchema, extra: &[&str]) -> Child {
    sharing_process(schema, PARTITIONS, "aggregate-stats", extra)
}

/// A process sharing the `total` partitions of `projections`, with `extra` flags; its stderr
/// piped.
fn sharing_process(schema: &TestSchema, total: &str, projections: &str, extra: &[&str]) -> Child {
    let mut args = vec![
        "--partition-key",
        "auto",
        "--total-partitions",
        total,
        "--projection",
        projections,
    ];
    args.extend_from_slice(extra);
    schema
        .projector(&args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the projector binary")
}

/// Per process (by OS pid, from its application name), how many partitions of the projection
/// it holds; and whether any partition is held twice.
fn holdings_of(schema: &TestSchema, projection: &str) -> (BTreeMap<u32, usize>, bool) {
    let rows = schema
        .client()
        .query(
            "SELECT l.objid::bigint, a.application_name \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                 AND l.objid >= 65536 \
                 AND l.classid = hashtext('projector ' || current_schema() || ' ' || $1)::oid",
            &[&projection],
        )
        .expect("read the partition locks");
    let mut per_process = BTreeMap::new();
    let mut partitions = BTreeMap::new();
    for row in rows {
        let object: i64 = row.get(0);
        let application: Option<String> = row.get(1);
        let pid = application
            .as_deref()
            .and_then(|a| a.strip_prefix("projector pid "))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        *per_process.entry(pid).or_insert(0) += 1;
        *partitions.entry(object).or_insert(0) += 1;
    }
    let twice = partitions.values().any(|&n| n > 1);
    (per_process, twice)
}

/// The shares of `members`' processes once they hold exactly `expected` (sorted), with every
/// partition held by one of them.
fn settle_at(schema: &TestSchema, members: &[&Child], expected: &[usize]) {
    settle_of(schema, "aggregate-stats", members, expected);
}

/// As [`settle_at`], for `projection`.
fn settle_of(schema: &TestSchema, projection: &str, members: &[&Child], expected: &[usize]) {
    let pids: Vec<u32> = members.iter().map(|child| child.id()).collect();
    let started = Instant::now();
    loop {
        let (held, twice) = holdings_of(schema, projection);
        assert!(!twice, "a partition is held twice: {held:?}");
        let mut shares: Vec<usize> = pids
            .iter()
            .map(|pid| held.get(pid).copied().unwrap_or(0))
            .collect();
        shares.sort_unstable();
        let others: usize = held
            .iter()
            .filter(|(pid, _)| !pids.contains(pid))
            .map(|(_, n)| n)
            .sum();
        if shares == expected && others == 0 {
            return;
        }
        assert!(
            started.elapsed() < SETTLE,
            "the shares did not settle at {expected:?} within {SETTLE:?}: {held:?} (pids {pids:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Four writers appending to aggregates of their own, one event per transaction, until
/// `stop`; `written` counts them.
fn writers(
    schema: &TestSchema,
    stop: &Arc<AtomicBool>,
    written: &Arc<AtomicI64>,
) -> Vec<JoinHandle<()>> {
    (0..4)
        .map(|writer| {
            let database = schema.database.clone();
            let (stop, written) = (Arc::clone(stop), Arc::clone(written));
            std::thread::spawn(move || {
                let mut client = database.connect().expect("a writer connects");
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let (aggregate, version) = (format!("w{writer}-{}", n % 25), n / 25 + 1);
                    client
                        .execute(
                            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
                                 aggregate_version, event_id, event_type, payload) \
                             VALUES ('test', 'Thing', $1, $2, gen_random_uuid(), 'Happened', '\\x7b7d')",
                            &[&aggregate, &version],
                        )
                        .expect("a writer appends");
                    written.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect()
}

/// `projector status` lists `count` processes sharing the partitions.
fn assert_members_shown(schema: &TestSchema, count: usize) {
    let output = crate::util::run_within(
        schema.projector(&["status", "--projection", "aggregate-stats", "--json"]),
        Duration::from_secs(30),
    );
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("status --json prints JSON");
    let members = document["projections"][0]["members"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(members, count, "status --json: {document}");
    let table = crate::util::run_within(
        schema.projector(&["status", "--projection", "aggregate-stats"]),
        Duration::from_secs(30),
    );
    assert!(
        text(&table.stdout).contains(&format!("aggregate-stats: shared by {count} process(es)")),
        "status: {}",
        text(&table.stdout)
    );
}

/// Every event applied exactly once, in order per aggregate.
fn assert_exact(schema: &TestSchema) {
    eventually("every event applied", Duration::from_secs(60), || {
        schema.stats_applied() == schema.count("SELECT COUNT(*) FROM events")
    });
    assert_eq!(
        schema.stats_mismatches(),
        0,
        "the read model differs from the events"
    );
}

fn stop(child: Child) {
    signal(&child, "TERM");
    let output = wait_within(child, Duration::from_secs(30));
    assert_eq!(
        output.status.code(),
        Some(0),
        "a sharing process stopped badly: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn processes_share_partitions_fairly_and_hand_them_over_as_they_come_and_go() {
    let schema = TestSchema::migrated("sharing");
    schema.seed(300, 10);
    let (halt, written) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicI64::new(0)),
    );
    let writing = writers(&schema, &halt, &written);

    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let a = start_member_with(&schema, &["--metrics-addr", &address]);
    let (b, c) = (start_member(&schema), start_member(&schema));
    settle_at(&schema, &[&a, &b, &c], &[4, 4, 4]);
    assert_members_shown(&schema, 3);
    eventually("the owned gauge to say 4", Duration::from_secs(10), || {
        get(&format!("http://{address}/metrics")).is_some_and(|(_, body)| {
            samples(&body, "projector_partitions_owned")
                .iter()
                .any(|(_, value)| *value == 4.0)
        })
    });

    let d = start_member(&schema);
    settle_at(&schema, &[&a, &b, &c, &d], &[3, 3, 3, 3]);

    // Frozen, then back: it keeps its partitions (its sessions live) and repeats nothing.
    signal(&b, "STOP");
    std::thread::sleep(Duration::from_secs(2));
    signal(&b, "CONT");

    // Killed: its partitions go to the others.
    signal(&c, "KILL");
    let _ = wait_within(c, Duration::from_secs(10));
    settle_at(&schema, &[&a, &b, &d], &[4, 4, 4]);

    // Leaving cleanly: the same.
    stop(d);
    settle_at(&schema, &[&a, &b], &[6, 6]);

    halt.store(true, Ordering::Relaxed);
    for writer in writing {
        writer.join().expect("a writer ends");
    }
    assert!(
        written.load(Ordering::Relaxed) > 0,
        "the writers appended nothing"
    );
    assert_exact(&schema);
    stop(a);
    stop(b);
}

#[test]
fn sharing_processes_follow_a_repartitioning_without_a_restart() {
    let schema = TestSchema::migrated("sharing_repartition");
    schema.seed(300, 10);
    let (halt, written) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicI64::new(0)),
    );
    let writing = writers(&schema, &halt, &written);
    let (a, b) = (start_member(&schema), start_member(&schema));
    settle_at(&schema, &[&a, &b], &[6, 6]);

    let output = crate::util::run_within(
        schema.projector(&[
            "repartition",
            "--projection",
            "aggregate-stats",
            "--to",
            "8",
        ]),
        Duration::from_secs(60),
    );
    assert!(
        output.status.success(),
        "repartition failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    settle_at(&schema, &[&a, &b], &[4, 4]);
    let totals = schema.count(
        "SELECT COUNT(DISTINCT total_partitions) FROM projector_checkpoints \
         WHERE projection = 'aggregate-stats' AND total_partitions = 8",
    );
    assert_eq!(totals, 1, "the checkpoints are not kept in 8 partitions");

    halt.store(true, Ordering::Relaxed);
    for writer in writing {
        writer.join().expect("a writer ends");
    }
    assert_exact(&schema);
    stop(a);
    stop(b);
}

#[test]
fn a_process_frozen_past_the_session_timeout_loses_its_share_and_repeats_nothing() {
    let schema = TestSchema::migrated("sharing_frozen");
    schema.seed(300, 10);
    let (halt, written) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicI64::new(0)),
    );
    let writing = writers(&schema, &halt, &written);
    let a = start_member_with(&schema, &["--session-timeout-secs", "5"]);
    let b = start_member_with(&schema, &["--session-timeout-secs", "5"]);
    settle_at(&schema, &[&a, &b], &[6, 6]);

    // Frozen: the server ends its idle sessions after 5 s, and the other takes everything.
    signal(&a, "STOP");
    settle_at(&schema, &[&b], &[12]);
    // Back: its connections are gone; it finds the partitions held, joins again, and the
    // shares move back, with nothing applied twice.
    signal(&a, "CONT");
    settle_at(&schema, &[&a, &b], &[6, 6]);

    halt.store(true, Ordering::Relaxed);
    for writer in writing {
        writer.join().expect("a writer ends");
    }
    assert_exact(&schema);
    stop(a);
    stop(b);
}

#[test]
fn a_process_that_starts_with_no_share_takes_a_partition_over_without_passing_a_gap() {
    let schema = TestSchema::migrated("sharing_gap");
    schema.seed(50, 4);
    let two = || sharing_process(&schema, "2", "aggregate-stats", &[]);
    let (a, b) = (two(), two());
    settle_at(&schema, &[&a, &b], &[1, 1]);
    assert_exact(&schema);

    // A transaction holds a position in each partition open while later events commit.
    let mut holder = schema.client();
    let mut open = holder.transaction().expect("begin");
    for partition in 0..2 {
        let id = (0..)
            .map(|n| format!("gap-{n}"))
            .find(|id| projector::partition_of(id, 2) == partition)
            .expect("an id in each partition");
        crate::util::insert_event(&mut open, &id, 1);
    }
    let mut later = schema.client();
    for n in 0..20 {
        crate::util::insert_event(&mut later, &format!("later-{n}"), 1);
    }

    // A third process has no share (2 partitions, 3 processes) until one of them dies.
    let c = two();
    eventually("the third process to join", Duration::from_secs(30), || {
        schema.count(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND objsubid = 2 AND objid = 0",
        ) >= 3
    });
    std::thread::sleep(Duration::from_secs(2));
    signal(&a, "KILL");
    let _ = wait_within(a, Duration::from_secs(10));
    settle_at(&schema, &[&b, &c], &[1, 1]);
    std::thread::sleep(Duration::from_secs(1));
    open.commit().expect("commit the held transaction");
    assert_exact(&schema);
    stop(b);
    stop(c);
}

#[test]
fn several_projections_of_one_process_each_share_their_own_partitions() {
    let schema = TestSchema::migrated("sharing_several");
    schema.seed(100, 5);
    // noop is kept in 6 partitions, aggregate-stats will be in 12.
    let output = crate::util::run_within(
        schema.projector(&["repartition", "--projection", "noop", "--to", "6"]),
        Duration::from_secs(60),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let both = || sharing_process(&schema, PARTITIONS, "aggregate-stats,noop", &[]);
    let (a, b) = (both(), both());
    settle_of(&schema, "aggregate-stats", &[&a, &b], &[6, 6]);
    settle_of(&schema, "noop", &[&a, &b], &[3, 3]);
    assert_exact(&schema);
    stop(a);
    stop(b);
}

#[test]
fn a_process_with_no_share_follows_a_repartitioning_too() {
    let schema = TestSchema::migrated("sharing_no_share_layout");
    schema.seed(50, 4);
    let two = || sharing_process(&schema, "2", "aggregate-stats", &[]);
    let (a, b) = (two(), two());
    settle_at(&schema, &[&a, &b], &[1, 1]);
    // A third process: 3 processes, 2 partitions, so it holds none.
    let c = two();
    std::thread::sleep(Duration::from_secs(2));
    settle_at(&schema, &[&a, &b, &c], &[0, 1, 1]);
    let output = crate::util::run_within(
        schema.projector(&[
            "repartition",
            "--projection",
            "aggregate-stats",
            "--to",
            "6",
        ]),
        Duration::from_secs(60),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    // Every process, the one that held nothing too, runs on the new layout.
    settle_at(&schema, &[&a, &b, &c], &[2, 2, 2]);
    assert_exact(&schema);
    stop(a);
    stop(b);
    stop(c);
}

#[test]
fn a_process_with_no_share_follows_a_rewind_and_applies_again_what_it_must() {
    let schema = TestSchema::migrated("sharing_no_share_rewind");
    let events = schema.seed(50, 4);
    // A projection that counts each event's applications (replaying it is harmless).
    let two = || {
        schema
            .projector(&[
                "--partition-key",
                "auto",
                "--total-partitions",
                "2",
                "--projection-file",
                "tests/data/count_applications.sql",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the projector binary")
    };
    let applied_times = |times: i64| {
        schema.count(&format!(
            "SELECT COUNT(*) FROM applications WHERE times = {times}"
        ))
    };
    let (a, b) = (two(), two());
    settle_of(&schema, "applications", &[&a, &b], &[1, 1]);
    let c = two();
    std::thread::sleep(Duration::from_secs(2));
    settle_of(&schema, "applications", &[&a, &b, &c], &[0, 1, 1]);
    eventually("every event", Duration::from_secs(30), || {
        applied_times(1) == events
    });
    // The process with no share is frozen while the others stop and the rewind runs.
    signal(&c, "STOP");
    stop(a);
    stop(b);
    let output = crate::util::run_within(
        schema.projector(&[
            "rewind",
            "--projection",
            "applications",
            "--to-position",
            "0",
            "--yes",
        ]),
        Duration::from_secs(60),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    signal(&c, "CONT");
    // It runs on the rewound checkpoints, and applies every event once more.
    settle_of(&schema, "applications", &[&c], &[2]);
    let again = Instant::now();
    while applied_times(2) != events && again.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let twice = applied_times(2);
    signal(&c, "TERM");
    let output = wait_within(c, Duration::from_secs(30));
    assert_eq!(twice, events, "{}", text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

#[test]
fn a_projection_that_stops_in_a_process_that_goes_on_no_longer_counts_it_as_a_member() {
    let schema = TestSchema::migrated("sharing_left");
    schema.seed(20, 3);
    let file = std::env::temp_dir().join(format!("sharing-left-{}.sql", std::process::id()));
    std::fs::write(
        &file,
        "-- projection: always-fails\n-- apply\nSELECT 1 / (CASE WHEN COUNT(*) > 0 THEN 0 ELSE 1 END) FROM batch;\n",
    )
    .expect("write the projection file");
    let path = file.to_string_lossy().into_owned();
    let process = sharing_process(
        &schema,
        "4",
        "aggregate-stats",
        &["--projection-file", &path],
    );
    let members_of = |name: &str| {
        schema.count(&format!(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND objsubid = 2 AND objid = 0 \
             AND classid = hashtext('projector ' || current_schema() || ' {name}')::oid"
        ))
    };
    eventually(
        "aggregate-stats to be applied",
        Duration::from_secs(30),
        || schema.stats_applied() == 60,
    );
    // The failing projection stopped (after its attempts); the process goes on with the other.
    eventually(
        "the stopped projection to leave the members",
        Duration::from_secs(30),
        || members_of("always-fails") == 0,
    );
    assert_eq!(members_of("aggregate-stats"), 1);
    let _ = std::fs::remove_file(&file);
    stop_whatever(process);
}

/// Stops a process whose exit status does not matter to the test.
fn stop_whatever(child: Child) {
    signal(&child, "TERM");
    let _ = wait_within(child, Duration::from_secs(30));
}
