//! Catch-up benchmark: seeds the `events` table set-based, measures the fastest possible read
//! of it (a binary `COPY`), then times the `projector` binary catching up from position 0 in
//! several layouts, and prints one markdown table with the floors the runtime should meet.
//!
//! Usually run by `scripts/bench.sh`, which creates and drops a database for it. Directly:
//!
//! ```text
//! cargo bench --bench catch_up -- --database-url URL [--events N] [--big-events N]
//!     [--scale 1,2,4,8,16] [--batch-size B] [--projector PATH]
//! ```
//!
//! The database must have no events yet; the benchmark migrates it and seeds it.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls, Transaction};
use projector::{BoxError as ProjectionError, Builder, Context, Database, Event, Projection};

mod common;

use common::COPY_SQL;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

const USAGE: &str = "usage: catch_up [--database-url URL] [--events N] [--big-events N] \
    [--scale T,T,...] [--batch-size B] [--projector PATH]
  --database-url  database to seed and run against (env DATABASE_URL); must have no events
  --events        events in the main runs, default 1000000
  --big-events    events for the second peak-memory run, default 5000000; 0 skips it
  --scale         partition counts for the scaling runs, default 1,2,4,8,16
  --batch-size    --batch-size passed to every projector run (default: the projector's)
  --projector     the projector binary (default: the one cargo built with this benchmark)";

/// Distinct aggregates in the seeded stream.
const AGGREGATES: i64 = 10_000;
/// Rows per seeding statement.
const SEED_CHUNK: i64 = 250_000;
/// Event `g` (from 0) is version `g / AGGREGATES + 1` of aggregate `agg-<g % AGGREGATES>`, so
/// every aggregate's versions are consecutive in position order.
const SEED_SQL: &str = "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
        aggregate_version, event_id, event_type, event_version, payload) \
    SELECT 'bench', 'Account', 'agg-' || g % $3::int8, g / $3::int8 + 1, gen_random_uuid(), \
        CASE WHEN g < $3::int8 THEN 'AccountOpened' \
            ELSE (ARRAY['MoneyDeposited', 'MoneyWithdrawn', 'AccountRenamed'])[g % 3 + 1] END, \
        1, \
        convert_to(json_build_object('account', 'agg-' || g % $3::int8, 'amount', g % 1000, \
            'currency', 'EUR', 'ref', md5(g::text))::text, 'UTF8') \
    FROM generate_series($1::int8, $2::int8) AS g ORDER BY g";

/// P3 plain: the `aggregate-stats` read model written the way most projections are, one
/// statement per event (no queued writes), run in this process through the library.
const PLAIN_PROJECTION: &str = "aggregate-stats-plain";

/// The projection with a set-based batch handler, run as P4 when the binary has it.
const BATCH_PROJECTION: &str = "aggregate-stats-batch";
/// The `aggregate-stats` read model written in SQL (a projection file), run as P5 when the
/// binary takes `--projection-file`.
const SQL_PROJECTION: &str = "aggregate-stats-sql";
const SQL_PROJECTION_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/sql/aggregate_stats.sql"
);
/// P5's floor, as a fraction of R0.
const P5_FLOOR_X_R0: f64 = 0.15;
/// Throughput of the Go pupsourcing v1 projection runtime, for comparison with P3.
const GO_REFERENCE: f64 = 4_100.0;
/// P3's floor: ten times the Go reference.
const P3_FLOOR: f64 = 41_000.0;
const RSS_CEILING_MIB: f64 = 64.0;
/// Lines of a failed child's stderr to show.
const STDERR_TAIL: usize = 30;

struct Options {
    database_url: String,
    events: i64,
    big_events: i64,
    scale: Vec<u32>,
    batch_size: Option<u32>,
    projector: PathBuf,
}

fn main() {
    // `cargo bench` passes --bench; anything else (such as `cargo test --all-targets`) only
    // checks that the benchmark builds.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("benchmark not run: use scripts/bench.sh");
        return;
    }
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(message) => {
            eprintln!("catch_up: {message}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(&options) {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        eprintln!("catch_up: {message}");
        std::process::exit(1);
    }
}

