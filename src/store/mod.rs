//! The event store: migrations, its shape checked, appends with optimistic concurrency
//! ([`append`]), and reads.

pub(crate) mod append;
pub(crate) mod database;
pub(crate) mod gap;
pub(crate) mod migration;
pub(crate) mod readers;
pub(crate) mod registry;
pub(crate) mod replica;
pub(crate) mod state;

use postgres::types::Oid;
use postgres::{GenericClient, Row};

use crate::Error;
use crate::event::{Event, Scope};

/// The columns of an event, in the order [`event_from_row`] reads them.
pub(crate) const EVENT_COLUMNS: &str = "global_position, bounded_context, aggregate_type, \
    aggregate_id, aggregate_version, event_id, event_type, event_version, payload, trace_id, \
    correlation_id, causation_id, metadata::text, created_at";

/// The oldest server the runtime works with: the workers' sessions set `idle_session_timeout`.
const MIN_SERVER_VERSION: i32 = 140_000;

/// Fails with a configuration error on a server older than PostgreSQL 14, which would refuse
/// every worker's connection (see [`Database::session_timeout_secs`](crate::Database::session_timeout_secs)).
pub(crate) fn check_server_version(client: &mut impl GenericClient) -> Result<(), Error> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .map_err(Error::database("reading the server's version"))?;
    let (number, version): (i32, String) = (row.get(0), row.get(1));
    if number >= MIN_SERVER_VERSION {
        return Ok(());
    }
    Err(Error::invalid_setting(
        "the PostgreSQL server's version",
        version,
        "the projector needs PostgreSQL 14 or later (its workers' sessions end themselves when \
         a process stops answering, with idle_session_timeout): upgrade the server",
    ))
}

/// Fails with [`Error::MissingTables`] unless the projector's tables are in the current schema,
/// which it returns.
pub(crate) fn check_tables_here(client: &mut impl GenericClient) -> Result<String, Error> {
    let schema: String = client
        .query_one("SELECT current_schema()::text", &[])
        .map_err(Error::database("reading the current schema"))?
        .get::<_, Option<String>>(0)
        .unwrap_or_default();
    check_tables(client, &schema)?;
    Ok(schema)
}

/// Fails with [`Error::MissingTables`] unless all the projector's tables exist.
pub(crate) fn check_tables(client: &mut impl GenericClient, schema: &str) -> Result<(), Error> {
    let mut missing = Vec::new();
    for table in migration::TABLES {
        let row = client
            .query_one("SELECT to_regclass($1)::text", &[&table.name])
            .map_err(Error::database("looking for the projector's tables"))?;
        if row.get::<_, Option<String>>(0).is_none() {
            missing.push(table.name.to_owned());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingTables {
            schema: schema.to_owned(),
            tables: missing,
        })
    }
}

/// The columns of an event that [`event_from_row`] reads as never NULL.
const NOT_NULL_COLUMNS: [&str; 10] = [
    "global_position",
    "bounded_context",
    "aggregate_type",
    "aggregate_id",
    "aggregate_version",
    "event_id",
    "event_type",
    "event_version",
    "payload",
    "created_at",
];

/// Fails with [`Error::UnexpectedColumns`] unless the events table has the columns the
/// projector reads, of types it can read, and `NOT NULL` where an event must have a value
/// (a NULL there could not be made into an [`Event`]).
pub(crate) fn check_event_columns(
    client: &mut impl GenericClient,
    schema: &str,
) -> Result<(), Error> {
    migration::check_columns(client, schema, &migration::EVENTS)?;
    let nullable: Vec<(String, String, Option<String>)> = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attname::text = ANY($2) \
                 AND a.attnum > 0 AND NOT a.attisdropped AND NOT a.attnotnull \
             ORDER BY a.attnum",
            &[&format!("\"{schema}\".events"), &NOT_NULL_COLUMNS.to_vec()],
        )
        .map_err(Error::database("reading the columns of events"))?
        .iter()
        .map(|row| {
            let (column, found): (String, String) = (row.get(0), row.get(1));
            let expected = format!("{found} NOT NULL");
            (column, expected, Some(format!("{found} allowing NULL")))
        })
        .collect();
    if nullable.is_empty() {
        Ok(())
    } else {
        Err(Error::UnexpectedColumns {
            schema: schema.to_owned(),
            table: "events".to_owned(),
            columns: nullable,
        })
    }
}

/// The sequence `global_position` is drawn from, as its oid and its schema-qualified name as
/// SQL spells it (quoted where needed).
///
/// It is the sequence the column's default calls (`BIGSERIAL`, or `DEFAULT nextval('seq')`
/// whether or not the sequence is `OWNED BY` the column), else the one behind an identity
/// column. The default comes first: a column may still own a sequence its default no longer
/// calls. Fails with a configuration error when positions come from no sequence: the projector
/// must watch the sequence to tell a transaction still in flight from a rolled-back one.
pub(crate) fn position_sequence(client: &mut impl GenericClient) -> Result<(Oid, String), Error> {
    let row = client
        .query_opt(
            "SELECT COALESCE( \
                 (SELECT d.refobjid FROM pg_depend d \
                  JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S' \
                  WHERE d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid \
                      AND d.refclassid = 'pg_class'::regclass \
                  ORDER BY d.refobjid LIMIT 1), \
                 pg_get_serial_sequence(a.attrelid::regclass::text, a.attname)::regclass::oid), \
                 pg_get_expr(ad.adbin, ad.adrelid) \
             FROM pg_attribute a \
             LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum \
             WHERE a.attrelid = to_regclass('events') AND a.attname = 'global_position' \
                 AND NOT a.attisdropped",
            &[],
        )
        .map_err(Error::database(
            "finding the sequence behind events.global_position",
        ))?;
    let (sequence, default): (Option<Oid>, Option<String>) = match &row {
        Some(row) => (row.get(0), row.get(1)),
        None => (None, None),
    };
    let Some(sequence) = sequence else {
        return Err(Error::invalid_setting(
            "the default of events.global_position",
            default.as_deref().unwrap_or("none"),
            "positions must come from a sequence (BIGSERIAL, an identity column, or DEFAULT \
             nextval('a_sequence')) for the projector to tell a transaction still in flight \
             from a rolled-back one",
        ));
    };
    let name: String = client
        .query_one(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&sequence],
        )
        .map_err(Error::database(
            "finding the sequence behind events.global_position",
        ))?
        .get(0);
    Ok((sequence, name))
}

