//! A worker: applies one partition's events and commits them with the checkpoint.

pub(crate) mod commit;
pub(crate) mod ownership;
pub(crate) mod parking;
pub(crate) mod pause;
pub(crate) mod retry;
pub(crate) mod sharing;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};
use log::info;

use crate::Error;
use crate::engine::lane::{LaneState, Progress};
use crate::engine::outage::{Attempts, Outage};
use crate::engine::settings::{Settings, Stopper};
use crate::engine::straggler::{OwnEvents, Rejoin, Stragglers, read_own_events};
use crate::engine::worker::ownership::Role;
use crate::engine::worker::parking::Parking;
use crate::engine::worker::pause::PauseWatch;
use crate::engine::worker::retry::Held;
use crate::error::BoxError;
use crate::event::{Event, Scope};
use crate::layout::EarlierLayout;
use crate::layout::checkpoint::{PartitionStatements, Peek};
use crate::projections::projection::{Context, Projection};
use crate::store::database::Pool;

/// How long a straggler that has caught up waits between looks whether it may rejoin (the
/// fetcher reads for it within about one read).
const WAIT_FOR_READ: Duration = Duration::from_millis(5);

/// What the fetcher hands a worker: the partition's events from one read of the stream, and
/// the position up to which that read saw the whole stream.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The partition's events, in global position order; shared with the workers of the other
    /// projections that take the same events.
    pub(crate) events: Arc<Vec<Event>>,
    /// Every event of the partition at or below this position is in `events` or was sent before.
    pub(crate) upto: i64,
}

/// What one partition's worker did, as [`Runner::join`](crate::Runner::join) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionSummary {
    /// The partition key.
    pub partition: u32,
    /// Events applied by this process.
    pub applied: u64,
    /// Events passed over as already applied: before (the checkpoint was past them), by the
    /// live process holding the partition while this one stood by, or under an earlier layout.
    /// A commit that went through while its acknowledgement was lost with the connection is
    /// found applied when retried, so its events count here rather than in `applied`.
    pub skipped: u64,
    /// Events this process parked in `projection_dead_letters` (with the park policy) instead
    /// of applying them: the poison events and those behind them.
    pub parked: u64,
    /// The checkpoint when the worker stopped.
    pub checkpoint: i64,
}

pub(crate) struct Worker<P> {
    pub(crate) projection: P,
    pub(crate) context: Context,
    pub(crate) settings: Arc<Settings>,
    pub(crate) pool: Pool,
    pub(crate) batches: Receiver<Batch>,
    pub(crate) stop: Receiver<()>,
    /// Stops every thread of the runner when this worker fails.
    pub(crate) stopper: Stopper,
    pub(crate) progress: Arc<Progress>,
    /// The generation of the checkpoint rows of the layout this worker started under.
    pub(crate) generation: i64,
    /// Earlier layouts whose applied events this partition still skips; emptied once passed.
    pub(crate) earlier: Vec<EarlierLayout>,
    /// Whether this worker applies its partition's events, as last seen (changes are logged).
    pub(crate) role: Role,
    /// Shared with the fetcher and the other workers: an outage is logged once.
    pub(crate) outage: Arc<Outage>,
    /// This worker's failed attempts to reach the database, in a row.
    pub(crate) attempts: Attempts,
    /// How this worker is named in the logs.
    pub(crate) thread: String,
    /// Shared with the router: whether this partition reads its own events for now.
    pub(crate) stragglers: Arc<Stragglers>,
    /// This worker's queue among the router's lanes.
    pub(crate) lane: usize,
    /// The events the projection wants.
    pub(crate) scope: Scope,
    /// What this worker parks ([`crate::dead_letters()`]), and whether a poison event is parked
    /// (else the projection stops on it).
    pub(crate) parking: Parking,
    /// Batches taken off the queue while waiting to retry an event: applied before the queue.
    pub(crate) held: Held,
    /// Attempts in a row that found the checkpoint row held by another session.
    pub(crate) checkpoint_lock_failures: u32,
    /// Whether the projection is paused (`projector pause`), shared by its workers.
    pub(crate) pause: Arc<PauseWatch>,
    /// Sharing partitions: this worker dropped a batch because its partition goes to another
    /// process, so it must sit out before it applies anything again (see `sharing`).
    pub(crate) must_sit_out: bool,
}

