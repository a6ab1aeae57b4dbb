//! A new version built beside the live one, in the same process: does the live version's
//! append-to-applied latency hold while the new one rebuilds, and does the rebuild take about
//! as long as a rebuild alone?
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench versions -- [--events 1000000] [--rate 200] [--seconds 10] [--rounds 3]
//! ```
//!
//! Seeds `--events` events, then runs `--rounds` rounds of two steps, the rebuild alone first
//! in rounds 1, 3, ... and second in rounds 2, 4, ...:
//!
//! - alone: `aggregate-stats-batch` reset (`projector::reset`: checkpoints and read model) and
//!   rebuilt to the head in a runner of its own (stopped once caught up): the baseline.
//! - beside: version 2 of `aggregate-stats-batch` dropped (`projector::retire`: its schema,
//!   checkpoints and registry row), then the live version (version 1 of `live`, which notifies
//!   inside its transaction for each event the writers append) run with writers appending
//!   `--rate` events/s for `--seconds` (its quiet append-to-applied latency), then the process
//!   restarted with version 2 of `aggregate-stats-batch` beside it, the writers appending at
//!   the same rate until version 2 has reached the head as it was at its start (the live
//!   version's latency meanwhile, and the rebuild's time).
//!
//! Each round gives loaded p99 / quiet p99 and rebuild beside / alone (per event rebuilt: the
//! writers add events between the rebuilds); the medians over the rounds are reported, with a
//! summary line of each for `scripts/bench.sh`. Targets (issue 21): the loaded p99 within 2x
//! the quiet p99, the rebuild within 1.3x of the rebuild alone. Both are printed, not asserted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use projector::postgres::fallible_iterator::FallibleIterator;
use projector::postgres::{Client, Transaction};
use projector::projections::AggregateStatsBatch;
use projector::{
    Appender, BoxError, Builder, Context, Database, Event, ExpectedVersion, NewEvent, Projection,
    Runner, Scope,
};

#[path = "../common/mod.rs"]
mod common;
mod report;

use report::{Beside, Latencies, Rebuild, Round, report};

const USAGE: &str =
    "usage: versions [--database-url URL] [--events N] [--rate N] [--seconds N] [--rounds R]
  --database-url  server to run against (env DATABASE_URL)
  --events        events seeded before the rebuilds, default 1000000
  --rate          appends per second to the live version, default 200
  --seconds       seconds of the quiet measurement, default 10
  --rounds        rounds of the rebuild alone and beside the live version, alternating which
                  comes first; the medians are reported, default 3";

/// The projection rebuilt, alone and as version 2 beside the live one.
const REBUILT: &str = "aggregate-stats-batch";

pub(crate) struct Options {
    url: String,
    pub(crate) events: i64,
    pub(crate) rate: u64,
    seconds: u64,
    rounds: usize,
}

fn options() -> common::Result<Option<Options>> {
    let (mut events, mut rate, mut seconds, mut rounds) = (1_000_000, 200, 10, 3);
    let url = common::read_args(USAGE, |flag, value| {
        match flag {
            "--events" => events = common::number(flag, value()?)?,
            "--rate" => rate = common::number(flag, value()?)?,
            "--seconds" => seconds = common::number(flag, value()?)?,
            "--rounds" => rounds = common::number(flag, value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if rounds < 1 {
        return Err(format!("--rounds must be at least 1\n{USAGE}").into());
    }
    Ok(url.map(|url| Options {
        url,
        events,
        rate,
        seconds,
        rounds,
    }))
}

fn main() {
    // RUST_LOG=projector=info shows what the runs do (the read for the version behind).
    let _ = env_logger::try_init();
    common::main_of("versions", USAGE, options, |options| {
        common::in_own_schema(&options.url, "versions", |database| run(database, options))
    });
}

/// The live version: notifies `versions_applied` with the position of each event the writers
/// appended (aggregates `live-...`), in its transaction, so that the notification arrives when
/// the read-model change commits. The seeded events pass through untouched.
#[derive(Clone)]
struct Live;

impl Projection for Live {
    fn name(&self) -> &str {
        "live"
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), BoxError> {
        if event.aggregate_id.starts_with("live-") {
            tx.execute(
                "SELECT pg_notify('versions_applied', $1)",
                &[&event.global_position.to_string()],
            )?;
        }
        Ok(())
    }
}

/// A projection at another version than its own.
#[derive(Clone)]
struct AtVersion<P> {
    inner: P,
    version: u32,
}

impl<P: Projection> Projection for AtVersion<P> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn scope(&self) -> Scope {
        self.inner.scope()
    }
    fn events_per_transaction(&self) -> Option<usize> {
        self.inner.events_per_transaction()
    }
    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        self.inner.setup(tx)
    }
    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError> {
        self.inner.apply(tx, event, context)
    }
    fn apply_batch(
        &mut self,
        tx: &mut Transaction<'_>,
        events: &[Event],
        context: &Context,
    ) -> Result<(), BoxError> {
        self.inner.apply_batch(tx, events, context)
    }
}

fn run(database: &Database, options: &Options) -> common::Result<()> {
    let outcome = measure_both(database, options);
    // The schemas of version 2's read model and of the readers' views, beside the benchmark's.
    let schema = database.schema_name();
    database.connect()?.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema}_v2 CASCADE; DROP SCHEMA IF EXISTS {schema}_readers CASCADE"
    ))?;
    outcome
}

