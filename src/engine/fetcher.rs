//! The fetcher: reads the stream in global position order, never past a position that may
//! still commit, and hands each event to the worker of its partition.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, select};
use log::debug;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, Row, Statement};

use crate::engine::outage::{Attempts, Outage};
use crate::engine::router::{Chunk, FetchProgress, Lane, Router, Routes};
use crate::engine::settings::{Settings, Stopper, stop_asked};
use crate::engine::straggler::Stragglers;
use crate::engine::wanted::Wanted;
use crate::event::Scope;
use crate::store::gap::{Before, Gaps, Held, Writers, holes};
use crate::store::replica::Replica;
use crate::store::{EVENT_COLUMNS, ScopeFilter, scope_filter};
use crate::{Database, Error, backoff};

/// The longest the fetcher sleeps without looking at its stop channel.
const WAKE_SLICE: Duration = Duration::from_millis(25);

pub(crate) struct Fetcher {
    pub(crate) database: Database,
    pub(crate) settings: Arc<Settings>,
    /// The workers' queues: one per owned partition of each projection.
    pub(crate) lanes: Vec<Lane>,
    /// Read from after this position.
    pub(crate) start: i64,
    /// With `exit_when_caught_up`: stop once the stream is read up to here.
    pub(crate) target: i64,
    pub(crate) stop: Receiver<()>,
    pub(crate) progress: Arc<FetchProgress>,
    /// Shared with the workers: an outage is logged once.
    pub(crate) outage: Arc<Outage>,
    /// Shared with the workers: the lanes left out of the shared read.
    pub(crate) stragglers: Arc<Stragglers>,
    /// Stops every thread of the runner.
    pub(crate) stopper: Stopper,
    /// A streaming replica that serves the reads far from the head.
    pub(crate) replica: Option<Replica>,
}

/// A connection that reads events, listens for appends, and knows the writers' relations.
struct Reader {
    client: Client,
    /// Whether one position has committed: looked at while a gap holds the fetcher back,
    /// instead of reading the batch above it again.
    filled: Statement,
    writers: Writers,
    shape: Shape,
}

/// How a read gets its rows. Each statement's first step reads after `$1`, `$2` events at
/// most; the complete prefix of the stream is known from it.
enum Shape {
    /// Per read, as [`Wanted`] finds best for the lanes read for: whole rows in one step
    /// (`whole`), or, when they hold few partitions, the position and aggregate of every event
    /// (`keys`, cheap for the server to send), then whole rows of theirs only (`at_positions`).
    Rows {
        whole: Statement,
        keys: Statement,
        at_positions: Statement,
    },
    /// When every projection has a scope: positions (to find gaps), then whole rows of the
    /// events in some projection's scope only, the filter applied by the server.
    Scoped {
        positions: Statement,
        in_scope: Statement,
        filter: ScopeFilter,
    },
}

/// One read of the stream, cut before the first position that may still commit.
struct Read {
    /// The rows, in position order, up to `upto` (only the wanted ones, unless whole).
    rows: Vec<Row>,
    /// Per lane, whether `rows` has its events; `None` when it has every lane's.
    covered: Option<Vec<bool>>,
    /// Events read, of all partitions.
    seen: usize,
    /// The stream is complete up to here (no position at or below may still appear).
    upto: i64,
    /// The read filled its limit: more may be waiting.
    full: bool,
    /// A missing position held the read back.
    held: bool,
}

