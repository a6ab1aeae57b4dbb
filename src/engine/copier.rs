//! Far from the head, the fetcher reads the stream by one streaming binary `COPY` of a whole
//! settled range (see [`crate::store::copy`]) instead of a query per batch.
//!
//! A range `(position, s]` is read this way only when `s` is *settled* ([`Settling`]): `s` was
//! read as committed, and every writer live at that moment has ended, so no position at or
//! below `s` can still commit. The `COPY` then reads exactly what the gap rule would let the
//! fetcher read, batch after batch, and it never reads past `s`. Near the head (the settled
//! bound less than [`FAR_BATCHES`] batches ahead), the fetcher reads as before.

use std::time::{Duration, Instant};

use postgres::Client;

use crate::store::copy::EventCopy;
use crate::store::gap::{Settling, Writers};

/// How far ahead of the fetcher a settled bound must be, in batches, for a `COPY` to read up
/// to it.
pub(crate) const FAR_BATCHES: i64 = 4;

/// How long after a look at the head that found no bound far enough the next one is made.
const LOOK_AGAIN_AFTER: Duration = Duration::from_millis(200);

/// Finds settled bounds far ahead of the fetcher, on the fetcher's connection.
pub(crate) struct Copier {
    pub(crate) copy: EventCopy,
    /// A bound being proven settled.
    settling: Option<Settling>,
    /// Every position up to here is settled.
    settled: i64,
    next_look: Instant,
}

impl Copier {
    pub(crate) fn prepare(client: &mut Client) -> Result<Copier, postgres::Error> {
        Ok(Copier {
            copy: EventCopy::prepare(client)?,
            settling: None,
            settled: i64::MIN,
            next_look: Instant::now(),
        })
    }

    /// A settled position at least `far` positions after `position`, if one is known or can be
    /// proven now; `None` to read as near the head. Looks at the head at most every
    /// [`LOOK_AGAIN_AFTER`].
    pub(crate) fn bound(
        &mut self,
        client: &mut Client,
        writers: &Writers,
        position: i64,
        far: i64,
    ) -> Result<Option<i64>, postgres::Error> {
        let far_enough = |bound: i64| bound.saturating_sub(position) >= far;
        if far_enough(self.settled) {
            return Ok(Some(self.settled));
        }
        let now = Instant::now();
        if now < self.next_look {
            return Ok(None);
        }
        self.next_look = now + LOOK_AGAIN_AFTER;
        if let Some(mut settling) = self.settling.take() {
            if !settling.settled(client, writers)? {
                if far_enough(settling.through()) {
                    self.settling = Some(settling);
                    return Ok(None);
                }
            } else {
                self.settled = settling.through();
                if far_enough(self.settled) {
                    return Ok(Some(self.settled));
                }
            }
        }
        let head: i64 = client
            .query_one("SELECT COALESCE(MAX(global_position), 0) FROM events", &[])?
            .get(0);
        if !far_enough(head) {
            return Ok(None);
        }
        match Settling::begin(client, writers, head)? {
            None => {
                self.settled = head;
                Ok(Some(head))
            }
            Some(settling) => {
                self.settling = Some(settling);
                Ok(None)
            }
        }
    }
}
