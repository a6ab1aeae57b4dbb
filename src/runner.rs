//! Starting, watching and stopping a projection's fetcher and workers.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, select, tick, unbounded};
use log::info;

use crate::checkpoint;
use crate::database::Pool;
use crate::fetcher::{FetchProgress, Fetcher};
use crate::partition::{MAX_PARTITIONS, describe_keys};
use crate::projection::{Context, Projection};
use crate::store;
use crate::worker::{PartitionSummary, Progress, Role, Worker};
use crate::{Database, Error};

/// The runtime's settings. [`Settings::default`] holds every default in one place.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settings {
    /// Events read from the store per query. Default 5,000.
    pub batch_size: u32,
    /// How long the fetcher waits before reading again once it has caught up, when no append
    /// notifies it sooner; also how often a gap is looked at again. Default 100 ms.
    pub poll_interval: Duration,
    /// The longest wait between polls: while nothing arrives, the wait doubles from
    /// `poll_interval` up to this. Default 1 s.
    pub max_poll_interval: Duration,
    /// How long a missing position may hold the fetcher back before it logs a warning naming
    /// the transactions that may still commit it (repeated at this interval). Default 10 s.
    pub gap_warn_after: Duration,
    /// While catching up, events of a partition are gathered until it has this many before
    /// they are sent to its worker, so that owning many partitions still makes large
    /// transactions. Once caught up, events go out at once. Default 1,000.
    pub min_events_per_batch: usize,
    /// Batches queued per worker before the fetcher waits (back-pressure). Default 2.
    pub queue_depth: usize,
    /// Most events a worker applies in one transaction: batches queued behind the one it takes
    /// are applied with it, up to this many. Default 5,000.
    pub max_events_per_transaction: usize,
    /// How often a worker that receives no events still moves its checkpoint forward.
    /// Default 1 s.
    pub idle_checkpoint_interval: Duration,
    /// How often a progress line is logged while there is work. Default 5 s.
    pub progress_interval: Duration,
    /// Attempts at a batch whose projection fails before the runner stops. Default 3.
    pub max_attempts: u32,
    /// First delay before a retry; it doubles with each failure. Default 100 ms.
    pub retry_delay: Duration,
    /// Longest delay between retries. Default 5 s.
    pub max_retry_delay: Duration,
    /// Stop once every owned partition has caught up with the head of the stream as it was at
    /// start. Default off: run until shut down.
    pub exit_when_caught_up: bool,
    /// When the projection's checkpoints were written under another partition count, replace
    /// that layout by this one, exactly (see [`Builder::repartition`]). Default off: refuse.
    pub repartition: bool,
    /// How often a standby tries to take its partition over, a worker that receives nothing
    /// checks that its layout has not been replaced, and a new layout looks again for live
    /// processes of the old one. Default 1 s.
    pub liveness_interval: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            batch_size: 5_000,
            poll_interval: Duration::from_millis(100),
            max_poll_interval: Duration::from_secs(1),
            gap_warn_after: Duration::from_secs(10),
            min_events_per_batch: 1_000,
            queue_depth: 2,
            max_events_per_transaction: 5_000,
            idle_checkpoint_interval: Duration::from_secs(1),
            progress_interval: Duration::from_secs(5),
            max_attempts: 3,
            retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_secs(5),
            exit_when_caught_up: false,
            repartition: false,
            liveness_interval: Duration::from_secs(1),
        }
    }
}

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

    /// Stop once caught up with the head of the stream as it is at start.
    pub fn exit_when_caught_up(mut self, exit: bool) -> Self {
        self.settings.exit_when_caught_up = exit;
        self
    }

    /// Allows changing the number of partitions: when the projection's checkpoints were
    /// written under another partition count, that layout is replaced by this one at start,
    /// exactly (no event applied twice, none skipped; see the crate docs). Processes still
    /// running the old layout stop at their next transaction with [`Error::Fenced`]. Without
    /// it, a different partition count is refused with [`Error::LayoutMismatch`], so that a
    /// typo cannot re-partition.
    pub fn repartition(mut self, repartition: bool) -> Self {
        self.settings.repartition = repartition;
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
    /// another partition count (unless [`repartition`](Self::repartition) is set).
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

        let mut reader = database.connect()?;
        store::check_tables(&mut reader, database.schema_name())?;
        store::check_event_columns(&mut reader, database.schema_name())?;
        store::check_sequence(&mut reader)?;
        let layout = checkpoint::claim_layout(&mut reader, &name, total, settings.repartition)?;
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
            .map(checkpoint::EarlierLayout::applied_at_most)
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

        let pool = pool.unwrap_or_else(|| database.pool(partitions.len() as u32 + 1));
        let settings = Arc::new(settings);
        let (stop_tx, stop) = bounded::<()>(0);
        let (faults_tx, faults) = unbounded::<u32>();
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
                faults: faults_tx.clone(),
                progress: shared,
                generation: layout.generation,
                earlier: layout.earlier.clone(),
                role: Role::default(),
            };
            let done_tx = done_tx.clone();
            let handle = spawn(format!("projector-p{partition}"), move || {
                let result = worker.run();
                drop(done_tx);
                result
            })?;
            workers.push((partition, handle));
        }
        drop(faults_tx);

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
            faults,
            progress: Arc::clone(&fetch_progress),
        };
        let fetcher_done = done_tx.clone();
        let fetcher = spawn("projector-fetch".into(), move || {
            let result = fetcher.run(reader);
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
            stopper: Stopper {
                sender: Arc::new(Mutex::new(Some(stop_tx))),
            },
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
        if self.settings.batch_size == 0 {
            return Err(Error::invalid_setting(
                "--batch-size",
                0,
                "at least 1 event per batch",
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

fn spawn<T: Send + 'static>(
    name: String,
    body: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<JoinHandle<Result<T, Error>>, Error> {
    thread::Builder::new()
        .name(name.clone())
        .spawn(body)
        .map_err(|_| Error::ThreadPanicked { thread: name })
}

/// Stops a [`Runner`] from anywhere (a signal handler, another thread). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Stopper {
    sender: Arc<Mutex<Option<Sender<()>>>>,
}

impl Stopper {
    /// Asks the runner to stop: the fetcher stops reading, workers finish the transaction they
    /// are in (it commits or rolls back whole) and exit. Returns at once.
    pub fn stop(&self) {
        // Dropping the only sender disconnects the stop channel, which every thread watches.
        let mut sender = match self.sender.lock() {
            Ok(sender) => sender,
            Err(poisoned) => poisoned.into_inner(),
        };
        sender.take();
    }
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

/// Logs a progress line every few seconds while there is work.
struct Monitor {
    database: Database,
    progress: Vec<(u32, Arc<Progress>)>,
    fetch_progress: Arc<FetchProgress>,
    interval: Duration,
    stop: Receiver<()>,
    /// Disconnects when the fetcher and every worker have ended.
    done: Receiver<()>,
}

impl Monitor {
    fn run(self) {
        let ticks = tick(self.interval);
        let mut client = None;
        let mut last_applied = 0;
        let mut last_time = Instant::now();
        loop {
            select! {
                recv(self.stop) -> _ => return,
                recv(self.done) -> _ => return,
                recv(ticks) -> _ => {}
            }
            let applied: u64 = self
                .progress
                .iter()
                .map(|(_, p)| p.applied.load(Ordering::Relaxed))
                .sum();
            let checkpoint = self
                .progress
                .iter()
                .map(|(_, p)| p.checkpoint.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0);
            if client.is_none() {
                client = self.database.connect().ok();
            }
            let head = client
                .as_mut()
                .and_then(|c| store::head_position(c).ok())
                .unwrap_or_else(|| self.fetch_progress.position.load(Ordering::Relaxed));
            // A lost connection is opened again at the next tick.
            if client.as_ref().is_some_and(|c| c.is_closed()) {
                client = None;
            }
            let seconds = last_time.elapsed().as_secs_f64();
            let rate = (applied - last_applied) as f64 / seconds.max(0.001);
            if applied != last_applied || checkpoint < head {
                info!(
                    "progress: {applied} applied ({rate:.0} events/s), read {}, checkpoint {checkpoint}, \
                     head {head}, lag {} positions",
                    self.fetch_progress.read.load(Ordering::Relaxed),
                    (head - checkpoint).max(0)
                );
            }
            last_applied = applied;
            last_time = Instant::now();
        }
    }
}
