//! Layouts: how many partitions a projection's checkpoints are kept under, changing that number
//! exactly, and the earlier layouts a projection still honours while it catches up.
//!
//! A layout of `N` partitions has a checkpoint vector `C`: partition `k` applied exactly its
//! events (those with `partition_of(aggregate, N) == k`) at or below `C[k]`. So an event `e`
//! was applied under that layout iff `e.position <= C[partition_of(e, N)]`. When layout `M`
//! replaces it (all of its transactions finished, its rows locked and deleted in the same
//! transaction), every partition of `M` starts at `min(C)` (everything at or below was applied)
//! and skips the events that rule covers, until it passes `max(C)`.
//!
//! A chain `N → M → K` keeps the rule exact: a partition `j` of `M` applied exactly the events
//! of `j` at or below `C_M[j]` that `C_N` did not cover, so "applied by now" is "covered by
//! `C_N` or by `C_M`". `K` therefore honours the list of every earlier vector still needed and
//! starts at the highest of their minimums. Two vectors of the same partition count merge by
//! taking the larger entry. A vector whose maximum is at or below where the new layout starts
//! covers nothing the new layout will look at, and is dropped; the list is deleted once every
//! partition of the current layout has passed all of its entries.
//!
//! # Fencing
//! Checkpoint rows carry the generation of the claim that created them; a worker locks its row
//! (`FOR UPDATE`) only with the generation it started under. A re-partitioning locks the old
//! rows first (waiting for any transaction in flight) and deletes them, so a process of the old
//! layout that is still running finds nothing at its next transaction and stops with
//! [`Error::Fenced`], exactly, with no timing involved.

pub(crate) mod checkpoint;

use log::info;
use postgres::{Client, GenericClient, Transaction};

use crate::layout::checkpoint::to_i32;
use crate::partition::{MAX_PARTITIONS, partition_of};
use crate::{Database, Error};

/// A layout a projection ran under before its current one, kept while the current one catches
/// up: its partition count and the checkpoint of each of its partitions when it was replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EarlierLayout {
    /// Its number of partitions.
    pub total_partitions: u32,
    /// The checkpoint of each of its partitions when it was replaced, by partition key.
    pub checkpoints: Vec<i64>,
}

impl EarlierLayout {
    /// True when the event at `position` of aggregate `aggregate_id` was applied under this
    /// layout.
    pub fn covers(&self, position: i64, aggregate_id: &str) -> bool {
        let key = partition_of(aggregate_id, self.total_partitions.max(1)) as usize;
        self.checkpoints.get(key).is_some_and(|&c| position <= c)
    }

    /// Every event at or below this position was applied under this layout.
    pub fn applied_through(&self) -> i64 {
        self.checkpoints.iter().copied().min().unwrap_or(0)
    }

    /// No event above this position was applied under this layout.
    pub fn applied_at_most(&self) -> i64 {
        self.checkpoints.iter().copied().max().unwrap_or(0)
    }
}

/// What a new layout inherits when it replaces `replaced`, which itself still honoured
/// `earlier`: the position each of its partitions starts at, and the earlier layouts it must
/// honour (merged by partition count, those that cover nothing above the start dropped).
pub(crate) fn succession(
    replaced: EarlierLayout,
    earlier: Vec<EarlierLayout>,
) -> (i64, Vec<EarlierLayout>) {
    let mut merged: Vec<EarlierLayout> = Vec::new();
    for layout in earlier.into_iter().chain([replaced]) {
        match merged
            .iter_mut()
            .find(|m| m.total_partitions == layout.total_partitions)
        {
            Some(same) => {
                for (kept, other) in same.checkpoints.iter_mut().zip(&layout.checkpoints) {
                    *kept = (*kept).max(*other);
                }
            }
            None => merged.push(layout),
        }
    }
    let start = merged
        .iter()
        .map(EarlierLayout::applied_through)
        .max()
        .unwrap_or(0);
    merged.retain(|layout| layout.applied_at_most() > start);
    (start, merged)
}

/// The layout a runner works under, as [`claim_layout`] found or made it.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// The generation of its checkpoint rows.
    pub(crate) generation: i64,
    /// Earlier layouts whose applied events its partitions must still skip.
    pub(crate) earlier: Vec<EarlierLayout>,
    /// What claiming it changed.
    pub(crate) change: LayoutChange,
}

