//! Starting, watching and stopping a projection's fetcher and workers.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use log::info;

use crate::database::Pool;
use crate::fetcher::{FetchProgress, Fetcher};
use crate::outage::{Attempts, Outage};
use crate::ownership::Role;
use crate::partition::{MAX_PARTITIONS, describe_keys};
use crate::progress::Monitor;
use crate::projection::{Context, Projection};
use crate::settings::{Settings, Stopper};
use crate::store;
use crate::straggler::Stragglers;
use crate::worker::{PartitionSummary, Progress, Worker};
use crate::{Database, Error};
use crate::{checkpoint, layout};

/// The most events one read of the stream may hold, so that memory stays bounded.
pub const MAX_BATCH_SIZE: u32 = 100_000;

/// Configures and starts a [`Runner`].
///
/// ```no_run
/// # use projector::{Builder, Database, projections::AggregateStats};
/// # fn main() -> Result<(), projector::Error> {
/// let database = Database::new("postgres://app@localhost/app")?;
/// let runner = Builder::new(database, AggregateStats)
///     .partitions([0, 1, 2, 3])
///     .total_partitions(4)
///     .start()?;
/// // ... later, from anywhere:
/// runner.shutdown();
/// let summary = runner.join()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Builder<P> {
    database: Database,
    projection: P,
    partitions: Vec<u32>,
    total_partitions: u32,
    pool: Option<Pool>,
    settings: Settings,
}

impl<P: Projection> Builder<P> {
    /// A runner of `projection` over `database`, owning partition 0 of 1 until told otherwise.
    pub fn new(database: Database, projection: P) -> Builder<P> {
        Builder {
            database,
            projection,
            partitions: vec![0],
            total_partitions: 1,
            pool: None,
            settings: Settings::default(),
        }
    }

    /// The partition keys this process owns, each below [`total_partitions`](Self::total_partitions).
    pub fn partitions(mut self, keys: impl IntoIterator<Item = u32>) -> Self {
        self.partitions = keys.into_iter().collect();
        self
    }

    /// How many partitions the stream is split into, across all processes.
    pub fn total_partitions(mut self, total: u32) -> Self {
        self.total_partitions = total;
        self
    }

    /// The pool workers take their connections from (one per owned partition). Default: a pool
    /// made from the database, sized to the number of owned partitions plus one.
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Events read per query.
    pub fn batch_size(mut self, batch_size: u32) -> Self {
        self.settings.batch_size = batch_size;
        self
    }

