//! What each command does, on top of the library.

pub(crate) mod args;
mod dead_letters;
pub(crate) mod logs;
mod seed;
mod serve;
mod sql_files;
mod wait;
mod watch;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{info, warn};
use projector::projections::{AggregateStats, AggregateStatsBatch, Noop, Users};
use projector::{
    Builder, CheckpointStatus, Database, Error, LayoutChange, Projection, Stopper, Summary,
};
use serde_json::{Value, json};

use args::{Args, Command, flag_or_env};

pub(crate) fn run(args: Args) -> Result<(), Error> {
    if args.repartition {
        return Err(Error::RemovedFlag {
            flag: "--repartition".into(),
            instead: "a process no longer changes the number of partitions at start (a \
                      supervisor restarting it with stale flags would move the layout back); \
                      run `projector repartition --projection NAME --to N` once, then start the \
                      processes with --total-partitions N"
                .into(),
        });
    }
    let database = database(&args)?;
    match args.command {
        Some(Command::Migrate(_)) => {
            projector::migrate(&database)?;
            info!("migrated {database}");
            Ok(())
        }
        Some(Command::Seed(ref seed)) => seed::seed(&database, seed),
        Some(Command::Status(ref status)) => {
            let mut client = connect_to_schema(&database, &schema_setting(&args))?;
            match &status.watch {
                Some(_) if status.json => Err(Error::invalid_setting(
                    "--watch",
                    "",
                    "--watch redraws the table: leave out --json (or run status --json in a loop)",
                )),
                Some(seconds) => {
                    let every = Duration::from_secs(u64::from(positive("--watch", seconds)?));
                    watch::watch(&mut client, status.projection.as_deref(), every)
                }
                None => print_status(&mut client, status.projection.as_deref(), status.json),
            }
        }
        Some(Command::Reset(ref reset)) => {
            let mut client = connect_to_schema(&database, &schema_setting(&args))?;
            let name = match (&reset.projection, &reset.projection_file) {
                (None, Some(file)) => {
                    let projection = sql_files::for_reset(&mut client, file)?;
                    return reset_projection(client, projection, reset.yes);
                }
                (Some(name), None) => name.as_str(),
                _ => {
                    return Err(Error::invalid_setting(
                        "--projection",
                        reset.projection.as_deref().unwrap_or(""),
                        "give either --projection NAME or --projection-file FILE (exactly one)",
                    ));
                }
            };
            match name {
                "users" => reset_projection(client, Users, reset.yes),
                "aggregate-stats" => reset_projection(client, AggregateStats, reset.yes),
                "aggregate-stats-batch" => reset_projection(client, AggregateStatsBatch, reset.yes),
                "noop" => reset_projection(client, Noop, reset.yes),
                other => Err(unknown_projection(other)),
            }
        }
        Some(Command::Repartition(ref change)) => repartition(&database, change),
        Some(Command::Wait(ref wait)) => wait::wait(&database, wait),
        Some(Command::DeadLetters(ref command)) => {
            connect_to_schema(&database, &schema_setting(&args))?;
            dead_letters::run(&database, command)
        }
        None => run_projections(&args, database),
    }
}

/// A runner of the projections named in `--projection` (a comma-separated list; `users` when
/// neither it nor `--projection-file` is given) and of the files of `--projection-file`, each
/// file checked against the database first.
fn builder_of(args: &Args, database: Database) -> Result<Builder, Error> {
    let files = sql_files::projection_files(&args.projection_file)?;
    sql_files::check(&database, &files)?;
    let mut builder: Option<Builder> = None;
    let names = match (&args.projection, files.is_empty()) {
        (Some(names), _) => names.as_str(),
        (None, true) => "users",
        (None, false) => "",
    };
    for file in files {
        builder = Some(with(builder, &database, file));
    }
    for name in names
        .split(',')
        .map(str::trim)
        .filter(|_| !names.is_empty())
    {
        builder = Some(match name {
            "users" => with(builder, &database, Users),
            "aggregate-stats" => with(builder, &database, AggregateStats),
            "aggregate-stats-batch" => with(builder, &database, AggregateStatsBatch),
            "noop" => with(builder, &database, Noop),
            other => return Err(unknown_projection(other)),
        });
    }
    builder.ok_or_else(|| unknown_projection(""))
}