/// What [`repartition`] did to a projection's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutChange {
    /// The projection already had that many partitions: nothing changed.
    Unchanged,
    /// The projection had no checkpoints: its layout was created, starting at the first event.
    Created,
    /// The layout of `from` partitions was replaced, exactly (see the crate docs).
    Replaced {
        /// The partition count replaced.
        from: u32,
    },
}

/// Changes the number of partitions of `projection` to `total`, exactly: no event is applied
/// twice or skipped (see the crate docs), without starting anything.
///
/// This is the only way to change it: a process started with another partition count is
/// refused ([`Error::LayoutMismatch`]), so a process restarted with stale flags cannot move the
/// layout back. It works with no process running and while processes of the old layout run:
/// it waits for their transactions in flight, and they stop with [`Error::Fenced`] at their
/// next transaction. Start the new layout's processes with `total` partitions afterwards.
pub fn repartition(
    database: &Database,
    projection: &str,
    total: u32,
) -> Result<LayoutChange, Error> {
    if total == 0 || total > MAX_PARTITIONS {
        return Err(Error::invalid_setting(
            "repartition(total)",
            total,
            format!("the number of partitions must be from 1 to {MAX_PARTITIONS}"),
        ));
    }
    if projection.is_empty() {
        return Err(Error::invalid_setting(
            "repartition(projection)",
            "",
            "a projection needs a name",
        ));
    }
    let mut client = database.connect()?;
    crate::store::check_tables(&mut client, database.schema_name())?;
    Ok(claim_layout(&mut client, projection, total, true, None)?.change)
}

/// Makes sure the projection's checkpoints are kept under `total` partitions, creating the rows
/// of every partition of that layout where missing, and returns the layout.
///
/// When checkpoints exist under another partition count, fails with [`Error::LayoutMismatch`]
/// unless `repartition` is set; with it, replaces that layout (see the module docs): locks its
/// rows, which waits for its transactions in flight, records its checkpoints as an earlier
/// layout, deletes its rows and creates the new layout's, all in one transaction.
/// The partition counts `projection`'s checkpoints are kept under (two while a
/// re-partitioning is under way, none before its first start).
pub(crate) fn stored_totals(client: &mut Client, projection: &str) -> Result<Vec<u32>, Error> {
    Ok(client
        .query(
            "SELECT DISTINCT total_partitions FROM projector_checkpoints WHERE projection = $1 \
             ORDER BY 1",
            &[&projection],
        )
        .map_err(Error::database("reading the partition layout"))?
        .iter()
        .map(|row| row.get::<_, i32>(0).unsigned_abs())
        .collect())
}

///
/// A layout created here starts at the first event, or, given `start_from` (the stored name
/// of the live version of a projection with side effects), where that projection's
/// checkpoints are: see [`start_where`].
pub(crate) fn claim_layout(
    client: &mut Client,
    projection: &str,
    total: u32,
    repartition: bool,
    start_from: Option<&str>,
) -> Result<Layout, Error> {
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting to check the partition layout"))?;
    lock_layout(&mut tx, projection)?;
    let stored: Vec<(u32, i64)> = tx
        .query(
            "SELECT total_partitions, MAX(generation) FROM projector_checkpoints \
             WHERE projection = $1 GROUP BY 1 ORDER BY 1",
            &[&projection],
        )
        .map_err(Error::database("reading the partition layout"))?
        .iter()
        .map(|row| (row.get::<_, i32>(0).unsigned_abs(), row.get(1)))
        .collect();
    let totals: Vec<u32> = stored.iter().map(|&(t, _)| t).collect();
    let layout = match stored[..] {
        [] => {
            // A fresh start (or one after a reset): anything left over from earlier layouts
            // no longer describes these checkpoints.
            tx.execute(
                "DELETE FROM projector_prior_layouts WHERE projection = $1",
                &[&projection],
            )
            .map_err(Error::database("clearing earlier layouts"))?;
            let generation = new_generation(&mut tx)?;
            create_rows(&mut tx, projection, total, generation, 0)?;
            let earlier = match start_from {
                Some(live) => start_where(&mut tx, projection, total, live)?,
                None => Vec::new(),
            };
            Layout {
                generation,
                earlier,
                change: LayoutChange::Created,
            }
        }
        [(stored_total, generation)] if stored_total == total => {
            create_rows(&mut tx, projection, total, generation, 0)?;
            retire_earlier(&mut tx, projection, total)?;
            Layout {
                generation,
                earlier: earlier_layouts(&mut tx, projection, total)?,
                change: LayoutChange::Unchanged,
            }
        }
        [(old_total, _)] if repartition => replace_layout(&mut tx, projection, old_total, total)?,
        _ => {
            return Err(Error::LayoutMismatch {
                projection: projection.to_owned(),
                stored: totals,
                requested: total,
            });
        }
    };
    tx.commit()
        .map_err(Error::database("committing the checkpoints"))?;
    Ok(layout)
}

