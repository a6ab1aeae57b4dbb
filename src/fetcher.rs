//! The fetcher: reads the stream in global position order, never past a position that may
//! still commit, and hands each event to the worker of its partition.

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, select};
use log::{debug, info};
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Row, Statement};

use crate::event::Event;
use crate::gap::{Before, Gaps, Held, Writers, holes};
use crate::outage::{Attempts, Outage};
use crate::partition::partition_of;
use crate::settings::{Settings, Stopper};
use crate::store::{EVENT_COLUMNS, event_from_row};
use crate::straggler::Stragglers;
use crate::worker::Batch;
use crate::{Database, Error, backoff};

/// The longest the fetcher sleeps without looking at its stop channel.
const WAKE_SLICE: Duration = Duration::from_millis(25);

/// Figures the fetcher shares while it runs, for progress lines.
#[derive(Debug, Default)]
pub(crate) struct FetchProgress {
    pub(crate) read: AtomicU64,
    pub(crate) position: AtomicI64,
}

pub(crate) struct Fetcher {
    pub(crate) database: Database,
    pub(crate) settings: Arc<Settings>,
    pub(crate) total: u32,
    /// The worker of each owned partition.
    pub(crate) workers: HashMap<u32, Sender<Batch>>,
    /// Read from after this position.
    pub(crate) start: i64,
    /// With `exit_when_caught_up`: stop once the stream is read up to here.
    pub(crate) target: i64,
    pub(crate) stop: Receiver<()>,
    pub(crate) progress: Arc<FetchProgress>,
    /// Shared with the workers: an outage is logged once.
    pub(crate) outage: Arc<Outage>,
    /// Shared with the workers: the partitions left out of the shared read.
    pub(crate) stragglers: Arc<Stragglers>,
    /// Stops every thread of the runner.
    pub(crate) stopper: Stopper,
}

/// A connection that reads events, listens for appends, and knows the writers' relations.
struct Reader {
    client: Client,
    next_batch: Statement,
    /// Whether one position has committed: looked at while a gap holds the fetcher back,
    /// instead of reading the batch above it again.
    filled: Statement,
    writers: Writers,
    /// Set when the process owns at most half of the partitions.
    keys_first: Option<KeysFirst>,
}

/// Reading in two steps, for a process that owns few partitions: the position and aggregate
/// of every event (cheap for the server to send), then whole rows for the owned ones only.
struct KeysFirst {
    next_keys: Statement,
    at_positions: Statement,
    owned: HashSet<u32>,
    total: u32,
}

/// What the reader hands the router.
struct Chunk {
    /// Rows in position order: every event up to `upto` not sent before.
    rows: Vec<Row>,
    /// Events read, of all partitions.
    seen: usize,
    upto: i64,
    /// The read filled its limit, so more rows are waiting.
    more_waiting: bool,
}

/// One read of the stream, cut before the first position that may still commit.
struct Read {
    /// The rows, in position order, up to `upto` (with `keys_first`, the owned ones only).
    rows: Vec<Row>,
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
    fn open(
        mut client: Client,
        database: &Database,
        owned: &HashMap<u32, Sender<Batch>>,
        total: u32,
    ) -> Result<Reader, Error> {
        let next_batch = client
            .prepare(&format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE global_position > $1 \
                 ORDER BY global_position LIMIT $2"
            ))
            .map_err(Error::database("preparing the event query"))?;
        let filled = client
            .prepare("SELECT EXISTS (SELECT 1 FROM events WHERE global_position = $1)")
            .map_err(Error::database("preparing the event query"))?;
        let writers = Writers::find(&mut client)?;
        let keys_first = if owned.len() * 2 <= total as usize {
            let next_keys = client
                .prepare(
                    "SELECT global_position, aggregate_id FROM events \
                     WHERE global_position > $1 ORDER BY global_position LIMIT $2",
                )
                .map_err(Error::database("preparing the event query"))?;
            let at_positions = client
                .prepare(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE global_position = ANY($1) \
                     ORDER BY global_position"
                ))
                .map_err(Error::database("preparing the event query"))?;
            Some(KeysFirst {
                next_keys,
                at_positions,
                owned: owned.keys().copied().collect(),
                total,
            })
        } else {
            None
        };
        client
            .batch_execute(database.listen_statement())
            .map_err(Error::database("listening for appends"))?;
        Ok(Reader {
            client,
            next_batch,
            filled,
            writers,
            keys_first,
        })
    }

    /// Reads up to `limit` events after `position`, keeping only the complete prefix.
    fn read(
        &mut self,
        position: i64,
        limit: i64,
        gaps: &mut Gaps,
        settings: &Settings,
    ) -> Result<Read, postgres::Error> {
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
        let next = match &self.keys_first {
            Some(keys_first) => &keys_first.next_keys,
            None => &self.next_batch,
        };
        let mut rows = self.client.query(next, &[&position, &limit])?;
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
        if let Some(keys_first) = &self.keys_first {
            let wanted: Vec<i64> = rows
                .iter()
                .filter(|row| {
                    let partition = partition_of(row.get(1), keys_first.total);
                    keys_first.owned.contains(&partition)
                })
                .map(|row| row.get(0))
                .collect();
            rows = if wanted.is_empty() {
                Vec::new()
            } else {
                self.client.query(&keys_first.at_positions, &[&wanted])?
            };
        }
        Ok(Read {
            rows,
            seen,
            upto,
            full,
            held,
        })
    }
}

