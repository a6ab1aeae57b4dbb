//! The readers' schema: `<schema>_readers` holds one view per read-model table of a versioned
//! projection, over the live version's table, so that readers keep one name whatever version
//! is live. The views of a projection are told apart by their comment (`projector: NAME`), and
//! replaced in the transaction that promotes a version: a reader's statement sees the old
//! version's tables or the new one's, never both.

use postgres::GenericClient;

use crate::Error;
use crate::store::registry::{read_model_schema, readers_schema};

/// The tables (and views) version `version`'s read model has, by name: those of its own
/// schema, or for version 1 (kept in `schema` with the projector's tables), those named like
/// the tables of version `like` (a later version, which ran the same setup in its own schema).
pub(crate) fn read_model_tables(
    client: &mut impl GenericClient,
    schema: &str,
    version: u32,
    like: u32,
) -> Result<Vec<String>, Error> {
    let own = read_model_schema(schema, version);
    let listed = own.clone().or_else(|| read_model_schema(schema, like));
    let Some(listed) = listed else {
        return Ok(Vec::new());
    };
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f') \
                 AND ($2 OR to_regclass(quote_ident($3) || '.' || quote_ident(c.relname)) IS NOT NULL) \
             ORDER BY 1",
            &[&listed, &own.is_some(), &schema],
        )
        .map_err(Error::database("listing the read model's tables"))?;
    Ok(rows
        .iter()
        .map(|row| row.get::<_, String>(0))
        .filter(|table| own.is_some() || !is_projector_table(table))
        .collect())
}

/// A table of the projector or of the event store, which no read model may claim.
fn is_projector_table(table: &str) -> bool {
    table == "events"
        || table == "aggregate_heads"
        || table.starts_with("projector_")
        || table.starts_with("projection_")
}

/// Points the readers' views of projection `name` at version `version`'s read model: drops
/// the projection's views and creates one per table of `tables` over that version's schema.
/// Run in the promoting transaction (or at a version's first start, when the projection has
/// no views yet), so that readers see the switch at once.
pub(crate) fn point_readers_at(
    client: &mut impl GenericClient,
    schema: &str,
    name: &str,
    version: u32,
    tables: &[String],
) -> Result<(), Error> {
    let readers = readers_schema(schema);
    let source = read_model_schema(schema, version).unwrap_or_else(|| schema.to_owned());
    let comment = format!("projector: {name}");
    client
        .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{readers}\""))
        .map_err(Error::database(format!("creating schema '{readers}'")))?;
    for view in views_of(client, &readers, &comment)? {
        client
            .batch_execute(&format!("DROP VIEW \"{readers}\".\"{}\"", quoted(&view)))
            .map_err(Error::database(format!("dropping view {readers}.{view}")))?;
    }
    for table in tables {
        let table = quoted(table);
        client
            .batch_execute(&format!(
                "CREATE VIEW \"{readers}\".\"{table}\" AS SELECT * FROM \"{source}\".\"{table}\"; \
                 COMMENT ON VIEW \"{readers}\".\"{table}\" IS '{}'",
                comment.replace('\'', "''")
            ))
            .map_err(Error::database(format!(
                "creating view {readers}.{table} (a view or table of that name belongs to \
                 something else: rename one)"
            )))?;
    }
    Ok(())
}

/// Whether projection `name` has views in the readers' schema.
pub(crate) fn has_views(
    client: &mut impl GenericClient,
    schema: &str,
    name: &str,
) -> Result<bool, Error> {
    let comment = format!("projector: {name}");
    Ok(!views_of(client, &readers_schema(schema), &comment)?.is_empty())
}

/// The views of the readers' schema whose comment is `comment`.
fn views_of(
    client: &mut impl GenericClient,
    readers: &str,
    comment: &str,
) -> Result<Vec<String>, Error> {
    Ok(client
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind = 'v' \
                 AND obj_description(c.oid, 'pg_class') = $2 ORDER BY 1",
            &[&readers, &comment],
        )
        .map_err(Error::database("listing the readers' views"))?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// `name` with its double quotes doubled, for use inside `"..."`.
pub(crate) fn quoted(name: &str) -> String {
    name.replace('"', "\"\"")
}