impl Reader {
    fn open(mut client: Client, database: &Database, routes: &Routes) -> Result<Reader, Error> {
        let prepare = |client: &mut Client, sql: &str| {
            client
                .prepare(sql)
                .map_err(Error::database("preparing the event query"))
        };
        let scopes: Option<Vec<&Scope>> = routes.scopes().into_iter().collect();
        let filter = scopes.and_then(|scopes| scope_filter(&scopes, 3));
        let shape = if let Some(filter) = filter {
            let positions = prepare(
                &mut client,
                "SELECT global_position FROM events WHERE global_position > $1 \
                 ORDER BY global_position LIMIT $2",
            )?;
            let in_scope = prepare(
                &mut client,
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events \
                     WHERE global_position > $1 AND global_position <= $2 AND {} \
                     ORDER BY global_position",
                    filter.condition
                ),
            )?;
            Shape::Scoped {
                positions,
                in_scope,
                filter,
            }
        } else {
            Shape::Rows {
                whole: prepare(
                    &mut client,
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE global_position > $1 \
                         ORDER BY global_position LIMIT $2"
                    ),
                )?,
                keys: prepare(
                    &mut client,
                    "SELECT global_position, aggregate_id FROM events \
                     WHERE global_position > $1 ORDER BY global_position LIMIT $2",
                )?,
                at_positions: prepare(
                    &mut client,
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE global_position = ANY($1) \
                         ORDER BY global_position"
                    ),
                )?,
            }
        };
        let filled = prepare(
            &mut client,
            "SELECT EXISTS (SELECT 1 FROM events WHERE global_position = $1)",
        )?;
        let writers = Writers::find(&mut client)?;
        client
            .batch_execute(database.listen_statement())
            .map_err(Error::database("listening for appends"))?;
        Ok(Reader {
            client,
            filled,
            writers,
            shape,
        })
    }

    /// Reads up to `limit` events after `position`, keeping only the complete prefix, with
    /// whole rows of the events of the `lanes` that `stragglers` says to read for.
    fn read(
        &mut self,
        position: i64,
        limit: i64,
        gaps: &mut Gaps,
        settings: &Settings,
        (lanes, stragglers): (&[Lane], &Stragglers),
    ) -> Result<Read, postgres::Error> {
        // Before the first statement: a straggler that asked is read for from this read on.
        let to_read = stragglers.lanes_to_read(position);
        let dead_through =
            match gaps.before_read(&mut self.client, &self.writers, settings.gap_warn_after)? {
                Before::Read { dead_through } => dead_through.unwrap_or(position),
                Before::Held => {
                    // The fetcher waits at `position + 1`: read again only once it has committed.
                    let filled: bool = self
                        .client
                        .query_one(&self.filled, &[&(position + 1)])?
                        .get(0);
                    if !filled {
                        return Ok(Read::nothing_at(position, true));
                    }
                    position
                }
            };
        let (first, wanted) = match &self.shape {
            Shape::Scoped { positions, .. } => (positions, None),
            Shape::Rows { whole, keys, .. } => {
                let wanted = Wanted::new(lanes, &to_read);
                if wanted.is_at_most_half() {
                    (keys, Some(wanted))
                } else {
                    (whole, None)
                }
            }
        };
        let mut rows = self.client.query(first, &[&position, &limit])?;
        let mut full = rows.len() as i64 == limit;
        let Some(last) = rows.last().map(|row| row.get::<_, i64>(0)) else {
            return Ok(Read::nothing_at(position, false));
        };
        let positions: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
        let holes = holes(position, &positions, dead_through);
        let first_hole = holes.first().map_or(last + 1, |&(first, _)| first);
        let (upto, held) = match gaps.hold(&mut self.client, &self.writers, &holes, last)? {
            Held::Pass => (last, false),
            Held::ReadAgain => {
                // Read again at once: rows may have filled the holes since this read.
                full = true;
                (first_hole - 1, false)
            }
            Held::Wait => (first_hole - 1, true),
        };
        rows.retain(|row| row.get::<_, i64>(0) <= upto);
        let seen = rows.len();
        let (rows, covered) = match (&self.shape, wanted) {
            (Shape::Rows { .. }, None) => (rows, None),
            (Shape::Rows { at_positions, .. }, Some(wanted)) => {
                let rows = rows_of(&mut self.client, at_positions, &rows, &wanted)?;
                (rows, Some(wanted.covered_lanes()))
            }
            (Shape::Scoped { .. }, _) if rows.is_empty() => (rows, None),
            (
                Shape::Scoped {
                    in_scope, filter, ..
                },
                _,
            ) => {
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&position, &upto];
                params.extend(filter.params());
                (self.client.query(in_scope, &params)?, None)
            }
        };
        Ok(Read {
            rows,
            covered,
            seen,
            upto,
            full,
            held,
        })
    }
}

/// Whole rows of the events among `keys` (positions and aggregate ids) that `wanted` takes.
fn rows_of(
    client: &mut Client,
    at_positions: &Statement,
    keys: &[Row],
    wanted: &Wanted,
) -> Result<Vec<Row>, postgres::Error> {
    let positions: Vec<i64> = keys
        .iter()
        .filter(|row| wanted.takes(row.get(1)))
        .map(|row| row.get(0))
        .collect();
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    client.query(at_positions, &[&positions])
}

