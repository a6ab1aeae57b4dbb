//! The router: decodes what the fetcher read and hands each projection's partitions their
//! events, one queue (a *lane*) per worker.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, info};
use postgres::Row;

use crate::event::{Event, Scope};
use crate::partition::partition_of;
use crate::settings::{Settings, Stopper};
use crate::store::event_from_row;
use crate::straggler::Stragglers;
use crate::worker::Batch;

/// Figures the fetcher and router share while they run, for progress lines.
#[derive(Debug, Default)]
pub(crate) struct FetchProgress {
    /// Events read, of all partitions.
    pub(crate) read: AtomicU64,
    /// The stream is read up to here.
    pub(crate) position: AtomicI64,
}

/// The queue of one worker: one partition of one projection.
#[derive(Debug)]
pub(crate) struct Lane {
    pub(crate) projection: String,
    pub(crate) partition: u32,
    pub(crate) total: u32,
    pub(crate) scope: Scope,
    pub(crate) queue: Sender<Batch>,
}

/// What the fetcher hands the router.
pub(crate) struct Chunk {
    /// Rows in position order: every wanted event up to `upto` not sent before.
    pub(crate) rows: Vec<Row>,
    /// Events read, of all partitions.
    pub(crate) seen: usize,
    pub(crate) upto: i64,
    /// The read filled its limit, so more rows are waiting.
    pub(crate) more_waiting: bool,
}

/// Which lane takes an event, per projection.
#[derive(Debug)]
pub(crate) struct Routes {
    projections: Vec<ProjectionRoutes>,
}

#[derive(Debug)]
struct ProjectionRoutes {
    total: u32,
    /// `None` when the projection takes every event.
    scope: Option<Scope>,
    /// Lane index by owned partition key.
    lanes: HashMap<u32, usize>,
}

impl Routes {
    pub(crate) fn new(lanes: &[Lane]) -> Routes {
        let mut projections: Vec<(&str, ProjectionRoutes)> = Vec::new();
        for (index, lane) in lanes.iter().enumerate() {
            let position = match projections.iter().position(|(n, _)| *n == lane.projection) {
                Some(position) => position,
                None => {
                    projections.push((
                        &lane.projection,
                        ProjectionRoutes {
                            total: lane.total,
                            scope: (!lane.scope.is_all()).then(|| lane.scope.clone()),
                            lanes: HashMap::new(),
                        },
                    ));
                    projections.len() - 1
                }
            };
            projections[position].1.lanes.insert(lane.partition, index);
        }
        Routes {
            projections: projections.into_iter().map(|(_, r)| r).collect(),
        }
    }

    /// The scopes of the projections, `None` for one that takes every event.
    pub(crate) fn scopes(&self) -> Vec<Option<&Scope>> {
        self.projections.iter().map(|p| p.scope.as_ref()).collect()
    }

    /// True when every projection owns at most half of its partitions here: reading positions
    /// and aggregate ids first, then only the wanted rows, sends the server less.
    pub(crate) fn owns_at_most_half(&self) -> bool {
        self.projections
            .iter()
            .all(|p| p.lanes.len() * 2 <= p.total as usize)
    }

    /// True when some owned partition takes events of `aggregate_id` (whatever their type).
    pub(crate) fn wants_aggregate(&self, aggregate_id: &str) -> bool {
        self.projections
            .iter()
            .any(|p| p.lanes.contains_key(&partition_of(aggregate_id, p.total)))
    }

    /// Adds `event` to the held events of every live lane that takes it.
    fn route(&self, event: Event, held: &mut [Vec<Event>], alive: &[bool]) {
        let mut last: Option<usize> = None;
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
            if let Some(&lane) = projection.lanes.get(&key).filter(|&&l| alive[l]) {
                if let Some(previous) = last.replace(lane) {
                    held[previous].push(event.clone());
                }
            }
        }
        if let Some(lane) = last {
            held[lane].push(event);
        }
    }
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
    /// large transactions; once caught up, everything goes out at once.
    pub(crate) fn run(&self, reads: Receiver<Chunk>) -> u64 {
        let mut read = 0;
        let mut held: Vec<Vec<Event>> = self.lanes.iter().map(|_| Vec::new()).collect();
        let mut alive = vec![true; self.lanes.len()];
        for chunk in reads {
            for row in &chunk.rows {
                self.routes.route(event_from_row(row), &mut held, &alive);
            }
            read += chunk.seen as u64;
            drop(chunk.rows);
            if self.hand_out(&mut held, &mut alive, chunk.upto, chunk.more_waiting) {
                if !alive.contains(&true) {
                    // Every projection has stopped: nothing is left to read for.
                    self.stopper.stop();
                }
                break;
            }
            self.progress.read.store(read, Ordering::Relaxed);
        }
        read
    }

    /// Sends every live lane its events (possibly none) and `upto`; true when asked to stop
    /// meanwhile, or every lane has gone (each projection stopped).
    ///
    /// With `hold_small`, a lane holding fewer than `min_events_per_batch` events keeps them
    /// (and is sent nothing, since its events up to `upto` are not all out yet).
    fn hand_out(
        &self,
        held: &mut [Vec<Event>],
        alive: &mut [bool],
        upto: i64,
        hold_small: bool,
    ) -> bool {
        let mut hand_out = self.stragglers.hand_out();
        for (index, lane) in self.lanes.iter().enumerate() {
            if !alive[index] {
                continue;
            }
            if self.stragglers.is_straggler(index) {
                // It reads its own events until it catches up (see `straggler`).
                held[index].clear();
                continue;
            }
            let events = held[index].len();
            if hold_small && events > 0 && events < self.settings.min_events_per_batch {
                continue;
            }
            let batch = Batch {
                events: std::mem::take(&mut held[index]),
                upto,
            };
            select! {
                send(lane.queue, batch) -> sent => if sent.is_err() {
                    // Its projection stopped (the worker reported why): the others go on.
                    debug!(
                        "partition {}/{} of '{}' has stopped: no more events for it",
                        lane.partition, lane.total, lane.projection
                    );
                    alive[index] = false;
                },
                recv(self.stop) -> _ => return true,
                default(self.settings.straggler_after) => {
                    hand_out.mark(index);
                    info!(
                        "partition {}/{} of '{}': its worker has not taken a batch for {} s, \
                         slower than the stream; the others go on without it, and it reads its \
                         own events until it catches up",
                        lane.partition,
                        lane.total,
                        lane.projection,
                        self.settings.straggler_after.as_secs_f64()
                    );
                }
            }
        }
        hand_out.done(upto);
        !alive.contains(&true)
    }
}
