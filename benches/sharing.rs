//! Sharing partitions (`--partition-key auto`): what it costs and how fast it heals.
//!
//! - Catch-up: 4 `projector` processes catching up the `noop` projection from the first event
//!   on 4 partitions, with explicit keys (`--partition-key K`) and sharing them
//!   (`--partition-key auto`), `--rounds` times each, alternating (every other round in the
//!   reverse order); the medians, their ratio, and R0 (the whole stream read by one binary
//!   `COPY`) measured in the same run.
//! - Take-over: 3 sharing processes on 12 partitions; one is SIGKILLed and the time until
//!   every partition is held again (read from `pg_locks` every 5 ms) is measured, `--kills`
//!   times (a new process joins after each), median and max.
//!
//! ```text
//! cargo bench --bench sharing -- --database-url URL [--events N] [--rounds R] [--kills K]
//! ```
//!
//! It works in a schema of its own (`bench_sharing_<pid>`), dropped at the end.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use projector::Database;

mod common;

use common::Result;

const USAGE: &str = "usage: sharing [--database-url URL] [--events N] [--rounds R] [--kills K]
  --database-url  server to run against (env DATABASE_URL); a schema of its own is used
  --events        events in the stream, default 1000000 (10,000 aggregates)
  --rounds        catch-ups of each kind, alternating; the median is reported, default 3
  --kills         SIGKILLs of a sharing process, default 5";

const AGGREGATES: i64 = 10_000;
/// The partitions the take-over runs share.
const SHARED: usize = 12;

struct Options {
    url: String,
    events: i64,
    rounds: usize,
    kills: usize,
}

fn main() {
    common::main_of("sharing", USAGE, options, run);
}

