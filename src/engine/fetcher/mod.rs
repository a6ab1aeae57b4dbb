//! The fetcher: reads the stream in global position order, never past a position that may
//! still commit, and hands each event to the worker of its partition. Its reads are in
//! [`reader`]; here, the loop: read, route, wait for appends, retry after an outage.

mod reader;

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, select};
use log::debug;
use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;

use crate::engine::outage::{Attempts, Outage};
use crate::engine::router::{Chunk, FetchProgress, Lane, Router, Routes};
use crate::engine::settings::{Settings, Stopper, stop_asked};
use crate::engine::straggler::Stragglers;
use crate::store::gap::Gaps;
use crate::store::replica::Replica;
use crate::{Database, Error, backoff};
use reader::Reader;

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