/// `builder` with `projection` added, or a new one of it.
fn with<P: Projection>(builder: Option<Builder>, database: &Database, projection: P) -> Builder {
    match builder {
        Some(builder) => builder.projection(projection),
        None => Builder::new(database.clone(), projection),
    }
}

fn unknown_projection(name: &str) -> Error {
    Error::invalid_setting(
        "--projection",
        name,
        "known projections are users, aggregate-stats, aggregate-stats-batch and noop; give a \
         projection written in SQL with --projection-file FILE",
    )
}

/// `projector repartition`: changes the layout and says what changed.
fn repartition(database: &Database, change: &args::Repartition) -> Result<(), Error> {
    let name = change.projection.as_str();
    // Another name is taken when it has checkpoints (a projection file's, a service's own).
    if !KNOWN_PROJECTIONS.contains(&name)
        && projector::status(&mut database.connect()?, Some(name))?.is_empty()
    {
        return Err(Error::invalid_setting(
            "--projection",
            name,
            "known projections are users, aggregate-stats, aggregate-stats-batch, noop and any \
             projection with checkpoints in this schema (such as a projection file's, by the name \
             in its `-- projection:` line)",
        ));
    }
    let total = projector::parse_total_partitions("--to", &change.to)?;
    match projector::repartition(database, name, total)? {
        LayoutChange::Replaced { from } => println!(
            "projection '{name}' now has {total} partitions (was {from}): start its processes \
             with --total-partitions {total}; processes still running with {from} stop at their \
             next transaction"
        ),
        LayoutChange::Created => println!(
            "projection '{name}' now has {total} partitions (it had no checkpoints): start its \
             processes with --total-partitions {total}"
        ),
        _ => println!("projection '{name}' already has {total} partitions: nothing to do"),
    }
    Ok(())
}

const KNOWN_PROJECTIONS: [&str; 4] = ["users", "aggregate-stats", "aggregate-stats-batch", "noop"];

fn database(args: &Args) -> Result<Database, Error> {
    let Some((setting, url)) =
        flag_or_env("--database-url", args.database_url.clone(), "DATABASE_URL")
    else {
        return Err(Error::NotSet {
            setting: "DATABASE_URL".into(),
            hint: "set DATABASE_URL or pass --database-url, e.g. \
                   DATABASE_URL=postgres://user:password@localhost:5432/dbname"
                .into(),
        });
    };
    let mut database = Database::from_setting(&setting, &url)?;
    if let Some((flag, text)) = flag_or_env(
        "--keepalive-timeout-secs",
        args.keepalive_timeout_secs.clone(),
        "PROJECTOR_KEEPALIVE_TIMEOUT_SECS",
    ) {
        let seconds = positive(&flag, &text)?;
        database = named(database.keepalive_timeout_secs(seconds), &flag, &text)?;
    }
    if let Some((flag, text)) = flag_or_env(
        "--session-timeout-secs",
        args.session_timeout_secs.clone(),
        "PROJECTOR_SESSION_TIMEOUT_SECS",
    ) {
        let seconds = positive(&flag, &text)?;
        database = named(database.session_timeout_secs(seconds), &flag, &text)?;
    }
    match flag_or_env("--schema", args.schema.clone(), "PROJECTOR_SCHEMA") {
        Some((flag, schema)) => named(database.schema(&schema), &flag, &schema),
        None => Ok(database),
    }
}

/// Where the schema's name came from, for messages.
fn schema_setting(args: &Args) -> String {
    flag_or_env("--schema", args.schema.clone(), "PROJECTOR_SCHEMA").map_or_else(
        || "--schema or PROJECTOR_SCHEMA (default public)".to_owned(),
        |(setting, _)| setting,
    )
}

