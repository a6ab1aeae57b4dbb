//! The router: decodes what the fetcher read and hands each projection's partitions their
//! events, one queue (a *lane*) per worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, SendTimeoutError, Sender};
use log::{debug, info};
use postgres::Row;

use crate::engine::settings::{Settings, Stopper, stop_asked};
use crate::engine::straggler::{HandOut, Stragglers};
use crate::engine::worker::Batch;
use crate::event::{Event, Scope};
use crate::now_millis;
use crate::partition::partition_of;
use crate::store::event_from_row;

/// Figures the fetcher and router share while they run, for progress lines and metrics.
#[derive(Debug, Default)]
pub(crate) struct FetchProgress {
    /// Events read, of all partitions.
    pub(crate) read: AtomicU64,
    /// The stream is read up to here.
    pub(crate) position: AtomicI64,
    /// The fetcher is running.
    pub(crate) running: AtomicBool,
    /// Since when (ms since the epoch) the fetcher waits at a gap; 0 when it does not.
    pub(crate) gap_since_ms: AtomicI64,
    /// A server process holding that gap (0 when unknown or prepared).
    pub(crate) gap_pid: AtomicI32,
    /// Time spent waiting at gaps that have been passed, in ms.
    pub(crate) gap_waited_ms: AtomicU64,
    /// Notifications of appends the fetcher's connection holds, as its last read left them.
    pub(crate) notifications_held: AtomicU64,
}

impl FetchProgress {
    /// How long the gap the fetcher waits at has been held, if it waits at one.
    pub(crate) fn gap_held_for(&self) -> Option<Duration> {
        let since = self.gap_since_ms.load(Ordering::Relaxed);
        (since > 0).then(|| Duration::from_millis((now_millis() - since).max(0) as u64))
    }

    /// Time spent at gaps so far, the one held now included, in seconds.
    pub(crate) fn gap_wait_seconds(&self) -> f64 {
        let passed = self.gap_waited_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        passed + self.gap_held_for().map_or(0.0, |d| d.as_secs_f64())
    }

    /// After a read: held at a gap (by `pid`, 0 if unknown) or not.
    pub(crate) fn note_gap(&self, held: Option<i32>) {
        let since = self.gap_since_ms.load(Ordering::Relaxed);
        match held {
            Some(pid) => {
                if since == 0 {
                    self.gap_since_ms.store(now_millis(), Ordering::Relaxed);
                }
                self.gap_pid.store(pid, Ordering::Relaxed);
            }
            None if since > 0 => {
                let waited = (now_millis() - since).max(0) as u64;
                self.gap_waited_ms.fetch_add(waited, Ordering::Relaxed);
                self.gap_since_ms.store(0, Ordering::Relaxed);
                self.gap_pid.store(0, Ordering::Relaxed);
            }
            None => {}
        }
    }
}

/// The queue of one worker: one partition of one projection.
#[derive(Debug, Clone)]
pub(crate) struct Lane {
    pub(crate) projection: String,
    pub(crate) partition: u32,
    pub(crate) total: u32,
    pub(crate) scope: Scope,
    pub(crate) queue: Sender<Batch>,
    /// While catching up, events gathered before a batch goes out to this lane.
    pub(crate) min_batch: usize,
}

/// What the fetcher hands the router.
pub(crate) struct Chunk {
    /// Rows in position order: every wanted event up to `upto` not sent before.
    pub(crate) rows: Vec<Row>,
    /// Per lane, whether `rows` has its events; `None` when it has every lane's. A lane on the
    /// shared read always is covered (see `crate::engine::straggler`): one handed a chunk
    /// without is stepped aside, and reads its events itself.
    pub(crate) covered: Option<Vec<bool>>,
    /// Events read, of all partitions.
    pub(crate) seen: usize,
    pub(crate) upto: i64,
    /// The read filled its limit, so more rows are waiting.
    pub(crate) more_waiting: bool,
}

