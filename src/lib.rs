//! Partitioned, exactly-once event-sourcing projections over a PostgreSQL event store.
//!
//! # Events
//! Events live in one append-only `events` table (the layout of pupsourcing's PostgreSQL
//! store), each with a `global_position` that grows with every append. [`append`] adds events
//! to one aggregate with an [`ExpectedVersion`]; [`read_stream`] reads one aggregate back.
//!
//! # Partitions
//! The stream is split into `N` partitions by aggregate: an event belongs to partition
//! [`partition_of`]`(aggregate_id, N)`, FNV-1a 32-bit of the id modulo `N`. All events of one
//! aggregate are in one partition and are applied in order. Several processes (or several
//! threads of one) share the partitions: each owns some keys.
//!
//! # The journey of an event
//! A [`Runner`] has one **fetcher** thread that reads the stream in batches, in position
//! order, and a **router** thread that hands each event over a bounded channel to the
//! **worker** thread of its partition, for each projection the runner hosts; events of
//! partitions the process does not own, or outside a projection's [`Scope`], are dropped there.
//! Each worker applies its events through the [`Projection`] and commits the read-model change
//! and the partition's checkpoint in **one transaction**. Full channels make the fetcher wait,
//! so memory stays bounded whatever the backlog.
//!
//! # Several projections
//! [`Builder::projection`] adds projections to a runner: they share one read of the stream,
//! and each has its own checkpoints, layout and transactions. One that fails stops alone while
//! the others go on. A partition far behind the others at start (a projection just added)
//! reads its own events until it has caught up, then joins the shared read.

