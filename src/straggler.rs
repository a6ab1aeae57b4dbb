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
//! Rejoining is exact: the router hands a chunk out and records its position under one lock,
//! and a straggler rejoins under the same lock only when it has everything up to the recorded
//! position, so every later chunk reaches it and no earlier one is missed. (An event handed
//! out twice would be harmless anyway: a worker applies only events above its checkpoint.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};

use postgres::Client;

use crate::event::Event;
use crate::partition::partition_of;
use crate::store::{EVENT_COLUMNS, event_from_row};

/// Which partitions are stragglers, and how far the router has handed the stream out.
#[derive(Debug)]
pub(crate) struct Stragglers {
    /// The position up to which the router has handed out the stream (every chunk up to here
    /// went to every partition that was not a straggler when it was handed out).
    handed_through: Mutex<i64>,
    /// The same position, readable without waiting for the router: a straggler reads up to it
    /// while the router is busy handing a chunk out.
    handed: AtomicI64,
    /// Per owned partition: true while it is a straggler. Read without the lock by the router
    /// and by the partition's own worker.
    flags: HashMap<u32, AtomicBool>,
}

impl Stragglers {
    /// No straggler yet among `partitions`; the stream is handed out from `start`.
    pub(crate) fn new(partitions: &[u32], start: i64) -> Stragglers {
        Stragglers {
            handed_through: Mutex::new(start),
            handed: AtomicI64::new(start),
            flags: partitions
                .iter()
                .map(|&p| (p, AtomicBool::new(false)))
                .collect(),
        }
    }

    /// True while `partition` reads its own events.
    pub(crate) fn is_straggler(&self, partition: u32) -> bool {
        self.flags
            .get(&partition)
            .is_some_and(|flag| flag.load(Ordering::Acquire))
    }

    /// Taken by the router for the whole hand-out of one chunk.
    pub(crate) fn hand_out(&self) -> HandOut<'_> {
        HandOut {
            handed_through: lock(&self.handed_through),
            stragglers: self,
        }
    }

    /// For `partition`'s worker, which has everything up to `received`: rejoins the shared
    /// read and returns `None` when that is as far as the router has handed out; otherwise
    /// returns the position to read up to by itself.
    pub(crate) fn rejoin_or_read_to(&self, partition: u32, received: i64) -> Option<i64> {
        // Reading on needs no lock: only rejoining waits for the router to be between chunks.
        let handed = self.handed.load(Ordering::Acquire);
        if received < handed {
            return Some(handed);
        }
        let handed_through = lock(&self.handed_through);
        if received >= *handed_through {
            if let Some(flag) = self.flags.get(&partition) {
                flag.store(false, Ordering::Release);
            }
            None
        } else {
            Some(*handed_through)
        }
    }
}

/// The router's hold on the stragglers while it hands one chunk out.
pub(crate) struct HandOut<'a> {
    handed_through: MutexGuard<'a, i64>,
    stragglers: &'a Stragglers,
}

impl HandOut<'_> {
    /// Leaves `partition` out of the shared read until its worker rejoins.
    pub(crate) fn mark(&mut self, partition: u32) {
        if let Some(flag) = self.stragglers.flags.get(&partition) {
            flag.store(true, Ordering::Release);
        }
    }

    /// The chunk up to `upto` is handed out.
    pub(crate) fn done(mut self, upto: i64) {
        *self.handed_through = (*self.handed_through).max(upto);
        self.stragglers
            .handed
            .store(*self.handed_through, Ordering::Release);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A straggler's own read: the events of `partition` (of `total`) in `(after, through]`,
/// looking at `limit` events of the stream at most, and the position the read covers.
pub(crate) fn read_own_events(
    client: &mut Client,
    partition: u32,
    total: u32,
    after: i64,
    through: i64,
    limit: i64,
) -> Result<(Vec<Event>, i64), postgres::Error> {
    let rows = client.query(
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE global_position > $1 AND global_position <= $2 \
             ORDER BY global_position LIMIT $3"
        ),
        &[&after, &through, &limit],
    )?;
    let covered = if (rows.len() as i64) < limit {
        through
    } else {
        rows.last().map_or(through, |row| row.get(0))
    };
    let events = rows
        .iter()
        .filter(|row| partition_of(row.get(3), total) == partition)
        .map(event_from_row)
        .collect();
    Ok((events, covered))
}
