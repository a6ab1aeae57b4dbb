//! One worker transaction: lock the partition's checkpoint, apply the events above it through
//! the projection, and move the checkpoint, in one commit.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::time::Instant;

use log::{debug, info, trace};
use postgres::error::SqlState;

use crate::Error;
use crate::engine::worker::{Connection, Failure, PartitionSummary, Worker};
use crate::error::{BoxError, is_connection_loss};
use crate::event::Event;
use crate::layout::EarlierLayout;
use crate::layout::checkpoint::PartitionStatements;
use crate::projections::projection::{Context, Projection, apply_each, panic_message};

impl<P: Projection> Worker<P> {
    /// One transaction: lock the checkpoint, apply the events above it that no earlier layout
    /// applied, move it to `upto`.
    pub(crate) fn commit(
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
        let started = Instant::now();
        let name = self.projection.name().to_owned();
        let (partition, total) = (self.context.partition, self.context.total_partitions);
        let mut tx = connection
            .client
            .transaction()
            .map_err(|e| self.failure(e))?;
        let Some(checkpoint) = self.lock_checkpoint(&connection.statements, &mut tx)? else {
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
        // The events of parked aggregates are recorded, not applied (whatever the policy).
        let pending = pending_at.len();
        let pending_at = self
            .set_parked_aside(&mut tx, &connection.parked_lookup, events, pending_at)
            .map_err(|e| self.failure(e))?;
        let parked = (pending - pending_at.len()) as u64;
        // Applied run by run (usually one: the tail of the batch), in order, without copying
        // the events around those left out (parked, or applied under an earlier layout).
        let mut failed = None;
        for run in runs(&pending_at) {
            if let Err((index, source)) = self.apply(&mut tx, &events[run.clone()], whole) {
                failed = Some((index.map(|index| run.start + index), source));
                break;
            }
        }
        if let Some((index, source)) = failed {
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
                    Some(index) => Failure::Projection { index, source },
                    None => Failure::Batch(source),
                }
            });
        }
        let applied = pending_at.len() as u64;
        let skipped = skipped as u64;
        let new_checkpoint = checkpoint.max(upto);
        if new_checkpoint != checkpoint {
            connection
                .statements
                .save(&mut tx, new_checkpoint)
                .map_err(|e| self.failure(e))?;
        }
        tx.commit().map_err(|e| self.failure(e))?;
        self.progress
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.parking_committed();
        summary.applied += applied;
        summary.skipped += skipped;
        summary.parked += parked;
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

    /// Locks the partition's checkpoint row in `tx` and returns its position (`None`: the row
    /// is gone). At once when no other session holds it; otherwise waits for it, a
    /// [`Settings::liveness_interval`](crate::Settings) at a time, and fails with
    /// [`Failure::CheckpointLocked`] after each wait, so that a stop asked for meanwhile is
    /// seen within about that long (a `dead-letters retry` of many aggregates may hold the row
    /// for long).
    fn lock_checkpoint(
        &mut self,
        statements: &PartitionStatements,
        tx: &mut postgres::Transaction<'_>,
    ) -> Result<Option<i64>, Failure> {
        let wait = self.settings.liveness_interval;
        let locked = if self.checkpoint_lock_failures == 0 {
            statements.lock(tx)
        } else {
            statements.lock_waiting(tx, wait)
        };
        match locked {
            Ok(checkpoint) => {
                self.checkpoint_lock_failures = 0;
                Ok(checkpoint)
            }
            Err(error) if error.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                self.checkpoint_lock_failures += 1;
                if self.checkpoint_lock_failures == 2 {
                    info!(
                        "partition {}/{} of '{}' waits for its checkpoint row, which another \
                         session holds (a `projector dead-letters retry` or `drop`, a \
                         `projector promote` holding the version it replaces, a \
                         re-partitioning, or a session that locked it by hand); it applies \
                         nothing meanwhile, and a stop is seen within {} ms",
                        self.context.partition,
                        self.context.total_partitions,
                        self.projection.name(),
                        wait.as_millis()
                    );
                }
                Err(Failure::CheckpointLocked)
            }
            Err(error) => Err(self.failure(error)),
        }
    }

    /// Applies `events` through the projection and sends the writes they queued: all at once
    /// (`whole`), or one by one so that a failure names its event (the index into `events`).
    pub(crate) fn apply(
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
            context.discard_queued();
            let applied = match catch_unwind(AssertUnwindSafe(|| {
                projection.apply_batch(tx, events, context)
            })) {
                // The writes the events queued go with them, before the checkpoint.
                Ok(Ok(())) => context.flush_queued(tx),
                Ok(Err(source)) => Err(source),
                Err(panic) => Err(panic_message(panic).into()),
            };
            return match applied {
                Ok(()) => {
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
                Err(source) => {
                    context.discard_queued();
                    Err((None, source))
                }
            };
        }
        apply_each(projection, tx, events, context, |event| {
            trace_applied(event, context)
        })
    }
}

/// The runs of consecutive indexes in `indexes` (ascending), as ranges.
fn runs(indexes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for &index in indexes {
        match runs.last_mut() {
            Some(run) if run.end == index => run.end += 1,
            _ => runs.push(index..index + 1),
        }
    }
    runs
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

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_of_consecutive_indexes() {
        assert_eq!(runs(&[]), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(runs(&[3, 4, 5]), vec![3..6]);
        assert_eq!(runs(&[0, 1, 3, 4, 7]), [0..2, 3..5, 7..8]);
    }
}