impl Read {
    /// A read that found nothing new after `position`.
    fn nothing_at(position: i64, held: bool) -> Read {
        Read {
            rows: Vec::new(),
            seen: 0,
            upto: position,
            full: false,
            held,
        }
    }
}

/// The events of `rows` that belong to owned partitions, by partition.
fn route(
    rows: &[Row],
    owned: &HashMap<u32, Sender<Batch>>,
    total: u32,
) -> HashMap<u32, Vec<Event>> {
    let mut routed: HashMap<u32, Vec<Event>> = HashMap::with_capacity(owned.len());
    for row in rows {
        let partition = partition_of(row.get(3), total);
        if owned.contains_key(&partition) {
            routed
                .entry(partition)
                .or_default()
                .push(event_from_row(row));
        }
    }
    routed
}

impl Fetcher {
    /// Reads until stopped; dropping `self.workers` on return tells the workers to finish.
    /// Returns how many events were read.
    ///
    /// Two threads share the work, so that the database produces the next batch while the
    /// current one is decoded: this one reads (and waits at gaps), `projector-route` decodes
    /// the rows and hands each owned partition its events.
    pub(crate) fn run(self, client: Client) -> Result<u64, Error> {
        let reader = Reader::open(client, &self.database, &self.workers, self.total)?;
        let (reads_tx, reads) = bounded::<Chunk>(2);
        std::thread::scope(|scope| {
            let router = std::thread::Builder::new()
                .name("projector-route".into())
                .spawn_scoped(scope, || {
                    // A panic here must stop the reader too, which may be waiting for appends.
                    match catch_unwind(AssertUnwindSafe(|| self.route(reads))) {
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
            let outcome = self.read(reader, reads_tx);
            let read = router.join().map_err(|_| Error::ThreadPanicked {
                thread: "projector-route".into(),
            })?;
            outcome.map(|()| read)
        })
    }

    /// Decodes and routes what the reader sends, until it stops or a worker has gone.
    ///
    /// While catching up (more rows are waiting), a partition's events are held until it has
    /// `min_events_per_batch` of them, so that a process owning many partitions still commits
    /// large transactions; once caught up, everything goes out at once.
    fn route(&self, reads: Receiver<Chunk>) -> u64 {
        let mut read = 0;
        let mut held: HashMap<u32, Vec<Event>> = HashMap::with_capacity(self.workers.len());
        for chunk in reads {
            for (partition, events) in route(&chunk.rows, &self.workers, self.total) {
                held.entry(partition).or_default().extend(events);
            }
            read += chunk.seen as u64;
            drop(chunk.rows);
            if self.hand_out(&mut held, chunk.upto, chunk.more_waiting) {
                break;
            }
            self.progress.read.store(read, Ordering::Relaxed);
        }
        read
    }

    /// Reads the stream in order until stopped, sending each complete prefix to the router.
    fn read(&self, reader: Reader, reads: Sender<Chunk>) -> Result<(), Error> {
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
                    .and_then(|c| Reader::open(c, &self.database, &self.workers, self.total))
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
            let batch = match current.read(position, limit, &mut gaps, &self.settings) {
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
            let caught_up = !batch.full || batch.held;
            // Sent when the read moved on, or to make the router let go of events it holds
            // for a larger batch once there is nothing more to read.
            if batch.upto > position || (caught_up && router_holds) {
                router_holds = !caught_up;
                select! {
                    send(reads, Chunk {
                        rows: batch.rows,
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
        debug!("fetcher: stopped reading at global position {position}");
        Ok(())
    }

    /// Sends every owned partition its events (possibly none) and `upto`; true when asked to
    /// stop meanwhile, or a worker has gone.
    ///
    /// With `hold_small`, a partition holding fewer than `min_events_per_batch` events keeps
    /// them (and is sent nothing, since its events up to `upto` are not all out yet).
    fn hand_out(&self, held: &mut HashMap<u32, Vec<Event>>, upto: i64, hold_small: bool) -> bool {
        let mut hand_out = self.stragglers.hand_out();
        for (&partition, worker) in &self.workers {
            if self.stragglers.is_straggler(partition) {
                // It reads its own events until it catches up (see `straggler`).
                held.remove(&partition);
                continue;
            }
            let events = held.get(&partition).map_or(0, Vec::len);
            if hold_small && events > 0 && events < self.settings.min_events_per_batch {
                continue;
            }
            let batch = Batch {
                events: held.remove(&partition).unwrap_or_default(),
                upto,
            };
            select! {
                send(worker, batch) -> sent => if sent.is_err() { return true },
                recv(self.stop) -> _ => return true,
                default(self.settings.straggler_after) => {
                    hand_out.mark(partition);
                    info!(
                        "partition {partition}/{}: its worker has not taken a batch for {} s, \
                         slower than the stream; the other partitions go on without it, and it \
                         reads its own events until it catches up",
                        self.total,
                        self.settings.straggler_after.as_secs_f64()
                    );
                }
            }
        }
        hand_out.done(upto);
        false
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
        use crossbeam_channel::TryRecvError::Disconnected;
        matches!(self.stop.try_recv(), Err(Disconnected) | Ok(()))
    }
}