/// A pooled connection with the partition's statements prepared on it.
pub(crate) struct Connection {
    pub(crate) client:
        r2d2::PooledConnection<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>>,
    pub(crate) statements: PartitionStatements,
    /// The projection's parked aggregates (see `parking`), read by every transaction that
    /// applies events.
    pub(crate) parked_lookup: postgres::Statement,
    /// This connection holds the partition's session lock.
    pub(crate) holds: bool,
    /// Since taking the lock, no live process of another layout was seen holding a partition.
    pub(crate) clear: bool,
}

/// Why a transaction did not commit.
pub(crate) enum Failure {
    /// The connection is gone: retry on a new one, until the give-up limit.
    Connection(Error),
    /// The projection failed on `events[index]`.
    Projection { index: usize, source: BoxError },
    /// The projection's batch handler failed (which event is not known yet).
    Batch(BoxError),
    /// Anything else the database refused, or this worker's layout was replaced.
    Fatal(Error),
    /// Another live process holds the partition; this is what it has committed.
    Standby(Peek),
    /// Live processes of another layout still hold partitions of the projection.
    Waiting,
    /// Another session holds the partition's checkpoint row: try again unless asked to stop.
    CheckpointLocked,
}

impl<P: Projection> Worker<P> {
    pub(crate) fn run(mut self) -> Result<PartitionSummary, Error> {
        let mut connection = None;
        let result = self.run_until_stopped(&mut connection);
        // Give the partition back at once, rather than when the pool closes the connection.
        self.let_go(&mut connection);
        // The router finds the lane gone at its next hand-out, even when it had stepped aside.
        self.batches = crossbeam_channel::never();
        self.stragglers.gone(self.lane);
        self.drop_held();
        self.progress.set_state(match &result {
            Ok(_) => LaneState::Stopped,
            Err(Error::Fenced { .. } | Error::VersionRetired { .. }) => LaneState::Fenced,
            Err(_) => LaneState::Failed,
        });
        if result.is_err() {
            // Lost connections are retried inside; whatever ends a worker ends the runner, at
            // once, so that the error is reported while the other threads stop.
            self.stopper.stop();
        }
        result
    }

