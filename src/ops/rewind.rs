//! [`rewind`]: a projection's checkpoints moved back to a global position or a time, so that
//! its next start applies again every event after it, with its read model left as it is.
//! Exactly which events are applied again, and what a rewind leaves as it was, is told on
//! [`rewind`] itself (the public item).

use std::time::SystemTime;

use log::info;
use postgres::{Client, GenericClient, Transaction};

use crate::layout::checkpoint::to_i32;
use crate::layout::{earlier_layouts, new_generation, retire_earlier};
use crate::ops::status::refuse_while_held;
use crate::{EarlierLayout, Error};

/// Where [`rewind`] moves a projection's checkpoints back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RewindTo {
    /// A global position: every event after it is applied again.
    Position(i64),
    /// A time: the position of the last event stored before it (`created_at` earlier than
    /// it), or 0 when no event was.
    Time(SystemTime),
}

/// What [`rewind`] did, or [`plan_rewind`] says it would do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rewind {
    /// The projection.
    pub projection: String,
    /// The partition count of its current layout.
    pub total_partitions: u32,
    /// What was asked for.
    pub to: RewindTo,
    /// The global position rewound to: every event after it is applied again.
    pub position: i64,
    /// When the event at that position was stored, if one is stored there.
    pub stored_at: Option<SystemTime>,
    /// Each partition of the layout, by key.
    pub partitions: Vec<PartitionRewind>,
    /// While a re-partitioning is in progress, the earlier layouts whose applied events the
    /// partitions still skip, as they were: the rewind caps their entries at the position.
    pub earlier_layouts: Vec<EarlierLayout>,
    /// Aggregates of the projection that are parked: they stay parked.
    pub parked_aggregates: u64,
    /// Their parked events.
    pub parked_events: u64,
}

impl Rewind {
    /// The partitions whose checkpoint moves back.
    pub fn moved(&self) -> impl Iterator<Item = &PartitionRewind> {
        self.partitions.iter().filter(|p| p.to < p.from)
    }

    /// The partitions already at or below the position, which stay where they are.
    pub fn stayed(&self) -> impl Iterator<Item = &PartitionRewind> {
        self.partitions.iter().filter(|p| p.to == p.from)
    }

    /// The earlier layouts that applied events after the position: those events are applied
    /// again too.
    pub fn earlier_moved(&self) -> impl Iterator<Item = &EarlierLayout> {
        self.earlier_layouts
            .iter()
            .filter(|layout| layout.applied_at_most() > self.position)
    }

    /// True unless every partition, and every earlier layout, is at or below the position
    /// already: then the rewind changes nothing.
    pub fn moves_anything(&self) -> bool {
        self.moved().next().is_some() || self.earlier_moved().next().is_some()
    }
}

/// One partition's checkpoint, before and after a [`rewind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionRewind {
    /// The partition key.
    pub partition_key: u32,
    /// Its checkpoint before.
    pub from: i64,
    /// Its checkpoint after: the position rewound to, or `from` when that was at or below it.
    pub to: i64,
}

/// What [`rewind`] would do to `projection`'s checkpoints now, without changing anything (and
/// without checking whether live processes hold its partitions: [`status`](crate::status)
/// shows that). A bare name is the live version's, as for [`rewind`].
///
/// Fails with [`Error::NotStarted`] when the projection has no checkpoints in the schema.
pub fn plan_rewind(
    client: &mut impl GenericClient,
    projection: &str,
    to: RewindTo,
) -> Result<Rewind, Error> {
    let schema = crate::store::check_tables_here(client)?;
    let projection = &crate::store::registry::live_stored_name(client, projection)?;
    plan(client, &schema, projection, to, false)
}

