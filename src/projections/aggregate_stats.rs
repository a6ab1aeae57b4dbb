//! `aggregate-stats`: per aggregate, how many events were applied, checking order as it goes.

use postgres::Transaction;

use crate::error::BoxError;
use crate::event::Event;
use crate::projection::{Context, Projection};

/// One row per aggregate in `aggregate_stats`: events applied, last version, last global
/// position. An event whose version is not the last applied version plus one fails its batch,
/// so the table checks by itself that every event was applied once, in order.
#[derive(Debug, Clone, Copy, Default)]
pub struct AggregateStats;

impl Projection for AggregateStats {
    fn name(&self) -> &str {
        "aggregate-stats"
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS aggregate_stats (
                 bounded_context TEXT NOT NULL,
                 aggregate_type TEXT NOT NULL,
                 aggregate_id TEXT NOT NULL,
                 events_applied BIGINT NOT NULL,
                 last_version BIGINT NOT NULL,
                 last_global_position BIGINT NOT NULL,
                 PRIMARY KEY (bounded_context, aggregate_type, aggregate_id)
             );",
        )?;
        Ok(())
    }

    fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute("DELETE FROM aggregate_stats")?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        _context: &Context,
    ) -> Result<(), BoxError> {
        let row = tx.query_opt(
            "INSERT INTO aggregate_stats AS s VALUES ($1, $2, $3, 1, $4, $5) \
             ON CONFLICT (bounded_context, aggregate_type, aggregate_id) DO UPDATE \
                 SET events_applied = s.events_applied + 1, \
                     last_version = EXCLUDED.last_version, \
                     last_global_position = EXCLUDED.last_global_position \
                 WHERE s.last_version + 1 = EXCLUDED.last_version \
             RETURNING s.events_applied",
            &[
                &event.bounded_context,
                &event.aggregate_type,
                &event.aggregate_id,
                &event.aggregate_version,
                &event.global_position,
            ],
        )?;
        let first_ok = event.aggregate_version == 1;
        match row {
            Some(row) if row.get::<_, i64>(0) > 1 || first_ok => Ok(()),
            _ => Err(format!(
                "event version {} of {}/{} does not follow the last applied version",
                event.aggregate_version, event.aggregate_type, event.aggregate_id
            )
            .into()),
        }
    }
}
