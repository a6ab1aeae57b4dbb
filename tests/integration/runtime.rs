//! The runtime through the library: exactly once, restarts, duplicates, failures, shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use projector::postgres::Transaction;
use projector::projections::AggregateStats;
use projector::{BoxError, Builder, Context, Error, Event, Projection, Summary, partition_of};

use crate::util::{TestSchema, eventually};

fn catch_up<P: Projection>(
    schema: &TestSchema,
    projection: P,
    keys: &[u32],
    total: u32,
) -> Result<Summary, Error> {
    Builder::new(schema.database.clone(), projection)
        .partitions(keys.iter().copied())
        .total_partitions(total)
        .batch_size(97)
        .exit_when_caught_up(true)
        .start()?
        .join()
}

#[test]
fn one_runner_owning_four_partitions_applies_every_event_once() {
    let schema = TestSchema::migrated("one_runner");
    let events = schema.seed(400, 12);
    let summary = catch_up(&schema, AggregateStats, &[0, 1, 2, 3], 4).expect("catch up");

    assert_eq!(summary.applied(), events as u64);
    assert_eq!(summary.events_read, events as u64);
    assert_eq!(schema.stats_mismatches(), 0);
    assert_eq!(schema.count("SELECT COUNT(*) FROM aggregate_stats"), 400);
    // Each worker applied exactly the events of its own partition.
    for partition in &summary.projections[0].partitions {
        let own = (1..=400)
            .filter(|n| partition_of(&format!("thing-{n}"), 4) == partition.partition)
            .count() as u64;
        assert_eq!(
            partition.applied,
            own * 12,
            "partition {}",
            partition.partition
        );
        assert_eq!(
            partition.checkpoint, events,
            "partition {}",
            partition.partition
        );
    }
}

#[test]
fn a_restarted_runner_resumes_where_it_stopped_without_repeating() {
    let schema = TestSchema::migrated("restart");
    let first = schema.seed(50, 10);
    let summary = catch_up(&schema, AggregateStats, &[0, 1, 2], 3).expect("first run");
    assert_eq!(summary.applied(), first as u64);

    let second = schema.seed(50, 4);
    let summary = catch_up(&schema, AggregateStats, &[0, 1, 2], 3).expect("second run");
    assert_eq!(
        summary.applied(),
        second as u64,
        "only the new events are applied"
    );
    assert_eq!(
        summary.events_read, second as u64,
        "reading starts at the checkpoint"
    );
    assert_eq!(schema.stats_mismatches(), 0);

    let summary = catch_up(&schema, AggregateStats, &[0, 1, 2], 3).expect("third run");
    assert_eq!(summary.applied(), 0);
}

#[test]
fn partitions_split_across_runners_apply_each_event_once_between_them() {
    let schema = TestSchema::migrated("split_runners");
    let events = schema.seed(300, 7);
    let threads: Vec<_> = [vec![0], vec![1, 3], vec![2]]
        .into_iter()
        .map(|keys| {
            let database = schema.database.clone();
            std::thread::spawn(move || {
                Builder::new(database, AggregateStats)
                    .partitions(keys)
                    .total_partitions(4)
                    .batch_size(64)
                    .exit_when_caught_up(true)
                    .start()
                    .and_then(|runner| runner.join())
            })
        })
        .collect();
    let applied: u64 = threads
        .into_iter()
        .map(|t| t.join().expect("runner thread").expect("runner").applied())
        .sum();
    assert_eq!(applied, events as u64);
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn two_runners_on_the_same_partitions_never_apply_an_event_twice() {
    let schema = TestSchema::migrated("same_key");
    let events = schema.seed(200, 15);
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let database = schema.database.clone();
            std::thread::spawn(move || {
                Builder::new(database, AggregateStats)
                    .partitions([0, 1])
                    .total_partitions(2)
                    .batch_size(50)
                    .exit_when_caught_up(true)
                    .start()
                    .and_then(|runner| runner.join())
            })
        })
        .collect();
    let summaries: Vec<Summary> = threads
        .into_iter()
        .map(|t| t.join().expect("runner thread").expect("runner"))
        .collect();
    // aggregate-stats fails a batch on any repeated event, so success already says "once";
    // between them the two runners applied each event exactly once.
    let applied: u64 = summaries.iter().map(Summary::applied).sum();
    assert_eq!(applied, events as u64, "{summaries:?}");
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn a_different_partition_count_than_stored_is_refused() {
    let schema = TestSchema::migrated("layout");
    schema.seed(10, 2);
    catch_up(&schema, AggregateStats, &[0, 1, 2, 3], 4).expect("first layout");
    let refused = catch_up(&schema, AggregateStats, &[0], 2);
    match refused {
        Err(error @ Error::LayoutMismatch { .. }) => {
            assert!(error.is_configuration());
            assert!(
                error.to_string().starts_with(
                    "projection 'aggregate-stats' has checkpoints for 4 partition(s), not 2"
                ),
                "{error}"
            );
        }
        other => panic!("expected a layout mismatch, got {other:?}"),
    }
}

