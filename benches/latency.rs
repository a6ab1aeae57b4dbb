//! Latency from an append's commit to the read model's commit, at a steady append rate, with
//! wake-ups by notification and with polling only; then how long `wait_for` takes to return
//! after an append (read your writes).
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench latency -- [--rate 1000] [--seconds 10]
//! ```
//!
//! The projection notifies inside the worker's transaction, so the notification arrives when
//! the read-model change commits; the time from the writer's commit to that arrival is the
//! latency. Both instants are taken in this process.
//!
//! For `wait_for`, one writer appends an event and waits for `aggregate-stats` to apply it, in
//! turn, for the same number of seconds: the time from `append`'s return to `wait_for`'s.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use projector::postgres::fallible_iterator::FallibleIterator;
use projector::postgres::{Client, NoTls, Transaction};
use projector::projections::AggregateStats;
use projector::{
    BoxError, Builder, Context, Database, Event, ExpectedVersion, NewEvent, Projection, Until,
    Waiter,
};

mod common;

#[derive(Clone)]
struct NotifyOnCommit;

impl Projection for NotifyOnCommit {
    fn name(&self) -> &str {
        "latency"
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), BoxError> {
        tx.execute(
            "SELECT pg_notify('latency_applied', $1)",
            &[&event.global_position.to_string()],
        )?;
        Ok(())
    }
}

/// Writer threads sharing the append rate.
const WRITERS: u64 = 2;

struct Options {
    url: String,
    rate: u64,
    seconds: u64,
}

const USAGE: &str = "usage: latency [--database-url URL] [--rate N] [--seconds N]
  --database-url  server to run against (env DATABASE_URL)
  --rate          appends per second, default 1000
  --seconds       seconds per mode, default 10";

