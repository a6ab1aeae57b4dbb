//! Checkpoints: per projection, partition layout and partition, the last global position
//! applied, and who holds each partition.
//!
//! # Liveness
//! A worker holds a session-level advisory lock for its partition for as long as it works it.
//! It vanishes with the connection, so `pg_locks` tells which partitions a live process holds:
//! a second process started on the same partition waits as a standby and takes over when the
//! lock is released, and a new layout waits until no live process of an older one holds a lock.
//!
//! # Badges
//! A partition's lock is two 32-bit keys, the first a hash of schema and projection: another
//! application's lock, or another projection's whose hash collides, may take the same keys.
//! So a worker takes a second session lock with its partition's, its *badge*, in the one-key
//! (64-bit) space that no partition lock uses, keyed by an MD5 of schema, projection, layout
//! and partition. A session holding a partition's lock without its badge is not a projector of
//! that projection, and a worker waiting on it says so, naming the session (see [`Stranger`]).

use std::time::Duration;

use postgres::{Client, GenericClient, Statement, Transaction};

use crate::Error;
use crate::store::database::notify_channel;
use crate::store::registry::{self, VersionState, split_stored_name};

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

/// The key of a partition's badge (see the module's docs), as SQL over the projection,
/// partition count and partition key expressions given: 64 bits of an MD5.
fn badge_key(projection: &str, total: &str, key: &str) -> String {
    format!(
        "('x' || left(md5(concat_ws(' ', 'projector badge', current_schema(), {projection}, \
         ({total})::int, ({key})::int)), 16))::bit(64)::bigint"
    )
}

/// SQL: whether the session `pid` holds the badge of the partition (as [`badge_key`] takes
/// it). A one-key lock shows in `pg_locks` as its high half in `classid`, its low in `objid`.
fn holds_badge(pid: &str, projection: &str, total: &str, key: &str) -> String {
    let badge = badge_key(projection, total, key);
    format!(
        "EXISTS (SELECT 1 FROM pg_locks b \
             WHERE b.locktype = 'advisory' AND b.granted AND b.objsubid = 1 AND b.pid = {pid} \
                 AND b.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND b.classid = (({badge} >> 32) & 4294967295)::oid \
                 AND b.objid = ({badge} & 4294967295)::oid)"
    )
}

/// SQL selecting the granted partition locks of projection `$1` in this database, as
/// `(total_partitions, partition_key, pid)`.
pub(crate) fn held_partitions_sql() -> String {
    format!(
        "SELECT (l.objid::bigint / 65536)::int, (l.objid::bigint % 65536)::int, l.pid \
         FROM pg_locks l \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.objid >= 65536 \
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

/// A session holding a partition's lock without its badge: not a projector of the
/// projection, but another application, or a projector of a projection whose lock key
/// collides (or a projector of a version that took no badges). Display names it as
/// `pg_stat_activity` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stranger {
    /// The partition whose lock it holds.
    pub(crate) holder: Holder,
    /// Its `application_name`, when it gives one.
    pub(crate) application: Option<String>,
    /// The role it is logged in as.
    pub(crate) user: Option<String>,
    /// Where it connects from, as `address:port` or `local socket`, when the server shows it.
    pub(crate) client: Option<String>,
}

impl std::fmt::Display for Stranger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "server pid {}", self.holder.pid)?;
        let mut about = Vec::new();
        if let Some(application) = &self.application {
            about.push(format!("application '{application}'"));
        }
        if let Some(user) = &self.user {
            about.push(format!("user '{user}'"));
        }
        if let Some(client) = &self.client {
            about.push(format!("from {client}"));
        }
        if !about.is_empty() {
            write!(f, " ({})", about.join(", "))?;
        }
        Ok(())
    }
}

/// The sessions among `holders` (of `projection`'s partitions) that hold no badge.
pub(crate) fn strangers_among(
    client: &mut impl GenericClient,
    projection: &str,
    holders: &[Holder],
) -> Result<Vec<Stranger>, postgres::Error> {
    let sql = format!(
        "SELECT NULLIF(a.application_name, ''), a.usename::text, \
             CASE WHEN a.client_port = -1 THEN 'local socket' \
                  WHEN a.client_addr IS NOT NULL THEN host(a.client_addr) || ':' || a.client_port \
             END \
         FROM pg_stat_activity a WHERE a.pid = $4 AND NOT {}",
        holds_badge("$4", "$1::text", "$2", "$3")
    );
    let mut strangers = Vec::new();
    for &holder in holders {
        let (total, key) = (to_i32(holder.total), to_i32(holder.key));
        let row = client.query_opt(&sql, &[&projection, &total, &key, &holder.pid])?;
        if let Some(row) = row {
            strangers.push(Stranger {
                holder,
                application: row.get(0),
                user: row.get(1),
                client: row.get(2),
            });
        }
    }
    Ok(strangers)
}

