//! A worker: applies one partition's events and commits them with the checkpoint.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};
use log::{debug, info, trace, warn};

use crate::checkpoint::{EarlierLayout, PartitionStatements, Peek};
use crate::database::Pool;
use crate::error::{BoxError, is_connection_loss};
use crate::event::Event;
use crate::outage::{Attempts, Outage};
use crate::projection::{Context, Projection};
use crate::settings::{Settings, Stopper};
use crate::straggler::{Stragglers, read_own_events};
use crate::{Error, backoff};

/// What the fetcher hands a worker: the partition's events from one read of the stream, and
/// the position up to which that read saw the whole stream.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The partition's events, in global position order.
    pub(crate) events: Vec<Event>,
    /// Every event of the partition at or below this position is in `events` or was sent before.
    pub(crate) upto: i64,
}

/// Figures a worker shares while it runs, for progress lines.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) applied: AtomicU64,
    pub(crate) checkpoint: AtomicI64,
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
}

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

/// A pooled connection with the partition's statements prepared on it.
struct Connection {
    client: r2d2::PooledConnection<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>>,
    statements: PartitionStatements,
    /// This connection holds the partition's session lock.
    holds: bool,
    /// Since taking the lock, no live process of another layout was seen holding a partition.
    clear: bool,
}

/// Why a transaction did not commit.
enum Failure {
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
}

impl<P: Projection> Worker<P> {
    pub(crate) fn run(mut self) -> Result<PartitionSummary, Error> {
        let mut connection = None;
        let result = self.run_until_stopped(&mut connection);
        // Give the partition back at once, rather than when the pool closes the connection.
        discard(&mut connection);
        if result.is_err() {
            // Lost connections are retried inside; whatever ends a worker ends the runner, at
            // once, so that the error is reported while the other threads stop.
            self.stopper.stop();
        }
        result
    }

    fn run_until_stopped(
        &mut self,
        connection: &mut Option<Connection>,
    ) -> Result<PartitionSummary, Error> {
        let mut summary = PartitionSummary {
            partition: self.context.partition,
            applied: 0,
            skipped: 0,
            checkpoint: self.progress.checkpoint.load(Ordering::Relaxed),
        };
        // A position the checkpoint may move to with no event to apply, written lazily.
        let mut idle_upto: Option<i64> = None;
        let mut last_write = Instant::now();
        // Everything of the partition up to here was received (or applied before).
        let mut received = summary.checkpoint;
        // Take the partition (or stand by for it) before the first batch arrives.
        self.keep_watch(connection, &mut summary)?;
        loop {
            let partition = self.context.partition;
            if self.stragglers.is_straggler(partition) && self.batches.is_empty() {
                if self.catch_up_alone(connection, &mut summary, &mut received)? {
                    break;
                }
                last_write = Instant::now();
            }
            let batch = select! {
                recv(self.stop) -> _ => break,
                recv(self.batches) -> batch => match batch {
                    Ok(batch) => batch,
                    Err(_) => {
                        // The fetcher is done: a straggler still reads up to where it stopped.
                        if self.stragglers.is_straggler(partition) {
                            self.catch_up_alone(connection, &mut summary, &mut received)?;
                        }
                        break;
                    }
                },
                default(self.settings.liveness_interval) => {
                    if let Some(upto) = idle_upto.take() {
                        // Nothing more came: write the deferred checkpoint now, so that status
                        // shows no lag that is not there. Like any commit, it checks the layout.
                        self.commit_with_retries(connection, &[], upto, &mut summary)?;
                        last_write = Instant::now();
                    } else {
                        self.keep_watch(connection, &mut summary)?;
                    }
                    continue;
                }
            };
            received = received.max(batch.upto);
            if batch.events.is_empty() {
                if batch.upto > summary.checkpoint {
                    idle_upto = Some(batch.upto);
                }
                if idle_upto.is_none()
                    || last_write.elapsed() < self.settings.idle_checkpoint_interval
                {
                    continue;
                }
            }
            // Batches queued behind this one go into the same transaction: one commit for
            // many reads while catching up, none added while live.
            let mut events = batch.events;
            let mut upto = idle_upto.take().map_or(batch.upto, |u| u.max(batch.upto));
            while events.len() < self.settings.max_events_per_transaction {
                match self.batches.try_recv() {
                    Ok(more) => {
                        events.extend(more.events);
                        upto = upto.max(more.upto);
                        received = received.max(more.upto);
                    }
                    Err(_) => break,
                }
            }
            self.commit_with_retries(connection, &events, upto, &mut summary)?;
            last_write = Instant::now();
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
    fn catch_up_alone(
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
            let Some(through) = self.stragglers.rejoin_or_read_to(partition, *received) else {
                info!(
                    "partition {partition}/{total} of '{}' caught up at global position \
                     {received}: back on the shared read",
                    self.projection.name()
                );
                return Ok(false);
            };
            let read = match slot {
                Some(connection) => read_own_events(
                    &mut connection.client,
                    partition,
                    total,
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
                        self.commit_with_retries(slot, &events, covered, summary)?;
                        *received = covered;
                    }
                }
                Err(Failure::Connection(error)) => {
                    discard(slot);
                    let delay = backoff(
                        self.attempts.failed + 1,
                        self.settings.retry_delay,
                        self.settings.max_retry_delay,
                    );
                    self.outage.lost(
                        &self.thread,
                        &mut self.attempts,
                        error,
                        delay,
                        &self.settings,
                    )?;
                    if self.sleep_or_stop(delay) {
                        return Ok(true);
                    }
                }
                Err(Failure::Fatal(error)) => return Err(error),
                Err(_) => {}
            }
        }
    }

