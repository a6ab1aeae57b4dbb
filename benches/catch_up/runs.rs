//! The catch-up benchmark's runs: seeding, R0 (the binary `COPY`), the `projector` binary
//! catching up from position 0, P3 plain in this process, and the read models' checks.

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use postgres::Client;
use projector::{Builder, Database};

use crate::common::{self, COPY_SQL};
use crate::outcome::{Check, Outcome, ProcessSummary, Run};
use crate::plain::{PLAIN_PROJECTION, PlainAggregateStats};
use crate::text::{identifier, mib, quote, redact, thousands, thousands_f};
use crate::{Options, Result};

/// Distinct aggregates in the seeded stream.
pub(crate) const AGGREGATES: i64 = 10_000;
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

/// The projection with a set-based batch handler, run as P4 when the binary has it.
pub(crate) const BATCH_PROJECTION: &str = "aggregate-stats-batch";
/// The `aggregate-stats` read model written in SQL (a projection file), run as P5 when the
/// binary takes `--projection-file`.
const SQL_PROJECTION: &str = "aggregate-stats-sql";
const SQL_PROJECTION_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/sql/aggregate_stats.sql"
);
/// Lines of a failed child's stderr to show.
const STDERR_TAIL: usize = 30;
/// The longest wait, before a run, for the server's autovacuum workers to finish.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// The database the runs measure, and how to run the projector on it.
pub(crate) struct Bench<'a> {
    pub(crate) options: &'a Options,
    pub(crate) client: Client,
}

