//! Checkpoints: per projection, partition layout and partition, the last global position
//! applied, and who holds each partition.
//!
//! # Liveness
//! A worker holds a session-level advisory lock for its partition for as long as it works it.
//! It vanishes with the connection, so `pg_locks` tells which partitions a live process holds:
//! a second process started on the same partition waits as a standby and takes over when the
//! lock is released, and a new layout waits until no live process of an older one holds a lock.

use postgres::{Client, GenericClient, Statement, Transaction};

use crate::Error;
use crate::store::database::notify_channel;

/// The checkpoints of `keys`, in the same order.
pub(crate) fn load(
    client: &mut impl GenericClient,
    projection: &str,
    total: u32,
    keys: &[u32],
) -> Result<Vec<i64>, Error> {
    let rows = client
        .query(
            "SELECT partition_key, last_position FROM projector_checkpoints \
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

/// The first key of a partition's session lock, as SQL over the projection expression given:
/// the schema and the projection, hashed. The second key is
/// `total_partitions * 65536 + partition_key` ([`MAX_PARTITIONS`](crate::MAX_PARTITIONS) keeps
/// it within 32 bits).
pub(crate) fn lock_class(projection: &str) -> String {
    format!("hashtext('projector ' || current_schema() || ' ' || {projection})")
}

/// SQL selecting the granted partition locks of projection `$1` in this database, as
/// `(total_partitions, partition_key, pid)`.
pub(crate) fn held_partitions_sql() -> String {
    format!(
        "SELECT (l.objid::bigint / 65536)::int, (l.objid::bigint % 65536)::int, l.pid \
         FROM pg_locks l \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND l.classid = {}::oid \
         ORDER BY 1, 2",
        lock_class("$1")
    )
}

/// A partition some live process holds: its layout, key and the server process id of the
/// connection holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) total: u32,
    pub(crate) key: u32,
    pub(crate) pid: i32,
}

pub(crate) fn held_partitions(
    client: &mut impl GenericClient,
    projection: &str,
) -> Result<Vec<Holder>, postgres::Error> {
    Ok(client
        .query(&held_partitions_sql(), &[&projection])?
        .iter()
        .map(|row| Holder {
            total: row.get::<_, i32>(0).unsigned_abs(),
            key: row.get::<_, i32>(1).unsigned_abs(),
            pid: row.get(2),
        })
        .collect())
}

/// One worker's statements, prepared once on its connection for its projection, layout,
/// generation and partition.
pub(crate) struct PartitionStatements {
    projection: String,
    total: i32,
    key: i32,
    lock: Statement,
    save: Statement,
    try_hold: Statement,
    peek: Statement,
}

/// What [`PartitionStatements::peek`] sees of a partition without locking its checkpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peek {
    /// The checkpoint.
    pub(crate) position: i64,
    /// The server process id of the connection holding the partition, if any.
    pub(crate) holder: Option<i32>,
}

impl PartitionStatements {
    pub(crate) fn prepare(
        client: &mut Client,
        projection: &str,
        total: u32,
        key: u32,
        generation: i64,
    ) -> Result<PartitionStatements, Error> {
        let row = "projection = $1 AND total_partitions = $2 AND partition_key = $3";
        let mut prepare = |sql: String| {
            client
                .prepare(&sql)
                .map_err(Error::database("preparing the checkpoint statements"))
        };
        let lock = prepare(format!(
            "SELECT last_position FROM projector_checkpoints \
             WHERE {row} AND generation = {generation} FOR UPDATE"
        ))?;
        // One statement, so that telling waiters costs no round trip: the notification is
        // delivered when the transaction commits, and not at all if it rolls back.
        let save = prepare(format!(
            "WITH saved AS ( \
                 UPDATE projector_checkpoints SET last_position = $4, updated_at = NOW() \
                 WHERE {row} RETURNING projection, total_partitions, partition_key, last_position) \
             SELECT pg_notify({}, concat_ws(' ', md5(projection), total_partitions, partition_key, \
                 last_position)) \
             FROM saved",
            notify_channel!("projector_applied_")
        ))?;
        let try_hold = prepare(format!(
            "SELECT pg_try_advisory_lock({}, $2 * 65536 + $3)",
            lock_class("$1")
        ))?;
        let peek = prepare(format!(
            "SELECT c.last_position, ( \
                 SELECT l.pid FROM pg_locks l \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                     AND l.classid = {}::oid AND l.objid = ($2 * 65536 + $3)::oid \
                 LIMIT 1) \
             FROM projector_checkpoints c WHERE {row} AND generation = {generation}",
            lock_class("$1")
        ))?;
        Ok(PartitionStatements {
            projection: projection.to_owned(),
            total: to_i32(total),
            key: to_i32(key),
            lock,
            save,
            try_hold,
            peek,
        })
    }

