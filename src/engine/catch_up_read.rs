//! One read for the partitions that start far behind the shared read.
//!
//! A runner whose lanes start far apart (a new version of a projection built beside the live
//! one, a projection added to a running set) starts the shared read near the lanes that are
//! close to the head, and the others as stragglers (see `crate::engine::straggler`). Read one
//! by one, each straggler would scan the stream for its own partition: with `N` partitions
//! the stream is looked at `N` times, and a rebuild beside a live projection takes several
//! times as long as the same rebuild alone.
//!
//! So the lanes that start behind are *fed* by one read of their own: this thread reads the
//! stream once, whole rows in position order, from the lowest of their checkpoints up to the
//! position the router has handed out (the shared read has proven the stream complete up to
//! there, so no gap can be passed), and hands each lane its events over its usual queue. A
//! fed lane's worker takes batches from its queue instead of reading by itself. When the read
//! reaches the handed-out position, or a lane's worker takes nothing for
//! [`Settings::straggler_after`] (or has stopped), the lane stops being fed: its worker, once
//! its queue is empty, reads the few events left by itself and rejoins the shared read by the
//! straggler rule, which is what makes rejoining exact. The feed only ever hands a lane every
//! event of its partition up to a position, in order, like the router: a worker applies only
//! events above its checkpoint, so a lane whose checkpoint is higher than where the read
//! starts skips what it already has.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, SendTimeoutError, bounded};
use log::{info, warn};
use postgres::types::ToSql;
use postgres::{Client, Row, Statement};

use crate::engine::router::{Lane, Routes, shared_by};
use crate::engine::settings::{Settings, stop_asked};
use crate::engine::straggler::Stragglers;
use crate::engine::worker::Batch;
use crate::event::{Event, Scope};
use crate::store::{EVENT_COLUMNS, ScopeFilter, event_from_row, scope_filter};
use crate::{Database, Error, error_chain};

/// How often a hand-out waiting on a full queue looks whether the runner is stopping.
const STOP_CHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// The read that feeds the lanes starting far behind.
pub(crate) struct CatchUpRead {
    pub(crate) database: Database,
    pub(crate) settings: Arc<Settings>,
    /// The fed lanes (their queues are the ones the router uses).
    pub(crate) lanes: Vec<Lane>,
    /// Each fed lane's index among the runner's lanes.
    pub(crate) indexes: Vec<usize>,
    /// Each fed lane's checkpoint: it is handed nothing the read has not passed it by.
    pub(crate) checkpoints: Vec<i64>,
    /// The lowest checkpoint of the fed lanes: the read starts after it.
    pub(crate) from: i64,
    pub(crate) stragglers: Arc<Stragglers>,
    pub(crate) stop: Receiver<()>,
}

/// Clears the fed flags however the read ends (a panic or a lost connection included), and
/// wakes the workers, so that none waits for a feed that no longer comes.
struct FeedEnds<'a> {
    stragglers: &'a Stragglers,
    indexes: &'a [usize],
    lanes: &'a [Lane],
}

impl Drop for FeedEnds<'_> {
    fn drop(&mut self) {
        for (&index, lane) in self.indexes.iter().zip(self.lanes) {
            if self.stragglers.is_fed(index) {
                self.stragglers.stop_feeding(index);
                // Claims nothing (a worker keeps the highest position it was told of).
                let _ = lane.queue.try_send(Batch {
                    events: Arc::default(),
                    upto: i64::MIN,
                });
            }
        }
    }
}

impl CatchUpRead {
    /// Feeds the lanes until each has been handed everything up to the shared read (or left
    /// to read by itself).
    pub(crate) fn run(self) {
        let _ends = FeedEnds {
            stragglers: &self.stragglers,
            indexes: &self.indexes,
            lanes: &self.lanes,
        };
        let started = Instant::now();
        match self.feed() {
            Ok(Some(upto)) => info!(
                "{} partition(s) that started behind were read for together up to global \
                 position {upto} in {:.1} s; each reads the rest by itself",
                self.lanes.len(),
                started.elapsed().as_secs_f64()
            ),
            Ok(None) => {}
            Err(error) => warn!(
                "the read for the partitions that started behind stopped: {}; each reads its \
                 own events instead",
                error_chain(&error)
            ),
        }
    }

    /// Reads and hands out batch after batch; the position fed up to, `None` when stopped.
    /// One thread reads while this one decodes and hands out what it read before.
    fn feed(&self) -> Result<Option<i64>, Error> {
        let routes = Routes::new(&self.lanes);
        let mut reader = Reader::open(&self.database, &routes, &self.settings, self.from)?;
        let (reads_tx, reads) = bounded::<Read>(2);
        std::thread::scope(|scope| {
            let reading = scope.spawn(move || -> Result<(), Error> {
                loop {
                    let read = reader.next(self.stragglers.handed())?;
                    let last = read.last;
                    if reads_tx.send(read).is_err() || last {
                        return Ok(());
                    }
                }
            });
            let fed = self.hand_out(&routes, &reads);
            // Ends a reader waiting to send.
            drop(reads);
            let read = reading.join().unwrap_or_else(|_| {
                Err(Error::ThreadPanicked {
                    thread: "projector-behind (reader)".into(),
                })
            });
            match (fed, read) {
                (Some(position), _) => Ok(Some(position)),
                (None, Err(error)) => Err(error),
                (None, Ok(())) => Ok(None),
            }
        })
    }

