//! A paused projection (`projector pause`): its workers finish the transaction in progress,
//! then hold their partitions (the session lock, and the liveness ticks that keep it) without
//! applying, until it is resumed.
//!
//! The stored state is read between transactions, at most once per [`CHECK_EVERY`] for all the
//! workers of a projection together (whichever worker is due reads it on its own connection),
//! so pausing costs a running projection one small query a second. A paused worker leaves the
//! shared read (as a straggler does, see [`crate::engine::straggler`]), so that the other
//! projections of the process go on, and reads what it missed itself once resumed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::engine::worker::{Connection, PartitionSummary, Worker};
use crate::projections::projection::Projection;
use crate::store::state;
use crate::{Error, lock};

/// How often the workers of a projection read whether it is paused, at most.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Whether one projection is paused, as last read, shared by its workers.
#[derive(Debug)]
pub(crate) struct PauseWatch {
    projection: String,
    /// The schema has the table of states (else nothing is ever paused).
    available: bool,
    paused: AtomicBool,
    /// When the state was last read; `None` before the first read.
    checked: Mutex<Option<Instant>>,
}

impl PauseWatch {
    pub(crate) fn new(projection: &str, available: bool) -> PauseWatch {
        PauseWatch {
            projection: projection.to_owned(),
            available,
            paused: AtomicBool::new(false),
            checked: Mutex::new(None),
        }
    }

    /// Paused, as last read.
    fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Whether the projection is paused: read again through `client` when the last read is
    /// older than [`CHECK_EVERY`]; as last read otherwise (also when the read fails: a lost
    /// connection is the worker's to find). A worker that finds another one reading waits for
    /// its answer: going on with the older one could apply a batch after a pause.
    fn is_paused(&self, client: Option<&mut postgres::Client>) -> bool {
        if !self.available {
            return false;
        }
        let mut checked = lock(&self.checked);
        let due = checked.is_none_or(|at| at.elapsed() >= CHECK_EVERY);
        if let (true, Some(client)) = (due, client) {
            match state::is_paused(client, &self.projection) {
                Ok(paused) => {
                    *checked = Some(Instant::now());
                    if self.paused.swap(paused, Ordering::AcqRel) != paused {
                        self.say_changed(paused);
                    }
                }
                Err(error) => debug!(
                    "could not read whether '{}' is paused: {error}",
                    self.projection
                ),
            }
        }
        self.paused()
    }

    fn say_changed(&self, paused: bool) {
        let name = &self.projection;
        if paused {
            info!(
                "projection '{name}' is paused: its partitions are held and nothing is applied \
                 until `projector resume --projection {}`",
                crate::shell_word(name)
            );
        } else {
            info!("projection '{name}' resumed: its partitions apply again");
        }
    }
}

impl<P: Projection> Worker<P> {
    /// Before a transaction: while the projection is paused, holds the partition without
    /// applying, out of the shared read. True when asked to stop meanwhile.
    pub(crate) fn hold_while_paused(
        &mut self,
        connection: &mut Option<Connection>,
        summary: &mut PartitionSummary,
    ) -> Result<bool, Error> {
        let pause = std::sync::Arc::clone(&self.pause);
        if connection.is_none() {
            // The state is read on the worker's connection; the commit would make one anyway.
            if let Ok(made) = self.connect() {
                *connection = Some(made);
            }
        }
        if !pause.is_paused(connection.as_mut().map(|c| &mut *c.client)) {
            return Ok(false);
        }
        // The router must not wait for a queue nobody takes from: read it back afterwards.
        self.stragglers.step_aside(self.lane);
        loop {
            if self.sleep_or_stop(CHECK_EVERY.min(self.settings.liveness_interval)) {
                return Ok(true);
            }
            if self.sitting_out() {
                // Sharing partitions: the partition goes to another process even while paused
                // (the batch is dropped, and the worker sits out before anything else).
                self.must_sit_out = true;
                return Ok(false);
            }
            // Keeps the partition's lock and the session alive, and sees a fencing.
            self.keep_watch(connection, summary)?;
            if !pause.is_paused(connection.as_mut().map(|c| &mut *c.client)) {
                return Ok(false);
            }
        }
    }
}
