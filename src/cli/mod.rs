//! What each command does, on top of the library.

pub(crate) mod args;
mod seed;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use log::{info, warn};
use projector::projections::{AggregateStats, AggregateStatsBatch, Noop, Users};
use projector::{Builder, Database, Error, Projection, Summary};

use args::{Args, Command, flag_or_env};

pub(crate) fn run(args: Args) -> Result<(), Error> {
    let database = database(&args)?;
    match args.command {
        Some(Command::Migrate(_)) => {
            projector::migrate(&database)?;
            info!("migrated {database}");
            Ok(())
        }
        Some(Command::Seed(ref seed)) => seed::seed(&database, seed),
        Some(Command::Status(ref status)) => print_status(&database, status.projection.as_deref()),
        None => match args.projection.as_str() {
            "users" => run_projection(&args, database, Users),
            "aggregate-stats" => run_projection(&args, database, AggregateStats),
            "aggregate-stats-batch" => run_projection(&args, database, AggregateStatsBatch),
            "noop" => run_projection(&args, database, Noop),
            other => Err(Error::invalid_setting(
                "--projection",
                other,
                "known projections are users, aggregate-stats, aggregate-stats-batch and noop",
            )),
        },
    }
}

fn database(args: &Args) -> Result<Database, Error> {
    let Some((_, url)) = flag_or_env("--database-url", args.database_url.clone(), "DATABASE_URL")
    else {
        return Err(Error::invalid_setting(
            "DATABASE_URL",
            "",
            "not set: set DATABASE_URL or pass --database-url, e.g. postgres://user@localhost:5432/db",
        ));
    };
    let database = Database::new(&url)?;
    match flag_or_env("--schema", args.schema.clone(), "PROJECTOR_SCHEMA") {
        Some((_, schema)) => database.schema(&schema),
        None => Ok(database),
    }
}

fn run_projection<P: Projection>(
    args: &Args,
    database: Database,
    projection: P,
) -> Result<(), Error> {
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
        return Err(Error::invalid_setting(
            "--partition-key",
            "",
            format!(
                "required: give the partition(s) this process owns, from 0 to {}, as 2, 0,2 or 0-3 \
                 (or set PARTITION_KEY)",
                total - 1
            ),
        ));
    };
    let keys = projector::parse_partition_keys(&key_flag, &key_text, total)?;
    let mut builder = Builder::new(database, projection)
        .partitions(keys)
        .total_partitions(total)
        .exit_when_caught_up(args.exit_when_caught_up);
    if let Some(text) = &args.batch_size {
        builder = builder.batch_size(positive("--batch-size", text)?);
    }
    if let Some(text) = &args.poll_interval_ms {
        builder = builder.poll_interval(Duration::from_millis(u64::from(positive(
            "--poll-interval-ms",
            text,
        )?)));
    }
    let runner = builder.start()?;
    let stopper = runner.stopper();
    let interrupts = AtomicU32::new(0);
    let handler = ctrlc::set_handler(move || {
        if interrupts.fetch_add(1, Ordering::SeqCst) == 0 {
            info!("stopping: finishing the transactions in flight (press Ctrl-C again to force)");
            stopper.stop();
        } else {
            eprintln!("forced stop");
            std::process::exit(130);
        }
    });
    if let Err(error) = handler {
        warn!("could not install the Ctrl-C handler ({error}); stop with SIGKILL");
    }
    let summary = runner.join()?;
    log_summary(&summary);
    Ok(())
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
    for partition in &summary.partitions {
        info!(
            "partition {}/{}: applied {}, skipped {}, checkpoint {}",
            partition.partition,
            summary.total_partitions,
            partition.applied,
            partition.skipped,
            partition.checkpoint
        );
    }
    let seconds = summary.elapsed.as_secs_f64();
    let memory = peak_memory_kib()
        .map(|kib| format!(", peak memory {:.1} MiB", kib as f64 / 1024.0))
        .unwrap_or_default();
    info!(
        "stopped '{}' after {seconds:.1} s: read {} events, applied {} ({:.0} events/s){memory}",
        summary.projection,
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

fn print_status(database: &Database, projection: Option<&str>) -> Result<(), Error> {
    let mut client = database.connect()?;
    let rows = projector::status(&mut client, projection)?;
    if rows.is_empty() {
        println!(
            "no checkpoints yet{}",
            projection
                .map(|p| format!(" for '{p}'"))
                .unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "{:<20} {:>9} {:>12} {:>12} {:>10} {:>10}",
        "PROJECTION", "PARTITION", "CHECKPOINT", "HEAD", "LAG", "AGE"
    );
    for row in rows {
        println!(
            "{:<20} {:>9} {:>12} {:>12} {:>10} {:>10}",
            row.projection,
            format!("{}/{}", row.partition_key, row.total_partitions),
            row.last_position,
            row.head_position,
            row.lag_events,
            format!("{}s", row.age.as_secs())
        );
    }
    Ok(())
}
