//! Who may apply a partition: the worker holding its session lock, once no live process of
//! another layout holds one; standbys follow the holder, and a replaced layout is fenced.

use std::sync::atomic::Ordering;

use log::{info, warn};

use crate::Error;
use crate::engine::lane::LaneState;
use crate::engine::worker::{Connection, Failure, PartitionSummary, Worker};
use crate::layout::checkpoint::{Holder, Peek, strangers_among};
use crate::projections::projection::Projection;

/// What a session holding a partition's lock without its badge (see `checkpoint`) is.
const NOT_A_PROJECTOR: &str = "that session holds the advisory lock the partition takes, but \
     not the badge a projector takes with it: another application's lock whose keys are the \
     same, or a projection whose lock keys collide with this one's (or a projector older than \
     the badges); end that session or change its keys";

/// Whether a worker may apply its partition's events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Not known yet.
    #[default]
    Starting,
    /// Another live process holds the partition: this worker follows its checkpoint and takes
    /// over when that process's connection goes.
    Standby,
    /// This worker holds the partition but waits for live processes of another layout to stop.
    Waiting,
    /// This worker holds the partition and applies its events.
    Owner,
}

impl<P: Projection> Worker<P> {
    /// Between batches: takes the partition over once its holder is gone, and checks that
    /// this worker's layout still stands, so that a standby takes over and a fenced process
    /// stops even while no events arrive.
    pub(crate) fn keep_watch(
        &mut self,
        slot: &mut Option<Connection>,
        summary: &mut PartitionSummary,
    ) -> Result<(), Error> {
        let connection = match slot {
            Some(connection) => connection,
            None => match self.connect() {
                Ok(connection) => slot.insert(connection),
                Err(Failure::Connection(error)) => {
                    // Tried again at the next tick.
                    let delay = self.settings.liveness_interval;
                    return self.outage.lost(
                        &self.thread,
                        &mut self.attempts,
                        error,
                        delay,
                        &self.settings,
                    );
                }
                Err(Failure::Fatal(error)) => return Err(error),
                Err(_) => return Ok(()),
            },
        };
        let outcome = self.own(connection).and_then(|()| {
            match connection.statements.peek(&mut connection.client) {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(Failure::Fatal(
                    connection.statements.fenced(&mut connection.client),
                )),
                Err(source) => Err(self.failure(source)),
            }
        });
        match outcome {
            Ok(())
            | Err(
                Failure::Waiting
                | Failure::CheckpointLocked
                | Failure::Projection { .. }
                | Failure::Batch(_),
            ) => {
                self.outage.back(&self.thread, &mut self.attempts);
                Ok(())
            }
            Err(Failure::Standby(peek)) => {
                self.outage.back(&self.thread, &mut self.attempts);
                self.follow(peek, summary);
                Ok(())
            }
            Err(Failure::Connection(error)) => {
                self.let_go(slot);
                let delay = self.settings.liveness_interval;
                self.outage.lost(
                    &self.thread,
                    &mut self.attempts,
                    error,
                    delay,
                    &self.settings,
                )
            }
            Err(Failure::Fatal(error)) => Err(error),
        }
    }

