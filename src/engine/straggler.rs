//! Partitions that fall behind: the router stops waiting for them, and each one reads its own
//! events from the store until it has caught up with the shared read.
//!
//! The router hands every owned partition its events over a bounded channel. When one worker
//! is much slower than the others (a projection that is slow on some aggregates), its channel
//! stays full; waiting for it would hold every other partition back to its pace. So when a
//! hand-out to a partition has waited [`Settings::straggler_after`](crate::Settings), the router
//! marks the partition a *straggler* and leaves it out of the shared read from then on. The
//! straggler's worker, once its queue is empty, reads its own events from the store, in
//! bounded batches, up to the position the router has handed out (the fetcher has seen the
//! stream complete up to there, so no gap can be passed), applies them as usual, and rejoins
//! the shared read when it has reached that position.
//!
//! A worker also steps aside by itself before it waits to retry an event that failed
//! ([`Stragglers::step_aside`]): the other partitions then go on at once instead of waiting for
//! the retries behind its full queue.
//!
//! Rejoining is exact: the router hands a chunk out and records its position under one lock,
//! and a straggler rejoins under the same lock only when it has everything up to the recorded
//! position, so every later chunk reaches it and no earlier one is missed. (An event handed
//! out twice would be harmless anyway: a worker applies only events above its checkpoint.)
//!
//! The fetcher reads whole rows only of the partitions of lanes on the shared read (see
//! `crate::engine::fetcher`), so a chunk read while a lane was a straggler lacks its events;
//! such a chunk may still be on its way to the router when the lane has caught up. So a
//! straggler that has caught up first *asks* to be read for ([`Rejoin::WaitForRead`]); the
//! fetcher's next read includes its partition and records where it began
//! ([`Stragglers::lanes_to_read`]); and the lane rejoins only once the router has handed out
//! the stream up to there, when every chunk still to come was read with its events. The
//! router steps aside, besides, any lane handed a chunk read without its events (it never
//! happens by the rule above; the check costs nothing).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use postgres::Client;

use crate::event::{Event, Scope};
use crate::lock;
use crate::partition::partition_of;
use crate::store::{EVENT_COLUMNS, event_from_row, scope_filter};

/// Which partitions are stragglers, and how far the router has handed the stream out.
#[derive(Debug)]
pub(crate) struct Stragglers {
    /// The position up to which the router has handed out the stream (every chunk up to here
    /// went to every partition that was not a straggler when it was handed out).
    handed_through: Mutex<i64>,
    /// The same position, readable without waiting for the router: a straggler reads up to it
    /// while the router is busy handing a chunk out.
    handed: AtomicI64,
    /// Per lane (a partition of a projection, by index): true while it is a straggler. Read
    /// without the lock by the router and by the lane's own worker.
    flags: Vec<AtomicBool>,
    /// Per lane: its worker has stopped (the router then finds its queue gone).
    gone: Vec<AtomicBool>,
    /// Events the runner's workers hold while they wait to retry (see `crate::engine::worker::retry`).
    held: AtomicUsize,
    /// Per lane, while it is a straggler: whether the fetcher reads its events (see the module).
    reads: Mutex<Vec<ReadFor>>,
    /// Some straggler asks to be read for: the fetcher reads at once rather than wait for an
    /// append.
    asked: AtomicBool,
    /// The router has handed out its last chunk (the runner is stopping, or has read all it
    /// was to read): a straggler that has everything up to `handed_through` is done.
    closed: AtomicBool,
    /// Per lane: a straggler fed by the read for the lanes that started behind (see
    /// `crate::engine::catch_up_read`): its worker waits for its queue instead of reading.
    fed: Vec<AtomicBool>,
}

/// Whether the fetcher reads a straggler's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadFor {
    /// Not while it is a straggler: it reads its own events.
    No,
    /// It has caught up and asks to be read for, from the fetcher's next read on.
    Asked,
    /// Every read of the fetcher that began at or after this position has its events.
    From(i64),
}

/// What a straggler that has everything up to some position does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejoin {
    /// It is back on the shared read.
    Rejoined,
    /// It reads its own events up to this position.
    ReadTo(i64),
    /// It has caught up, and waits until the chunks still to come have its events.
    WaitForRead,
}

