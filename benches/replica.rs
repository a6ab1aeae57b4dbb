//! What a read replica takes off the primary: the CPU time the primary's server processes
//! spend while a runner catches up, without and with `--read-replica-url`.
//!
//! Each run is a runner owning 4 partitions of 4 catching a no-op projection up from the first
//! event with default settings; the runs alternate, `--rounds` times each (every other round
//! in the reverse order), and the medians are reported, with a summary line of the ratio for
//! `scripts/bench.sh` (each round's with / without: median, min and max). A server's CPU time
//! is read from `/proc`: its postmaster's own time and that of the children it has reaped
//! (`cutime`, `cstime`: backends that have ended), plus every live child's (backends, WAL
//! writer and sender, checkpointer, autovacuum), read 300 ms after the runner has stopped so
//! that its connections' processes have ended; so the servers must run on this machine. The
//! primary's figure includes what it spends streaming WAL to the replica and writing
//! checkpoints.
//!
//! ```text
//! cargo bench --bench replica -- --database-url PRIMARY --replica-url REPLICA [--events N] [--rounds R]
//! ```
//!
//! `scripts/bench.sh --only replica` starts a primary and a `pg_basebackup -R` replica of it
//! for the run. It works in a schema of its own (`bench_replica_<pid>`), dropped at the end.

use std::time::{Duration, Instant};

use projector::postgres::{Client, NoTls, Transaction};
use projector::{BoxError, Builder, Context, Database, Event, Projection};

mod common;

use common::Result;

const USAGE: &str =
    "usage: replica [--database-url URL] --replica-url URL [--events N] [--rounds R]
  --database-url  the primary (env DATABASE_URL); a schema of its own is used
  --replica-url   a physical streaming replica of it, on this machine
  --events        events in the stream, default 1000000 (10,000 aggregates)
  --rounds        runs of each kind, alternating; the medians are reported, default 3";

const AGGREGATES: i64 = 10_000;

/// The pause after each run before the servers' CPU time is read again.
const REAP_PAUSE: Duration = Duration::from_millis(300);

/// Applies nothing: the read is what is measured.
#[derive(Clone)]
struct Bench {
    name: String,
}

impl Projection for Bench {
    fn name(&self) -> &str {
        &self.name
    }
    fn apply(&mut self, _: &mut Transaction<'_>, _: &Event, _: &Context) -> Result<(), BoxError> {
        Ok(())
    }
}

struct Options {
    url: String,
    replica_url: String,
    events: i64,
    rounds: usize,
}

fn main() {
    let _ = env_logger::try_init();
    common::main_of("replica", USAGE, options, run);
}

