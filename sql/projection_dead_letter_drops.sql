-- A record of every `projector dead-letters drop` (projector::drop_parked): which parked events
-- of which aggregate were discarded without being applied, who discarded them and when. Written
-- in the transaction that deletes them from projection_dead_letters; never updated or deleted
-- by the projector. `dead_letters` holds the deleted rows as they were (position, event type,
-- error, attempts, first and last failure); the events themselves stay in `events`, at
-- `positions`.
CREATE TABLE projection_dead_letter_drops (
    id BIGSERIAL PRIMARY KEY,
    projection TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    event_count INT NOT NULL,
    positions BIGINT[] NOT NULL,
    dead_letters JSONB NOT NULL,
    -- The database role (current_user), the client's address as the server saw it (NULL over a
    -- Unix socket), the connection's application_name (`projector pid N` for the command line)
    -- and the OS user the dropping process ran as (USER or LOGNAME, as that process said).
    database_user TEXT NOT NULL,
    client_address TEXT,
    application_name TEXT,
    os_user TEXT,
    dropped_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
);
