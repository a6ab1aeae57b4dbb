//! The crate's one error type.

mod display;

use std::fmt;
use std::time::Duration;

/// The error a projection's `apply` may return: any error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the projector.
///
/// Display is a short phrase naming the thing at fault (setting, projection, partition,
/// position) and, where it helps, what to do; the cause is reachable through
/// [`source`](std::error::Error::source). No variant ever holds a password.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A setting has a value that cannot be used.
    InvalidSetting {
        /// The setting, in the words of the call that took it: a method
        /// (`Builder::partitions`, `Database::schema`), a function's parameter
        /// (`repartition(total)`, `aggregate id` for the dead-letter functions), or the name
        /// the caller gave a parsing function (`parse_partition_keys("--partition-key", ..)`).
        setting: String,
        /// The value given.
        value: String,
        /// Why it cannot be used and what to give instead.
        reason: String,
    },
    /// A connection string could not be used. Neither field holds any part of it.
    InvalidConnectionString {
        /// Where it came from, such as `DATABASE_URL (from the environment)`.
        setting: String,
        /// Why, in words that quote nothing of the string.
        reason: String,
    },
    /// The server refused the login: wrong password, unknown user, or a user that may not log
    /// in from here.
    LoginRefused {
        /// Where, with the password removed.
        target: String,
        /// Where the connection string came from.
        setting: String,
        /// The driver's error.
        source: postgres::Error,
    },
    /// The database named in the connection string does not exist on the server.
    NoSuchDatabase {
        /// Where, with the password removed.
        target: String,
        /// Where the connection string came from.
        setting: String,
        /// The driver's error.
        source: postgres::Error,
    },
    /// The database could not be reached.
    Connect {
        /// Where, with the password removed.
        target: String,
        /// The driver's error.
        source: postgres::Error,
    },
    /// No pooled connection became available in time.
    Pool {
        /// The pool's error.
        source: r2d2::Error,
    },
    /// A statement failed.
    Database {
        /// What the projector was doing.
        action: String,
        /// The driver's error.
        source: postgres::Error,
    },
    /// The schema lacks the projector's tables.
    MissingTables {
        /// The schema looked in.
        schema: String,
        /// The tables not found.
        tables: Vec<String>,
    },
    /// The schema asked for does not exist.
    NoSuchSchema {
        /// The schema.
        schema: String,
        /// Where its name came from (`--schema`, `PROJECTOR_SCHEMA (from the environment)`).
        setting: String,
    },
    /// A table of one of the projector's names lacks columns it needs, or has them with other
    /// types: it seems to belong to another tool, or was changed by hand.
    UnexpectedColumns {
        /// The schema it is in.
        schema: String,
        /// The table.
        table: String,
        /// Each column at fault as `(column, expected type, type found)`; no type found when
        /// the column is missing.
        columns: Vec<(String, String, Option<String>)>,
    },
    /// The projection's checkpoints were written under another partition count.
    LayoutMismatch {
        /// The projection.
        projection: String,
        /// Partition counts found in the stored checkpoints.
        stored: Vec<u32>,
        /// The partition count asked for.
        requested: u32,
    },
    /// An append found the aggregate at another version than expected.
    VersionConflict {
        /// `bounded_context/aggregate_type/aggregate_id`.
        aggregate: String,
        /// What the caller expected.
        expected: crate::ExpectedVersion,
        /// The version found (0: no stream), when known.
        actual: Option<i64>,
    },
    /// An append was given events that cannot be stored together.
    InvalidAppend {
        /// What is wrong.
        reason: String,
    },
    /// A projection kept failing on one event; its checkpoint is left just before it.
    Projection {
        /// The projection's name.
        projection: String,
        /// The partition key.
        partition: u32,
        /// The number of partitions.
        total: u32,
        /// Global position of the failing event.
        position: i64,
        /// Its aggregate id.
        aggregate_id: String,
        /// Its event type.
        event_type: String,
        /// How many times it was tried.
        attempts: u32,
        /// The projection's error, or the panic message.
        source: BoxError,
    },
    /// A projection with the park policy parked more aggregates than
    /// [`Settings::park_storm_limit`](crate::Settings::park_storm_limit) within
    /// [`Settings::park_storm_window`](crate::Settings::park_storm_window) and failed on yet
    /// another event: it stopped just before that event, as under the stop policy.
    ParkStorm {
        /// The projection's name.
        projection: String,
        /// The limit: it had parked (or was about to park) this many aggregates within the
        /// window when yet another event failed for good.
        limit: u32,
        /// The window.
        window: Duration,
        /// The partition key of the event it stopped before.
        partition: u32,
        /// The number of partitions.
        total: u32,
        /// Global position of that event.
        position: i64,
        /// Its aggregate id.
        aggregate_id: String,
        /// The projection's error for it.
        source: BoxError,
    },
    /// This process's layout was replaced (re-partitioned, or the projection reset or rewound)
    /// after it started: its checkpoint row is gone, so it stops before applying anything more.
    Fenced {
        /// The projection.
        projection: String,
        /// The partition count this process runs with.
        total: u32,
        /// The partition counts now stored (empty after a reset).
        current: Vec<u32>,
    },
    /// A version of a projection was replaced by another (`projector promote`): a process of
    /// it stops at its next transaction, and a start of it is refused.
    VersionRetired {
        /// The projection, as it names itself (without `@N`).
        projection: String,
        /// The version this process runs.
        version: u32,
        /// The version now live.
        live: u32,
    },
    /// A reset or a rewind was refused because live processes hold partitions of the projection.
    ProjectionRunning {
        /// The projection.
        projection: String,
        /// Each held partition, with who holds it.
        held: Vec<HeldPartition>,
    },
    /// A projection's `setup` or `reset` hook failed.
    ReadModel {
        /// The projection.
        projection: String,
        /// What it was doing, such as "clearing its read model".
        action: String,
        /// The projection's error.
        source: BoxError,
    },
    /// The database could not be reached for longer than the give-up limit
    /// ([`Settings::give_up_after`](crate::Settings::give_up_after)).
    Unavailable {
        /// How long it was tried.
        waited: std::time::Duration,
        /// The last failure.
        source: Box<Error>,
    },
    /// [`wait_for`](crate::wait_for) found no checkpoints of the projection: no process has
    /// run it in this schema (or it was reset since).
    NotStarted {
        /// The projection.
        projection: String,
        /// The schema looked in.
        schema: String,
    },
    /// [`wait_for`](crate::wait_for) ran out of time before the projection applied the event.
    NotAppliedInTime {
        /// The projection.
        projection: String,
        /// The global position waited for.
        position: i64,
        /// The aggregate of the event there; `None` when no event is stored at that position
        /// (not committed yet, or rolled back), so that every partition must pass it.
        aggregate_id: Option<String>,
        /// The partition that applies the event; with no event, the one furthest behind.
        partition: u32,
        /// The projection's number of partitions.
        total: u32,
        /// That partition's checkpoint.
        checkpoint: i64,
        /// Events stored after the checkpoint, up to the position (of every partition, as
        /// `projector status` counts lag), counted up to `behind_counted_at_most`; `None` if
        /// they could not be counted.
        behind: Option<i64>,
        /// Where counting stopped.
        behind_counted_at_most: i64,
        /// The server process id of the connection through which a live process holds that
        /// partition; `None` when no live process does.
        held_by_pid: Option<i32>,
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// [`wait_for`](crate::wait_for) found the event parked: the projection's partition has
    /// passed it, but set it aside in `projection_dead_letters` (the park policy) instead of
    /// applying it, so the read model does not show it, nor any later event of its aggregate,
    /// until a [`retry`](crate::retry) applies them.
    EventParked {
        /// The projection.
        projection: String,
        /// The global position waited for.
        position: i64,
        /// Its aggregate: the aggregate that is parked.
        aggregate_id: String,
        /// The partition that owns the aggregate.
        partition: u32,
        /// The projection's number of partitions.
        total: u32,
        /// The aggregate's first parked event: `position` itself when it is the event that
        /// failed, an earlier one when it is parked behind that one.
        first_parked: i64,
        /// Why it is parked, as recorded: the projection's error, or which event it is parked
        /// behind.
        reason: String,
    },
    /// The metrics could not be set up (a metric defined twice: a bug).
    Metrics {
        /// What the metrics library said.
        reason: String,
    },
    /// A projection file (a projection written in SQL) cannot be used: it does not parse, or
    /// the database refused one of its sections.
    SqlProjectionFile {
        /// The file, as given.
        file: String,
        /// The section at fault (`setup`, `apply`, `reset`, `scope`), when one is.
        section: Option<String>,
        /// The line of the file at fault, when known (1-based).
        line: Option<usize>,
        /// What is wrong, quoting the database's message, and what to do.
        reason: String,
    },
    /// A runtime thread ended without reporting (it panicked outside a projection).
    ThreadPanicked {
        /// The thread's name.
        thread: String,
    },
}

