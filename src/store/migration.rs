//! Migrations: the tables the projector needs, created where missing and checked where present,
//! and the rows of an earlier version's tables carried over. Nothing is ever altered: a table
//! this crate did not create may belong to another tool (pupsourcing keeps its own
//! `projection_checkpoints` next to `events`).

use log::{info, warn};
use postgres::{GenericClient, Transaction};

use crate::{Database, Error};

/// A table the projector reads or writes: how to create it, and the columns it needs, each
/// with the types it may have (`format_type` spelling, the one created first).
pub(crate) struct Table {
    pub(crate) name: &'static str,
    create: &'static str,
    columns: &'static [(&'static str, &'static [&'static str])],
}

const TEXT: &[&str] = &["text", "character varying"];
const BIGINT: &[&str] = &["bigint"];
const INTEGER: &[&str] = &["integer"];
const TIMESTAMP: &[&str] = &["timestamp with time zone", "timestamp without time zone"];

/// The event store, as pupsourcing lays it out: the projector reads and appends to it.
pub(crate) const EVENTS: Table = Table {
    name: "events",
    create: include_str!("../../sql/events.sql"),
    columns: &[
        ("global_position", BIGINT),
        ("bounded_context", TEXT),
        ("aggregate_type", TEXT),
        ("aggregate_id", TEXT),
        ("aggregate_version", BIGINT),
        ("event_id", &["uuid"]),
        ("event_type", TEXT),
        ("event_version", INTEGER),
        ("payload", &["bytea"]),
        ("trace_id", TEXT),
        ("correlation_id", TEXT),
        ("causation_id", TEXT),
        ("metadata", &["jsonb", "json"]),
        ("created_at", TIMESTAMP),
    ],
};

const AGGREGATE_HEADS: Table = Table {
    name: "aggregate_heads",
    create: include_str!("../../sql/aggregate_heads.sql"),
    columns: &[
        ("bounded_context", TEXT),
        ("aggregate_type", TEXT),
        ("aggregate_id", TEXT),
        ("aggregate_version", BIGINT),
        ("updated_at", TIMESTAMP),
    ],
};

const CHECKPOINTS: Table = Table {
    name: "projector_checkpoints",
    create: include_str!("../../sql/projector_checkpoints.sql"),
    columns: &[
        ("projection", TEXT),
        ("total_partitions", INTEGER),
        ("partition_key", INTEGER),
        ("last_position", BIGINT),
        ("updated_at", TIMESTAMP),
        ("generation", BIGINT),
    ],
};

const PRIOR_LAYOUTS: Table = Table {
    name: "projector_prior_layouts",
    create: include_str!("../../sql/projector_prior_layouts.sql"),
    columns: &[
        ("projection", TEXT),
        ("total_partitions", INTEGER),
        ("prior_total", INTEGER),
        ("prior_positions", &["bigint[]"]),
        ("created_at", TIMESTAMP),
    ],
};

/// Parked events of projections whose poison policy is `park` (see `dead_letter.rs`).
const DEAD_LETTERS: Table = Table {
    name: "projection_dead_letters",
    create: include_str!("../../sql/projection_dead_letters.sql"),
    columns: &[
        ("projection", TEXT),
        ("global_position", BIGINT),
        ("bounded_context", TEXT),
        ("aggregate_type", TEXT),
        ("aggregate_id", TEXT),
        ("event_type", TEXT),
        ("error", TEXT),
        ("attempts", INTEGER),
        ("first_failed_at", TIMESTAMP),
        ("last_failed_at", TIMESTAMP),
    ],
};

/// The record of dropped dead letters (see `dead_letter.rs`). `migrate` creates it, but only
/// `projector dead-letters drop` needs it: a process that runs projections starts without it,
/// so that an upgrade whose `migrate` has not run yet keeps running.
pub(crate) const DEAD_LETTER_DROPS: Table = Table {
    name: "projection_dead_letter_drops",
    create: include_str!("../../sql/projection_dead_letter_drops.sql"),
    columns: &[
        ("projection", TEXT),
        ("aggregate_id", TEXT),
        ("event_count", INTEGER),
        ("positions", &["bigint[]"]),
        ("dead_letters", &["jsonb"]),
        ("database_user", TEXT),
        ("client_address", TEXT),
        ("application_name", TEXT),
        ("os_user", TEXT),
        ("dropped_at", TIMESTAMP),
    ],
};

