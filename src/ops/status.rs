//! What `projector status` shows of each projection, and `projector reset`.

use std::time::{Duration, SystemTime};

use log::info;
use postgres::{Client, GenericClient};

use crate::layout::checkpoint::{held_partitions, lock_class};
use crate::layout::{EarlierLayout, lock_layout};
use crate::projections::projection::{AnyProjection, Projection, lock_setup};
use crate::{BoxError, Error, HeldPartition};

/// One stored checkpoint, as `projector status` shows it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CheckpointStatus {
    /// The projection.
    pub projection: String,
    /// The partition count the checkpoint was written under: the projection's current layout.
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
    /// How far behind the checkpoint is in time: how long ago the first event after it was
    /// stored; zero when there is none.
    pub lag_time: Duration,
    /// How long ago the checkpoint was written.
    pub age: Duration,
    /// The server process id (`pg_stat_activity.pid`) of the connection through which a live
    /// process holds this partition, if one does.
    pub held_by_pid: Option<i32>,
    /// Where that connection comes from, as `address:port` (`local socket` for a Unix-domain
    /// socket), when the server shows it (`pg_stat_activity.client_addr` and `client_port`;
    /// a role that is not superuser sees them only for its own connections): the process
    /// holding the partition is the one with this end of the connection
    /// (`ss -tnp | grep :PORT` on its host).
    pub held_by_client: Option<String>,
    /// That connection's `application_name` (`projector` unless the connection string sets
    /// another), when the server shows it.
    pub held_by_application: Option<String>,
    /// While the projection catches up after a change of its number of partitions: the earlier
    /// layouts whose applied events its partitions still skip. Empty otherwise.
    pub earlier_layouts: Vec<EarlierLayout>,
    /// Aggregates of this partition the projection has parked (`projection_dead_letters`).
    pub parked_aggregates: u64,
    /// Events of this partition the projection has parked.
    pub parked_events: u64,
}

impl CheckpointStatus {
    /// While a re-partitioning is in progress, the position this partition must pass before
    /// the earlier layouts stop mattering to it; `None` when none is in progress.
    pub fn repartitioning_until(&self) -> Option<i64> {
        self.earlier_layouts
            .iter()
            .map(EarlierLayout::applied_at_most)
            .max()
    }
}

/// Every stored checkpoint, or those of one projection, with lag, age, the live process
/// holding each partition and any re-partitioning in progress.
pub fn status(
    client: &mut impl GenericClient,
    projection: Option<&str>,
) -> Result<Vec<CheckpointStatus>, Error> {
    let schema = crate::store::check_tables_here(client)?;
    crate::store::check_event_columns(client, &schema)?;
    let locks: Vec<Lock> = client
        .query(
            "SELECT l.classid, l.objid, l.pid, \
                 CASE WHEN a.client_port = -1 THEN 'local socket' \
                      WHEN a.client_addr IS NOT NULL \
                      THEN host(a.client_addr) || ':' || a.client_port END, \
                 NULLIF(a.application_name, '') \
             FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .map_err(Error::database(
            "reading which partitions live processes hold",
        ))?
        .iter()
        .map(|row| Lock {
            class: row.get(0),
            object: row.get(1),
            pid: row.get(2),
            client: row.get(3),
            application: row.get(4),
        })
        .collect();
    let priors: Vec<(String, u32, EarlierLayout)> = client
        .query(
            "SELECT projection, total_partitions, prior_total, prior_positions \
             FROM projector_prior_layouts ORDER BY 1, 2, 3",
            &[],
        )
        .map_err(Error::database("reading the earlier layouts"))?
        .iter()
        .map(|row| {
            (
                row.get(0),
                row.get::<_, i32>(1).unsigned_abs(),
                EarlierLayout {
                    total_partitions: row.get::<_, i32>(2).unsigned_abs(),
                    checkpoints: row.get(3),
                },
            )
        })
        .collect();
    let parked = crate::dead_letters::parked_counts(client)?;
    // The head in the statement that reads the checkpoints and counts the lag: one snapshot,
    // so a checkpoint that moved on after an earlier read of the head never shows above it.
    let rows = client
        .query(
            &format!(
                "SELECT c.projection, c.total_partitions, c.partition_key, c.last_position, \
                     c.updated_at, NOW(), \
                     (SELECT COUNT(*) FROM events e WHERE e.global_position > c.last_position), \
                     (SELECT e.created_at FROM events e WHERE e.global_position > c.last_position \
                      ORDER BY e.global_position LIMIT 1), \
                     {}::oid, \
                     (SELECT COALESCE(MAX(e.global_position), 0) FROM events e) \
                 FROM projector_checkpoints c \
                 WHERE $1::text IS NULL OR c.projection = $1 \
                 ORDER BY c.projection, c.total_partitions, c.partition_key",
                lock_class("c.projection")
            ),
            &[&projection],
        )
        .map_err(Error::database("reading the checkpoints"))?;
    Ok(rows
        .iter()
        .map(|row| {
            let name: String = row.get(0);
            let total = row.get::<_, i32>(1).unsigned_abs();
            let key = row.get::<_, i32>(2).unsigned_abs();
            let updated: SystemTime = row.get(4);
            let now: SystemTime = row.get(5);
            let first_unapplied: Option<SystemTime> = row.get(7);
            let class: u32 = row.get(8);
            let holder = locks
                .iter()
                .find(|lock| lock.class == class && lock.object == total * 65536 + key);
            let earlier_layouts = priors
                .iter()
                .filter(|(p, t, _)| *p == name && *t == total)
                .map(|(_, _, layout)| layout.clone())
                .collect();
            let parked_here: Vec<i64> = parked
                .iter()
                .filter(|(p, id, _)| *p == name && crate::partition_of(id, total.max(1)) == key)
                .map(|&(_, _, events)| events)
                .collect();
            CheckpointStatus {
                projection: name,
                total_partitions: total,
                partition_key: key,
                last_position: row.get(3),
                head_position: row.get(9),
                lag_events: row.get(6),
                lag_time: first_unapplied
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or_default(),
                age: now.duration_since(updated).unwrap_or_default(),
                held_by_pid: holder.map(|lock| lock.pid),
                held_by_client: holder.and_then(|lock| lock.client.clone()),
                held_by_application: holder.and_then(|lock| lock.application.clone()),
                earlier_layouts,
                parked_aggregates: parked_here.len() as u64,
                parked_events: parked_here.iter().sum::<i64>().unsigned_abs(),
            }
        })
        .collect())
}

