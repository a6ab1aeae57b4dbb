//! The command line's errors: the library's, told in the words of the command line (its flags
//! and commands), and the few only a command line can make (a flag not given, a removed flag,
//! a destructive command not confirmed). Each has its exit code.

use std::fmt;

use projector::{CheckpointStatus, Error, HeldPartition, shell_word};

/// Exit code of a `projector wait` for an event the projection parked instead of applying.
pub(crate) const EXIT_PARKED: u8 = 3;

/// What a command reports when it fails.
#[derive(Debug)]
pub(crate) enum CliError {
    /// The library's error; Display adds what to do from the command line.
    Library(Error),
    /// A required flag (or its environment variable) was not given.
    NotSet {
        /// The setting, such as `DATABASE_URL`.
        setting: String,
        /// How to give it.
        hint: String,
    },
    /// A flag that no longer exists was given.
    RemovedFlag {
        /// The flag.
        flag: String,
        /// What to do instead.
        instead: String,
    },
    /// A destructive command was not confirmed with `--yes`.
    NotConfirmed {
        /// What it would do, in words.
        action: String,
    },
    /// A destructive command was not confirmed, and confirming it would be refused for now.
    WouldBeRefused {
        /// What it would do, in words.
        action: String,
        /// Why it would be refused (such as [`Error::ProjectionRunning`]).
        because: Box<Error>,
    },
    /// `wait` timed out on a projection that is paused (`projector pause`).
    WaitedWhilePaused {
        /// The projection.
        projection: String,
        /// The time-out ([`Error::NotAppliedInTime`]).
        because: Box<Error>,
    },
}

impl CliError {
    /// The process's exit code: 1 for a failure at run time, 2 for bad usage or configuration
    /// (starting again with the same flags would not help), 3 for a `wait` whose event was
    /// parked rather than applied.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            CliError::Library(Error::EventParked { .. }) => EXIT_PARKED,
            CliError::WaitedWhilePaused { .. } => 1,
            CliError::Library(error) if !error.is_configuration() => 1,
            _ => 2,
        }
    }
}

impl CliError {
    /// A destructive command's dry run: [`CliError::NotConfirmed`], or, while live processes
    /// hold partitions of the projection (as `rows`, its `status`, show),
    /// [`CliError::WouldBeRefused`] naming them.
    pub(crate) fn not_confirmed(
        action: String,
        projection: String,
        rows: &[CheckpointStatus],
    ) -> CliError {
        let held: Vec<HeldPartition> = rows
            .iter()
            .filter_map(|row| {
                row.held_by_pid.map(|pid| {
                    HeldPartition::new(
                        row.total_partitions,
                        row.partition_key,
                        pid,
                        row.held_by_application.as_deref(),
                    )
                })
            })
            .collect();
        if held.is_empty() {
            return CliError::NotConfirmed { action };
        }
        CliError::WouldBeRefused {
            action,
            because: Box::new(Error::ProjectionRunning { projection, held }),
        }
    }
}

impl From<Error> for CliError {
    fn from(error: Error) -> CliError {
        CliError::Library(error)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Library(error) => in_flags(error, f),
            CliError::NotSet { setting, hint } => write!(f, "{setting} is not set: {hint}"),
            CliError::RemovedFlag { flag, instead } => write!(f, "{flag} was removed: {instead}"),
            CliError::NotConfirmed { action } => write!(f, "{action}; pass --yes to go ahead"),
            CliError::WouldBeRefused { action, .. } => {
                write!(f, "{action}; --yes would be refused for now")
            }
            CliError::WaitedWhilePaused { projection, .. } => write!(
                f,
                "projection '{projection}' is paused, and applies nothing until `projector resume \
                 --projection {}`",
                shell_word(projection)
            ),
        }
    }
}

impl std::error::Error for CliError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // The library error's own text is this one's first part: its causes come next.
            CliError::Library(error) => std::error::Error::source(error),
            CliError::WouldBeRefused { because, .. }
            | CliError::WaitedWhilePaused { because, .. } => Some(because.as_ref()),
            _ => None,
        }
    }
}