impl Stragglers {
    /// The stream is handed out from `start`; the lanes for which `behind` is true start as
    /// stragglers (they are too far behind `start` to wait for the shared read).
    pub(crate) fn new(behind: &[bool], start: i64) -> Stragglers {
        Stragglers {
            handed_through: Mutex::new(start),
            handed: AtomicI64::new(start),
            flags: behind.iter().map(|&b| AtomicBool::new(b)).collect(),
            gone: behind.iter().map(|_| AtomicBool::new(false)).collect(),
            held: AtomicUsize::new(0),
            reads: Mutex::new(vec![ReadFor::No; behind.len()]),
            asked: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            fed: behind.iter().map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// `lane`, a straggler, is fed by the read for the lanes that started behind.
    pub(crate) fn start_feeding(&self, lane: usize) {
        if let Some(fed) = self.fed.get(lane) {
            fed.store(true, Ordering::Release);
        }
    }

    /// `lane` is fed no more: once its queue is empty, its worker reads by itself.
    pub(crate) fn stop_feeding(&self, lane: usize) {
        if let Some(fed) = self.fed.get(lane) {
            fed.store(false, Ordering::Release);
        }
    }

    /// True while `lane` is fed (its worker is not to read its own events).
    pub(crate) fn is_fed(&self, lane: usize) -> bool {
        self.fed
            .get(lane)
            .is_some_and(|fed| fed.load(Ordering::Acquire))
    }

    /// How far the router has handed the stream out (the stream is complete up to here).
    pub(crate) fn handed(&self) -> i64 {
        self.handed.load(Ordering::Acquire)
    }

    /// True while `lane` reads its own events.
    pub(crate) fn is_straggler(&self, lane: usize) -> bool {
        self.flags
            .get(lane)
            .is_some_and(|flag| flag.load(Ordering::Acquire))
    }

    /// For `lane`'s worker, about to wait (before retrying an event): leaves the shared read
    /// at once, so that the router does not wait for it. The batches already on its queue
    /// stay; once it has taken them, it reads the rest itself, as any straggler. Exact without
    /// the router's lock: a chunk the router hands out meanwhile either reaches the queue or
    /// is read by the worker later (or both: harmless, see the module).
    pub(crate) fn step_aside(&self, lane: usize) -> bool {
        let stepped = self
            .flags
            .get(lane)
            .is_some_and(|flag| !flag.swap(true, Ordering::AcqRel));
        self.stop_reading_for(lane);
        stepped
    }

    /// `lane` is a straggler again: the fetcher need not read its events.
    fn stop_reading_for(&self, lane: usize) {
        if let Some(read_for) = lock(&self.reads).get_mut(lane) {
            *read_for = ReadFor::No;
        }
    }

    /// For the fetcher, about to read after `position`: which lanes' events to read (those on
    /// the shared read, and stragglers that asked; not those whose worker has stopped), by
    /// lane. From this read on, the stragglers that asked are read for.
    pub(crate) fn lanes_to_read(&self, position: i64) -> Vec<bool> {
        let mut reads = lock(&self.reads);
        self.asked.store(false, Ordering::Relaxed);
        self.flags
            .iter()
            .zip(&self.gone)
            .zip(reads.iter_mut())
            .map(|((flag, gone), read_for)| {
                if *read_for == ReadFor::Asked {
                    *read_for = ReadFor::From(position);
                }
                let on_shared_read = !flag.load(Ordering::Acquire) || *read_for != ReadFor::No;
                on_shared_read && !gone.load(Ordering::Acquire)
            })
            .collect()
    }

    /// Some straggler waits for the fetcher's next read.
    pub(crate) fn read_asked(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }

    /// For `lane`'s worker, stopping, once it has dropped its queue: back among the lanes the
    /// router hands out to, so that the next hand-out finds the lane gone (the router stops
    /// the runner once every lane has gone).
    pub(crate) fn gone(&self, lane: usize) {
        if let (Some(gone), Some(flag)) = (self.gone.get(lane), self.flags.get(lane)) {
            // In this order: the router's `mark` looks at `gone` after setting the flag.
            gone.store(true, Ordering::SeqCst);
            flag.store(false, Ordering::SeqCst);
        }
    }

    /// Counts `events` more held by a worker waiting to retry.
    pub(crate) fn hold(&self, events: usize) {
        self.held.fetch_add(events, Ordering::Relaxed);
    }

    /// Counts `events` fewer held.
    pub(crate) fn release(&self, events: usize) {
        self.held.fetch_sub(events, Ordering::Relaxed);
    }

    /// Events the runner's workers hold while they wait to retry, together.
    pub(crate) fn held_events(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Waits until the router is between two hand-outs. A lane that has stepped aside and
    /// then waited for this gets no more batches: a hand-out that began before it stepped
    /// aside (and may still put a batch on its queue) has ended, and later ones leave it out.
    pub(crate) fn wait_between_hand_outs(&self) {
        drop(lock(&self.handed_through));
    }

    /// For the router, after its last hand-out: no chunk will come any more.
    pub(crate) fn close(&self) {
        let _between_hand_outs = lock(&self.handed_through);
        self.closed.store(true, Ordering::Release);
    }

    /// Taken by the router for the whole hand-out of one chunk.
    pub(crate) fn hand_out(&self) -> HandOut<'_> {
        HandOut {
            handed_through: lock(&self.handed_through),
            stragglers: self,
        }
    }

    /// For `lane`'s worker, a straggler which has everything up to `received`: whether it
    /// rejoins the shared read now, reads on by itself, or waits for the fetcher to read for it
    /// (see the module).
    pub(crate) fn rejoin_or_read_to(&self, lane: usize, received: i64) -> Rejoin {
        // Reading on needs no lock: only rejoining waits for the router to be between chunks.
        let handed = self.handed.load(Ordering::Acquire);
        if received < handed {
            return Rejoin::ReadTo(handed);
        }
        let handed_through = lock(&self.handed_through);
        if received < *handed_through {
            return Rejoin::ReadTo(*handed_through);
        }
        let mut reads = lock(&self.reads);
        let Some(read_for) = reads.get_mut(lane) else {
            return Rejoin::Rejoined;
        };
        // Once the router has closed no chunk will come: the lane has all there is.
        let closed = self.closed.load(Ordering::Acquire);
        let read_for_since_handed =
            matches!(*read_for, ReadFor::From(from) if from <= *handed_through);
        if closed || read_for_since_handed {
            *read_for = ReadFor::No;
            if let Some(flag) = self.flags.get(lane) {
                flag.store(false, Ordering::Release);
            }
            return Rejoin::Rejoined;
        }
        if *read_for == ReadFor::No {
            *read_for = ReadFor::Asked;
            self.asked.store(true, Ordering::Relaxed);
        }
        Rejoin::WaitForRead
    }
}

/// The router's hold on the stragglers while it hands one chunk out.
pub(crate) struct HandOut<'a> {
    handed_through: MutexGuard<'a, i64>,
    stragglers: &'a Stragglers,
}

impl HandOut<'_> {
    /// Leaves `lane` out of the shared read until its worker rejoins.
    pub(crate) fn mark(&mut self, lane: usize) {
        let stragglers = self.stragglers;
        if let (Some(flag), Some(gone)) = (stragglers.flags.get(lane), stragglers.gone.get(lane)) {
            flag.store(true, Ordering::SeqCst);
            stragglers.stop_reading_for(lane);
            // A worker that stopped meanwhile stays out of the stragglers: the next hand-out
            // finds its queue gone (otherwise the router would skip it for ever).
            if gone.load(Ordering::SeqCst) {
                flag.store(false, Ordering::SeqCst);
            }
        }
    }

