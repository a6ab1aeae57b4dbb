//! The command line, as flags and environment variables.

use argh::FromArgs;

pub(crate) use crate::cli::flag_order::Parsed;
use crate::cli::flag_order::{with_flags_in_place, with_watch_seconds};

/// Runs event-sourcing projections over a PostgreSQL event store, split into hash partitions.
/// With no subcommand, runs a projection for the partitions given.
#[derive(FromArgs, Debug)]
pub(crate) struct Args {
    /// partition key(s) this process owns: 2, a list 0,2, a range 0-3, or auto to share the
    /// partitions with the other live processes of the projection (env PARTITION_KEY)
    #[argh(option)]
    pub(crate) partition_key: Option<String>,

    /// number of partitions the stream is split into, default 4 (env TOTAL_PARTITIONS)
    #[argh(option)]
    pub(crate) total_partitions: Option<String>,

    /// projection(s) to run, comma-separated, sharing one read of the stream: users (default, unless --projection-file is given), aggregate-stats, aggregate-stats-batch (set-based), noop (moves checkpoints only)
    #[argh(option)]
    pub(crate) projection: Option<String>,

    /// a projection written in SQL: a file, or a folder whose *.sql files all run (sorted by
    /// name); may be repeated, and combined with --projection
    #[argh(option)]
    pub(crate) projection_file: Vec<String>,

    /// events read per query, from 1 to 100000, default 5000
    #[argh(option)]
    pub(crate) batch_size: Option<String>,

    /// milliseconds to wait before reading again once caught up, default 100
    #[argh(option)]
    pub(crate) poll_interval_ms: Option<String>,

    /// how long to keep trying to reach a lost database before exiting 1, as 90s, 10m or 1h
    /// (a bare number is seconds), default 10m (env PROJECTOR_GIVE_UP_AFTER)
    #[argh(option)]
    pub(crate) give_up_after: Option<String>,

    /// what to do with an event that still fails after 3 attempts: stop (default) stops the
    /// projection just before it; park parks it and the later events of its aggregate in
    /// projection_dead_letters and goes on with the other aggregates. For one projection of
    /// several: NAME=park (a list: park,users=stop)
    #[argh(option)]
    pub(crate) on_poison: Option<String>,

    /// with park: a projection that would park more than N aggregates within a minute stops
    /// just before the next poison event instead (a bug, not bad events), default 20; 0 never
    /// stops
    #[argh(option)]
    pub(crate) park_storm_limit: Option<String>,

    /// stop once caught up with the head of the stream as it was at start
    #[argh(switch)]
    pub(crate) exit_when_caught_up: bool,

    /// build a new version of a projection with side effects from the first event, doing its
    /// effects again, instead of from where the live version is
    #[argh(switch)]
    pub(crate) replay_side_effects: bool,

    /// promote a later version of a projection file this process runs (`-- version: N`) once
    /// it is within N positions of the head, as `projector promote` does; off by default
    #[argh(option)]
    pub(crate) promote_within: Option<String>,

    /// removed: exits 2 saying to run `projector repartition` instead
    #[argh(switch, hidden_help)]
    pub(crate) repartition: bool,

    /// database connection string (env DATABASE_URL)
    #[argh(option)]
    pub(crate) database_url: Option<String>,

    /// a physical streaming replica of the database to read the stream from far from its
    /// head, taking that load off the primary; near the head, or while the replica lags or is
    /// down, the primary is read (env READ_REPLICA_URL)
    #[argh(option)]
    pub(crate) read_replica_url: Option<String>,

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

    /// serve metrics (/metrics, Prometheus text format) and health checks (/health/live,
    /// /health/ready) over HTTP at HOST:PORT, e.g. 127.0.0.1:9464; off by default (env
    /// PROJECTOR_METRICS_ADDR)
    #[argh(option)]
    pub(crate) metrics_addr: Option<String>,

    /// most positions an owned partition may be behind the head for /health/ready to answer
    /// 200, default 1000
    #[argh(option)]
    pub(crate) ready_max_lag: Option<String>,

    /// log lines as text (default) or json: one JSON object per line (env PROJECTOR_LOG_FORMAT)
    #[argh(option)]
    pub(crate) log_format: Option<String>,

    #[argh(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub(crate) enum Command {
    Migrate(Migrate),
    Seed(Seed),
    Append(super::append::Append),
    Status(Status),
    Reset(Reset),
    Repartition(Repartition),
    Rewind(super::rewind::Rewind),
    Wait(Wait),
    Pause(Pause),
    Resume(Resume),
    DeadLetters(super::dead_letters::DeadLetters),
    Promote(super::version::Promote),
    Retire(super::version::Retire),
}

/// Create the event store and checkpoint tables (safe to run again).
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "migrate",
    note = "The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Migrate {}

