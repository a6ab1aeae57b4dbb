//! Versions of a projection: [`versions`] lists them, [`promote`] moves readers to a version
//! built beside the live one, in one transaction, and fences the old one; [`retire`] drops a
//! version that is not live, read model and bookkeeping. See the crate docs' *Versions*.

use std::time::{Duration, Instant};

use postgres::{GenericClient, Transaction};

use crate::layout::{EarlierLayout, lock_layout};
use crate::ops::status::{delete_bookkeeping, refuse_while_held};
use crate::store::readers::{point_readers_at, quoted, read_model_tables};
use crate::store::registry::{
    self, VersionState, live_version, read_model_schema, state_of, states_of, stored_name,
};
use crate::{Database, Error};

/// One version of a projection, as [`versions`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionVersion {
    /// The projection, as it names itself (without `@N`).
    pub projection: String,
    /// The version.
    pub version: u32,
    /// The name its checkpoints and the rest are kept under: `projection@N` from version 2 on.
    pub stored_name: String,
    /// Building, live or retired.
    pub state: VersionState,
    /// How long it has been in that state (since its first start, for a building version).
    pub since: Duration,
    /// Positions between its lowest checkpoint and the head of the store; `None` without
    /// checkpoints (a retired version, one that never ran).
    pub behind: Option<i64>,
    /// For a building version: when it should reach the head, at its average rate since its
    /// first start (assumed to be from the first event).
    pub eta: Option<Duration>,
}

/// Every version the registry knows, with the live version 1 of projections that have later
/// ones, sorted by projection and version; empty without the registry's table.
pub fn versions(client: &mut impl GenericClient) -> Result<Vec<ProjectionVersion>, Error> {
    if !registry::table_exists(client)? {
        return Ok(Vec::new());
    }
    let names: Vec<String> = client
        .query(
            "SELECT DISTINCT projection FROM projector_projection_versions ORDER BY 1",
            &[],
        )
        .map_err(Error::database("reading the projections' versions"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut listed = Vec::new();
    for name in names {
        let states = states_of(client, &name)?;
        let mut numbers: Vec<u32> = states.iter().map(|&(version, _)| version).collect();
        let live = live_version(&states);
        if !numbers.contains(&live) {
            numbers.push(live);
        }
        if !numbers.contains(&1) && has_checkpoints(client, &name)? {
            numbers.push(1);
        }
        numbers.sort_unstable();
        for version in numbers {
            let stored = stored_name(&name, version);
            let (floor, head, since) = progress_of(client, &name, version, &stored)?;
            let state = state_of(&states, version);
            let behind = floor.map(|floor| (head - floor).max(0));
            let eta = match (state, floor, behind) {
                (VersionState::Building, Some(floor), Some(behind)) if floor > 0 => {
                    let rate = floor as f64 / since.as_secs_f64().max(0.001);
                    Some(Duration::from_secs_f64(behind as f64 / rate))
                }
                _ => None,
            };
            listed.push(ProjectionVersion {
                projection: name.clone(),
                version,
                stored_name: stored,
                state,
                since,
                behind,
                eta,
            });
        }
    }
    Ok(listed)
}

/// The lowest checkpoint of `stored` (if any), the head of the store, and how long ago the
/// version's state was recorded (zero without a row).
fn progress_of(
    client: &mut impl GenericClient,
    name: &str,
    version: u32,
    stored: &str,
) -> Result<(Option<i64>, i64, Duration), Error> {
    let row = client
        .query_one(
            "SELECT (SELECT MIN(last_position) FROM projector_checkpoints WHERE projection = $1), \
                 (SELECT COALESCE(MAX(global_position), 0) FROM events), \
                 (SELECT EXTRACT(EPOCH FROM NOW() - changed_at)::float8 \
                  FROM projector_projection_versions WHERE projection = $2 AND version = $3)",
            &[&stored, &name, &to_i32(version)],
        )
        .map_err(Error::database("reading the versions' progress"))?;
    let since = row.get::<_, Option<f64>>(2).unwrap_or(0.0).max(0.0);
    Ok((row.get(0), row.get(1), Duration::from_secs_f64(since)))
}

fn has_checkpoints(client: &mut impl GenericClient, stored: &str) -> Result<bool, Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM projector_checkpoints WHERE projection = $1)",
            &[&stored],
        )
        .map_err(Error::database("reading the checkpoints"))?
        .get(0))
}