/// Moves the fresh checkpoints of `projection` (layout `total`) to where projection `live`'s
/// are, so that it applies no event `live` applied: partition by partition when `live` has the
/// same partition count, else as after a re-partitioning from `live`'s layouts (every
/// partition starts at the lowest of their checkpoints and skips the events they cover, which
/// are returned and recorded as earlier layouts). Nothing moves when `live` has no checkpoints.
fn start_where(
    tx: &mut Transaction<'_>,
    projection: &str,
    total: u32,
    live: &str,
) -> Result<Vec<EarlierLayout>, Error> {
    let rows = tx
        .query(
            "SELECT total_partitions, array_agg(last_position ORDER BY partition_key) \
             FROM projector_checkpoints WHERE projection = $1 GROUP BY 1 ORDER BY 1",
            &[&live],
        )
        .map_err(Error::database("reading the live version's checkpoints"))?;
    let layouts: Vec<EarlierLayout> = rows
        .iter()
        .map(|row| EarlierLayout {
            total_partitions: row.get::<_, i32>(0).unsigned_abs(),
            checkpoints: row.get(1),
        })
        .filter(|layout| layout.checkpoints.len() == layout.total_partitions as usize)
        .collect();
    if let [same] = &layouts[..] {
        if same.total_partitions == total {
            tx.execute(
                "UPDATE projector_checkpoints SET last_position = ($3::bigint[])[partition_key + 1] \
                 WHERE projection = $1 AND total_partitions = $2",
                &[&projection, &to_i32(total), &same.checkpoints],
            )
            .map_err(Error::database("starting where the live version is"))?;
            info!(
                "projection '{projection}' has side effects: it starts where '{live}' is, at \
                 global positions {:?}",
                same.checkpoints
            );
            return Ok(Vec::new());
        }
    }
    let Some(first) = layouts.first().cloned() else {
        return Ok(Vec::new());
    };
    let (start, earlier) = succession(first, layouts[1..].to_vec());
    tx.execute(
        "UPDATE projector_checkpoints SET last_position = $3 \
         WHERE projection = $1 AND total_partitions = $2",
        &[&projection, &to_i32(total), &start],
    )
    .map_err(Error::database("starting where the live version is"))?;
    for layout in &earlier {
        tx.execute(
            "INSERT INTO projector_prior_layouts \
                 (projection, total_partitions, prior_total, prior_positions) \
             VALUES ($1, $2, $3, $4)",
            &[
                &projection,
                &to_i32(total),
                &to_i32(layout.total_partitions),
                &layout.checkpoints,
            ],
        )
        .map_err(Error::database("recording the live version's layout"))?;
    }
    info!(
        "projection '{projection}' has side effects: it starts where '{live}' is, at global \
         position {start}, skipping the events '{live}' applied above it"
    );
    Ok(earlier)
}

/// Serialises layout changes, starts and resets of one projection.
pub(crate) fn lock_layout(tx: &mut Transaction<'_>, projection: &str) -> Result<(), Error> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('projector layout ' || current_schema() || ' ' || $1))",
        &[&projection],
    )
    .map(drop)
    .map_err(Error::database("locking the partition layout"))
}

/// A generation no earlier claim used: the claiming (or rewinding) transaction's id.
pub(crate) fn new_generation(tx: &mut Transaction<'_>) -> Result<i64, Error> {
    tx.query_one("SELECT txid_current()", &[])
        .map(|row| row.get(0))
        .map_err(Error::database("numbering the partition layout"))
}