    pub(crate) fn run_until_stopped(
        &mut self,
        connection: &mut Option<Connection>,
    ) -> Result<PartitionSummary, Error> {
        let mut summary = PartitionSummary {
            partition: self.context.partition,
            applied: 0,
            skipped: 0,
            parked: 0,
            checkpoint: self.progress.checkpoint.load(Ordering::Relaxed),
        };
        // A position the checkpoint may move to with no event to apply, written lazily.
        let mut idle_upto: Option<i64> = None;
        let mut last_write = Instant::now();
        // When this worker last talked to the server (a commit or a liveness check).
        let mut last_contact = Instant::now();
        // Everything of the partition up to here was received (or applied before).
        let mut received = summary.checkpoint;
        // Take the partition (or stand by for it) before the first batch arrives.
        self.keep_watch(connection, &mut summary)?;
        // A batch taken off the queue but not merged into the transaction before it.
        let mut carried: Option<Batch> = None;
        loop {
            if self.sitting_out() {
                // Sharing partitions: this one goes to another process (for now).
                idle_upto = None;
                carried = None;
                match self.sit_out(connection, &mut summary)? {
                    Some(checkpoint) => received = checkpoint,
                    None => return Ok(summary),
                }
                last_write = Instant::now();
                last_contact = last_write;
            }
            if carried.is_none()
                && self.held.is_empty()
                && self.stragglers.is_straggler(self.lane)
                && !self.stragglers.is_fed(self.lane)
                && self.batches.is_empty()
            {
                if self.catch_up_alone(connection, &mut summary, &mut received)? {
                    return Ok(summary);
                }
                last_write = Instant::now();
            }
            let batch = if let Some(batch) = carried.take().or_else(|| self.take_held()) {
                // Taken off the queue earlier: a stop asked for since comes first.
                if self.sleep_or_stop(Duration::ZERO) {
                    break;
                }
                batch
            } else {
                select! {
                recv(self.stop) -> _ => break,
                recv(self.batches) -> batch => match batch {
                    Ok(batch) => batch,
                    Err(_) => {
                        // The fetcher is done: a straggler still reads up to where it stopped.
                        if self.stragglers.is_straggler(self.lane)
                            && self.catch_up_alone(connection, &mut summary, &mut received)?
                        {
                            return Ok(summary);
                        }
                        break;
                    }
                },
                default(self.settings.liveness_interval) => {
                    if let Some(upto) = idle_upto.take() {
                        // Nothing more came: write the deferred checkpoint now, so that status
                        // shows no lag that is not there. Like any commit, it checks the layout.
                        if !self.commit_with_retries(connection, &[], upto, &mut summary)? {
                            return Ok(summary);
                        }
                        last_write = Instant::now();
                    } else {
                        self.keep_watch(connection, &mut summary)?;
                    }
                    last_contact = Instant::now();
                    continue;
                }
                }
            };
            received = received.max(batch.upto);
            if batch.events.is_empty() {
                // Everything before this batch was applied (batches come in order): nothing
                // of the partition is left to apply up to its position.
                if self.role == Role::Owner {
                    self.progress
                        .through
                        .fetch_max(batch.upto, Ordering::Relaxed);
                }
                if batch.upto > summary.checkpoint {
                    idle_upto = Some(batch.upto);
                }
                if idle_upto.is_none()
                    || last_write.elapsed() < self.settings.idle_checkpoint_interval
                {
                    // Empty batches can come faster than the liveness tick for a long time
                    // (another partition catching up): still talk to the server every tick,
                    // or it would end this idle session (the session timeout).
                    if last_contact.elapsed() >= self.settings.liveness_interval {
                        self.keep_watch(connection, &mut summary)?;
                        last_contact = Instant::now();
                    }
                    continue;
                }
            }
            // Batches queued behind this one go into the same transaction: one commit for
            // many reads while catching up, none added while live. Only batches this worker
            // holds alone are merged: events shared with other projections' workers are
            // applied as they come rather than copied.
            let mut events = batch.events;
            let mut upto = idle_upto.take().map_or(batch.upto, |u| u.max(batch.upto));
            while events.len() < self.events_per_transaction() {
                let Some(more) = self.next_batch_now() else {
                    break;
                };
                let more_events = match Arc::get_mut(&mut events) {
                    Some(mine) => match Arc::try_unwrap(more.events) {
                        Ok(theirs) => {
                            mine.extend(theirs);
                            upto = upto.max(more.upto);
                            received = received.max(more.upto);
                            continue;
                        }
                        Err(shared) => shared,
                    },
                    None => more.events,
                };
                carried = Some(Batch {
                    events: more_events,
                    upto: more.upto,
                });
                break;
            }
            if !self.commit_with_retries(connection, &events, upto, &mut summary)? {
                return Ok(summary);
            }
            last_write = Instant::now();
            last_contact = last_write;
        }
        if let Some(upto) = idle_upto {
            // One attempt: a stop must not wait on a lost connection, and nothing is lost if
            // this fails (the range is read again after a restart).
            let _ = self.commit(connection, &[], upto, true, &mut summary);
        }
        Ok(summary)
    }