fn options() -> Result<Option<Options>> {
    let mut options = Options {
        url: String::new(),
        replica_url: String::new(),
        events: 1_000_000,
        rounds: 3,
    };
    let url = common::read_args(USAGE, |flag, value| {
        match flag {
            "--replica-url" => options.replica_url = value()?,
            "--events" => options.events = common::number(flag, value()?)?,
            "--rounds" => options.rounds = common::number(flag, value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if url.is_some() && options.replica_url.is_empty() {
        return Err(format!("--replica-url is required\n{USAGE}").into());
    }
    Ok(url.map(|url| Options { url, ..options }))
}

fn run(options: &Options) -> Result<()> {
    common::in_own_schema(&options.url, "replica", |database| {
        measure_all(options, database)
    })
}

/// One kind of run: what it took.
#[derive(Default)]
struct Runs {
    walls: Vec<Duration>,
    primary_cpu: Vec<Duration>,
    replica_cpu: Vec<Duration>,
    from_replica: Vec<u64>,
}

fn measure_all(options: &Options, database: &Database) -> Result<()> {
    projector::migrate(database)?;
    common::seed(
        database,
        common::SMALL_EVENTS_SQL,
        options.events,
        AGGREGATES,
    )?;
    let mut primary = Server::of(&options.url)?;
    let mut replica = Server::of(&options.replica_url)?;
    let replica_database = Database::new(&options.replica_url)?;
    let mut runs = [Runs::default(), Runs::default()];
    for round in 0..options.rounds.max(1) {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for kind in order {
            replica.wait_for_replay_of(&mut primary)?;
            let projection = Bench {
                name: format!("bench-{kind}-{round}"),
            };
            let mut builder = Builder::new(database.clone(), projection)
                .partitions(0..4)
                .total_partitions(4)
                .exit_when_caught_up(true);
            if kind == 1 {
                builder = builder.read_replica(replica_database.clone());
            }
            let (primary_before, replica_before) = (primary.cpu()?, replica.cpu()?);
            let started = Instant::now();
            let runner = builder.start()?;
            let metrics = runner.metrics();
            runner.join()?;
            let wall = started.elapsed();
            // The runner's connections have closed: let their server processes end and be
            // reaped (their time then counts in the postmaster's `cutime`).
            std::thread::sleep(REAP_PAUSE);
            let primary_cpu = primary.cpu()?.saturating_sub(primary_before);
            let replica_cpu = replica.cpu()?.saturating_sub(replica_before);
            let from_replica = read_from_replica(&metrics.render());
            eprintln!(
                "round {round}: {}: {:.2} s, primary CPU {:.2} s, replica CPU {:.2} s, \
                 {from_replica} events from the replica",
                LABELS[kind],
                wall.as_secs_f64(),
                primary_cpu.as_secs_f64(),
                replica_cpu.as_secs_f64()
            );
            let kind_runs = &mut runs[kind];
            kind_runs.walls.push(wall);
            kind_runs.primary_cpu.push(primary_cpu);
            kind_runs.replica_cpu.push(replica_cpu);
            kind_runs.from_replica.push(from_replica);
        }
    }
    report(options, &mut runs);
    Ok(())
}

const LABELS: [&str; 2] = ["primary only", "with --read-replica-url"];

fn report(options: &Options, runs: &mut [Runs; 2]) {
    println!(
        "\n## Read replica: {} events, {AGGREGATES} aggregates, 4 partitions, no-op projection, \
         median of {} run(s)\n",
        options.events,
        options.rounds.max(1)
    );
    println!(
        "| run | wall s | events/s | primary CPU s | replica CPU s | events read from the replica |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    // Each round's own ratio, before the medians below sort the rounds' figures.
    let per_round = common::Spread::of(
        runs[1]
            .primary_cpu
            .iter()
            .zip(&runs[0].primary_cpu)
            .map(|(with, without)| with.as_secs_f64() / without.as_secs_f64().max(f64::EPSILON)),
    );
    let mut primary_cpu = [0.0; 2];
    for (kind, kind_runs) in runs.iter_mut().enumerate() {
        let wall = common::median(&mut kind_runs.walls).as_secs_f64();
        primary_cpu[kind] = common::median(&mut kind_runs.primary_cpu).as_secs_f64();
        let replica_cpu = common::median(&mut kind_runs.replica_cpu).as_secs_f64();
        kind_runs.from_replica.sort_unstable();
        let from_replica = kind_runs.from_replica[kind_runs.from_replica.len() / 2];
        println!(
            "| {} | {wall:.2} | {:.0} | {:.2} | {replica_cpu:.2} | {from_replica} |",
            LABELS[kind],
            options.events as f64 / wall,
            primary_cpu[kind]
        );
    }
    println!(
        "\nPrimary CPU time with the replica: **{:.3} x** without it (medians); each round's \
         with / without: {} (median (min–max)).\n",
        primary_cpu[1] / primary_cpu[0].max(f64::EPSILON),
        per_round.map_or_else(|| "n/a".into(), |spread| spread.text(3))
    );
    common::print_ratio(
        "replica primary CPU with / without",
        per_round,
        "primary's CPU time during a catch-up with --read-replica-url over without, each \
         round's pair",
        None,
    );
}

/// Events read from the replica, from a runner's rendered metrics.
fn read_from_replica(rendered: &str) -> u64 {
    rendered
        .lines()
        .find_map(|line| line.strip_prefix("projector_replica_events_read_total "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

/// A PostgreSQL server on this machine, known by its postmaster's process id.
struct Server {
    client: Client,
    postmaster: u32,
    /// Clock ticks per second of `/proc`'s times.
    ticks: u64,
}

impl Server {
    fn of(url: &str) -> Result<Server> {
        let mut client = Client::connect(url, NoTls)?;
        let backend: i32 = client.query_one("SELECT pg_backend_pid()", &[])?.get(0);
        let postmaster = stat_fields(backend as u32)?
            .get(1)
            .and_then(|ppid| ppid.parse().ok())
            .ok_or("the server's backend has no parent in /proc: is it on this machine?")?;
        let ticks = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
            .unwrap_or(100);
        Ok(Server {
            client,
            postmaster,
            ticks,
        })
    }

    /// CPU time of the server's processes so far: the postmaster's own and that of its
    /// reaped children, plus every live child's.
    fn cpu(&self) -> Result<Duration> {
        let own = stat_fields(self.postmaster)?;
        let mut ticks = sum_of(&own, 11..15);
        for entry in std::fs::read_dir("/proc")? {
            let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            // A child may end between the listing and the read: it is then in `cutime`.
            if let Ok(fields) = stat_fields(pid) {
                if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(self.postmaster) {
                    ticks += sum_of(&fields, 11..13);
                }
            }
        }
        Ok(Duration::from_secs_f64(ticks as f64 / self.ticks as f64))
    }

    /// Waits until this replica has replayed what `primary` has written so far.
    fn wait_for_replay_of(&mut self, primary: &mut Server) -> Result<()> {
        let lsn: String = primary
            .client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])?
            .get(0);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let replayed: bool = self
                .client
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )?
                .get(0);
            if replayed {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the replica has not replayed the primary's WAL in 120 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, ….
fn stat_fields(pid: u32) -> Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or("an unexpected /proc stat line")?;
    Ok(after_name.split_whitespace().map(str::to_owned).collect())
}

/// The sum of `fields[range]`, as numbers.
fn sum_of(fields: &[String], range: std::ops::Range<usize>) -> u64 {
    fields[range]
        .iter()
        .filter_map(|field| field.parse::<u64>().ok())
        .sum()
}