/// A connection to the database, failing with [`Error::NoSuchSchema`] when the schema asked
/// for does not exist (the server then has no current schema).
fn connect_to_schema(
    database: &Database,
    setting: &str,
) -> Result<projector::postgres::Client, Error> {
    let mut client = database.connect()?;
    let exists: bool = client
        .query_one("SELECT current_schema() IS NOT NULL", &[])
        .map_err(|source| Error::Database {
            action: "reading the current schema".into(),
            source,
        })?
        .get(0);
    if exists {
        Ok(client)
    } else {
        Err(Error::NoSuchSchema {
            schema: database.schema_name().to_owned(),
            setting: setting.to_owned(),
        })
    }
}

/// A setting's error, naming the flag or variable the value came from.
fn named<T>(result: Result<T, Error>, flag: &str, text: &str) -> Result<T, Error> {
    result.map_err(|error| match error {
        Error::InvalidSetting { reason, .. } => Error::InvalidSetting {
            setting: flag.to_owned(),
            value: text.to_owned(),
            reason,
        },
        other => other,
    })
}

fn run_projections(args: &Args, database: Database) -> Result<(), Error> {
    // Before anything that may wait (the layout or setup lock, the database), so that a signal
    // during start-up stops the process cleanly rather than killing it.
    let signals = Arc::new(Mutex::new(Signals::Starting));
    let handler = {
        let signals = Arc::clone(&signals);
        ctrlc::set_handler(move || on_signal(&signals))
    };
    if let Err(error) = handler {
        warn!("could not install the Ctrl-C handler ({error}); stop with SIGKILL");
    }
    let (total_flag, total_text) = flag_or_env(
        "--total-partitions",
        args.total_partitions.clone(),
        "TOTAL_PARTITIONS",
    )
    .unwrap_or_else(|| ("--total-partitions".into(), "4".into()));
    let total = projector::parse_total_partitions(&total_flag, &total_text)?;
    let Some((key_flag, key_text)) = flag_or_env(
        "--partition-key",
        args.partition_key.clone(),
        "PARTITION_KEY",
    ) else {
        return Err(Error::NotSet {
            setting: "--partition-key".into(),
            hint: format!(
                "it is required to run a projection: give the partition(s) this process owns, \
                 from 0 to {}, as 2, 0,2 or 0-3 (or set PARTITION_KEY)",
                total - 1
            ),
        });
    };
    let keys = projector::parse_partition_keys(&key_flag, &key_text, total)?;
    let mut builder = builder_of(args, database)?
        .partitions(keys)
        .total_partitions(total)
        .exit_when_caught_up(args.exit_when_caught_up);
    if let Some(text) = &args.on_poison {
        builder = with_poison_policies(builder, text)?;
    }
    if let Some(text) = &args.batch_size {
        builder = builder.batch_size(positive("--batch-size", text)?);
    }
    if let Some(text) = &args.poll_interval_ms {
        builder = builder.poll_interval(Duration::from_millis(u64::from(positive(
            "--poll-interval-ms",
            text,
        )?)));
    }
    if let Some((flag, text)) = flag_or_env(
        "--give-up-after",
        args.give_up_after.clone(),
        "PROJECTOR_GIVE_UP_AFTER",
    ) {
        builder = builder.give_up_after(duration(&flag, &text)?);
    }
    let metrics_address = flag_or_env(
        "--metrics-addr",
        args.metrics_addr.clone(),
        "PROJECTOR_METRICS_ADDR",
    );
    let listener = match &metrics_address {
        Some((flag, address)) => Some(serve::listen(flag, address)?),
        None => None,
    };
    let ready_max_lag = match &args.ready_max_lag {
        Some(text) => i64::from(positive("--ready-max-lag", text)?),
        None => 1_000,
    };
    let runner = builder.start()?;
    *lock(&signals) = Signals::Running(runner.stopper());
    let server = match listener {
        Some(listener) => Some(serve::serve(listener, runner.metrics(), ready_max_lag)?),
        None => None,
    };
    let outcome = runner.join();
    drop(server);
    let summary = outcome?;
    log_summary(&summary);
    Ok(())
}

