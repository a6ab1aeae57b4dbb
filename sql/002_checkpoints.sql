-- One row per projection, partition layout and partition: the last global position whose
-- events (of that partition) are applied. Written in the same transaction as the read model.
CREATE TABLE IF NOT EXISTS projection_checkpoints (
    projection TEXT NOT NULL,
    total_partitions INT NOT NULL CHECK (total_partitions > 0),
    partition_key INT NOT NULL CHECK (partition_key >= 0 AND partition_key < total_partitions),
    last_position BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (projection, total_partitions, partition_key)
);