/// A partition lock some connection holds, with where the connection comes from.
struct Lock {
    class: u32,
    object: u32,
    pid: i32,
    client: Option<String>,
    application: Option<String>,
}

/// Clears `projection`'s checkpoints (of every layout, with any re-partitioning in progress)
/// and parked events and, through [`Projection::reset`], its read model, in one transaction:
/// its next start rebuilds it from the first event. Returns how many checkpoints were deleted.
///
/// Fails with [`Error::ProjectionRunning`] while a live process holds one of its partitions.
pub fn reset<P: Projection>(client: &mut Client, projection: &mut P) -> Result<u64, Error> {
    let schema = crate::store::check_tables_here(client)?;
    // Under its stored name, in its version's schema.
    let mut projection = AnyProjection::new(projection.clone()).over_schema(&schema);
    let name = projection.name().to_owned();
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting the reset"))?;
    refuse_while_held(&mut tx, &name)?;
    // The hook may clear tables the projection has not created yet.
    lock_setup(&mut tx, &name).map_err(Error::database("waiting for other processes' setup"))?;
    let read_model = |action: &str| {
        let (projection, action) = (name.clone(), action.to_owned());
        move |source: BoxError| Error::ReadModel {
            projection,
            action,
            source,
        }
    };
    projection
        .setup(&mut tx)
        .map_err(read_model("setting up its read model"))?;
    let cleared = delete_bookkeeping(&mut tx, &name)?;
    projection
        .reset(&mut tx)
        .map_err(read_model("clearing its read model"))?;
    tx.commit()
        .map_err(Error::database("committing the reset"))?;
    info!(
        "projection '{name}': deleted {} checkpoint(s) and {} parked event(s), and cleared its \
         read model; its next start rebuilds it from the first event",
        cleared.checkpoints, cleared.parked_events
    );
    Ok(cleared.checkpoints)
}

/// What [`reset_checkpoints`] deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Cleared {
    /// Checkpoints deleted, of every layout.
    pub checkpoints: u64,
    /// Parked events deleted.
    pub parked_events: u64,
}

/// Deletes the checkpoints (of every layout, with any re-partitioning in progress) and the
/// parked events of the projection named `name`, in one transaction, and leaves its read model
/// as it is: for a projection whose code is not at hand (a service's, reset from the command
/// line). Its next start applies every event again on top of the read model, so clear that
/// first; [`reset`] does both, given the projection.
///
/// Fails with [`Error::ProjectionRunning`] while a live process holds one of its partitions.
pub fn reset_checkpoints(client: &mut Client, name: &str) -> Result<Cleared, Error> {
    crate::store::check_tables_here(client)?;
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting the reset"))?;
    refuse_while_held(&mut tx, name)?;
    let cleared = delete_bookkeeping(&mut tx, name)?;
    tx.commit()
        .map_err(Error::database("committing the reset"))?;
    info!(
        "projection '{name}': deleted {} checkpoint(s) and {} parked event(s); its read model \
         was left as it is",
        cleared.checkpoints, cleared.parked_events
    );
    Ok(cleared)
}

/// Locks the projection's layout, and fails with [`Error::ProjectionRunning`] while a live
/// process holds one of its partitions.
pub(crate) fn refuse_while_held(
    tx: &mut postgres::Transaction<'_>,
    name: &str,
) -> Result<(), Error> {
    lock_layout(tx, name)?;
    let held = held_partitions(tx, name).map_err(Error::database(
        "reading which partitions live processes hold",
    ))?;
    if held.is_empty() {
        return Ok(());
    }
    let mut named = Vec::with_capacity(held.len());
    for holder in held {
        let application: Option<String> = tx
            .query_opt(
                "SELECT application_name FROM pg_stat_activity WHERE pid = $1",
                &[&holder.pid],
            )
            .map_err(Error::database(
                "reading which processes hold the partitions",
            ))?
            .and_then(|row| row.get(0));
        named.push(HeldPartition::new(
            holder.total,
            holder.key,
            holder.pid,
            application.as_deref(),
        ));
    }
    Err(Error::ProjectionRunning {
        projection: name.to_owned(),
        held: named,
    })
}

/// Deletes the projection's checkpoints, earlier layouts and parked events.
pub(crate) fn delete_bookkeeping(
    tx: &mut postgres::Transaction<'_>,
    name: &str,
) -> Result<Cleared, Error> {
    let checkpoints = tx
        .execute(
            "DELETE FROM projector_checkpoints WHERE projection = $1",
            &[&name],
        )
        .map_err(Error::database("deleting the checkpoints"))?;
    tx.execute(
        "DELETE FROM projector_prior_layouts WHERE projection = $1",
        &[&name],
    )
    .map_err(Error::database("deleting the earlier layouts"))?;
    let parked_events = tx
        .execute(
            "DELETE FROM projection_dead_letters WHERE projection = $1",
            &[&name],
        )
        .map_err(Error::database("deleting the parked events"))?;
    Ok(Cleared {
        checkpoints,
        parked_events,
    })
}
