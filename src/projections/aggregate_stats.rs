//! `aggregate-stats`: per aggregate, how many events were applied, checking order as it goes.

use std::collections::HashMap;

use postgres::Transaction;
use postgres::types::{ToSql, Type};

use crate::error::BoxError;
use crate::event::Event;
use crate::projections::projection::{Context, Projection};
use crate::projections::queued::QueuedWrite;

/// One row per aggregate in `aggregate_stats`: events applied, last version, last global
/// position. An event whose version is not the last applied version plus one fails its batch,
/// so the table checks by itself that every event was applied once, in order.
///
/// Writes one upsert per event, in order, as a queued write ([`Context::queue`]): the worker
/// sends a transaction's upserts together, as many executions as the most events one
/// aggregate has in it.
#[derive(Debug, Clone, Copy, Default)]
pub struct AggregateStats;

/// The same read model as [`AggregateStats`], in its own table `aggregate_stats_batch`, written
/// set-based: one statement per batch, whatever its size. The two can run side by side.
#[derive(Debug, Clone, Copy, Default)]
pub struct AggregateStatsBatch;

/// The table of [`AggregateStats`].
const TABLE: &str = "aggregate_stats";
/// The table of [`AggregateStatsBatch`].
const BATCH_TABLE: &str = "aggregate_stats_batch";

/// Creates table `{table}`. Each row is updated once per event of its aggregate; half of
/// each page is left free so that an update can put its new row version on the same page (a
/// HOT update: no new index entry, and the old version reclaimed by page pruning without
/// waiting for VACUUM). See docs/benchmarks.md ("Room on the read model's pages").
const CREATE: &str = "CREATE TABLE IF NOT EXISTS {table} (
    bounded_context TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    events_applied BIGINT NOT NULL,
    last_version BIGINT NOT NULL,
    last_global_position BIGINT NOT NULL,
    PRIMARY KEY (bounded_context, aggregate_type, aggregate_id)
) WITH (fillfactor = 50)";

/// Adds the queued events, each updating its aggregate only when it follows the last applied
/// version (or creating it at version 1); the worker sends the events of one aggregate in
/// order, one per execution, and fails when a row is not written.
const UPSERT_QUEUED: QueuedWrite = QueuedWrite::new(
    "INSERT INTO aggregate_stats AS s \
     SELECT r.c, r.t, r.a, 1, r.v, r.p \
     FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[]) AS r(c, t, a, v, p) \
     WHERE r.v = 1 OR EXISTS (SELECT FROM aggregate_stats e \
         WHERE (e.bounded_context, e.aggregate_type, e.aggregate_id) = (r.c, r.t, r.a)) \
     ON CONFLICT (bounded_context, aggregate_type, aggregate_id) DO UPDATE \
         SET events_applied = s.events_applied + 1, \
             last_version = EXCLUDED.last_version, \
             last_global_position = EXCLUDED.last_global_position \
         WHERE s.last_version + 1 = EXCLUDED.last_version",
    &[
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::INT8_ARRAY,
        Type::INT8_ARRAY,
    ],
)
.keyed_by(3)
.every_row_writes("the event does not follow the last applied version of its aggregate");

/// Adds one event; updates only when the event follows the last applied version.
const UPSERT_ONE: &str = "INSERT INTO {table} AS s VALUES ($1, $2, $3, 1, $4, $5) \
    ON CONFLICT (bounded_context, aggregate_type, aggregate_id) DO UPDATE \
        SET events_applied = s.events_applied + 1, \
            last_version = EXCLUDED.last_version, \
            last_global_position = EXCLUDED.last_global_position \
        WHERE s.last_version + 1 = EXCLUDED.last_version \
    RETURNING s.events_applied";

/// Adds a run of consecutive versions per aggregate; updates only when each run follows the
/// last applied version, and returns the rows written.
const UPSERT_RUNS: &str = "INSERT INTO {table} AS s \
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[]) \
    ON CONFLICT (bounded_context, aggregate_type, aggregate_id) DO UPDATE \
        SET events_applied = s.events_applied + EXCLUDED.events_applied, \
            last_version = EXCLUDED.last_version, \
            last_global_position = EXCLUDED.last_global_position \
        WHERE s.last_version = EXCLUDED.last_version - EXCLUDED.events_applied \
    RETURNING s.events_applied, s.last_version";