/// A partition a live process holds, as [`Error::ProjectionRunning`] names it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldPartition {
    /// The partition count of its layout.
    pub total_partitions: u32,
    /// The partition key.
    pub partition_key: u32,
    /// The server process id (`pg_stat_activity.pid`) of the connection holding it.
    pub server_pid: i32,
    /// The projector process's own OS pid, when its connection's `application_name` gives it
    /// (`projector pid P`, set unless the connection string names another).
    pub process: Option<u32>,
}

impl HeldPartition {
    /// A partition held through the connection of server pid `server_pid`, whose
    /// `application_name` is `application` (if the server shows it), as
    /// [`CheckpointStatus`](crate::CheckpointStatus) gives them.
    pub fn new(
        total_partitions: u32,
        partition_key: u32,
        server_pid: i32,
        application: Option<&str>,
    ) -> HeldPartition {
        HeldPartition {
            total_partitions,
            partition_key,
            server_pid,
            process: application
                .and_then(|name| name.strip_prefix("projector pid "))
                .and_then(|pid| pid.parse().ok()),
        }
    }
}

impl Error {
    /// The projection now runs with another partition count than this process started with
    /// (a re-partitioning): starting again runs on the new layout.
    pub fn is_layout_change(&self) -> bool {
        matches!(self, Error::Fenced { total, current, .. } if current.len() == 1 && current[0] != *total)
    }

