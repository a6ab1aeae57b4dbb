//! The versions registry: which version of a projection is live, which are building beside it
//! and which were retired, in `projector_projection_versions` (see
//! `sql/projector_projection_versions.sql`), and the names each version is kept under.
//!
//! Version 1 is kept exactly as before versions existed: under the projection's own name, its
//! read model in the database's schema. Version `N >= 2` is kept under the *stored name*
//! `name@N` (checkpoints, layout, parked events, states: everything keyed by projection name),
//! and its read model in the schema `<schema>_vN`, first in the `search_path` of its
//! transactions. A projection with no row in the registry has version 1 live.

use postgres::GenericClient;

use crate::Error;

/// The registry's table, which `migrate` creates; without it only version 1 runs.
pub(crate) const TABLE: &str = "projector_projection_versions";

/// The name version `version` of projection `name` is kept under: `name` for version 1,
/// `name@N` for a later one.
pub fn stored_name(name: &str, version: u32) -> String {
    if version <= 1 {
        name.to_owned()
    } else {
        format!("{name}@{version}")
    }
}

/// The projection and version a stored name stands for: `users@2` is version 2 of `users`;
/// any other name (`users`, `a@b`, `x@1`) is version 1 of itself.
pub fn split_stored_name(stored: &str) -> (&str, u32) {
    match stored.rsplit_once('@') {
        // Written as `stored_name` writes it: no sign, no leading zero.
        Some((name, text))
            if !name.is_empty()
                && !text.starts_with('0')
                && text.bytes().all(|b| b.is_ascii_digit()) =>
        {
            match text.parse::<u32>() {
                Ok(version) if version >= 2 => (name, version),
                _ => (stored, 1),
            }
        }
        _ => (stored, 1),
    }
}

/// The `version` label of a projection's figures in `/metrics`, from its stored name (the
/// `projection` label keeps the stored name, so that no two versions' figures add up).
pub(crate) fn version_label(stored: &str) -> String {
    split_stored_name(stored).1.to_string()
}

/// The schema version `version`'s read model lives in, beside `schema` (the database's):
/// `None` for version 1 (it stays in `schema`), else `<schema>_v<N>`.
pub fn read_model_schema(schema: &str, version: u32) -> Option<String> {
    (version >= 2).then(|| format!("{schema}_v{version}"))
}

/// The schema readers query: one view per read-model table over the live version's table.
pub fn readers_schema(schema: &str) -> String {
    format!("{schema}_readers")
}

/// In `tx`, creates the schema of version `version`'s read model if it has one, and puts it
/// first in the transaction's `search_path`, before the current schema.
pub(crate) fn enter_version_schema(
    tx: &mut postgres::Transaction<'_>,
    version: u32,
) -> Result<(), postgres::Error> {
    let schema: String = tx
        .query_one("SELECT current_schema()::text", &[])?
        .get::<_, Option<String>>(0)
        .unwrap_or_default();
    if let Some(own) = read_model_schema(&schema, version) {
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{own}\"; \
             SET LOCAL search_path = \"{own}\", \"{schema}\""
        ))?;
    }
    Ok(())
}

/// Where a version of a projection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VersionState {
    /// Started beside the live version; readers do not see it yet.
    Building,
    /// The version readers see through the readers' schema.
    Live,
    /// Replaced by `projector promote`: its processes stop; `projector retire` drops it.
    Retired,
}

impl VersionState {
    /// `building`, `live` or `retired`, as stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            VersionState::Building => "building",
            VersionState::Live => "live",
            VersionState::Retired => "retired",
        }
    }

    fn from_name(name: &str) -> VersionState {
        match name {
            "live" => VersionState::Live,
            "retired" => VersionState::Retired,
            _ => VersionState::Building,
        }
    }
}

/// The stored name of the live version of `projection` when it is named without a version
/// (`tally` is `tally@2` once version 2 is live); `projection` itself otherwise (a name with
/// `@N`, or a projection whose live version is 1). What `wait`, `pause`, `resume` and
/// `rewind` act on when given a bare name.
pub fn live_stored_name(
    client: &mut impl GenericClient,
    projection: &str,
) -> Result<String, Error> {
    let (name, version) = split_stored_name(projection);
    if version != 1 || name != projection {
        return Ok(projection.to_owned());
    }
    Ok(stored_name(name, live_version(&states_of(client, name)?)))
}

/// Whether the registry's table exists in the current schema.
pub(crate) fn table_exists(client: &mut impl GenericClient) -> Result<bool, Error> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&TABLE])
        .map_err(Error::database(format!("looking for {TABLE}")))?
        .get(0))
}

/// The versions of `name` the registry holds, in order (empty without the table).
pub(crate) fn states_of(
    client: &mut impl GenericClient,
    name: &str,
) -> Result<Vec<(u32, VersionState)>, Error> {
    if !table_exists(client)? {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT version, state FROM projector_projection_versions WHERE projection = $1 \
             ORDER BY version",
            &[&name],
        )
        .map_err(Error::database("reading the projection's versions"))?
        .iter()
        .map(|row| {
            (
                row.get::<_, i32>(0).unsigned_abs(),
                VersionState::from_name(row.get(1)),
            )
        })
        .collect())
}