/// `error` in the words of the command line: the library's message with the flags and
/// commands that do what it says, or, where its advice is a call, the command line's own.
fn in_flags(error: &Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match error {
        Error::InvalidSetting {
            setting,
            value,
            reason,
        } => match flag_of(setting) {
            Some(flag) => {
                write!(f, "invalid value '{value}' for {flag}: {reason}")?;
                match flag {
                    "--on-poison" => {
                        f.write_str(", or give a policy for all of them (`--on-poison park`)")
                    }
                    "--aggregate" => {
                        f.write_str(" (`projector dead-letters list` shows what is parked)")
                    }
                    _ => Ok(()),
                }
            }
            // Named by the command line itself.
            None => write!(f, "{error}"),
        },
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
                 with {requested} would skip or repeat events. Start with --total-partitions {}",
                stored.join(" and "),
                stored.first().map(String::as_str).unwrap_or("?"),
            )?;
            if stored.len() == 1 {
                write!(
                    f,
                    ", or run `projector repartition --projection {} --to {requested}` to move \
                     to {requested} partitions exactly",
                    shell_word(projection)
                )
            } else {
                f.write_str(", or rebuild the projection with `projector reset`")
            }
        }
        Error::Unavailable { waited, .. } => write!(
            f,
            "gave up after {} s without the database (the limit is --give-up-after): check that \
             it is up and reachable, then start again",
            waited.as_secs()
        ),
        Error::UnexpectedColumns { .. } => write!(f, "{error} (--schema)"),
        Error::NotAppliedInTime {
            projection,
            held_by_pid,
            ..
        } => {
            let status = format!("`projector status --projection {}`", shell_word(projection));
            match held_by_pid {
                Some(_) => write!(f, "{error}: see how far it is with {status}"),
                None => write!(f, "{error} ({status})"),
            }
        }
        Error::EventParked {
            projection,
            aggregate_id,
            ..
        } => write!(
            f,
            "{error}: `projector dead-letters retry --projection {} --aggregate {}` once the \
             cause is fixed (`projector dead-letters list --projection {}` lists them)",
            shell_word(projection),
            shell_word(aggregate_id),
            shell_word(projection),
        ),
        _ => write!(f, "{error}"),
    }
}

/// The flag that gives a setting the library names in the words of its calls (see
/// [`Error::InvalidSetting`]); `None` for one the command line named itself.
fn flag_of(setting: &str) -> Option<&'static str> {
    Some(match setting {
        "Builder::batch_size" => "--batch-size",
        "Builder::projection" | "repartition(projection)" => "--projection",
        "Builder::on_poison_of" => "--on-poison",
        "Builder::total_partitions" => "--total-partitions",
        "Builder::partitions" => "--partition-key",
        "repartition(total)" => "--to",
        "aggregate id" => "--aggregate",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_the_library_names_by_its_call_is_shown_as_its_flag() {
        let error = CliError::from(Error::invalid_setting(
            "Builder::partitions",
            9,
            "partition keys go from 0 to 3 with 4 partitions",
        ));
        assert_eq!(
            error.to_string(),
            "invalid value '9' for --partition-key: partition keys go from 0 to 3 with 4 \
             partitions"
        );
        assert_eq!(error.exit_code(), 2);
        let named = CliError::from(Error::invalid_setting("--timeout", "soon", "a duration"));
        assert_eq!(
            named.to_string(),
            "invalid value 'soon' for --timeout: a duration"
        );
    }

    #[test]
    fn each_error_has_its_exit_code() {
        let parked = CliError::from(Error::EventParked {
            projection: "carts".into(),
            position: 7,
            aggregate_id: "it's here".into(),
            partition: 1,
            total: 4,
            first_parked: 7,
            reason: "boom".into(),
        });
        assert_eq!(parked.exit_code(), EXIT_PARKED);
        assert!(
            parked.to_string().ends_with(
                "`projector dead-letters retry --projection carts --aggregate 'it'\\''s here'` \
                 once the cause is fixed (`projector dead-letters list --projection carts` lists \
                 them)"
            ),
            "{parked}"
        );
        let failed = CliError::from(Error::ThreadPanicked {
            thread: "projector-fetch".into(),
        });
        assert_eq!(failed.exit_code(), 1);
        let not_confirmed = CliError::NotConfirmed {
            action: "reset would delete".into(),
        };
        assert_eq!(not_confirmed.exit_code(), 2);
        assert_eq!(
            not_confirmed.to_string(),
            "reset would delete; pass --yes to go ahead"
        );
    }
}
