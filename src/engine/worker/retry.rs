//! A worker's retries: a lost connection is ridden out with back-off, a projection that fails
//! on an event is tried again a few times, and meanwhile the partition's batches are held (or
//! it leaves the shared read) so that the other partitions do not wait behind it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::select;
use log::{debug, error, info, warn};

use crate::engine::worker::{Batch, Connection, Failure, PartitionSummary, Worker};
use crate::error::BoxError;
use crate::event::Event;
use crate::projections::projection::Projection;
use crate::{Error, backoff, error_chain};

impl<P: Projection> Worker<P> {
    /// Commits `events` (those above the checkpoint) and the checkpoint `upto`, retrying lost
    /// connections (up to the give-up limit) and projection failures a few times. As a standby,
    /// waits until the process holding the partition has applied the batch, or has gone.
    /// While the projection is paused, holds the partition first, applying nothing (see
    /// [`crate::engine::worker::pause`]).
    /// False when asked to stop before the batch was done: the caller must then stop at once,
    /// committing nothing more (a later checkpoint would pass the events of this batch).
    pub(crate) fn commit_with_retries(
        &mut self,
        connection: &mut Option<Connection>,
        events: &[Event],
        upto: i64,
        summary: &mut PartitionSummary,
    ) -> Result<bool, Error> {
        if self.hold_while_paused(connection, summary)? {
            return Ok(false);
        }
        if self.must_sit_out {
            // Paused, and the partition went to another process meanwhile: the batch is that
            // process's to apply.
            return Ok(true);
        }
        let mut failed = FailedAttempts::default();
        // The whole batch at once first; after a failure, event by event, to find the event.
        let mut whole = true;
        loop {
            match self.commit(connection, events, upto, whole, summary) {
                Ok(()) => {
                    self.outage.back(&self.thread, &mut self.attempts);
                    return Ok(true);
                }
                Err(Failure::Standby(_) | Failure::Waiting) if self.sitting_out() => {
                    // Sharing partitions: the partition goes to another process, which applies
                    // these events; this worker sits out before it applies anything again.
                    self.must_sit_out = true;
                    return Ok(true);
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
                        return Ok(true);
                    }
                    if self.sleep_or_stop(self.settings.liveness_interval) {
                        return Ok(false);
                    }
                }
                Err(Failure::Waiting) => {
                    if self.sleep_or_stop(self.settings.liveness_interval) {
                        return Ok(false);
                    }
                }
                // The wait for the row was the pause: again at once, unless asked to stop.
                Err(Failure::CheckpointLocked) => {
                    if self.sleep_or_stop(Duration::ZERO) {
                        return Ok(false);
                    }
                }
                Err(Failure::Connection(error)) => {
                    self.progress.retries.fetch_add(1, Ordering::Relaxed);
                    if self.wait_after_losing(connection, error)? {
                        return Ok(false);
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
                    let event = &events[index];
                    let (failures, first_failed_at) = failed.count(event.global_position);
                    if failures >= self.settings.max_attempts {
                        let Some(error) = self.give_up_on(event, failures, first_failed_at, source)
                        else {
                            // Parked in the next attempt, with the later events of its aggregate.
                            continue;
                        };
                        self.progress.failures.fetch_add(1, Ordering::Relaxed);
                        // Keep what came before the failing event, and stop just before it.
                        let before = event.global_position - 1;
                        let _ = self.commit(connection, &events[..index], before, false, summary);
                        return Err(error);
                    }
                    self.progress.retries.fetch_add(1, Ordering::Relaxed);
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
                    if self.wait_holding_batches(delay) {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// After the last attempt at `event`: parks it at the next commit (`None`) with the park
    /// policy, unless the park storm breaker trips; else the error that stops the projection.
    fn give_up_on(
        &mut self,
        event: &Event,
        attempts: u32,
        first_failed_at: SystemTime,
        source: BoxError,
    ) -> Option<Error> {
        if !self.parking.parks_poison() {
            return Some(Error::Projection {
                projection: self.projection.name().to_owned(),
                partition: self.context.partition,
                total: self.context.total_partitions,
                position: event.global_position,
                aggregate_id: event.aggregate_id.clone(),
                event_type: event.event_type.clone(),
                attempts,
                source,
            });
        }
        match self.parking.admit_one_more() {
            Ok(()) => {
                self.parking
                    .poison(event, &source, attempts, first_failed_at);
                None
            }
            Err(limit) => Some(self.park_storm(event, limit, source)),
        }
    }

    /// The error that stops a projection whose park storm breaker tripped on `event`, after
    /// saying so loudly: `limit` aggregates were parked (or about to be) within the window.
    fn park_storm(&self, event: &Event, limit: u32, source: BoxError) -> Error {
        let window = self.settings.park_storm_window;
        error!(
            "park storm: projection '{}' parked {limit} aggregates within {} s (or is about to) \
             and fails for good on yet another one (global position {}, aggregate '{}': {}); \
             so many poison events at once point to a bug, not to bad events: the projection \
             stops here, as under the stop policy, instead of parking every aggregate",
            self.projection.name(),
            window.as_secs(),
            event.global_position,
            event.aggregate_id.escape_debug(),
            error_chain(source.as_ref())
        );
        Error::ParkStorm {
            projection: self.projection.name().to_owned(),
            limit,
            window,
            partition: self.context.partition,
            total: self.context.total_partitions,
            position: event.global_position,
            aggregate_id: event.aggregate_id.clone(),
            source,
        }
    }

    /// Waits `delay` before retrying an event, taking the batches that arrive meanwhile off
    /// the queue and holding them (in order, after any held before), so that the router does
    /// not wait for this partition and the others go on. Once the runner's partitions hold
    /// [`Settings::max_events_held_while_retrying`](crate::Settings) events together, the
    /// partition leaves the shared read instead (see [`Worker::step_aside`]). True when asked
    /// to stop meanwhile.
    fn wait_holding_batches(&mut self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // A ready batch would win over a zero timeout: it waits on the queue.
                return false;
            }
            if self.stragglers.held_events() >= self.settings.max_events_held_while_retrying {
                self.step_aside();
                return self.sleep_or_stop(left);
            }
            select! {
                recv(self.stop) -> _ => return true,
                recv(self.batches) -> batch => match batch {
                    Ok(batch) => {
                        self.stragglers.hold(batch.events.len());
                        self.held.push(batch);
                    }
                    // The fetcher is done: nothing more comes.
                    Err(_) => return self.sleep_or_stop(left),
                },
                default(left) => return false,
            }
        }
    }

    /// The first batch held while retrying, if any.
    pub(crate) fn take_held(&mut self) -> Option<Batch> {
        let batch = self.held.pop()?;
        self.stragglers.release(batch.events.len());
        Some(batch)
    }

    /// Gives the runner's hold budget back for the batches still held (a worker that stops).
    pub(crate) fn drop_held(&mut self) {
        while self.take_held().is_some() {}
    }

    /// The next batch to apply: one held while retrying, else one from the queue if there is
    /// one at once.
    pub(crate) fn next_batch_now(&mut self) -> Option<Batch> {
        self.take_held().or_else(|| self.batches.try_recv().ok())
    }

    /// Before waiting to retry an event, with too many batches held already: leaves the shared
    /// read, so that the other partitions do not wait behind this one's full queue; the
    /// partition reads what it missed itself afterwards, and rejoins (see
    /// [`crate::engine::straggler`]).
    fn step_aside(&self) {
        if self.stragglers.step_aside(self.lane) {
            info!(
                "partition {}/{} of '{}' leaves the shared read while it retries an event; the \
                 others go on, and it reads its own events afterwards until it catches up",
                self.context.partition,
                self.context.total_partitions,
                self.projection.name()
            );
        }
    }

    /// After losing the connection (`error`): drops it, reports the outage and waits before
    /// the next attempt, with back-off. True when asked to stop meanwhile; an error once it is
    /// time to give up.
    pub(crate) fn wait_after_losing(
        &mut self,
        connection: &mut Option<Connection>,
        error: Error,
    ) -> Result<bool, Error> {
        self.let_go(connection);
        let delay = self.outage.lost_with_backoff(
            &self.thread,
            &mut self.attempts,
            error,
            &self.settings,
        )?;
        Ok(self.sleep_or_stop(delay))
    }

    /// Waits `delay`; true when asked to stop meanwhile.
    pub(crate) fn sleep_or_stop(&self, delay: Duration) -> bool {
        select! {
            recv(self.stop) -> _ => true,
            default(delay) => false,
        }
    }
}

/// The failed attempts at the events of one batch, counted per event: a transient failure of
/// one event (a deadlock, a serialization failure) spends none of another event's attempts.
#[derive(Debug, Default)]
struct FailedAttempts {
    /// Per global position: the failed attempts so far, and when the first one failed.
    events: HashMap<i64, (u32, SystemTime)>,
}

impl FailedAttempts {
    /// Counts one more failed attempt at the event at `position`: its failed attempts so far,
    /// and when the first one failed.
    fn count(&mut self, position: i64) -> (u32, SystemTime) {
        let (failures, first) = self
            .events
            .entry(position)
            .or_insert_with(|| (0, SystemTime::now()));
        *failures += 1;
        (*failures, *first)
    }
}

/// Batches a worker took off its queue while it waited to retry an event, in order.
#[derive(Debug, Default)]
pub(crate) struct Held {
    batches: VecDeque<Batch>,
}

impl Held {
    /// Holds `batch` after the others; an empty one only moves the last one's `upto` on (the
    /// router sends every lane one per read, events or not).
    fn push(&mut self, batch: Batch) {
        if batch.events.is_empty() {
            if let Some(last) = self.batches.back_mut() {
                last.upto = last.upto.max(batch.upto);
                return;
            }
        }
        self.batches.push_back(batch);
    }

    fn pop(&mut self) -> Option<Batch> {
        self.batches.pop_front()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}
