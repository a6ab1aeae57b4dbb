//! `projector wait`: read your writes from a shell script or a deploy check.

use std::time::Duration;

use projector::{Database, Error, Until};

use super::args::Wait;
use super::error::CliError;

use super::output::say;

/// How long `projector wait` waits when `--timeout` is not given.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until the projection has applied the event, and says where in one line.
pub(super) fn wait(database: &Database, wait: &Wait) -> Result<(), CliError> {
    const ONE_OF: &str = "give exactly one of --position N (the event at global position N) and \
                          --aggregate ID (the latest event of aggregate ID)";
    let until = match (&wait.position, &wait.aggregate) {
        (Some(text), None) => Until::Position(position(text)?),
        (None, Some(id)) => Until::Aggregate(id.clone()),
        (Some(_), Some(id)) => {
            return Err(Error::invalid_setting(
                "--aggregate",
                id,
                format!("--position is given too: {ONE_OF}"),
            )
            .into());
        }
        (None, None) => {
            return Err(CliError::NotSet {
                setting: "--position or --aggregate".into(),
                hint: ONE_OF.into(),
            });
        }
    };
    let timeout = match &wait.timeout {
        Some(text) => super::duration("--timeout", text)?,
        None => DEFAULT_TIMEOUT,
    };
    let projection = match &wait.version {
        Some(text) => {
            let (name, _) = projector::split_stored_name(&wait.projection);
            projector::stored_name(name, super::positive("--version", text)?)
        }
        None => wait.projection.clone(),
    };
    let applied = match projector::wait_for(database, &projection, until, timeout) {
        Ok(applied) => applied,
        Err(error @ Error::NotAppliedInTime { .. }) if is_paused(database, &projection) => {
            return Err(CliError::WaitedWhilePaused {
                projection: projection.clone(),
                because: Box::new(error),
            });
        }
        Err(error) => return Err(error.into()),
    };
    let (name, total, checkpoint) = (
        &applied.projection,
        applied.total_partitions,
        applied.checkpoint,
    );
    let ms = applied.waited.as_millis();
    match (&applied.aggregate_id, applied.partition) {
        (Some(id), Some(partition)) => say!(
            "projection '{name}' has applied global position {} (aggregate '{id}'): partition \
             {partition}/{total} is at checkpoint {checkpoint}, after {ms} ms",
            applied.position
        ),
        (None, Some(partition)) => say!(
            "aggregate '{}' has no events: nothing to wait for in projection '{name}' \
             (partition {partition}/{total}, at checkpoint {checkpoint}), after {ms} ms",
            wait.aggregate.as_deref().unwrap_or_default()
        ),
        (_, None) => say!(
            "projection '{name}' has passed global position {} (no event is stored there) on \
             all {total} partitions, the lowest at checkpoint {checkpoint}, after {ms} ms",
            applied.position
        ),
    }
    Ok(())
}

/// Whether `projection` is paused, as stored (false when that cannot be read).
fn is_paused(database: &Database, projection: &str) -> bool {
    let states = database
        .connect()
        .and_then(|mut client| projector::projection_states(&mut client, Some(projection)));
    states.is_ok_and(|states| {
        states
            .iter()
            .any(|state| state.state == projector::StateKind::Paused)
    })
}

/// A global position: a whole number of at least 1.
fn position(text: &str) -> Result<i64, Error> {
    match text.trim().parse::<i64>() {
        Ok(position) if position >= 1 => Ok(position),
        _ => Err(Error::invalid_setting(
            "--position",
            text,
            "expected a global position, a whole number of at least 1 (as append returns it)",
        )),
    }
}