impl Reader {
    /// Drops the notifications of appends that came with the replies of the last read: while
    /// more rows are waiting the fetcher reads again at once, so they wake nothing, and the
    /// driver would otherwise keep one per append for the whole catch-up. Only those already
    /// received: none is waited for.
    fn forget_notifications(&mut self) {
        let mut notifications = self.client.notifications();
        let held = notifications.len();
        let mut iter = notifications.iter();
        for _ in 0..held {
            if !matches!(iter.next(), Ok(Some(_))) {
                break;
            }
        }
    }
}

impl Read {
    /// A read that found nothing new after `position`.
    fn nothing_at(position: i64, held: bool) -> Read {
        Read {
            rows: Vec::new(),
            covered: None,
            seen: 0,
            upto: position,
            full: false,
            held,
        }
    }
}

impl Fetcher {
    /// Reads until stopped; dropping `self.lanes` on return tells the workers to finish.
    /// Returns how many events were read.
    ///
    /// Two threads share the work, so that the database produces the next batch while the
    /// current one is decoded: this one reads (and waits at gaps), `projector-route` decodes
    /// the rows and hands each lane its events (see [`Router`]).
    pub(crate) fn run(mut self, client: Client) -> Result<u64, Error> {
        let replica = self.replica.take();
        let routes = Routes::new(&self.lanes);
        let reader = Reader::open(client, &self.database, &routes)?;
        let (reads_tx, reads) = bounded::<Chunk>(2);
        let router = Router {
            lanes: &self.lanes,
            routes: &routes,
            settings: &self.settings,
            stragglers: &self.stragglers,
            progress: &self.progress,
            stop: &self.stop,
            stopper: &self.stopper,
        };
        std::thread::scope(|scope| {
            let routing = std::thread::Builder::new()
                .name("projector-route".into())
                .spawn_scoped(scope, || {
                    // A panic here must stop the reader too, which may be waiting for appends.
                    match catch_unwind(AssertUnwindSafe(|| router.run(reads))) {
                        Ok(read) => read,
                        Err(panic) => {
                            self.stopper.stop();
                            resume_unwind(panic)
                        }
                    }
                })
                .map_err(|_| Error::ThreadPanicked {
                    thread: "projector-route".into(),
                })?;
            let outcome = self.read(reader, replica, &routes, reads_tx);
            let read = routing.join().map_err(|_| Error::ThreadPanicked {
                thread: "projector-route".into(),
            })?;
            outcome.map(|()| read)
        })
    }

