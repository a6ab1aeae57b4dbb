//! Running projections: the runner the flags describe, started, watched through signals, and
//! its summary logged.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{info, warn};
use projector::projections::{AggregateStats, AggregateStatsBatch, Noop, Users};
use projector::{Builder, Database, Error, Projection, Stopper, Summary};

use super::args::{Args, flag_or_env};
use super::error::CliError;
use super::{duration, positive, serve, sql_files, unknown_projection, version};

/// Runs the projections of `args` on `database` until stopped (or caught up, with
/// `--exit-when-caught-up`), then logs the summary.
pub(super) fn run_projections(args: &Args, database: Database) -> Result<(), CliError> {
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
        // A bad value of another flag is named first: fixing only the partition key would
        // just lead to it. (Not with projection files: checking them connects and runs their
        // setup, too much for a missing flag.)
        if args.projection_file.is_empty() {
            configured(args, database.clone(), None, total)?;
        }
        return Err(CliError::NotSet {
            setting: "--partition-key".into(),
            hint: format!(
                "it is required to run a projection: give the partition(s) this process owns, \
                 from 0 to {}, as 2, 0,2 or 0-3, or auto to share them with the other live \
                 processes (or set PARTITION_KEY)",
                total - 1
            ),
        });
    };
    // `auto`: share the partitions with the other live processes of each projection.
    let sharing = key_text.trim() == "auto";
    let keys = if sharing {
        None
    } else {
        Some(projector::parse_partition_keys(
            &key_flag, &key_text, total,
        )?)
    };
    let metrics_address = flag_or_env(
        "--metrics-addr",
        args.metrics_addr.clone(),
        "PROJECTOR_METRICS_ADDR",
    );
    let listen = || match &metrics_address {
        Some((flag, address)) => serve::listen(flag, address).map(Some),
        None => Ok(None),
    };
    let mut listener = listen()?;
    let ready_max_lag = match &args.ready_max_lag {
        Some(text) => i64::from(positive("--ready-max-lag", text)?),
        None => 1_000,
    };
    let promoting = later_versions_to_promote(args)?;
    loop {
        let builder = configured(args, database.clone(), keys.clone(), total)?;
        let runner = builder.start()?;
        *lock(&signals) = Signals::Running(runner.stopper());
        let server = match listener.take() {
            Some(listener) => Some(serve::serve(listener, runner.metrics(), ready_max_lag)?),
            None => None,
        };
        let (stop_promoting, promoter) = match &promoting {
            Some((candidates, within)) => {
                let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
                let (database, candidates, within) =
                    (database.clone(), candidates.clone(), *within);
                let promoter = std::thread::Builder::new()
                    .name("projector-promote".into())
                    .spawn(move || {
                        version::promote_when_within(&database, candidates, within, &stopped)
                    })
                    .ok();
                (Some(stop), promoter)
            }
            None => (None, None),
        };
        let outcome = runner.join();
        drop(stop_promoting);
        if let Some(promoter) = promoter {
            let _ = promoter.join();
        }
        drop(server);
        match outcome {
            Err(error) if sharing && error.is_layout_replaced() && !stopping(&signals) => {
                // A re-partitioning or a rewind: sharing processes carry on with the layout
                // now stored.
                info!(
                    "{}; starting again on the layout now stored",
                    projector::error_chain(&error)
                );
                *lock(&signals) = Signals::Starting;
                listener = listen()?;
            }
            outcome => {
                log_summary(&outcome?);
                return Ok(());
            }
        }
    }
}

/// The later versions (name and version) of the projection files given, to promote once
/// within this many positions of the head.
type ToPromote = (Vec<(String, u32)>, i64);

