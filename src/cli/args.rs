//! The command line, as flags and environment variables.

use argh::FromArgs;

/// Runs event-sourcing projections over a PostgreSQL event store, split into hash partitions.
/// With no subcommand, runs a projection for the partitions given.
#[derive(FromArgs, Debug)]
pub(crate) struct Args {
    /// partition key(s) this process owns: 2, a list 0,2 or a range 0-3 (env PARTITION_KEY)
    #[argh(option)]
    pub(crate) partition_key: Option<String>,

    /// number of partitions the stream is split into, default 4 (env TOTAL_PARTITIONS)
    #[argh(option)]
    pub(crate) total_partitions: Option<String>,

    /// projection to run: users (default), aggregate-stats, aggregate-stats-batch (set-based), or noop (moves checkpoints only)
    #[argh(option, default = "String::from(\"users\")")]
    pub(crate) projection: String,

    /// events read per query, default 5000
    #[argh(option)]
    pub(crate) batch_size: Option<String>,

    /// milliseconds to wait before reading again once caught up, default 100
    #[argh(option)]
    pub(crate) poll_interval_ms: Option<String>,

    /// how long to keep trying to reach a lost database before exiting 1, as 90s, 10m or 1h
    /// (a bare number is seconds), default 10m (env PROJECTOR_GIVE_UP_AFTER)
    #[argh(option)]
    pub(crate) give_up_after: Option<String>,

    /// stop once caught up with the head of the stream as it was at start
    #[argh(switch)]
    pub(crate) exit_when_caught_up: bool,

    /// removed: exits 2 saying to run `projector repartition` instead
    #[argh(switch, hidden_help)]
    pub(crate) repartition: bool,

    /// database connection string (env DATABASE_URL)
    #[argh(option)]
    pub(crate) database_url: Option<String>,

    /// schema holding the tables, default public (env PROJECTOR_SCHEMA)
    #[argh(option)]
    pub(crate) schema: Option<String>,

    /// seconds after which a connection whose network went silent counts as dead, on both
    /// ends (TCP keepalives and user timeout), from 5 to 86400, default 30 (env
    /// PROJECTOR_KEEPALIVE_TIMEOUT_SECS)
    #[argh(option)]
    pub(crate) keepalive_timeout_secs: Option<String>,

    /// seconds after which the server ends a worker's session that stopped answering while its
    /// connection stays open (a paused process), freeing its partitions for a standby, from 5
    /// to 86400, default 60 (env PROJECTOR_SESSION_TIMEOUT_SECS)
    #[argh(option)]
    pub(crate) session_timeout_secs: Option<String>,

    #[argh(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub(crate) enum Command {
    Migrate(Migrate),
    Seed(Seed),
    Status(Status),
    Reset(Reset),
    Repartition(Repartition),
}

/// Create the event store and checkpoint tables (safe to run again).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "migrate")]
pub(crate) struct Migrate {}

/// Append demo users: each is created, then renamed and given new e-mail addresses.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "seed")]
pub(crate) struct Seed {
    /// users to create, default 1000
    #[argh(option, default = "1000")]
    pub(crate) users: u64,

    /// renames per user, default 1
    #[argh(option, default = "1")]
    pub(crate) renames: u32,

    /// e-mail changes per user, default 1
    #[argh(option, default = "1")]
    pub(crate) email_changes: u32,

    /// append nothing when the store already holds events
    #[argh(switch)]
    pub(crate) if_empty: bool,
}

/// Show each projection's layout and checkpoints, lag in events and time, the live process
/// holding each partition, and any re-partitioning in progress.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
pub(crate) struct Status {
    /// show only this projection
    #[argh(option)]
    pub(crate) projection: Option<String>,

    /// print one JSON document instead of a table
    #[argh(switch)]
    pub(crate) json: bool,
}

/// Delete a projection's checkpoints and clear its read model, so that it rebuilds from the
/// first event at its next start. Refused while a live process holds one of its partitions.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "reset")]
pub(crate) struct Reset {
    /// the projection to reset: users, aggregate-stats or noop
    #[argh(option)]
    pub(crate) projection: String,

    /// go ahead (without it, only says what would be cleared)
    #[argh(switch)]
    pub(crate) yes: bool,
}

/// Change a projection's number of partitions, exactly: no event is applied twice or skipped.
/// Processes still running the old layout stop at their next transaction; start the new
/// layout's processes with --total-partitions set to the new count afterwards.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "repartition")]
pub(crate) struct Repartition {
    /// the projection: users, aggregate-stats, aggregate-stats-batch or noop
    #[argh(option)]
    pub(crate) projection: String,

    /// the new number of partitions
    #[argh(option)]
    pub(crate) to: String,
}

/// How parsing the command line ended, when it did not give a command to run.
pub(crate) enum Parsed {
    /// `--help`: print this and exit 0.
    Help(String),
    /// Bad usage: print this and exit 2.
    Usage(String),
}

pub(crate) fn parse(args: &[String]) -> Result<Args, Parsed> {
    let name = args
        .first()
        .map_or("projector", |a| a.rsplit('/').next().unwrap_or("projector"));
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    Args::from_args(&[name], &rest).map_err(|exit| match exit.status {
        Ok(()) => Parsed::Help(exit.output),
        Err(()) => Parsed::Usage(exit.output),
    })
}

/// A flag's value, or else the environment variable's, with the name to quote in errors.
pub(crate) fn flag_or_env(
    flag: &str,
    value: Option<String>,
    variable: &str,
) -> Option<(String, String)> {
    match value {
        Some(value) => Some((flag.to_owned(), value)),
        None => std::env::var(variable)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| (format!("{variable} (from the environment)"), v)),
    }
}