fn measure_both(database: &Database, options: &Options) -> common::Result<()> {
    projector::migrate(database)?;
    let seeded = Instant::now();
    common::seed(database, common::SMALL_EVENTS_SQL, options.events, 10_000)?;
    println!(
        "seeded {} events in {:.1} s",
        options.events,
        seeded.elapsed().as_secs_f64()
    );
    let mut rounds = Vec::new();
    for round in 0..options.rounds {
        let alone_first = round % 2 == 0;
        println!(
            "\n## Round {}/{}: the rebuild alone {}",
            round + 1,
            options.rounds,
            if alone_first { "first" } else { "second" }
        );
        let (alone, beside) = if alone_first {
            let alone = rebuild_alone(database)?;
            (alone, beside_live(database, options)?)
        } else {
            let beside = beside_live(database, options)?;
            (rebuild_alone(database)?, beside)
        };
        let round = Round {
            alone_first,
            alone,
            beside,
        };
        round.print(options);
        rounds.push(round);
    }
    report(options, &rounds);
    Ok(())
}

/// Version 2 of [`REBUILT`] dropped, then the live version alone (quiet) and with version 2
/// rebuilding beside it.
fn beside_live(database: &Database, options: &Options) -> common::Result<Beside> {
    let registered = projector::versions(&mut database.connect()?)?
        .iter()
        .any(|v| v.projection == REBUILT && v.version == 2);
    if registered {
        let retired = projector::retire(database, REBUILT, 2)?;
        println!(
            "retired version 2 of {REBUILT}: dropped {:?}, {} checkpoint(s)",
            retired.dropped, retired.checkpoints
        );
    }
    let live = start(Builder::new(database.clone(), Live))?;
    wait_until_applied(database, "live", head(database)?)?;
    let (quiet, _) = measure(database, options, &live, |started| {
        started.elapsed() >= Duration::from_secs(options.seconds)
    })?;
    live.shutdown();
    live.join()?;

    let rebuild = AtVersion {
        inner: AggregateStatsBatch,
        version: 2,
    };
    let target = head(database)?;
    let both = start(Builder::new(database.clone(), Live).projection(rebuild))?;
    let rebuilding = Instant::now();
    let mut rebuilt = None;
    let stored = projector::stored_name(REBUILT, 2);
    // One connection for the whole wait: the check runs every 100 ms while the listener thread
    // timestamps the live version's notifications.
    let mut checker = database.connect()?;
    let (loaded, _) = measure(database, options, &both, |_| {
        if rebuilt.is_none() && floor(&mut checker, &stored).is_ok_and(|f| f >= target) {
            rebuilt = Some(rebuilding.elapsed());
        }
        rebuilt.is_some()
    })?;
    both.shutdown();
    both.join()?;
    let took = rebuilt.ok_or("version 2 never reached the head")?;
    Ok(Beside {
        quiet: Latencies::of(quiet),
        loaded: Latencies::of(loaded),
        rebuild: Rebuild {
            took,
            events: target,
        },
    })
}

fn start(builder: Builder) -> Result<Runner, projector::Error> {
    builder.partitions(0..4).total_partitions(4).start()
}

/// [`REBUILT`] reset (checkpoints and read model), then rebuilt to the head in a runner of
/// its own (stopped once caught up).
fn rebuild_alone(database: &Database) -> common::Result<Rebuild> {
    let deleted = projector::reset(&mut database.connect()?, &mut AggregateStatsBatch)?;
    println!("reset {REBUILT}: deleted {deleted} checkpoint(s) and its read model's rows");
    let events = head(database)?;
    let started = Instant::now();
    start(Builder::new(database.clone(), AggregateStatsBatch).exit_when_caught_up(true))?.join()?;
    let rebuild = Rebuild {
        took: started.elapsed(),
        events,
    };
    println!(
        "rebuild of {REBUILT} alone: {} events in {:.2} s",
        events,
        rebuild.took.as_secs_f64()
    );
    Ok(rebuild)
}

