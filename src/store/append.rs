//! Appends with optimistic concurrency: one statement locks the aggregate's head, checks the
//! expected version, inserts the events with the versions that follow, moves the head, and
//! notifies listeners (at commit).

use postgres::{GenericClient, Statement, Transaction};

use crate::Error;
use crate::event::{ExpectedVersion, NewEvent};
use crate::store::database::notify_channel;

/// Appends events to one aggregate, if its current version matches `expected`, and returns
/// their global positions. All events must belong to the same aggregate; they get the
/// versions that follow the current one. Listeners are notified when the append commits.
///
/// Two appends racing for the same version: one succeeds, the other gets
/// [`Error::VersionConflict`]. For many appends on one connection, an [`Appender`] saves the
/// server parsing and planning the statement each time, and commits when the caller says.
pub fn append(
    client: &mut impl GenericClient,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<Vec<i64>, Error> {
    let Some(first) = events.first() else {
        return Ok(Vec::new());
    };
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting an append"))?;
    let positions = Appender::prepare(&mut tx)?.append(&mut tx, expected, events)?;
    tx.commit().map_err(Error::database(format!(
        "committing an append to {}",
        aggregate_of(first)
    )))?;
    Ok(positions)
}

/// The append statement, prepared once on a connection, for many appends through it inside
/// transactions the caller commits: appends to several aggregates commit together, and many
/// appends (`projector seed`, `projector append --file`) cost one commit and one plan.
///
/// ```no_run
/// # fn main() -> Result<(), projector::Error> {
/// use projector::{Appender, Database, ExpectedVersion, NewEvent};
/// let mut client = Database::new("postgres://localhost/shop")?.connect()?;
/// let appender = Appender::prepare(&mut client)?;
/// let mut tx = client.transaction().expect("begin");
/// for id in ["cart-1", "cart-2"] {
///     let opened = NewEvent::new("shop", "Cart", id, "Opened", b"{}".to_vec());
///     appender.append(&mut tx, ExpectedVersion::NoStream, &[opened])?;
/// }
/// tx.commit().expect("both carts or neither");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Appender {
    statement: Statement,
}

impl Appender {
    /// Prepares the append statement on `client`'s connection: use the appender only with
    /// transactions of that connection.
    pub fn prepare(client: &mut impl GenericClient) -> Result<Appender, Error> {
        let statement = client
            .prepare(APPEND)
            .map_err(Error::database("preparing the append statement"))?;
        Ok(Appender { statement })
    }

    /// As [`append`], inside the caller's transaction `tx`: nothing is stored, and no listener
    /// notified, until the caller commits it. After an error, roll `tx` back: a conflict with
    /// an append that inserted the same versions first leaves it unusable.
    pub fn append(
        &self,
        tx: &mut Transaction<'_>,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Vec<i64>, Error> {
        let Some(first) = events.first() else {
            return Ok(Vec::new());
        };
        let aggregate = aggregate_of(first);
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
                    "one append takes events of one aggregate, got {aggregate} and {}",
                    aggregate_of(other)
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
        let outcome = tx.query_one(
            &self.statement,
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
        Ok(positions)
    }
}

/// One statement: lock the aggregate's head, check the expected version, insert the events
/// with the versions that follow, move the head, and notify listeners (delivered at commit).
/// Nothing is written when the version does not match.
const APPEND: &str = concat!(
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
);

/// `context/type/id`, as errors name an aggregate.
fn aggregate_of(event: &NewEvent) -> String {
    format!(
        "{}/{}/{}",
        event.bounded_context, event.aggregate_type, event.aggregate_id
    )
}
