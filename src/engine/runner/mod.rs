//! A running group of projections: its threads, stopping them, and what they did.

mod handle;

pub use handle::{ProjectionSummary, Runner, Summary};

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use log::error;
use postgres::Client;
use prometheus::HistogramVec;

use crate::engine::balancer::Balancer;
use crate::engine::catch_up_read::CatchUpRead;
use crate::engine::fetcher::Fetcher;
use crate::engine::lane::{CommitTimers, LaneProgress, Progress};
use crate::engine::notice::{ProjectionEnd, ProjectionStopped, states_at_start};
use crate::engine::outage::{Attempts, Outage};
use crate::engine::plan::Prepared;
use crate::engine::progress::Monitor;
use crate::engine::router::{FetchProgress, Lane};
use crate::engine::settings::{Settings, Stopper};
use crate::engine::straggler::Stragglers;
use crate::engine::worker::ownership::Role;
use crate::engine::worker::parking::{Parking, StormBreaker};
use crate::engine::worker::pause::PauseWatch;
use crate::engine::worker::retry::Held;
use crate::engine::worker::{PartitionSummary, Worker};
use crate::projections::projection::{Context, Projection};
use crate::store::database::Pool;
use crate::store::replica::{Replica, ReplicaFigures};
use crate::{Database, Error, error_chain};

/// What the threads of a runner share, before they are spawned.
pub(crate) struct Threads {
    database: Database,
    pool: Pool,
    settings: Arc<Settings>,
    prepared: Vec<Prepared>,
    start: i64,
    head: i64,
    /// One per projection: stops its workers only.
    projection_stops: Vec<(Stopper, Receiver<()>)>,
    /// Stops everything (and every projection's stopper).
    stopper: Stopper,
    stop: Receiver<()>,
    outage: Arc<Outage>,
    stragglers: Arc<Stragglers>,
    /// Projections that have failed: once all have, the runner stops.
    stopped_projections: Arc<AtomicUsize>,
    /// The schema stores projection states (failed, paused).
    stores_states: bool,
    /// Where each projection's end is told.
    notices: Sender<ProjectionStopped>,
    /// A streaming replica the fetcher reads from far from the head.
    read_replica: Option<Database>,
    /// Per lane: its checkpoint, when it starts behind the shared read and is to be held.
    starts_behind: Vec<Option<i64>>,
}

impl Threads {
    pub(crate) fn start(
        database: Database,
        pool: Pool,
        settings: Arc<Settings>,
        prepared: Vec<Prepared>,
        start: i64,
        head: i64,
    ) -> Result<Threads, Error> {
        let projection_stops: Vec<(Stopper, Receiver<()>)> =
            prepared.iter().map(|_| Stopper::new()).collect();
        let (stopper, stop) =
            Stopper::over(projection_stops.iter().map(|(s, _)| s.clone()).collect());
        // Per lane: off the shared read at start (behind it, or not this process's to hold),
        // and its checkpoint when it is behind and to be held (fed by the catch-up read).
        let (behind, starts_behind): (Vec<bool>, Vec<Option<i64>>) = prepared
            .iter()
            .flat_map(|p| p.checkpoints.iter().zip(&p.wanted))
            .map(|(&c, &wanted)| (c < start || !wanted, (c < start && wanted).then_some(c)))
            .unzip();
        Ok(Threads {
            database,
            pool,
            settings,
            prepared,
            start,
            head,
            projection_stops,
            stopper,
            stop,
            outage: Arc::new(Outage::default()),
            stragglers: Arc::new(Stragglers::new(&behind, start)),
            stopped_projections: Arc::new(AtomicUsize::new(0)),
            // Both set by `spawn`, which reads the schema first.
            stores_states: false,
            notices: unbounded().0,
            read_replica: None,
            starts_behind,
        })
    }

    /// Reads far from the head from `replica` (its tables in the database's schema).
    pub(crate) fn read_replica(mut self, replica: Option<Database>) -> Result<Threads, Error> {
        self.read_replica = match replica {
            Some(replica) => Some(replica.schema(self.database.schema_name())?),
            None => None,
        };
        Ok(self)
    }