    /// Locks the partition's checkpoint row until `tx` ends and returns its position; `None`
    /// when the row of this generation is gone (the layout was replaced or reset). A second
    /// process on the same partition waits here, then sees what the first one committed.
    pub(crate) fn lock(&self, tx: &mut Transaction<'_>) -> Result<Option<i64>, postgres::Error> {
        tx.query_opt(&self.lock, &[&self.projection, &self.total, &self.key])
            .map(|row| row.map(|row| row.get(0)))
    }

    /// Moves the locked checkpoint to `position`, and notifies the schema's applied channel
    /// for [`wait_for`](crate::wait_for), with `md5(projection) total key position` (a
    /// fixed-size stand-in for the name, which may be long).
    pub(crate) fn save(
        &self,
        tx: &mut Transaction<'_>,
        position: i64,
    ) -> Result<(), postgres::Error> {
        tx.execute(
            &self.save,
            &[&self.projection, &self.total, &self.key, &position],
        )
        .map(drop)
    }

    /// Takes the partition's session lock on this connection, if no other connection holds it.
    pub(crate) fn try_hold(&self, client: &mut Client) -> Result<bool, postgres::Error> {
        client
            .query_one(&self.try_hold, &[&self.projection, &self.total, &self.key])
            .map(|row| row.get(0))
    }

    /// Gives the partition's session lock back.
    pub(crate) fn release(&self, client: &mut Client) -> Result<(), postgres::Error> {
        client
            .execute(
                &format!(
                    "SELECT pg_advisory_unlock({}, $2 * 65536 + $3)",
                    lock_class("$1")
                ),
                &[&self.projection, &self.total, &self.key],
            )
            .map(drop)
    }

    /// The partition's checkpoint and who holds the partition, without locking anything;
    /// `None` when the row of this generation is gone.
    pub(crate) fn peek(&self, client: &mut Client) -> Result<Option<Peek>, postgres::Error> {
        Ok(client
            .query_opt(&self.peek, &[&self.projection, &self.total, &self.key])?
            .map(|row| Peek {
                position: row.get(0),
                holder: row.get(1),
            }))
    }

    /// Live processes holding partitions of the projection under another partition count.
    pub(crate) fn other_layouts_holders(
        &self,
        client: &mut Client,
    ) -> Result<Vec<Holder>, postgres::Error> {
        let mut holders = held_partitions(client, &self.projection)?;
        holders.retain(|holder| to_i32(holder.total) != self.total);
        Ok(holders)
    }

    /// Deletes the earlier layouts every partition of this layout has passed.
    pub(crate) fn retire_earlier(&self, client: &mut Client) -> Result<u64, Error> {
        crate::layout::retire_earlier(client, &self.projection, self.total.unsigned_abs())
    }

    /// The error for a worker whose checkpoint row is gone, naming the layout now stored.
    pub(crate) fn fenced(&self, client: &mut Client) -> Error {
        let current = client
            .query(
                "SELECT DISTINCT total_partitions FROM projector_checkpoints \
                 WHERE projection = $1 ORDER BY 1",
                &[&self.projection],
            )
            .map(|rows| {
                rows.iter()
                    .map(|row| row.get::<_, i32>(0).unsigned_abs())
                    .collect()
            })
            .unwrap_or_default();
        Error::Fenced {
            projection: self.projection.clone(),
            total: self.total.unsigned_abs(),
            current,
        }
    }
}

/// Partition numbers are at most [`MAX_PARTITIONS`](crate::partition::MAX_PARTITIONS), so they fit.
pub(crate) fn to_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}
