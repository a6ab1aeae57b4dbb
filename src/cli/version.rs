//! `projector promote` and `projector retire`: the switch to a version built beside the live
//! one, and the removal of the version it replaced.

use std::time::Duration;

use argh::FromArgs;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{info, warn};
use projector::{Database, Error, VersionState};

use super::error::CliError;
use super::output::say;
use super::{duration, positive};

/// Move readers to a version of a projection built beside the live one, in one transaction:
/// the views of the readers' schema (SCHEMA_readers) then show its tables, and the live
/// version's processes stop at their next transaction.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "promote",
    note = "The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Promote {
    /// the projection, by the name it gives itself (without @N)
    #[argh(option)]
    pub(crate) projection: String,

    /// the version to make live: one building beside the live version
    #[argh(option)]
    pub(crate) version: String,

    /// how long the live version is held still while the new one reaches it, as 30s or 2m (a
    /// bare number is seconds), default 60s; past it nothing changes and promote exits 2
    #[argh(option)]
    pub(crate) timeout: Option<String>,
}

/// Drop a version of a projection that is not live: its read model (its schema SCHEMA_vN; for
/// version 1, its tables named like the live version's) and all it kept (checkpoints, parked
/// events, states). Refused while processes of it hold partitions.
#[derive(FromArgs, Debug)]
#[argh(
    subcommand,
    name = "retire",
    note = "The connection flags --database-url, --schema, --keepalive-timeout-secs and --session-timeout-secs may also come after the subcommand (there they win)."
)]
pub(crate) struct Retire {
    /// the projection, by the name it gives itself (without @N)
    #[argh(option)]
    pub(crate) projection: String,

    /// the version to drop
    #[argh(option)]
    pub(crate) version: String,

    /// go ahead (without it, only says what would be dropped)
    #[argh(switch)]
    pub(crate) yes: bool,
}

pub(super) fn promote(database: &Database, promote: &Promote) -> Result<(), CliError> {
    let version = positive("--version", &promote.version)?;
    let within = match &promote.timeout {
        Some(text) => duration("--timeout", text)?,
        None => Duration::from_secs(60),
    };
    let name = &promote.projection;
    let promoted = projector::promote(database, name, version, within)?;
    let views: Vec<String> = promoted
        .views
        .iter()
        .map(|view| format!("{}.{view}", promoted.readers_schema))
        .collect();
    say!(
        "projection '{name}': version {} is live (readers of {} now see its tables); version {} \
         is retired, and its processes stop at their next transaction; drop it with `projector \
         retire --projection {} --version {}`",
        promoted.to,
        if views.is_empty() {
            "the readers' schema".to_owned()
        } else {
            views.join(", ")
        },
        promoted.from,
        projector::shell_word(name),
        promoted.from
    );
    Ok(())
}

pub(super) fn retire(database: &Database, retire: &Retire) -> Result<(), CliError> {
    let version = positive("--version", &retire.version)?;
    let name = &retire.projection;
    if !retire.yes {
        let mut client = database.connect()?;
        let known = projector::versions(&mut client)?
            .into_iter()
            .find(|v| v.projection == *name && v.version == version);
        let Some(known) = known else {
            return Err(Error::invalid_setting(
                "--version",
                version,
                format!("projection '{name}' has no version {version} in this schema"),
            )
            .into());
        };
        let read_model = match projector::read_model_schema(database.schema_name(), version) {
            Some(own) => format!("schema {own}"),
            None => "its tables named like the live version's".to_owned(),
        };
        let state = match known.state {
            VersionState::Live => {
                return Err(Error::invalid_setting(
                    "--version",
                    version,
                    format!(
                        "version {version} of projection '{name}' is live: promote another \
                         version first (`projector promote`); nothing was dropped"
                    ),
                )
                .into());
            }
            VersionState::Building => "building",
            _ => "retired",
        };
        say!(
            "version {version} of projection '{name}' is {state}; retire would drop its read \
             model ({read_model}) and every row kept under '{}'; run again with --yes to go \
             ahead",
            known.stored_name
        );
        return Ok(());
    }
    let retired = projector::retire(database, name, version)?;
    if !retired.kept_for.is_empty() {
        say!(
            "projection '{name}': version {version}'s read model left in place: its tables are \
             found through a version schema that {} also keep(s) a read model in, and cannot be \
             told apart from theirs; drop them by hand if no longer wanted",
            retired
                .kept_for
                .iter()
                .map(|p| format!("'{p}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    say!(
        "projection '{name}': version {version} retired: dropped {} and {} checkpoint(s), {} \
         parked event(s)",
        if retired.dropped.is_empty() {
            "no read-model table".to_owned()
        } else {
            retired.dropped.join(", ")
        },
        retired.checkpoints,
        retired.parked_events
    );
    Ok(())
}

/// `--promote-within N`: promotes each of `candidates` (the later versions this process runs,
/// as name and version) once it is building within `within` positions of the head, looking
/// every second until `stop` disconnects (the runner ended). A promotion that fails (the
/// version did not reach the live one in time) is tried again a second later.
pub(super) fn promote_when_within(
    database: &Database,
    mut candidates: Vec<(String, u32)>,
    within: i64,
    stop: &Receiver<()>,
) {
    while !candidates.is_empty() {
        if stop.recv_timeout(Duration::from_secs(1)) != Err(RecvTimeoutError::Timeout) {
            return;
        }
        let versions = database
            .connect()
            .and_then(|mut client| projector::versions(&mut client));
        let Ok(versions) = versions else {
            continue;
        };
        candidates.retain(|(name, version)| {
            let Some(known) = versions
                .iter()
                .find(|known| known.projection == *name && known.version == *version)
            else {
                return true;
            };
            if known.state != VersionState::Building {
                return false;
            }
            if known.behind.is_none_or(|behind| behind > within) {
                return true;
            }
            match projector::promote(database, name, *version, Duration::from_secs(60)) {
                Ok(promoted) => {
                    info!(
                        "projection '{name}': version {version} promoted (--promote-within \
                         {within}): readers now see it; version {} is retired",
                        promoted.from
                    );
                    false
                }
                Err(error) => {
                    warn!(
                        "projection '{name}': version {version} not promoted yet: {}",
                        projector::error_chain(&error)
                    );
                    true
                }
            }
        });
    }
}