/// What [`promote`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Promoted {
    /// The projection.
    pub projection: String,
    /// The version live before, now retired.
    pub from: u32,
    /// The version now live.
    pub to: u32,
    /// The views of the readers' schema now over the new version's tables.
    pub views: Vec<String>,
    /// The readers' schema.
    pub readers_schema: String,
    /// How long the old version was held still while the new one reached it.
    pub held_for: Duration,
}

/// Makes version `version` of `projection` the live one, in one transaction: holds the live
/// version still (locking its checkpoints, which waits for its transactions in flight), waits
/// up to `catch_up_within` for `version` to have applied everything the live version has,
/// replaces the projection's views in the readers' schema (`<schema>_readers`) by views over
/// `version`'s tables, deletes the old version's checkpoints and marks it retired. Readers of
/// the views see the old version's complete model until the commit and the new one's after it.
/// The old version's processes stop at their next transaction with
/// [`Error::VersionRetired`]; [`retire`] then drops it.
///
/// Fails with [`Error::InvalidSetting`] for a version that is not building (live, retired,
/// unknown) or has never run, and when `version` does not reach the live version in time
/// (nothing is changed then: start its processes, wait until `projector status` shows it near
/// the head, and try again).
pub fn promote(
    database: &Database,
    projection: &str,
    version: u32,
    catch_up_within: Duration,
) -> Result<Promoted, Error> {
    let schema = database.schema_name();
    let mut client = database.connect()?;
    crate::store::check_tables(&mut client, schema)?;
    require_registry(&mut client, schema)?;
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting the promotion"))?;
    lock_versions(&mut tx, projection)?;
    let states = states_of(&mut tx, projection)?;
    let from = live_version(&states);
    let new = stored_name(projection, version);
    let refuse = |reason: String| Error::invalid_setting("--version", version, reason);
    match state_of(&states, version) {
        VersionState::Live => {
            return Err(refuse(format!(
                "version {version} of projection '{projection}' is live already"
            )));
        }
        VersionState::Retired => {
            return Err(refuse(format!(
                "version {version} of projection '{projection}' was retired: give the code a \
                 new version number and build that one"
            )));
        }
        VersionState::Building if !has_checkpoints(&mut tx, &new)? => {
            return Err(refuse(format!(
                "version {version} of projection '{projection}' has never run here: start its \
                 processes and let it catch up first"
            )));
        }
        VersionState::Building => {}
    }
    let old = stored_name(projection, from);
    lock_layout(&mut tx, &old)?;
    lock_layout(&mut tx, &new)?;
    let started = Instant::now();
    let held = layouts_of(&mut tx, &old, true)?;
    wait_until_covered(&mut tx, &new, &held, catch_up_within).map_err(|behind| {
        refuse(format!(
            "version {version} of projection '{projection}' did not reach version {from} within \
             {} s ({behind} event(s) behind): keep its processes running, wait until `projector \
             status` shows it near the head, and try again (nothing was changed)",
            catch_up_within.as_secs()
        ))
    })?;
    let views = read_model_tables(&mut tx, schema, version, version)?;
    point_readers_at(&mut tx, schema, projection, version, &views)?;
    tx.execute(
        "DELETE FROM projector_checkpoints WHERE projection = $1",
        &[&old],
    )
    .map_err(Error::database("fencing the old version"))?;
    set_state(&mut tx, projection, from, VersionState::Retired)?;
    set_state(&mut tx, projection, version, VersionState::Live)?;
    tx.commit()
        .map_err(Error::database("committing the promotion"))?;
    Ok(Promoted {
        projection: projection.to_owned(),
        from,
        to: version,
        views,
        readers_schema: registry::readers_schema(schema),
        held_for: started.elapsed(),
    })
}

/// What [`retire`] dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retired {
    /// The projection.
    pub projection: String,
    /// The version dropped.
    pub version: u32,
    /// The read model dropped: `schema <name>` for a version with its own schema, else its
    /// tables. Nothing when other projections keep a version in the same schema (`kept_for`).
    pub dropped: Vec<String>,
    /// The other projections whose read models share the version's schema (a schema
    /// `<schema>_vN` holds version N of every projection): the read model was left in place
    /// for them, to be dropped by hand.
    pub kept_for: Vec<String>,
    /// Its checkpoints deleted (none once [`promote`] fenced it).
    pub checkpoints: u64,
    /// Its parked events deleted.
    pub parked_events: u64,
}