/// A duration such as `90s`, `10m`, `1h` or `45` (seconds), at least one second.
fn duration(flag: &str, text: &str) -> Result<Duration, Error> {
    let trimmed = text.trim();
    let (number, unit) = match trimmed.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => trimmed.split_at(at),
        None => (trimmed, "s"),
    };
    let seconds = match (number.parse::<u64>(), unit) {
        (Ok(n), "s") => Some(n),
        (Ok(n), "m") => n.checked_mul(60),
        (Ok(n), "h") => n.checked_mul(3600),
        _ => None,
    };
    match seconds {
        Some(seconds) if seconds > 0 => Ok(Duration::from_secs(seconds)),
        _ => Err(Error::invalid_setting(
            flag,
            text,
            "expected a duration of at least 1 second, such as 90s, 10m or 1h (a bare number is \
             seconds)",
        )),
    }
}

/// Where the process stands when a signal (Ctrl-C, SIGTERM) arrives.
enum Signals {
    /// Starting: nothing is applied yet, so the process may end at once.
    Starting,
    /// Running: the first signal stops the runner.
    Running(Stopper),
    /// Stopping after a signal: another one forces the stop.
    Stopping,
}

fn lock(signals: &Mutex<Signals>) -> MutexGuard<'_, Signals> {
    signals
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn on_signal(signals: &Mutex<Signals>) {
    let mut state = lock(signals);
    match std::mem::replace(&mut *state, Signals::Stopping) {
        Signals::Starting => {
            // Whatever start-up had open (a transaction waiting on a lock) is rolled back by
            // the server when the connection closes.
            info!("stopped during start-up: nothing was applied");
            std::process::exit(0);
        }
        Signals::Running(stopper) => {
            info!("stopping: finishing the transactions in flight (press Ctrl-C again to force)");
            stopper.stop();
        }
        Signals::Stopping => {
            eprintln!("forced stop");
            std::process::exit(130);
        }
    }
}

fn positive(flag: &str, text: &str) -> Result<u32, Error> {
    match text.trim().parse::<u32>() {
        Ok(value) if value > 0 => Ok(value),
        _ => Err(Error::InvalidSetting {
            setting: flag.to_owned(),
            value: text.to_owned(),
            reason: "expected a whole number of at least 1".into(),
        }),
    }
}

fn log_summary(summary: &Summary) {
    for projection in &summary.projections {
        for partition in &projection.partitions {
            info!(
                "partition {}/{} of '{}': applied {}, skipped {}, checkpoint {}",
                partition.partition,
                projection.total_partitions,
                projection.projection,
                partition.applied,
                partition.skipped,
                partition.checkpoint
            );
        }
    }
    let names: Vec<String> = summary
        .projections
        .iter()
        .map(|p| format!("'{}'", p.projection))
        .collect();
    let seconds = summary.elapsed.as_secs_f64();
    let memory = peak_memory_kib()
        .map(|kib| format!(", peak memory {:.1} MiB", kib as f64 / 1024.0))
        .unwrap_or_default();
    info!(
        "stopped {} after {seconds:.1} s: read {} events, applied {} ({:.0} events/s){memory}",
        names.join(", "),
        summary.events_read,
        summary.applied(),
        summary.applied() as f64 / seconds.max(0.001)
    );
}