    /// How far the stream was handed out before this hand-out.
    pub(crate) fn handed_through(&self) -> i64 {
        *self.handed_through
    }

    /// The chunk up to `upto` is handed out.
    pub(crate) fn done(mut self, upto: i64) {
        *self.handed_through = (*self.handed_through).max(upto);
        self.stragglers
            .handed
            .store(*self.handed_through, Ordering::Release);
    }
}

/// What a straggler reads: one partition of one projection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OwnEvents<'a> {
    pub(crate) partition: u32,
    pub(crate) total: u32,
    pub(crate) scope: &'a Scope,
}

/// A straggler's own read: the events of `own` in `(after, through]`, looking at `limit` events
/// of the stream (in its scope) at most, and the position the read covers.
///
/// With several partitions, positions and aggregate ids come first and whole rows only for
/// the partition's events, so that a straggler does not fetch every partition's payloads.
pub(crate) fn read_own_events(
    client: &mut Client,
    own: OwnEvents<'_>,
    after: i64,
    through: i64,
    limit: i64,
) -> Result<(Vec<Event>, i64), postgres::Error> {
    let filter = scope_filter(&[own.scope], 4);
    let in_scope = filter
        .as_ref()
        .map_or(String::new(), |f| format!(" AND {}", f.condition));
    let columns = if own.total == 1 {
        EVENT_COLUMNS
    } else {
        "global_position, aggregate_id"
    };
    let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![&after, &through, &limit];
    params.extend(filter.iter().flat_map(|f| f.params()));
    let rows = client.query(
        &format!(
            "SELECT {columns} FROM events \
             WHERE global_position > $1 AND global_position <= $2{in_scope} \
             ORDER BY global_position LIMIT $3"
        ),
        &params,
    )?;
    let covered = if (rows.len() as i64) < limit {
        through
    } else {
        rows.last().map_or(through, |row| row.get(0))
    };
    if own.total == 1 {
        return Ok((rows.iter().map(event_from_row).collect(), covered));
    }
    let wanted: Vec<i64> = rows
        .iter()
        .filter(|row| partition_of(row.get(1), own.total) == own.partition)
        .map(|row| row.get(0))
        .collect();
    if wanted.is_empty() {
        return Ok((Vec::new(), covered));
    }
    let rows = client.query(
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE global_position = ANY($1) \
             ORDER BY global_position"
        ),
        &[&wanted],
    )?;
    Ok((rows.iter().map(event_from_row).collect(), covered))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_straggler_rejoins_only_once_every_chunk_still_to_come_was_read_with_its_events() {
        let stragglers = Stragglers::new(&[true, false], 0);
        // The fetcher reads a chunk (0, 10] while lane 0 is a straggler: without its events.
        assert_eq!(stragglers.lanes_to_read(0), vec![false, true]);
        // Lane 0 has everything the router handed out (up to 0): it asks, and waits.
        assert_eq!(stragglers.rejoin_or_read_to(0, 0), Rejoin::WaitForRead);
        assert!(stragglers.read_asked());
        // The next read, (10, 20], has its events.
        assert_eq!(stragglers.lanes_to_read(10), vec![true, true]);
        assert!(!stragglers.read_asked());
        // The chunk (0, 10] is not handed out yet: rejoining now would miss its events.
        assert_eq!(stragglers.rejoin_or_read_to(0, 0), Rejoin::WaitForRead);
        stragglers.hand_out().done(10);
        assert_eq!(stragglers.rejoin_or_read_to(0, 0), Rejoin::ReadTo(10));
        assert_eq!(stragglers.rejoin_or_read_to(0, 10), Rejoin::Rejoined);
        assert!(!stragglers.is_straggler(0));
    }

    #[test]
    fn a_straggler_that_steps_aside_again_asks_again() {
        let stragglers = Stragglers::new(&[true], 0);
        assert_eq!(stragglers.rejoin_or_read_to(0, 0), Rejoin::WaitForRead);
        assert_eq!(stragglers.lanes_to_read(0), vec![true]);
        stragglers.step_aside(0);
        // A read from before it stepped aside counts no more.
        assert_eq!(stragglers.lanes_to_read(5), vec![false]);
        stragglers.hand_out().done(5);
        assert_eq!(stragglers.rejoin_or_read_to(0, 5), Rejoin::WaitForRead);
        assert_eq!(stragglers.lanes_to_read(5), vec![true]);
        assert_eq!(stragglers.rejoin_or_read_to(0, 5), Rejoin::Rejoined);
    }

    #[test]
    fn a_straggler_that_has_everything_handed_out_rejoins_once_the_router_has_closed() {
        let stragglers = Stragglers::new(&[true], 0);
        stragglers.hand_out().done(7);
        assert_eq!(stragglers.rejoin_or_read_to(0, 7), Rejoin::WaitForRead);
        stragglers.close();
        assert_eq!(stragglers.rejoin_or_read_to(0, 7), Rejoin::Rejoined);
    }

    #[test]
    fn a_lane_whose_worker_stopped_is_not_read_for() {
        let stragglers = Stragglers::new(&[false, false], 0);
        stragglers.gone(1);
        assert_eq!(stragglers.lanes_to_read(0), vec![true, false]);
    }
}
