//! What the benchmarks share: running one, its command line, a schema of its own, seeding,
//! the COPY limit (R0), medians, and the summary lines of ratios that `scripts/bench.sh`
//! gathers. Each benchmark uses only some of it.
#![allow(dead_code)]

use std::io::BufRead;
use std::time::{Duration, Instant};

use projector::postgres::{Client, NoTls};
use projector::{BoxError, Database};

pub(crate) type Result<T, E = BoxError> = std::result::Result<T, E>;

/// The benchmark's `main`: runs only under `cargo bench` (`--bench` among the arguments),
/// prints `usage` when `options` finds `--help` (`None`), and an error chain with exit 1.
pub(crate) fn main_of<O>(
    name: &str,
    usage: &str,
    options: impl FnOnce() -> Result<Option<O>>,
    run: impl FnOnce(&O) -> Result<()>,
) {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("benchmark not run: use cargo bench --bench {name} (or scripts/bench.sh)");
        return;
    }
    let outcome = options().and_then(|options| match options {
        Some(options) => run(&options),
        None => {
            println!("{usage}");
            Ok(())
        }
    });
    if let Err(error) = outcome {
        eprintln!("{name}: {}", projector::error_chain(error.as_ref()));
        std::process::exit(1);
    }
}

/// A benchmark's command line: `--database-url URL` (else `DATABASE_URL`), `--help` (`None`),
/// cargo's `--bench`, and the benchmark's own flags, each handed to `own(flag, value)`, where
/// `value()` takes the flag's value; `own` returns false for a flag it does not know. Returns
/// the database URL.
pub(crate) fn read_args(
    usage: &str,
    mut own: impl FnMut(&str, &mut dyn FnMut() -> Result<String>) -> Result<bool>,
) -> Result<Option<String>> {
    let mut url = std::env::var("DATABASE_URL").unwrap_or_default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value =
            || -> Result<String> { Ok(args.next().ok_or(format!("{arg} needs a value"))?) };
        match arg.as_str() {
            "--bench" => {}
            "-h" | "--help" => return Ok(None),
            "--database-url" => url = value()?,
            flag => {
                if !own(flag, &mut value)? {
                    return Err(format!("unknown argument '{flag}'\n{usage}").into());
                }
            }
        }
    }
    if url.is_empty() {
        return Err("no database: pass --database-url or set DATABASE_URL".into());
    }
    Ok(Some(url))
}

/// `text`, the value of `flag`, as a number.
pub(crate) fn number<T: std::str::FromStr>(flag: &str, text: String) -> Result<T> {
    text.parse()
        .map_err(|_| format!("{flag}: a number, not '{text}'").into())
}

/// Runs `measure` on the database at `url` in a schema of its own (`bench_<name>_<pid>`),
/// dropped before and after.
pub(crate) fn in_own_schema(
    url: &str,
    name: &str,
    measure: impl FnOnce(&Database) -> Result<()>,
) -> Result<()> {
    let schema = format!("bench_{name}_{}", std::process::id());
    let mut admin = Client::connect(url, NoTls)?;
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    let database = Database::new(url)?.schema(&schema)?;
    let outcome = measure(&database);
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    outcome
}

/// Appends events `0..events` with `seed_sql` (parameters: first and last event number, and
/// `aggregates`), 250,000 per statement, then vacuums and analyzes the table.
pub(crate) fn seed(
    database: &Database,
    seed_sql: &str,
    events: i64,
    aggregates: i64,
) -> Result<()> {
    let mut client = database.connect()?;
    let insert = client.prepare(seed_sql)?;
    let mut low = 0;
    while low < events {
        let high = (low + 250_000).min(events) - 1;
        client.execute(&insert, &[&low, &high, &aggregates])?;
        low = high + 1;
    }
    client.batch_execute("VACUUM ANALYZE events")?;
    Ok(())
}

/// Event `g` (from 0) as version `g / $3 + 1` of aggregate `agg-<g % $3>`, with a small JSON
/// payload: the stream of the park and sharing benchmarks, for [`seed`].
pub(crate) const SMALL_EVENTS_SQL: &str = "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
        aggregate_version, event_id, event_type, payload) \
    SELECT 'bench', 'Account', 'agg-' || g % $3::int8, g / $3::int8 + 1, gen_random_uuid(), \
        'Happened', convert_to(json_build_object('n', g, 'ref', md5(g::text))::text, 'UTF8') \
    FROM generate_series($1::int8, $2::int8) AS g ORDER BY g";

