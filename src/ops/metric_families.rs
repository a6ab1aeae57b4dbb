//! The metric families [`crate::ops::metrics`] renders: their names, help texts and labels,
//! registered in one registry.

use prometheus::{
    Counter, Gauge, GaugeVec, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::engine::lane::LANE;
use crate::ops::projection_gauges::ProjectionGauges;
use crate::ops::replica_gauges::ReplicaGauges;

/// Every family, and the registry that holds them.
pub(super) struct Families {
    pub(super) registry: Registry,
    pub(super) applied: IntCounterVec,
    pub(super) retries: IntCounterVec,
    pub(super) failures: IntCounterVec,
    pub(super) checkpoint: IntGaugeVec,
    pub(super) lag_events: IntGaugeVec,
    pub(super) lag_seconds: GaugeVec,
    pub(super) state: IntGaugeVec,
    pub(super) commit_seconds: HistogramVec,
    pub(super) head: IntGauge,
    pub(super) read_position: IntGauge,
    pub(super) rows_read: IntCounter,
    pub(super) gap_wait: Counter,
    pub(super) gap_age: Gauge,
    pub(super) gap_pid: IntGauge,
    pub(super) figures_age: Gauge,
    pub(super) notifications_held: IntGauge,
    pub(super) parked_aggregates: IntGaugeVec,
    pub(super) parked_events: IntGaugeVec,
    pub(super) projections: ProjectionGauges,
    pub(super) replica: Option<ReplicaGauges>,
    pub(super) owned: IntGaugeVec,
    pub(super) rebalances: IntCounter,
}

impl Families {
    pub(super) fn new(
        commit_seconds: HistogramVec,
        with_replica: bool,
    ) -> Result<Families, prometheus::Error> {
        let registry = Registry::new();
        let lane = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &LANE);
        let count = |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &LANE);
        let families = Families {
            applied: count(
                "projector_events_applied_total",
                "Events applied by this process.",
            )?,
            retries: count(
                "projector_retries_total",
                "Attempts at a batch that failed and were retried (projection errors and lost connections).",
            )?,
            failures: count(
                "projector_failures_total",
                "Projection failures that stopped the partition after its last attempt.",
            )?,
            checkpoint: lane(
                "projector_checkpoint_position",
                "The partition's checkpoint.",
            )?,
            lag_events: lane(
                "projector_lag_events",
                "Events stored after the partition's checkpoint (counted up to 10,000 positions behind the head, the positions between beyond).",
            )?,
            lag_seconds: GaugeVec::new(
                Opts::new(
                    "projector_lag_seconds",
                    "How long ago the first event after the checkpoint was stored; 0 when none.",
                ),
                &LANE,
            )?,
            state: IntGaugeVec::new(
                Opts::new(
                    "projector_partition_state",
                    "1 for the partition's current state: starting, standby, waiting, owned, fenced, failed or stopped.",
                ),
                &[
                    "projection",
                    "version",
                    "partition",
                    "total_partitions",
                    "state",
                ],
            )?,
            commit_seconds,
            head: IntGauge::new(
                "projector_head_position",
                "The highest position in the stream.",
            )?,
            read_position: IntGauge::new(
                "projector_read_position",
                "How far the fetcher has read the stream (complete up to here).",
            )?,
            rows_read: IntCounter::new(
                "projector_events_read_total",
                "Events the fetcher read, of every partition.",
            )?,
            gap_wait: Counter::new(
                "projector_gap_wait_seconds_total",
                "Time the fetcher spent held at a position that may still commit.",
            )?,
            gap_age: Gauge::new(
                "projector_gap_held_seconds",
                "How long the gap the fetcher waits at has been held; 0 when none.",
            )?,
            gap_pid: IntGauge::new(
                "projector_gap_blocking_pid",
                "Server process id of a transaction holding the gap; 0 when none (or prepared).",
            )?,
            figures_age: Gauge::new(
                "projector_database_figures_age_seconds",
                "Seconds since the database last answered a scrape's head, lag and parked queries (their figures are shown as it gave them then); -1 before it first answered.",
            )?,
            notifications_held: IntGauge::new(
                "projector_fetcher_notifications_held",
                "Notifications of appends the fetcher's connection holds (as its last read left them).",
            )?,
            parked_aggregates: IntGaugeVec::new(
                Opts::new(
                    "projector_parked_aggregates",
                    "Aggregates with parked events (--on-poison park), per projection.",
                ),
                &["projection", "version"],
            )?,
            parked_events: IntGaugeVec::new(
                Opts::new(
                    "projector_parked_events",
                    "Events parked in projection_dead_letters, per projection.",
                ),
                &["projection", "version"],
            )?,
            projections: ProjectionGauges::new(&registry)?,
            replica: match with_replica {
                true => Some(ReplicaGauges::new(&registry)?),
                false => None,
            },
            owned: IntGaugeVec::new(
                Opts::new(
                    "projector_partitions_owned",
                    "Partitions this process holds (applies), per projection and layout.",
                ),
                &["projection", "version", "total_partitions"],
            )?,
            rebalances: IntCounter::new(
                "projector_rebalances_total",
                "Times the partitions this process is to hold changed (--partition-key auto).",
            )?,
            registry,
        };
        let r = &families.registry;
        r.register(Box::new(families.owned.clone()))?;
        r.register(Box::new(families.rebalances.clone()))?;
        r.register(Box::new(families.parked_aggregates.clone()))?;
        r.register(Box::new(families.parked_events.clone()))?;
        r.register(Box::new(families.applied.clone()))?;
        r.register(Box::new(families.retries.clone()))?;
        r.register(Box::new(families.failures.clone()))?;
        r.register(Box::new(families.checkpoint.clone()))?;
        r.register(Box::new(families.lag_events.clone()))?;
        r.register(Box::new(families.lag_seconds.clone()))?;
        r.register(Box::new(families.state.clone()))?;
        r.register(Box::new(families.commit_seconds.clone()))?;
        r.register(Box::new(families.head.clone()))?;
        r.register(Box::new(families.read_position.clone()))?;
        r.register(Box::new(families.rows_read.clone()))?;
        r.register(Box::new(families.gap_wait.clone()))?;
        r.register(Box::new(families.gap_age.clone()))?;
        r.register(Box::new(families.gap_pid.clone()))?;
        r.register(Box::new(families.notifications_held.clone()))?;
        r.register(Box::new(families.figures_age.clone()))?;
        Ok(families)
    }
}
