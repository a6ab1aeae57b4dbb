//! The cost of `--on-poison park`: catch-up throughput of a projection with the park policy and
//! one poison aggregate among 10,000 (its first event fails on every attempt, so all its
//! events are parked), against the same with no poison, and against the stop policy.
//!
//! Each run is a runner owning 4 partitions of 4 catching up from the first event with default
//! settings (3 attempts, 100 ms and 200 ms back-off before the event is parked); the projection
//! applies nothing, so that what parking costs the worker is as visible as it can be. The runs
//! alternate, `--rounds` times each (every other round in the reverse order), and the median
//! is reported, with R0 (the whole stream read by one binary `COPY`, the faster of two)
//! measured in the same run.
//!
//! ```text
//! cargo bench --bench park -- --database-url URL [--events N] [--rounds R] [--retry-delay-ms MS]
//! ```
//!
//! It works in a schema of its own (`bench_park_<pid>`), dropped at the end.

use std::time::{Duration, Instant};

use projector::postgres::Transaction;
use projector::{BoxError, Builder, Context, Database, Event, PoisonPolicy, Projection, Settings};

mod common;

use common::Result;

const USAGE: &str = "usage: park [--database-url URL] [--events N] [--rounds R]
  --database-url  server to run against (env DATABASE_URL); a schema of its own is used
  --events        events in the stream, default 1000000 (10,000 aggregates)
  --rounds        runs of each kind, alternating; the median is reported, default 3
  --retry-delay-ms  Settings::retry_delay (the back-off before the 2nd attempt, doubled before
                  the 3rd), default the library's (100): 0 shows what parking costs without it";

const AGGREGATES: i64 = 10_000;

/// Applies nothing, and fails on every event of the poison aggregate, if any.
#[derive(Clone)]
struct Bench {
    name: String,
    poison: Option<&'static str>,
}

impl Projection for Bench {
    fn name(&self) -> &str {
        &self.name
    }
    fn apply(
        &mut self,
        _: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), BoxError> {
        match self.poison {
            Some(id) if event.aggregate_id == id => Err("poison".into()),
            _ => Ok(()),
        }
    }
}

struct Options {
    url: String,
    events: i64,
    rounds: usize,
    retry_delay: Option<Duration>,
}

fn main() {
    // RUST_LOG=projector=info shows what the runs do (leaving the shared read, parking).
    let _ = env_logger::try_init();
    common::main_of("park", USAGE, options, run);
}

fn options() -> Result<Option<Options>> {
    let mut options = Options {
        url: String::new(),
        events: 1_000_000,
        rounds: 3,
        retry_delay: None,
    };
    let url = common::read_args(USAGE, |flag, value| {
        match flag {
            "--events" => options.events = common::number(flag, value()?)?,
            "--rounds" => options.rounds = common::number(flag, value()?)?,
            "--retry-delay-ms" => {
                let ms = common::number(flag, value()?)?;
                options.retry_delay = Some(Duration::from_millis(ms));
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(url.map(|url| Options { url, ..options }))
}

fn run(options: &Options) -> Result<()> {
    common::in_own_schema(&options.url, "park", |database| {
        measure_all(options, database)
    })
}

/// The three kinds of run: label, policy, poison aggregate.
const KINDS: [(&str, PoisonPolicy, Option<&str>); 3] = [
    ("stop, no poison", PoisonPolicy::Stop, None),
    ("park, no poison", PoisonPolicy::Park, None),
    (
        "park, 1 poison aggregate of 10,000",
        PoisonPolicy::Park,
        Some("agg-4242"),
    ),
];

fn measure_all(options: &Options, database: &Database) -> Result<()> {
    projector::migrate(database)?;
    common::seed(
        database,
        common::SMALL_EVENTS_SQL,
        options.events,
        AGGREGATES,
    )?;
    let (copy, _) = common::copy_all_events(&mut database.connect()?)?;
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); KINDS.len()];
    for round in 0..options.rounds.max(1) {
        // Every other round in the reverse order, so that running first or last (a warm
        // cache, autovacuum catching up) favours no kind.
        let mut order: Vec<usize> = (0..KINDS.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for kind in order {
            let (label, policy, poison) = KINDS[kind];
            let projection = Bench {
                name: format!("bench-{kind}-{round}"),
                poison,
            };
            let took = catch_up(database, projection, policy, options.retry_delay)?;
            eprintln!("round {round}: {label}: {:.2} s", took.as_secs_f64());
            times[kind].push(took);
        }
    }
    let parked: i64 = database
        .connect()?
        .query_one(
            "SELECT COUNT(*) FROM projection_dead_letters WHERE projection LIKE 'bench-2-%'",
            &[],
        )?
        .get(0);
    // Each round's poisoned run against its run without poison (run next to it): drift in the
    // machine's load over the rounds cancels out.
    let mut paired: Vec<f64> = times[1]
        .iter()
        .zip(&times[2])
        .map(|(none, poisoned)| none.as_secs_f64() / poisoned.as_secs_f64())
        .collect();
    paired.sort_by(f64::total_cmp);
    let paired = paired[paired.len() / 2];
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|t| common::median(t).as_secs_f64())
        .collect();
    let rate = |seconds: f64| options.events as f64 / seconds;
    println!(
        "\n## Park: {} events, {AGGREGATES} aggregates, 4 partitions, median of {} run(s), \
         retry delay {} ms\n",
        options.events,
        options.rounds.max(1),
        options
            .retry_delay
            .unwrap_or(Settings::default().retry_delay)
            .as_millis()
    );
    println!("| run | wall s | events/s | x R0 | ratio |");
    println!("|---|---:|---:|---:|---:|");
    let copy = copy.as_secs_f64();
    println!(
        "| R0: binary COPY of every event, in order | {copy:.2} | {:.0} | 1.000 | |",
        rate(copy)
    );
    for (kind, &(label, _, _)) in KINDS.iter().enumerate() {
        let ratio = match kind {
            0 => String::new(),
            1 => format!("{:.3} x stop", medians[0] / medians[1]),
            _ => format!(
                "**{:.3} x park, no poison** (floor 0.95)",
                medians[1] / medians[2]
            ),
        };
        println!(
            "| {label} | {:.2} | {:.0} | {:.3} | {ratio} |",
            medians[kind],
            rate(medians[kind]),
            copy / medians[kind]
        );
    }
    println!(
        "\nPaired, the median over the rounds of each round's park-without-poison wall over its \
         poisoned wall (run next to each other): **{paired:.3}**."
    );
    println!(
        "\n(ratios are throughput ratios; {parked} events parked over the poisoned runs, {} per run)",
        parked / options.rounds.max(1) as i64
    );
    Ok(())
}

/// Wall time of one runner catching `projection` up from the first event.
fn catch_up(
    database: &Database,
    projection: Bench,
    policy: PoisonPolicy,
    retry_delay: Option<Duration>,
) -> Result<Duration> {
    let mut settings = Settings::default();
    if let Some(delay) = retry_delay {
        settings.retry_delay = delay;
    }
    let started = Instant::now();
    Builder::new(database.clone(), projection)
        .settings(settings)
        .partitions(0..4)
        .total_partitions(4)
        .on_poison(policy)
        .exit_when_caught_up(true)
        .start()?
        .join()?;
    Ok(started.elapsed())
}
