//! Stopping in the middle of trouble: a stop that arrives while a batch waits to be retried
//! must not let a later batch's checkpoint pass it.

use std::collections::HashSet;
use std::time::Duration;

use projector::postgres::Transaction;
use projector::{BoxError, Builder, Context, Event, Projection, Settings, partition_of};

use crate::util::{TestSchema, join_within, signal, text, wait_within};

/// Fails, every time, on the events in `failing` (one per partition).
#[derive(Clone)]
struct FailsOn {
    failing: HashSet<String>,
}

impl Projection for FailsOn {
    fn name(&self) -> &str {
        "fails-on"
    }

    fn apply(
        &mut self,
        _: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), BoxError> {
        if self.failing.contains(&event.aggregate_id) && event.aggregate_version == 1 {
            return Err("the read model refused it".into());
        }
        Ok(())
    }
}

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
    let runner = Builder::new(
        schema.database.clone(),
        FailsOn {
            failing: failing.clone(),
        },
    )
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
    // Every event belongs to partition 1 of 2: 600,000 of them.
    let ids: Vec<String> = (0..200_000)
        .map(|n| format!("one-{n}"))
        .filter(|id| partition_of(id, 2) == 1)
        .take(60_000)
        .collect();
    schema
        .client()
        .execute(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                 event_id, event_type, payload) \
             SELECT 'test', 'Thing', id, v, gen_random_uuid(), 'Happened', '\\x7b7d' \
             FROM generate_series(1, 10) v, unnest($1::text[]) id ORDER BY v, id",
            &[&ids],
        )
        .expect("seed");
    let head = schema.count("SELECT MAX(global_position) FROM events");
    // Partition 0 reaches the head first: in the next run it receives nothing but empty
    // batches below its checkpoint while partition 1 catches up.
    let first = crate::util::run_within(
        schema.aggregate_stats("0", "2", &["--exit-when-caught-up"]),
        Duration::from_secs(60),
    );
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let child = schema
        .aggregate_stats("0-1", "2", &["--session-timeout-secs", "5"])
        .spawn()
        .expect("start");
    std::thread::sleep(Duration::from_secs(8));
    let rows = projector::status(&mut schema.client(), Some("aggregate-stats")).expect("status");
    signal(&child, "TERM");
    let output = wait_within(child, Duration::from_secs(30));
    let stderr = text(&output.stderr);
    assert!(
        rows[1].last_position < head,
        "the test needs partition 1 still catching up after 8 s: {rows:?}"
    );
    assert!(
        rows[0].held_by_pid.is_some(),
        "partition 0's session was ended as idle while its worker lived: {rows:?}\n{stderr}"
    );
    assert!(!stderr.contains("lost the database"), "{stderr}");
    assert_eq!(output.status.code(), Some(0), "{stderr}");
}