/// The live version of `name`: the one stored as live, else 1.
pub(crate) fn live_version(states: &[(u32, VersionState)]) -> u32 {
    states
        .iter()
        .find(|(_, state)| *state == VersionState::Live)
        .map_or(1, |&(version, _)| version)
}

/// The state of `version` among `states`: as stored, else live for the live version, else
/// retired for one below it and building for one above it.
pub(crate) fn state_of(states: &[(u32, VersionState)], version: u32) -> VersionState {
    if let Some(&(_, state)) = states.iter().find(|(v, _)| *v == version) {
        return state;
    }
    let live = live_version(states);
    match version.cmp(&live) {
        std::cmp::Ordering::Equal => VersionState::Live,
        std::cmp::Ordering::Less => VersionState::Retired,
        std::cmp::Ordering::Greater => VersionState::Building,
    }
}

/// Records, at a start of version `version` of `name` (in `schema`), that it is building,
/// unless the registry knows it already; refuses a retired version. Version 1 with no registry
/// table starts as before.
pub(crate) fn register_start(
    client: &mut impl GenericClient,
    schema: &str,
    name: &str,
    version: u32,
) -> Result<(), Error> {
    if !table_exists(client)? {
        if version <= 1 {
            return Ok(());
        }
        return Err(Error::MissingTables {
            schema: schema.to_owned(),
            tables: vec![TABLE.to_owned()],
        });
    }
    let states = states_of(client, name)?;
    if state_of(&states, version) == VersionState::Retired {
        return Err(Error::VersionRetired {
            projection: name.to_owned(),
            version,
            live: live_version(&states),
        });
    }
    if version >= 2 {
        if !states.iter().any(|&(known, _)| known == version) {
            refuse_a_shared_version_schema(client, schema, name, version)?;
        }
        client
            .execute(
                "INSERT INTO projector_projection_versions (projection, version, state) \
                 VALUES ($1, $2, 'building') ON CONFLICT DO NOTHING",
                &[&name, &i32::try_from(version).unwrap_or(i32::MAX)],
            )
            .map_err(Error::database("recording the projection's version"))?;
    }
    Ok(())
}

/// The other projections than `name` with a version `version` registered (in any state), in
/// name order: from version 2 on, their read models are in the same schema `<schema>_vN`.
pub(crate) fn other_projections_with_version(
    client: &mut impl GenericClient,
    name: &str,
    version: u32,
) -> Result<Vec<String>, Error> {
    Ok(client
        .query(
            "SELECT projection FROM projector_projection_versions \
             WHERE version = $1 AND projection <> $2 ORDER BY 1",
            &[&i32::try_from(version).unwrap_or(i32::MAX), &name],
        )
        .map_err(Error::database("reading the other projections' versions"))?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// Refuses a new version `version` of `name` when another projection has a version of that
/// number: its read model would share the schema `<schema>_vN`, where the projector cannot
/// tell one projection's tables from another's (a promotion would point readers at the
/// other's tables, a retirement could not drop only this one's).
fn refuse_a_shared_version_schema(
    client: &mut impl GenericClient,
    schema: &str,
    name: &str,
    version: u32,
) -> Result<(), Error> {
    let others = other_projections_with_version(client, name, version)?;
    if others.is_empty() {
        return Ok(());
    }
    let highest: i32 = client
        .query_one(
            "SELECT MAX(version) FROM projector_projection_versions",
            &[],
        )
        .map_err(Error::database("reading the highest version"))?
        .get(0);
    let others: Vec<String> = others.iter().map(|other| format!("'{other}'")).collect();
    Err(Error::invalid_setting(
        format!("the version of projection '{name}'"),
        version,
        format!(
            "schema '{}' already holds version {version} of {}, and two projections' read models \
             cannot share a version's schema: give this one a version number no other \
             projection of schema '{schema}' has (`projector status` lists them), such as {}",
            read_model_schema(schema, version).unwrap_or_default(),
            others.join(", "),
            highest.saturating_add(1)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_one_keeps_the_name_and_later_ones_add_their_number() {
        assert_eq!(stored_name("users", 1), "users");
        assert_eq!(stored_name("users", 2), "users@2");
        assert_eq!(split_stored_name("users@2"), ("users", 2));
        assert_eq!(split_stored_name("users"), ("users", 1));
        assert_eq!(split_stored_name("a@b"), ("a@b", 1));
        assert_eq!(split_stored_name("x@1"), ("x@1", 1));
        assert_eq!(split_stored_name("x@02"), ("x@02", 1));
        assert_eq!(split_stored_name("@2"), ("@2", 1));
    }

    #[test]
    fn a_version_without_a_row_is_placed_against_the_live_one() {
        let states = [(1, VersionState::Retired), (2, VersionState::Live)];
        assert_eq!(live_version(&states), 2);
        assert_eq!(state_of(&states, 3), VersionState::Building);
        assert_eq!(state_of(&[], 1), VersionState::Live);
        assert_eq!(
            state_of(&[(2, VersionState::Building)], 1),
            VersionState::Live
        );
        assert_eq!(
            state_of(&[(3, VersionState::Live)], 2),
            VersionState::Retired
        );
    }
}
