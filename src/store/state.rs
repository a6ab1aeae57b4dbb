//! What a projection is when it is not simply running: failed (it stopped on an event, was
//! fenced, tripped the park storm breaker or gave up on the database) or paused, kept in
//! `projector_projection_states` (see `sql/projector_projection_states.sql`).
//!
//! The table came with a later version: [`migrate`](crate::migrate) creates it, and a run in a
//! schema without it works as before, without these states, after saying so once.

use std::time::SystemTime;

use log::{info, warn};
use postgres::GenericClient;

use crate::store::migration::{PROJECTION_STATES, check_columns};
use crate::store::registry::live_stored_name;
use crate::{Database, Error, error_chain};

/// The name of the table, as queries use it.
const TABLE: &str = PROJECTION_STATES.name;

/// What a projection is, as [`projection_states`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateKind {
    /// It stopped on an error (see [`ProjectionState::error`]); the next successful start of
    /// its partitions clears it.
    Failed,
    /// `projector pause` (or [`pause`]): running processes hold its partitions without
    /// applying until [`resume`].
    Paused,
}

impl StateKind {
    /// The state as stored and as `status --json` shows it: `failed` or `paused`.
    pub fn name(self) -> &'static str {
        match self {
            StateKind::Failed => "failed",
            StateKind::Paused => "paused",
        }
    }

    fn from_name(name: &str) -> Option<StateKind> {
        [StateKind::Failed, StateKind::Paused]
            .into_iter()
            .find(|state| state.name() == name)
    }
}

/// One stored state of a projection.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ProjectionState {
    /// The projection.
    pub projection: String,
    /// Failed or paused.
    pub state: StateKind,
    /// Why it failed (the whole error chain); `None` when paused.
    pub error: Option<String>,
    /// The partition that failed, when one did.
    pub partition: Option<u32>,
    /// Its number of partitions.
    pub total_partitions: Option<u32>,
    /// The global position of the event it stopped before, when it stopped on one.
    pub position: Option<i64>,
    /// The process that failed or paused it (`pid 1234 on host`).
    pub process: Option<String>,
    /// When the state was stored.
    pub changed_at: SystemTime,
}

/// Every stored state, or those of one projection, by projection; none when the schema has no
/// `projector_projection_states` (run [`migrate`](crate::migrate) to add it).
pub fn projection_states(
    client: &mut impl GenericClient,
    projection: Option<&str>,
) -> Result<Vec<ProjectionState>, Error> {
    if !table_exists(client)? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT projection, state, error, partition_key, total_partitions, position, \
                     process, changed_at FROM {TABLE} \
                 WHERE $1::text IS NULL OR projection = $1 ORDER BY projection, state"
            ),
            &[&projection],
        )
        .map_err(Error::database("reading the projections' states"))?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            Some(ProjectionState {
                projection: row.get(0),
                state: StateKind::from_name(row.get(1))?,
                error: row.get(2),
                partition: row.get::<_, Option<i32>>(3).map(i32::unsigned_abs),
                total_partitions: row.get::<_, Option<i32>>(4).map(i32::unsigned_abs),
                position: row.get(5),
                process: row.get(6),
                changed_at: row.get(7),
            })
        })
        .collect())
}

/// Pauses `projection`: its running processes finish the transaction in progress, then hold
/// their partitions without applying (they look at least once a second) until [`resume`]. A
/// process started meanwhile holds them too. True when it was paused just now, false when it
/// already was. A name without a version (`tally`) is the live version's
/// ([`live_stored_name`]); `tally@2` names another.
///
/// Fails with [`Error::MissingTables`] in a schema without `projector_projection_states` (run
/// [`migrate`](crate::migrate)).
pub fn pause(database: &Database, projection: &str) -> Result<bool, Error> {
    let mut client = database.connect()?;
    require_table(&mut client, database)?;
    let projection = &live_stored_name(&mut client, projection)?;
    let inserted = client
        .execute(
            &format!(
                "INSERT INTO {TABLE} (projection, state, process) VALUES ($1, 'paused', $2) \
                 ON CONFLICT DO NOTHING"
            ),
            &[&projection, &this_process()],
        )
        .map_err(Error::database(format!("pausing '{projection}'")))?;
    Ok(inserted == 1)
}

/// Resumes a projection [`pause`]d: its running processes apply again within about a second.
/// True when it was paused. A name without a version is the live version's, as for [`pause`].
pub fn resume(database: &Database, projection: &str) -> Result<bool, Error> {
    let mut client = database.connect()?;
    require_table(&mut client, database)?;
    let projection = &live_stored_name(&mut client, projection)?;
    let deleted = client
        .execute(
            &format!("DELETE FROM {TABLE} WHERE projection = $1 AND state = 'paused'"),
            &[&projection],
        )
        .map_err(Error::database(format!("resuming '{projection}'")))?;
    Ok(deleted == 1)
}