    /// Reads the stream in order until stopped, sending each complete prefix to the router.
    fn read(
        &self,
        reader: Reader,
        mut replica: Option<Replica>,
        routes: &Routes,
        reads: Sender<Chunk>,
    ) -> Result<(), Error> {
        let mut reader = Some(reader);
        let mut gaps = Gaps::default();
        let mut position = self.start;
        let mut attempts = Attempts::default();
        let mut quiet = 0;
        let mut router_holds = false;
        let limit = i64::from(self.settings.batch_size);
        while !self.stopped() {
            let Some(current) = reader.as_mut() else {
                match self
                    .database
                    .connect()
                    .and_then(|c| Reader::open(c, &self.database, routes))
                {
                    Ok(fresh) => {
                        self.outage.back("the fetcher", &mut attempts);
                        gaps.reset();
                        reader = Some(fresh);
                    }
                    Err(error) if error.is_connection_loss() => {
                        if self.wait_before_retry(&mut attempts, error)? {
                            break;
                        }
                    }
                    Err(error) => return Err(error),
                }
                continue;
            };
            if let Some(read) = replica.as_mut().and_then(|r| r.read(position, limit)) {
                // Every lane's events are in it: stragglers that asked are read for from here.
                self.stragglers.lanes_to_read(position);
                // Settled below `read.upto`: what the primary knew of gaps below it is spent.
                gaps.reset();
                self.progress.note_gap(None);
                current.forget_notifications();
                let chunk = Chunk {
                    seen: read.rows.len(),
                    rows: read.rows,
                    // Every event, of every partition.
                    covered: None,
                    upto: read.upto,
                    more_waiting: true,
                };
                select! {
                    send(reads, chunk) -> sent => if sent.is_err() { break },
                    recv(self.stop) -> _ => break,
                }
                router_holds = true;
                position = read.upto;
                self.progress.position.store(position, Ordering::Relaxed);
                quiet = 0;
                continue;
            }
            let lanes = (self.lanes.as_slice(), &*self.stragglers);
            let batch = match current.read(position, limit, &mut gaps, &self.settings, lanes) {
                Ok(batch) => batch,
                Err(source) => {
                    let error = Error::Database {
                        action: format!("reading events after global position {position}"),
                        source,
                    };
                    if !error.is_connection_loss() {
                        return Err(error);
                    }
                    reader = None;
                    if self.wait_before_retry(&mut attempts, error)? {
                        break;
                    }
                    continue;
                }
            };
            self.progress
                .note_gap(if batch.held { gaps.held_by() } else { None });
            let caught_up = !batch.full || batch.held;
            if !caught_up {
                current.forget_notifications();
            }
            self.progress.notifications_held.store(
                current.client.notifications().len() as u64,
                Ordering::Relaxed,
            );
            // Sent when the read moved on, or to make the router let go of events it holds
            // for a larger batch once there is nothing more to read.
            if batch.upto > position || (caught_up && router_holds) {
                router_holds = !caught_up;
                select! {
                    send(reads, Chunk {
                        rows: batch.rows,
                        covered: batch.covered,
                        seen: batch.seen,
                        upto: batch.upto.max(position),
                        more_waiting: !caught_up,
                    }) -> sent => if sent.is_err() { break },
                    recv(self.stop) -> _ => break,
                }
                if batch.upto > position {
                    position = batch.upto;
                    self.progress.position.store(position, Ordering::Relaxed);
                    quiet = 0;
                }
            }
            if caught_up && self.settings.exit_when_caught_up && position >= self.target {
                break;
            }
            if !caught_up {
                continue;
            }
            // Caught up, or held at a gap: wait for an append's notification, or poll. Polls
            // that find nothing back off; a gap is looked at again at the base interval.
            let wait = if batch.held {
                self.settings.poll_interval
            } else {
                quiet += 1;
                backoff(
                    quiet,
                    self.settings.poll_interval,
                    self.settings.max_poll_interval,
                )
            };
            if self.wait_for_appends(&mut reader, wait, &mut attempts)? {
                break;
            }
        }
        self.progress.note_gap(None);
        debug!("fetcher: stopped reading at global position {position}");
        Ok(())
    }

    /// Waits up to `timeout` for a notification of an append; true when asked to stop
    /// meanwhile. A lost connection ends the wait (the next read reconnects).
    fn wait_for_appends(
        &self,
        reader: &mut Option<Reader>,
        timeout: Duration,
        attempts: &mut Attempts,
    ) -> Result<bool, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stopped() {
                return Ok(true);
            }
            let now = Instant::now();
            if self.stragglers.read_asked() {
                // A straggler that has caught up waits for a read with its events.
                return Ok(false);
            }
            if now >= deadline {
                return Ok(false);
            }
            let Some(current) = reader.as_mut() else {
                return Ok(false);
            };
            let slice = (deadline - now).min(WAKE_SLICE);
            let arrived = {
                let mut notifications = current.client.notifications();
                let arrived = notifications
                    .timeout_iter(slice)
                    .next()
                    .map(|n| n.is_some());
                if let Ok(true) = arrived {
                    // Drain what else has arrived; one read serves them all.
                    while let Ok(Some(_)) = notifications.iter().next() {}
                }
                arrived
            };
            match arrived {
                Ok(true) => return Ok(false),
                Ok(false) => {}
                Err(source) => {
                    *reader = None;
                    let error = Error::Database {
                        action: "waiting for appends".into(),
                        source,
                    };
                    // Reconnect at once: the first attempt costs nothing when the server is up.
                    self.outage.lost(
                        "the fetcher",
                        attempts,
                        error,
                        Duration::ZERO,
                        &self.settings,
                    )?;
                    return Ok(false);
                }
            }
        }
    }

    /// After a failed attempt to reach the database: waits before the next one, with
    /// back-off. True when asked to stop meanwhile; an error once it is time to give up.
    fn wait_before_retry(&self, attempts: &mut Attempts, error: Error) -> Result<bool, Error> {
        let delay =
            self.outage
                .lost_with_backoff("the fetcher", attempts, error, &self.settings)?;
        Ok(select! {
            recv(self.stop) -> _ => true,
            default(delay) => false,
        })
    }

    fn stopped(&self) -> bool {
        stop_asked(&self.stop)
    }
}