/// What a projection is when it is not simply running: failed, or paused (see
/// `crate::store::state`).
pub(crate) const PROJECTION_STATES: Table = Table {
    name: "projector_projection_states",
    create: include_str!("../../sql/projector_projection_states.sql"),
    columns: &[
        ("projection", TEXT),
        ("state", TEXT),
        ("error", TEXT),
        ("partition_key", INTEGER),
        ("total_partitions", INTEGER),
        ("position", BIGINT),
        ("process", TEXT),
        ("changed_at", TIMESTAMP),
    ],
};

/// The versions of projections beyond their first (see `crate::store::version`).
pub(crate) const PROJECTION_VERSIONS: Table = Table {
    name: "projector_projection_versions",
    create: include_str!("../../sql/projector_projection_versions.sql"),
    columns: &[
        ("projection", TEXT),
        ("version", INTEGER),
        ("state", TEXT),
        ("changed_at", TIMESTAMP),
    ],
};

/// Every table the projector needs, in the order they are created.
pub(crate) const TABLES: [&Table; 5] = [
    &EVENTS,
    &AGGREGATE_HEADS,
    &CHECKPOINTS,
    &PRIOR_LAYOUTS,
    &DEAD_LETTERS,
];

/// Tables a later version added, which `migrate` creates like the others but a run does not
/// require: without one, the feature it holds is off and a log line says to run `migrate`.
pub(crate) const LATER_TABLES: [&Table; 3] =
    [&DEAD_LETTER_DROPS, &PROJECTION_STATES, &PROJECTION_VERSIONS];

/// The tables of the version before the rename, which the projector no longer uses.
const EARLIER_CHECKPOINTS: &str = "projection_checkpoints";
const EARLIER_PRIOR_LAYOUTS: &str = "projection_priors";

/// Creates the schema and the projector's tables where they are missing, and checks the shape
/// of those already there; never alters a table. Safe to run again, and from several processes
/// at once. A role that may only create tables in an existing schema can run it.
///
/// Fails with [`Error::UnexpectedColumns`] when a table of one of the projector's names lacks a
/// column it needs, or has it with another type. When the tables of an earlier version
/// (`projection_checkpoints`, `projection_priors`) are found as that version left them, their
/// rows are copied into the new tables as these are created, and a log line says how to drop
/// them once every process runs this version.
pub fn migrate(database: &Database) -> Result<(), Error> {
    let schema = database.schema_name();
    let mut client = database.connect()?;
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting the migration"))?;
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning; \
         SELECT pg_advisory_xact_lock(hashtext('projector migrate'))",
    )
    .map_err(Error::database("waiting for other migrations"))?;
    let schema_exists: bool = tx
        .query_one(
            "SELECT to_regnamespace(quote_ident($1)) IS NOT NULL",
            &[&schema],
        )
        .map_err(Error::database(format!("looking for schema '{schema}'")))?
        .get(0);
    if !schema_exists {
        // Quoted, so that the name is taken exactly as given (case included).
        tx.batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
            .map_err(Error::database(format!("creating schema '{schema}'")))?;
    }
    let mut created = Vec::new();
    for table in TABLES.into_iter().chain(LATER_TABLES) {
        if columns_of(&mut tx, schema, table.name)?.is_empty() {
            tx.batch_execute(table.create)
                .map_err(Error::database(format!("creating table {}", table.name)))?;
            created.push(table.name);
        } else {
            check_columns(&mut tx, schema, table)?;
        }
    }
    carry_over_earlier_version(&mut tx, schema, &created)?;
    tx.commit()
        .map_err(Error::database("committing the migration"))
}

/// Fails with [`Error::UnexpectedColumns`] unless `table` has every column the projector needs,
/// each of a type it can read and write.
pub(crate) fn check_columns(
    client: &mut impl GenericClient,
    schema: &str,
    table: &Table,
) -> Result<(), Error> {
    let found = columns_of(client, schema, table.name)?;
    let columns: Vec<(String, String, Option<String>)> = table
        .columns
        .iter()
        .filter_map(|&(column, accepted)| {
            let found_type = found
                .iter()
                .find(|(name, _)| name == column)
                .map(|(_, found_type)| found_type);
            match found_type {
                Some(found_type) if accepted.contains(&found_type.as_str()) => None,
                _ => Some((
                    column.to_owned(),
                    accepted[0].to_owned(),
                    found_type.cloned(),
                )),
            }
        })
        .collect();
    if columns.is_empty() {
        Ok(())
    } else {
        Err(Error::UnexpectedColumns {
            schema: schema.to_owned(),
            table: table.name.to_owned(),
            columns,
        })
    }
}

