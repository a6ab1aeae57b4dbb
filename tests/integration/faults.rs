//! Faults: PostgreSQL restarted (`-m fast`) or crashed (`-m immediate`) under a running
//! projector, connections cut in the middle of transactions, the network black-holed for a
//! while. Each test runs against a cluster of its own, so its faults disturb no other test.
//!
//! A trigger makes every write to `aggregate_stats` wait in the server, so that a catch-up of a
//! few thousand events lasts seconds and a fault lands inside the workers' transactions.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use projector::projections::AggregateStats;
use projector::{Builder, Database, Projection, Runner, Settings, Summary};

use crate::cluster::Cluster;
use crate::proxy::Proxy;
use crate::util::{TestSchema, eventually, join_within, signal, wait_within};

const LIMIT: Duration = Duration::from_secs(90);

/// Each test's backlog: 200 aggregates of 20 events (runners) or 80 (the binary, whose
/// transactions hold up to 1,000 events: the backlog must take several of them).
const AGGREGATES: i64 = 200;
const EVENTS_PER_AGGREGATE: i64 = 20;
const EVENTS_PER_AGGREGATE_FOR_THE_BINARY: i64 = 80;

/// How long the server waits on each write to `aggregate_stats` (an update is two writes: the
/// insert that conflicts, then the update).
const SLOW_WRITE: &str = "0.002";
const SLOW_WRITE_FOR_THE_BINARY: &str = "0.0005";

/// Events a writer appends one by one while the projector tails the stream.
const LIVE_EVENTS: i64 = 300;

/// Most lines a kind of thread (fetcher, workers, ...) may log about one outage.
const LINES_PER_OUTAGE_PER_THREAD_KIND: usize = 3;

/// A migrated schema on `cluster`, whose read model waits `slow_write` seconds per written row,
/// with a backlog of `per_aggregate` events for each of `AGGREGATES` aggregates.
fn slow_backlog(
    cluster: &Cluster,
    test: &str,
    per_aggregate: i64,
    slow_write: &str,
) -> (TestSchema, i64) {
    let schema = TestSchema::migrated_on(&cluster.url(), test);
    let mut client = schema.client();
    let mut tx = client.transaction().expect("begin");
    AggregateStats
        .setup(&mut tx)
        .expect("create the read model");
    tx.batch_execute(&format!(
        "CREATE FUNCTION slow_down() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_sleep({slow_write}); RETURN NEW; END $$; \
         CREATE TRIGGER slow_down BEFORE INSERT OR UPDATE ON aggregate_stats \
             FOR EACH ROW EXECUTE FUNCTION slow_down()"
    ))
    .expect("slow the read model down");
    tx.commit().expect("commit");
    let events = schema.seed(AGGREGATES, per_aggregate);
    (schema, events)
}

/// A runner owning partitions 0-3 of 4, committing at most 100 events per transaction, so
/// that a catch-up is many transactions and a fault lands in the middle of it.
fn start_runner(database: Database, exit_when_caught_up: bool) -> Runner {
    let mut settings = Settings::default();
    settings.min_events_per_batch = 50;
    settings.max_events_per_transaction = 100;
    Builder::new(database, AggregateStats)
        .settings(settings)
        .partitions(0..4)
        .total_partitions(4)
        .batch_size(100)
        .exit_when_caught_up(exit_when_caught_up)
        .start()
        .expect("start the runner")
}

/// Waits until the catch-up is under way, and returns how far it got.
fn catch_up_under_way(schema: &TestSchema) -> i64 {
    eventually("the catch-up to be under way", LIMIT, || {
        schema.stats_applied() >= 300
    });
    schema.stats_applied()
}

/// The read model equals the events table, and the runner counted each event once.
fn assert_exact(schema: &TestSchema, summary: Option<&Summary>) {
    let events = schema.count("SELECT COUNT(*) FROM events");
    assert_eq!(
        schema.stats_mismatches(),
        0,
        "aggregate_stats differs from events"
    );
    assert_eq!(schema.stats_applied(), events);
    if let Some(summary) = summary {
        // A commit whose acknowledgement was lost is found applied by the retry and counted
        // as skipped.
        let skipped: u64 = summary.projections[0]
            .partitions
            .iter()
            .map(|p| p.skipped)
            .sum();
        assert_eq!(summary.applied() + skipped, events as u64, "{summary:?}");
    }
}

