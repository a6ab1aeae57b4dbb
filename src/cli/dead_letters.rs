//! `projector dead-letters list|retry|drop`: the events a projection parked (`--on-poison
//! park`), applied again once fixed, or discarded.

use std::time::SystemTime;

use argh::FromArgs;
use projector::projections::{AggregateStats, AggregateStatsBatch, Noop, SqlProjection, Users};
use projector::{Database, Error, Projection};

use super::error::CliError;
use super::output::say;

/// List, retry or drop the events a projection parked with --on-poison park.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "dead-letters",
    note = "The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct DeadLetters {
    #[argh(subcommand)]
    pub(crate) command: Action,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub(crate) enum Action {
    List(List),
    Retry(Retry),
    Drop(Drop),
}

/// Show the parked events, in position order: projection, aggregate, position, event type,
/// attempts, first and last failure, error.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
pub(crate) struct List {
    /// show only this projection's
    #[argh(option)]
    pub(crate) projection: Option<String>,

    /// show each event's payload too, on a line of its own below it (control characters
    /// escaped; a payload that is not UTF-8 in hexadecimal)
    #[argh(switch)]
    pub(crate) payload: bool,
}

/// Apply the parked events of an aggregate (of each parked aggregate when --aggregate is not
/// given) again, in order, in one transaction per aggregate, and release it; on a failure
/// nothing of that aggregate is applied and its events stay parked. Safe while the projection
/// runs. Exits 1 if an aggregate failed again.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "retry")]
pub(crate) struct Retry {
    /// the projection: users, aggregate-stats, aggregate-stats-batch or noop
    #[argh(option)]
    pub(crate) projection: Option<String>,

    /// the projection, written in SQL: its file (its `-- apply` section applies the events)
    #[argh(option)]
    pub(crate) projection_file: Option<String>,

    /// the aggregate id (default: every parked aggregate of the projection)
    #[argh(option)]
    pub(crate) aggregate: Option<String>,
}

/// Discard the parked events of an aggregate without applying them, and release it; records
/// who dropped what, and when, in the table projection_dead_letter_drops (and logs it).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "drop")]
pub(crate) struct Drop {
    /// the projection, by its name
    #[argh(option)]
    pub(crate) projection: String,

    /// the aggregate id
    #[argh(option)]
    pub(crate) aggregate: String,

    /// go ahead (without it, only says what would be dropped)
    #[argh(switch)]
    pub(crate) yes: bool,
}

pub(super) fn run(database: &Database, args: &DeadLetters) -> Result<(), CliError> {
    let mut client = database.connect()?;
    match &args.command {
        Action::List(list) => {
            if let Some(name) = &list.projection {
                super::known_here(&mut client, name)?;
            }
            Ok(print_list(&mut client, list)?)
        }
        Action::Retry(retry) => Ok(retry_named(&mut client, retry)?),
        Action::Drop(drop) => {
            super::known_here(&mut client, &drop.projection)?;
            drop_parked(&mut client, drop)
        }
    }
}

/// `dead-letters retry` of the projection named by `--projection` or `--projection-file`.
fn retry_named(client: &mut projector::postgres::Client, retry: &Retry) -> Result<(), Error> {
    match (retry.projection.as_deref(), &retry.projection_file) {
        (None, Some(file)) => {
            let projection = SqlProjection::from_file(file)?;
            projection.check(client)?;
            retry_with(client, projection, retry)
        }
        (Some("users"), None) => retry_with(client, Users, retry),
        (Some("aggregate-stats"), None) => retry_with(client, AggregateStats, retry),
        (Some("aggregate-stats-batch"), None) => retry_with(client, AggregateStatsBatch, retry),
        (Some("noop"), None) => retry_with(client, Noop, retry),
        (Some(other), None) => Err(needs_the_code(client, other)?),
        _ => Err(Error::invalid_setting(
            "--projection",
            retry.projection.as_deref().unwrap_or(""),
            "give either --projection NAME or --projection-file FILE (exactly one)",
        )),
    }
}

/// Why `retry` cannot apply the parked events of a projection this binary has no code for, and
/// what can be done instead.
fn needs_the_code(client: &mut projector::postgres::Client, name: &str) -> Result<Error, Error> {
    let what = match parked_counts(client, name)? {
        (0, _) => format!(
            "'{name}' has no parked events in this schema (`projector dead-letters list` shows \
             what is parked)"
        ),
        (events, aggregates) => format!(
            "'{name}' has {events} parked event(s) of {aggregates} aggregate(s): the service that \
             defines it retries them with projector::retry, or discard them from here with \
             `projector dead-letters drop --projection {} --aggregate ID --yes`",
            projector::shell_word(name)
        ),
    };
    Ok(Error::invalid_setting(
        "--projection",
        name,
        format!(
            "retrying applies the parked events through the projection's code, which this binary \
             has only for the built-in projections (users, aggregate-stats, \
             aggregate-stats-batch, noop) and for SQL files (--projection-file FILE); {what}"
        ),
    ))
}