/// The process's peak resident memory (VmHWM), where the system reports it.
fn peak_memory_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn print_status(
    client: &mut projector::postgres::Client,
    projection: Option<&str>,
    json: bool,
) -> Result<(), Error> {
    let rows = projector::status(client, projection)?;
    if json {
        let head = match rows.first() {
            Some(row) => row.head_position,
            None => client
                .query_one("SELECT COALESCE(MAX(global_position), 0) FROM events", &[])
                .map_err(|source| Error::Database {
                    action: "reading the head of the event store".into(),
                    source,
                })?
                .get(0),
        };
        println!("{}", status_json(head, &rows));
        return Ok(());
    }
    if rows.is_empty() {
        println!(
            "no checkpoints yet{}",
            projection
                .map(|p| format!(" for '{p}'"))
                .unwrap_or_default()
        );
        return Ok(());
    }
    let width = rows
        .iter()
        .map(|row| row.projection.chars().count())
        .chain([20])
        .max()
        .unwrap_or(20);
    println!(
        "{:<width$} {:>9} {:>12} {:>12} {:>10} {:>9} {:>9} {:>7}  HELD-BY",
        "PROJECTION", "PARTITION", "CHECKPOINT", "HEAD", "LAG", "LAG-TIME", "AGE", "PARKED"
    );
    for row in &rows {
        println!(
            "{:<width$} {:>9} {:>12} {:>12} {:>10} {:>9} {:>9} {:>7}  {}",
            row.projection,
            format!("{}/{}", row.partition_key, row.total_partitions),
            row.last_position,
            row.head_position,
            row.lag_events,
            format!("{}s", row.lag_time.as_secs()),
            format!("{}s", row.age.as_secs()),
            row.parked_events,
            held_by(row)
        );
    }
    for layout in layouts(&rows) {
        let (aggregates, events) = parked(layout);
        if events > 0 {
            let name = &layout[0].projection;
            println!(
                "{name}: {aggregates} aggregate(s) parked, with {events} event(s): see `projector \
                 dead-letters list --projection {name}`"
            );
        }
    }
    for layout in layouts(&rows) {
        let Some(until) = layout[0].repartitioning_until() else {
            continue;
        };
        let from: Vec<String> = layout[0]
            .earlier_layouts
            .iter()
            .map(|l| l.total_partitions.to_string())
            .collect();
        let behind: Vec<String> = layout
            .iter()
            .filter(|row| row.last_position < until)
            .map(|row| format!("{}/{}", row.partition_key, row.total_partitions))
            .collect();
        println!(
            "{}: re-partitioning from {} to {} partitions in progress: {} of {} partition(s) \
             past global position {until}, the last applied under the earlier layout(s){}",
            layout[0].projection,
            from.join(" and "),
            layout[0].total_partitions,
            layout.len() - behind.len(),
            layout.len(),
            if behind.is_empty() {
                String::new()
            } else {
                format!("; still skipping: {}", behind.join(", "))
            }
        );
    }
    Ok(())
}

/// The HELD-BY column: `-`, or the server pid of the holding connection, the projector
/// process's own pid when its `application_name` gives it, and, where the server shows it, the
/// connection's client end (`pid=4711 process=1234 client=127.0.0.1:40122`).
fn held_by(row: &CheckpointStatus) -> String {
    let Some(pid) = row.held_by_pid else {
        return "-".to_owned();
    };
    let mut text = format!("pid={pid}");
    if let Some(process) = row
        .held_by_application
        .as_deref()
        .and_then(|name| name.strip_prefix("projector pid "))
    {
        text.push_str(&format!(" process={process}"));
    }
    if let Some(client) = &row.held_by_client {
        text.push_str(&format!(" client={client}"));
    }
    text
}

/// Parked aggregates and events of a layout's partitions.
fn parked(layout: &[CheckpointStatus]) -> (u64, u64) {
    layout.iter().fold((0, 0), |(a, e), row| {
        (a + row.parked_aggregates, e + row.parked_events)
    })
}

/// The rows of each projection's layout, in order.
fn layouts(rows: &[CheckpointStatus]) -> Vec<&[CheckpointStatus]> {
    rows.chunk_by(|a, b| a.projection == b.projection && a.total_partitions == b.total_partitions)
        .collect()
}