//! # Queued writes
//! A handler that sends one statement per event pays a round trip per event. Instead,
//! [`Projection::apply`] can queue a row of a [`QueuedWrite`] on its [`Context`]
//! ([`Context::queue`]): the worker sends the rows of a transaction's events together, one
//! execution per statement with an array per column (`unnest`), before it writes the
//! checkpoint, in the same transaction. Rows that repeat a key go into later executions, in
//! the order queued, so a later write of a key wins; a failure of a sent statement is traced
//! to its event by applying the events again one by one. The built-in `aggregate-stats` and
//! `users` work this way.
//!
//! # Checkpoints
//! A checkpoint is kept per projection, partition count and partition. The worker locks its
//! row (`FOR UPDATE`) in every transaction and applies only events above it, so a restart
//! repeats nothing. While it works a partition, a worker holds a session advisory lock on it:
//! a second process started on the same partition stands by and takes over when the first
//! one's connection goes, and [`status`] shows which partitions a live process holds.
//!
//! # Changing the number of partitions
//! Starting a projection with another partition count than its checkpoints were written under
//! is refused ([`Error::LayoutMismatch`]); the count changes only through [`repartition`], so a
//! process restarted with stale flags cannot move the layout back. [`repartition`] records the
//! old layout's checkpoint vector `C` and replaces its rows: every new partition starts
//! at `min(C)` and skips an event exactly when `position <= C[partition_of(aggregate, old
//! count)]`, until it passes `max(C)`; chains of changes keep the list of earlier vectors
//! still needed ([`EarlierLayout`]). A runner of a replaced layout finds its checkpoint row gone
//! at its next transaction and stops with [`Error::Fenced`]. [`reset`] clears a projection's
//! checkpoints and, through [`Projection::reset`], its read model, so that it rebuilds;
//! [`rewind`] moves its checkpoints back to a position or a time, leaving its read model as it
//! is, so that it applies every later event again.
//!
//! # Versions
//! A projection has a version ([`Projection::version`], default 1; `-- version: N` in a SQL
//! file). Version 1 is kept as before versions existed; version `N >= 2` keeps its checkpoints,
//! layout, parked events and states under the name `name@N` ([`stored_name`]) and its read
//! model in the schema `<schema>_vN` ([`read_model_schema`]), first in the `search_path` of its
//! transactions, so it builds beside the live version (in the same runner, as a straggler of
//! the shared read, or in its own processes). Readers query the views of the readers' schema
//! `<schema>_readers` ([`readers_schema`]), over the live version's tables. [`promote`] makes a
//! caught-up version live in one transaction (the readers' views replaced, the old version's
//! checkpoints deleted, so its runners stop with [`Error::VersionRetired`]); [`retire`] drops a
//! version that is not live. A new version of a projection that
//! [has side effects](Projection::has_side_effects) starts where the live version is.
//!
//! # Sharing partitions
//! Instead of owning given keys, the processes of a projection may share its partitions:
//! [`Builder::share_partitions`] (`--partition-key auto`). With `P` such processes live, each
//! holds `floor(N/P)` or `ceil(N/P)` of the `N` partitions; when one starts, stops or dies, the
//! others hand partitions over (each finishing its transaction first), moving only those that
//! must, once the membership has settled for [`Settings::settle_after`]. Membership is a
//! session advisory lock each process holds in shared mode, so PostgreSQL is the only
//! coordinator, and the partition locks and checkpoint rows keep every event applied once
//! whoever holds a partition. A re-partitioning is followed without a restart by the CLI.
//! [`members`] lists the processes sharing a projection.
//!
//! # Faults
//! A lost connection is retried with capped back-off, and logged once per outage; a thread
//! that cannot reach the database for [`Settings::give_up_after`] stops the runner with
//! [`Error::Unavailable`]. A projection that keeps failing on an event stops all its workers at
//! once (and the runner, once every projection has stopped); any other failure (of the
//! fetcher, a panic outside a projection) stops every thread at once. A partition whose worker falls behind is left
//! out of the shared read and reads its own events until it catches up, so it does not hold
//! the others back. A process that stops answering loses its partitions within
//! [`Database::session_timeout_secs`].
//!
//! # Operations
//! [`Runner::metrics`] renders the runner's figures in the Prometheus text format (events
//! applied, checkpoints, lag, commit durations, retries, partition states, gaps) and answers
//! liveness and readiness checks ([`Metrics::live`], [`Metrics::ready`]). A projection that
//! stopped on an error is stored as failed, which `projector status` shows until its next
//! successful start; [`pause`] and [`resume`] hold a projection's partitions without applying
//! and let it go on; [`projection_states`] reads both.
//!
//! # Reading from a replica
//! [`Builder::read_replica`] moves the reads of a long catch-up to a physical streaming replica:
//! far from the head, the fetcher reads there below positions settled on the primary (the gap
//! rule) and replayed on the replica; near the head, and while the replica lags or fails, it
//! reads from the primary. Checkpoints and read models are always written on the primary.
//!
//! # Poison events
//! An event that still fails after the last attempt stops its projection by default
//! ([`PoisonPolicy::Stop`]). With [`PoisonPolicy::Park`] ([`Projection::poison_policy`], or
//! [`Builder::on_poison`] for a whole runner) the worker parks it in `projection_dead_letters`
//! in the transaction that moves the checkpoint past it, parks every later event of the same
//! aggregate behind it, in order, and goes on with the other aggregates. [`dead_letters()`] lists
//! them, [`retry`] applies an aggregate's parked events once the cause is fixed and releases
//! it, and [`drop_parked`] discards them; both are safe while the projection runs. Attempts
//! are counted per event. A projection that would park more than
//! [`Settings::park_storm_limit`] aggregates within [`Settings::park_storm_window`] (a bug
//! rather than bad events) stops instead, with [`Error::ParkStorm`].
//!
//! # Shutdown
//! [`Runner::shutdown`] (or a [`Stopper`] from another thread) disconnects a channel every
//! thread watches: the fetcher stops reading, each worker finishes the transaction it is in,
//! and [`Runner::join`] returns per-partition figures or the first error.
//! [`Runner::stopped_projections`] tells of each projection that stops (and why), and
//! [`Runner::is_finished`] whether every thread has ended, without waiting.
//!
//! # Example
//! ```no_run
//! use projector::{Builder, BoxError, Context, Database, Event, Projection};
//! use projector::postgres::Transaction;
//!
//! #[derive(Clone)]
//! struct CountEvents;
//!
//! impl Projection for CountEvents {
//!     fn name(&self) -> &str {
//!         "event-counts"
//!     }
//!
//!     fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
//!         tx.batch_execute(
//!             "CREATE TABLE IF NOT EXISTS event_counts (event_type TEXT PRIMARY KEY, n BIGINT NOT NULL)",
//!         )?;
//!         Ok(())
//!     }
//!
//!     fn apply(&mut self, tx: &mut Transaction<'_>, event: &Event, _: &Context) -> Result<(), BoxError> {
//!         tx.execute(
//!             "INSERT INTO event_counts VALUES ($1, 1) \
//!              ON CONFLICT (event_type) DO UPDATE SET n = event_counts.n + 1",
//!             &[&event.event_type],
//!         )?;
//!         Ok(())
//!     }
//! }
//!
//! fn main() -> Result<(), projector::Error> {
//!     let database = Database::new("postgres://app@localhost/app")?;
//!     let summary = Builder::new(database, CountEvents)
//!         .partitions(0..4)
//!         .total_partitions(4)
//!         .exit_when_caught_up(true)
//!         .start()?
//!         .join()?;
//!     println!("applied {} events", summary.applied());
//!     Ok(())
//! }
//! ```

