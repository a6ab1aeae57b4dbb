-- The parked aggregates of projection $1 (see projection_dead_letters.sql), read by every
-- worker transaction. One probe of the index projection_dead_letters_aggregate per parked
-- aggregate (each finds the next aggregate id after the one before): the cost grows with the
-- parked aggregates, never with the number of events parked behind them.
WITH RECURSIVE parked (aggregate_id) AS (
    (SELECT aggregate_id FROM projection_dead_letters WHERE projection = $1
     ORDER BY aggregate_id LIMIT 1)
    UNION ALL
    SELECT (SELECT next.aggregate_id FROM projection_dead_letters next
            WHERE next.projection = $1 AND next.aggregate_id > parked.aggregate_id
            ORDER BY next.aggregate_id LIMIT 1)
    FROM parked WHERE parked.aggregate_id IS NOT NULL
)
SELECT aggregate_id FROM parked WHERE aggregate_id IS NOT NULL
