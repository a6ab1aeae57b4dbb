//! P3 plain: the `aggregate-stats` read model written the way most projections are, one
//! statement per event (no queued writes), run in the benchmark's process through the library.

use postgres::Transaction;
use projector::{BoxError, Context, Event, Projection};

/// P3 plain's projection name (its table: `aggregate_stats_plain`).
pub(crate) const PLAIN_PROJECTION: &str = "aggregate-stats-plain";

/// The `aggregate-stats` read model in table `aggregate_stats_plain`, one upsert per event,
/// sent at once: the path of a projection that does not queue its writes (P3 plain).
#[derive(Clone)]
pub(crate) struct PlainAggregateStats;

impl Projection for PlainAggregateStats {
    fn name(&self) -> &str {
        PLAIN_PROJECTION
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS aggregate_stats_plain (
                 bounded_context TEXT NOT NULL,
                 aggregate_type TEXT NOT NULL,
                 aggregate_id TEXT NOT NULL,
                 events_applied BIGINT NOT NULL,
                 last_version BIGINT NOT NULL,
                 last_global_position BIGINT NOT NULL,
                 PRIMARY KEY (bounded_context, aggregate_type, aggregate_id)
             ) WITH (fillfactor = 50)",
        )?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), BoxError> {
        let written = tx.execute(
            "INSERT INTO aggregate_stats_plain AS s VALUES ($1, $2, $3, 1, $4, $5) \
             ON CONFLICT (bounded_context, aggregate_type, aggregate_id) DO UPDATE \
                 SET events_applied = s.events_applied + 1, \
                     last_version = EXCLUDED.last_version, \
                     last_global_position = EXCLUDED.last_global_position \
                 WHERE s.last_version + 1 = EXCLUDED.last_version",
            &[
                &event.bounded_context,
                &event.aggregate_type,
                &event.aggregate_id,
                &event.aggregate_version,
                &event.global_position,
            ],
        )?;
        if written == 1 {
            Ok(())
        } else {
            Err(format!("event {} is out of order", event.global_position).into())
        }
    }
}
