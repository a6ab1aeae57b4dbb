-- One row per projection, partition layout and partition: the last global position whose
-- events (of that partition) are applied. Written in the same transaction as the read model.
--
-- `generation` says which claim of a layout created the row: every re-partitioning (and every
-- start after a reset) writes its rows with a new one. A worker locks its row only with the
-- generation it started under, so a process of a replaced layout finds nothing and stops, even
-- if the same partition count came back in the meantime.
CREATE TABLE projector_checkpoints (
    projection TEXT NOT NULL,
    total_partitions INT NOT NULL CHECK (total_partitions > 0),
    partition_key INT NOT NULL CHECK (partition_key >= 0 AND partition_key < total_partitions),
    last_position BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    generation BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (projection, total_partitions, partition_key)
);
