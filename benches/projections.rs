//! Several projections in one process: the figures of one shared read.
//!
//! - ten noop projections against one, on the same events (one read: far below 10 x);
//! - a projection scoped to 1 % of the events against one that takes all of them;
//! - append-to-applied latency of a live projection while a new one rebuilds every event in
//!   the same process, against the same with no rebuild.
//!
//! Usually run by `scripts/bench.sh`. Directly:
//!
//! ```text
//! cargo bench --bench projections -- --database-url URL [--events N] [--seconds S] [--rate R]
//!     [--pairs N] [--metrics-only]
//! ```
//!
//! It works in a schema of its own (`bench_projections_<pid>`), dropped at the end.

use std::collections::HashMap;
use std::io::Read;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use projector::postgres::Transaction;
use projector::postgres::fallible_iterator::FallibleIterator;
use projector::{
    BoxError, Builder, Context, Database, Event, ExpectedVersion, NewEvent, Projection, Scope,
    Settings,
};

mod common;

use common::Result;

const USAGE: &str = "usage: projections [--database-url URL] [--events N] [--seconds S] [--rate R] [--pairs N] [--metrics-only]
  --database-url  server to run against (env DATABASE_URL); a schema of its own is used
  --events        events in the stream, default 1000000
  --seconds       length of each latency window, default 10
  --rate          appends per second during the latency windows, default 200
  --pairs         interleaved runs of G1 and M1 (the cost of metrics), default 3
  --metrics-only  only G1 against M1";

const AGGREGATES: i64 = 10_000;
/// One event in a hundred is `Rare`, spread evenly through the stream.
const SEED_SQL: &str = "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
        aggregate_version, event_id, event_type, payload) \
    SELECT 'bench', 'Account', 'agg-' || g % $3::int8, g / $3::int8 + 1, gen_random_uuid(), \
        CASE WHEN g % 100 = 0 THEN 'Rare' ELSE 'Common' END, \
        convert_to(json_build_object('n', g, 'ref', md5(g::text))::text, 'UTF8') \
    FROM generate_series($1::int8, $2::int8) AS g ORDER BY g";

/// Applies nothing; named, so that several can run side by side.
#[derive(Clone)]
struct Named {
    name: String,
    scope: Scope,
}

impl Named {
    fn new(name: &str) -> Named {
        Named {
            name: name.to_owned(),
            scope: Scope::all(),
        }
    }
}

impl Projection for Named {
    fn name(&self) -> &str {
        &self.name
    }
    fn scope(&self) -> Scope {
        self.scope.clone()
    }
    fn apply(&mut self, _: &mut Transaction<'_>, _: &Event, _: &Context) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Notifies each applied position, for the latency windows.
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
        tx.execute(
            "SELECT pg_notify('bench_applied', $1)",
            &[&event.global_position.to_string()],
        )?;
        Ok(())
    }
}

struct Options {
    url: String,
    events: i64,
    seconds: u64,
    rate: u64,
    /// G1/M1 pairs, interleaved.
    pairs: usize,
    /// Only the cost of metrics (G1 against M1).
    metrics_only: bool,
}

fn main() {
    common::main_of("projections", USAGE, options, run);
}