/// `projector status --json`: one document, one entry per projection and layout.
fn status_json(head: i64, rows: &[CheckpointStatus]) -> Value {
    let projections: Vec<Value> = layouts(rows)
        .into_iter()
        .map(|layout| {
            let first = &layout[0];
            let until = first.repartitioning_until();
            let repartitioning = until.map(|until| {
                json!({
                    "from": first.earlier_layouts.iter().map(|l| json!({
                        "total_partitions": l.total_partitions,
                        "checkpoints": l.checkpoints,
                    })).collect::<Vec<_>>(),
                    "until_position": until,
                    "partitions_done": layout.iter().filter(|r| r.last_position >= until).count(),
                })
            });
            let partitions: Vec<Value> = layout
                .iter()
                .map(|row| {
                    json!({
                        "partition": row.partition_key,
                        "checkpoint": row.last_position,
                        "lag_events": row.lag_events,
                        "lag_seconds": row.lag_time.as_secs_f64(),
                        "age_seconds": row.age.as_secs_f64(),
                        "held_by_pid": row.held_by_pid,
                        "held_by_client": row.held_by_client,
                        "held_by_application": row.held_by_application,
                        "live": row.held_by_pid.is_some(),
                        "parked_aggregates": row.parked_aggregates,
                        "parked_events": row.parked_events,
                    })
                })
                .collect();
            json!({
                "projection": first.projection,
                "total_partitions": first.total_partitions,
                "partitions": partitions,
                "repartitioning": repartitioning,
                "parked": {"aggregates": parked(layout).0, "events": parked(layout).1},
            })
        })
        .collect();
    json!({ "head_position": head, "projections": projections })
}

/// `projector reset`: says what it would clear unless `yes`, then clears it.
fn reset_projection<P: Projection>(
    mut client: projector::postgres::Client,
    mut projection: P,
    yes: bool,
) -> Result<(), Error> {
    if !yes {
        let name = projection.name().to_owned();
        let rows = projector::status(&mut client, Some(&name))?;
        let checkpoints = match layouts(&rows).first() {
            Some(layout) => format!(
                "delete the {} checkpoint(s) of projection '{name}' ({} partitions, at global \
                 positions {} to {})",
                rows.len(),
                layout[0].total_partitions,
                rows.iter().map(|r| r.last_position).min().unwrap_or(0),
                rows.iter().map(|r| r.last_position).max().unwrap_or(0),
            ),
            None => format!("delete the checkpoints of projection '{name}' (it has none)"),
        };
        let read_model = match name.as_str() {
            "users" => "clear its read model (tables users and user_partition_counts)",
            "aggregate-stats" => "clear its read model (table aggregate_stats)",
            "aggregate-stats-batch" => "clear its read model (table aggregate_stats_batch)",
            "noop" => "clear nothing else (it has no read model)",
            _ => "clear its read model",
        };
        let action = format!(
            "reset would {checkpoints} and {read_model}, so that its next start rebuilds it from \
             the first event"
        );
        let held: Vec<(u32, u32, i32)> = rows
            .iter()
            .filter_map(|row| {
                row.held_by_pid
                    .map(|pid| (row.total_partitions, row.partition_key, pid))
            })
            .collect();
        if held.is_empty() {
            return Err(Error::NotConfirmed { action });
        }
        return Err(Error::WouldBeRefused {
            action,
            because: Box::new(Error::ProjectionRunning {
                projection: name,
                held,
            }),
        });
    }
    projector::reset(&mut client, &mut projection)?;
    Ok(())
}

/// `--on-poison`: `park` or `stop` for every projection, `NAME=park` (or `stop`) for one, or a
/// comma-separated list of these (the named ones win).
fn with_poison_policies(mut builder: Builder, text: &str) -> Result<Builder, Error> {
    let mut for_all = None;
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        match item.split_once('=') {
            Some((name, policy)) => {
                let policy = projector::PoisonPolicy::parse("--on-poison", policy)?;
                builder = builder.on_poison_of(name.trim(), policy);
            }
            None if for_all.is_some() => {
                return Err(Error::invalid_setting(
                    "--on-poison",
                    text,
                    "two policies for every projection: give one (park or stop), and NAME=POLICY \
                     for the projections that differ",
                ));
            }
            None => for_all = Some(projector::PoisonPolicy::parse("--on-poison", item)?),
        }
    }
    Ok(match for_all {
        Some(policy) => builder.on_poison(policy),
        None => builder,
    })
}