/// Drops version `version` of `projection`, which must not be live: its read model (the
/// schema `<schema>_vN` of a version from 2 on; for version 1, the tables of its schema named
/// like the live version's tables, which ran the same setup) and every row kept under its
/// stored name (checkpoints, earlier layouts, parked events, states, its registry row). The
/// record of dropped dead letters is kept. Refused while live processes hold its partitions
/// ([`Error::ProjectionRunning`]), for the live version, and for a version the projection
/// does not have. The schema `<schema>_vN` holds version N of every projection that has one
/// (in a schema from before a version number was kept to one projection): while another
/// projection has a version N registered, the read model is left in place
/// ([`Retired::kept_for`] names them), the bookkeeping goes, and the version's registry row
/// stays as retired, so that retiring the others leaves its tables in place too.
pub fn retire(database: &Database, projection: &str, version: u32) -> Result<Retired, Error> {
    let schema = database.schema_name();
    let mut client = database.connect()?;
    crate::store::check_tables(&mut client, schema)?;
    require_registry(&mut client, schema)?;
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting to retire the version"))?;
    lock_versions(&mut tx, projection)?;
    let states = states_of(&mut tx, projection)?;
    let live = live_version(&states);
    if version == live {
        return Err(Error::invalid_setting(
            "--version",
            version,
            format!(
                "version {version} of projection '{projection}' is live: promote another \
                 version first (`projector promote`)"
            ),
        ));
    }
    if !states.iter().any(|&(known, _)| known == version) {
        return Err(Error::invalid_setting(
            "--version",
            version,
            format!(
                "projection '{projection}' has no version {version} in schema '{schema}' \
                 (`projector status` lists every version); nothing was dropped"
            ),
        ));
    }
    let stored = stored_name(projection, version);
    refuse_while_held(&mut tx, &stored)?;
    // The schema `<schema>_vN` holds version N of every projection that has one; for version 1
    // the tables dropped are found by the names in the live version's schema.
    let listed_in = if version >= 2 { version } else { live };
    let shared_with = if listed_in >= 2 {
        registry::other_projections_with_version(&mut tx, projection, listed_in)?
    } else {
        Vec::new()
    };
    let dropped = if shared_with.is_empty() {
        drop_read_model(&mut tx, schema, version, live)?
    } else {
        Vec::new()
    };
    let cleared = delete_bookkeeping(&mut tx, &stored)?;
    if crate::store::state::table_exists(&mut tx)? {
        tx.execute(
            "DELETE FROM projector_projection_states WHERE projection = $1",
            &[&stored],
        )
        .map_err(Error::database("deleting the version's states"))?;
    }
    if shared_with.is_empty() {
        tx.execute(
            "DELETE FROM projector_projection_versions WHERE projection = $1 AND version = $2",
            &[&projection, &to_i32(version)],
        )
        .map_err(Error::database("deleting the version's record"))?;
    } else {
        // Its tables are still in the shared schema: the record stays (retired), so that a
        // later retirement of the others' versions leaves them too.
        set_state(&mut tx, projection, version, VersionState::Retired)?;
    }
    tx.commit()
        .map_err(Error::database("committing the retirement"))?;
    Ok(Retired {
        projection: projection.to_owned(),
        version,
        dropped,
        kept_for: shared_with,
        checkpoints: cleared.checkpoints,
        parked_events: cleared.parked_events,
    })
}

/// Drops the read model of `version` (see [`retire`]); what was dropped.
fn drop_read_model(
    tx: &mut Transaction<'_>,
    schema: &str,
    version: u32,
    live: u32,
) -> Result<Vec<String>, Error> {
    if let Some(own) = read_model_schema(schema, version) {
        tx.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{own}\" CASCADE"))
            .map_err(Error::database(format!("dropping schema '{own}'")))?;
        return Ok(vec![format!("schema {own}")]);
    }
    let tables = read_model_tables(tx, schema, version, live)?;
    for table in &tables {
        tx.batch_execute(&format!("DROP TABLE \"{schema}\".\"{}\"", quoted(table)))
            .map_err(Error::database(format!(
                "dropping table {schema}.{table} (drop what depends on it first)"
            )))?;
    }
    Ok(tables)
}

/// Fails with [`Error::MissingTables`] without the registry's table (`projector migrate`).
fn require_registry(client: &mut impl GenericClient, schema: &str) -> Result<(), Error> {
    if registry::table_exists(client)? {
        return Ok(());
    }
    Err(Error::MissingTables {
        schema: schema.to_owned(),
        tables: vec![registry::TABLE.to_owned()],
    })
}