/// Fails with [`Error::MissingTables`] (run `projector migrate`) when `table` is not in
/// `schema`, and as [`check_columns`] when it is there with other columns.
pub(crate) fn check_table(
    client: &mut impl GenericClient,
    schema: &str,
    table: &Table,
) -> Result<(), Error> {
    if columns_of(client, schema, table.name)?.is_empty() {
        return Err(Error::MissingTables {
            schema: schema.to_owned(),
            tables: vec![table.name.to_owned()],
        });
    }
    check_columns(client, schema, table)
}

/// The columns of `schema.table` with their types; none when there is no such table.
fn columns_of(
    client: &mut impl GenericClient,
    schema: &str,
    table: &str,
) -> Result<Vec<(String, String)>, Error> {
    Ok(client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&format!("\"{schema}\".{table}")],
        )
        .map_err(Error::database(format!("reading the columns of {table}")))?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect())
}

/// Copies the rows of the earlier version's tables into the tables created just now, and says
/// what to do with the old ones. Rows are copied only into a table this migration created:
/// copied again later, they would bring back checkpoints a reset or a re-partitioning removed.
fn carry_over_earlier_version(
    tx: &mut Transaction<'_>,
    schema: &str,
    created: &[&str],
) -> Result<(), Error> {
    let has = |columns: &[(String, String)], name: &str| columns.iter().any(|(c, _)| c == name);
    let mut leftovers = Vec::new();

    let checkpoints = columns_of(tx, schema, EARLIER_CHECKPOINTS)?;
    if has(&checkpoints, "total_partitions") && has(&checkpoints, "partition_key") {
        if created.contains(&CHECKPOINTS.name) {
            let generation = if has(&checkpoints, "generation") {
                "generation"
            } else {
                "0"
            };
            let copied = tx
                .execute(
                    &format!(
                        "INSERT INTO projector_checkpoints (projection, total_partitions, \
                             partition_key, last_position, updated_at, generation) \
                         SELECT projection, total_partitions, partition_key, last_position, \
                             updated_at, {generation} FROM {EARLIER_CHECKPOINTS} \
                         ON CONFLICT DO NOTHING"
                    ),
                    &[],
                )
                .map_err(Error::database("copying the earlier version's checkpoints"))?;
            info!(
                "copied {copied} checkpoint(s) from {schema}.{EARLIER_CHECKPOINTS} to \
                 {schema}.{}",
                CHECKPOINTS.name
            );
        }
        leftovers.push(EARLIER_CHECKPOINTS);
    } else if has(&checkpoints, "projection_name") && has(&checkpoints, "generation") {
        warn!(
            "{schema}.{EARLIER_CHECKPOINTS} is another tool's table (pupsourcing's), to which an \
             earlier version of the projector added a column by mistake; the projector does not \
             use it. To undo that, run: ALTER TABLE \"{schema}\".{EARLIER_CHECKPOINTS} DROP COLUMN \
             generation"
        );
    }

    let prior_layouts = columns_of(tx, schema, EARLIER_PRIOR_LAYOUTS)?;
    if has(&prior_layouts, "prior_total") && has(&prior_layouts, "prior_positions") {
        if created.contains(&PRIOR_LAYOUTS.name) {
            let copied = tx
                .execute(
                    &format!(
                        "INSERT INTO projector_prior_layouts (projection, total_partitions, \
                             prior_total, prior_positions, created_at) \
                         SELECT projection, total_partitions, prior_total, prior_positions, \
                             created_at FROM {EARLIER_PRIOR_LAYOUTS} \
                         ON CONFLICT DO NOTHING"
                    ),
                    &[],
                )
                .map_err(Error::database(
                    "copying the earlier version's re-partitionings in progress",
                ))?;
            info!(
                "copied {copied} earlier layout(s) from {schema}.{EARLIER_PRIOR_LAYOUTS} to \
                 {schema}.{}",
                PRIOR_LAYOUTS.name
            );
        }
        leftovers.push(EARLIER_PRIOR_LAYOUTS);
    }

    if !leftovers.is_empty() {
        let drops: Vec<String> = leftovers
            .iter()
            .map(|table| format!("DROP TABLE \"{schema}\".{table};"))
            .collect();
        info!(
            "{} of an earlier version of the projector are no longer used (their rows were \
             copied when this version first migrated the schema); once every process runs this \
             version, drop them: {}",
            leftovers
                .iter()
                .map(|table| format!("{schema}.{table}"))
                .collect::<Vec<_>>()
                .join(" and "),
            drops.join(" ")
        );
    }
    Ok(())
}
