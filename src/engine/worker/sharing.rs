//! A worker's side of sharing partitions ([`crate::engine::balancer`]): giving its partition
//! up between transactions when its process is not to hold it, and taking it up again from the
//! checkpoint when it is handed back.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{TryRecvError, select};
use log::info;

use crate::Error;
use crate::engine::lane::LaneState;
use crate::engine::worker::ownership::Role;
use crate::engine::worker::{Connection, Failure, PartitionSummary, Worker, discard};
use crate::projections::projection::Projection;

/// How often a worker sitting out looks whether its partition is handed back.
const LOOK_EVERY: Duration = Duration::from_millis(50);

impl<P: Projection> Worker<P> {
    /// This process is not to hold the partition now, or this worker dropped a batch for that
    /// reason and has not sat out since.
    pub(crate) fn sitting_out(&self) -> bool {
        self.must_sit_out || !self.progress.is_wanted()
    }

    /// Gives the partition's lock back (if this connection holds it) and drops the connection.
    pub(crate) fn let_go(&self, slot: &mut Option<Connection>) {
        discard(slot);
        self.progress.holds.store(false, Ordering::Release);
    }

    /// Between transactions, while this process is not to hold the partition: gives it up,
    /// leaves the shared read and drops what was queued (whoever holds the partition applies
    /// it), then waits until the partition is handed back. Returns `None` when asked to stop
    /// meanwhile (or the stream ended for a runner that exits when caught up); else the
    /// position to read the partition's own events from: its checkpoint, read after the
    /// partition came back, so at or below wherever the last holder stopped.
    pub(crate) fn sit_out(
        &mut self,
        slot: &mut Option<Connection>,
        summary: &mut PartitionSummary,
    ) -> Result<Option<i64>, Error> {
        let (partition, total) = (self.context.partition, self.context.total_partitions);
        if slot.as_ref().is_some_and(|connection| connection.holds) {
            info!(
                "partition {partition}/{total} of '{}' goes to another process (its share of \
                 the partitions moved)",
                self.projection.name()
            );
        }
        self.let_go(slot);
        self.drop_held();
        self.role = Role::Starting;
        self.progress.set_state(LaneState::Standby);
        self.stragglers.step_aside(self.lane);
        // A hand-out the router began before this lane stepped aside may still put a batch on
        // its queue: once it has ended, what is dropped below is all there will be (a batch
        // arriving after the checkpoint is read would skip what lies before it).
        self.stragglers.wait_between_hand_outs();
        let mut looked = Instant::now();
        loop {
            if !self.drop_queued() {
                return Ok(None);
            }
            if self.progress.is_wanted() {
                break;
            }
            if looked.elapsed() >= self.settings.liveness_interval {
                // Without a lock or a batch, only a look at the checkpoint finds out that a
                // re-partitioning replaced this layout (fenced: the runner starts again on it).
                self.check_still_current(slot)?;
                looked = Instant::now();
            }
            select! {
                recv(self.stop) -> _ => return Ok(None),
                default(LOOK_EVERY) => {}
            }
        }
        // Anything the router handed out while the lane stepped aside is read again.
        if !self.drop_queued() {
            return Ok(None);
        }
        let Some(checkpoint) = self.checkpoint_now(slot)? else {
            return Ok(None);
        };
        summary.checkpoint = checkpoint;
        self.progress
            .checkpoint
            .store(checkpoint, Ordering::Relaxed);
        self.must_sit_out = false;
        Ok(Some(checkpoint))
    }

    /// Drops every batch on the queue; false once the fetcher is done and the runner exits
    /// when caught up (nothing more will come).
    fn drop_queued(&self) -> bool {
        loop {
            match self.batches.try_recv() {
                Ok(_) => {}
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return !self.settings.exit_when_caught_up,
            }
        }
    }

    /// The partition's checkpoint as stored now, riding out a lost connection; `None` when
    /// asked to stop meanwhile.
    fn checkpoint_now(&mut self, slot: &mut Option<Connection>) -> Result<Option<i64>, Error> {
        loop {
            let lost = match self.peek_checkpoint(slot) {
                Ok(position) => {
                    self.outage.back(&self.thread, &mut self.attempts);
                    return Ok(Some(position));
                }
                Err(Failure::Connection(error)) => error,
                Err(Failure::Fatal(error)) => return Err(error),
                Err(_) => continue,
            };
            self.let_go(slot);
            let delay = self.outage.lost_with_backoff(
                &self.thread,
                &mut self.attempts,
                lost,
                &self.settings,
            )?;
            if self.sleep_or_stop(delay) {
                return Ok(None);
            }
        }
    }

    /// Fails with the fenced error when this layout's checkpoint row is gone; a lost connection
    /// is let go (looked at again later).
    fn check_still_current(&mut self, slot: &mut Option<Connection>) -> Result<(), Error> {
        match self.peek_checkpoint(slot) {
            Err(Failure::Fatal(error)) => Err(error),
            Ok(_) => Ok(()),
            Err(_) => {
                self.let_go(slot);
                Ok(())
            }
        }
    }

    /// One try at reading the checkpoint (fenced when this layout's row is gone).
    fn peek_checkpoint(&mut self, slot: &mut Option<Connection>) -> Result<i64, Failure> {
        let connection = match slot {
            Some(connection) => connection,
            None => slot.insert(self.connect()?),
        };
        match connection.statements.peek(&mut connection.client) {
            Ok(Some(peek)) => Ok(peek.position),
            Ok(None) => Err(Failure::Fatal(
                connection.statements.fenced(&mut connection.client),
            )),
            Err(source) => Err(self.failure(source)),
        }
    }
}