/// Serialises promotions and retirements of `projection` until `tx` ends.
fn lock_versions(tx: &mut Transaction<'_>, projection: &str) -> Result<(), Error> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('projector versions ' || current_schema() || ' ' || $1))",
        &[&projection],
    )
    .map(drop)
    .map_err(Error::database("locking the projection's versions"))
}

/// The checkpoints of `stored`, by layout; locked until `tx` ends with `lock`.
fn layouts_of(
    tx: &mut Transaction<'_>,
    stored: &str,
    lock: bool,
) -> Result<Vec<EarlierLayout>, Error> {
    if lock {
        tx.execute(
            "SELECT 1 FROM projector_checkpoints WHERE projection = $1 FOR UPDATE",
            &[&stored],
        )
        .map_err(Error::database("holding the live version's checkpoints"))?;
    }
    Ok(tx
        .query(
            "SELECT total_partitions, array_agg(last_position ORDER BY partition_key) \
             FROM projector_checkpoints WHERE projection = $1 GROUP BY 1 ORDER BY 1",
            &[&stored],
        )
        .map_err(Error::database("reading the checkpoints"))?
        .iter()
        .map(|row| EarlierLayout {
            total_partitions: row.get::<_, i32>(0).unsigned_abs(),
            checkpoints: row.get(1),
        })
        .collect())
}

/// Waits until the checkpoints of `stored` cover `held` (see [`covers`]), reading them again
/// every 50 ms (each read sees the commits made since); how far behind it still is on timeout.
fn wait_until_covered(
    tx: &mut Transaction<'_>,
    stored: &str,
    held: &[EarlierLayout],
    within: Duration,
) -> Result<(), i64> {
    let deadline = Instant::now() + within;
    let mut behind = 0;
    loop {
        match layouts_of(tx, stored, false) {
            Ok(layouts) if covers(&layouts, held) => return Ok(()),
            Ok(layouts) => {
                let lowest = layouts
                    .iter()
                    .map(EarlierLayout::applied_through)
                    .min()
                    .unwrap_or(0);
                let highest = held
                    .iter()
                    .map(EarlierLayout::applied_at_most)
                    .max()
                    .unwrap_or(0);
                behind = (highest - lowest).max(0);
            }
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(behind);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether checkpoints `new` have applied everything `old` has: partition by partition when
/// both are one layout of the same count, else when the lowest of `new` is at or above the
/// highest of `old`.
pub(crate) fn covers(new: &[EarlierLayout], old: &[EarlierLayout]) -> bool {
    if old.is_empty() {
        return true;
    }
    if let ([n], [o]) = (new, old) {
        if n.total_partitions == o.total_partitions {
            return n
                .checkpoints
                .iter()
                .zip(&o.checkpoints)
                .all(|(n, o)| n >= o);
        }
    }
    let lowest = new.iter().map(EarlierLayout::applied_through).min();
    let highest = old.iter().map(EarlierLayout::applied_at_most).max();
    matches!((lowest, highest), (Some(l), Some(h)) if l >= h)
}

fn set_state(
    tx: &mut Transaction<'_>,
    projection: &str,
    version: u32,
    state: VersionState,
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO projector_projection_versions (projection, version, state) \
         VALUES ($1, $2, $3) \
         ON CONFLICT (projection, version) DO UPDATE SET state = $3, changed_at = NOW()",
        &[&projection, &to_i32(version), &state.name()],
    )
    .map(drop)
    .map_err(Error::database("recording the versions"))
}

fn to_i32(version: u32) -> i32 {
    i32::try_from(version).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(checkpoints: &[i64]) -> EarlierLayout {
        EarlierLayout {
            total_partitions: checkpoints.len() as u32,
            checkpoints: checkpoints.to_vec(),
        }
    }

    #[test]
    fn a_version_covers_another_partition_by_partition_or_past_its_highest() {
        assert!(covers(&[layout(&[5, 9])], &[layout(&[5, 8])]));
        assert!(!covers(&[layout(&[4, 9])], &[layout(&[5, 8])]));
        assert!(covers(&[layout(&[9, 9, 9])], &[layout(&[5, 9])]));
        assert!(!covers(&[layout(&[9, 8, 9])], &[layout(&[5, 9])]));
        assert!(covers(&[], &[]));
        assert!(!covers(&[], &[layout(&[1])]));
    }
}