/// Which lanes take an event. Lanes of projections with the same partition count and scope
/// take the same events: they share one *stream* of events, built once and handed to each.
#[derive(Debug)]
pub(crate) struct Routes {
    projections: Vec<ProjectionRoutes>,
    /// The lanes of each stream.
    streams: Vec<Vec<usize>>,
    /// Per stream, the largest `min_batch` of its lanes.
    min_batch: Vec<usize>,
}

#[derive(Debug)]
struct ProjectionRoutes {
    total: u32,
    /// `None` when the projection takes every event.
    scope: Option<Scope>,
    /// Stream index by owned partition key.
    streams: HashMap<u32, usize>,
}

impl Routes {
    pub(crate) fn new(lanes: &[Lane]) -> Routes {
        let mut projections: Vec<(&str, ProjectionRoutes)> = Vec::new();
        let mut keys: Vec<(u32, u32, Option<&Scope>)> = Vec::new();
        let mut streams: Vec<Vec<usize>> = Vec::new();
        for (index, lane) in lanes.iter().enumerate() {
            let scope = (!lane.scope.is_all()).then_some(&lane.scope);
            let key = (lane.total, lane.partition, scope);
            let stream = match keys.iter().position(|k| *k == key) {
                Some(stream) => stream,
                None => {
                    keys.push(key);
                    streams.push(Vec::new());
                    streams.len() - 1
                }
            };
            streams[stream].push(index);
            let at = match projections.iter().position(|(n, _)| *n == lane.projection) {
                Some(at) => at,
                None => {
                    projections.push((
                        &lane.projection,
                        ProjectionRoutes {
                            total: lane.total,
                            scope: scope.cloned(),
                            streams: HashMap::new(),
                        },
                    ));
                    projections.len() - 1
                }
            };
            projections[at].1.streams.insert(lane.partition, stream);
        }
        let min_batch = streams
            .iter()
            .map(|lanes_of| {
                lanes_of
                    .iter()
                    .map(|&lane| lanes[lane].min_batch)
                    .max()
                    .unwrap_or(1)
            })
            .collect();
        Routes {
            projections: projections.into_iter().map(|(_, r)| r).collect(),
            streams,
            min_batch,
        }
    }

    /// The scopes of the projections, `None` for one that takes every event.
    pub(crate) fn scopes(&self) -> Vec<Option<&Scope>> {
        self.projections.iter().map(|p| p.scope.as_ref()).collect()
    }

    /// How many streams the lanes make.
    pub(crate) fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// The events a batch of `stream` gathers while catching up (see [`Lane::min_batch`]).
    pub(crate) fn min_batch(&self, stream: usize) -> usize {
        self.min_batch.get(stream).copied().unwrap_or(1)
    }

    /// The lanes (by index in the lanes the routes were made of) of `stream`.
    pub(crate) fn lanes_of(&self, stream: usize) -> &[usize] {
        self.streams.get(stream).map_or(&[], Vec::as_slice)
    }

    /// Adds `event` to every stream that takes it; `targets` is scratch space.
    pub(crate) fn route(&self, event: Event, held: &mut [Vec<Event>], targets: &mut Vec<usize>) {
        targets.clear();
        let mut partition = None;
        for projection in &self.projections {
            if projection
                .scope
                .as_ref()
                .is_some_and(|s| !s.contains(&event))
            {
                continue;
            }
            // Projections usually share a partition count: the hash is taken once for them.
            let key = match partition {
                Some((total, key)) if total == projection.total => key,
                _ => {
                    let key = partition_of(&event.aggregate_id, projection.total);
                    partition = Some((projection.total, key));
                    key
                }
            };
            if let Some(&stream) = projection.streams.get(&key) {
                if !targets.contains(&stream) {
                    targets.push(stream);
                }
            }
        }
        if let Some((&last, others)) = targets.split_last() {
            for &stream in others {
                held[stream].push(event.clone());
            }
            held[last].push(event);
        }
    }
}

