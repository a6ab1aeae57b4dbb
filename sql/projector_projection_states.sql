-- What a projection is, when it is not simply running or stopped: 'failed' (it stopped on an
-- event, was fenced by a re-partitioning or a reset, tripped the park storm breaker, or gave up
-- on the database; the next successful start of its partitions clears it) or 'paused'
-- (`projector pause`; running processes hold their partitions without applying until
-- `projector resume` deletes the row). A projection may be both.
CREATE TABLE projector_projection_states (
    projection TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    partition_key INT,
    total_partitions INT,
    position BIGINT,
    process TEXT,
    changed_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (projection, state)
);