/// The setting an [`Error::InvalidSetting`] names, and its message.
fn invalid_setting(outcome: Result<projector::Runner, Error>) -> (String, String) {
    match outcome {
        Err(error @ Error::InvalidSetting { .. }) => {
            let message = error.to_string();
            let Error::InvalidSetting { setting, .. } = error else {
                unreachable!()
            };
            (setting, message)
        }
        Err(other) => panic!("expected InvalidSetting, got {other:?}"),
        Ok(_) => panic!("expected InvalidSetting, the runner started"),
    }
}

#[test]
fn library_errors_name_builder_methods_not_command_line_flags() {
    let schema = TestSchema::migrated("library_words");
    schema.seed(10, 2);
    catch_up(&schema, AggregateStats, &[0, 1, 2, 3], 4).expect("first layout");
    let layout = catch_up(&schema, AggregateStats, &[0], 2)
        .expect_err("another partition count")
        .to_string();
    assert!(
        layout.contains("build the runner with Builder::total_partitions(4)")
            && layout.contains("projector::repartition"),
        "{layout}"
    );

    let builder = || Builder::new(schema.database.clone(), AggregateStats);
    let key = builder().partitions([5]).total_partitions(4).start();
    let batch = builder().batch_size(100_000_000).start();
    let poison = builder()
        .on_poison_of("agregate-stats", projector::PoisonPolicy::Park)
        .start();
    let twice = builder().projection(AggregateStats).start();
    let (key, batch, poison, twice) = (
        invalid_setting(key),
        invalid_setting(batch),
        invalid_setting(poison),
        invalid_setting(twice),
    );
    assert_eq!(key.0, "Builder::partitions", "{}", key.1);
    assert_eq!(batch.0, "Builder::batch_size", "{}", batch.1);
    assert_eq!(poison.0, "Builder::on_poison_of", "{}", poison.1);
    assert_eq!(twice.0, "Builder::projection", "{}", twice.1);
    for message in [&layout, &key.1, &batch.1, &poison.1, &twice.1] {
        assert!(
            !message.contains("--"),
            "a flag in a library error: {message}"
        );
    }
}

#[test]
fn an_idle_partition_still_moves_its_checkpoint() {
    let schema = TestSchema::migrated("idle_partition");
    // Every event goes to one aggregate, so one of the two partitions receives none.
    schema.seed_prefixed("solo", 1, 500);
    let busy = partition_of("solo-1", 2);
    let summary = catch_up(&schema, AggregateStats, &[0, 1], 2).expect("catch up");
    let idle = summary.projections[0]
        .partitions
        .iter()
        .find(|p| p.partition != busy)
        .expect("idle partition");
    assert_eq!(idle.applied, 0);
    assert_eq!(
        idle.checkpoint, 500,
        "the idle partition's checkpoint reached the head"
    );
    let stored = schema.count(&format!(
        "SELECT last_position FROM projector_checkpoints WHERE partition_key = {}",
        idle.partition
    ));
    assert_eq!(stored, 500);
}

