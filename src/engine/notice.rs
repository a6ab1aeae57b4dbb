//! How a runner tells of a projection that stops: a [`ProjectionStopped`] on the channel of
//! [`Runner::stopped_projections`](crate::Runner::stopped_projections) for an embedder, and,
//! when it failed, a row in `projector_projection_states` for `projector status` (see
//! [`crate::store::state`]), cleared by the next successful start. And
//! [`Runner::is_finished`](crate::Runner::is_finished): whether every thread has ended, without waiting.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;
use postgres::Client;

use crate::engine::worker::PartitionSummary;
use crate::store::state;
use crate::{Database, Error, error_chain, lock};

/// A projection of a runner has stopped: every worker of it has ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionStopped {
    /// The projection.
    pub projection: String,
    /// Why, when it failed: the first error of its workers, with its causes (the error itself
    /// comes from [`Runner::join`](crate::Runner::join)); `None` when it stopped because it was
    /// asked to, or was done (`exit_when_caught_up`).
    pub error: Option<String>,
}

/// The end of one projection's workers: counts them down, stores its failure, and tells.
#[derive(Debug)]
pub(crate) struct ProjectionEnd {
    name: String,
    database: Database,
    /// The schema has `projector_projection_states`.
    stores_states: bool,
    running: AtomicUsize,
    first_error: Mutex<Option<String>>,
    notices: Sender<ProjectionStopped>,
}

impl ProjectionEnd {
    pub(crate) fn new(
        name: &str,
        workers: usize,
        database: &Database,
        stores_states: bool,
        notices: &Sender<ProjectionStopped>,
    ) -> ProjectionEnd {
        ProjectionEnd {
            name: name.to_owned(),
            database: database.clone(),
            stores_states,
            running: AtomicUsize::new(workers),
            first_error: Mutex::new(None),
            notices: notices.clone(),
        }
    }

    /// Taken by a worker thread as it starts: counts the worker down when dropped, however
    /// the thread ends (a panic included).
    pub(crate) fn worker_starts(self: &Arc<Self>) -> WorkerEnding {
        WorkerEnding {
            end: Arc::clone(self),
        }
    }

    /// The first failure of the projection's workers is kept, and stored.
    fn failed(&self, error: &Error) {
        let first = {
            let mut first_error = lock(&self.first_error);
            let first = first_error.is_none();
            first_error.get_or_insert_with(|| error_chain(error));
            first
        };
        // A version replaced by a promotion ends as planned: `status` lists it as retired,
        // not as a failure.
        let planned = matches!(error, Error::VersionRetired { .. });
        if first && self.stores_states && !planned {
            state::record_failure(&self.database, &self.name, error);
        }
    }

    /// One worker fewer; once none is left, the projection's end is told.
    fn count_down(&self) {
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Nobody listening is fine: the notice is for those who want it.
            let _ = self.notices.send(ProjectionStopped {
                projection: self.name.clone(),
                error: lock(&self.first_error).clone(),
            });
        }
    }
}

/// A worker of a projection, until its thread ends.
pub(crate) struct WorkerEnding {
    end: Arc<ProjectionEnd>,
}

impl WorkerEnding {
    /// The worker ended with `result`.
    pub(crate) fn ended(self, result: &Result<PartitionSummary, Error>) {
        if let Err(error) = result {
            self.end.failed(error);
        }
    }
}

impl Drop for WorkerEnding {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let thread = std::thread::current().name().unwrap_or("worker").to_owned();
            self.end.failed(&Error::ThreadPanicked { thread });
        }
        self.end.count_down();
    }
}

/// At start, before any worker runs: whether the schema stores projection states (saying to
/// run `migrate` when it does not), and, if it does, the failures of the partitions about to
/// start cleared.
pub(crate) fn states_at_start<'a>(
    client: &mut Client,
    database: &Database,
    starting: impl IntoIterator<Item = (&'a str, &'a [u32], u32)>,
) -> Result<bool, Error> {
    if !state::available(client, database.schema_name())? {
        return Ok(false);
    }
    for (name, keys, total) in starting {
        state::clear_failure(client, name, keys, total)?;
    }
    Ok(true)
}
