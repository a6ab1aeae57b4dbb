//! A long catch-up: the fetcher's memory stays bounded however many appends notify it
//! meanwhile, and a quiet partition's events are applied without waiting for it to end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use projector::{Builder, Settings, partition_of};

use crate::util::{EachEvent, TestSchema, eventually, join_within};

const LIMIT: Duration = Duration::from_secs(120);

/// A gauge's value in `metrics`, if it is there.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Appends `count` events to the aggregates `ids` (round robin), each in a transaction of its
/// own that notifies the projector as its append does, from inside the server (fast).
fn append_notifying(schema: &TestSchema, ids: &[String], count: i64) {
    let mut client = schema.client();
    client
        .batch_execute("SET synchronous_commit = off")
        .expect("set synchronous_commit");
    // A DO block alone: COMMIT is refused inside a multi-statement query.
    client
        .batch_execute(&format!(
            "DO $$ DECLARE ids text[] := ARRAY['{}']; p bigint; \
             BEGIN FOR i IN 1..{count} LOOP \
                 INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
                     aggregate_version, event_id, event_type, payload) \
                 VALUES ('test', 'Thing', ids[1 + i % array_length(ids, 1)], \
                     1000000 + i, gen_random_uuid(), 'Happened', '\\x7b7d') \
                 RETURNING global_position INTO p; \
                 PERFORM pg_notify('projector_events_' || current_schema(), p::text); \
                 COMMIT; \
             END LOOP; END $$",
            ids.join("','")
        ))
        .expect("append notifying events");
}

#[test]
fn notifications_that_arrive_during_a_catch_up_are_not_kept() {
    let schema = TestSchema::migrated("notified_catch_up");
    schema.seed(100, 200);
    // About 4,000 events a second: slower than the appends below, so the fetcher stays behind.
    let applied = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&applied);
    let projection = EachEvent {
        name: "slow",
        apply: move |_: &projector::Event| {
            if counted.fetch_add(1, Ordering::Relaxed) % 100 == 0 {
                std::thread::sleep(Duration::from_millis(25));
            }
            Ok(())
        },
    };
    let mut settings = Settings::default();
    settings.batch_size = 500;
    let runner = Builder::new(schema.database.clone(), projection)
        .partitions([0])
        .total_partitions(1)
        .settings(settings)
        .start()
        .expect("start the runner");
    let metrics = runner.metrics();
    eventually("the catch-up starts", LIMIT, || {
        applied.load(Ordering::Relaxed) > 0
    });

    let ids: Vec<String> = (1..=100).map(|n| format!("thing-{n}")).collect();
    let most = Arc::new(Mutex::new(0.0_f64));
    let sampler = {
        let most = Arc::clone(&most);
        let metrics = metrics.clone();
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::clone(&done);
        let thread = std::thread::spawn(move || {
            while stop.load(Ordering::Relaxed) == 0 {
                let held = gauge(&metrics.render(), "projector_fetcher_notifications_held");
                let mut most = most.lock().expect("most");
                *most = most.max(held.unwrap_or(f64::INFINITY));
                drop(most);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        (thread, done)
    };
    let started = Instant::now();
    append_notifying(&schema, &ids, 200_000);
    let appended_in = started.elapsed();
    let behind = applied.load(Ordering::Relaxed) < 220_000;
    sampler.1.store(1, Ordering::Relaxed);
    sampler.0.join().expect("the sampler");
    runner.shutdown();
    join_within(runner, LIMIT).expect("the runner stops cleanly");
    assert!(
        behind,
        "the projection caught up while the appends ran ({appended_in:?}): no catch-up to see"
    );
    let most = *most.lock().expect("most");
    eprintln!("appended in {appended_in:?}; most notifications held at once: {most}");
    assert!(
        most <= 20_000.0,
        "the fetcher's connection held {most} notifications at once during the catch-up"
    );
}

#[test]
fn a_quiet_partitions_event_is_applied_early_in_a_long_catch_up_of_the_others() {
    let schema = TestSchema::migrated("quiet_partition");
    let quiet = (0..)
        .map(|n| format!("quiet-{n}"))
        .find(|id| partition_of(id, 2) == 1)
        .expect("an aggregate of partition 1");
    let busy: Vec<String> = (0..)
        .map(|n| format!("busy-{n}"))
        .filter(|id| partition_of(id, 2) == 0)
        .take(100)
        .collect();
    let mut client = schema.client();
    crate::util::insert_event(&mut client, &quiet, 1);
    client
        .execute(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
                 aggregate_version, event_id, event_type, payload) \
             SELECT 'test', 'Thing', id, v, gen_random_uuid(), 'Happened', '\\x7b7d' \
             FROM generate_series(1, 1000) v, unnest($1::text[]) id ORDER BY v, id",
            &[&busy],
        )
        .expect("seed the busy partition");
    // Partition 0's 100,000 events take about 10 s to apply.
    let quiet_applied: Arc<Mutex<Option<Instant>>> = Arc::default();
    let busy_applied = Arc::new(AtomicU64::new(0));
    let projection = {
        let quiet_applied = Arc::clone(&quiet_applied);
        let busy_applied = Arc::clone(&busy_applied);
        let quiet = quiet.clone();
        EachEvent {
            name: "each",
            apply: move |event: &projector::Event| {
                if event.aggregate_id == quiet {
                    *quiet_applied.lock().expect("quiet") = Some(Instant::now());
                } else if busy_applied.fetch_add(1, Ordering::Relaxed) % 100 == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(())
            },
        }
    };
    let mut settings = Settings::default();
    settings.batch_size = 500;
    let started = Instant::now();
    let runner = Builder::new(schema.database.clone(), projection)
        .partitions(0..2)
        .total_partitions(2)
        .settings(settings)
        .start()
        .expect("start the runner");
    eventually("the quiet partition's event is applied", LIMIT, || {
        quiet_applied.lock().expect("quiet").is_some()
    });
    let busy_then = busy_applied.load(Ordering::Relaxed);
    let took = started.elapsed();
    eprintln!("quiet event applied after {took:?}, {busy_then} busy events applied then");
    runner.shutdown();
    join_within(runner, LIMIT).expect("the runner stops cleanly");
    assert!(
        busy_then < 50_000,
        "the quiet partition's event was applied after {took:?}, once {busy_then} of the other \
         partition's 100,000 events were"
    );
    assert!(took < Duration::from_secs(5), "applied after {took:?}");
}