/// Append demo users: each is created, then renamed and given new e-mail addresses.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "seed",
    note = "The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Seed {
    /// users to create, from 0 to 100000000, default 1000
    #[argh(option)]
    pub(crate) users: Option<String>,

    /// renames per user, from 0 to 1000, default 1
    #[argh(option)]
    pub(crate) renames: Option<String>,

    /// e-mail changes per user, from 0 to 1000, default 1
    #[argh(option)]
    pub(crate) email_changes: Option<String>,

    /// append nothing when the store already holds events
    #[argh(switch)]
    pub(crate) if_empty: bool,
}

/// Show each projection's layout and checkpoints, lag in events and time, the live process
/// holding each partition, and any re-partitioning in progress.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "status",
    note = "The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Status {
    /// show only this projection
    #[argh(option)]
    pub(crate) projection: Option<String>,

    /// print one JSON document instead of a table
    #[argh(switch)]
    pub(crate) json: bool,

    /// print the table again every SECONDS (default 2), with each partition's rate and ETA,
    /// until interrupted: redrawn in place on a terminal, one table after another otherwise
    #[argh(option)]
    pub(crate) watch: Option<String>,
}

/// Delete a projection's checkpoints and clear its read model, so that it rebuilds from the
/// first event at its next start. Refused while a live process holds one of its partitions.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "reset",
    note = "The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Reset {
    /// the projection to reset: users, aggregate-stats, aggregate-stats-batch or noop; or
    /// another projection with checkpoints in the schema (a service's): its checkpoints and
    /// parked events only, its read model being the service's
    #[argh(option)]
    pub(crate) projection: Option<String>,

    /// the projection to reset, written in SQL: its file (its `-- reset` section clears the
    /// read model)
    #[argh(option)]
    pub(crate) projection_file: Option<String>,

    /// go ahead (without it, only says what would be cleared)
    #[argh(switch)]
    pub(crate) yes: bool,
}

/// Change the number of partitions of projections, exactly: no event is applied twice or
/// skipped. Processes still running the old layout stop at their next transaction; start the
/// new layout's processes with --total-partitions set to the new count afterwards.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "repartition",
    note = "The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Repartition {
    /// the projection(s), comma-separated, as a run takes them: users, aggregate-stats,
    /// aggregate-stats-batch, noop, or any with checkpoints in this schema
    #[argh(option)]
    pub(crate) projection: Option<String>,

    /// the projection of a SQL file, or of each *.sql file of a folder; may be repeated, and
    /// combined with --projection (as a run takes them)
    #[argh(option)]
    pub(crate) projection_file: Vec<String>,

    /// the new number of partitions
    #[argh(option)]
    pub(crate) to: String,
}

/// Wait until a projection has applied an event (read your writes): until the partition that
/// owns its aggregate has a checkpoint at or past it. Exits 0 once it has, 1 on time-out, 2 for
/// bad usage or a projection that has never run, 3 when the projection parked the event instead
/// of applying it.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "wait",
    note = "Give exactly one of --position and --aggregate. The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Wait {
    /// the projection, by its name (any projection, the built-in ones or one of a service's)
    #[argh(option)]
    pub(crate) projection: String,

    /// the version of the projection to wait on, default the live one
    #[argh(option)]
    pub(crate) version: Option<String>,

    /// the global position of the event, as append returned it; when no event is stored
    /// there, every partition must pass it
    #[argh(option)]
    pub(crate) position: Option<String>,

    /// the aggregate id: wait for its latest event as of now
    #[argh(option)]
    pub(crate) aggregate: Option<String>,

    /// how long to wait before exiting 1, as 5s, 2m or 1h (a bare number is seconds), default 5s
    #[argh(option)]
    pub(crate) timeout: Option<String>,
}

/// Pause a projection: its running processes finish the transaction in progress, then hold
/// their partitions without applying (within about a second) until `projector resume`; a
/// process started meanwhile holds them too. Pausing twice is harmless.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "pause",
    note = "The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Pause {
    /// the projection, by its name: a built-in one or any with checkpoints in this schema
    #[argh(option)]
    pub(crate) projection: String,
}

/// Resume a paused projection: its running processes apply again within about a second,
/// reading what was appended meanwhile.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "resume",
    note = "The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Resume {
    /// the projection, by its name: a built-in one or any with checkpoints in this schema
    #[argh(option)]
    pub(crate) projection: String,
}

pub(crate) fn parse(args: &[String]) -> Result<Args, Parsed> {
    let name = args
        .first()
        .map_or("projector", |a| a.rsplit('/').next().unwrap_or("projector"));
    let args = with_watch_seconds(args);
    let rest = with_flags_in_place(args.iter().skip(1).map(String::as_str).collect())?;
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