    /// Spawns every projection's workers, the fetcher (reading through `reader`) and the
    /// progress monitor.
    pub(crate) fn spawn(
        mut self,
        mut reader: Client,
        balancer: Option<Balancer>,
    ) -> Result<Runner, Error> {
        let started = Instant::now();
        let starting = self
            .prepared
            .iter()
            .map(|p| (p.name.as_str(), p.plan.keys.as_slice(), p.plan.total));
        self.stores_states = states_at_start(&mut reader, &self.database, starting)?;
        let (notices, stopped) = unbounded();
        self.notices = notices;
        let (done_tx, done) = bounded::<()>(0);
        let mut lanes = Vec::new();
        let mut progress = Vec::new();
        let mut projections = Vec::new();
        let timers = CommitTimers::new()?;
        // Sharing processes hand partitions to and fro: their stragglers read by themselves.
        if balancer.is_none() {
            self.mark_the_lanes_behind_fed();
        }
        for (index, prepared) in std::mem::take(&mut self.prepared).into_iter().enumerate() {
            let sinks = Sinks {
                lanes: &mut lanes,
                progress: &mut progress,
                timers: &timers,
                done: &done_tx,
            };
            projections.push(self.spawn_workers(index, prepared, sinks)?);
        }
        let fetch_progress = Arc::new(FetchProgress::default());
        fetch_progress.position.store(self.start, Ordering::Relaxed);
        fetch_progress.running.store(true, Ordering::Release);
        let replica_figures = Arc::new(ReplicaFigures::default());
        let figures = Figures {
            database: self.database.clone(),
            replica: self
                .read_replica
                .is_some()
                .then(|| Arc::clone(&replica_figures)),
            lanes: progress.clone(),
            fetch: Arc::clone(&fetch_progress),
            commit_seconds: timers.0,
            rebalances: balancer
                .as_ref()
                .map_or_else(Arc::default, |b| Arc::clone(&b.rebalances)),
        };
        let catch_up = match balancer {
            None => self.feed_the_lanes_behind(&lanes)?,
            Some(_) => None,
        };
        let fetcher = Fetcher {
            database: self.database.clone(),
            settings: Arc::clone(&self.settings),
            lanes,
            start: self.start,
            target: self.head,
            stop: self.stop.clone(),
            progress: Arc::clone(&fetch_progress),
            outage: Arc::clone(&self.outage),
            stragglers: Arc::clone(&self.stragglers),
            stopper: self.stopper.clone(),
            replica: self
                .read_replica
                .take()
                .map(|replica| Replica::new(self.database.clone(), replica, replica_figures)),
        };
        let fetcher_done = done_tx.clone();
        let fetcher_stopper = self.stopper.clone();
        let fetching = FetcherEnds(Arc::clone(&fetch_progress));
        let fetcher = spawn("projector-fetch".into(), move || {
            // Says the fetcher has ended however it ends (a panic included), for liveness.
            let _ends = fetching;
            let result = stop_all_on_panic(&fetcher_stopper, || fetcher.run(reader));
            if result.is_err() {
                // The workers would otherwise wait for events that no longer come.
                fetcher_stopper.stop();
            }
            drop(fetcher_done);
            result
        })?;
        drop(done_tx);
        let balancer = match balancer {
            Some(mut balancer) => {
                balancer.watch(&progress);
                let stop = self.stop.clone();
                Some(spawn("projector-balance".into(), move || {
                    balancer.run(&stop);
                    Ok(())
                })?)
            }
            None => None,
        };
        let monitor = Monitor {
            database: self.database,
            progress,
            fetch_progress,
            interval: self.settings.progress_interval,
            stop: self.stop,
            done,
        };
        let monitor = spawn("projector-progress".into(), move || {
            monitor.run();
            Ok(())
        })?;
        Ok(Runner {
            stopper: self.stopper,
            fetcher: Some(fetcher),
            projections,
            monitor: Some(monitor),
            balancer,
            catch_up,
            started,
            figures,
            metrics: OnceLock::new(),
            stopped,
        })
    }