/// Fails unless the sequence behind `global_position` hands out one value at a time.
///
/// With `CACHE n > 1` each session takes positions in blocks of `n`, so a position can be
/// committed long after higher ones from another session, and no reader can tell a gap that
/// will fill from a dead one.
pub(crate) fn check_sequence(client: &mut impl GenericClient) -> Result<(), Error> {
    let (sequence, name) = position_sequence(client)?;
    let cache: i64 = client
        .query_one(
            "SELECT seqcache FROM pg_sequence WHERE seqrelid = $1",
            &[&sequence],
        )
        .map_err(Error::database(format!("reading sequence {name}")))?
        .get(0);
    if cache > 1 {
        return Err(Error::invalid_setting(
            format!("the CACHE of sequence {name}"),
            cache,
            format!(
                "positions must be handed out one at a time for the projector to tell a \
                 transaction still in flight from a rolled-back one: run ALTER SEQUENCE \
                 {name} CACHE 1"
            ),
        ));
    }
    Ok(())
}

/// Reads one aggregate's events, oldest first.
pub fn read_stream(
    client: &mut impl GenericClient,
    bounded_context: &str,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<Event>, Error> {
    let rows = client
        .query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE bounded_context = $1 \
                 AND aggregate_type = $2 AND aggregate_id = $3 ORDER BY aggregate_version"
            ),
            &[&bounded_context, &aggregate_type, &aggregate_id],
        )
        .map_err(Error::database(format!(
            "reading {bounded_context}/{aggregate_type}/{aggregate_id}"
        )))?;
    Ok(rows.iter().map(event_from_row).collect())
}

/// The highest global position committed, 0 for an empty store.
/// The `WHERE` condition that keeps the events any of `scopes` wants, with its parameters
/// numbered from `$first`; `None` when one of them wants every event.
pub(crate) fn scope_filter(scopes: &[&Scope], first: usize) -> Option<ScopeFilter> {
    if scopes.is_empty() || scopes.iter().any(|scope| scope.is_all()) {
        return None;
    }
    let mut names = Vec::new();
    let alternatives: Vec<String> = scopes
        .iter()
        .map(|scope| {
            let all_of: Vec<String> = scope
                .conditions()
                .map(|(column, wanted)| {
                    names.push(wanted.to_vec());
                    format!("{column} = ANY(${}::text[])", first + names.len() - 1)
                })
                .collect();
            format!("({})", all_of.join(" AND "))
        })
        .collect();
    Some(ScopeFilter {
        condition: format!("({})", alternatives.join(" OR ")),
        names,
    })
}

/// For each column the scopes filter on with no index on `events` that starts with it: the
/// statement that would create one without blocking writers. The projector never creates it
/// on a table that may belong to another tool.
pub(crate) fn missing_scope_indexes(
    client: &mut impl GenericClient,
    scopes: &[&Scope],
) -> Result<Vec<String>, Error> {
    let mut columns: Vec<&str> = scopes
        .iter()
        .flat_map(|scope| scope.conditions().map(|(column, _)| column))
        .collect();
    columns.sort_unstable();
    columns.dedup();
    let mut missing = Vec::new();
    for column in columns {
        let indexed: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a \
                     ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                 WHERE i.indrelid = to_regclass('events') AND a.attname = $1)",
                &[&column],
            )
            .map_err(Error::database("looking for the indexes of events"))?
            .get(0);
        if !indexed {
            missing.push(format!(
                "CREATE INDEX CONCURRENTLY events_{column}_position ON events ({column}, global_position)"
            ));
        }
    }
    Ok(missing)
}

/// A condition on the events table and the name lists it binds.
#[derive(Debug, Clone)]
pub(crate) struct ScopeFilter {
    pub(crate) condition: String,
    pub(crate) names: Vec<Vec<String>>,
}

impl ScopeFilter {
    /// The name lists, as query parameters.
    pub(crate) fn params(&self) -> impl Iterator<Item = &(dyn postgres::types::ToSql + Sync)> {
        self.names
            .iter()
            .map(|names| names as &(dyn postgres::types::ToSql + Sync))
    }
}

pub(crate) fn head_position(client: &mut impl GenericClient) -> Result<i64, Error> {
    client
        .query_one("SELECT COALESCE(MAX(global_position), 0) FROM events", &[])
        .map(|row| row.get(0))
        .map_err(Error::database("reading the head of the event store"))
}

/// An [`Event`] from a row selected with [`EVENT_COLUMNS`].
pub(crate) fn event_from_row(row: &Row) -> Event {
    Event {
        global_position: row.get(0),
        bounded_context: row.get(1),
        aggregate_type: row.get(2),
        aggregate_id: row.get(3),
        aggregate_version: row.get(4),
        event_id: row.get(5),
        event_type: row.get(6),
        event_version: row.get(7),
        payload: row.get(8),
        trace_id: row.get(9),
        correlation_id: row.get(10),
        causation_id: row.get(11),
        metadata: row.get(12),
        created_at: row.get(13),
    }
}