mod dead_letters;
mod engine;
mod error;
mod event;
mod layout;
mod ops;
mod partition;
pub mod projections;
mod store;
mod wait;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use dead_letters::{
    DeadLetter, Dropped, Retried, dead_letters, dead_letters_of, drop_parked, retry,
};
pub use engine::builder::{Builder, MAX_BATCH_SIZE};
pub use engine::notice::ProjectionStopped;
pub use engine::runner::{ProjectionSummary, Runner, Summary};
pub use engine::settings::{Settings, Stopper};
pub use engine::worker::PartitionSummary;
pub use error::{BoxError, Error, HeldPartition};
pub use event::{Event, ExpectedVersion, NewEvent, Scope};
pub use layout::{EarlierLayout, LayoutChange, repartition};
pub use ops::health::{Health, READY_GAP_LIMIT};
pub use ops::members::{Member, members};
pub use ops::metrics::{Metrics, SCRAPE_TIMEOUT};
pub use ops::rewind::{PartitionRewind, Rewind, RewindTo, plan_rewind, rewind};
pub use ops::status::{CheckpointStatus, Cleared, reset, reset_checkpoints, status};
pub use ops::version::{ProjectionVersion, Promoted, Retired, promote, retire, versions};
pub use partition::{
    MAX_PARTITIONS, fnv1a32, parse_partition_keys, parse_total_partitions, partition_of,
};
pub use postgres;
pub use projections::projection::{Context, PoisonPolicy, Projection};
pub use projections::queued::QueuedWrite;
pub use store::append::{Appender, append};
pub use store::database::{Database, Pool};
pub use store::migration::migrate;
pub use store::read_stream;
pub use store::registry::{
    VersionState, live_stored_name, read_model_schema, readers_schema, split_stored_name,
    stored_name,
};
pub use store::state::{ProjectionState, StateKind, pause, projection_states, resume};
pub use wait::{Applied, Until, Waiter, wait_for};

/// An error and all its causes, as one line: `outer: cause: root cause`.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A duration as people read an ETA, to the nearest second: `42s`, `3m20s`, `1h02m`.
pub fn readable_duration(duration: Duration) -> String {
    let s = duration.as_secs_f64().round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// `text` as one word a POSIX shell reads back exactly, for the commands messages suggest: as
/// it is when it is plain (`cart-7`), in single quotes otherwise (`'it'\''s here'`), and in
/// `$'...'` with escapes when it holds control characters (a newline, an escape sequence),
/// which are then never written to the terminal raw.
pub fn shell_word(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:@%+=,".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        return text.to_owned();
    }
    if !text.chars().any(char::is_control) {
        return format!("'{}'", text.replace('\'', r"'\''"));
    }
    let mut quoted = String::from("$'");
    for c in text.chars() {
        match c {
            '\'' => quoted.push_str(r"\'"),
            '\\' => quoted.push_str(r"\\"),
            '\n' => quoted.push_str(r"\n"),
            '\t' => quoted.push_str(r"\t"),
            '\r' => quoted.push_str(r"\r"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('\'');
    quoted
}

/// Locks `mutex`, taking its data even if a thread panicked while holding it: the data guarded
/// in this crate (positions, stop senders, outage state) stays valid whatever the panic.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The delay before retry number `attempt` (1-based): `first`, doubling, at most `max`.
pub(crate) fn backoff(attempt: u32, first: Duration, max: Duration) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    first.saturating_mul(factor).min(max)
}

/// Now, in milliseconds since the epoch (0 if the clock is before it).
pub(crate) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shell_word_reads_back_as_the_text() {
        assert_eq!(shell_word("cart-7"), "cart-7");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("with space "), "'with space '");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word("a\nb"), r"$'a\nb'");
        assert_eq!(shell_word("esc\u{1b}[31m'x"), r"$'esc\u001b[31m\'x'");
    }

    #[test]
    fn durations_read_as_hours_minutes_or_seconds() {
        assert_eq!(readable_duration(Duration::from_secs(42)), "42s");
        assert_eq!(readable_duration(Duration::from_secs(200)), "3m20s");
        assert_eq!(readable_duration(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let first = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let delays: Vec<u128> = (1..=8)
            .map(|n| backoff(n, first, max).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