    /// Between batches: takes the partition over once its holder is gone, and checks that
    /// this worker's layout still stands, so that a standby takes over and a fenced process
    /// stops even while no events arrive.
    fn keep_watch(
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
            Ok(()) | Err(Failure::Waiting | Failure::Projection { .. } | Failure::Batch(_)) => {
                self.outage.back(&self.thread, &mut self.attempts);
                Ok(())
            }
            Err(Failure::Standby(peek)) => {
                self.outage.back(&self.thread, &mut self.attempts);
                self.follow(peek, summary);
                Ok(())
            }
            Err(Failure::Connection(error)) => {
                discard(slot);
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
    fn own(&mut self, connection: &mut Connection) -> Result<(), Failure> {
        if connection.holds && connection.clear {
            return Ok(());
        }
        let (partition, total) = (self.context.partition, self.context.total_partitions);
        if !connection.holds {
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
                    info!(
                        "partition {partition}/{total} of '{}' is held by another live process \
                         (server pid {}, checkpoint {}): standing by, taking over if it stops",
                        self.projection.name(),
                        peek.holder.map_or("?".into(), |pid| pid.to_string()),
                        peek.position
                    );
                    self.role = Role::Standby;
                }
                return Err(Failure::Standby(peek));
            }
            connection.holds = true;
            connection.clear = false;
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
                let held: Vec<String> = others
                    .iter()
                    .map(|h| format!("{}/{} by server pid {}", h.key, h.total, h.pid))
                    .collect();
                warn!(
                    "partition {partition}/{total} of '{}' waits for live processes of another \
                     layout to stop (partition {} held); they are fenced and stop at their next \
                     transaction or check, within about {} s; stop them if they do not",
                    self.projection.name(),
                    held.join(", "),
                    self.settings.liveness_interval.as_secs().max(1)
                );
                self.role = Role::Waiting;
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
        self.role = Role::Owner;
        Ok(())
    }

    /// As a standby, shows the holder's checkpoint as this partition's.
    fn follow(&self, peek: Peek, summary: &mut PartitionSummary) {
        summary.checkpoint = summary.checkpoint.max(peek.position);
        self.progress
            .checkpoint
            .store(summary.checkpoint, Ordering::Relaxed);
    }

    /// A failed statement, as a lost connection (retried) or a fatal error.
    fn failure(&self, source: postgres::Error) -> Failure {
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

    /// Commits `events` (those above the checkpoint) and the checkpoint `upto`, retrying lost
    /// connections without end and projection failures a few times. As a standby, waits until
    /// the process holding the partition has applied the batch, or has gone.
    fn commit_with_retries(
        &mut self,
        connection: &mut Option<Connection>,
        events: &[Event],
        upto: i64,
        summary: &mut PartitionSummary,
    ) -> Result<(), Error> {
        let mut failures = 0;
        // The whole batch at once first; after a failure, event by event, to find the event.
        let mut whole = true;
        loop {
            match self.commit(connection, events, upto, whole, summary) {
                Ok(()) => {
                    self.outage.back(&self.thread, &mut self.attempts);
                    return Ok(());
                }
                Err(Failure::Standby(peek)) => {
                    self.follow(peek, summary);
                    // The holder applied everything up to its checkpoint: a batch behind it
                    // has nothing left for this process.
                    if events
                        .last()
                        .is_none_or(|e| e.global_position <= peek.position)
                    {
                        summary.skipped += events.len() as u64;
                        return Ok(());
                    }
                    if self.sleep_or_stop(self.settings.liveness_interval) {
                        return Ok(());
                    }
                }
                Err(Failure::Waiting) => {
                    if self.sleep_or_stop(self.settings.liveness_interval) {
                        return Ok(());
                    }
                }
                Err(Failure::Connection(error)) => {
                    discard(connection);
                    let delay = backoff(
                        self.attempts.failed + 1,
                        self.settings.retry_delay,
                        self.settings.max_retry_delay,
                    );
                    self.outage.lost(
                        &self.thread,
                        &mut self.attempts,
                        error,
                        delay,
                        &self.settings,
                    )?;
                    if self.sleep_or_stop(delay) {
                        return Ok(());
                    }
                }
                Err(Failure::Fatal(error)) => return Err(error),
                Err(Failure::Batch(source)) => {
                    debug!(
                        "projection '{}' failed on a batch of partition {}/{} ({source}); \
                         applying it event by event",
                        self.projection.name(),
                        self.context.partition,
                        self.context.total_partitions
                    );
                    whole = false;
                }
                Err(Failure::Projection { index, source }) => {
                    failures += 1;
                    let event = &events[index];
                    if failures >= self.settings.max_attempts {
                        // Keep what came before the failing event, and stop just before it.
                        let before = event.global_position - 1;
                        let _ = self.commit(connection, &events[..index], before, false, summary);
                        return Err(Error::Projection {
                            projection: self.projection.name().to_owned(),
                            partition: self.context.partition,
                            total: self.context.total_partitions,
                            position: event.global_position,
                            aggregate_id: event.aggregate_id.clone(),
                            event_type: event.event_type.clone(),
                            attempts: failures,
                            source,
                        });
                    }
                    let delay = backoff(
                        failures,
                        self.settings.retry_delay,
                        self.settings.max_retry_delay,
                    );
                    warn!(
                        "projection '{}' failed on partition {}/{} at global position {} ({}); \
                         attempt {failures} of {}, retrying in {} ms",
                        self.projection.name(),
                        self.context.partition,
                        self.context.total_partitions,
                        event.global_position,
                        source,
                        self.settings.max_attempts,
                        delay.as_millis()
                    );
                    if self.sleep_or_stop(delay) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Waits `delay`; true when asked to stop meanwhile.
    fn sleep_or_stop(&self, delay: Duration) -> bool {
        select! {
            recv(self.stop) -> _ => true,
            default(delay) => false,
        }
    }

    /// One transaction: lock the checkpoint, apply the events above it that no earlier layout
    /// applied, move it to `upto`.
    fn commit(
        &mut self,
        connection: &mut Option<Connection>,
        events: &[Event],
        upto: i64,
        whole: bool,
        summary: &mut PartitionSummary,
    ) -> Result<(), Failure> {
        let connection = match connection {
            Some(connection) => connection,
            None => connection.insert(self.connect()?),
        };
        self.own(connection)?;
        let name = self.projection.name().to_owned();
        let (partition, total) = (self.context.partition, self.context.total_partitions);
        let mut tx = connection
            .client
            .transaction()
            .map_err(|e| self.failure(e))?;
        let Some(checkpoint) = connection
            .statements
            .lock(&mut tx)
            .map_err(|e| self.failure(e))?
        else {
            drop(tx);
            return Err(Failure::Fatal(
                connection.statements.fenced(&mut connection.client),
            ));
        };
        // The events above the checkpoint that no earlier layout applied, by index in `events`.
        let pending_at: Vec<usize> = (0..events.len())
            .filter(|&index| {
                let event = &events[index];
                event.global_position > checkpoint
                    && !self
                        .earlier
                        .iter()
                        .any(|layout| layout.covers(event.global_position, &event.aggregate_id))
            })
            .collect();
        let skipped = events.len() - pending_at.len();
        let first = pending_at.first().copied().unwrap_or(events.len());
        let gathered: Vec<Event>;
        let pending: &[Event] = if pending_at.len() == events.len() - first {
            // The usual case: the pending events are the tail of the batch.
            &events[first..]
        } else {
            gathered = pending_at
                .iter()
                .map(|&index| events[index].clone())
                .collect();
            &gathered
        };
        if let Err((index, source)) = self.apply(&mut tx, pending, whole) {
            drop(tx);
            let connection_gone = connection.client.is_closed()
                || source
                    .downcast_ref::<postgres::Error>()
                    .is_some_and(is_connection_loss);
            return Err(if connection_gone {
                Failure::Connection(Error::ReadModel {
                    projection: name,
                    action: format!("applying partition {partition}/{total}"),
                    source,
                })
            } else {
                match index {
                    Some(index) => Failure::Projection {
                        index: pending_at[index],
                        source,
                    },
                    None => Failure::Batch(source),
                }
            });
        }
        let applied = pending.len() as u64;
        let skipped = skipped as u64;
        let new_checkpoint = checkpoint.max(upto);
        if new_checkpoint != checkpoint {
            connection
                .statements
                .save(&mut tx, new_checkpoint)
                .map_err(|e| self.failure(e))?;
        }
        tx.commit().map_err(|e| self.failure(e))?;
        summary.applied += applied;
        summary.skipped += skipped;
        summary.checkpoint = new_checkpoint;
        self.progress.applied.fetch_add(applied, Ordering::Relaxed);
        self.progress
            .checkpoint
            .store(new_checkpoint, Ordering::Relaxed);
        let earlier_end = self
            .earlier
            .iter()
            .map(EarlierLayout::applied_at_most)
            .max();
        if let Some(end) = earlier_end.filter(|&end| new_checkpoint >= end) {
            self.earlier.clear();
            info!(
                "partition {partition}/{total} of '{name}' passed global position {end}, the \
                 last applied under the earlier layout(s): its part of the re-partitioning is done"
            );
            // After this commit: the last partition to get here sees every other one past too.
            if let Err(error) = connection.statements.retire_earlier(&mut connection.client) {
                debug!("could not retire the earlier layouts yet: {error}");
            }
        }
        Ok(())
    }

    /// Applies `events` through the projection: all at once (`whole`), or one by one so that
    /// a failure names its event (the index into `events`).
    fn apply(
        &mut self,
        tx: &mut postgres::Transaction<'_>,
        events: &[Event],
        whole: bool,
    ) -> Result<(), (Option<usize>, BoxError)> {
        if events.is_empty() {
            return Ok(());
        }
        let projection = &mut self.projection;
        let context = &self.context;
        if whole {
            return match catch_unwind(AssertUnwindSafe(|| {
                projection.apply_batch(tx, events, context)
            })) {
                Ok(Ok(())) => {
                    debug!(
                        "partition {}/{}: applied {} events up to {}",
                        context.partition,
                        context.total_partitions,
                        events.len(),
                        events[events.len() - 1].global_position
                    );
                    if log::log_enabled!(log::Level::Trace) {
                        events
                            .iter()
                            .for_each(|event| trace_applied(event, context));
                    }
                    Ok(())
                }
                Ok(Err(source)) => Err((None, source)),
                Err(panic) => Err((None, panic_message(panic).into())),
            };
        }
        for (index, event) in events.iter().enumerate() {
            match catch_unwind(AssertUnwindSafe(|| projection.apply(tx, event, context))) {
                Ok(Ok(())) => trace_applied(event, context),
                Ok(Err(source)) => return Err((Some(index), source)),
                Err(panic) => return Err((Some(index), panic_message(panic).into())),
            }
        }
        Ok(())
    }

    fn connect(&self) -> Result<Connection, Failure> {
        let mut client = self
            .pool
            .get()
            .map_err(|e| Failure::Connection(Error::from(e)))?;
        let statements = PartitionStatements::prepare(
            &mut client,
            self.projection.name(),
            self.context.total_partitions,
            self.context.partition,
            self.generation,
        )
        .map_err(|error| {
            if error.is_connection_loss() {
                Failure::Connection(error)
            } else {
                Failure::Fatal(error)
            }
        })?;
        Ok(Connection {
            client,
            statements,
            holds: false,
            clear: false,
        })
    }
}

/// Drops a worker's connection, giving its partition's session lock back first: a connection
/// returned to the pool would otherwise keep holding it.
fn discard(slot: &mut Option<Connection>) {
    if let Some(mut connection) = slot.take() {
        if connection.holds && !connection.client.is_closed() {
            let _ = connection.statements.release(&mut connection.client);
        }
    }
}

/// One line per applied event, at trace level (`RUST_LOG=projector=trace`).
fn trace_applied(event: &Event, context: &Context) {
    trace!(
        "partition {}/{}: applied {} at {} ({})",
        context.partition,
        context.total_partitions,
        event.event_type,
        event.global_position,
        event.aggregate_id
    );
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic payload".to_owned());
    format!("panicked: {message}")
}
