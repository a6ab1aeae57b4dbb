//! Poison events parked per aggregate: a projection whose policy is [`PoisonPolicy::Park`](crate::PoisonPolicy::Park)
//! records an event that keeps failing in `projection_dead_letters`, with every later event of
//! the same aggregate behind it, and goes on with the other aggregates.
//!
//! # How a worker knows an aggregate is parked
//! An aggregate (an `aggregate_id`, as partitioning sees it) is parked while the projection has
//! rows of it in `projection_dead_letters`. Every worker, whatever its projection's policy,
//! reads the projection's parked aggregates inside each of its transactions that applies
//! events, after it has locked its checkpoint row (one index probe per parked aggregate, however
//! many events are parked behind them), and sets their events aside in the same transaction
//! that moves the checkpoint past them: a projection restarted with `stop` after it parked (a
//! restart with other flags, a standby without them) must not apply an aggregate's later
//! events around its parked ones. [`retry`] and [`drop_parked`] lock the same checkpoint row
//! (the aggregate's partition under the current layout, found under the layout lock), so they
//! serialize with the worker: a worker transaction sees an aggregate either parked with all its
//! earlier events, or released with all of them applied (or discarded). The worker's side is
//! [`crate::engine::worker::parking`].

mod drop;

use std::time::SystemTime;

use log::info;
use postgres::{Client, GenericClient, Transaction};

pub use drop::{Dropped, drop_parked};

use crate::event::Event;
use crate::layout::checkpoint::to_i32;
use crate::layout::lock_layout;
use crate::projections::projection::{AnyProjection, Context, Projection, apply_each, lock_setup};
use crate::store::{EVENT_COLUMNS, event_from_row};
use crate::{BoxError, Error, partition_of};

/// One parked event, as `projector dead-letters list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The projection that parked it.
    pub projection: String,
    /// The event's global position.
    pub global_position: i64,
    /// The event's bounded context.
    pub bounded_context: String,
    /// The event's aggregate type.
    pub aggregate_type: String,
    /// The event's aggregate id: the aggregate that is parked.
    pub aggregate_id: String,
    /// The event's type.
    pub event_type: String,
    /// Why it is parked: the projection's error for the event that failed, or which event it
    /// is parked behind.
    pub error: String,
    /// How many times it was tried: 0 for an event parked behind another one.
    pub attempts: u32,
    /// When it first failed (or was parked).
    pub first_failed_at: SystemTime,
    /// When it last failed (or was parked).
    pub last_failed_at: SystemTime,
    /// The event's payload, as stored in `events`; `None` when the event is no longer there.
    pub payload: Option<Vec<u8>>,
}

/// The parked events of every projection, or of one, in projection and position order.
pub fn dead_letters(
    client: &mut impl GenericClient,
    projection: Option<&str>,
) -> Result<Vec<DeadLetter>, Error> {
    crate::store::check_tables_here(client)?;
    let rows = client
        .query(
            "SELECT d.projection, d.global_position, d.bounded_context, d.aggregate_type, \
                 d.aggregate_id, d.event_type, d.error, d.attempts, d.first_failed_at, \
                 d.last_failed_at, e.payload \
             FROM projection_dead_letters d \
             LEFT JOIN events e ON e.global_position = d.global_position \
             WHERE $1::text IS NULL OR d.projection = $1 \
             ORDER BY d.projection, d.global_position",
            &[&projection],
        )
        .map_err(Error::database("reading the parked events"))?;
    Ok(rows
        .iter()
        .map(|row| DeadLetter {
            projection: row.get(0),
            global_position: row.get(1),
            bounded_context: row.get(2),
            aggregate_type: row.get(3),
            aggregate_id: row.get(4),
            event_type: row.get(5),
            error: row.get(6),
            attempts: row.get::<_, i32>(7).unsigned_abs(),
            first_failed_at: row.get(8),
            last_failed_at: row.get(9),
            payload: row.get(10),
        })
        .collect())
}