/// One copy of `events` for each of `takers` lanes, shared by the workers of a stream's
/// projections; the last one gets the original reference, so that a worker alone on its stream
/// holds its batch alone (and may merge the batches queued behind it).
pub(crate) fn shared_by(
    events: Vec<Event>,
    takers: usize,
) -> impl Iterator<Item = Arc<Vec<Event>>> {
    let mut shared = Some(Arc::new(events));
    (0..takers).map(move |n| {
        let copy = if n + 1 == takers {
            shared.take()
        } else {
            shared.clone()
        };
        copy.unwrap_or_default()
    })
}

/// How often the router, waiting on a full queue, looks whether the worker has stepped aside
/// or the runner is stopping.
const STEP_ASIDE_CHECK: Duration = Duration::from_millis(10);

/// How a hand-out to one lane ended.
enum Sent {
    /// The batch is on the lane's queue.
    Taken,
    /// The lane's worker has stopped.
    Gone,
    /// The lane's worker left the shared read while it waited (it reads the batch's events
    /// itself).
    SteppedAside,
    /// The worker took no batch for `straggler_after`: it is to be left behind.
    TooSlow,
    /// The runner is stopping.
    Stopping,
}

/// The router's thread: takes chunks from the fetcher, hands out their events.
pub(crate) struct Router<'a> {
    pub(crate) lanes: &'a [Lane],
    pub(crate) routes: &'a Routes,
    pub(crate) settings: &'a Settings,
    pub(crate) stragglers: &'a Stragglers,
    pub(crate) progress: &'a Arc<FetchProgress>,
    pub(crate) stop: &'a Receiver<()>,
    /// Stops the runner once every lane has gone.
    pub(crate) stopper: &'a Stopper,
}

