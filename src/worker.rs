//! A worker: applies one partition's events and commits them with the checkpoint.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, warn};

use crate::checkpoint::CheckpointStatements;
use crate::database::Pool;
use crate::error::{BoxError, is_connection_loss};
use crate::event::Event;
use crate::projection::{Context, Projection};
use crate::runner::Settings;
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
    /// Events passed over because the checkpoint was already past them (applied before, or by
    /// another process on the same partition).
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
    pub(crate) faults: Sender<u32>,
    pub(crate) progress: Arc<Progress>,
}

/// A pooled connection with the checkpoint statements prepared on it.
struct Connection {
    client: r2d2::PooledConnection<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>>,
    statements: CheckpointStatements,
}

/// Why a transaction did not commit.
enum Failure {
    /// The connection is gone: retry on a new one, for as long as it takes. Holds what to log.
    Connection(String),
    /// The projection failed on `events[index]`.
    Projection { index: usize, source: BoxError },
    /// The projection's batch handler failed (which event is not known yet).
    Batch(BoxError),
    /// Anything else the database refused.
    Fatal(Error),
}

impl<P: Projection> Worker<P> {
    pub(crate) fn run(mut self) -> Result<PartitionSummary, Error> {
        let result = self.run_until_stopped();
        if let Err(error) = &result {
            if !error.is_connection_loss() {
                let _ = self.faults.send(self.context.partition);
            }
        }
        result
    }

    fn run_until_stopped(&mut self) -> Result<PartitionSummary, Error> {
        let mut summary = PartitionSummary {
            partition: self.context.partition,
            applied: 0,
            skipped: 0,
            checkpoint: self.progress.checkpoint.load(Ordering::Relaxed),
        };
        let mut connection = None;
        // A position the checkpoint may move to with no event to apply, written lazily.
        let mut idle_upto: Option<i64> = None;
        let mut last_write = Instant::now();
        loop {
            let batch = select! {
                recv(self.stop) -> _ => break,
                recv(self.batches) -> batch => match batch {
                    Ok(batch) => batch,
                    Err(_) => break,
                },
            };
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
                    }
                    Err(_) => break,
                }
            }
            self.commit_with_retries(&mut connection, &events, upto, &mut summary)?;
            last_write = Instant::now();
        }
        if let Some(upto) = idle_upto {
            // One attempt: a stop must not wait on a lost connection, and nothing is lost if
            // this fails (the range is read again after a restart).
            let _ = self.commit(&mut connection, &[], upto, true, &mut summary);
        }
        Ok(summary)
    }

    /// Commits `events` (those above the checkpoint) and the checkpoint `upto`, retrying lost
    /// connections without end and projection failures a few times.
    fn commit_with_retries(
        &mut self,
        connection: &mut Option<Connection>,
        events: &[Event],
        upto: i64,
        summary: &mut PartitionSummary,
    ) -> Result<(), Error> {
        let mut failures = 0;
        let mut lost = 0;
        // The whole batch at once first; after a failure, event by event, to find the event.
        let mut whole = true;
        loop {
            match self.commit(connection, events, upto, whole, summary) {
                Ok(()) => return Ok(()),
                Err(Failure::Connection(message)) => {
                    *connection = None;
                    lost += 1;
                    let delay = backoff(
                        lost,
                        self.settings.retry_delay,
                        self.settings.max_retry_delay,
                    );
                    warn!(
                        "partition {}/{}: {message}; retrying in {} ms",
                        self.context.partition,
                        self.context.total_partitions,
                        delay.as_millis()
                    );
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

    /// One transaction: lock the checkpoint, apply the events above it, move it to `upto`.
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
        let name = self.projection.name().to_owned();
        let (partition, total) = (self.context.partition, self.context.total_partitions);
        let lost = |source: postgres::Error| {
            let error = Error::Database {
                action: format!("committing partition {partition}/{total} of '{name}'"),
                source,
            };
            if error.is_connection_loss() {
                Failure::Connection(crate::error_chain(&error))
            } else {
                Failure::Fatal(error)
            }
        };
        let mut tx = connection.client.transaction().map_err(lost)?;
        let checkpoint = connection
            .statements
            .lock(&mut tx, &name, total, partition)
            .map_err(lost)?
            .ok_or_else(|| {
                Failure::Fatal(Error::invalid_setting(
                    "--projection",
                    &name,
                    format!(
                        "the checkpoint of partition {partition}/{total} is gone (was the \
                         projection reset while running?): restart the projector"
                    ),
                ))
            })?;
        // Events are in position order: those at or below the checkpoint come first.
        let skipped = events.partition_point(|e| e.global_position <= checkpoint);
        let pending = &events[skipped..];
        if let Err((index, source)) = self.apply(&mut tx, pending, whole) {
            drop(tx);
            let connection_gone = connection.client.is_closed()
                || source
                    .downcast_ref::<postgres::Error>()
                    .is_some_and(is_connection_loss);
            return Err(if connection_gone {
                Failure::Connection(format!(
                    "lost the database connection while applying partition {partition}/{total} \
                     of '{name}': {source}"
                ))
            } else {
                match index {
                    Some(index) => Failure::Projection {
                        index: skipped + index,
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
                .save(&mut tx, &name, total, partition, new_checkpoint)
                .map_err(lost)?;
        }
        tx.commit().map_err(lost)?;
        summary.applied += applied;
        summary.skipped += skipped;
        summary.checkpoint = new_checkpoint;
        self.progress.applied.fetch_add(applied, Ordering::Relaxed);
        self.progress
            .checkpoint
            .store(new_checkpoint, Ordering::Relaxed);
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
                    Ok(())
                }
                Ok(Err(source)) => Err((None, source)),
                Err(panic) => Err((None, panic_message(panic).into())),
            };
        }
        for (index, event) in events.iter().enumerate() {
            match catch_unwind(AssertUnwindSafe(|| projection.apply(tx, event, context))) {
                Ok(Ok(())) => debug!(
                    "partition {}/{}: applied {} at {} ({})",
                    context.partition,
                    context.total_partitions,
                    event.event_type,
                    event.global_position,
                    event.aggregate_id
                ),
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
            .map_err(|e| Failure::Connection(crate::error_chain(&Error::from(e))))?;
        let statements = CheckpointStatements::prepare(&mut client).map_err(|error| {
            if error.is_connection_loss() {
                Failure::Connection(crate::error_chain(&error))
            } else {
                Failure::Fatal(error)
            }
        })?;
        Ok(Connection { client, statements })
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic payload".to_owned());
    format!("panicked: {message}")
}
