-- Events a projection parked instead of stopping (`--on-poison park`): the event that kept
-- failing, and every later event of the same aggregate (aggregate_id) behind it, in position
-- order. Written in the transaction that moves the partition's checkpoint past them; an
-- aggregate with rows here is parked: its events are recorded here rather than applied, until
-- `projector dead-letters retry` applies them (and deletes the rows) or `drop` discards them.
-- Keyed by projection and position, not by partition, so that a re-partitioning keeps them.
CREATE TABLE projection_dead_letters (
    projection TEXT NOT NULL,
    global_position BIGINT NOT NULL,
    bounded_context TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts INT NOT NULL,
    first_failed_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    last_failed_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (projection, global_position)
);
CREATE INDEX projection_dead_letters_aggregate
    ON projection_dead_letters (projection, aggregate_id, global_position);