/// One worker's statements, prepared once on its connection for its projection, layout,
/// generation and partition.
pub(crate) struct PartitionStatements {
    projection: String,
    total: i32,
    key: i32,
    lock: Statement,
    lock_waiting: Statement,
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
             WHERE {row} AND generation = {generation} FOR UPDATE NOWAIT"
        ))?;
        let lock_waiting = prepare(format!(
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
        // The badge with the lock, in one statement: no one sees the lock without it.
        let try_hold = prepare(format!(
            "SELECT CASE WHEN pg_try_advisory_lock({}, $2 * 65536 + $3) \
                 THEN pg_try_advisory_lock({}) IS NOT NULL ELSE false END",
            lock_class("$1"),
            badge_key("$1", "$2", "$3")
        ))?;
        let peek = prepare(format!(
            "SELECT c.last_position, ( \
                 SELECT l.pid FROM pg_locks l \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.objid >= 65536 \
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
            lock_waiting,
            save,
            try_hold,
            peek,
        })
    }

    /// Locks the partition's checkpoint row until `tx` ends and returns its position; `None`
    /// when the row of this generation is gone (the layout was replaced or reset). Fails at
    /// once with `lock_not_available` when another session holds the row (a `dead-letters
    /// retry`, a re-partitioning): then [`lock_waiting`](Self::lock_waiting) waits for it.
    pub(crate) fn lock(&self, tx: &mut Transaction<'_>) -> Result<Option<i64>, postgres::Error> {
        tx.query_opt(&self.lock, &[&self.projection, &self.total, &self.key])
            .map(|row| row.map(|row| row.get(0)))
    }

    /// As [`lock`](Self::lock), waiting (in the queue of the row's lock, as a second process
    /// on the same partition does) while another session holds the row, but no longer than
    /// `timeout`: then it fails with `lock_not_available`, so that the worker can see whether
    /// it was asked to stop before it waits again. The transaction's `lock_timeout` is left as
    /// it was, for the projection's statements.
    pub(crate) fn lock_waiting(
        &self,
        tx: &mut Transaction<'_>,
        timeout: Duration,
    ) -> Result<Option<i64>, postgres::Error> {
        let before: String = tx
            .query_one(
                "WITH before AS MATERIALIZED (SELECT current_setting('lock_timeout') AS setting) \
                 SELECT setting, set_config('lock_timeout', $1, true) FROM before",
                &[&format!("{}ms", timeout.as_millis().max(1))],
            )?
            .get(0);
        let row = tx.query_opt(
            &self.lock_waiting,
            &[&self.projection, &self.total, &self.key],
        )?;
        tx.execute("SELECT set_config('lock_timeout', $1, true)", &[&before])?;
        Ok(row.map(|row| row.get(0)))
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

    /// Gives the partition's session lock back, and its badge.
    pub(crate) fn release(&self, client: &mut Client) -> Result<(), postgres::Error> {
        client
            .execute(
                &format!(
                    "SELECT pg_advisory_unlock({}, $2 * 65536 + $3), pg_advisory_unlock({})",
                    lock_class("$1"),
                    badge_key("$1", "$2", "$3")
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

    /// The session holding this partition's lock, `pid`, when it is not a projector of the
    /// projection (it holds no badge).
    pub(crate) fn stranger(
        &self,
        client: &mut Client,
        pid: i32,
    ) -> Result<Option<Stranger>, postgres::Error> {
        let holder = Holder {
            total: self.total.unsigned_abs(),
            key: self.key.unsigned_abs(),
            pid,
        };
        Ok(strangers_among(client, &self.projection, &[holder])?.pop())
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

    /// The error for a worker whose checkpoint row is gone, naming the layout now stored, or
    /// the version now live when this one was retired (`projector promote`).
    pub(crate) fn fenced(&self, client: &mut Client) -> Error {
        let (name, version) = split_stored_name(&self.projection);
        if let Ok(states) = registry::states_of(client, name) {
            if registry::state_of(&states, version) == VersionState::Retired {
                return Error::VersionRetired {
                    projection: name.to_owned(),
                    version,
                    live: registry::live_version(&states),
                };
            }
        }
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
