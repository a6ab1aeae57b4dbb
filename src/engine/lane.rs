//! A lane: one partition of one projection in a runner. Its worker keeps its figures in
//! atomics ([`Progress`]); the progress log and [`crate::ops`] (metrics, health) read them
//! through [`LaneProgress`], never the other way round.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};

use prometheus::{Histogram, HistogramOpts, HistogramVec};

use crate::Error;
use crate::store::registry::split_stored_name;

/// The label names of a lane's figures.
pub(crate) const LANE: [&str; 4] = ["projection", "version", "partition", "total_partitions"];

/// What a partition's worker is doing, as the `state` label of `projector_partition_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum LaneState {
    Starting = 0,
    Standby = 1,
    Waiting = 2,
    Owned = 3,
    Fenced = 4,
    Failed = 5,
    Stopped = 6,
}

pub(crate) const STATES: [(LaneState, &str); 7] = [
    (LaneState::Starting, "starting"),
    (LaneState::Standby, "standby"),
    (LaneState::Waiting, "waiting"),
    (LaneState::Owned, "owned"),
    (LaneState::Fenced, "fenced"),
    (LaneState::Failed, "failed"),
    (LaneState::Stopped, "stopped"),
];

impl LaneState {
    /// The worker has ended.
    pub(crate) fn is_done(self) -> bool {
        matches!(
            self,
            LaneState::Fenced | LaneState::Failed | LaneState::Stopped
        )
    }

    pub(crate) fn from_u8(value: u8) -> LaneState {
        STATES
            .iter()
            .map(|(state, _)| *state)
            .find(|state| *state as u8 == value)
            .unwrap_or(LaneState::Starting)
    }

    pub(crate) fn name(self) -> &'static str {
        STATES
            .iter()
            .find(|(state, _)| *state == self)
            .map_or("starting", |(_, name)| name)
    }
}

/// Figures a worker shares while it runs, for progress lines and metrics.
#[derive(Debug)]
pub(crate) struct Progress {
    pub(crate) applied: AtomicU64,
    pub(crate) checkpoint: AtomicI64,
    /// While the partition is owned here: every event of it up to this position is applied,
    /// though the checkpoint may not say so yet (idle positions are written once a second).
    pub(crate) through: AtomicI64,
    /// Failed attempts at a batch that were tried again.
    pub(crate) retries: AtomicU64,
    /// Attempts that were the last: the partition stopped on an event.
    pub(crate) failures: AtomicU64,
    /// A [`LaneState`], as its number.
    pub(crate) state: AtomicU8,
    /// How long each transaction took.
    pub(crate) commit_seconds: Histogram,
    /// The process is to hold the partition: always, unless it shares partitions with other
    /// processes ([`crate::engine::balancer`]), whose balancer sets it.
    pub(crate) wanted: AtomicBool,
    /// The worker's connection holds the partition's session lock.
    pub(crate) holds: AtomicBool,
}

impl Progress {
    pub(crate) fn new(checkpoint: i64, commit_seconds: Histogram, wanted: bool) -> Progress {
        Progress {
            applied: AtomicU64::new(0),
            checkpoint: AtomicI64::new(checkpoint),
            through: AtomicI64::new(checkpoint),
            retries: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            state: AtomicU8::new(LaneState::Starting as u8),
            commit_seconds,
            wanted: AtomicBool::new(wanted),
            holds: AtomicBool::new(false),
        }
    }

    /// The process is to hold the partition now.
    pub(crate) fn is_wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    pub(crate) fn set_state(&self, state: LaneState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }
}

/// The figures of one worker: a partition of a projection.
#[derive(Clone)]
pub(crate) struct LaneProgress {
    pub(crate) projection: String,
    pub(crate) partition: u32,
    pub(crate) total: u32,
    pub(crate) progress: Arc<Progress>,
}

impl LaneProgress {
    pub(crate) fn applied(&self) -> u64 {
        self.progress.applied.load(Ordering::Relaxed)
    }

    pub(crate) fn checkpoint(&self) -> i64 {
        self.progress.checkpoint.load(Ordering::Relaxed)
    }

    /// The position up to which every event of the partition is applied: past the checkpoint
    /// while the partition is owned here and its worker has received batches with nothing for
    /// it that it has not written yet.
    pub(crate) fn applied_through(&self) -> i64 {
        let checkpoint = self.checkpoint();
        if self.state() == LaneState::Owned {
            checkpoint.max(self.progress.through.load(Ordering::Relaxed))
        } else {
            checkpoint
        }
    }

    pub(crate) fn state(&self) -> LaneState {
        LaneState::from_u8(self.progress.state.load(Ordering::Relaxed))
    }
}

/// The commit-duration histograms of a runner's partitions, made before its workers so that
/// each worker observes its own.
pub(crate) struct CommitTimers(pub(crate) HistogramVec);

impl CommitTimers {
    pub(crate) fn new() -> Result<CommitTimers, Error> {
        let opts = HistogramOpts::new(
            "projector_batch_commit_duration_seconds",
            "Time of one worker transaction: apply the events and move the checkpoint.",
        )
        .buckets(vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        HistogramVec::new(opts, &LANE)
            .map(CommitTimers)
            .map_err(|error| Error::Metrics {
                reason: error.to_string(),
            })
    }

    pub(crate) fn for_lane(
        &self,
        projection: &str,
        partition: u32,
        total: u32,
    ) -> prometheus::Histogram {
        let version = split_stored_name(projection).1.to_string();
        self.0.with_label_values(&[
            projection,
            &version,
            &partition.to_string(),
            &total.to_string(),
        ])
    }
}