fn options() -> Result<Option<Options>> {
    let mut options = Options {
        url: String::new(),
        events: 1_000_000,
        seconds: 10,
        rate: 200,
        pairs: 3,
        metrics_only: false,
    };
    let url = common::read_args(USAGE, |flag, value| {
        match flag {
            "--events" => options.events = common::number(flag, value()?)?,
            "--seconds" => options.seconds = common::number(flag, value()?)?,
            "--rate" => options.rate = common::number(flag, value()?)?,
            "--pairs" => options.pairs = common::number(flag, value()?)?,
            "--metrics-only" => options.metrics_only = true,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(url.map(|url| Options { url, ..options }))
}

fn run(options: &Options) -> Result<()> {
    common::in_own_schema(&options.url, "projections", |database| {
        measure_all(options, database)
    })
}

fn measure_all(options: &Options, database: &Database) -> Result<()> {
    projector::migrate(database)?;
    common::seed(database, SEED_SQL, options.events, AGGREGATES)?;
    let copy = copy_all(database)?;
    // Interleaved, medians: the cost of metrics is small against the noise.
    let (mut ones, mut scrapes) = (Vec::new(), Vec::new());
    for n in 0..options.pairs {
        ones.push(catch_up(database, vec![Named::new(&format!("one-{n}"))])?);
        scrapes.push(catch_up_scraped(
            database,
            Named::new(&format!("scraped-{n}")),
        )?);
    }
    println!("G1 walls {ones:.2?}, M1 walls {scrapes:.2?}");
    let (one, scraped) = (common::median(&mut ones), common::median(&mut scrapes));
    if options.metrics_only {
        println!(
            "\nG1 median {:.2} s, M1 median {:.2} s: M1 = {:.3} x G1 ({} pairs)",
            one.as_secs_f64(),
            scraped.as_secs_f64(),
            scraped.as_secs_f64() / one.as_secs_f64(),
            options.pairs
        );
        return Ok(());
    }
    let ten = catch_up(
        database,
        (0..10).map(|n| Named::new(&format!("ten-{n}"))).collect(),
    )?;
    let all = catch_up(database, vec![Named::new("unscoped")])?;
    let mut rare = Named::new("scoped");
    rare.scope = Scope::all().event_types(["Rare"]);
    let scoped = catch_up(database, vec![rare])?;
    let quiet = latency(options, database, None)?;
    let busy = latency(options, database, Some("rebuild"))?;

    let secs = |d: Duration| d.as_secs_f64();
    println!(
        "\n## Several projections in one process: {} events, 4 partitions\n",
        options.events
    );
    println!("| run | wall s | ratio |");
    println!("|---|---:|---:|");
    println!(
        "| R0 binary COPY of the stream | {:.2} | 1.00 x R0 |",
        secs(copy)
    );
    println!(
        "| G1 1 noop projection (median of {}) | {:.2} | {:.2} x R0 |",
        options.pairs,
        secs(one),
        secs(one) / secs(copy)
    );
    println!(
        "| M1 G1 rendering its metrics every second (median of {}, interleaved) | {:.2} | {:.3} x G1 |",
        options.pairs,
        secs(scraped),
        secs(scraped) / secs(one)
    );
    println!(
        "| G10 10 noop projections, one process | {:.2} | {:.2} x G1 |",
        secs(ten),
        secs(ten) / secs(one)
    );
    println!(
        "| S0 noop, every event | {:.2} | {:.2} x R0 |",
        secs(all),
        secs(all) / secs(copy)
    );
    println!(
        "| S1 noop scoped to 1 % of the events | {:.2} | {:.3} x S0 |",
        secs(scoped),
        secs(scoped) / secs(all)
    );
    println!(
        "\nappend-to-applied of a live projection, {} appends/s for up to {} s:\n",
        options.rate, options.seconds
    );
    println!("| while | samples | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    for (label, window) in [
        ("nothing else runs", &quiet),
        ("a new projection rebuilds every event", &busy),
    ] {
        println!(
            "| {label}{} | {} | {:.2} | {:.2} | {:.2} |",
            window
                .rebuild
                .map_or(String::new(), |d| format!(" ({:.1} s)", secs(d))),
            window.samples.len(),
            percentile(&window.samples, 0.50),
            percentile(&window.samples, 0.99),
            percentile(&window.samples, 1.0)
        );
    }
    Ok(())
}

/// The fastest read of the whole stream: a binary COPY, drained.
fn copy_all(database: &Database) -> Result<Duration> {
    let mut client = database.connect()?;
    let started = Instant::now();
    let mut reader = client.copy_out(
        "COPY (SELECT * FROM events ORDER BY global_position) TO STDOUT (FORMAT binary)",
    )?;
    let mut buffer = vec![0; 1 << 16];
    while reader.read(&mut buffer)? > 0 {}
    Ok(started.elapsed())
}

/// Wall time of one runner hosting `projections` catching up from the first event.
fn catch_up(database: &Database, projections: Vec<Named>) -> Result<Duration> {
    let mut projections = projections.into_iter();
    let first = projections.next().ok_or("no projection")?;
    let mut builder = Builder::new(database.clone(), first);
    for projection in projections {
        builder = builder.projection(projection);
    }
    let started = Instant::now();
    builder
        .partitions(0..4)
        .total_partitions(4)
        .exit_when_caught_up(true)
        .start()?
        .join()?;
    Ok(started.elapsed())
}

/// As [`catch_up`] with one projection, while another thread renders the runner's metrics
/// every second, as a Prometheus server scraping `--metrics-addr` at a 1 s interval would.
fn catch_up_scraped(database: &Database, projection: Named) -> Result<Duration> {
    let started = Instant::now();
    let runner = Builder::new(database.clone(), projection)
        .partitions(0..4)
        .total_partitions(4)
        .exit_when_caught_up(true)
        .start()?;
    let metrics = runner.metrics();
    let (done_tx, done) = mpsc::channel::<()>();
    let scraper = thread::spawn(move || {
        // Until the runner has ended (the sender dropped).
        while let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(Duration::from_secs(1)) {
            let _ = metrics.render();
        }
    });
    runner.join()?;
    let wall = started.elapsed();
    drop(done_tx);
    scraper.join().map_err(|_| "scraper panicked")?;
    Ok(wall)
}

struct Window {
    samples: Vec<f64>,
    /// How long the rebuild took, when there was one.
    rebuild: Option<Duration>,
}

/// Appends at the set rate while `Live` runs (caught up first), beside a projection rebuilding
/// from the first event when `rebuilding` names one; the latencies, in milliseconds, of the
/// appends made before the rebuild caught up (all of them without a rebuild).
fn latency(options: &Options, database: &Database, rebuilding: Option<&str>) -> Result<Window> {
    catch_up_live(database)?;
    let mut listener = database.connect()?;
    listener.batch_execute("LISTEN bench_applied")?;
    let mut builder = Builder::new(database.clone(), Live);
    if let Some(name) = rebuilding {
        builder = builder.projection(Named::new(name));
    }
    let mut settings = Settings::default();
    settings.progress_interval = Duration::from_secs(3600);
    let head = database
        .connect()?
        .query_one("SELECT MAX(global_position) FROM events", &[])?
        .get::<_, i64>(0);
    let started = Instant::now();
    let runner = builder
        .partitions(0..4)
        .total_partitions(4)
        .settings(settings)
        .start()?;
    let (committed_tx, committed) = mpsc::channel::<(i64, Instant)>();
    let (rate, seconds) = (options.rate, options.seconds);
    let writer_database = database.clone();
    let writer = thread::spawn(move || -> Result<()> {
        let mut client = writer_database.connect()?;
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let mut n = 0u32;
        while started.elapsed() < Duration::from_secs(seconds) {
            if let Some(wait) = (started + interval * n).checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let event = NewEvent::new(
                "bench",
                "Live",
                format!("live-{}", n % 100),
                "Pinged",
                b"{}".to_vec(),
            );
            let position = projector::append(&mut client, ExpectedVersion::Any, &[event])?[0];
            let _ = committed_tx.send((position, Instant::now()));
            n += 1;
        }
        Ok(())
    });
    let mut checker = database.connect()?;
    let mut rebuilt: Option<Duration> = None;
    let mut last_check = Instant::now();
    let mut applied: HashMap<i64, Instant> = HashMap::new();
    let mut commits: Vec<(i64, Instant)> = Vec::new();
    loop {
        commits.extend(committed.try_iter());
        if writer.is_finished() && applied.len() >= commits.len() {
            break;
        }
        let mut notifications = listener.notifications();
        let mut arrivals = notifications.timeout_iter(Duration::from_millis(5));
        while let Some(notification) = arrivals.next()? {
            if let Ok(position) = notification.payload().parse::<i64>() {
                applied.entry(position).or_insert_with(Instant::now);
            }
        }
        if let (Some(name), None) = (rebuilding, rebuilt) {
            if last_check.elapsed() > Duration::from_millis(100) {
                last_check = Instant::now();
                let low: Option<i64> = checker
                    .query_one(
                        "SELECT MIN(last_position) FROM projector_checkpoints WHERE projection = $1",
                        &[&name],
                    )?
                    .get(0);
                if low.is_some_and(|low| low >= head) {
                    rebuilt = Some(started.elapsed());
                }
            }
        }
        if started.elapsed() > Duration::from_secs(seconds + 60) {
            return Err("the live projection did not apply every append within a minute".into());
        }
    }
    writer.join().map_err(|_| "writer panicked")??;
    runner.shutdown();
    runner.join()?;
    let window_end = rebuilt.map(|d| started + d);
    commits.extend(committed.try_iter());
    let samples = commits
        .into_iter()
        .filter(|(_, at)| window_end.is_none_or(|end| *at <= end))
        .filter_map(|(position, at)| {
            applied
                .get(&position)
                .map(|done| done.saturating_duration_since(at).as_secs_f64() * 1_000.0)
        })
        .collect();
    Ok(Window {
        samples,
        rebuild: rebuilding.map(|_| rebuilt.unwrap_or_else(|| started.elapsed())),
    })
}

/// Brings `Live` to the head before a window, so that only new appends reach it.
fn catch_up_live(database: &Database) -> Result<()> {
    Builder::new(database.clone(), Live)
        .partitions(0..4)
        .total_partitions(4)
        .exit_when_caught_up(true)
        .start()?
        .join()?;
    Ok(())
}

fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}