#[test]
fn a_live_runner_writes_an_idle_partitions_checkpoint_without_waiting_for_more_events() {
    let schema = TestSchema::migrated("idle_live");
    schema.seed_prefixed("solo", 1, 300);
    let idle = 1 - partition_of("solo-1", 2);
    let runner = Builder::new(schema.database.clone(), AggregateStats)
        .partitions([0, 1])
        .total_partitions(2)
        .start()
        .expect("start");
    let stored =
        format!("SELECT last_position FROM projector_checkpoints WHERE partition_key = {idle}");
    // No event arrives after the first read: the deferred write must not wait for one.
    eventually(
        "the idle partition's checkpoint to reach the head",
        Duration::from_secs(5),
        || schema.count(&stored) == 300,
    );
    runner.shutdown();
    runner.join().expect("a clean stop");
}

/// Fails (or panics) on events of one aggregate at one version while `broken` is set.
#[derive(Clone)]
struct FailsOn {
    aggregate_id: String,
    version: i64,
    broken: Arc<AtomicBool>,
    panic: bool,
}

impl Projection for FailsOn {
    fn name(&self) -> &str {
        "fails-on"
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        AggregateStats.setup(tx)
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError> {
        if self.broken.load(Ordering::SeqCst)
            && event.aggregate_id == self.aggregate_id
            && event.aggregate_version == self.version
        {
            if self.panic {
                panic!("cannot handle {}", event.event_type);
            }
            return Err("the read model refused it".into());
        }
        AggregateStats.apply(tx, event, context)
    }
}

fn failing_projection_stops_before_the_event_and_resumes_once_fixed(panic: bool) {
    let schema = TestSchema::migrated(if panic { "panicking" } else { "failing" });
    let events = schema.seed(20, 10);
    let broken = Arc::new(AtomicBool::new(true));
    let projection = FailsOn {
        aggregate_id: "thing-7".into(),
        version: 6,
        broken: Arc::clone(&broken),
        panic,
    };
    let partition = partition_of("thing-7", 2);
    let failing_position = schema.count(
        "SELECT global_position FROM events WHERE aggregate_id = 'thing-7' AND aggregate_version = 6",
    );

    let started = Instant::now();
    let error =
        catch_up(&schema, projection.clone(), &[0, 1], 2).expect_err("the projection fails");
    assert!(started.elapsed() < Duration::from_secs(20));
    match &error {
        Error::Projection {
            projection,
            partition: p,
            position,
            aggregate_id,
            event_type,
            attempts,
            ..
        } => {
            assert_eq!(projection, "fails-on");
            assert_eq!(*p, partition);
            assert_eq!(*position, failing_position);
            assert_eq!(aggregate_id, "thing-7");
            assert_eq!(event_type, "Happened");
            assert_eq!(*attempts, 3);
        }
        other => panic!("expected a projection error, got {other:?}"),
    }
    let cause = projector::error_chain(&error);
    let expected_cause = if panic {
        "panicked: cannot handle Happened"
    } else {
        "the read model refused it"
    };
    assert!(cause.ends_with(expected_cause), "{cause}");

    let checkpoint = schema.count(&format!(
        "SELECT last_position FROM projector_checkpoints WHERE projection = 'fails-on' AND partition_key = {partition}"
    ));
    assert_eq!(
        checkpoint,
        failing_position - 1,
        "the checkpoint is left just before the failing event"
    );
    assert_eq!(
        schema.count("SELECT last_version FROM aggregate_stats WHERE aggregate_id = 'thing-7'"),
        5
    );

    broken.store(false, Ordering::SeqCst);
    catch_up(&schema, projection, &[0, 1], 2).expect("the fixed projection catches up");
    assert_eq!(schema.stats_mismatches(), 0);
    assert_eq!(
        schema.count("SELECT SUM(events_applied)::bigint FROM aggregate_stats"),
        events
    );
}

#[test]
fn a_failing_projection_stops_before_the_event_and_resumes_once_fixed() {
    failing_projection_stops_before_the_event_and_resumes_once_fixed(false);
}

#[test]
fn a_panicking_projection_is_reported_like_a_failing_one() {
    failing_projection_stops_before_the_event_and_resumes_once_fixed(true);
}

#[test]
fn lost_connections_are_retried_and_nothing_is_skipped_or_repeated() {
    let schema = TestSchema::migrated("lost_connection");
    let events = schema.seed(300, 40);
    // A name of its own, so that only this test's connections are cut.
    let database = crate::util::database_named(&schema, "cut_me");
    let runner = Builder::new(database, AggregateStats)
        .partitions([0, 1, 2, 3])
        .total_partitions(4)
        .batch_size(50)
        .exit_when_caught_up(true)
        .start()
        .expect("start");
    let mut admin = crate::util::admin();
    let mut kills = 0;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        kills += crate::util::cut_connections_named(&mut admin, "cut_me");
    }
    let summary = runner.join().expect("the runner survives lost connections");
    assert!(kills > 0, "no connection was cut: the test proves nothing");
    // The read model is the truth: every event in it once, in order.
    assert_eq!(schema.stats_mismatches(), 0);
    assert_eq!(schema.stats_applied(), events);
    // A commit that went through while its acknowledgement was lost with the connection is
    // found applied by the retry, and counted as skipped rather than applied.
    let skipped: u64 = summary.projections[0]
        .partitions
        .iter()
        .map(|p| p.skipped)
        .sum();
    assert_eq!(summary.applied() + skipped, events as u64, "{summary:?}");
}