/// `Ok(None)` when help was asked for.
fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut database_url = std::env::var("DATABASE_URL").ok();
    let mut projector = option_env!("CARGO_BIN_EXE_projector").map(PathBuf::from);
    let mut options = Options {
        database_url: String::new(),
        events: 1_000_000,
        big_events: 5_000_000,
        scale: vec![1, 2, 4, 8, 16],
        batch_size: None,
        projector: PathBuf::new(),
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            // `cargo bench` passes this to every benchmark binary.
            "--bench" => {}
            "-h" | "--help" => return Ok(None),
            "--database-url" => database_url = Some(value()?),
            "--events" => options.events = count(&arg, &value()?)?,
            "--big-events" => options.big_events = count(&arg, &value()?)?,
            "--batch-size" => options.batch_size = Some(positive(&arg, &value()?)?),
            "--projector" => projector = Some(PathBuf::from(value()?)),
            "--scale" => {
                options.scale = value()?
                    .split(',')
                    .map(|part| positive(&arg, part))
                    .collect::<Result<_, _>>()?;
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    options.database_url = database_url
        .filter(|url| !url.is_empty())
        .ok_or("no database: pass --database-url or set DATABASE_URL")?;
    options.projector = projector.ok_or(
        "the projector binary was not built with this benchmark (feature `cli` off): \
         pass --projector PATH",
    )?;
    if options.events < 1 {
        return Err("--events must be at least 1".into());
    }
    if options.big_events != 0 && options.big_events <= options.events {
        return Err("--big-events must be 0 or more than --events".into());
    }
    Ok(Some(options))
}

fn count(flag: &str, text: &str) -> Result<i64, String> {
    text.replace('_', "")
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| format!("{flag}: '{text}' is not a whole number"))
}

fn positive(flag: &str, text: &str) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{flag}: '{text}' is not a whole number of at least 1"))
}

fn run(options: &Options) -> Result<()> {
    let mut client = Client::connect(&options.database_url, NoTls)
        .map_err(|error| format!("connecting to {}: {error}", redact(&options.database_url)))?;
    let machine = Machine::probe(&mut client)?;
    machine.print();
    let bench = Bench { options, client };
    bench.run(machine)
}

/// What the numbers were measured on.
struct Machine {
    cpus: usize,
    cpu_model: String,
    server_version: String,
}

impl Machine {
    fn probe(client: &mut Client) -> Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let server_version = client
            .query_one("SHOW server_version", &[])?
            .get::<_, String>(0);
        Ok(Self {
            cpus,
            cpu_model,
            server_version,
        })
    }

    fn print(&self) {
        println!("machine: nproc {}", self.cpus);
        println!("machine: CPU {}", self.cpu_model);
        println!("machine: PostgreSQL {}", self.server_version);
    }
}

/// One projector run: its wall time and each process's summary line.
struct Outcome {
    wall: Duration,
    /// Events in the stream when it ran.
    events: i64,
    processes: Vec<ProcessSummary>,
}

impl Outcome {
    /// Events of the stream per second of wall time.
    fn rate(&self) -> f64 {
        self.events as f64 / self.wall.as_secs_f64()
    }

    fn peak_mib(&self) -> Option<f64> {
        self.processes
            .iter()
            .filter_map(|p| p.peak_mib)
            .reduce(f64::max)
    }

    fn applied(&self) -> u64 {
        self.processes.iter().map(|p| p.applied).sum()
    }
}

/// The figures of a projector's `stopped '...' after ...` line.
struct ProcessSummary {
    read: u64,
    applied: u64,
    peak_mib: Option<f64>,
}

impl ProcessSummary {
    fn parse(stderr: &str) -> Option<Self> {
        let line = stderr
            .lines()
            .rev()
            .find(|line| line.contains("stopped '"))?;
        Some(Self {
            read: number_after(line, ": read ")?.parse().ok()?,
            applied: number_after(line, ", applied ")?.parse().ok()?,
            peak_mib: number_after(line, "peak memory ").and_then(|n| n.parse().ok()),
        })
    }
}

/// The number (digits and dots) right after `marker` in `line`.
fn number_after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// One row of the results table.
#[derive(Clone)]
struct Row {
    run: String,
    what: String,
    wall: Option<Duration>,
    rate: Option<f64>,
    ratio: String,
    notes: String,
}

struct Bench<'a> {
    options: &'a Options,
    client: Client,
}

