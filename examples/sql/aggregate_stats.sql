-- projection: aggregate-stats-sql
--
-- The `aggregate-stats` read model written in SQL alone, in its own table: per aggregate, how
-- many events were applied, the last version and the last global position. Set-based: one
-- statement per batch, whatever its size. A batch whose versions of an aggregate do not follow
-- the last applied version fails (so the table checks by itself that every event was applied
-- once, in order). Run it with `projector --projection-file examples/sql/aggregate_stats.sql`.

-- setup
CREATE TABLE IF NOT EXISTS aggregate_stats_sql (
    bounded_context TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    events_applied BIGINT NOT NULL,
    last_version BIGINT NOT NULL,
    last_global_position BIGINT NOT NULL,
    PRIMARY KEY (bounded_context, aggregate_type, aggregate_id)
-- Room on each page for the next version of its rows: every batch updates them, and an update
-- that fits on its page skips the index (a HOT update). About a quarter faster here.
) WITH (fillfactor = 50);
CREATE OR REPLACE FUNCTION aggregate_stats_sql_out_of_order(
    aggregate_type TEXT, aggregate_id TEXT, version BIGINT
) RETURNS BIGINT LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event version % of %/% does not follow the last applied version',
        version, aggregate_type, aggregate_id;
END
$$;

-- apply
-- One run per aggregate: its events in this batch. Versions are unique per aggregate, so a run
-- is whole when it counts last - first + 1 events, and it follows what is stored when its first
-- version is the stored last version + 1 (1 for a new aggregate).
WITH runs AS (
    SELECT bounded_context, aggregate_type, aggregate_id, COUNT(*) AS n,
        MIN(aggregate_version) AS first_version, MAX(aggregate_version) AS last_version,
        MAX(global_position) AS last_global_position
    FROM batch
    GROUP BY bounded_context, aggregate_type, aggregate_id
)
INSERT INTO aggregate_stats_sql AS s
SELECT r.bounded_context, r.aggregate_type, r.aggregate_id, r.n,
    CASE WHEN r.last_version - r.first_version + 1 = r.n
            AND r.first_version = COALESCE(stored.last_version, 0) + 1
        THEN r.last_version
        ELSE aggregate_stats_sql_out_of_order(r.aggregate_type, r.aggregate_id, r.first_version)
    END,
    r.last_global_position
FROM runs r
LEFT JOIN aggregate_stats_sql stored USING (bounded_context, aggregate_type, aggregate_id)
ON CONFLICT (bounded_context, aggregate_type, aggregate_id) DO UPDATE
    SET events_applied = s.events_applied + EXCLUDED.events_applied,
        last_version = EXCLUDED.last_version,
        last_global_position = EXCLUDED.last_global_position;

-- reset
TRUNCATE aggregate_stats_sql;