    /// Marks the lanes that start behind the shared read as fed, before their workers start
    /// (which would otherwise begin reading by themselves).
    fn mark_the_lanes_behind_fed(&self) {
        for (index, behind) in self.starts_behind.iter().enumerate() {
            if behind.is_some() {
                self.stragglers.start_feeding(index);
            }
        }
    }

    /// Spawns the read for the lanes that start behind the shared read, if any (see
    /// `crate::engine::catch_up_read`); they were marked fed.
    fn feed_the_lanes_behind(
        &self,
        lanes: &[Lane],
    ) -> Result<Option<JoinHandle<Result<(), Error>>>, Error> {
        let behind: Vec<(usize, i64)> = self
            .starts_behind
            .iter()
            .enumerate()
            .filter_map(|(index, checkpoint)| checkpoint.map(|c| (index, c)))
            .filter(|&(index, _)| index < lanes.len())
            .collect();
        let Some(from) = behind.iter().map(|&(_, c)| c).min() else {
            return Ok(None);
        };
        let read = CatchUpRead {
            database: self.database.clone(),
            settings: Arc::clone(&self.settings),
            lanes: behind
                .iter()
                .map(|&(index, _)| lanes[index].clone())
                .collect(),
            indexes: behind.iter().map(|&(index, _)| index).collect(),
            checkpoints: behind.iter().map(|&(_, checkpoint)| checkpoint).collect(),
            from,
            stragglers: Arc::clone(&self.stragglers),
            stop: self.stop.clone(),
        };
        let stopper = self.stopper.clone();
        let handle = spawn("projector-behind".into(), move || {
            stop_all_on_panic(&stopper, || read.run());
            Ok(())
        });
        if handle.is_err() {
            for &(index, _) in &behind {
                self.stragglers.stop_feeding(index);
            }
        }
        handle.map(Some)
    }

    /// Spawns one worker per owned partition of projection number `index`, adding their lanes
    /// and progress figures.
    fn spawn_workers(
        &self,
        index: usize,
        prepared: Prepared,
        sinks: Sinks<'_>,
    ) -> Result<RunningProjection, Error> {
        let Sinks {
            lanes,
            progress,
            timers,
            done,
        } = sinks;
        let Prepared {
            plan,
            name,
            layout,
            checkpoints,
            wanted,
        } = prepared;
        let (projection_stopper, projection_stop) = self.projection_stops[index].clone();
        let several = self.projection_stops.len() > 1;
        let failed = Arc::new(AtomicBool::new(false));
        let scope = plan.projection.scope();
        let breaker = Arc::new(StormBreaker::new(&self.settings));
        let pause = Arc::new(PauseWatch::new(&name, self.stores_states));
        let end = Arc::new(ProjectionEnd::new(
            &name,
            plan.keys.len(),
            &self.database,
            self.stores_states,
            &self.notices,
        ));
        let mut workers = Vec::new();
        for ((&partition, &checkpoint), &wanted) in plan.keys.iter().zip(&checkpoints).zip(&wanted)
        {
            let (queue, batches) = bounded(self.settings.queue_depth.max(1));
            lanes.push(Lane {
                projection: name.clone(),
                partition,
                total: plan.total,
                scope: scope.clone(),
                queue,
                // A projection asking for larger transactions gets larger batches to fill them.
                min_batch: plan
                    .projection
                    .events_per_transaction()
                    .map_or(self.settings.min_events_per_batch, |size| {
                        (size / 5).max(self.settings.min_events_per_batch)
                    }),
            });
            let shared = Arc::new(Progress::new(
                checkpoint,
                timers.for_lane(&name, partition, plan.total),
                wanted,
            ));
            progress.push(LaneProgress {
                projection: name.clone(),
                partition,
                total: plan.total,
                progress: Arc::clone(&shared),
            });
            let worker = Worker {
                projection: plan.projection.clone(),
                context: Context::new(partition, plan.total, plan.projection.version()),
                settings: Arc::clone(&self.settings),
                pool: self.pool.clone(),
                batches,
                stop: projection_stop.clone(),
                stopper: projection_stopper.clone(),
                progress: shared,
                generation: layout.generation,
                earlier: layout.earlier.clone(),
                role: Role::default(),
                outage: Arc::clone(&self.outage),
                attempts: Attempts::default(),
                thread: format!("partition {partition}/{} of '{name}'", plan.total),
                stragglers: Arc::clone(&self.stragglers),
                lane: lanes.len() - 1,
                scope: scope.clone(),
                parking: Parking::new(plan.policy, Arc::clone(&breaker)),
                held: Held::default(),
                checkpoint_lock_failures: 0,
                pause: Arc::clone(&pause),
                must_sit_out: false,
            };
            let done = done.clone();
            let everything = self.stopper.clone();
            let (failed, name) = (Arc::clone(&failed), name.clone());
            let stopped = Arc::clone(&self.stopped_projections);
            let count = self.projection_stops.len();
            let end = Arc::clone(&end);
            let shared = plan.shared;
            let handle = spawn(format!("projector-p{partition}"), move || {
                let ending = end.worker_starts();
                let result = stop_all_on_panic(&everything, || worker.run());
                if shared && result.as_ref().is_err_and(Error::is_layout_replaced) {
                    // Sharing processes follow a new layout: the runner stops for its caller
                    // to start again on it (see `Runner::join`).
                    everything.stop();
                }
                if let Err(error) = &result {
                    if !failed.swap(true, Ordering::AcqRel) {
                        // The first failure of this projection (its other workers stop too).
                        if stopped.fetch_add(1, Ordering::AcqRel) + 1 == count {
                            // Every projection has stopped: nothing is left to run.
                            everything.stop();
                        } else if several {
                            error!(
                                "projection '{name}' stopped: {}; the process goes on with its \
                                 other projections",
                                error_chain(error)
                            );
                        }
                    }
                }
                ending.ended(&result);
                drop(done);
                result
            })?;
            workers.push((partition, handle));
        }
        Ok(RunningProjection {
            name,
            total_partitions: plan.total,
            workers,
        })
    }
}

