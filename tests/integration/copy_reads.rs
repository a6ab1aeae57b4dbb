//! Catch-up reads by one streaming binary `COPY` far from the head: every event once and in
//! order, never past a position that may still commit, and nothing lost or doubled when the
//! connection is cut in the middle of a `COPY`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use projector::postgres::Transaction;
use projector::projections::AggregateStats;
use projector::{BoxError, Builder, Context, Database, Event, Projection, Settings};

use crate::cluster::Cluster;
use crate::proxy::Proxy;
use crate::util::{TestSchema, eventually, insert_event, join_within};

const WAIT: Duration = Duration::from_secs(60);

/// Events the runner has read by `COPY`, from its metrics.
fn copied(runner_metrics: &projector::Metrics) -> u64 {
    runner_metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix("projector_events_copied_total "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

fn small_batches() -> Settings {
    let mut settings = Settings::default();
    settings.batch_size = 1_000;
    settings
}

/// Four partitions of `projection` on `database`.
fn builder<P: Projection>(database: &Database, projection: P, settings: Settings) -> Builder {
    Builder::new(database.clone(), projection)
        .settings(settings)
        .partitions(0..4)
        .total_partitions(4)
}

#[test]
fn a_catch_up_far_from_the_head_is_copied_every_event_once_in_order() {
    let schema = TestSchema::migrated("copy_catch_up");
    let events = schema.seed(500, 100);
    let mut settings = small_batches();
    settings.exit_when_caught_up = true;
    let runner = builder(&schema.database, AggregateStats, settings)
        .start()
        .expect("start the runner");
    let metrics = runner.metrics();
    join_within(runner, WAIT).expect("the runner catches up");
    assert_eq!(schema.stats_applied(), events);
    assert_eq!(schema.stats_mismatches(), 0, "every event once, in order");
    let copied = copied(&metrics);
    assert!(
        copied >= 40_000,
        "most of the catch-up is read by COPY, copied {copied} of {events}"
    );
}

#[test]
fn a_hole_held_open_is_never_passed_by_a_copy() {
    let schema = TestSchema::migrated("copy_hole");
    let before = schema.seed(400, 100);
    let mut holder = schema.client();
    let mut open = holder.transaction().expect("begin");
    let hole = insert_event(&mut open, "hole-1", 1);
    assert_eq!(hole, before + 1);
    let after = schema.seed_prefixed("after", 400, 100);
    let runner = builder(&schema.database, AggregateStats, small_batches())
        .start()
        .expect("start the runner");
    let metrics = runner.metrics();
    eventually("the events below the hole to be applied", WAIT, || {
        schema.stats_applied() >= before
    });
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        schema.stats_applied(),
        before,
        "nothing above the open transaction's position is applied while it may commit"
    );
    open.commit().expect("commit the hole");
    eventually("every event to be applied", WAIT, || {
        schema.stats_applied() == before + 1 + after
    });
    runner.shutdown();
    join_within(runner, WAIT).expect("the runner stops cleanly");
    assert_eq!(schema.stats_mismatches(), 0, "every event once, in order");
    assert!(
        copied(&metrics) > 0,
        "once the hole has committed, the rest is read by COPY"
    );
}

/// `AggregateStats`, whose worker waits for `gate` before applying an event past `from`.
#[derive(Clone)]
struct Gated {
    gate: Arc<AtomicBool>,
    from: i64,
}

impl Projection for Gated {
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
        self.apply_batch(tx, std::slice::from_ref(event), context)
    }

    fn apply_batch(
        &mut self,
        tx: &mut Transaction<'_>,
        events: &[Event],
        context: &Context,
    ) -> Result<(), BoxError> {
        if events.iter().any(|e| e.global_position > self.from) {
            while !self.gate.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        AggregateStats.apply_batch(tx, events, context)
    }
}

#[test]
fn a_connection_cut_in_the_middle_of_a_copy_loses_and_doubles_nothing() {
    let cluster = Cluster::start("copy_cut");
    let schema = TestSchema::migrated_on(&cluster.url(), "copy_cut");
    let events = schema.seed(1_000, 200);
    let proxy = Proxy::to(cluster.port());
    let through = Database::new(&proxy.url(&cluster.url()))
        .and_then(|d| d.schema(&schema.name))
        .expect("the proxied URL is valid");
    let gate = Arc::new(AtomicBool::new(false));
    let gated = Gated {
        gate: Arc::clone(&gate),
        from: 20_000,
    };
    let mut settings = small_batches();
    settings.exit_when_caught_up = true;
    let runner = builder(&through, gated, settings)
        .start()
        .expect("start the runner");
    let metrics = runner.metrics();
    // The workers wait at the gate, so the fetcher waits in the middle of its COPY, with the
    // rest of the stream unread.
    eventually("the COPY to be under way", WAIT, || {
        copied(&metrics) >= 20_000
    });
    std::thread::sleep(Duration::from_millis(300));
    let copied_at_cut = copied(&metrics);
    assert!(
        copied_at_cut < events as u64 / 2,
        "the fetcher waits in the middle of its COPY, copied {copied_at_cut} of {events}"
    );
    let accepted = proxy.accepted();
    assert!(proxy.cut() > 0, "connections to cut");
    gate.store(true, Ordering::Release);
    join_within(runner, WAIT).expect("the runner catches up after the cut");
    assert!(proxy.accepted() > accepted, "the runner connected again");
    assert_eq!(schema.stats_applied(), events);
    assert_eq!(schema.stats_mismatches(), 0, "every event once, in order");
    assert!(
        copied(&metrics) > copied_at_cut,
        "the rest is read by COPY again after the cut"
    );
}
