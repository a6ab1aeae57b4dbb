//! Health probes under load: liveness never waits on the database, `/metrics` answers from the
//! figures it last read when the database is slow, and readiness measures what a partition
//! still has to apply rather than every event stored after its checkpoint.

use std::time::{Duration, Instant};

use projector::partition_of;

use crate::operations::{free_port, get, spawn_with_metrics};
use crate::util::{TestSchema, eventually, insert_event, signal, text, wait_within};

/// `GET url` with a client that gives up after `limit`: the status, or `None` (no answer).
fn get_within(url: &str, limit: Duration) -> Option<u16> {
    match ureq::get(url).timeout(limit).call() {
        Ok(response) => Some(response.status()),
        Err(ureq::Error::Status(status, _)) => Some(status),
        Err(_) => None,
    }
}

#[test]
fn live_answers_at_once_and_metrics_from_its_last_figures_while_the_events_table_is_locked() {
    let schema = TestSchema::migrated("probes_locked");
    schema.seed(20, 2);
    let port = free_port();
    let child = spawn_with_metrics(&schema, "aggregate-stats", port, &[]);
    let base = format!("http://127.0.0.1:{port}");
    eventually("ready", Duration::from_secs(30), || {
        get(&format!("{base}/health/ready")).is_some_and(|(status, _)| status == 200)
    });
    let (_, before) = get(&format!("{base}/metrics")).expect("a first scrape");
    assert!(before.contains("projector_head_position 40"), "{before}");

    // Another session takes the events table: every query of the scrape waits on it.
    let mut locker = schema.client();
    let mut lock = locker.transaction().expect("begin");
    lock.batch_execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .expect("lock the events table");
    let scrape = {
        let url = format!("{base}/metrics");
        std::thread::spawn(move || {
            let started = Instant::now();
            let answer = get(&url);
            (answer, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let live = get_within(&format!("{base}/health/live"), Duration::from_secs(3));
    let took = started.elapsed();
    assert_eq!(
        live,
        Some(200),
        "live while a scrape waits (after {took:?})"
    );
    assert!(took < Duration::from_secs(1), "live took {took:?}");
    eprintln!("/health/live answered in {took:?} while a scrape waited");

    let (answer, took) = scrape.join().expect("the scrape thread");
    let (status, metrics) = answer.expect("/metrics answers while the table is locked");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(5), "/metrics took {took:?}");
    eprintln!("/metrics answered in {took:?} while the events table was locked");
    // The figures of the last scrape that reached the database, and how old they are.
    assert!(metrics.contains("projector_head_position 40"), "{metrics}");
    let age: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("projector_database_figures_age_seconds "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no age of the database figures: {metrics}"));
    assert!(age >= 1.0, "the figures are from before the lock: {age}");

    lock.rollback().expect("release the lock");
    signal(&child, "TERM");
    let output = wait_within(child, Duration::from_secs(20));
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

#[test]
fn a_steady_stream_of_other_partitions_events_keeps_a_quiet_partition_ready() {
    let schema = TestSchema::migrated("probes_steady");
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let child = schema
        .aggregate_stats(
            "0",
            "4",
            &["--metrics-addr", &address, "--ready-max-lag", "120"],
        )
        .spawn()
        .expect("start the projector");
    let base = format!("http://{address}");
    eventually("ready", Duration::from_secs(30), || {
        get(&format!("{base}/health/ready")).is_some_and(|(status, _)| status == 200)
    });

    // About 250 events a second for 4 s, none of them partition 0's: the partition has
    // nothing to apply, whatever its stored checkpoint says between its idle writes.
    let others: Vec<String> = (0..)
        .map(|n| format!("other-{n}"))
        .filter(|id| partition_of(id, 4) != 0)
        .take(50)
        .collect();
    let writer = {
        let mut client = schema.client();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut version = 0;
            while started.elapsed() < Duration::from_secs(4) {
                version += 1;
                for id in &others {
                    insert_event(&mut client, id, version);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let mut answers = Vec::new();
    while !writer.is_finished() {
        answers.push(get(&format!("{base}/health/ready")));
        std::thread::sleep(Duration::from_millis(100));
    }
    writer.join().expect("the writer");
    let not_ready: Vec<_> = answers
        .iter()
        .filter(|answer| !matches!(answer, Some((200, _))))
        .collect();
    assert!(
        not_ready.is_empty(),
        "{} of {} answers were not 200, the first: {:?}",
        not_ready.len(),
        answers.len(),
        not_ready.first()
    );
    signal(&child, "TERM");
    let output = wait_within(child, Duration::from_secs(20));
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}