impl Bench<'_> {
    fn run(mut self, machine: Machine) -> Result<()> {
        let n = self.options.events;
        let keys4 = vec!["0-3".to_owned()];
        self.projector("migrate", &["migrate".to_owned()])?;
        let existing: i64 = self
            .client
            .query_one("SELECT count(*) FROM events", &[])?
            .get(0);
        if existing != 0 {
            return Err(format!(
                "the database already has {existing} events: give the benchmark an empty database"
            )
            .into());
        }
        self.seed(0, n)?;

        let r0 = self.copy_all(n)?;
        let p1 = self.project("P1", "noop", 4, &keys4)?;
        let p2 = self.project("P2", "noop", 4, &["0", "1", "2", "3"].map(String::from))?;
        let p3_plain = self.project_plain("P3 plain")?;
        let p3_plain_check = self.aggregate_stats_check(n, "aggregate_stats_plain")?;
        let p3 = self.project("P3 queued", "aggregate-stats", 4, &keys4)?;
        let p3_check = self.aggregate_stats_check(n, "aggregate_stats")?;
        let p4 = if self.has_batch_projection()? {
            let outcome = self.project("P4", BATCH_PROJECTION, 4, &keys4)?;
            let check = self.aggregate_stats_check(n, "aggregate_stats_batch")?;
            Some((outcome, check))
        } else {
            println!("\n# P4: '{BATCH_PROJECTION}' is not in `projector --help`: skipped");
            None
        };
        let p5 = if self.help_mentions("P5", "--projection-file")? {
            let outcome = self.project("P5", SQL_PROJECTION, 4, &keys4)?;
            let check = self.aggregate_stats_check(n, "aggregate_stats_sql")?;
            Some((outcome, check))
        } else {
            println!("\n# P5: `projector --help` has no --projection-file: skipped");
            None
        };
        let mut scale = Vec::new();
        for &total in &self.options.scale {
            let keys = [all_keys(total)];
            let outcome = self.project(&format!("scale T={total}"), "noop", total, &keys)?;
            scale.push((total, outcome));
        }
        let big = if self.options.big_events > 0 {
            self.seed(n, self.options.big_events)?;
            Some(self.project("RSS big", "noop", 4, &keys4)?)
        } else {
            None
        };

        let report = Report {
            options: self.options,
            r0,
            p1,
            p2,
            p3_plain,
            p3_plain_check,
            p3,
            p3_check,
            p4,
            p5,
            scale,
            big,
        };
        report.print(&machine);
        Ok(())
    }

    /// Appends events `from..to` (counted from 0), then vacuums and analyzes the table. The
    /// unique constraints are dropped for the load and added back after it: one index build
    /// is much faster than millions of inserts into random places of the `event_id` index.
    fn seed(&mut self, from: i64, to: i64) -> Result<()> {
        println!(
            "\n# seeding events {} to {} ({} aggregates, {} rows per statement)",
            thousands(from + 1),
            thousands(to),
            thousands(AGGREGATES),
            thousands(SEED_CHUNK)
        );
        let started = Instant::now();
        self.client
            .batch_execute("SET maintenance_work_mem = '256MB'")?;
        let constraints: Vec<(String, String)> = self
            .client
            .query(
                "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint \
                 WHERE conrelid = 'events'::regclass AND contype = 'u'",
                &[],
            )?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        for (name, _) in &constraints {
            let sql = format!("ALTER TABLE events DROP CONSTRAINT {}", identifier(name));
            println!("sql> {sql}");
            self.client.batch_execute(&sql)?;
        }
        let insert = self.client.prepare(SEED_SQL)?;
        let mut low = from;
        while low < to {
            let high = (low + SEED_CHUNK).min(to) - 1;
            self.client.execute(&insert, &[&low, &high, &AGGREGATES])?;
            low = high + 1;
        }
        let inserted = started.elapsed();
        for (name, definition) in &constraints {
            let sql = format!(
                "ALTER TABLE events ADD CONSTRAINT {} {definition}",
                identifier(name)
            );
            println!("sql> {sql}");
            self.client.batch_execute(&sql)?;
        }
        let indexed = started.elapsed();
        self.client.batch_execute("VACUUM ANALYZE events")?;
        let done = started.elapsed();
        let row = self.client.query_one(
            "SELECT count(*), coalesce(max(global_position), 0), \
                 coalesce(avg(octet_length(payload)), 0)::float8, \
                 pg_total_relation_size('events') FROM events",
            &[],
        )?;
        let (count, head, payload, size): (i64, i64, f64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        println!(
            "seeded {} events in {:.1} s: inserts {:.1} s, unique constraints {:.1} s, \
             VACUUM ANALYZE {:.1} s",
            thousands(to - from),
            done.as_secs_f64(),
            inserted.as_secs_f64(),
            (indexed - inserted).as_secs_f64(),
            (done - indexed).as_secs_f64(),
        );
        println!(
            "events: {}, head {}, payload {payload:.0} bytes on average, \
             table with indexes {:.0} MB",
            thousands(count),
            thousands(head),
            size as f64 / 1e6,
        );
        if count != to || head != to {
            return Err(format!("expected {to} events at positions 1..={to} after seeding").into());
        }
        Ok(())
    }

    /// R0: the stream read in full, in order, by one binary `COPY`; the faster of two runs.
    fn copy_all(&mut self, events: i64) -> Result<Row> {
        println!("\n# R0: {COPY_SQL}");
        let (wall, bytes) = common::copy_all_events(&mut self.client)?;
        Ok(Row {
            run: "R0".into(),
            what: format!(
                "binary COPY of all {} events in order (the limit)",
                thousands(events)
            ),
            wall: Some(wall),
            rate: Some(events as f64 / wall.as_secs_f64()),
            ratio: "1.00".into(),
            notes: format!(
                "{:.1} MB, {:.0} MB/s, faster of 2 runs",
                bytes as f64 / 1e6,
                bytes as f64 / 1e6 / wall.as_secs_f64()
            ),
        })
    }

    /// Runs `projection` from position 0 until caught up: one process per entry of `keys`,
    /// all started together. The wall time runs until the last one has exited.
    fn project(
        &mut self,
        label: &str,
        projection: &str,
        total: u32,
        keys: &[String],
    ) -> Result<Outcome> {
        println!(
            "\n# {label}: {projection}, {total} partition(s), {} process(es)",
            keys.len()
        );
        self.reset(projection)?;
        let commands: Vec<Vec<String>> = keys
            .iter()
            .map(|key| {
                let (flag, value) = match projection {
                    SQL_PROJECTION => ("--projection-file", SQL_PROJECTION_FILE),
                    name => ("--projection", name),
                };
                let mut args = vec![
                    flag.to_owned(),
                    value.to_owned(),
                    "--partition-key".to_owned(),
                    key.clone(),
                    "--total-partitions".to_owned(),
                    total.to_string(),
                    "--exit-when-caught-up".to_owned(),
                ];
                if let Some(size) = self.options.batch_size {
                    args.extend(["--batch-size".to_owned(), size.to_string()]);
                }
                args
            })
            .collect();
        for args in &commands {
            let background = if commands.len() > 1 { " &" } else { "" };
            println!("$ {}{background}", self.command_line(args));
        }
        let started = Instant::now();
        let mut children = Vec::new();
        for args in &commands {
            let child = self.command(args).spawn().map_err(|error| {
                format!("starting {}: {error}", self.options.projector.display())
            })?;
            children.push(std::thread::spawn(move || {
                let output = child.wait_with_output();
                (Instant::now(), output)
            }));
        }
        let mut ended = started;
        let mut processes = Vec::new();
        let mut failures = Vec::new();
        for (handle, args) in children.into_iter().zip(&commands) {
            let (at, output) = handle.join().map_err(|_| "a waiting thread panicked")?;
            let output = output?;
            ended = ended.max(at);
            let stderr = String::from_utf8_lossy(&output.stderr);
            match ProcessSummary::parse(&stderr) {
                Some(summary) if output.status.success() => processes.push(summary),
                _ => failures.push(failure(&self.command_line(args), output.status, &stderr)),
            }
        }
        if !failures.is_empty() {
            return Err(failures.join("\n").into());
        }
        let outcome = Outcome {
            wall: ended - started,
            events: self.events()?,
            processes,
        };
        println!(
            "{label}: {:.2} s, {} events/s, applied {}, read {}, peak RSS {}",
            outcome.wall.as_secs_f64(),
            thousands_f(outcome.rate().round()),
            thousands(outcome.applied() as i64),
            outcome
                .processes
                .iter()
                .map(|p| thousands(p.read as i64))
                .collect::<Vec<_>>()
                .join(" + "),
            mib(outcome.peak_mib())
        );
        Ok(outcome)
    }

    /// P3 plain: [`PlainAggregateStats`] from position 0 until caught up, in this process
    /// (partitions 0-3 of 4, as P3), through the library the binary runs on.
    fn project_plain(&mut self, label: &str) -> Result<Outcome> {
        println!(
            "\n# {label}: {PLAIN_PROJECTION} (one statement per event, in this process), \
             4 partitions"
        );
        self.reset(PLAIN_PROJECTION)?;
        let database = Database::new(&self.options.database_url)?;
        let mut builder = Builder::new(database, PlainAggregateStats)
            .partitions(0..4)
            .total_partitions(4)
            .exit_when_caught_up(true);
        if let Some(size) = self.options.batch_size {
            builder = builder.batch_size(size);
        }
        let started = Instant::now();
        let summary = builder.start()?.join()?;
        let outcome = Outcome {
            wall: started.elapsed(),
            events: self.events()?,
            processes: vec![ProcessSummary {
                read: summary.events_read,
                applied: summary.applied(),
                peak_mib: None,
            }],
        };
        println!(
            "{label}: {:.2} s, {} events/s, applied {}",
            outcome.wall.as_secs_f64(),
            thousands_f(outcome.rate().round()),
            thousands(outcome.applied() as i64),
        );
        Ok(outcome)
    }

    /// Runs the projector once to completion (for `migrate`), failing on a non-zero exit.
    fn projector(&self, label: &str, args: &[String]) -> Result<()> {
        println!("\n# {label}\n$ {}", self.command_line(args));
        let output = self.command(args).output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(failure(&self.command_line(args), output.status, &stderr).into());
        }
        Ok(())
    }

    fn command(&self, args: &[String]) -> Command {
        let mut command = Command::new(&self.options.projector);
        command
            .args(args)
            .env("DATABASE_URL", &self.options.database_url)
            .env("RUST_LOG", "info")
            .env_remove("PROJECTOR_SCHEMA")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// The command as a shell line, with any password in the URL hidden.
    fn command_line(&self, args: &[String]) -> String {
        let mut words = vec![
            format!(
                "DATABASE_URL={}",
                quote(&redact(&self.options.database_url))
            ),
            "RUST_LOG=info".to_owned(),
            quote(&self.options.projector.display().to_string()),
        ];
        words.extend(args.iter().map(|arg| quote(arg)));
        words.join(" ")
    }

    /// Removes what an earlier run of `projection` left, so the next one starts from 0.
    fn reset(&mut self, projection: &str) -> Result<()> {
        println!("sql> DELETE FROM projector_checkpoints WHERE projection = '{projection}'");
        self.client.execute(
            "DELETE FROM projector_checkpoints WHERE projection = $1",
            &[&projection],
        )?;
        if projection.starts_with("aggregate-stats") {
            let table = projection.replace('-', "_");
            println!("sql> DROP TABLE IF EXISTS {table}");
            self.client.batch_execute(&format!(
                "SET client_min_messages = warning; DROP TABLE IF EXISTS {table}"
            ))?;
        }
        Ok(())
    }

    fn events(&mut self) -> Result<i64> {
        Ok(self
            .client
            .query_one("SELECT count(*) FROM events", &[])?
            .get(0))
    }

    /// Whether the read model in `table` holds every aggregate once and every event once.
    fn aggregate_stats_check(&mut self, events: i64, table: &str) -> Result<String> {
        let exists: Option<String> = self
            .client
            .query_one("SELECT to_regclass($1)::text", &[&table])?
            .get(0);
        if exists.is_none() {
            return Ok(format!("no {table} table to check"));
        }
        let row = self.client.query_one(
            &format!("SELECT count(*), coalesce(sum(events_applied), 0)::int8 FROM {table}"),
            &[],
        )?;
        let (rows, applied): (i64, i64) = (row.get(0), row.get(1));
        let expected_rows = AGGREGATES.min(events);
        let verdict = if rows == expected_rows && applied == events {
            "ok"
        } else {
            "MISMATCH"
        };
        Ok(format!(
            "{table} {verdict}: {} rows, {} events",
            thousands(rows),
            thousands(applied)
        ))
    }

    fn has_batch_projection(&self) -> Result<bool> {
        self.help_mentions("P4", BATCH_PROJECTION)
    }

    /// Whether `projector --help` mentions `what` (a projection, a flag), for run `label`.
    fn help_mentions(&self, label: &str, what: &str) -> Result<bool> {
        let args = ["--help".to_owned()];
        println!("\n# {label}: looking for '{what}'");
        println!(
            "$ {} --help",
            quote(&self.options.projector.display().to_string())
        );
        let output = Command::new(&self.options.projector).args(args).output()?;
        let help = String::from_utf8_lossy(&output.stdout);
        Ok(help.contains(what))
    }
}

