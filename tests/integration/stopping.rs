//! Stopping in the middle of trouble: a stop that arrives while a batch waits to be retried
//! must not let a later batch's checkpoint pass it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use projector::projections::AggregateStats;
use projector::{BoxError, Builder, Event, Settings, partition_of};

use crate::util::{EachEvent, TestSchema, eventually, join_within};

#[test]
fn a_stop_during_a_retry_leaves_every_checkpoint_before_the_failing_event() {
    let schema = TestSchema::migrated("stop_in_retry");
    schema.seed(60, 3);
    let total = 4;
    // The first aggregate of each partition fails on its first event.
    let mut failing = HashSet::new();
    let mut seen = HashSet::new();
    for n in 1..=60 {
        let id = format!("thing-{n}");
        if seen.insert(partition_of(&id, total)) {
            failing.insert(id);
        }
    }
    let mut settings = Settings::default();
    settings.batch_size = 10;
    settings.min_events_per_batch = 1;
    settings.retry_delay = Duration::from_secs(3);
    settings.max_retry_delay = Duration::from_secs(3);
    // Fails, every time, on the first event of the aggregates in `failing`.
    let fails_on = EachEvent {
        name: "fails-on",
        apply: {
            let failing = failing.clone();
            move |event: &Event| -> Result<(), BoxError> {
                if failing.contains(&event.aggregate_id) && event.aggregate_version == 1 {
                    return Err("the read model refused it".into());
                }
                Ok(())
            }
        },
    };
    let runner = Builder::new(schema.database.clone(), fails_on)
        .settings(settings)
        .partitions(0..total)
        .total_partitions(total)
        .start()
        .expect("start");
    // Every partition has failed once by now, and waits to retry while later batches queue.
    std::thread::sleep(Duration::from_millis(1_500));
    runner.shutdown();
    let summary = join_within(runner, Duration::from_secs(20)).expect("a clean stop");
    assert_eq!(
        summary.applied(),
        0,
        "nothing past a failing event: {summary:?}"
    );

    for row in projector::status(&mut schema.client(), Some("fails-on")).expect("status") {
        let id = failing
            .iter()
            .find(|id| partition_of(id, total) == row.partition_key)
            .expect("a failing aggregate per partition");
        let position = schema.count(&format!(
            "SELECT global_position FROM events WHERE aggregate_id = '{id}' AND aggregate_version = 1"
        ));
        assert!(
            row.last_position < position,
            "partition {}'s checkpoint {} passed its failing event at {position}",
            row.partition_key,
            row.last_position
        );
    }
}

#[test]
fn a_partition_that_only_receives_empty_batches_for_long_keeps_its_session() {
    let schema = TestSchema::migrated("empty_batches");
    // Every event belongs to partition 1 of 2: 90,000 of them.
    let ids: Vec<String> = (0..40_000)
        .map(|n| format!("one-{n}"))
        .filter(|id| partition_of(id, 2) == 1)
        .take(10_000)
        .collect();
    schema
        .client()
        .execute(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                 event_id, event_type, payload) \
             SELECT 'test', 'Thing', id, v, gen_random_uuid(), 'Happened', '\\x7b7d' \
             FROM generate_series(1, 9) v, unnest($1::text[]) id ORDER BY v, id",
            &[&ids],
        )
        .expect("seed");
    let head = schema.count("SELECT MAX(global_position) FROM events");
    // The read model made slow (a sleep per row written), so that partition 1's catch-up lasts
    // well past the session timeout below on any machine.
    schema
        .client()
        .batch_execute(
            "CREATE TABLE aggregate_stats (bounded_context TEXT NOT NULL, \
                 aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, \
                 events_applied BIGINT NOT NULL, last_version BIGINT NOT NULL, \
                 last_global_position BIGINT NOT NULL, \
                 PRIMARY KEY (bounded_context, aggregate_type, aggregate_id)); \
             CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN PERFORM pg_sleep(0.0005); RETURN NEW; END $$; \
             CREATE TRIGGER slow_write BEFORE INSERT OR UPDATE ON aggregate_stats \
                 FOR EACH ROW EXECUTE FUNCTION slow_write()",
        )
        .expect("a slow read model");
    // Partition 0 reaches the head first.
    let first = Builder::new(schema.database.clone(), AggregateStats)
        .partitions([0])
        .total_partitions(2)
        .exit_when_caught_up(true)
        .start()
        .expect("start partition 0");
    join_within(first, Duration::from_secs(60)).expect("partition 0 caught up");
    // Then both: the shared read starts at partition 1's checkpoint (0; within
    // `catch_up_alone_beyond`, so partition 1 does not catch up alone), and partition 0
    // receives nothing but empty batches below its checkpoint, several a second (partition 1
    // takes a batch of at most 50 events every 25 ms or so), never idle for a liveness tick,
    // for longer than the session timeout.
    let mut settings = Settings::default();
    settings.batch_size = 50;
    settings.min_events_per_batch = 1;
    settings.max_events_per_transaction = 50;
    settings.catch_up_alone_beyond = i64::MAX;
    let database = schema
        .database
        .clone()
        .session_timeout_secs(5)
        .expect("a session timeout of 5 s");
    let both = Builder::new(database, AggregateStats)
        .partitions([0, 1])
        .total_partitions(2)
        .settings(settings)
        .start()
        .expect("start both");
    std::thread::sleep(Duration::from_secs(8));
    let rows = projector::status(&mut schema.client(), Some("aggregate-stats")).expect("status");
    both.shutdown();
    let outcome = join_within(both, Duration::from_secs(30));
    assert!(
        rows[1].last_position < head,
        "the test needs partition 1 still catching up after 8 s: {rows:?}"
    );
    assert!(
        rows[0].held_by_pid.is_some(),
        "partition 0's session was ended as idle while its worker lived: {rows:?}"
    );
    outcome.expect("a clean stop, no session lost");
}