    /// True when this process's layout was replaced by another stored one (a re-partitioning,
    /// or a rewind of the checkpoints), rather than removed by a reset: starting again runs
    /// on it. Processes that share partitions do so by themselves.
    pub fn is_layout_replaced(&self) -> bool {
        matches!(self, Error::Fenced { current, .. } if current.len() == 1)
    }

    /// True when the error comes from how the projector was configured or invoked (bad
    /// setting or connection string, a login refused, no such database, missing tables, tables
    /// of another shape, partition layout mismatch, a layout replaced under a running
    /// process, a reset refused, a projection waited for that never ran),
    /// rather than from a failure at run time. The
    /// command-line tool exits with code 2 for these: starting again with the same flags would
    /// not help.
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Error::InvalidSetting { .. }
                | Error::InvalidConnectionString { .. }
                | Error::LoginRefused { .. }
                | Error::NoSuchDatabase { .. }
                | Error::MissingTables { .. }
                | Error::NoSuchSchema { .. }
                | Error::UnexpectedColumns { .. }
                | Error::LayoutMismatch { .. }
                | Error::Fenced { .. }
                | Error::VersionRetired { .. }
                | Error::ProjectionRunning { .. }
                | Error::NotStarted { .. }
                | Error::SqlProjectionFile { .. }
        )
    }

    /// An [`Error::InvalidSetting`]: `setting` has `value`, which cannot be used because `reason`.
    pub fn invalid_setting(
        setting: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> Error {
        Error::InvalidSetting {
            setting: setting.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn database(action: impl Into<String>) -> impl FnOnce(postgres::Error) -> Error {
        let action = action.into();
        move |source| Error::Database { action, source }
    }

    /// True when the error means the connection to the database was lost (worth retrying
    /// on a fresh connection), as opposed to a statement the database refused.
    pub(crate) fn is_connection_loss(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Pool { .. } => true,
            Error::Database { source, .. } => is_connection_loss(source),
            _ => false,
        }
    }
}

/// A driver error that means the connection is gone rather than the statement refused.
///
/// Errors the driver raises itself (a type that does not convert, a query that returned no
/// row) have no SQLSTATE either, but retrying them cannot help: only a closed connection, an
/// I/O failure, a failed connection attempt or a time-out counts as lost.
pub(crate) fn is_connection_loss(error: &postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        None => {
            let io = std::error::Error::source(error)
                .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_some());
            io || matches!(
                error.to_string().as_str(),
                "error communicating with the server"
                    | "error connecting to server"
                    | "timeout waiting for server"
                    | "connection closed"
            )
        }
        // Class 08: connection exception; 57P01..57P03: the server is shutting down or starting;
        // 57P05 and 25P03: the server ended an idle session (see Settings::session_timeout).
        Some(code) => {
            let code = code.code();
            code.starts_with("08")
                || matches!(code, "57P01" | "57P02" | "57P03" | "57P05" | "25P03")
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. }
            | Error::LoginRefused { source, .. }
            | Error::NoSuchDatabase { source, .. }
            | Error::Database { source, .. } => Some(source),
            Error::Pool { source } => Some(source),
            Error::Unavailable { source, .. } => Some(source.as_ref()),
            Error::Projection { source, .. }
            | Error::ParkStorm { source, .. }
            | Error::ReadModel { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl From<r2d2::Error> for Error {
    fn from(source: r2d2::Error) -> Error {
        Error::Pool { source }
    }
}