/// The partition keys of one process owning all `total` partitions: `0` or `0-<total - 1>`.
fn all_keys(total: u32) -> String {
    if total == 1 {
        "0".to_owned()
    } else {
        format!("0-{}", total - 1)
    }
}

/// A failed child, with the tail of its stderr.
fn failure(command: &str, status: ExitStatus, stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    let tail = &lines[lines.len().saturating_sub(STDERR_TAIL)..];
    let why = if status.success() {
        "exited 0 without a summary line".to_owned()
    } else {
        format!("failed ({status})")
    };
    format!(
        "{command}\n{why}; last {} lines of its stderr:\n{}",
        tail.len(),
        tail.join("\n")
    )
}

/// Everything measured, turned into the results table and the floor checks.
struct Report<'a> {
    options: &'a Options,
    r0: Row,
    p1: Outcome,
    p2: Outcome,
    p3_plain: Outcome,
    p3_plain_check: String,
    p3: Outcome,
    p3_check: String,
    p4: Option<(Outcome, String)>,
    p5: Option<(Outcome, String)>,
    scale: Vec<(u32, Outcome)>,
    big: Option<Outcome>,
}

impl Report<'_> {
    fn print(&self, machine: &Machine) {
        let n = self.options.events;
        let r0_rate = self.r0.rate.unwrap_or(f64::NAN);
        let p1_rate = self.p1.rate();
        let p3_rate = self.p3.rate();
        let p2_ratio = self.p2.wall.as_secs_f64() / self.p1.wall.as_secs_f64();
        let rss_n = self.p1.peak_mib();
        let rss_big = self.big.as_ref().and_then(Outcome::peak_mib);
        let one = self
            .scale
            .iter()
            .find(|(total, _)| *total == 1)
            .map(|(_, outcome)| outcome.rate());
        let sixteen = self
            .scale
            .iter()
            .find(|(total, _)| *total == 16)
            .map(|(_, outcome)| outcome.rate());
        let size = short_count(n);

        let mut rows = vec![
            self.r0.clone(),
            self.projection_row(
                "P1",
                "noop, 1 process, partitions 0-3 of 4",
                &self.p1,
                format!("{:.2} x R0", p1_rate / r0_rate),
                format!("peak RSS {}", mib(rss_n)),
            ),
            self.projection_row(
                "P2",
                "noop, 4 processes, partition K of 4 each (K = 0..3)",
                &self.p2,
                format!("{p2_ratio:.2} x P1 wall"),
                format!(
                    "wall until the last exits; events/s = events / wall; peak RSS {} (max)",
                    mib(self.p2.peak_mib())
                ),
            ),
            self.projection_row(
                "P3 plain",
                "aggregate-stats read model, one statement per event, 1 process (in the \
                 benchmark, through the library), 0-3 of 4",
                &self.p3_plain,
                format!("{:.3} x R0", self.p3_plain.rate() / r0_rate),
                self.p3_plain_check.clone(),
            ),
            self.projection_row(
                "P3 queued",
                "aggregate-stats (per-event upsert, queued writes), 1 process, 0-3 of 4",
                &self.p3,
                format!("{:.3} x R0", p3_rate / r0_rate),
                format!(
                    "{:.2} x P3 plain; {:.1} x Go pupsourcing v1 reference ({} events/s); \
                     floor {} events/s: {}; {}",
                    p3_rate / self.p3_plain.rate(),
                    p3_rate / GO_REFERENCE,
                    thousands_f(GO_REFERENCE),
                    thousands_f(P3_FLOOR),
                    pass(p3_rate >= P3_FLOOR),
                    self.p3_check
                ),
            ),
        ];
        rows.push(match &self.p4 {
            Some((outcome, check)) => {
                let rate = outcome.rate();
                self.projection_row(
                    "P4",
                    &format!("{BATCH_PROJECTION} (set-based batch), 1 process, 0-3 of 4"),
                    outcome,
                    format!("{:.3} x R0", rate / r0_rate),
                    format!("{:.2} x P3 queued; {check}", rate / p3_rate),
                )
            }
            None => Row {
                run: "P4".into(),
                what: format!("{BATCH_PROJECTION} (set-based batch)"),
                wall: None,
                rate: None,
                ratio: "n/a".into(),
                notes: "n/a (no batch handler yet)".into(),
            },
        });
        if let Some((outcome, check)) = &self.p5 {
            let rate = outcome.rate();
            let p4 = self.p4.as_ref().map_or_else(
                || "n/a".to_owned(),
                |(p4, _)| format!("{:.2}", rate / p4.rate()),
            );
            rows.push(self.projection_row(
                "P5",
                "aggregate-stats in SQL (examples/sql/aggregate_stats.sql), 1 process, 0-3 of 4",
                outcome,
                format!("{:.3} x R0", rate / r0_rate),
                format!("{p4} x P4; {check}"),
            ));
        }
        rows.push(self.projection_row(
            &format!("RSS {size}"),
            &format!("peak RSS of P1 at {} events", thousands(n)),
            &self.p1,
            "-".into(),
            format!("{} (the P1 run)", mib(rss_n)),
        ));
        rows.push(match &self.big {
            Some(outcome) => self.projection_row(
                "RSS big",
                &format!(
                    "peak RSS of P1 at {} events",
                    thousands(self.options.big_events)
                ),
                outcome,
                match (rss_big, rss_n) {
                    (Some(big), Some(small)) => format!("{:.2} x RSS {size}", big / small),
                    _ => "n/a".into(),
                },
                mib(rss_big),
            ),
            None => Row {
                run: "RSS big".into(),
                what: "peak RSS of P1 at the big size".into(),
                wall: None,
                rate: None,
                ratio: "n/a".into(),
                notes: "skipped (--big-events 0)".into(),
            },
        });
        for (total, outcome) in &self.scale {
            let keys = all_keys(*total);
            rows.push(self.projection_row(
                &format!("scale T={total}"),
                &format!("noop, 1 process, partitions {keys} of {total}"),
                outcome,
                one.map_or_else(
                    || "n/a".into(),
                    |one| format!("{:.2} x T=1", outcome.rate() / one),
                ),
                format!("peak RSS {}", mib(outcome.peak_mib())),
            ));
        }

        println!("\n## Catch-up benchmark: {} events\n", thousands(n));
        println!(
            "machine: nproc {}, CPU {}, PostgreSQL {}; projector {}; batch size {}\n",
            machine.cpus,
            machine.cpu_model,
            machine.server_version,
            self.options.projector.display(),
            self.options
                .batch_size
                .map_or_else(|| "default".into(), |b| b.to_string())
        );
        println!("| run | what | wall s | events/s | ratio | notes |");
        println!("|---|---|---:|---:|---:|---|");
        for row in &rows {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                row.run,
                row.what,
                row.wall
                    .map_or_else(|| "n/a".into(), |w| format!("{:.2}", w.as_secs_f64())),
                row.rate
                    .map_or_else(|| "n/a".into(), |r| thousands_f(r.round())),
                row.ratio,
                row.notes
            );
        }

        println!("\n### Floors (reported, not asserted)\n");
        floor(
            "P1 >= 0.5 x R0",
            format!("{:.2} x R0", p1_rate / r0_rate),
            Some(p1_rate >= 0.5 * r0_rate),
        );
        floor(
            "P2 wall <= 2 x P1 wall",
            format!("{p2_ratio:.2} x P1 wall"),
            Some(p2_ratio <= 2.0),
        );
        floor(
            "P3 queued >= 0.25 x R0",
            format!(
                "{:.3} x R0 (P3 plain {:.3} x R0)",
                p3_rate / r0_rate,
                self.p3_plain.rate() / r0_rate
            ),
            Some(p3_rate >= 0.25 * r0_rate),
        );
        floor(
            "P3 queued >= 41,000 events/s",
            format!(
                "{} events/s, {:.3} x R0, {:.1} x Go pupsourcing v1 (4,100 events/s)",
                thousands_f(p3_rate.round()),
                p3_rate / r0_rate,
                p3_rate / GO_REFERENCE
            ),
            Some(p3_rate >= P3_FLOOR),
        );
        if let Some((outcome, _)) = &self.p5 {
            floor(
                "P5 (SQL) >= 0.15 x R0",
                format!("{:.3} x R0", outcome.rate() / r0_rate),
                Some(outcome.rate() >= P5_FLOOR_X_R0 * r0_rate),
            );
        }
        let peak = rss_n.into_iter().chain(rss_big).reduce(f64::max);
        floor(
            "peak RSS <= 64 MiB",
            format!("RSS {size} {}, RSS big {}", mib(rss_n), mib(rss_big)),
            peak.map(|peak| peak <= RSS_CEILING_MIB),
        );
        floor(
            &format!("RSS not growing with backlog: RSS big <= 1.25 x RSS {size}"),
            match (rss_big, rss_n) {
                (Some(big), Some(small)) => format!("{:.2} x", big / small),
                _ => "n/a (no big run)".into(),
            },
            rss_big.zip(rss_n).map(|(big, small)| big <= 1.25 * small),
        );
        floor(
            "P1 at 16 partitions >= 0.75 x P1 at 1",
            match (sixteen, one) {
                (Some(sixteen), Some(one)) => format!("{:.2} x", sixteen / one),
                _ => "n/a (T=1 or T=16 not run)".into(),
            },
            sixteen.zip(one).map(|(sixteen, one)| sixteen >= 0.75 * one),
        );
    }

    fn projection_row(
        &self,
        run: &str,
        what: &str,
        outcome: &Outcome,
        ratio: String,
        notes: String,
    ) -> Row {
        Row {
            run: run.to_owned(),
            what: what.to_owned(),
            wall: Some(outcome.wall),
            rate: Some(outcome.rate()),
            ratio,
            notes,
        }
    }
}