#[test]
fn a_stop_right_after_a_retry_does_not_wait_for_the_batches_taken_meanwhile() {
    let schema = TestSchema::migrated("stop_after_retry");
    schema.seed(300, 8);
    let poison = schema.count(
        "SELECT global_position FROM events WHERE aggregate_id = 'thing-7' AND aggregate_version = 3",
    );
    // While it waits 2 x 2 s to retry, the partition takes the rest of the stream off its queue
    // (100 events a batch, one batch per transaction of 0.5 s).
    let mut settings = Settings::default();
    settings.batch_size = 100;
    settings.min_events_per_batch = 1;
    settings.max_events_per_transaction = 100;
    settings.retry_delay = Duration::from_secs(2);
    settings.max_retry_delay = Duration::from_secs(2);
    // Fails on thing-7's version 3 the first two times, then applies it; every event takes
    // 5 ms.
    let failures = Arc::new(AtomicU32::new(0));
    let fails_twice = EachEvent {
        name: "fails-twice",
        apply: move |event: &Event| -> Result<(), BoxError> {
            if event.aggregate_id == "thing-7"
                && event.aggregate_version == 3
                && failures.fetch_add(1, Ordering::SeqCst) < 2
            {
                return Err("not yet".into());
            }
            std::thread::sleep(Duration::from_millis(5));
            Ok(())
        },
    };
    let runner = Builder::new(schema.database.clone(), fails_twice)
        .settings(settings)
        .start()
        .expect("start");
    eventually("the failing event applied", Duration::from_secs(60), || {
        checkpoint(&schema) >= poison
    });
    runner.shutdown();
    join_within(runner, Duration::from_secs(3)).expect("a clean stop, within a transaction or two");
    assert!(
        checkpoint(&schema) < schema.count("SELECT MAX(global_position) FROM events"),
        "stopped before the end of the stream"
    );
}

fn checkpoint(schema: &TestSchema) -> i64 {
    schema.count(
        "SELECT COALESCE(MAX(last_position), 0) FROM projector_checkpoints \
         WHERE projection = 'fails-twice'",
    )
}

#[test]
fn a_worker_waiting_for_its_locked_checkpoint_row_stops_within_seconds() {
    let schema = TestSchema::migrated("stop_while_locked");
    schema.seed(10, 2);
    let run = |exit_when_caught_up| {
        Builder::new(schema.database.clone(), AggregateStats)
            .exit_when_caught_up(exit_when_caught_up)
            .start()
            .expect("start")
    };
    join_within(run(true), Duration::from_secs(30)).expect("first catch-up");
    // Another session holds the checkpoint row (a long `dead-letters retry`, say) while events
    // arrive.
    let mut holder = schema.client();
    let mut held = holder.transaction().expect("begin");
    held.execute(
        "SELECT last_position FROM projector_checkpoints WHERE projection = 'aggregate-stats' \
         FOR UPDATE",
        &[],
    )
    .expect("lock the checkpoint row");
    let holder_pid: i32 = held
        .query_one("SELECT pg_backend_pid()", &[])
        .expect("read the holder's pid")
        .get(0);
    schema.seed(10, 1);
    let runner = run(false);
    eventually(
        "the worker waiting for the checkpoint row",
        Duration::from_secs(30),
        || {
            schema.count(&format!(
                "SELECT COUNT(*) FROM pg_stat_activity \
                 WHERE {holder_pid} = ANY(pg_blocking_pids(pid)) \
                     AND query LIKE '%projector_checkpoints%FOR UPDATE%'"
            )) > 0
        },
    );
    let asked = Instant::now();
    runner.shutdown();
    let summary = join_within(runner, Duration::from_secs(5)).expect("a clean stop");
    eprintln!("stopped {:?} after being asked", asked.elapsed());
    assert_eq!(summary.applied(), 0, "nothing applied behind the lock");
    held.rollback().expect("release the row");
    assert_eq!(
        schema.stats_applied(),
        20,
        "only the first catch-up's events"
    );
}