/// Runs `body`; if it panics (outside a projection, whose panics are caught and reported),
/// stops every thread of the runner before the panic goes on to `join`.
pub(crate) fn stop_all_on_panic<T>(stopper: &Stopper, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(panic) => {
            stopper.stop();
            resume_unwind(panic)
        }
    }
}

pub(crate) fn spawn<T: Send + 'static>(
    name: String,
    body: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<JoinHandle<Result<T, Error>>, Error> {
    thread::Builder::new()
        .name(name.clone())
        .spawn(body)
        .map_err(|_| Error::ThreadPanicked { thread: name })
}

/// Marks the fetcher as ended when dropped.
struct FetcherEnds(Arc<FetchProgress>);

impl Drop for FetcherEnds {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
    }
}

/// Where spawning a projection's workers adds their lanes, figures and end signals.
struct Sinks<'a> {
    lanes: &'a mut Vec<Lane>,
    progress: &'a mut Vec<LaneProgress>,
    timers: &'a CommitTimers,
    done: &'a Sender<()>,
}

/// The workers of one projection of a runner.
#[derive(Debug)]
pub(crate) struct RunningProjection {
    pub(crate) name: String,
    pub(crate) total_partitions: u32,
    pub(crate) workers: Vec<(u32, JoinHandle<Result<PartitionSummary, Error>>)>,
}

/// What a running group of projections shows of itself: each lane's figures, the fetcher's, the
/// commit-duration histograms, and the database to ask for the head of the stream. The runner
/// makes it; [`crate::ops`] reads it for metrics and health.
#[derive(Clone)]
pub(crate) struct Figures {
    pub(crate) database: Database,
    pub(crate) lanes: Vec<LaneProgress>,
    pub(crate) fetch: Arc<FetchProgress>,
    pub(crate) commit_seconds: HistogramVec,
    /// Sharing partitions: how often the partitions this process wants changed.
    pub(crate) rebalances: Arc<AtomicU64>,
    /// With a read replica: what it served.
    pub(crate) replica: Option<Arc<ReplicaFigures>>,
}

impl std::fmt::Debug for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Figures")
            .field("lanes", &self.lanes.len())
            .finish_non_exhaustive()
    }
}