    /// As a straggler: reads the partition's own events after `received`, in bounded batches,
    /// and applies them, until it has reached the position the router has handed out, then
    /// rejoins the shared read. True when asked to stop meanwhile.
    pub(crate) fn catch_up_alone(
        &mut self,
        slot: &mut Option<Connection>,
        summary: &mut PartitionSummary,
        received: &mut i64,
    ) -> Result<bool, Error> {
        let (partition, total) = (self.context.partition, self.context.total_partitions);
        info!(
            "partition {partition}/{total} of '{}': reading its own events after global \
             position {received} until it catches up",
            self.projection.name()
        );
        let limit = i64::from(self.settings.batch_size);
        loop {
            if self.sleep_or_stop(Duration::ZERO) {
                return Ok(true);
            }
            if self.sitting_out() {
                // Sharing partitions: the partition goes to another process; the loop sits out.
                return Ok(false);
            }
            let through = match self.stragglers.rejoin_or_read_to(self.lane, *received) {
                Rejoin::ReadTo(through) => through,
                Rejoin::WaitForRead => {
                    if self.sleep_or_stop(WAIT_FOR_READ) {
                        return Ok(true);
                    }
                    continue;
                }
                Rejoin::Rejoined => {
                    info!(
                        "partition {partition}/{total} of '{}' caught up at global position \
                         {received}: back on the shared read",
                        self.projection.name()
                    );
                    return Ok(false);
                }
            };
            let read = match slot {
                Some(connection) => read_own_events(
                    &mut connection.client,
                    OwnEvents {
                        partition,
                        total,
                        scope: &self.scope,
                    },
                    *received,
                    through,
                    limit,
                )
                .map_err(|e| self.failure(e)),
                None => self.connect().map(|connection| {
                    *slot = Some(connection);
                    (Vec::new(), *received)
                }),
            };
            match read {
                Ok((events, covered)) => {
                    if covered > *received {
                        if !self.commit_with_retries(slot, &events, covered, summary)? {
                            return Ok(true);
                        }
                        if self.must_sit_out {
                            // The partition went to another process: back to the loop, which
                            // sits out.
                            return Ok(false);
                        }
                        *received = covered;
                    }
                }
                Err(Failure::Connection(error)) => {
                    if self.wait_after_losing(slot, error)? {
                        return Ok(true);
                    }
                }
                Err(Failure::Fatal(error)) => return Err(error),
                Err(_) => {}
            }
        }
    }

    /// The most events one transaction applies while catching up.
    pub(crate) fn events_per_transaction(&self) -> usize {
        self.projection
            .events_per_transaction()
            .unwrap_or(self.settings.max_events_per_transaction)
            .max(1)
    }

    /// A failed statement, as a lost connection (retried) or a fatal error.
    pub(crate) fn failure(&self, source: postgres::Error) -> Failure {
        let error = Error::Database {
            action: format!(
                "committing partition {}/{} of '{}'",
                self.context.partition,
                self.context.total_partitions,
                self.projection.name()
            ),
            source,
        };
        if error.is_connection_loss() {
            Failure::Connection(error)
        } else {
            Failure::Fatal(error)
        }
    }

    pub(crate) fn connect(&self) -> Result<Connection, Failure> {
        let mut client = self
            .pool
            .get()
            .map_err(|e| Failure::Connection(Error::from(e)))?;
        let failure = |error: Error| {
            if error.is_connection_loss() {
                Failure::Connection(error)
            } else {
                Failure::Fatal(error)
            }
        };
        let statements = PartitionStatements::prepare(
            &mut client,
            self.projection.name(),
            self.context.total_partitions,
            self.context.partition,
            self.generation,
        )
        .map_err(failure)?;
        let parked_lookup = parking::prepare_parked_lookup(&mut client).map_err(failure)?;
        Ok(Connection {
            client,
            statements,
            parked_lookup,
            holds: false,
            clear: false,
        })
    }
}

/// Drops a worker's connection, giving its partition's session lock back first: a connection
/// returned to the pool would otherwise keep holding it.
pub(crate) fn discard(slot: &mut Option<Connection>) {
    if let Some(mut connection) = slot.take() {
        if connection.holds && !connection.client.is_closed() {
            let _ = connection.statements.release(&mut connection.client);
        }
    }
}
