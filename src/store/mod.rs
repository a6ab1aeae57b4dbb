//! The event store: migrations, appends with optimistic concurrency, and reads.

pub(crate) mod database;
pub(crate) mod gap;
pub(crate) mod migration;

use postgres::types::Oid;
use postgres::{GenericClient, Row};

use crate::Error;
use crate::event::{Event, ExpectedVersion, NewEvent, Scope};
use crate::store::database::notify_channel;

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

/// Appends events to one aggregate, if its current version matches `expected`, and returns
/// their global positions. All events must belong to the same aggregate; they get the
/// versions that follow the current one. Listeners are notified when the append commits.
///
/// Two appends racing for the same version: one succeeds, the other gets
/// [`Error::VersionConflict`].
pub fn append(
    client: &mut impl GenericClient,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<Vec<i64>, Error> {
    let Some(first) = events.first() else {
        return Ok(Vec::new());
    };
    let aggregate = format!(
        "{}/{}/{}",
        first.bounded_context, first.aggregate_type, first.aggregate_id
    );
    if let Some(other) = events.iter().find(|e| {
        (&e.bounded_context, &e.aggregate_type, &e.aggregate_id)
            != (
                &first.bounded_context,
                &first.aggregate_type,
                &first.aggregate_id,
            )
    }) {
        return Err(Error::InvalidAppend {
            reason: format!(
                "one append takes events of one aggregate, got {aggregate} and {}/{}/{}",
                other.bounded_context, other.aggregate_type, other.aggregate_id
            ),
        });
    }
    let conflict = |actual: Option<i64>| Error::VersionConflict {
        aggregate: aggregate.clone(),
        expected,
        actual,
    };

    let count = i64::try_from(events.len()).map_err(|_| Error::InvalidAppend {
        reason: "too many events in one append".into(),
    })?;
    let expected_version: Option<i64> = match expected {
        ExpectedVersion::Any => None,
        ExpectedVersion::NoStream => Some(0),
        ExpectedVersion::Exact(version) => Some(version),
    };
    let event_ids: Vec<_> = events.iter().map(|e| e.event_id).collect();
    let event_types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let event_versions: Vec<i32> = events.iter().map(|e| e.event_version).collect();
    let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload.as_slice()).collect();
    let trace_ids: Vec<Option<&str>> = events.iter().map(|e| e.trace_id.as_deref()).collect();
    let correlation_ids: Vec<Option<&str>> =
        events.iter().map(|e| e.correlation_id.as_deref()).collect();
    let causation_ids: Vec<Option<&str>> =
        events.iter().map(|e| e.causation_id.as_deref()).collect();
    let metadata: Vec<Option<&str>> = events.iter().map(|e| e.metadata.as_deref()).collect();

    // One statement: lock the aggregate's head, check the expected version, insert the events
    // with the versions that follow, move the head, and notify listeners (delivered at commit).
    // Nothing is written when the version does not match.
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting an append"))?;
    let outcome = tx.query_one(
        concat!(
            "WITH current AS ( \
             SELECT COALESCE((SELECT aggregate_version FROM aggregate_heads \
                 WHERE bounded_context = $1 AND aggregate_type = $2 AND aggregate_id = $3 \
                 FOR UPDATE), 0) AS version \
         ), allowed AS ( \
             SELECT version FROM current WHERE $12::bigint IS NULL OR version = $12 \
         ), inserted AS ( \
             INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
                 aggregate_version, event_id, event_type, event_version, payload, trace_id, \
                 correlation_id, causation_id, metadata) \
             SELECT $1, $2, $3, allowed.version + v.n, v.event_id, v.event_type, \
                 v.event_version, v.payload, v.trace_id, v.correlation_id, v.causation_id, \
                 v.metadata::jsonb \
             FROM allowed, unnest($4::uuid[], $5::text[], $6::int[], $7::bytea[], $8::text[], \
                 $9::text[], $10::text[], $11::text[]) WITH ORDINALITY \
                 AS v(event_id, event_type, event_version, payload, trace_id, correlation_id, \
                      causation_id, metadata, n) \
             ORDER BY v.n \
             RETURNING global_position \
         ), head AS ( \
             INSERT INTO aggregate_heads (bounded_context, aggregate_type, aggregate_id, \
                 aggregate_version) \
             SELECT $1, $2, $3, version + $13 FROM allowed \
             ON CONFLICT (bounded_context, aggregate_type, aggregate_id) \
             DO UPDATE SET aggregate_version = EXCLUDED.aggregate_version, updated_at = NOW() \
         ) \
         SELECT (SELECT version FROM current), \
             ARRAY(SELECT global_position FROM inserted ORDER BY 1), \
             pg_notify(",
            notify_channel!(),
            ", (SELECT MAX(global_position) FROM inserted)::text)::text"
        ),
        &[
            &first.bounded_context,
            &first.aggregate_type,
            &first.aggregate_id,
            &event_ids,
            &event_types,
            &event_versions,
            &payloads,
            &trace_ids,
            &correlation_ids,
            &causation_ids,
            &metadata,
            &expected_version,
            &count,
        ],
    );
    let row = match outcome {
        Ok(row) => row,
        Err(error) if error.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
            // Another append took the same versions first (its head row did not exist yet).
            return Err(conflict(None));
        }
        Err(error) => return Err(Error::database(format!("appending to {aggregate}"))(error)),
    };
    let current: i64 = row.get(0);
    let positions: Vec<i64> = row.get(1);
    if positions.len() != events.len() {
        return Err(conflict(Some(current)));
    }
    tx.commit().map_err(Error::database(format!(
        "committing an append to {aggregate}"
    )))?;
    Ok(positions)
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