/// Per projection and parked aggregate, how many events are parked (for `status`).
pub(crate) fn parked_counts(
    client: &mut impl GenericClient,
) -> Result<Vec<(String, String, i64)>, Error> {
    Ok(client
        .query(
            "SELECT projection, aggregate_id, COUNT(*) FROM projection_dead_letters \
             GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .map_err(Error::database("counting the parked events"))?
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect())
}

/// Per projection among `names` with parked events: (projection, parked aggregates, parked
/// events), for progress lines and metrics.
pub(crate) fn parked_totals(
    client: &mut impl GenericClient,
    names: &[&str],
) -> Result<Vec<(String, i64, i64)>, postgres::Error> {
    Ok(client
        .query(
            "SELECT projection, COUNT(DISTINCT aggregate_id), COUNT(*) \
             FROM projection_dead_letters WHERE projection = ANY($1) GROUP BY 1",
            &[&names],
        )?
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect())
}

/// What [`retry`] did with one parked aggregate.
#[derive(Debug)]
#[non_exhaustive]
pub struct Retried {
    /// The aggregate.
    pub aggregate_id: String,
    /// The positions of its parked events, in order.
    pub positions: Vec<i64>,
    /// Its partition under the projection's current layout.
    pub partition: u32,
    /// The projection's current number of partitions.
    pub total_partitions: u32,
    /// `None`: every event was applied, in order, and the aggregate is released. Otherwise
    /// why not ([`Error::ReadModel`] naming the event): nothing was applied, and the events
    /// stay parked.
    pub failure: Option<Error>,
}

/// Applies the parked events of `aggregate` (of each parked aggregate of the projection when
/// `None`, oldest first) through `projection`, in position order, in one transaction per
/// aggregate, and releases the aggregate when they all apply: its later events are then
/// applied by the projection's workers as usual. On a failure the transaction is rolled back,
/// the events stay parked (the failing one's attempts and error are updated), and the failure
/// is reported in [`Retried::failure`]; the other aggregates are still tried.
///
/// Safe while the projection runs: each transaction locks the checkpoint row of the
/// aggregate's partition, as the worker does. Fails with [`Error::InvalidSetting`] for an
/// aggregate with nothing parked, also when a retry or drop running at the same time released
/// it first (with `None`, such an aggregate's outcome has no positions).
pub fn retry<P: Projection>(
    client: &mut Client,
    projection: &mut P,
    aggregate: Option<&str>,
) -> Result<Vec<Retried>, Error> {
    let schema = crate::store::check_tables_here(client)?;
    // Under its stored name, in its version's schema.
    let mut projection = AnyProjection::new(projection.clone()).over_schema(&schema);
    let name = projection.name().to_owned();
    let aggregates = parked_aggregates_named(client, &name, aggregate)?;
    let mut outcomes = Vec::with_capacity(aggregates.len());
    for aggregate_id in aggregates {
        outcomes.push(retry_one(client, &mut projection, &name, aggregate_id)?);
    }
    match (aggregate, outcomes.first()) {
        // The one aggregate asked for was released by someone else between the two reads.
        (Some(id), Some(outcome)) if outcome.positions.is_empty() => Err(released_meanwhile(id)),
        _ => Ok(outcomes),
    }
}

/// `aggregate` of projection `name` has nothing parked.
fn nothing_parked(name: &str, aggregate: &str) -> Error {
    Error::invalid_setting(
        "aggregate id",
        aggregate,
        format!("projection '{name}' has no parked events of this aggregate"),
    )
}

/// `aggregate` was parked when looked at, and released by a retry or drop running at the same
/// time before this one locked it.
fn released_meanwhile(aggregate: &str) -> Error {
    Error::invalid_setting(
        "aggregate id",
        aggregate,
        "nothing of it is parked any more: a retry or drop running at the same time released it \
         first",
    )
}

/// The parked events of `aggregate` in projection `name`, in position order: what
/// [`drop_parked`] would discard. Fails with [`Error::InvalidSetting`] when it has none.
pub fn dead_letters_of(
    client: &mut impl GenericClient,
    name: &str,
    aggregate: &str,
) -> Result<Vec<DeadLetter>, Error> {
    let letters: Vec<DeadLetter> = dead_letters(client, Some(name))?
        .into_iter()
        .filter(|letter| letter.aggregate_id == aggregate)
        .collect();
    if letters.is_empty() {
        return Err(nothing_parked(name, aggregate));
    }
    Ok(letters)
}

/// The parked aggregates of `name` (or just `aggregate`, checked to be parked), oldest first.
fn parked_aggregates_named(
    client: &mut Client,
    name: &str,
    aggregate: Option<&str>,
) -> Result<Vec<String>, Error> {
    let aggregates: Vec<String> = client
        .query(
            "SELECT aggregate_id FROM projection_dead_letters \
             WHERE projection = $1 AND ($2::text IS NULL OR aggregate_id = $2) \
             GROUP BY aggregate_id ORDER BY MIN(global_position)",
            &[&name, &aggregate],
        )
        .map_err(Error::database("reading the parked aggregates"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    match aggregate {
        Some(id) if aggregates.is_empty() => Err(nothing_parked(name, id)),
        _ => Ok(aggregates),
    }
}

/// Locks the checkpoint row of `aggregate_id`'s partition under the projection's current
/// layout (and the layout, so that no re-partitioning moves it meanwhile): the row every worker
/// transaction of that partition locks. Returns `(partition, total)`.
fn lock_partition_of(
    tx: &mut Transaction<'_>,
    name: &str,
    aggregate_id: &str,
) -> Result<(u32, u32), Error> {
    lock_layout(tx, name)?;
    let total = tx
        .query_opt(
            "SELECT MAX(total_partitions) FROM projector_checkpoints WHERE projection = $1 \
             HAVING COUNT(*) > 0",
            &[&name],
        )
        .map_err(Error::database("reading the partition layout"))?
        .map(|row| row.get::<_, i32>(0).unsigned_abs());
    let Some(total) = total.filter(|&total| total > 0) else {
        // No layout (never run, or reset): no worker can be applying the aggregate.
        return Ok((0, 0));
    };
    let key = partition_of(aggregate_id, total);
    tx.query_opt(
        "SELECT last_position FROM projector_checkpoints \
         WHERE projection = $1 AND total_partitions = $2 AND partition_key = $3 FOR UPDATE",
        &[&name, &to_i32(total), &to_i32(key)],
    )
    .map_err(Error::database(format!(
        "locking the checkpoint of partition {key}/{total} of '{name}'"
    )))?;
    Ok((key, total))
}

fn retry_one<P: Projection>(
    client: &mut Client,
    projection: &mut P,
    name: &str,
    aggregate_id: String,
) -> Result<Retried, Error> {
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting to retry parked events"))?;
    let (partition, total) = lock_partition_of(&mut tx, name, &aggregate_id)?;
    let positions: Vec<i64> = tx
        .query(
            "SELECT global_position FROM projection_dead_letters \
             WHERE projection = $1 AND aggregate_id = $2 ORDER BY global_position",
            &[&name, &aggregate_id],
        )
        .map_err(Error::database("reading the parked events"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let events: Vec<Event> = tx
        .query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE global_position = ANY($1) \
                 ORDER BY global_position"
            ),
            &[&positions],
        )
        .map_err(Error::database("reading the parked events from the store"))?
        .iter()
        .map(event_from_row)
        .collect();
    let mut outcome = Retried {
        aggregate_id,
        positions,
        partition,
        total_partitions: total,
        failure: None,
    };
    if outcome.positions.is_empty() {
        // Released (or dropped) by someone else meanwhile.
        return Ok(outcome);
    }
    let failure = if events.len() == outcome.positions.len() {
        apply_in_order(&mut tx, projection, &events, partition, total)
    } else {
        Err((
            None,
            format!(
                "{} of the {} parked events are no longer in the events table",
                outcome.positions.len() - events.len(),
                outcome.positions.len()
            )
            .into(),
        ))
    };
    let (at, source) = match failure {
        Ok(()) => {
            tx.execute(
                "DELETE FROM projection_dead_letters \
                 WHERE projection = $1 AND global_position = ANY($2)",
                &[&name, &outcome.positions],
            )
            .map_err(Error::database("releasing the parked aggregate"))?;
            tx.commit()
                .map_err(Error::database("committing the retried events"))?;
            info!(
                "projection '{name}': applied the {} parked event(s) of aggregate '{}' (global \
                 positions {}), in order; the aggregate is released",
                outcome.positions.len(),
                outcome.aggregate_id,
                describe_positions(&outcome.positions)
            );
            return Ok(outcome);
        }
        Err(failure) => failure,
    };
    drop(tx);
    let event = at.map(|index| &events[index]);
    if let Some(event) = event {
        // The rows stay; the failing one says how it failed this time.
        client
            .execute(
                "UPDATE projection_dead_letters SET attempts = attempts + 1, \
                     last_failed_at = NOW(), error = $3 \
                 WHERE projection = $1 AND global_position = $2",
                &[&name, &event.global_position, &source.to_string()],
            )
            .map_err(Error::database("recording the failed retry"))?;
    }
    let what = match event {
        Some(event) => format!(
            "global position {} (event type '{}')",
            event.global_position, event.event_type
        ),
        None => "its events".to_owned(),
    };
    outcome.failure = Some(Error::ReadModel {
        projection: name.to_owned(),
        action: format!(
            "re-applying the parked events of aggregate '{}' at {what}: nothing was applied and \
             its {} event(s) stay parked; fix the cause and retry, or drop them",
            outcome.aggregate_id,
            outcome.positions.len()
        ),
        source,
    });
    Ok(outcome)
}

/// Applies `events` one by one; the index of the one that failed, and why.
fn apply_in_order<P: Projection>(
    tx: &mut Transaction<'_>,
    projection: &mut P,
    events: &[Event],
    partition: u32,
    total: u32,
) -> Result<(), (Option<usize>, BoxError)> {
    let name = projection.name().to_owned();
    lock_setup(tx, &name).map_err(|e| (None, e.into()))?;
    projection.setup(tx).map_err(|e| (None, e))?;
    let context = Context::new(partition, total.max(1), projection.version());
    apply_each(projection, tx, events, &context, |_| {})
}

/// `5`, `5, 9` or `5, 9, ... 40 (7 events)`.
pub(crate) fn describe_positions(positions: &[i64]) -> String {
    match positions {
        [] => "none".to_owned(),
        [one] => one.to_string(),
        [a, b] => format!("{a}, {b}"),
        [first, .., last] => format!("{first} to {last}, {} events", positions.len()),
    }
}