/// With `--promote-within N`: the later versions of the projection files given, to promote
/// once within `N` positions of the head.
fn later_versions_to_promote(args: &Args) -> Result<Option<ToPromote>, Error> {
    let Some(text) = &args.promote_within else {
        return Ok(None);
    };
    let within = i64::from(whole_number("--promote-within", text)?);
    let candidates: Vec<(String, u32)> = sql_files::projection_files(&args.projection_file)?
        .iter()
        .filter(|file| file.version() >= 2)
        .map(|file| (file.name().to_owned(), file.version()))
        .collect();
    if candidates.is_empty() {
        return Err(Error::invalid_setting(
            "--promote-within",
            text,
            "no projection file given here has a version from 2 on (`-- version: N`): there \
             is nothing to promote",
        ));
    }
    Ok(Some((candidates, within)))
}

/// The runner the flags describe: its projections, partitions (`None`: shared) and settings.
fn configured(
    args: &Args,
    database: Database,
    keys: Option<Vec<u32>>,
    total: u32,
) -> Result<Builder, Error> {
    let mut builder = builder_of(args, database)?
        .total_partitions(total)
        .exit_when_caught_up(args.exit_when_caught_up)
        .replay_side_effects(args.replay_side_effects);
    builder = match keys {
        Some(keys) => builder.partitions(keys),
        None => builder.share_partitions(true),
    };
    if let Some(text) = &args.on_poison {
        builder = with_poison_policies(builder, text)?;
    }
    if let Some(text) = &args.park_storm_limit {
        builder = builder.park_storm_limit(whole_number("--park-storm-limit", text)?);
    }
    if let Some((flag, url)) = flag_or_env(
        "--read-replica-url",
        args.read_replica_url.clone(),
        "READ_REPLICA_URL",
    ) {
        builder = builder.read_replica(Database::from_setting(&flag, &url)?);
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
    Ok(builder)
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

/// `--on-poison`: `park` or `stop` for every projection, `NAME=park` (or `stop`) for one, or a
/// comma-separated list of these (the named ones win).
fn with_poison_policies(mut builder: Builder, text: &str) -> Result<Builder, Error> {
    let refuse = |reason: &str| Error::invalid_setting("--on-poison", text, reason);
    let mut for_all = None;
    let mut named = Vec::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        match item.split_once('=') {
            Some((name, policy)) => {
                let name = name.trim();
                if named.contains(&name) {
                    return Err(refuse(&format!(
                        "'{name}' is given twice: give each projection one policy"
                    )));
                }
                named.push(name);
                let policy = super::named(
                    projector::PoisonPolicy::parse("--on-poison", policy),
                    "--on-poison",
                    item,
                )?;
                builder = builder.on_poison_of(name, policy);
            }
            None if for_all.is_some() => {
                return Err(refuse(
                    "two policies for every projection: give one (park or stop), and NAME=POLICY \
                     for the projections that differ",
                ));
            }
            None => for_all = Some(projector::PoisonPolicy::parse("--on-poison", item)?),
        }
    }
    if for_all.is_none() && named.is_empty() {
        return Err(refuse(
            "give park or stop (for every projection), or NAME=park / NAME=stop",
        ));
    }
    Ok(match for_all {
        Some(policy) => builder.on_poison(policy),
        None => builder,
    })
}

/// A whole number, 0 included.
fn whole_number(flag: &str, text: &str) -> Result<u32, Error> {
    text.trim()
        .parse::<u32>()
        .map_err(|_| Error::invalid_setting(flag, text, "expected a whole number (0 or more)"))
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
            super::output::complain(format_args!("forced stop"));
            std::process::exit(130);
        }
    }
}

/// A signal has asked the process to stop.
fn stopping(signals: &Mutex<Signals>) -> bool {
    matches!(*lock(signals), Signals::Stopping)
}

fn log_summary(summary: &Summary) {
    for projection in &summary.projections {
        for partition in &projection.partitions {
            let parked = match partition.parked {
                0 => String::new(),
                n => format!(", parked {n}"),
            };
            info!(
                "partition {}/{} of '{}': applied {}, skipped {}{parked}, checkpoint {}",
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
    let parked = match summary.parked() {
        0 => String::new(),
        n => format!(", parked {n} (`projector dead-letters list`)"),
    };
    info!(
        "stopped {} after {seconds:.1} s: read {} events, applied {} ({:.0} events/s){parked}\
         {memory}",
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
