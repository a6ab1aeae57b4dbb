//! Checkpoints: per projection, partition layout and partition, the last global position applied.

use std::time::{Duration, SystemTime};

use postgres::{Client, GenericClient, Statement, Transaction};

use crate::Error;

/// Makes sure the projection's checkpoints are kept under `total` partitions, creating the rows
/// of every partition of that layout (at position 0) where missing.
///
/// Fails with [`Error::LayoutMismatch`] when checkpoints exist under another partition count:
/// those positions only mean something under the modulus that wrote them.
pub(crate) fn claim_layout(client: &mut Client, projection: &str, total: u32) -> Result<(), Error> {
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting to check the partition layout"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('projector layout ' || $1))",
        &[&projection],
    )
    .map_err(Error::database("locking the partition layout"))?;
    let stored: Vec<u32> = tx
        .query(
            "SELECT DISTINCT total_partitions FROM projection_checkpoints \
             WHERE projection = $1 ORDER BY 1",
            &[&projection],
        )
        .map_err(Error::database("reading the partition layout"))?
        .iter()
        .map(|row| row.get::<_, i32>(0).unsigned_abs())
        .collect();
    if stored.iter().any(|&t| t != total) {
        return Err(Error::LayoutMismatch {
            projection: projection.to_owned(),
            stored,
            requested: total,
        });
    }
    tx.execute(
        "INSERT INTO projection_checkpoints (projection, total_partitions, partition_key) \
         SELECT $1, $2, key FROM generate_series(0, $2 - 1) AS key \
         ON CONFLICT DO NOTHING",
        &[&projection, &to_i32(total)],
    )
    .map_err(Error::database("creating the checkpoints"))?;
    tx.commit()
        .map_err(Error::database("committing the checkpoints"))
}

/// The checkpoints of `keys`, in the same order.
pub(crate) fn load(
    client: &mut impl GenericClient,
    projection: &str,
    total: u32,
    keys: &[u32],
) -> Result<Vec<i64>, Error> {
    let rows = client
        .query(
            "SELECT partition_key, last_position FROM projection_checkpoints \
             WHERE projection = $1 AND total_partitions = $2",
            &[&projection, &to_i32(total)],
        )
        .map_err(Error::database("reading the checkpoints"))?;
    Ok(keys
        .iter()
        .map(|&key| {
            rows.iter()
                .find(|row| row.get::<_, i32>(0) == to_i32(key))
                .map_or(0, |row| row.get(1))
        })
        .collect())
}

/// The two statements a worker runs on its connection in every transaction, prepared once.
pub(crate) struct CheckpointStatements {
    lock: Statement,
    save: Statement,
}

impl CheckpointStatements {
    pub(crate) fn prepare(client: &mut Client) -> Result<CheckpointStatements, Error> {
        let lock = client
            .prepare(
                "SELECT last_position FROM projection_checkpoints \
                 WHERE projection = $1 AND total_partitions = $2 AND partition_key = $3 FOR UPDATE",
            )
            .map_err(Error::database("preparing the checkpoint statements"))?;
        let save = client
            .prepare(
                "UPDATE projection_checkpoints SET last_position = $4, updated_at = NOW() \
                 WHERE projection = $1 AND total_partitions = $2 AND partition_key = $3",
            )
            .map_err(Error::database("preparing the checkpoint statements"))?;
        Ok(CheckpointStatements { lock, save })
    }

    /// Locks the partition's checkpoint row until `tx` ends and returns its position. A second
    /// process on the same partition waits here, then sees what the first one committed.
    pub(crate) fn lock(
        &self,
        tx: &mut Transaction<'_>,
        projection: &str,
        total: u32,
        key: u32,
    ) -> Result<Option<i64>, postgres::Error> {
        tx.query_opt(&self.lock, &[&projection, &to_i32(total), &to_i32(key)])
            .map(|row| row.map(|row| row.get(0)))
    }

    /// Moves the locked checkpoint to `position`.
    pub(crate) fn save(
        &self,
        tx: &mut Transaction<'_>,
        projection: &str,
        total: u32,
        key: u32,
        position: i64,
    ) -> Result<(), postgres::Error> {
        tx.execute(
            &self.save,
            &[&projection, &to_i32(total), &to_i32(key), &position],
        )
        .map(drop)
    }
}

/// One stored checkpoint, as `projector status` shows it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CheckpointStatus {
    /// The projection.
    pub projection: String,
    /// The partition count the checkpoint was written under.
    pub total_partitions: u32,
    /// The partition key.
    pub partition_key: u32,
    /// The last global position applied.
    pub last_position: i64,
    /// The highest global position in the store.
    pub head_position: i64,
    /// Events stored after the checkpoint (of all partitions): what the worker still has to
    /// read past.
    pub lag_events: i64,
    /// How long ago the checkpoint was written.
    pub age: Duration,
}

/// Every stored checkpoint, or those of one projection, with lag and age.
pub fn status(
    client: &mut impl GenericClient,
    projection: Option<&str>,
) -> Result<Vec<CheckpointStatus>, Error> {
    let schema: String = client
        .query_one("SELECT current_schema()::text", &[])
        .map_err(Error::database("reading the current schema"))?
        .get::<_, Option<String>>(0)
        .unwrap_or_default();
    crate::store::check_tables(client, &schema)?;
    let head = crate::store::head_position(client)?;
    let rows = client
        .query(
            "SELECT c.projection, c.total_partitions, c.partition_key, c.last_position, \
                 c.updated_at, NOW(), \
                 (SELECT COUNT(*) FROM events e WHERE e.global_position > c.last_position) \
             FROM projection_checkpoints c \
             WHERE $1::text IS NULL OR c.projection = $1 \
             ORDER BY c.projection, c.total_partitions, c.partition_key",
            &[&projection],
        )
        .map_err(Error::database("reading the checkpoints"))?;
    Ok(rows
        .iter()
        .map(|row| {
            let updated: SystemTime = row.get(4);
            let now: SystemTime = row.get(5);
            CheckpointStatus {
                projection: row.get(0),
                total_partitions: row.get::<_, i32>(1).unsigned_abs(),
                partition_key: row.get::<_, i32>(2).unsigned_abs(),
                last_position: row.get(3),
                head_position: head,
                lag_events: row.get(6),
                age: now.duration_since(updated).unwrap_or_default(),
            }
        })
        .collect())
}

/// Partition numbers are at most [`MAX_PARTITIONS`](crate::partition::MAX_PARTITIONS), so they fit.
fn to_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}
