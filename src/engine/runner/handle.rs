//! The handle of a running group of projections: stop it, wait for it, and what it did.

use super::*;

/// Running projections: a fetcher thread and one worker thread per owned partition of each.
///
/// Dropping it asks the threads to stop without waiting for them; call
/// [`join`](Runner::join) to wait and get the figures.
#[derive(Debug)]
pub struct Runner {
    pub(crate) stopper: Stopper,
    pub(crate) fetcher: Option<JoinHandle<Result<u64, Error>>>,
    pub(crate) projections: Vec<RunningProjection>,
    pub(crate) monitor: Option<JoinHandle<Result<(), Error>>>,
    /// Shares the partitions with other processes, when they are shared.
    pub(crate) balancer: Option<JoinHandle<Result<(), Error>>>,
    /// Reads for the lanes that started far behind, while it does.
    pub(crate) catch_up: Option<JoinHandle<Result<(), Error>>>,
    pub(crate) started: Instant,
    /// What the runner shows of itself, for [`Runner::metrics`].
    pub(crate) figures: Figures,
    /// The one [`Metrics`](crate::Metrics) handle of the runner, made by [`crate::ops`] at the
    /// first call of [`Runner::metrics`] (held as `Any` so that the engine needs nothing of
    /// operations).
    pub(crate) metrics: OnceLock<Box<dyn Any + Send + Sync>>,
    /// Where each projection's end is told, for [`Runner::stopped_projections`].
    pub(crate) stopped: Receiver<ProjectionStopped>,
}

/// What a runner did, from [`Runner::join`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Summary {
    /// Per projection, in the order they were given to the [`Builder`](crate::Builder).
    pub projections: Vec<ProjectionSummary>,
    /// Events the fetcher read (of all partitions), once for all projections.
    pub events_read: u64,
    /// From start to the last thread's end.
    pub elapsed: Duration,
}

/// What one projection of a runner did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ProjectionSummary {
    /// The projection's name.
    pub projection: String,
    /// The number of partitions.
    pub total_partitions: u32,
    /// Per owned partition, in key order.
    pub partitions: Vec<PartitionSummary>,
}

impl Summary {
    /// Events applied, all projections and partitions together.
    pub fn applied(&self) -> u64 {
        self.projections
            .iter()
            .map(ProjectionSummary::applied)
            .sum()
    }

    /// Events parked instead of applied (park policy), all projections and partitions
    /// together.
    pub fn parked(&self) -> u64 {
        self.projections.iter().map(ProjectionSummary::parked).sum()
    }
}

impl ProjectionSummary {
    /// Events applied, all partitions together.
    pub fn applied(&self) -> u64 {
        self.partitions.iter().map(|p| p.applied).sum()
    }

    /// Events parked instead of applied (park policy), all partitions together.
    pub fn parked(&self) -> u64 {
        self.partitions.iter().map(|p| p.parked).sum()
    }
}

impl Runner {
    /// True once every thread of the runner has ended (it does not wait): [`join`](Runner::join)
    /// then returns at once.
    pub fn is_finished(&self) -> bool {
        self.projections
            .iter()
            .flat_map(|projection| &projection.workers)
            .all(|(_, worker)| worker.is_finished())
            && self.fetcher.as_ref().is_none_or(JoinHandle::is_finished)
            && self.monitor.as_ref().is_none_or(JoinHandle::is_finished)
            && self.balancer.as_ref().is_none_or(JoinHandle::is_finished)
            && self.catch_up.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// A channel that receives a [`ProjectionStopped`] when a projection of this runner stops
    /// (all its workers have ended), once per projection: on a failure (while the other
    /// projections go on), and at the end of the run. Receiving blocks until one does; once
    /// every projection has stopped and its notice was taken, the channel is disconnected (so
    /// `for notice in runner.stopped_projections()` ends with the run). Every call returns a
    /// handle on the same channel: one notice reaches one receiver.
    pub fn stopped_projections(&self) -> Receiver<ProjectionStopped> {
        self.stopped.clone()
    }
}

impl Runner {
    /// Asks the runner to stop; see [`Stopper::stop`].
    pub fn shutdown(&self) {
        self.stopper.stop();
    }

    /// A handle that stops this runner from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Waits for every thread to end. Returns the figures, or the first error a thread met (a
    /// worker's before the fetcher's).
    ///
    /// A projection that fails stops alone: its error is logged when it happens, the other
    /// projections go on until they are done or the runner is shut down, and `join` then
    /// returns the first projection's error.
    pub fn join(mut self) -> Result<Summary, Error> {
        let mut first_error = None;
        let mut projections = Vec::new();
        for projection in std::mem::take(&mut self.projections) {
            let mut partitions = Vec::new();
            for (partition, handle) in projection.workers {
                match join(handle, &format!("projector-p{partition}")) {
                    Ok(summary) => partitions.push(summary),
                    Err(error) => {
                        first_error.get_or_insert(error);
                    }
                }
            }
            projections.push(ProjectionSummary {
                projection: projection.name,
                total_partitions: projection.total_partitions,
                partitions,
            });
        }
        let events_read = match self.fetcher.take().map(|h| join(h, "projector-fetch")) {
            Some(Ok(read)) => read,
            Some(Err(error)) => {
                first_error.get_or_insert(error);
                0
            }
            None => 0,
        };
        self.stopper.stop();
        if let Some(monitor) = self.monitor.take() {
            let _ = join(monitor, "projector-progress");
        }
        if let Some(balancer) = self.balancer.take() {
            let _ = join(balancer, "projector-balance");
        }
        if let Some(catch_up) = self.catch_up.take() {
            let _ = join(catch_up, "projector-behind");
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(Summary {
                projections,
                events_read,
                elapsed: self.started.elapsed(),
            }),
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stopper.stop();
    }
}

fn join<T>(handle: JoinHandle<Result<T, Error>>, name: &str) -> Result<T, Error> {
    handle.join().unwrap_or_else(|_| {
        Err(Error::ThreadPanicked {
            thread: name.to_owned(),
        })
    })
}