fn floor(check: &str, value: String, passed: Option<bool>) {
    let verdict = passed.map_or("n/a", pass);
    println!("- {check}: {value} -> **{verdict}**");
}

fn pass(passed: bool) -> &'static str {
    if passed { "PASS" } else { "FAIL" }
}

fn mib(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.1} MiB"))
}

fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn thousands_f(value: f64) -> String {
    if value.is_finite() {
        thousands(value as i64)
    } else {
        "n/a".into()
    }
}

/// `1000000` as `1M`, `250000` as `250k`.
fn short_count(n: i64) -> String {
    if n >= 1_000_000 && n % 100_000 == 0 {
        let millions = n as f64 / 1e6;
        format!("{millions}M")
    } else if n >= 1_000 && n % 1_000 == 0 {
        format!("{}k", n / 1_000)
    } else {
        thousands(n)
    }
}

/// `url` with its password replaced by `***` (URL or `key=value` form).
fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        return match authority.rsplit_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                format!("{scheme}://{user}:***@{host}{tail}")
            }
            _ => url.to_owned(),
        };
    }
    url.split_whitespace()
        .map(|word| match word.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `name` as a quoted SQL identifier.
fn identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `word` quoted for a POSIX shell where needed.
fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,%+".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The `aggregate-stats` read model in table `aggregate_stats_plain`, one upsert per event,
/// sent at once: the path of a projection that does not queue its writes (P3 plain).
#[derive(Clone)]
struct PlainAggregateStats;

impl Projection for PlainAggregateStats {
    fn name(&self) -> &str {
        PLAIN_PROJECTION
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), ProjectionError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS aggregate_stats_plain (
                 bounded_context TEXT NOT NULL,
                 aggregate_type TEXT NOT NULL,
                 aggregate_id TEXT NOT NULL,
                 events_applied BIGINT NOT NULL,
                 last_version BIGINT NOT NULL,
                 last_global_position BIGINT NOT NULL,
                 PRIMARY KEY (bounded_context, aggregate_type, aggregate_id)
             )",
        )?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), ProjectionError> {
        let written = tx.execute(
            "INSERT INTO aggregate_stats_plain AS s VALUES ($1, $2, $3, 1, $4, $5) \
             ON CONFLICT (bounded_context, aggregate_type, aggregate_id) DO UPDATE \
                 SET events_applied = s.events_applied + 1, \
                     last_version = EXCLUDED.last_version, \
                     last_global_position = EXCLUDED.last_global_position \
                 WHERE s.last_version + 1 = EXCLUDED.last_version",
            &[
                &event.bounded_context,
                &event.aggregate_type,
                &event.aggregate_id,
                &event.aggregate_version,
                &event.global_position,
            ],
        )?;
        if written == 1 {
            Ok(())
        } else {
            Err(format!("event {} is out of order", event.global_position).into())
        }
    }
}