fn print_list(client: &mut projector::postgres::Client, list: &List) -> Result<(), Error> {
    let projection = list.projection.as_deref();
    let letters = projector::dead_letters(client, projection)?;
    if letters.is_empty() {
        say!(
            "no parked events{}",
            projection
                .map(|p| format!(" for '{p}'"))
                .unwrap_or_default()
        );
        return Ok(());
    }
    let width = |f: &dyn Fn(&projector::DeadLetter) -> usize, min: usize| {
        letters.iter().map(f).chain([min]).max().unwrap_or(min)
    };
    let (p, a, t) = (
        width(&|l| l.projection.chars().count(), 10),
        width(&|l| l.aggregate_id.chars().count(), 9),
        width(&|l| l.event_type.chars().count(), 10),
    );
    say!(
        "{:<p$} {:<a$} {:>12} {:<t$} {:>8} {:>12} {:>12}  ERROR",
        "PROJECTION",
        "AGGREGATE",
        "POSITION",
        "EVENT-TYPE",
        "ATTEMPTS",
        "FIRST-FAILED",
        "LAST-FAILED"
    );
    for letter in &letters {
        say!(
            "{:<p$} {:<a$} {:>12} {:<t$} {:>8} {:>12} {:>12}  {}",
            letter.projection,
            letter.aggregate_id,
            letter.global_position,
            letter.event_type,
            letter.attempts,
            ago(letter.first_failed_at),
            ago(letter.last_failed_at),
            letter.error.replace('\n', " ")
        );
        if list.payload {
            say!("    payload: {}", printable(letter.payload.as_deref()));
        }
    }
    let mut aggregates: Vec<(&str, &str)> = letters
        .iter()
        .map(|l| (l.projection.as_str(), l.aggregate_id.as_str()))
        .collect();
    aggregates.dedup();
    say!(
        "{} parked event(s) of {} aggregate(s)",
        letters.len(),
        aggregates.len()
    );
    Ok(())
}

/// A payload on one line: its text with control characters escaped (`\n`, `\u{1b}`), or, when
/// it is not UTF-8, its bytes in hexadecimal.
fn printable(payload: Option<&[u8]>) -> String {
    let Some(bytes) = payload else {
        return "(the event is no longer in the events table)".to_owned();
    };
    match std::str::from_utf8(bytes) {
        Ok(text) => text
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
        Err(_) => format!(
            "(not UTF-8, {} bytes) 0x{}",
            bytes.len(),
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

/// How long ago, as `12s ago`.
pub(super) fn ago(at: SystemTime) -> String {
    let seconds = SystemTime::now()
        .duration_since(at)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("{seconds}s ago")
}

fn retry_with<P: Projection>(
    client: &mut projector::postgres::Client,
    mut projection: P,
    retry: &Retry,
) -> Result<(), Error> {
    let name = projection.name().to_owned();
    let outcomes = projector::retry(client, &mut projection, retry.aggregate.as_deref())?;
    if outcomes.is_empty() {
        say!("projection '{name}' has no parked events: nothing to retry");
        return Ok(());
    }
    let mut first_failure = None;
    for outcome in outcomes {
        let (id, n) = (outcome.aggregate_id.escape_debug(), outcome.positions.len());
        match outcome.failure {
            // A retry or drop running at the same time got there first (of the one aggregate
            // asked for, `retry` says so as its error).
            None if n == 0 => say!(
                "projection '{name}': aggregate '{id}' has nothing parked any more (released or \
                 dropped meanwhile, by a retry or drop running at the same time)"
            ),
            None => say!(
                "projection '{name}': applied the {n} parked event(s) of aggregate '{id}' in \
                 order; it is released"
            ),
            Some(failure) if first_failure.is_none() => {
                // Said in full as the command's error, below.
                say!(
                    "projection '{name}': aggregate '{id}' failed again, its {n} event(s) stay \
                     parked"
                );
                first_failure = Some(failure);
            }
            Some(failure) => say!(
                "projection '{name}': aggregate '{id}' failed again, its {n} event(s) stay \
                 parked: {}",
                projector::error_chain(&failure)
            ),
        }
    }
    first_failure.map_or(Ok(()), Err)
}

fn drop_parked(client: &mut projector::postgres::Client, drop: &Drop) -> Result<(), CliError> {
    let (name, id) = (drop.projection.as_str(), drop.aggregate.as_str());
    if !drop.yes {
        let positions: Vec<i64> = projector::dead_letters_of(client, name, id)?
            .iter()
            .map(|l| l.global_position)
            .collect();
        return Err(CliError::NotConfirmed {
            action: format!(
                "drop would discard the {} parked event(s) of aggregate '{id}' in projection \
                 '{name}' (global positions {}) without applying them",
                positions.len(),
                positions
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    let dropped = projector::drop_parked(client, name, id)?;
    say!(
        "projection '{name}': dropped the {} parked event(s) of aggregate '{id}' (database user \
         '{}', OS user '{}'), recorded in projection_dead_letter_drops with id {}; the aggregate \
         is released",
        dropped.positions.len(),
        dropped.database_user,
        dropped.os_user.as_deref().unwrap_or("unknown"),
        dropped.record
    );
    Ok(())
}

/// How many events of how many aggregates projection `name` has parked.
pub(super) fn parked_counts(
    client: &mut projector::postgres::Client,
    name: &str,
) -> Result<(i64, i64), Error> {
    let row = client
        .query_one(
            "SELECT COUNT(*), COUNT(DISTINCT aggregate_id) FROM projection_dead_letters \
             WHERE projection = $1",
            &[&name],
        )
        .map_err(|source| Error::Database {
            action: format!("counting the parked events of '{name}'"),
            source,
        })?;
    Ok((row.get(0), row.get(1)))
}