/// `sql` for the read model in `table`.
fn on(sql: &str, table: &str) -> String {
    sql.replace("{table}", table)
}

/// Adds one event to `table`, checking it follows the last applied version.
fn upsert_one(tx: &mut Transaction<'_>, table: &str, event: &Event) -> Result<(), BoxError> {
    let row = tx.query_opt(&on(UPSERT_ONE, table), &params(event))?;
    check_one(event, row.map(|row| row.get(0)))
}

fn params(event: &Event) -> [&(dyn ToSql + Sync); 5] {
    [
        &event.bounded_context,
        &event.aggregate_type,
        &event.aggregate_id,
        &event.aggregate_version,
        &event.global_position,
    ]
}

fn out_of_order(event: &Event) -> BoxError {
    format!(
        "event version {} of {}/{} does not follow the last applied version",
        event.aggregate_version, event.aggregate_type, event.aggregate_id
    )
    .into()
}

/// Checks what [`UPSERT_ONE`] returned: a row, and for a new aggregate, version 1.
fn check_one(event: &Event, events_applied: Option<i64>) -> Result<(), BoxError> {
    match events_applied {
        Some(n) if n > 1 || event.aggregate_version == 1 => Ok(()),
        _ => Err(out_of_order(event)),
    }
}

impl Projection for AggregateStats {
    fn name(&self) -> &str {
        "aggregate-stats"
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(&on(CREATE, TABLE))?;
        Ok(())
    }

    fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(&format!("DELETE FROM {TABLE}"))?;
        Ok(())
    }

    fn apply(
        &mut self,
        _: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError> {
        context.queue(&UPSERT_QUEUED, &params(event))
    }
}

impl Projection for AggregateStatsBatch {
    fn name(&self) -> &str {
        "aggregate-stats-batch"
    }

    /// Each aggregate is written once per transaction: larger ones while catching up mean
    /// fewer writes of the same rows.
    fn events_per_transaction(&self) -> Option<usize> {
        Some(20_000)
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(&on(CREATE, BATCH_TABLE))?;
        Ok(())
    }

    fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(&format!("DELETE FROM {BATCH_TABLE}"))?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), BoxError> {
        upsert_one(tx, BATCH_TABLE, event)
    }

    fn apply_batch(
        &mut self,
        tx: &mut Transaction<'_>,
        events: &[Event],
        _: &Context,
    ) -> Result<(), BoxError> {
        // One run per aggregate: how many events, the last version and position. Versions must
        // follow each other within the batch; the statement checks the join to what is stored.
        let mut runs: HashMap<(&str, &str, &str), (i64, i64, i64)> = HashMap::new();
        let mut order = Vec::new();
        for event in events {
            let key = (
                event.bounded_context.as_str(),
                event.aggregate_type.as_str(),
                event.aggregate_id.as_str(),
            );
            match runs.get_mut(&key) {
                Some(run) if run.1 + 1 == event.aggregate_version => {
                    *run = (run.0 + 1, event.aggregate_version, event.global_position);
                }
                Some(_) => return Err(out_of_order(event)),
                None => {
                    runs.insert(key, (1, event.aggregate_version, event.global_position));
                    order.push(key);
                }
            }
        }
        let mut columns: (Vec<&str>, Vec<&str>, Vec<&str>) = Default::default();
        let mut figures: (Vec<i64>, Vec<i64>, Vec<i64>) = Default::default();
        for key in &order {
            let (applied, version, position) = runs[key];
            columns.0.push(key.0);
            columns.1.push(key.1);
            columns.2.push(key.2);
            figures.0.push(applied);
            figures.1.push(version);
            figures.2.push(position);
        }
        let rows = tx.query(
            &on(UPSERT_RUNS, BATCH_TABLE),
            &[
                &columns.0, &columns.1, &columns.2, &figures.0, &figures.1, &figures.2,
            ],
        )?;
        // Every run must have been written, and every aggregate must count as many events as
        // its last version (so a new one started at version 1).
        let written_all = rows.len() == order.len();
        let all_start_right = rows.iter().all(|row| {
            let (applied, version): (i64, i64) = (row.get(0), row.get(1));
            applied == version
        });
        if written_all && all_start_right {
            Ok(())
        } else {
            Err("a batch does not follow the last applied versions".into())
        }
    }
}