/// Moves every partition checkpoint of `projection`'s current layout back to the position
/// `to` names (never forward), in one transaction, and returns what it did: the projection's
/// next start applies every event after that position again, on top of its read model, which
/// is **not** cleared. A name without a version (`tally`) is the live version's
/// ([`live_stored_name`](crate::live_stored_name)); `tally@2` names another.
///
/// Fails with [`Error::ProjectionRunning`] while a live process holds one of its partitions,
/// and with [`Error::NotStarted`] when it has no checkpoints. Processes of the projection that
/// hold no partition (standbys) stop with [`Error::Fenced`] at their next check.
///
/// # What is applied again
/// Rewinding to position `N` sets the checkpoint `c` of every partition of the projection's
/// current layout to `min(c, N)`, in one transaction: a partition already at or below `N`
/// stays where it is (a rewind never moves a checkpoint forward). Since a partition applied
/// exactly its events at or below its checkpoint, the projection then stands as if it had
/// applied exactly its events at or below `N` (of those it had applied): its next start applies
/// every event after `N` once more (or for the first time, on a partition that had not reached
/// it) and none at or below `N`.
///
/// Rewinding to a time `T` rewinds to the position of the last event stored before `T`
/// (`created_at < T`), or to 0 (the first event) when none was: every event after that position
/// was stored at or after `T`. Positions and `created_at` need not grow together (two appends
/// in flight at once), so an event stored at or after `T` with a lower position than one
/// stored before it is not applied again. A `created_at` without a time zone (which the
/// pupsourcing layout allows) is read in the session's time zone, as it was written by
/// `DEFAULT NOW()`. Finding the position reads the events table backwards from the head until
/// it meets an event stored before `T`: quick for a recent time, a scan of the table for one
/// before most events.
///
/// # The read model is not cleared
/// Nothing but checkpoints moves: the events after `N` are applied on top of the read model as
/// it is. That is right only for a projection whose `apply` is idempotent (an upsert of the
/// event's values) or that rebuilds the rows it touches; a projection that counts or appends
/// counts or appends twice. To rebuild from nothing, use [`reset`](crate::reset).
///
/// # Earlier layouts
/// While a re-partitioning is under way, the current layout also skips the events covered by
/// the checkpoint vectors of the layouts it replaced (see "Changing the number of partitions"
/// in the crate docs). Each entry of those vectors is capped at `N` in the same transaction, so
/// an event is then "applied" iff it is at or below `N` and was applied before: exactly the
/// rule above. Vectors that no longer cover anything above every partition's checkpoint are
/// deleted.
///
/// # Running processes, standbys
/// A rewind is refused ([`Error::ProjectionRunning`]) while a live process holds a partition of
/// the projection, checked under the layout lock that a start also takes. A process that holds
/// none (a standby waiting for a partition, a process sharing partitions that has none for
/// now) still follows the old checkpoints in memory: the rewound rows get a new generation, so
/// such a process stops with [`Error::Fenced`] at its next look at its partition, as after a
/// re-partitioning, and starting it again carries on from the rewound checkpoints.
///
/// # What stays as it was
/// Parked events stay parked (a rewind deletes nothing): an aggregate with parked events
/// stays set aside, so the replay records its events after `N` among its parked ones (those it
/// had applied before it parked included) instead of applying them; `dead-letters retry`
/// applies them all, in position order, once the cause is fixed. A failure stored for the
/// projection stays until its next successful start (as after any fix), and a pause stays.
pub fn rewind(client: &mut Client, projection: &str, to: RewindTo) -> Result<Rewind, Error> {
    let schema = crate::store::check_tables_here(client)?;
    let projection = &crate::store::registry::live_stored_name(client, projection)?;
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting the rewind"))?;
    refuse_while_held(&mut tx, projection)?;
    let rewind = plan(&mut tx, &schema, projection, to, true)?;
    if rewind.moves_anything() {
        move_checkpoints(&mut tx, &rewind)?;
    }
    tx.commit()
        .map_err(Error::database("committing the rewind"))?;
    let moved = rewind.moved().count();
    info!(
        "projection '{projection}': rewound {moved} of {} partition checkpoint(s) to global \
         position {}; its read model was not cleared",
        rewind.partitions.len(),
        rewind.position
    );
    Ok(rewind)
}