fn head(database: &Database) -> common::Result<i64> {
    Ok(database
        .connect()?
        .query_one("SELECT COALESCE(MAX(global_position), 0) FROM events", &[])?
        .get(0))
}

/// The lowest checkpoint of the projection stored as `stored`.
fn floor(client: &mut Client, stored: &str) -> common::Result<i64> {
    Ok(client
        .query_one(
            "SELECT COALESCE(MIN(last_position), 0) FROM projector_checkpoints WHERE projection = $1",
            &[&stored],
        )?
        .get(0))
}

fn wait_until_applied(database: &Database, stored: &str, position: i64) -> common::Result<()> {
    let mut client = database.connect()?;
    while floor(&mut client, stored)? < position {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Two writers append `--rate` events per second to `live-...` aggregates, checking `done`
/// every 100 ms, until it says so; returns the latencies (ms) of the appends from their commit
/// to the notification of `Live`'s commit.
///
/// The notifications are timestamped on a thread of their own, which does nothing else: a
/// check of `done` (a query) never delays a timestamp.
fn measure(
    database: &Database,
    options: &Options,
    runner: &Runner,
    mut done: impl FnMut(Instant) -> bool,
) -> common::Result<(Vec<f64>, u64)> {
    let (listening, arrivals) = listen(database)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (committed_tx, committed) = mpsc::channel::<(i64, Instant)>();
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (database, stop, committed) =
                (database.clone(), Arc::clone(&stop), committed_tx.clone());
            let interval = Duration::from_secs_f64(2.0 / options.rate.max(1) as f64);
            std::thread::spawn(move || -> Result<u64, BoxError> {
                let mut client = database.connect()?;
                // Prepared once: the writers stand for another service, and planning the append
                // for each event would take the shared cores from the projector.
                let appender = Appender::prepare(&mut client)?;
                let started = Instant::now();
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if let Some(wait) =
                        (started + interval * n).checked_duration_since(Instant::now())
                    {
                        std::thread::sleep(wait);
                    }
                    let id = format!("live-{w}-{}", n % 250);
                    let event = NewEvent::new("bench", "Thing", id, "Happened", b"{}".to_vec());
                    let mut tx = client.transaction()?;
                    let position = appender.append(&mut tx, ExpectedVersion::Any, &[event])?[0];
                    tx.commit()?;
                    let _ = committed.send((position, Instant::now()));
                    n += 1;
                }
                Ok(u64::from(n))
            })
        })
        .collect();
    drop(committed_tx);
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if runner.is_finished() {
            return Err("the runner stopped".into());
        }
        if done(started) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for writer in writers {
        written += writer.join().map_err(|_| "writer panicked")??;
    }
    let commits: HashMap<i64, Instant> = committed.try_iter().collect();
    // The last appends' notifications.
    let mut applied: HashMap<i64, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while applied.len() < commits.len() && Instant::now() < deadline {
        if let Ok((position, at)) = arrivals.recv_timeout(Duration::from_millis(50)) {
            applied.entry(position).or_insert(at);
        }
    }
    applied.extend(arrivals.try_iter());
    listening.store(false, Ordering::Relaxed);
    let samples: Vec<f64> = commits
        .iter()
        .filter_map(|(position, committed)| {
            applied
                .get(position)
                .map(|at| at.saturating_duration_since(*committed).as_secs_f64() * 1_000.0)
        })
        .collect();
    if samples.len() < commits.len() {
        return Err(format!(
            "only {} of {} appends were applied",
            samples.len(),
            commits.len()
        )
        .into());
    }
    Ok((samples, written))
}

/// A position notified as applied, and when its notification arrived.
type Arrival = (i64, Instant);

/// A thread listening on `versions_applied` that sends each notification's position with the
/// instant it arrived, until the flag returned is cleared; LISTEN has run when this returns.
fn listen(database: &Database) -> common::Result<(Arc<AtomicBool>, mpsc::Receiver<Arrival>)> {
    let mut listener = database.connect()?;
    listener.batch_execute("LISTEN versions_applied")?;
    let listening = Arc::new(AtomicBool::new(true));
    let (arrived, arrivals) = mpsc::channel();
    let flag = Arc::clone(&listening);
    std::thread::spawn(move || {
        while flag.load(Ordering::Relaxed) {
            let mut notifications = listener.notifications();
            let mut iter = notifications.timeout_iter(Duration::from_millis(20));
            loop {
                let notification = match iter.next() {
                    Ok(Some(notification)) => notification,
                    Ok(None) => break,
                    Err(_) => return,
                };
                let at = Instant::now();
                if let Ok(position) = notification.payload().parse::<i64>() {
                    if arrived.send((position, at)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok((listening, arrivals))
}