fn create_rows(
    tx: &mut Transaction<'_>,
    projection: &str,
    total: u32,
    generation: i64,
    position: i64,
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO projector_checkpoints \
             (projection, total_partitions, partition_key, last_position, generation) \
         SELECT $1, $2, key, $3, $4 FROM generate_series(0, $2 - 1) AS key \
         ON CONFLICT DO NOTHING",
        &[&projection, &to_i32(total), &position, &generation],
    )
    .map(drop)
    .map_err(Error::database("creating the checkpoints"))
}

/// Replaces layout `old_total` by `total`; see [`claim_layout`].
fn replace_layout(
    tx: &mut Transaction<'_>,
    projection: &str,
    old_total: u32,
    total: u32,
) -> Result<Layout, Error> {
    // Waits for the old layout's transactions in flight; any later one finds its row gone.
    let rows = tx
        .query(
            "SELECT partition_key, last_position FROM projector_checkpoints \
             WHERE projection = $1 AND total_partitions = $2 FOR UPDATE",
            &[&projection, &to_i32(old_total)],
        )
        .map_err(Error::database("locking the old layout's checkpoints"))?;
    let mut checkpoints = vec![0; old_total as usize];
    for row in &rows {
        if let Some(slot) = checkpoints.get_mut(row.get::<_, i32>(0).unsigned_abs() as usize) {
            *slot = row.get(1);
        }
    }
    let replaced = EarlierLayout {
        total_partitions: old_total,
        checkpoints,
    };
    let inherited = earlier_layouts(tx, projection, old_total)?;
    let (start, earlier) = succession(replaced.clone(), inherited);
    tx.execute(
        "DELETE FROM projector_checkpoints WHERE projection = $1",
        &[&projection],
    )
    .and_then(|_| {
        tx.execute(
            "DELETE FROM projector_prior_layouts WHERE projection = $1",
            &[&projection],
        )
    })
    .map_err(Error::database("removing the old layout"))?;
    let generation = new_generation(tx)?;
    create_rows(tx, projection, total, generation, start)?;
    for layout in &earlier {
        tx.execute(
            "INSERT INTO projector_prior_layouts \
                 (projection, total_partitions, prior_total, prior_positions) \
             VALUES ($1, $2, $3, $4)",
            &[
                &projection,
                &to_i32(total),
                &to_i32(layout.total_partitions),
                &layout.checkpoints,
            ],
        )
        .map_err(Error::database("recording the old layout"))?;
    }
    let positions: Vec<String> = replaced.checkpoints.iter().map(i64::to_string).collect();
    info!(
        "projection '{projection}': re-partitioning from {old_total} to {total} partition(s); \
         checkpoints of the {old_total} were [{}]; every partition starts at global position \
         {start}{}",
        positions.join(", "),
        match earlier.iter().map(EarlierLayout::applied_at_most).max() {
            Some(end) =>
                format!(" and skips the events applied under earlier layouts up to position {end}"),
            None => String::new(),
        }
    );
    Ok(Layout {
        generation,
        earlier,
        change: LayoutChange::Replaced { from: old_total },
    })
}

/// The earlier layouts layout `total` of `projection` still honours.
pub(crate) fn earlier_layouts(
    client: &mut impl GenericClient,
    projection: &str,
    total: u32,
) -> Result<Vec<EarlierLayout>, Error> {
    Ok(client
        .query(
            "SELECT prior_total, prior_positions FROM projector_prior_layouts \
             WHERE projection = $1 AND total_partitions = $2 ORDER BY prior_total",
            &[&projection, &to_i32(total)],
        )
        .map_err(Error::database("reading the earlier layouts"))?
        .iter()
        .map(|row| EarlierLayout {
            total_partitions: row.get::<_, i32>(0).unsigned_abs(),
            checkpoints: row.get(1),
        })
        .collect())
}

/// Deletes the earlier layouts that every partition of layout `total` has passed.
pub(crate) fn retire_earlier(
    client: &mut impl GenericClient,
    projection: &str,
    total: u32,
) -> Result<u64, Error> {
    client
        .execute(
            "DELETE FROM projector_prior_layouts p \
             WHERE p.projection = $1 AND p.total_partitions = $2 \
                 AND (SELECT MAX(x) FROM unnest(p.prior_positions) AS x) <= ( \
                     SELECT MIN(c.last_position) FROM projector_checkpoints c \
                     WHERE c.projection = $1 AND c.total_partitions = $2)",
            &[&projection, &to_i32(total)],
        )
        .map_err(Error::database("retiring the earlier layouts"))
}

#[cfg(test)]
mod tests;
