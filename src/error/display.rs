//! How each error reads: a short lowercase phrase that names the thing and says what to do.

use std::fmt;

use super::*;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidSetting {
                setting,
                value,
                reason,
            } => write!(f, "invalid value '{value}' for {setting}: {reason}"),
            Error::InvalidConnectionString { setting, reason } => {
                write!(f, "{setting} is not a valid connection string: {reason}")
            }
            Error::LoginRefused {
                target, setting, ..
            } => write!(
                f,
                "the database at {target} refused the login: check the user and password in \
                 {setting}"
            ),
            Error::NoSuchDatabase {
                target, setting, ..
            } => write!(
                f,
                "no such database at {target}: check the database name in {setting}, or create \
                 the database"
            ),
            Error::Connect { target, source } => {
                write!(f, "could not connect to the database at {target}")?;
                if source.code() == Some(&postgres::error::SqlState::TOO_MANY_CONNECTIONS) {
                    f.write_str(
                        ": the server has no connection slot left; raise its max_connections, or \
                         run fewer processes or fewer partitions per process (each process uses \
                         one connection per owned partition, plus two)",
                    )?;
                }
                Ok(())
            }
            Error::Pool { .. } => write!(
                f,
                "no database connection became available in time: check that the database is up, \
                 or increase the pool size"
            ),
            Error::Database { action, .. } => write!(f, "database error while {action}"),
            Error::MissingTables { schema, tables } => write!(
                f,
                "table(s) {} not found in schema '{schema}': run `projector migrate` first",
                tables.join(", ")
            ),
            Error::NoSuchSchema { schema, setting } => write!(
                f,
                "schema '{schema}' does not exist: check the name given by {setting} (it is \
                 case-sensitive), or run `projector migrate` to create it with the projector's \
                 tables"
            ),
            Error::UnexpectedColumns {
                schema,
                table,
                columns,
            } => {
                let columns: Vec<String> = columns
                    .iter()
                    .map(|(column, expected, found)| match found {
                        Some(found) => format!("{table}.{column} is {found}, expected {expected}"),
                        None => format!("{table}.{column} is missing, expected {expected}"),
                    })
                    .collect();
                write!(
                    f,
                    "table '{schema}.{table}' is not the projector's ({}): it seems to belong to \
                     another tool; give the projector a schema of its own",
                    columns.join("; ")
                )
            }
            Error::LayoutMismatch {
                projection,
                stored,
                requested,
            } => {
                let stored: Vec<String> = stored.iter().map(u32::to_string).collect();
                write!(
                    f,
                    "projection '{projection}' has checkpoints for {} partition(s), not {requested}: \
                     a checkpoint only holds under the partition count that wrote it, so running \
                     with {requested} would skip or repeat events: build the runner with \
                     Builder::total_partitions({})",
                    stored.join(" and "),
                    stored.first().map(String::as_str).unwrap_or("?"),
                )?;
                if stored.len() == 1 {
                    write!(
                        f,
                        ", or move the projection to {requested} partitions exactly with \
                         projector::repartition"
                    )
                } else {
                    f.write_str(", or rebuild the projection with projector::reset")
                }
            }
            Error::VersionConflict {
                aggregate,
                expected,
                actual,
            } => {
                write!(f, "version conflict on {aggregate}: expected {expected}, ")?;
                match actual {
                    Some(actual) => write!(f, "found version {actual}")?,
                    None => f.write_str("another append got there first")?,
                }
                f.write_str("; reload the aggregate and retry")
            }
            Error::InvalidAppend { reason } => write!(f, "cannot append: {reason}"),
            Error::Projection {
                projection,
                partition,
                total,
                position,
                aggregate_id,
                event_type,
                attempts,
                ..
            } => write!(
                f,
                "projection '{projection}' failed on partition {partition}/{total} at global position \
                 {position} (aggregate '{aggregate_id}', event type '{event_type}') after {attempts} \
                 attempt(s); its checkpoint is left before this event, fix the cause and restart"
            ),
            Error::ParkStorm {
                projection,
                limit,
                window,
                partition,
                total,
                position,
                aggregate_id,
                ..
            } => write!(
                f,
                "park storm: projection '{projection}' gave up on the events of more than \
                 {limit} aggregates within {} s, which points to a bug rather than to bad \
                 events; it stopped on partition {partition}/{total} before global position \
                 {position} (aggregate '{aggregate_id}') instead of parking one more. \
                 `projector dead-letters list --projection {}` shows why the parked ones \
                 failed: fix the cause, restart, then retry them (or raise the park storm limit)",
                window.as_secs(),
                crate::shell_word(projection)
            ),
            Error::Fenced {
                projection,
                total,
                current,
            } => match current[..] {
                [now] if now != *total => write!(
                    f,
                    "fenced: projection '{projection}' now runs with {now} partitions; this \
                     process ({total} partitions) stops"
                ),
                _ => write!(
                    f,
                    "fenced: projection '{projection}' was reset, rewound or re-partitioned after \
                     this process started; this process ({total} partitions) stops: start it \
                     again to carry on from the current checkpoints"
                ),
            },
            Error::VersionRetired {
                projection,
                version,
                live,
            } => write!(
                f,
                "version {version} of projection '{projection}' was retired: version {live} is \
                 live (`projector promote`), so this process stops; run version {live}, and \
                 drop this one with `projector retire --projection {} --version {version}`",
                crate::shell_word(projection)
            ),
            Error::ProjectionRunning { projection, held } => {
                let held: Vec<String> = held
                    .iter()
                    .map(|h| {
                        let (key, total, pid) = (h.partition_key, h.total_partitions, h.server_pid);
                        match h.process {
                            Some(process) => {
                                format!("{key}/{total} (server pid {pid}, process {process})")
                            }
                            None => format!("{key}/{total} (server pid {pid})"),
                        }
                    })
                    .collect();
                write!(
                    f,
                    "projection '{projection}' is running: live processes hold partition(s) {}; \
                     stop them first",
                    held.join(", ")
                )
            }
            Error::ReadModel {
                projection, action, ..
            } => write!(f, "projection '{projection}' failed while {action}"),
            Error::ThreadPanicked { thread } => write!(f, "thread '{thread}' panicked"),
            Error::Metrics { reason } => write!(f, "setting up the metrics: {reason}"),
            Error::SqlProjectionFile {
                file,
                section,
                line,
                reason,
            } => {
                write!(f, "projection file '{file}'")?;
                if let Some(section) = section {
                    write!(f, ", section `-- {section}`")?;
                }
                if let Some(line) = line {
                    write!(f, " (line {line})")?;
                }
                write!(f, ": {reason}")
            }
            Error::NotStarted { projection, schema } => write!(
                f,
                "projection '{projection}' has no checkpoints in schema '{schema}': no projector \
                 has run it there (or it was reset since); start one for it first, or check the \
                 projection's name and the schema"
            ),
            Error::NotAppliedInTime {
                projection,
                position,
                aggregate_id,
                partition,
                total,
                checkpoint,
                behind,
                behind_counted_at_most,
                held_by_pid,
                waited,
            } => {
                write!(
                    f,
                    "projection '{projection}' has not applied global position {position} after \
                     {:.1} s: ",
                    waited.as_secs_f64()
                )?;
                match aggregate_id {
                    Some(id) => write!(
                        f,
                        "partition {partition}/{total}, which applies it (aggregate '{id}'), is \
                         at checkpoint {checkpoint}"
                    )?,
                    None => write!(
                        f,
                        "no event is stored there (not committed yet, or rolled back), so every \
                         partition must pass it, and partition {partition}/{total} is at \
                         checkpoint {checkpoint}"
                    )?,
                }
                match behind {
                    Some(n) if n >= behind_counted_at_most => {
                        write!(f, ", at least {n} events behind")?
                    }
                    Some(0) => f.write_str(" (no event is stored after it up to there)")?,
                    Some(n) => write!(f, ", {n} event(s) behind")?,
                    None => {}
                }
                match held_by_pid {
                    Some(pid) => write!(
                        f,
                        "; a live process holds that partition (server pid {pid}) but has not got \
                         there"
                    ),
                    None => write!(
                        f,
                        "; no live process holds that partition: is a projector running for \
                         '{projection}'?"
                    ),
                }
            }
            Error::EventParked {
                projection,
                position,
                aggregate_id,
                partition,
                total,
                first_parked,
                reason,
            } => {
                write!(
                    f,
                    "projection '{projection}' has parked global position {position} (aggregate \
                     '{aggregate_id}') instead of applying it: {reason}; partition \
                     {partition}/{total} has passed it, but the read model shows neither it nor \
                     any later event of the aggregate"
                )?;
                if first_parked < position {
                    write!(f, " (parked since global position {first_parked})")?;
                }
                f.write_str(" until a retry applies them")
            }
            Error::Unavailable { waited, .. } => write!(
                f,
                "gave up after {} s without the database (the limit is Builder::give_up_after): \
                 check that it is up and reachable, then start again",
                waited.as_secs()
            ),
        }
    }
}
