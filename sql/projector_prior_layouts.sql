-- While a projection catches up after a change of layout: per earlier layout, the checkpoint
-- of each of its partitions when it was replaced. An event counts as applied under the earlier
-- layouts when its position is at or below the entry of its partition under one of them; the
-- rows go once every partition of the current layout has passed all of those positions.
CREATE TABLE projector_prior_layouts (
    projection TEXT NOT NULL,
    total_partitions INT NOT NULL CHECK (total_partitions > 0),
    prior_total INT NOT NULL CHECK (prior_total > 0),
    prior_positions BIGINT[] NOT NULL CHECK (cardinality(prior_positions) = prior_total),
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (projection, total_partitions, prior_total)
);
