-- Changing the number of partitions, exactly.
--
-- `generation` says which claim of a layout created a checkpoint row: every re-partitioning
-- (and every start after a reset) writes its rows with a new one. A worker locks its row only
-- with the generation it started under, so a process of a replaced layout finds nothing and
-- stops, even if the same partition count came back in the meantime.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema()
            AND table_name = 'projection_checkpoints' AND column_name = 'generation'
    ) THEN
        ALTER TABLE projection_checkpoints ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
    END IF;
END
$$;

-- While a projection catches up after a change of layout: per earlier layout, the checkpoint
-- of each of its partitions when it was replaced. An event counts as applied under the earlier
-- layouts when its position is at or below the entry of its partition under one of them; the
-- rows go once every partition of the current layout has passed all of those positions.
CREATE TABLE IF NOT EXISTS projection_priors (
    projection TEXT NOT NULL,
    total_partitions INT NOT NULL CHECK (total_partitions > 0),
    prior_total INT NOT NULL CHECK (prior_total > 0),
    prior_positions BIGINT[] NOT NULL CHECK (cardinality(prior_positions) = prior_total),
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (projection, total_partitions, prior_total)
);
