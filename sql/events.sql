-- The event store, column for column compatible with pupsourcing's PostgreSQL store,
-- so that a store written by either can be read by the other.
CREATE TABLE events (
    global_position BIGSERIAL PRIMARY KEY,
    bounded_context TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    aggregate_version BIGINT NOT NULL,
    event_id UUID NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    event_version INT NOT NULL DEFAULT 1,
    payload BYTEA NOT NULL,
    trace_id TEXT,
    correlation_id TEXT,
    causation_id TEXT,
    metadata JSONB,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    UNIQUE (bounded_context, aggregate_type, aggregate_id, aggregate_version)
);
-- Serve projections scoped to event types or aggregate types (the read filters on the type
-- within a range of positions).
CREATE INDEX events_event_type_position ON events (event_type, global_position);
CREATE INDEX events_aggregate_type_position ON events (aggregate_type, global_position);
