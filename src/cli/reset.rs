//! `projector reset`: a built-in projection or a projection file is reset whole (checkpoints,
//! parked events and read model); a projection only a service defines, by its checkpoints and
//! parked events alone, since its read model is the service's.

use projector::postgres::Client;
use projector::projections::{AggregateStats, AggregateStatsBatch, Noop, Users};
use projector::{CheckpointStatus, Error, Projection};

use super::args::Reset;
use super::error::CliError;
use super::output::say;
use super::{sql_files, status};

pub(super) fn reset(mut client: Client, reset: &Reset) -> Result<(), CliError> {
    let name = match (&reset.projection, &reset.projection_file) {
        (None, Some(file)) => {
            let projection = sql_files::for_reset(&mut client, file)?;
            return reset_projection(client, projection, reset.yes);
        }
        (Some(name), None) => name.as_str(),
        _ => {
            return Err(Error::invalid_setting(
                "--projection",
                reset.projection.as_deref().unwrap_or(""),
                "give either --projection NAME or --projection-file FILE (exactly one)",
            )
            .into());
        }
    };
    match name {
        "users" => reset_projection(client, Users, reset.yes),
        "aggregate-stats" => reset_projection(client, AggregateStats, reset.yes),
        "aggregate-stats-batch" => reset_projection(client, AggregateStatsBatch, reset.yes),
        "noop" => reset_projection(client, Noop, reset.yes),
        other => reset_checkpoints(client, other, reset.yes),
    }
}

/// Resets a built-in projection or a projection file: says what it would clear unless `yes`,
/// then clears it.
fn reset_projection<P: Projection>(
    mut client: Client,
    mut projection: P,
    yes: bool,
) -> Result<(), CliError> {
    if !yes {
        let name = projection.name().to_owned();
        let rows = projector::status(&mut client, Some(&name))?;
        let read_model = match name.as_str() {
            "users" => "clear its read model (tables users and user_partition_counts)",
            "aggregate-stats" => "clear its read model (table aggregate_stats)",
            "aggregate-stats-batch" => "clear its read model (table aggregate_stats_batch)",
            "noop" => "clear nothing else (it has no read model)",
            _ => "clear its read model",
        };
        let action = format!(
            "reset would {} and {read_model}, so that its next start rebuilds it from the first \
             event",
            bookkeeping(&name, &rows)
        );
        return Err(CliError::not_confirmed(action, name, &rows));
    }
    projector::reset(&mut client, &mut projection)?;
    Ok(())
}

/// Resets a projection this binary does not know (a service's own) by its checkpoints and
/// parked events: its read model belongs to the service. A name with neither is refused.
fn reset_checkpoints(mut client: Client, name: &str, yes: bool) -> Result<(), CliError> {
    let rows = projector::status(&mut client, Some(name))?;
    if rows.is_empty() && super::dead_letters::parked_counts(&mut client, name)?.0 == 0 {
        return Err(Error::invalid_setting(
            "--projection",
            name,
            "known projections are users, aggregate-stats, aggregate-stats-batch, noop and any \
             projection with checkpoints or parked events in this schema (a service's, whose \
             checkpoints and parked events reset then deletes, leaving its read model to the \
             service); give a projection written in SQL with --projection-file FILE",
        )
        .into());
    }
    if !yes {
        let action = format!(
            "reset would {} and leave its read model as it is: '{name}' is not a built-in \
             projection, so its read model belongs to the service that defines it; clear it \
             there before the projection's next start rebuilds it from the first event (the \
             service's projector::reset does both)",
            bookkeeping(name, &rows)
        );
        return Err(CliError::not_confirmed(action, name.to_owned(), &rows));
    }
    let cleared = projector::reset_checkpoints(&mut client, name)?;
    say!(
        "projection '{name}': deleted {} checkpoint(s) and {} parked event(s); its read model \
         belongs to the service that defines '{name}' and was not touched: clear it there (the \
         service's projector::reset does both) before the projection's next start rebuilds it \
         from the first event",
        cleared.checkpoints,
        cleared.parked_events
    );
    Ok(())
}

/// What reset deletes of the projection's own bookkeeping: `delete the 4 checkpoint(s) of
/// projection 'x' (...), delete its 2 parked event(s) (...)`.
fn bookkeeping(name: &str, rows: &[CheckpointStatus]) -> String {
    let checkpoints = match status::layouts(rows).first() {
        Some(layout) => format!(
            "delete the {} checkpoint(s) of projection '{name}' ({} partitions, at global \
             positions {} to {})",
            rows.len(),
            layout[0].total_partitions,
            rows.iter().map(|r| r.last_position).min().unwrap_or(0),
            rows.iter().map(|r| r.last_position).max().unwrap_or(0),
        ),
        None => format!("delete the checkpoints of projection '{name}' (it has none)"),
    };
    let parked: u64 = rows.iter().map(|row| row.parked_events).sum();
    let parked = match parked {
        0 => String::new(),
        n => format!(", delete its {n} parked event(s) (`projector dead-letters list`)"),
    };
    format!("{checkpoints}{parked}")
}