/// The median of `walls` (sorted in place).
pub(crate) fn median(walls: &mut [Duration]) -> Duration {
    walls.sort_unstable();
    walls[walls.len() / 2]
}

/// R0, the limit every run is compared with: the whole stream read in order by one binary
/// `COPY`.
pub(crate) const COPY_SQL: &str = "COPY (SELECT global_position, bounded_context, \
    aggregate_type, aggregate_id, aggregate_version, event_id, event_type, event_version, \
    payload, trace_id, correlation_id, causation_id, metadata, created_at FROM events \
    ORDER BY global_position) TO STDOUT (FORMAT binary)";

/// R0 on `client`: the faster of two runs of [`COPY_SQL`], each printed, as (wall, bytes).
pub(crate) fn copy_all_events(client: &mut Client) -> Result<(Duration, u64)> {
    let mut best: Option<(Duration, u64)> = None;
    for attempt in 1..=2 {
        let started = Instant::now();
        let mut reader = client.copy_out(COPY_SQL)?;
        let mut bytes = 0u64;
        loop {
            let len = reader.fill_buf()?.len();
            if len == 0 {
                break;
            }
            bytes += len as u64;
            reader.consume(len);
        }
        let wall = started.elapsed();
        println!(
            "R0 run {attempt}: {:.2} s, {:.1} MB",
            wall.as_secs_f64(),
            bytes as f64 / 1e6
        );
        if best.is_none_or(|(fastest, _)| wall < fastest) {
            best = Some((wall, bytes));
        }
    }
    Ok(best.ok_or("no COPY run")?)
}

/// The median, lowest and highest of one figure over rounds (a median of an even count is the
/// mean of the two middle figures).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    /// Figures it was taken over (the rounds).
    pub(crate) rounds: usize,
}

impl Spread {
    /// Over the finite `values`; `None` without any.
    pub(crate) fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        values.sort_by(f64::total_cmp);
        let (&min, &max) = (values.first()?, values.last()?);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min,
            max,
            rounds: n,
        })
    }

    /// `median` alone for one round, else `median (min–max)`, each with `decimals`.
    pub(crate) fn text(&self, decimals: usize) -> String {
        if self.rounds <= 1 {
            format!("{:.decimals$}", self.median)
        } else {
            format!(
                "{:.decimals$} ({:.decimals$}–{:.decimals$})",
                self.median, self.min, self.max
            )
        }
    }
}

/// What a ratio should be (issue 22's targets), judged on its median.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    pub(crate) fn met_by(self, value: f64) -> bool {
        match self {
            Target::AtLeast(floor) => value >= floor,
            Target::AtMost(ceiling) => value <= ceiling,
        }
    }

    /// `target >= 0.95: met` for `value`.
    pub(crate) fn verdict(self, value: f64) -> String {
        let (sign, bound) = match self {
            Target::AtLeast(floor) => (">=", floor),
            Target::AtMost(ceiling) => ("<=", ceiling),
        };
        let met = if self.met_by(value) { "met" } else { "not met" };
        format!("target {sign} {bound}: {met}")
    }
}

/// Prints the summary line of one ratio, which `scripts/bench.sh` gathers into its table of
/// every ratio: `ratio|<key>|<median>|<min>|<max>|<rounds>|<what>` (`n/a` and 0 rounds
/// without figures). With a target, `what` ends with it and whether the median meets it.
pub(crate) fn print_ratio(key: &str, spread: Option<Spread>, what: &str, target: Option<Target>) {
    let mut what = what.replace('|', "/");
    match spread {
        Some(spread) => {
            if let Some(target) = target {
                what.push_str(&format!("; {} (median)", target.verdict(spread.median)));
            }
            println!(
                "ratio|{key}|{}|{}|{}|{}|{what}",
                figure(spread.median),
                figure(spread.min),
                figure(spread.max),
                spread.rounds
            );
        }
        None => println!("ratio|{key}|n/a|n/a|n/a|0|{what}"),
    }
}

/// A figure for a summary line: whole from 1,000 on, else 3 decimals.
fn figure(value: f64) -> String {
    if value.abs() >= 1_000.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}