/// Appends `LIVE_EVENTS` events one per transaction, as a writer that knows nothing of the
/// projector, reconnecting through outages. `written` counts the committed ones.
fn append_live(database: Database, written: Arc<AtomicI64>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut client = None;
        let started = Instant::now();
        for n in 0..LIVE_EVENTS {
            let (aggregate, version) = (format!("live-{}", n % 10), n / 10 + 1);
            loop {
                assert!(started.elapsed() < LIMIT, "the writer could not append");
                let Some(current) = client.as_mut() else {
                    client = database.connect().ok();
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                // After a lost acknowledgement the retry finds its event there.
                let appended = current.execute(
                    "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
                         aggregate_version, event_id, event_type, payload) \
                     VALUES ('test', 'Thing', $1, $2, gen_random_uuid(), 'Happened', '\\x7b7d') \
                     ON CONFLICT (bounded_context, aggregate_type, aggregate_id, aggregate_version) \
                     DO NOTHING",
                    &[&aggregate, &version],
                );
                if appended.is_ok() {
                    written.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                client = None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

/// Restarts the cluster once while a catch-up is in the middle of its transactions, and once
/// while a writer appends and the runner tails the stream.
fn restarts_lose_and_repeat_nothing(test: &str, restart: fn(&Cluster)) {
    let cluster = Cluster::start(test);
    let (schema, backlog) = slow_backlog(&cluster, test, EVENTS_PER_AGGREGATE, SLOW_WRITE);
    let runner = start_runner(schema.database.clone(), false);

    catch_up_under_way(&schema);
    restart(&cluster);
    let applied = schema.stats_applied();
    assert!(applied < backlog, "the restart came after the catch-up");
    eventually("the backlog to be applied", LIMIT, || {
        schema.stats_applied() == backlog
    });

    let written = Arc::new(AtomicI64::new(0));
    let writer = append_live(schema.database.clone(), Arc::clone(&written));
    eventually("live appends", LIMIT, || {
        written.load(Ordering::SeqCst) >= 100
    });
    restart(&cluster);
    writer.join().expect("the writer appends every event");
    eventually("the live events to be applied", LIMIT, || {
        schema.stats_applied() == backlog + LIVE_EVENTS
    });

    runner.shutdown();
    let summary = join_within(runner, LIMIT).expect("the runner survives the restarts");
    assert_exact(&schema, Some(&summary));
}

#[test]
fn a_fast_restart_in_a_catch_up_and_another_while_tailing_lose_and_repeat_nothing() {
    restarts_lose_and_repeat_nothing("restart_fast", Cluster::restart_fast);
}

#[test]
fn a_crash_restart_in_a_catch_up_and_another_while_tailing_lose_and_repeat_nothing() {
    restarts_lose_and_repeat_nothing("restart_immediate", Cluster::restart_immediate);
}

/// Lines of a log about connections lost, retried or found again, by the kind of thread that
/// logged them, told by the message: `fetcher: ...`, a worker's `partition 2/4: ...` or
/// `projection 'x' failed on partition ...`, the connection pool's `error connecting to
/// server`, a server's notice relayed (`WARNING: terminating connection ...`). `env_logger`
/// writes `[TIME LEVEL ] message`.
fn outage_lines_by_thread_kind(lines: &[String]) -> Vec<(&'static str, usize)> {
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    for line in lines {
        let Some((head, message)) = line.split_once("] ") else {
            continue;
        };
        let lower = message.to_lowercase();
        let about_the_outage = head.contains(" WARN")
            || head.contains(" ERROR")
            || ["reconnect", "retry", "connection"]
                .iter()
                .any(|word| lower.contains(word));
        if !about_the_outage {
            continue;
        }
        let kind = if message.starts_with("fetcher") {
            "fetcher"
        } else if message.starts_with("partition ") || message.starts_with("projection '") {
            "workers"
        } else if message.starts_with("error connecting") {
            "connection pool"
        } else if message.starts_with("WARNING:") || message.starts_with("NOTICE:") {
            "server notices"
        } else {
            "other"
        };
        match counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, count)) => *count += 1,
            None => counts.push((kind, 1)),
        }
    }
    counts
}

/// As [`eventually`], showing the projector's log so far on a timeout.
fn eventually_or_show(what: &str, log: &Mutex<Vec<String>>, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        if started.elapsed() > LIMIT {
            panic!(
                "timed out after {LIMIT:?} waiting for {what}; the projector's log:\n{}",
                log.lock().expect("the log").join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn the_binary_survives_restarts_and_logs_each_outage_once_per_thread_kind() {
    let cluster = Cluster::start("restart_logs");
    let (schema, backlog) = slow_backlog(
        &cluster,
        "restart_logs",
        EVENTS_PER_AGGREGATE_FOR_THE_BINARY,
        SLOW_WRITE_FOR_THE_BINARY,
    );
    let mut child = schema
        .projector(&[
            "--partition-key",
            "0-3",
            "--projection",
            "aggregate-stats",
            "--batch-size",
            "100",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the projector");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().expect("piped stderr");
    let collector = {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("the log").push(line);
            }
        })
    };
    let logged = || lines.lock().expect("the log").len();

    eventually_or_show("the catch-up to be under way", &lines, || {
        schema.stats_applied() >= 300
    });
    let mut outages = vec![logged()];
    cluster.restart_fast();
    assert!(
        schema.stats_applied() < backlog,
        "the restart came after the catch-up"
    );
    eventually_or_show("the backlog to be applied", &lines, || {
        schema.stats_applied() == backlog
    });

    let written = Arc::new(AtomicI64::new(0));
    let writer = append_live(schema.database.clone(), Arc::clone(&written));
    eventually_or_show("live appends", &lines, || {
        written.load(Ordering::SeqCst) >= 100
    });
    outages.push(logged());
    cluster.restart_immediate();
    writer.join().expect("the writer appends every event");
    eventually_or_show("the live events to be applied", &lines, || {
        schema.stats_applied() == backlog + LIVE_EVENTS
    });
    // Retries still due are logged by now.
    std::thread::sleep(Duration::from_secs(2));

    assert!(
        child.try_wait().expect("poll the projector").is_none(),
        "the projector stays up through restarts"
    );
    signal(&child, "TERM");
    let output = wait_within(child, LIMIT);
    let _ = collector.join();
    let lines = lines.lock().expect("the log").clone();
    assert_eq!(output.status.code(), Some(0), "{}", lines.join("\n"));
    assert_exact(&schema, None);

    outages.push(lines.len());
    let windows: Vec<_> = outages.windows(2).map(|w| &lines[w[0]..w[1]]).collect();
    let per_outage: Vec<_> = windows
        .iter()
        .map(|window| outage_lines_by_thread_kind(window))
        .collect();
    eprintln!("lines about each outage, by thread kind: {per_outage:?}");
    for (outage, (counts, window)) in per_outage.iter().zip(&windows).enumerate() {
        for (kind, count) in counts {
            assert!(
                *count <= LINES_PER_OUTAGE_PER_THREAD_KIND,
                "outage {} of {}: {kind} logged {count} lines about it (at most \
                 {LINES_PER_OUTAGE_PER_THREAD_KIND} wanted); all outages: {per_outage:?}\n{}",
                outage + 1,
                windows.len(),
                window.join("\n")
            );
        }
    }
}

/// How many of the projector's sessions are inside a transaction right now.
fn sessions_in_a_transaction(schema: &TestSchema) -> i64 {
    schema.count(
        "SELECT COUNT(*) FROM pg_stat_activity \
         WHERE application_name LIKE 'projector pid %' AND xact_start IS NOT NULL",
    )
}

#[test]
fn cutting_every_connection_in_the_middle_of_a_catch_up_loses_and_repeats_nothing() {
    let cluster = Cluster::start("cut");
    let proxy = Proxy::to(cluster.port());
    let (schema, backlog) = slow_backlog(&cluster, "cut", EVENTS_PER_AGGREGATE, SLOW_WRITE);
    let through_the_proxy = Database::new(&proxy.url(&cluster.url()))
        .and_then(|d| d.schema(&schema.name))
        .expect("the proxy's URL");
    let runner = start_runner(through_the_proxy, true);

    // The first cut finds the fetcher and the four workers connected at least.
    for (at_least, connections) in [(300, 5), (2_000, 1)] {
        eventually("the catch-up to move on", LIMIT, || {
            schema.stats_applied() >= at_least
        });
        let inside = sessions_in_a_transaction(&schema);
        let cut = proxy.cut();
        assert!(inside > 0, "no transaction was open: the cut proves little");
        assert!(
            cut >= connections,
            "the cut closed only {cut} connection(s)"
        );
        assert!(
            schema.stats_applied() < backlog,
            "the cut came after the catch-up"
        );
    }
    let summary = join_within(runner, LIMIT).expect("the runner survives cut connections");
    assert_exact(&schema, Some(&summary));
}

#[test]
fn a_black_hole_of_three_seconds_stalls_progress_then_it_resumes_exactly() {
    let cluster = Cluster::start("black_hole");
    let proxy = Proxy::to(cluster.port());
    let (schema, backlog) = slow_backlog(&cluster, "black_hole", EVENTS_PER_AGGREGATE, SLOW_WRITE);
    let through_the_proxy = Database::new(&proxy.url(&cluster.url()))
        .and_then(|d| d.schema(&schema.name))
        .expect("the proxy's URL");
    let runner = start_runner(through_the_proxy, true);

    catch_up_under_way(&schema);
    proxy.black_hole();
    // What was on its way to the server when the hole opened may still commit.
    std::thread::sleep(Duration::from_millis(500));
    let stalled_at = schema.stats_applied();
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(
        schema.stats_applied(),
        stalled_at,
        "nothing commits through a black hole"
    );
    assert!(
        stalled_at < backlog,
        "the black hole came after the catch-up"
    );
    proxy.heal();
    let healed = Instant::now();
    eventually("progress after the heal", Duration::from_secs(10), || {
        schema.stats_applied() > stalled_at
    });
    eprintln!("progress resumed {:?} after the heal", healed.elapsed());

    let summary = join_within(runner, LIMIT).expect("the runner survives a black hole");
    assert_exact(&schema, Some(&summary));
}