/// At the start of a run: false (after saying to run `migrate`) when the schema has no
/// `projector_projection_states`; fails when a table of that name lacks the columns.
pub(crate) fn available(client: &mut impl GenericClient, schema: &str) -> Result<bool, Error> {
    if table_exists(client)? {
        check_columns(client, schema, &PROJECTION_STATES)?;
        return Ok(true);
    }
    info!(
        "schema '{schema}' has no table {TABLE} (it came with a later version): projections run \
         as before, but `projector pause` does not hold them and `status` does not show a \
         projection that failed; run `projector migrate` to add it"
    );
    Ok(false)
}

/// After a successful start of `keys` of `total` partitions of `projection`: clears a failure
/// stored for the projection as a whole, for one of these partitions, or under another layout.
pub(crate) fn clear_failure(
    client: &mut impl GenericClient,
    projection: &str,
    keys: &[u32],
    total: u32,
) -> Result<(), Error> {
    let keys: Vec<i32> = keys.iter().map(|&key| key as i32).collect();
    client
        .execute(
            &format!(
                "DELETE FROM {TABLE} WHERE projection = $1 AND state = 'failed' \
                 AND (partition_key IS NULL OR partition_key = ANY($2) \
                      OR total_partitions IS DISTINCT FROM $3)"
            ),
            &[&projection, &keys, &(total as i32)],
        )
        .map_err(Error::database(format!(
            "clearing the failure stored for '{projection}'"
        )))?;
    Ok(())
}

/// Whether `projection` is paused, as stored now.
pub(crate) fn is_paused(
    client: &mut impl GenericClient,
    projection: &str,
) -> Result<bool, postgres::Error> {
    Ok(client
        .query_opt(
            &format!("SELECT 1 FROM {TABLE} WHERE projection = $1 AND state = 'paused'"),
            &[&projection],
        )?
        .is_some())
}

/// Stores that `projection` stopped on `error`, on a connection of its own (the worker's may be
/// gone). Only logged when that fails too: the error itself is reported anyway.
pub(crate) fn record_failure(database: &Database, projection: &str, error: &Error) {
    let (partition, total, position) = where_it_failed(error);
    let stored = database.connect().and_then(|mut client| {
        // The database may be what failed: this must not hold the runner's end for long.
        client
            .batch_execute("SET statement_timeout = '5s'")
            .map_err(Error::database("storing the failure"))?;
        client
            .execute(
                &format!(
                    "INSERT INTO {TABLE} (projection, state, error, partition_key, \
                         total_partitions, position, process) \
                     VALUES ($1, 'failed', $2, $3, $4, $5, $6) \
                     ON CONFLICT (projection, state) DO UPDATE SET error = EXCLUDED.error, \
                         partition_key = EXCLUDED.partition_key, \
                         total_partitions = EXCLUDED.total_partitions, \
                         position = EXCLUDED.position, process = EXCLUDED.process, \
                         changed_at = NOW()"
                ),
                &[
                    &projection,
                    &error_chain(error),
                    &partition,
                    &total,
                    &position,
                    &this_process(),
                ],
            )
            .map_err(Error::database("storing the failure"))
    });
    if let Err(failure) = stored {
        if !matches!(
            &failure,
            Error::Database { source, .. }
                if source.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE)
        ) {
            warn!(
                "could not store that projection '{projection}' failed ({}): `projector status` \
                 will not show it",
                error_chain(&failure)
            );
        }
    }
}

/// The partition, partition count and position an error names, where it names them.
fn where_it_failed(error: &Error) -> (Option<i32>, Option<i32>, Option<i64>) {
    match error {
        Error::Projection {
            partition,
            total,
            position,
            ..
        }
        | Error::ParkStorm {
            partition,
            total,
            position,
            ..
        } => (
            Some(*partition as i32),
            Some(*total as i32),
            Some(*position),
        ),
        Error::Fenced { total, .. } => (None, Some(*total as i32), None),
        _ => (None, None, None),
    }
}

/// This process, as stored with a state: `pid 1234 on host`.
fn this_process() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty());
    match host {
        Some(host) => format!("pid {} on {host}", std::process::id()),
        None => format!("pid {}", std::process::id()),
    }
}

pub(crate) fn table_exists(client: &mut impl GenericClient) -> Result<bool, Error> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&TABLE])
        .map_err(Error::database(format!("looking for {TABLE}")))?
        .get(0))
}

/// Fails with [`Error::MissingTables`] when the schema has no `projector_projection_states`.
fn require_table(client: &mut impl GenericClient, database: &Database) -> Result<(), Error> {
    if table_exists(client)? {
        return Ok(());
    }
    Err(Error::MissingTables {
        schema: database.schema_name().to_owned(),
        tables: vec![TABLE.to_owned()],
    })
}