    /// How long to wait before reading again once caught up.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.settings.poll_interval = interval;
        self
    }

    /// How long to keep trying to reach a lost database before stopping with
    /// [`Error::Unavailable`]; see [`Settings::give_up_after`].
    pub fn give_up_after(mut self, limit: Duration) -> Self {
        self.settings.give_up_after = limit;
        self
    }

    /// Stop once caught up with the head of the stream as it is at start.
    pub fn exit_when_caught_up(mut self, exit: bool) -> Self {
        self.settings.exit_when_caught_up = exit;
        self
    }

    /// Replaces every setting at once.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Checks the settings and the database, then starts the fetcher and one worker per owned
    /// partition.
    ///
    /// Fails before starting any thread when a setting is out of range, the database cannot be
    /// reached, the tables are missing, or the projection's checkpoints were written under
    /// another partition count (change it with [`repartition`](crate::repartition) first).
    pub fn start(self) -> Result<Runner, Error> {
        self.check()?;
        let Builder {
            database,
            mut projection,
            mut partitions,
            total_partitions: total,
            pool,
            settings,
        } = self;
        partitions.sort_unstable();
        partitions.dedup();
        let name = projection.name().to_owned();
        let pool = pool.unwrap_or_else(|| database.pool(partitions.len() as u32 + 1));
        if (pool.max_size() as usize) < partitions.len() {
            // Each worker keeps its connection (it holds the partition's lock): with fewer, the
            // workers left without one would wait for ever.
            return Err(Error::invalid_setting(
                "the connection pool's size",
                pool.max_size(),
                format!(
                    "each owned partition's worker keeps one connection: give a pool of at least \
                     {} connection(s), or own fewer partitions in this process",
                    partitions.len()
                ),
            ));
        }

        let mut reader = database.connect()?;
        store::check_server_version(&mut reader)?;
        store::check_tables(&mut reader, database.schema_name())?;
        store::check_event_columns(&mut reader, database.schema_name())?;
        store::check_sequence(&mut reader)?;
        let layout = layout::claim_layout(&mut reader, &name, total, false)?;
        {
            let mut tx = reader
                .transaction()
                .map_err(Error::database("starting the projection's setup"))?;
            // Processes starting together must not race to create the same read-model tables.
            tx.execute("SET LOCAL client_min_messages = warning", &[])
                .and_then(|_| {
                    tx.execute(
                        "SELECT pg_advisory_xact_lock(hashtext('projector setup ' || $1))",
                        &[&name],
                    )
                })
                .map_err(Error::database("waiting for other processes' setup"))?;
            projection
                .setup(&mut tx)
                .map_err(|source| Error::Projection {
                    projection: name.clone(),
                    partition: partitions[0],
                    total,
                    position: 0,
                    aggregate_id: String::new(),
                    event_type: "(setup)".into(),
                    attempts: 1,
                    source,
                })?;
            tx.commit()
                .map_err(Error::database("committing the projection's setup"))?;
        }
        let checkpoints = checkpoint::load(&mut reader, &name, total, &partitions)?;
        let start = checkpoints.iter().copied().min().unwrap_or(0);
        let head = store::head_position(&mut reader)?;
        info!(
            "projection '{name}': partitions {} of {total}, batch size {}, database {}, \
             reading from global position {start}, head at {head}",
            describe_keys(&partitions),
            settings.batch_size,
            database,
        );
        if let Some(end) = layout
            .earlier
            .iter()
            .map(layout::EarlierLayout::applied_at_most)
            .max()
        {
            let totals: Vec<String> = layout
                .earlier
                .iter()
                .map(|l| l.total_partitions.to_string())
                .collect();
            info!(
                "projection '{name}': re-partitioning in progress: events applied under the \
                 earlier layout(s) of {} partition(s) are skipped, up to global position {end}",
                totals.join(" and ")
            );
        }

        let settings = Arc::new(settings);
        // Every thread watches `stop`; a thread that fails stops the others through `stopper`.
        let (stopper, stop) = Stopper::new();
        let outage = Arc::new(Outage::default());
        let stragglers = Arc::new(Stragglers::new(&partitions, start));
        let (done_tx, done) = bounded::<()>(0);
        let started = Instant::now();

        let mut workers = Vec::new();
        let mut senders = HashMap::new();
        let mut progress = Vec::new();
        for (&partition, &checkpoint) in partitions.iter().zip(&checkpoints) {
            let (batches_tx, batches) = bounded(settings.queue_depth.max(1));
            senders.insert(partition, batches_tx);
            let shared = Arc::new(Progress::default());
            shared.checkpoint.store(checkpoint, Ordering::Relaxed);
            progress.push((partition, Arc::clone(&shared)));
            let worker = Worker {
                projection: projection.clone(),
                context: Context {
                    partition,
                    total_partitions: total,
                },
                settings: Arc::clone(&settings),
                pool: pool.clone(),
                batches,
                stop: stop.clone(),
                stopper: stopper.clone(),
                progress: shared,
                generation: layout.generation,
                earlier: layout.earlier.clone(),
                role: Role::default(),
                outage: Arc::clone(&outage),
                attempts: Attempts::default(),
                thread: format!("partition {partition}/{total}"),
                stragglers: Arc::clone(&stragglers),
            };
            let done_tx = done_tx.clone();
            let worker_stopper = stopper.clone();
            let handle = spawn(format!("projector-p{partition}"), move || {
                let result = stop_all_on_panic(&worker_stopper, || worker.run());
                drop(done_tx);
                result
            })?;
            workers.push((partition, handle));
        }

        let fetch_progress = Arc::new(FetchProgress::default());
        fetch_progress.position.store(start, Ordering::Relaxed);
        let fetcher = Fetcher {
            database: database.clone(),
            settings: Arc::clone(&settings),
            total,
            workers: senders,
            start,
            target: head,
            stop: stop.clone(),
            progress: Arc::clone(&fetch_progress),
            outage,
            stragglers,
            stopper: stopper.clone(),
        };
        let fetcher_done = done_tx.clone();
        let fetcher_stopper = stopper.clone();
        let fetcher = spawn("projector-fetch".into(), move || {
            let result = stop_all_on_panic(&fetcher_stopper, || fetcher.run(reader));
            if result.is_err() {
                // The workers would otherwise wait for events that no longer come.
                fetcher_stopper.stop();
            }
            drop(fetcher_done);
            result
        })?;
        drop(done_tx);

        let monitor = Monitor {
            database,
            progress,
            fetch_progress,
            interval: settings.progress_interval,
            stop: stop.clone(),
            done,
        };
        let monitor = spawn("projector-progress".into(), move || {
            monitor.run();
            Ok(())
        })?;

        Ok(Runner {
            projection: name,
            total_partitions: total,
            stopper,
            fetcher: Some(fetcher),
            workers,
            monitor: Some(monitor),
            started,
        })
    }

    fn check(&self) -> Result<(), Error> {
        let total = self.total_partitions;
        if total == 0 || total > MAX_PARTITIONS {
            return Err(Error::invalid_setting(
                "--total-partitions",
                total,
                format!("the number of partitions must be from 1 to {MAX_PARTITIONS}"),
            ));
        }
        if self.partitions.is_empty() {
            return Err(Error::invalid_setting(
                "--partition-key",
                "",
                "at least one partition key is needed",
            ));
        }
        if let Some(&key) = self.partitions.iter().find(|&&key| key >= total) {
            return Err(Error::invalid_setting(
                "--partition-key",
                key,
                format!(
                    "partition keys go from 0 to {} with --total-partitions {total}",
                    total - 1
                ),
            ));
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.settings.batch_size) {
            return Err(Error::invalid_setting(
                "--batch-size",
                self.settings.batch_size,
                format!(
                    "from 1 to {MAX_BATCH_SIZE} events per read: a read is held in memory whole"
                ),
            ));
        }
        if self.projection.name().is_empty() {
            return Err(Error::invalid_setting(
                "--projection",
                "",
                "a projection needs a name",
            ));
        }
        Ok(())
    }
}

