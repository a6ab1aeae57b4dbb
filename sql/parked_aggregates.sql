-- The parked aggregates of projection $1 (see projection_dead_letters.sql).
SELECT DISTINCT aggregate_id FROM projection_dead_letters WHERE projection = $1