fn options() -> Result<Option<Options>> {
    let (mut events, mut rounds, mut kills) = (1_000_000, 3, 5);
    let url = common::read_args(USAGE, |flag, value| {
        match flag {
            "--events" => events = common::number(flag, value()?)?,
            "--rounds" => rounds = common::number(flag, value()?)?,
            "--kills" => kills = common::number(flag, value()?)?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(url.map(|url| Options {
        url,
        events,
        rounds: rounds.max(1),
        kills: kills.max(1),
    }))
}

fn run(options: &Options) -> Result<()> {
    common::in_own_schema(&options.url, "sharing", |database| {
        projector::migrate(database)?;
        common::seed(
            database,
            common::SMALL_EVENTS_SQL,
            options.events,
            AGGREGATES,
        )?;
        let mut client = database.connect()?;
        let (copy, _) = common::copy_all_events(&mut client)?;
        let schema = database.schema_name().to_owned();
        let runs = Runs {
            url: &options.url,
            schema: &schema,
        };
        let (mut explicit, mut shared) = (Vec::new(), Vec::new());
        for round in 0..options.rounds {
            let kinds = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for sharing in kinds {
                let wall = runs.catch_up(database, sharing)?;
                println!(
                    "round {}: {} {:.2} s",
                    round + 1,
                    if sharing { "auto    " } else { "explicit" },
                    wall.as_secs_f64()
                );
                if sharing { &mut shared } else { &mut explicit }.push(wall);
            }
        }
        let (explicit, shared) = (common::median(&mut explicit), common::median(&mut shared));
        let mut takeovers = runs.takeovers(database, options.kills)?;
        let takeover = common::median(&mut takeovers);
        let slowest = takeovers.iter().max().copied().unwrap_or_default();
        let rate = |wall: Duration| options.events as f64 / wall.as_secs_f64();
        println!();
        println!("| run | wall | events/s | x R0 |");
        println!("|---|---|---|---|");
        println!(
            "| R0: one binary COPY of the stream | {:.2} s | {:.0} | 1.000 |",
            copy.as_secs_f64(),
            rate(copy)
        );
        for (name, wall) in [
            ("4 processes, explicit keys (median)", explicit),
            ("4 processes, --partition-key auto (median)", shared),
        ] {
            println!(
                "| {name} | {:.2} s | {:.0} | {:.3} |",
                wall.as_secs_f64(),
                rate(wall),
                copy.as_secs_f64() / wall.as_secs_f64()
            );
        }
        println!();
        println!(
            "auto / explicit catch-up: {:.3} ({} events, {} round(s) each)",
            shared.as_secs_f64() / explicit.as_secs_f64(),
            options.events,
            options.rounds
        );
        println!(
            "SIGKILL of a sharing process to all {SHARED} partitions held again: median {:.2} s, \
             max {:.2} s ({} kills)",
            takeover.as_secs_f64(),
            slowest.as_secs_f64(),
            takeovers.len()
        );
        Ok(())
    })
}

/// Runs of the `projector` binary in the benchmark's schema.
struct Runs<'a> {
    url: &'a str,
    schema: &'a str,
}

impl Runs<'_> {
    fn projector(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_projector"));
        command
            .args(args)
            .env("DATABASE_URL", self.url)
            .env("PROJECTOR_SCHEMA", self.schema)
            .env_remove("PARTITION_KEY")
            .env_remove("TOTAL_PARTITIONS")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        command
    }

    /// One catch-up of `noop` from the first event by 4 processes on 4 partitions.
    fn catch_up(&self, database: &Database, sharing: bool) -> Result<Duration> {
        database.connect()?.batch_execute(
            "DELETE FROM projector_checkpoints WHERE projection = 'noop'; \
             DELETE FROM projector_prior_layouts WHERE projection = 'noop'",
        )?;
        let started = Instant::now();
        let children = (0..4)
            .map(|key| {
                let key = if sharing {
                    "auto".to_owned()
                } else {
                    key.to_string()
                };
                self.projector(&[
                    "--partition-key",
                    &key,
                    "--total-partitions",
                    "4",
                    "--projection",
                    "noop",
                    "--exit-when-caught-up",
                ])
                .spawn()
            })
            .collect::<Result<Vec<Child>, _>>()?;
        for mut child in children {
            let status = child.wait()?;
            if !status.success() {
                return Err(format!("a catch-up process failed ({status})").into());
            }
        }
        let wall = started.elapsed();
        let behind: i64 = database
            .connect()?
            .query_one(
                "SELECT COUNT(*) FROM projector_checkpoints \
                 WHERE projection = 'noop' AND last_position < (SELECT MAX(global_position) FROM events)",
                &[],
            )?
            .get(0);
        if behind != 0 {
            return Err(format!("{behind} partition(s) did not catch up").into());
        }
        Ok(wall)
    }

    /// A sharing process of `noop` on 12 partitions, running until killed.
    fn member(&self) -> Result<Child> {
        let total = SHARED.to_string();
        Ok(self
            .projector(&[
                "--partition-key",
                "auto",
                "--total-partitions",
                &total,
                "--projection",
                "noop",
            ])
            .stderr(Stdio::null())
            .spawn()?)
    }

    /// The time from a member's SIGKILL to every partition held again, `kills` times.
    fn takeovers(&self, database: &Database, kills: usize) -> Result<Vec<Duration>> {
        database.connect()?.batch_execute(
            "DELETE FROM projector_checkpoints WHERE projection = 'noop'; \
             DELETE FROM projector_prior_layouts WHERE projection = 'noop'",
        )?;
        let mut client = database.connect()?;
        let mut members = vec![self.member()?, self.member()?, self.member()?];
        let mut walls = Vec::new();
        let outcome = (|| -> Result<()> {
            for _ in 0..kills {
                wait_for_shares(&mut client, &members, Duration::from_secs(60))?;
                let mut victim = members.remove(0);
                let killed = Instant::now();
                let killing = victim.kill();
                victim.wait()?;
                killing?;
                let survivors: Vec<u32> = members.iter().map(Child::id).collect();
                loop {
                    let held = held(&mut client)?;
                    let by_survivors: usize = survivors
                        .iter()
                        .map(|pid| held.get(pid).copied().unwrap_or(0))
                        .sum();
                    if by_survivors == SHARED {
                        break;
                    }
                    if killed.elapsed() > Duration::from_secs(120) {
                        return Err("the partitions were not all held again within 120 s".into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                walls.push(killed.elapsed());
                println!(
                    "take-over after SIGKILL: {:.2} s",
                    killed.elapsed().as_secs_f64()
                );
                members.push(self.member()?);
            }
            Ok(())
        })();
        for mut member in members {
            let _ = member.kill();
            let _ = member.wait();
        }
        outcome.map(|()| walls)
    }
}

/// Partitions of `noop` held, per holding OS process (from its application name).
fn held(client: &mut projector::postgres::Client) -> Result<BTreeMap<u32, usize>> {
    let rows = client.query(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.objid >= 65536 \
             AND l.classid = hashtext('projector ' || current_schema() || ' noop')::oid",
        &[],
    )?;
    let mut per_process = BTreeMap::new();
    for row in rows {
        let name: Option<String> = row.get(0);
        let pid = name
            .as_deref()
            .and_then(|n| n.strip_prefix("projector pid "))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        *per_process.entry(pid).or_insert(0) += 1;
    }
    Ok(per_process)
}

/// Waits until `members` hold every partition, in equal shares.
fn wait_for_shares(
    client: &mut projector::postgres::Client,
    members: &[Child],
    limit: Duration,
) -> Result<()> {
    let started = Instant::now();
    let each = SHARED / members.len();
    loop {
        let held = held(client)?;
        if members
            .iter()
            .all(|m| held.get(&m.id()).copied().unwrap_or(0) == each)
        {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(format!("the members did not settle at {each} each: {held:?}").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
