//! Changing the number of partitions through the library: exactness for layout changes and
//! chains with the old layout stopped at random points, fencing, standby take-over.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use projector::postgres::Transaction;
use projector::projections::AggregateStats;
use projector::{BoxError, Builder, Context, Error, Event, Projection, Settings, Summary};

use crate::util::{TestSchema, eventually, join_within};

const LIMIT: Duration = Duration::from_secs(60);

/// A number below `n`, different on every run (the tests print what they drew).
fn random_below(n: u64) -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(CALLS.fetch_add(1, Ordering::Relaxed)) % n.max(1)
}

/// `aggregate-stats` (same name, same table) that refuses every event above its partition's
/// limit: a runner of it stops with that partition's checkpoint exactly there.
#[derive(Clone)]
struct StopsAfter {
    limits: Arc<Vec<i64>>,
}

impl Projection for StopsAfter {
    fn name(&self) -> &str {
        "aggregate-stats"
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
        if event.global_position > self.limits[context.partition as usize] {
            return Err("the test stops this partition here".into());
        }
        AggregateStats.apply(tx, event, context)
    }
}

fn checkpoints(schema: &TestSchema, total: u32) -> Vec<i64> {
    schema
        .client()
        .query(
            "SELECT last_position FROM projector_checkpoints \
             WHERE projection = 'aggregate-stats' AND total_partitions = $1 ORDER BY partition_key",
            &[&(total as i32)],
        )
        .expect("read the checkpoints")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Runs layout `total` (switching to it with [`projector::repartition`]), each partition by itself up to a
/// random position of its own (none, part-way, or to the end), and returns its checkpoints.
fn run_to_random_points(schema: &TestSchema, total: u32, events: i64) -> Vec<i64> {
    let limits: Vec<i64> = (0..total)
        .map(|_| match random_below(5) {
            0 => 0,
            1 => events,
            _ => random_below(events as u64 + 1) as i64,
        })
        .collect();
    let projection = StopsAfter {
        limits: Arc::new(limits.clone()),
    };
    projector::repartition(&schema.database, "aggregate-stats", total).expect("repartition");
    for key in 0..total {
        let mut settings = Settings::default();
        settings.max_attempts = 1;
        let result = Builder::new(schema.database.clone(), projection.clone())
            .settings(settings)
            .partitions([key])
            .total_partitions(total)
            .batch_size(1 + random_below(40) as u32)
            .exit_when_caught_up(true)
            .start()
            .and_then(|runner| runner.join());
        match result {
            Ok(_) | Err(Error::Projection { .. }) => {}
            Err(other) => panic!("layout {total}, partition {key}, limits {limits:?}: {other}"),
        }
    }
    let reached = checkpoints(schema, total);
    println!("layout {total} stopped at {reached:?} (limits {limits:?})");
    reached
}

/// Runs layout `total` (switching to it with [`projector::repartition`]), each partition as a live runner
/// of its own, shut down once its checkpoint passed a random position; returns the checkpoints.
fn run_live_and_stop_at_random_points(schema: &TestSchema, total: u32, events: i64) -> Vec<i64> {
    projector::repartition(&schema.database, "aggregate-stats", total).expect("repartition");
    for key in 0..total {
        // 0: started and stopped at once.
        let target = random_below(events as u64 + 1) as i64;
        let runner = Builder::new(schema.database.clone(), AggregateStats)
            .partitions([key])
            .total_partitions(total)
            .batch_size(9)
            .start()
            .unwrap_or_else(|e| panic!("layout {total}, partition {key}: {e}"));
        eventually(
            &format!("partition {key}/{total} to pass {target}"),
            LIMIT,
            || {
                checkpoints(schema, total)
                    .get(key as usize)
                    .copied()
                    .unwrap_or(0)
                    >= target
            },
        );
        runner.shutdown();
        runner
            .join()
            .unwrap_or_else(|e| panic!("layout {total}, partition {key}: {e}"));
    }
    let reached = checkpoints(schema, total);
    println!("layout {total} stopped live at {reached:?}");
    reached
}

/// One runner owning every partition of `total` (switched to first with `repartition`), to
/// the end.
fn catch_up(schema: &TestSchema, total: u32, repartition: bool) -> Result<Summary, Error> {
    if repartition {
        projector::repartition(&schema.database, "aggregate-stats", total)?;
    }
    Builder::new(schema.database.clone(), AggregateStats)
        .partitions(0..total)
        .total_partitions(total)
        .batch_size(41)
        .exit_when_caught_up(true)
        .start()?
        .join()
}

/// Every layout but the last stopped at random points, then the last one to the end: every
/// event is applied exactly once, the earlier layouts are retired, and later events are
/// applied once too.
fn layouts_change_exactly(test: &str, layouts: &[u32], live: &[bool]) {
    let schema = TestSchema::migrated(test);
    let events = schema.seed(150, 10);
    let mut history = Vec::new();
    for (&total, &live) in layouts.iter().zip(live) {
        let reached = if live {
            run_live_and_stop_at_random_points(&schema, total, events)
        } else {
            run_to_random_points(&schema, total, events)
        };
        history.push((total, reached));
    }
    let last = *layouts.last().expect("a last layout");
    let before = schema.stats_applied();
    let summary = catch_up(&schema, last, true)
        .unwrap_or_else(|e| panic!("layout {last} after {history:?}: {e}"));
    assert_eq!(
        schema.stats_mismatches(),
        0,
        "after {history:?}: an event was skipped or applied twice"
    );
    assert_eq!(schema.stats_applied(), events, "after {history:?}");
    assert_eq!(
        before + summary.applied() as i64,
        events,
        "the last layout applied exactly what the earlier ones had not, after {history:?}"
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projector_prior_layouts"),
        0,
        "the earlier layouts are retired once passed"
    );
    assert_eq!(checkpoints(&schema, last), vec![events; last as usize]);

    let more = schema.seed(150, 2);
    let summary = catch_up(&schema, last, false).expect("later events");
    assert_eq!(summary.applied(), more as u64);
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn four_to_three_partitions_applies_every_event_once() {
    layouts_change_exactly("four_to_three", &[4, 3], &[false]);
}

#[test]
fn three_to_five_partitions_applies_every_event_once() {
    layouts_change_exactly("three_to_five", &[3, 5], &[false]);
}

#[test]
fn one_to_four_partitions_applies_every_event_once() {
    layouts_change_exactly("one_to_four", &[1, 4], &[false]);
}

#[test]
fn four_to_one_partition_applies_every_event_once() {
    layouts_change_exactly("four_to_one", &[4, 1], &[true]);
}

#[test]
fn two_to_five_to_three_with_the_middle_layout_stopped_part_way_applies_every_event_once() {
    layouts_change_exactly("chain", &[2, 5, 3], &[false, true]);
}

#[test]
fn a_runner_of_the_old_layout_still_running_is_fenced_and_applies_nothing_after_the_switch() {
    let schema = TestSchema::migrated("fenced");
    let first = schema.seed(100, 5);
    let old = Builder::new(schema.database.clone(), AggregateStats)
        .partitions(0..4)
        .total_partitions(4)
        .batch_size(25)
        .start()
        .expect("start the old layout");
    eventually("the old layout to catch up", LIMIT, || {
        schema.stats_applied() == first
    });

    projector::repartition(&schema.database, "aggregate-stats", 3).expect("repartition");
    let new = Builder::new(schema.database.clone(), AggregateStats)
        .partitions(0..3)
        .total_partitions(3)
        .batch_size(25)
        .start()
        .expect("start the new layout");
    let switched = Instant::now();
    // The old runner would apply these if it were not fenced; the new one must apply them once.
    let second = schema.seed(100, 5);
    let error = join_within(old, Duration::from_secs(20)).expect_err("the old runner is fenced");
    assert!(
        switched.elapsed() < Duration::from_secs(10),
        "{:?}",
        switched.elapsed()
    );
    match &error {
        Error::Fenced {
            projection,
            total,
            current,
        } => {
            assert_eq!((projection.as_str(), *total), ("aggregate-stats", 4));
            assert_eq!(current, &[3]);
        }
        other => panic!("expected the old runner to be fenced, got {other:?}"),
    }
    assert!(error.is_configuration());
    assert_eq!(
        error.to_string(),
        "fenced: projection 'aggregate-stats' now runs with 3 partitions; this process \
         (4 partitions) stops"
    );
    eventually("the new layout to apply the new events", LIMIT, || {
        schema.stats_applied() >= first + second
    });
    new.shutdown();
    let summary = new.join().expect("the new layout");
    assert_eq!(summary.applied(), second as u64, "{summary:?}");
    assert_eq!(schema.stats_applied(), first + second);
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn a_process_of_a_replaced_layout_is_fenced_even_when_its_partition_count_comes_back() {
    let schema = TestSchema::migrated("same_count_back");
    let first = schema.seed(60, 5);
    // A runner that checks its layout only when it has something to commit.
    let mut settings = Settings::default();
    settings.liveness_interval = Duration::from_secs(600);
    let stale = Builder::new(schema.database.clone(), AggregateStats)
        .settings(settings)
        .partitions(0..4)
        .total_partitions(4)
        .start()
        .expect("start");
    eventually("the first layout to catch up", LIMIT, || {
        schema.stats_applied() == first
    });
    // 4 → 2 → 4 while the first runner sleeps: its rows are back, but not its generation.
    projector::repartition(&schema.database, "aggregate-stats", 2).expect("repartition to 2");
    let switch = Builder::new(schema.database.clone(), AggregateStats)
        .partitions([0])
        .total_partitions(2)
        .start()
        .expect("switch to 2");
    switch.shutdown();
    switch.join().expect("the 2-partition runner stops");
    projector::repartition(&schema.database, "aggregate-stats", 4).expect("repartition to 4");
    let back = Builder::new(schema.database.clone(), AggregateStats)
        .partitions(0..4)
        .total_partitions(4)
        .start()
        .expect("switch back to 4");
    let second = schema.seed(60, 5);
    match join_within(stale, Duration::from_secs(20)) {
        Err(Error::Fenced { total, current, .. }) => assert_eq!((total, current), (4, vec![4])),
        other => panic!("expected the stale runner to be fenced, got {other:?}"),
    }
    eventually("the new runner to take over and apply", LIMIT, || {
        schema.stats_applied() == first + second
    });
    back.shutdown();
    back.join().expect("the new 4-partition runner");
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn a_standby_runner_takes_over_within_seconds_when_the_owner_stops() {
    let schema = TestSchema::migrated("standby");
    let first = schema.seed(80, 5);
    let start = |schema: &TestSchema| {
        Builder::new(schema.database.clone(), AggregateStats)
            .partitions(0..2)
            .total_partitions(2)
            .batch_size(20)
            .start()
            .expect("start")
    };
    let owner = start(&schema);
    eventually("the owner to catch up", LIMIT, || {
        schema.stats_applied() == first
    });
    let standby = start(&schema);
    let second = schema.seed(80, 2);
    eventually("the owner to apply more", LIMIT, || {
        schema.stats_applied() == first + second
    });
    owner.shutdown();
    let owned = owner.join().expect("the owner stops cleanly");
    assert_eq!(owned.applied(), (first + second) as u64);

    let third = schema.seed(80, 3);
    let stopped = Instant::now();
    eventually("the standby to take over", LIMIT, || {
        schema.stats_applied() == first + second + third
    });
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "took {:?}",
        stopped.elapsed()
    );
    standby.shutdown();
    let standby = standby.join().expect("the standby stops cleanly");
    assert_eq!(
        standby.applied(),
        third as u64,
        "the standby applied only what came after the owner stopped"
    );
    assert_eq!(schema.stats_mismatches(), 0);
}
