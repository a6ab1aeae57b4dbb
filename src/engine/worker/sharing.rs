//! A worker's side of sharing partitions ([`crate::engine::balancer`]): giving its partition
//! up between transactions when its process is not to hold it, and taking it up again from the
//! checkpoint when it is handed back.

use std::sync::atomic::Ordering;
use std::time::Duration;

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
        loop {
            if !self.drop_queued() {
                return Ok(None);
            }
            if self.progress.is_wanted() {
                break;
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