impl Bench<'_> {
    /// Appends events `from..to` (counted from 0), then vacuums and analyzes the table. The
    /// unique constraints are dropped for the load and added back after it: one index build
    /// is much faster than millions of inserts into random places of the `event_id` index.
    pub(crate) fn seed(&mut self, from: i64, to: i64) -> Result<()> {
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

    /// Which runs of a round this projector binary can do: P4 needs its set-based batch
    /// projection, P5 its `--projection-file`.
    pub(crate) fn available_runs(&self) -> Result<Vec<Run>> {
        let mut runs = vec![Run::R0, Run::P1, Run::P2, Run::P3Plain, Run::P3Queued];
        if self.help_mentions("P4", BATCH_PROJECTION)? {
            runs.push(Run::P4);
        } else {
            println!("# P4: '{BATCH_PROJECTION}' is not in `projector --help`: skipped");
        }
        if self.help_mentions("P5", "--projection-file")? {
            runs.push(Run::P5);
        } else {
            println!("# P5: `projector --help` has no --projection-file: skipped");
        }
        Ok(runs)
    }

    /// One run of a round, from position 0 with an empty read model (see [`Self::reset`]);
    /// an `aggregate-stats` read model is checked after it. `label` names it in the output.
    pub(crate) fn measure(&mut self, run: Run, label: &str) -> Result<Outcome> {
        self.settle(label)?;
        let keys4 = ["0-3".to_owned()];
        let (outcome, table) = match run {
            Run::R0 => return self.copy_all(label),
            Run::P1 => (self.project(label, "noop", 4, &keys4)?, None),
            Run::P2 => {
                let keys = ["0", "1", "2", "3"].map(String::from);
                (self.project(label, "noop", 4, &keys)?, None)
            }
            Run::P3Plain => (self.project_plain(label)?, Some("aggregate_stats_plain")),
            Run::P3Queued => (
                self.project(label, "aggregate-stats", 4, &keys4)?,
                Some("aggregate_stats"),
            ),
            Run::P4 => (
                self.project(label, BATCH_PROJECTION, 4, &keys4)?,
                Some("aggregate_stats_batch"),
            ),
            Run::P5 => (
                self.project(label, SQL_PROJECTION, 4, &keys4)?,
                Some("aggregate_stats_sql"),
            ),
        };
        let check = match table {
            Some(table) => Some(self.aggregate_stats_check(outcome.events, table)?),
            None => None,
        };
        if let Some(table) = table {
            self.drop_read_model(table)?;
        }
        Ok(Outcome { check, ..outcome })
    }

    /// Before a run: waits (at most [`SETTLE_LIMIT`]) until no autovacuum worker runs, then
    /// asks for a `CHECKPOINT` (skipped when the role may not), so that no run shares the
    /// cores with the clean-up after the one before it.
    fn settle(&mut self, label: &str) -> Result<()> {
        let start = Instant::now();
        while self.autovacuum_workers()? > 0 && start.elapsed() < SETTLE_LIMIT {
            std::thread::sleep(Duration::from_millis(200));
        }
        let waited = start.elapsed().as_secs_f64();
        let still = self.autovacuum_workers()?;
        if still > 0 {
            println!(
                "settle ({label}): gave up after {waited:.1} s, {still} autovacuum worker(s) still running"
            );
        } else if waited >= 0.2 {
            println!("settle ({label}): waited {waited:.1} s for autovacuum");
        }
        if let Err(error) = self.client.batch_execute("CHECKPOINT") {
            println!("settle ({label}): no CHECKPOINT ({error})");
        }
        Ok(())
    }

    fn autovacuum_workers(&mut self) -> Result<i64> {
        let row = self.client.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'",
            &[],
        )?;
        Ok(row.get(0))
    }

    /// Drops a checked read model at once, so that autovacuum does not clean up its dead row
    /// versions during the runs after it.
    fn drop_read_model(&mut self, table: &str) -> Result<()> {
        println!("sql> DROP TABLE IF EXISTS {table}");
        self.client.batch_execute(&format!(
            "SET client_min_messages = warning; DROP TABLE IF EXISTS {table}"
        ))?;
        Ok(())
    }

    /// R0: the stream read in full, in order, by one binary `COPY`; the faster of two runs.
    fn copy_all(&mut self, label: &str) -> Result<Outcome> {
        println!("\n# {label}: {COPY_SQL}");
        let (wall, bytes) = common::copy_all_events(&mut self.client)?;
        Ok(Outcome {
            wall,
            events: self.events()?,
            processes: Vec::new(),
            check: None,
            copied_bytes: bytes,
        })
    }

    /// Runs `projection` from position 0 until caught up: one process per entry of `keys`,
    /// all started together. The wall time runs until the last one has exited.
    pub(crate) fn project(
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
            check: None,
            copied_bytes: 0,
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
            check: None,
            copied_bytes: 0,
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
    pub(crate) fn projector(&self, label: &str, args: &[String]) -> Result<()> {
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

    pub(crate) fn events(&mut self) -> Result<i64> {
        Ok(self
            .client
            .query_one("SELECT count(*) FROM events", &[])?
            .get(0))
    }

    /// Whether the read model in `table` holds every aggregate once and every event once.
    fn aggregate_stats_check(&mut self, events: i64, table: &str) -> Result<Check> {
        let exists: Option<String> = self
            .client
            .query_one("SELECT to_regclass($1)::text", &[&table])?
            .get(0);
        let check = if exists.is_none() {
            Check {
                ok: false,
                text: format!("no {table} table to check"),
            }
        } else {
            let row = self.client.query_one(
                &format!("SELECT count(*), coalesce(sum(events_applied), 0)::int8 FROM {table}"),
                &[],
            )?;
            let (rows, applied): (i64, i64) = (row.get(0), row.get(1));
            let ok = rows == AGGREGATES.min(events) && applied == events;
            Check {
                ok,
                text: format!(
                    "{table} {}: {} rows, {} events",
                    if ok { "ok" } else { "MISMATCH" },
                    thousands(rows),
                    thousands(applied)
                ),
            }
        };
        println!("check: {}", check.text);
        Ok(check)
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
pub(crate) fn all_keys(total: u32) -> String {
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