#[test]
fn shutdown_stops_a_live_runner_promptly_and_keeps_what_it_applied() {
    let schema = TestSchema::migrated("shutdown");
    schema.seed(100, 5);
    let runner = Builder::new(schema.database.clone(), AggregateStats)
        .partitions([0, 1])
        .total_partitions(2)
        .start()
        .expect("start");
    eventually("the backlog to be applied", Duration::from_secs(20), || {
        schema.stats_applied() == 500
    });
    let stopping = Instant::now();
    runner.shutdown();
    let summary = runner.join().expect("a clean stop");
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(summary.applied(), 500);
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn the_set_based_batch_projection_builds_the_same_read_model() {
    use projector::projections::AggregateStatsBatch;
    let schema = TestSchema::migrated("batch_projection");
    let events = schema.seed(250, 9);
    let summary = catch_up(&schema, AggregateStatsBatch, &[0, 1, 2], 3).expect("catch up");
    assert_eq!(summary.applied(), events as u64);
    assert_eq!(schema.stats_mismatches_in("aggregate_stats_batch"), 0);
    // Its own table: aggregate-stats runs beside it and builds the same read model.
    catch_up(&schema, AggregateStats, &[0], 1).expect("aggregate-stats beside it");
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn the_set_based_batch_projection_names_an_out_of_order_event() {
    use projector::projections::AggregateStatsBatch;
    let schema = TestSchema::migrated("batch_out_of_order");
    schema.seed(30, 4);
    // Version 5 of thing-3 is missing, so version 6 cannot follow.
    schema
        .client()
        .execute(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                 event_id, event_type, payload) \
             VALUES ('test', 'Thing', 'thing-3', 6, gen_random_uuid(), 'Skipped', '\\x7b7d')",
            &[],
        )
        .expect("insert an event out of order");
    let error = catch_up(&schema, AggregateStatsBatch, &[0], 1).expect_err("out of order");
    match error {
        Error::Projection {
            aggregate_id,
            event_type,
            position,
            ..
        } => {
            assert_eq!(
                (aggregate_id.as_str(), event_type.as_str(), position),
                ("thing-3", "Skipped", 121)
            );
        }
        other => panic!("expected a projection error, got {other:?}"),
    }
    assert_eq!(
        schema.count("SELECT last_position FROM projector_checkpoints"),
        120,
        "everything before the event is applied"
    );
}