fn options() -> common::Result<Option<Options>> {
    let mut options = Options {
        url: String::new(),
        rate: 1_000,
        seconds: 10,
    };
    let url = common::read_args(USAGE, |flag, value| {
        match flag {
            "--rate" => options.rate = common::number(flag, value()?)?,
            "--seconds" => options.seconds = common::number(flag, value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(url.map(|url| Options { url, ..options }))
}

fn main() {
    // `cargo bench` passes --bench; anything else (such as `cargo test --all-targets`) only
    // checks that the benchmark builds.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("benchmark not run: use cargo bench --bench latency");
        return;
    }
    let options = match options() {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(message) => {
            eprintln!("latency: {message}");
            std::process::exit(2);
        }
    };
    println!(
        "latency from append commit to read-model commit, {} appends/s from {WRITERS} writers \
         for {} s per mode, 4 partitions in one process",
        options.rate, options.seconds
    );
    println!("| wake-up | samples | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for notify in [true, false] {
        let mode = if notify {
            "notify"
        } else {
            "polling only (100 ms)"
        };
        print_row(mode, measure(&options, notify));
    }
    println!();
    println!(
        "wait_for after an append: from append's return to wait_for's, one writer appending \
         and waiting in turn for {} s per mode, aggregate-stats live on 4 partitions in one \
         process",
        options.seconds
    );
    println!("| wait | samples | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for mode in [Wait::Kept, Wait::OwnConnection, Wait::KeptUnderLoad] {
        let name = match mode {
            Wait::Kept => "Waiter (connection kept)".to_owned(),
            Wait::OwnConnection => "wait_for (a connection per call)".to_owned(),
            Wait::KeptUnderLoad => format!(
                "Waiter, while {WRITERS} other writers append (target {}/s)",
                options.rate
            ),
        };
        print_row(&name, measure_wait(&options, mode));
    }
}

/// One table row of percentiles, or the error, which ends the benchmark.
fn print_row(mode: &str, samples: Result<Vec<f64>, BoxError>) {
    match samples {
        Ok(mut samples) => {
            samples.sort_by(f64::total_cmp);
            let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
            println!(
                "| {mode} | {} | {:.2} | {:.2} | {:.2} |",
                samples.len(),
                at(0.50),
                at(0.99),
                samples.last().copied().unwrap_or_default()
            );
        }
        Err(error) => {
            eprintln!("latency: {}", projector::error_chain(error.as_ref()));
            std::process::exit(1);
        }
    }
}

/// How the `wait_for` benchmark waits.
#[derive(Clone, Copy, PartialEq)]
enum Wait {
    /// One [`Waiter`] for every wait.
    Kept,
    /// [`projector::wait_for`], which connects for each wait.
    OwnConnection,
    /// One [`Waiter`], while other writers append at the rate given.
    KeptUnderLoad,
}

/// Runs `aggregate-stats` live in a fresh schema; one writer appends and waits in turn for the
/// seconds given. Returns the waits in milliseconds.
fn measure_wait(options: &Options, mode: Wait) -> Result<Vec<f64>, BoxError> {
    let schema = format!("bench_wait_{}_{}", std::process::id(), mode as u8);
    let mut admin = Client::connect(&options.url, NoTls)?;
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    let database = Database::new(&options.url)?.schema(&schema)?;
    projector::migrate(&database)?;
    let runner = Builder::new(database.clone(), AggregateStats)
        .partitions(0..4)
        .total_partitions(4)
        .start()?;
    let (committed, _) = mpsc::channel();
    let load = match mode {
        Wait::KeptUnderLoad => spawn_writers(&database, options, true, &committed),
        _ => Vec::new(),
    };
    let mut client = database.connect()?;
    let mut waiter = Waiter::connect(&database)?;
    let timeout = Duration::from_secs(10);
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(options.seconds) {
        let event = NewEvent::new(
            "bench",
            "Thing",
            format!("mine-{}", n % 250),
            "Happened",
            b"{}".to_vec(),
        );
        let position = projector::append(&mut client, ExpectedVersion::Any, &[event])?[0];
        let appended = Instant::now();
        let until = Until::Position(position);
        match mode {
            Wait::OwnConnection => {
                projector::wait_for(&database, "aggregate-stats", until, timeout)?
            }
            _ => waiter.wait_for("aggregate-stats", until, timeout)?,
        };
        samples.push(appended.elapsed().as_secs_f64() * 1_000.0);
        n += 1;
    }
    for writer in load {
        writer.join().map_err(|_| "writer panicked")??;
    }
    runner.shutdown();
    runner.join()?;
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    Ok(samples)
}

/// Writer threads sharing the append rate for the seconds given, each appending to aggregates
/// of its own and sending each position with the instant its append returned.
fn spawn_writers(
    database: &Database,
    options: &Options,
    notify: bool,
    committed: &mpsc::Sender<(i64, Instant)>,
) -> Vec<std::thread::JoinHandle<Result<u64, BoxError>>> {
    let (rate, seconds) = (options.rate, options.seconds);
    (0..WRITERS)
        .map(|w| {
            let database = database.clone();
            let committed = committed.clone();
            std::thread::spawn(move || -> Result<u64, BoxError> {
                let mut client = database.connect()?;
                let interval = Duration::from_secs_f64(WRITERS as f64 / rate as f64);
                let started = Instant::now();
                let mut n = 0u64;
                while started.elapsed() < Duration::from_secs(seconds) {
                    let due = started + interval * n as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let id = format!("agg-{w}-{}", n % 250);
                    let event = NewEvent::new("bench", "Thing", id, "Happened", b"{}".to_vec());
                    let position = if notify {
                        projector::append(&mut client, ExpectedVersion::Any, &[event])?[0]
                    } else {
                        silent_append(&mut client, &event)?
                    };
                    let _ = committed.send((position, Instant::now()));
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect()
}

/// Runs a live projector and a writer at the given rate in a fresh schema; returns latencies
/// in milliseconds.
fn measure(options: &Options, notify: bool) -> Result<Vec<f64>, BoxError> {
    let schema = format!("bench_latency_{}_{}", std::process::id(), u8::from(notify));
    let mut admin = Client::connect(&options.url, NoTls)?;
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    let database = Database::new(&options.url)?.schema(&schema)?;
    projector::migrate(&database)?;

    let mut listener = database.connect()?;
    listener.batch_execute("LISTEN latency_applied")?;
    let runner = Builder::new(database.clone(), NotifyOnCommit)
        .partitions(0..4)
        .total_partitions(4)
        .start()?;

    let (committed_tx, committed) = mpsc::channel::<(i64, Instant)>();
    let seconds = options.seconds;
    // Several writers share the rate, as concurrent services would; each appends to
    // aggregates of its own.
    let writers = spawn_writers(&database, options, notify, &committed_tx);
    drop(committed_tx);

    let mut commits: HashMap<i64, Instant> = HashMap::new();
    let mut applied: HashMap<i64, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(seconds + 10);
    let mut writers = Some(writers);
    let mut written = None;
    while Instant::now() < deadline {
        for (position, at) in committed.try_iter() {
            commits.insert(position, at);
        }
        let mut notifications = listener.notifications();
        let mut arrivals = notifications.timeout_iter(Duration::from_millis(5));
        while let Some(notification) = arrivals.next()? {
            let now = Instant::now();
            if let Ok(position) = notification.payload().parse::<i64>() {
                applied.entry(position).or_insert(now);
            }
        }
        if writers
            .as_ref()
            .is_some_and(|all| all.iter().all(|w| w.is_finished()))
        {
            let mut total = 0;
            for handle in writers.take().into_iter().flatten() {
                total += handle.join().map_err(|_| "writer panicked")??;
            }
            written = Some(total);
        }
        if written.is_some_and(|n| applied.len() as u64 >= n) {
            break;
        }
    }
    for (position, at) in committed.try_iter() {
        commits.insert(position, at);
    }
    runner.shutdown();
    runner.join()?;
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    let samples: Vec<f64> = commits
        .iter()
        .filter_map(|(position, committed)| {
            applied.get(position).map(|applied| {
                applied.saturating_duration_since(*committed).as_secs_f64() * 1_000.0
            })
        })
        .collect();
    if samples.len() < commits.len() {
        return Err(format!(
            "only {} of {} appends reached the read model",
            samples.len(),
            commits.len()
        )
        .into());
    }
    Ok(samples)
}

/// An append as a writer that knows nothing of the projector does it: no notification.
fn silent_append(client: &mut Client, event: &NewEvent) -> Result<i64, projector::postgres::Error> {
    let row = client.query_one(
        "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
             event_id, event_type, payload) \
         SELECT $1, $2, $3, COALESCE(MAX(aggregate_version), 0) + 1, $4, $5, $6 \
         FROM events WHERE bounded_context = $1 AND aggregate_type = $2 AND aggregate_id = $3 \
         RETURNING global_position",
        &[
            &event.bounded_context,
            &event.aggregate_type,
            &event.aggregate_id,
            &event.event_id,
            &event.event_type,
            &event.payload,
        ],
    )?;
    Ok(row.get(0))
}