/// The rewind of `projection` (in `schema`) to `to`, as the checkpoints stand; with `lock`,
/// their rows are locked (waiting for a `dead-letters retry` that holds one).
fn plan(
    client: &mut impl GenericClient,
    schema: &str,
    projection: &str,
    to: RewindTo,
    lock: bool,
) -> Result<Rewind, Error> {
    if let RewindTo::Position(position) = to {
        if position < 0 {
            return Err(Error::invalid_setting(
                "RewindTo::Position",
                position,
                "a global position is 0 or more",
            ));
        }
    }
    let rows = client
        .query(
            &format!(
                "SELECT total_partitions, partition_key, last_position FROM projector_checkpoints \
                 WHERE projection = $1 ORDER BY 1, 2{}",
                if lock { " FOR UPDATE" } else { "" }
            ),
            &[&projection],
        )
        .map_err(Error::database("reading the checkpoints"))?;
    let mut totals: Vec<u32> = rows
        .iter()
        .map(|row| row.get::<_, i32>(0).unsigned_abs())
        .collect();
    totals.dedup();
    let total = match totals[..] {
        [total] => total,
        [] => {
            return Err(Error::NotStarted {
                projection: projection.to_owned(),
                schema: schema.to_owned(),
            });
        }
        _ => {
            let totals: Vec<String> = totals.iter().map(u32::to_string).collect();
            return Err(Error::invalid_setting(
                "rewind(projection)",
                projection,
                format!(
                    "its checkpoints are kept under {} partition counts at once: start it once \
                     so that one layout stands, then rewind it",
                    totals.join(" and ")
                ),
            ));
        }
    };
    let (position, stored_at) = position_of(client, to)?;
    let partitions = rows
        .iter()
        .map(|row| {
            let from: i64 = row.get(2);
            PartitionRewind {
                partition_key: row.get::<_, i32>(1).unsigned_abs(),
                from,
                to: from.min(position),
            }
        })
        .collect();
    let earlier_layouts = earlier_layouts(client, projection, total)?;
    let parked = client
        .query_one(
            "SELECT COUNT(DISTINCT aggregate_id), COUNT(*) FROM projection_dead_letters \
             WHERE projection = $1",
            &[&projection],
        )
        .map_err(Error::database("counting the parked events"))?;
    Ok(Rewind {
        projection: projection.to_owned(),
        total_partitions: total,
        to,
        position,
        stored_at,
        partitions,
        earlier_layouts,
        parked_aggregates: parked.get::<_, i64>(0).unsigned_abs(),
        parked_events: parked.get::<_, i64>(1).unsigned_abs(),
    })
}

/// The position `to` names, and when the event there was stored (if one is).
fn position_of(
    client: &mut impl GenericClient,
    to: RewindTo,
) -> Result<(i64, Option<SystemTime>), Error> {
    let row = match to {
        RewindTo::Position(position) => {
            let row = client
                .query_opt(
                    "SELECT created_at::timestamptz FROM events WHERE global_position = $1",
                    &[&position],
                )
                .map_err(Error::database("reading the event rewound to"))?;
            return Ok((position, row.map(|row| row.get(0))));
        }
        RewindTo::Time(time) => client
            .query_opt(
                "SELECT global_position, created_at::timestamptz FROM events \
                 WHERE created_at::timestamptz < $1 ORDER BY global_position DESC LIMIT 1",
                &[&time],
            )
            .map_err(Error::database(
                "finding the last event stored before the time",
            ))?,
    };
    Ok(row.map_or((0, None), |row| (row.get(0), Some(row.get(1)))))
}

/// Moves the checkpoints of the layout back (all of its rows under a new generation, which
/// fences every process started before), caps the earlier layouts' vectors at the position and
/// deletes those that no longer matter.
fn move_checkpoints(tx: &mut Transaction<'_>, rewind: &Rewind) -> Result<(), Error> {
    let generation = new_generation(tx)?;
    let (name, total) = (&rewind.projection, to_i32(rewind.total_partitions));
    tx.execute(
        "UPDATE projector_checkpoints SET generation = $4, \
             updated_at = CASE WHEN last_position > $3 THEN NOW() ELSE updated_at END, \
             last_position = LEAST(last_position, $3) \
         WHERE projection = $1 AND total_partitions = $2",
        &[name, &total, &rewind.position, &generation],
    )
    .map_err(Error::database("moving the checkpoints back"))?;
    tx.execute(
        "UPDATE projector_prior_layouts SET prior_positions = ARRAY( \
             SELECT LEAST(x, $3) FROM unnest(prior_positions) WITH ORDINALITY AS u(x, i) \
             ORDER BY i) \
         WHERE projection = $1 AND total_partitions = $2",
        &[name, &total, &rewind.position],
    )
    .map_err(Error::database("moving the earlier layouts back"))?;
    retire_earlier(tx, name, rewind.total_partitions)?;
    Ok(())
}