impl Router<'_> {
    /// Decodes and routes what the reader sends, until it stops, every lane has gone, or it
    /// is asked to stop. Returns the number of events read.
    ///
    /// While catching up (more rows are waiting), a lane's events are held until it has
    /// `min_events_per_batch` of them, so that a process owning many partitions still commits
    /// large transactions, or for `max_batch_delay` at most; once caught up, everything goes
    /// out at once.
    pub(crate) fn run(&self, reads: Receiver<Chunk>) -> u64 {
        let mut read = 0;
        let mut held: Vec<Vec<Event>> = self.routes.streams.iter().map(|_| Vec::new()).collect();
        // Since when each stream holds events.
        let mut since: Vec<Option<Instant>> = vec![None; held.len()];
        let mut alive = vec![true; self.lanes.len()];
        let mut targets = Vec::new();
        for chunk in reads {
            for row in &chunk.rows {
                self.routes
                    .route(event_from_row(row), &mut held, &mut targets);
            }
            read += chunk.seen as u64;
            drop(chunk.rows);
            for (events, since) in held.iter().zip(&mut since) {
                if !events.is_empty() && since.is_none() {
                    *since = Some(Instant::now());
                }
            }
            let stop = self.hand_out(
                &mut held,
                &since,
                &mut alive,
                (chunk.upto, chunk.covered.as_deref()),
                chunk.more_waiting,
            );
            for (events, since) in held.iter().zip(&mut since) {
                if events.is_empty() {
                    *since = None;
                }
            }
            if stop {
                if !alive.contains(&true) {
                    // Every projection has stopped: nothing is left to read for.
                    self.stopper.stop();
                }
                break;
            }
            self.progress.read.store(read, Ordering::Relaxed);
        }
        // Stragglers waiting for a read with their events have all there will be.
        self.stragglers.close();
        read
    }

    /// Sends every live lane its stream's events (possibly none) and `upto`; true when asked
    /// to stop meanwhile, or every lane has gone (each projection stopped).
    ///
    /// With `hold_small`, a stream holding fewer than its `min_batch` events keeps
    /// them (and its lanes are sent nothing, since their events up to `upto` are not all out),
    /// unless it has held them (since `since`) for [`Settings::max_batch_delay`].
    fn hand_out(
        &self,
        held: &mut [Vec<Event>],
        since: &[Option<Instant>],
        alive: &mut [bool],
        (upto, covered): (i64, Option<&[bool]>),
        hold_small: bool,
    ) -> bool {
        let mut hand_out = self.stragglers.hand_out();
        if let Some(covered) = covered {
            self.step_aside_uncovered(&mut hand_out, covered, alive, upto);
        }
        for (stream, lanes) in self.routes.streams.iter().enumerate() {
            let events = held[stream].len();
            let waited_enough =
                since[stream].is_some_and(|since| since.elapsed() >= self.settings.max_batch_delay);
            if hold_small && events > 0 && events < self.routes.min_batch[stream] && !waited_enough
            {
                continue;
            }
            // A straggler reads its own events until it catches up (see `straggler`).
            let takers: Vec<usize> = lanes
                .iter()
                .copied()
                .filter(|&index| alive[index] && !self.stragglers.is_straggler(index))
                .collect();
            let copies = shared_by(std::mem::take(&mut held[stream]), takers.len());
            for (&index, events) in takers.iter().zip(copies) {
                let lane = &self.lanes[index];
                let batch = Batch { events, upto };
                match self.send(lane, index, batch) {
                    Sent::Taken | Sent::SteppedAside => {}
                    Sent::Gone => {
                        // Its projection stopped (the worker reported why): the others go on.
                        debug!(
                            "partition {}/{} of '{}' has stopped: no more events for it",
                            lane.partition, lane.total, lane.projection
                        );
                        alive[index] = false;
                    }
                    Sent::TooSlow => {
                        hand_out.mark(index);
                        info!(
                            "partition {}/{} of '{}': its worker has not taken a batch for {} s, \
                             slower than the stream; the others go on without it, and it reads \
                             its own events until it catches up",
                            lane.partition,
                            lane.total,
                            lane.projection,
                            self.settings.straggler_after.as_secs_f64()
                        );
                    }
                    Sent::Stopping => return true,
                }
            }
        }
        hand_out.done(upto);
        !alive.contains(&true)
    }

    /// Leaves out of the shared read every live lane on it that a chunk up to `upto` does not
    /// cover (read while it was a straggler, see `crate::engine::straggler`): it reads its
    /// events itself.
    fn step_aside_uncovered(
        &self,
        hand_out: &mut HandOut<'_>,
        covered: &[bool],
        alive: &[bool],
        upto: i64,
    ) {
        if upto <= hand_out.handed_through() {
            // Nothing new in this chunk.
            return;
        }
        for (index, lane) in self.lanes.iter().enumerate() {
            let uncovered = !covered.get(index).copied().unwrap_or(true);
            if uncovered && alive[index] && !self.stragglers.is_straggler(index) {
                debug!(
                    "partition {}/{} of '{}': a read without its events reached it; it reads \
                     them itself",
                    lane.partition, lane.total, lane.projection
                );
                hand_out.mark(index);
            }
        }
    }

    /// Puts `batch` on `lane`'s queue (lane number `index`), waiting while the queue is full:
    /// until the worker takes a batch, steps aside (it will read this batch's events itself),
    /// or has not taken one for [`Settings::straggler_after`].
    fn send(&self, lane: &Lane, index: usize, mut batch: Batch) -> Sent {
        let started = Instant::now();
        loop {
            match lane.queue.send_timeout(batch, STEP_ASIDE_CHECK) {
                Ok(()) => return Sent::Taken,
                Err(SendTimeoutError::Disconnected(_)) => return Sent::Gone,
                Err(SendTimeoutError::Timeout(back)) => batch = back,
            }
            if stop_asked(self.stop) {
                return Sent::Stopping;
            }
            if self.stragglers.is_straggler(index) {
                return Sent::SteppedAside;
            }
            if started.elapsed() >= self.settings.straggler_after {
                return Sent::TooSlow;
            }
        }
    }
}