    /// Hands out each read's events; the position fed up to once the last read is out, `None`
    /// when stopped or the reads ended early (the reader's error says why).
    fn hand_out(&self, routes: &Routes, reads: &Receiver<Read>) -> Option<i64> {
        let mut fed = vec![true; self.lanes.len()];
        let mut held: Vec<Vec<Event>> = vec![Vec::new(); routes.stream_count()];
        let mut targets = Vec::new();
        for read in reads {
            for row in &read.rows {
                routes.route(event_from_row(row), &mut held, &mut targets);
            }
            drop(read.rows);
            for (stream, events) in held.iter_mut().enumerate() {
                // Large transactions, as the router makes them while catching up.
                if !read.last && !events.is_empty() && events.len() < routes.min_batch(stream) {
                    continue;
                }
                // A lane whose checkpoint the read has not passed has all of it already.
                let lanes: Vec<usize> = routes
                    .lanes_of(stream)
                    .iter()
                    .copied()
                    .filter(|&lane| fed[lane] && read.upto > self.checkpoints[lane])
                    .collect();
                let copies = shared_by(std::mem::take(events), lanes.len());
                for (&lane, events) in lanes.iter().zip(copies) {
                    if !self.hand(lane, events, read.upto) {
                        fed[lane] = false;
                        self.stragglers.stop_feeding(self.indexes[lane]);
                    }
                }
            }
            if self.stopping() {
                return None;
            }
            if read.last || !fed.contains(&true) {
                // The workers still fed are woken as the feed ends (`FeedEnds`).
                return Some(read.upto);
            }
        }
        None
    }

    /// Puts a batch on `lane`'s queue; false when its worker took nothing for
    /// `straggler_after`, has stopped, or the runner is stopping (it is fed no more).
    fn hand(&self, lane: usize, events: Arc<Vec<Event>>, upto: i64) -> bool {
        let started = Instant::now();
        let mut batch = Batch { events, upto };
        loop {
            match self.lanes[lane].queue.send_timeout(batch, STOP_CHECK) {
                Ok(()) => return true,
                Err(SendTimeoutError::Disconnected(_)) => return false,
                Err(SendTimeoutError::Timeout(back)) => batch = back,
            }
            if self.stopping() || started.elapsed() >= self.settings.straggler_after {
                return false;
            }
        }
    }

    fn stopping(&self) -> bool {
        stop_asked(&self.stop)
    }
}

/// One read: rows in position order, every one of the lanes' events up to `upto`.
struct Read {
    rows: Vec<Row>,
    upto: i64,
    /// The read reached the position handed out: it is the feed's last.
    last: bool,
}

/// The reading side of the feed, on a connection of its own.
struct Reader {
    client: Client,
    statement: Statement,
    filter: Option<ScopeFilter>,
    limit: i64,
    position: i64,
}

impl Reader {
    fn open(
        database: &Database,
        routes: &Routes,
        settings: &Settings,
        from: i64,
    ) -> Result<Reader, Error> {
        let mut client = database.connect()?;
        // One projection taking every event: no filter (nor for an empty list).
        let scopes: Option<Vec<&Scope>> = routes.scopes().into_iter().collect();
        let filter = scope_filter(&scopes.unwrap_or_default(), 3);
        let in_scope = filter
            .as_ref()
            .map_or(String::new(), |f| format!(" AND {}", f.condition));
        // No upper bound in the statement: with one, a generic plan may fetch the whole range
        // by a bitmap scan and sort it; rows past the bound are dropped here instead.
        let statement = client
            .prepare(&format!(
                "SELECT {EVENT_COLUMNS} FROM events \
                 WHERE global_position > $1{in_scope} \
                 ORDER BY global_position LIMIT $2"
            ))
            .map_err(Error::database(
                "preparing the read of the partitions behind",
            ))?;
        Ok(Reader {
            client,
            statement,
            filter,
            limit: i64::from(settings.batch_size),
            position: from,
        })
    }

    /// The next read after the last, never past `through` (the stream is complete up to it).
    fn next(&mut self, through: i64) -> Result<Read, Error> {
        let position = self.position;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&position, &self.limit];
        params.extend(self.filter.iter().flat_map(|f| f.params()));
        let mut rows = self
            .client
            .query(&self.statement, &params)
            .map_err(Error::database(format!(
                "reading events after global position {position} for the partitions behind"
            )))?;
        let last_row = rows.last().map(|row| row.get::<_, i64>(0));
        let full = rows.len() as i64 == self.limit && last_row.is_some_and(|l| l <= through);
        rows.retain(|row| row.get::<_, i64>(0) <= through);
        let upto = match last_row {
            Some(last_row) if full => last_row,
            _ => through.max(position),
        };
        self.position = upto;
        Ok(Read {
            rows,
            upto,
            last: !full,
        })
    }
}
