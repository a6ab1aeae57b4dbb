//! What each command does, on top of the library.

mod append;
pub(crate) mod args;
mod dead_letters;
#[cfg(test)]
mod documented_commands;
pub(crate) mod error;
mod flag_order;
pub(crate) mod logs;
pub(crate) mod output;
mod reset;
mod rewind;
mod run;
mod seed;
mod serve;
mod sql_files;
mod status;
mod version;
mod wait;
mod watch;

use std::time::Duration;

use log::info;
use projector::{Database, Error, LayoutChange, Projection};

use args::{Args, Command, flag_or_env};
use error::CliError;
use output::say;

pub(crate) fn run(args: Args) -> Result<(), CliError> {
    if args.repartition {
        return Err(CliError::RemovedFlag {
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
        Some(Command::Seed(ref seed)) => Ok(seed::seed(&database, seed)?),
        Some(Command::Append(ref append)) => append::append(&database, append),
        Some(Command::Status(ref status)) => {
            let mut client = connect_to_schema(&database, &schema_setting(&args))?;
            match &status.watch {
                Some(_) if status.json => Err(Error::invalid_setting(
                    "--json",
                    "with --watch",
                    "--watch redraws the table: leave out --json (or run status --json in a loop)",
                )
                .into()),
                Some(seconds) => {
                    let every = Duration::from_secs(u64::from(positive("--watch", seconds)?));
                    Ok(watch::watch(
                        &mut client,
                        status.projection.as_deref(),
                        every,
                    )?)
                }
                None => Ok(status::print_status(
                    &mut client,
                    status.projection.as_deref(),
                    status.json,
                )?),
            }
        }
        Some(Command::Reset(ref reset)) => {
            let client = connect_to_schema(&database, &schema_setting(&args))?;
            reset::reset(client, reset)
        }
        Some(Command::Repartition(ref change)) => Ok(repartition(&database, change)?),
        Some(Command::Rewind(ref rewind)) => {
            let client = connect_to_schema(&database, &schema_setting(&args))?;
            rewind::rewind(client, rewind)
        }
        Some(Command::Wait(ref wait)) => wait::wait(&database, wait),
        Some(Command::Pause(ref pause)) => {
            let mut client = connect_to_schema(&database, &schema_setting(&args))?;
            known_here(&mut client, &pause.projection)?;
            let name = projector::live_stored_name(&mut client, &pause.projection)?;
            Ok(pause_projection(&database, &name)?)
        }
        Some(Command::Resume(ref resume)) => {
            let mut client = connect_to_schema(&database, &schema_setting(&args))?;
            known_here(&mut client, &resume.projection)?;
            let name = projector::live_stored_name(&mut client, &resume.projection)?;
            Ok(resume_projection(&database, &name)?)
        }
        Some(Command::Promote(ref promote)) => {
            connect_to_schema(&database, &schema_setting(&args))?;
            version::promote(&database, promote)
        }
        Some(Command::Retire(ref retire)) => {
            connect_to_schema(&database, &schema_setting(&args))?;
            version::retire(&database, retire)
        }
        Some(Command::DeadLetters(ref command)) => {
            connect_to_schema(&database, &schema_setting(&args))?;
            dead_letters::run(&database, command)
        }
        None => run::run_projections(&args, database),
    }
}

/// `projector pause`: stores the pause and says what it does.
fn pause_projection(database: &Database, name: &str) -> Result<(), Error> {
    let word = projector::shell_word(name);
    if projector::pause(database, name)? {
        say!(
            "paused '{name}': its running processes finish the transaction in progress and hold \
             their partitions without applying (within about a second) until `projector resume \
             --projection {word}`"
        );
    } else {
        say!("'{name}' was paused already: `projector resume --projection {word}` resumes it");
    }
    Ok(())
}

/// `projector resume`: clears the pause and says so.
fn resume_projection(database: &Database, name: &str) -> Result<(), Error> {
    if projector::resume(database, name)? {
        say!("resumed '{name}': its running processes apply again within about a second");
    } else {
        say!("'{name}' was not paused: nothing to do");
    }
    Ok(())
}

fn unknown_projection(name: &str) -> Error {
    Error::invalid_setting(
        "--projection",
        name,
        "known projections are users, aggregate-stats, aggregate-stats-batch and noop; give a \
         projection written in SQL with --projection-file FILE",
    )
}

/// The one rule for a projection named with `--projection` on a command that acts on what it
/// stored: it must be a built-in one or have checkpoints in this schema (a projection file's,
/// a service's own). Any other name is refused, naming it: a mistyped name, or one of another
/// schema, must not read as an empty projection. (`wait` asks more: that it has run.)
fn known_here(client: &mut projector::postgres::Client, name: &str) -> Result<(), Error> {
    if KNOWN_PROJECTIONS.contains(&name) || !projector::status(client, Some(name))?.is_empty() {
        return Ok(());
    }
    // A projection whose version 1 was retired is known by its later versions.
    if projector::versions(client)?
        .iter()
        .any(|version| version.projection == name)
    {
        return Ok(());
    }
    Err(Error::invalid_setting(
        "--projection",
        name,
        "known projections are users, aggregate-stats, aggregate-stats-batch, noop and any \
         projection with checkpoints in this schema (such as a projection file's, by the name in \
         its `-- projection:` line)",
    ))
}

/// `projector repartition`: changes the layout of each projection named (all are checked
/// before any is changed) and says what changed.
fn repartition(database: &Database, change: &args::Repartition) -> Result<(), CliError> {
    let total = projector::parse_total_partitions("--to", &change.to)?;
    let mut names: Vec<String> = sql_files::projection_files(&change.projection_file)?
        .iter()
        .map(|file| file.name().to_owned())
        .collect();
    let files = names.len();
    let listed = change.projection.as_deref().map(|list| list.split(','));
    for name in listed.into_iter().flatten().map(str::trim) {
        if !names.iter().any(|known| known == name) {
            names.push(name.to_owned());
        }
    }
    if names.is_empty() {
        return Err(CliError::NotSet {
            setting: "--projection or --projection-file".into(),
            hint: "name the projection(s) to move, as a run takes them: --projection users (a \
                   comma-separated list), --projection-file FILE (a file or a folder of them)"
                .into(),
        });
    }
    let mut client = database.connect()?;
    for name in &names[files..] {
        known_here(&mut client, name)?;
    }
    for name in &names {
        say_what_changed(name, total, projector::repartition(database, name, total)?);
    }
    Ok(())
}

fn say_what_changed(name: &str, total: u32, change: LayoutChange) {
    match change {
        LayoutChange::Replaced { from } => say!(
            "projection '{name}' now has {total} partitions (was {from}): start its processes \
             with --total-partitions {total}; processes still running with {from} stop at their \
             next transaction"
        ),
        LayoutChange::Created => say!(
            "projection '{name}' now has {total} partitions (it had no checkpoints): start its \
             processes with --total-partitions {total}"
        ),
        _ => say!("projection '{name}' already has {total} partitions: nothing to do"),
    }
}

pub(crate) const KNOWN_PROJECTIONS: [&str; 4] =
    ["users", "aggregate-stats", "aggregate-stats-batch", "noop"];

fn database(args: &Args) -> Result<Database, CliError> {
    let Some((setting, url)) =
        flag_or_env("--database-url", args.database_url.clone(), "DATABASE_URL")
    else {
        return Err(CliError::NotSet {
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
        Some((flag, schema)) => Ok(named(database.schema(&schema), &flag, &schema)?),
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

/// Fails with [`Error::MissingTables`] (run `projector migrate` first) unless the event store's
/// tables exist.
pub(super) fn check_store(
    client: &mut projector::postgres::Client,
    database: &Database,
) -> Result<(), Error> {
    let row = client
        .query_one(
            "SELECT to_regclass('events') IS NULL, to_regclass('aggregate_heads') IS NULL",
            &[],
        )
        .map_err(|source| Error::Database {
            action: "looking for the event store".into(),
            source,
        })?;
    let missing: Vec<String> = [("events", row.get(0)), ("aggregate_heads", row.get(1))]
        .into_iter()
        .filter(|&(_, missing)| missing)
        .map(|(table, _)| table.to_owned())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingTables {
            schema: database.schema_name().to_owned(),
            tables: missing,
        })
    }
}
