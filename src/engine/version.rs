//! The checks and steps of a projection's version at a runner's start: a version and name
//! that can be kept apart, and the readers' views made at a new version's first start.

use postgres::Client;

use crate::Error;
use crate::projections::projection::{AnyProjection, Projection, lock_setup};
use crate::store::readers;
use crate::store::registry::{read_model_schema, split_stored_name};

/// Fails on version 0, on a name that reads as a version of another (`users@2` at version
/// 1), and on a version whose read-model schema's name would pass PostgreSQL's 63 bytes.
pub(crate) fn check_version(projection: &AnyProjection, schema: &str) -> Result<(), Error> {
    let (name, version) = (projection.given_name(), projection.version());
    if version == 0 {
        return Err(Error::invalid_setting(
            "Projection::version",
            format!("{name}: 0"),
            "versions start at 1",
        ));
    }
    if split_stored_name(name).1 != 1 {
        return Err(Error::invalid_setting(
            "Builder::projection",
            name,
            "a projection's name may not end in '@' and a number, which names a version: \
             rename it, or give it that version (Projection::version, `-- version:`)",
        ));
    }
    match read_model_schema(schema, version) {
        Some(own) if own.len() > 63 => Err(Error::invalid_setting(
            "Projection::version",
            format!("{name}: {version}"),
            format!(
                "version {version}'s read model would live in schema '{own}', longer than \
                 PostgreSQL's 63 bytes: use a shorter schema name"
            ),
        )),
        _ => Ok(()),
    }
}

/// At the first start of a new version of projection `name`, when the projection has no views
/// in the readers' schema yet: one view per table of the new version's read model, over the
/// live version's table of that name, so that readers can move to the stable names before the
/// switch.
pub(crate) fn publish_live_version(
    client: &mut Client,
    schema: &str,
    name: &str,
    live: u32,
    version: u32,
) -> Result<(), Error> {
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting to publish the readers' views"))?;
    lock_setup(&mut tx, name).map_err(Error::database("waiting for other processes' setup"))?;
    if !readers::has_views(&mut tx, schema, name)? {
        let tables = readers::read_model_tables(&mut tx, schema, live, version)?;
        readers::point_readers_at(&mut tx, schema, name, live, &tables)?;
    }
    tx.commit()
        .map_err(Error::database("committing the readers' views"))
}
