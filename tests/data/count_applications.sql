-- projection: applications
-- A projection that counts how many times each event was applied, for tests that check
-- exactly which events a command makes the projector apply again (tests/integration/rewind.rs).
-- setup
CREATE TABLE IF NOT EXISTS applications (
    global_position BIGINT PRIMARY KEY,
    aggregate_id TEXT NOT NULL,
    times INT NOT NULL
);
-- apply
INSERT INTO applications (global_position, aggregate_id, times)
SELECT global_position, aggregate_id, 1 FROM batch
ON CONFLICT (global_position) DO UPDATE SET times = applications.times + 1;
-- reset
TRUNCATE applications;