    /// Makes sure this worker may apply: its connection holds the partition's session lock,
    /// and no live process of another layout holds a partition of the projection.
    pub(crate) fn own(&mut self, connection: &mut Connection) -> Result<(), Failure> {
        if connection.holds && connection.clear {
            return Ok(());
        }
        let (partition, total) = (self.context.partition, self.context.total_partitions);
        if !connection.holds {
            if self.sitting_out() {
                // Sharing partitions: another process is to take it; the worker sits out at
                // its next turn.
                return Err(Failure::Waiting);
            }
            let held = connection
                .statements
                .try_hold(&mut connection.client)
                .map_err(|e| self.failure(e))?;
            if !held {
                let peek = connection
                    .statements
                    .peek(&mut connection.client)
                    .map_err(|e| self.failure(e))?;
                let Some(peek) = peek else {
                    return Err(Failure::Fatal(
                        connection.statements.fenced(&mut connection.client),
                    ));
                };
                if self.role != Role::Standby {
                    self.say_standing_by(connection, peek)?;
                    self.role = Role::Standby;
                    self.progress.set_state(LaneState::Standby);
                }
                return Err(Failure::Standby(peek));
            }
            connection.holds = true;
            connection.clear = false;
            self.progress.holds.store(true, Ordering::Release);
            if self.role == Role::Standby {
                info!(
                    "partition {partition}/{total} of '{}': the process holding it is gone; \
                     taking it over",
                    self.projection.name()
                );
            }
        }
        let others = connection
            .statements
            .other_layouts_holders(&mut connection.client)
            .map_err(|e| self.failure(e))?;
        if !others.is_empty() {
            // Those holders may be the new layout waiting for this one: a worker whose own
            // layout was replaced must find out here, or both sides would wait for ever.
            let row = connection
                .statements
                .peek(&mut connection.client)
                .map_err(|e| self.failure(e))?;
            if row.is_none() {
                return Err(Failure::Fatal(
                    connection.statements.fenced(&mut connection.client),
                ));
            }
            if self.role != Role::Waiting {
                self.say_waiting(connection, &others)?;
                self.role = Role::Waiting;
                self.progress.set_state(LaneState::Waiting);
            }
            return Err(Failure::Waiting);
        }
        connection.clear = true;
        if self.role == Role::Waiting {
            info!(
                "partition {partition}/{total} of '{}': no process of another layout is left; \
                 applying",
                self.projection.name()
            );
        }
        if self.role != Role::Owner {
            // What this worker passed over before it owned the partition was not applied here.
            let checkpoint = self.progress.checkpoint.load(Ordering::Relaxed);
            self.progress.through.store(checkpoint, Ordering::Relaxed);
        }
        self.role = Role::Owner;
        self.progress.set_state(LaneState::Owned);
        Ok(())
    }

    /// Says that this worker stands by while another session holds its partition's lock: a
    /// live process of the projection, or a stranger, named as such.
    fn say_standing_by(&self, connection: &mut Connection, peek: Peek) -> Result<(), Failure> {
        let (partition, total) = (self.context.partition, self.context.total_partitions);
        let name = self.projection.name();
        let stranger = match peek.holder {
            Some(pid) => connection
                .statements
                .stranger(&mut connection.client, pid)
                .map_err(|e| self.failure(e))?,
            None => None,
        };
        match stranger {
            Some(stranger) => warn!(
                "partition {partition}/{total} of '{name}' is held by {stranger}, which is not a \
                 projector of '{name}': {NOT_A_PROJECTOR}; this partition stands by until that \
                 session lets the lock go"
            ),
            None => info!(
                "partition {partition}/{total} of '{name}' is held by another live process \
                 (server pid {}, checkpoint {}): standing by, taking over if it stops",
                peek.holder.map_or("?".into(), |pid| pid.to_string()),
                peek.position
            ),
        }
        Ok(())
    }

    /// Says that this worker waits for the holders of another layout's partitions, naming
    /// apart those that are not projectors of the projection.
    fn say_waiting(&self, connection: &mut Connection, others: &[Holder]) -> Result<(), Failure> {
        let (partition, total) = (self.context.partition, self.context.total_partitions);
        let name = self.projection.name();
        let strangers =
            strangers_among(&mut *connection.client, name, others).map_err(|e| self.failure(e))?;
        for stranger in &strangers {
            let (key, of) = (stranger.holder.key, stranger.holder.total);
            warn!(
                "partition {partition}/{total} of '{name}' waits for partition {key}/{of} to be \
                 let go, whose lock is held by {stranger}, which is not a projector of \
                 '{name}': {NOT_A_PROJECTOR}"
            );
        }
        let held: Vec<String> = others
            .iter()
            .filter(|h| !strangers.iter().any(|s| s.holder == **h))
            .map(|h| format!("{}/{} by server pid {}", h.key, h.total, h.pid))
            .collect();
        if !held.is_empty() {
            warn!(
                "partition {partition}/{total} of '{name}' waits for live processes of another \
                 layout to stop (partition {} held); they are fenced and stop at their next \
                 transaction or check, within about {} s; stop them if they do not",
                held.join(", "),
                self.settings.liveness_interval.as_secs().max(1)
            );
        }
        Ok(())
    }

    /// As a standby, shows the holder's checkpoint as this partition's.
    pub(crate) fn follow(&self, peek: Peek, summary: &mut PartitionSummary) {
        summary.checkpoint = summary.checkpoint.max(peek.position);
        self.progress
            .checkpoint
            .store(summary.checkpoint, Ordering::Relaxed);
    }
}