/// Runs `body`; if it panics (outside a projection, whose panics are caught and reported),
/// stops every thread of the runner before the panic goes on to `join`.
fn stop_all_on_panic<T>(stopper: &Stopper, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(panic) => {
            stopper.stop();
            resume_unwind(panic)
        }
    }
}

fn spawn<T: Send + 'static>(
    name: String,
    body: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<JoinHandle<Result<T, Error>>, Error> {
    thread::Builder::new()
        .name(name.clone())
        .spawn(body)
        .map_err(|_| Error::ThreadPanicked { thread: name })
}

/// A running projection: a fetcher thread and one worker thread per owned partition.
///
/// Dropping it asks the threads to stop without waiting for them; call
/// [`join`](Runner::join) to wait and get the figures.
#[derive(Debug)]
pub struct Runner {
    projection: String,
    total_partitions: u32,
    stopper: Stopper,
    fetcher: Option<JoinHandle<Result<u64, Error>>>,
    workers: Vec<(u32, JoinHandle<Result<PartitionSummary, Error>>)>,
    monitor: Option<JoinHandle<Result<(), Error>>>,
    started: Instant,
}

/// What a runner did, from [`Runner::join`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Summary {
    /// The projection's name.
    pub projection: String,
    /// The number of partitions.
    pub total_partitions: u32,
    /// Events the fetcher read (of all partitions).
    pub events_read: u64,
    /// Per owned partition, in key order.
    pub partitions: Vec<PartitionSummary>,
    /// From start to the last thread's end.
    pub elapsed: Duration,
}

impl Summary {
    /// Events applied, all partitions together.
    pub fn applied(&self) -> u64 {
        self.partitions.iter().map(|p| p.applied).sum()
    }
}

impl Runner {
    /// Asks the runner to stop; see [`Stopper::stop`].
    pub fn shutdown(&self) {
        self.stopper.stop();
    }

    /// A handle that stops this runner from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Waits for every thread to end. Returns the figures, or the first error a thread met
    /// (a worker's error before the fetcher's).
    pub fn join(mut self) -> Result<Summary, Error> {
        let mut first_error = None;
        let mut partitions = Vec::new();
        for (partition, handle) in std::mem::take(&mut self.workers) {
            match join(handle, &format!("projector-p{partition}")) {
                Ok(summary) => partitions.push(summary),
                Err(error) => {
                    self.stopper.stop();
                    first_error.get_or_insert(error);
                }
            }
        }
        let events_read = match self.fetcher.take().map(|h| join(h, "projector-fetch")) {
            Some(Ok(read)) => read,
            Some(Err(error)) => {
                first_error.get_or_insert(error);
                0
            }
            None => 0,
        };
        self.stopper.stop();
        if let Some(monitor) = self.monitor.take() {
            let _ = join(monitor, "projector-progress");
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(Summary {
                projection: self.projection.clone(),
                total_partitions: self.total_partitions,
                events_read,
                partitions,
                elapsed: self.started.elapsed(),
            }),
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stopper.stop();
    }
}

fn join<T>(handle: JoinHandle<Result<T, Error>>, name: &str) -> Result<T, Error> {
    handle.join().unwrap_or_else(|_| {
        Err(Error::ThreadPanicked {
            thread: name.to_owned(),
        })
    })
}
