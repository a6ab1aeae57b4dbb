-- projection: running-totals
-- scope: event_types = Deposited, Withdrawn
--
-- A balance per account, and the balance after each movement. Payloads are JSON such as
-- {"amount": 12.5}; a payload that is not JSON (payload_json is NULL) counts as 0.
--
-- One batch may hold several events of one account: each event's balance is the stored
-- balance plus the sum of the batch's movements of that account up to it, in global position
-- order (a window function), and the stored balance becomes the one after its last event.

-- setup
CREATE TABLE IF NOT EXISTS running_totals (
    aggregate_id TEXT PRIMARY KEY,
    balance NUMERIC NOT NULL,
    movements BIGINT NOT NULL,
    last_global_position BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS running_total_history (
    global_position BIGINT PRIMARY KEY,
    aggregate_id TEXT NOT NULL,
    amount NUMERIC NOT NULL,
    balance_after NUMERIC NOT NULL
);

-- apply
WITH movements AS (
    SELECT global_position, aggregate_id,
        CASE event_type WHEN 'Withdrawn' THEN -1 ELSE 1 END
            * COALESCE((payload_json ->> 'amount')::numeric, 0) AS amount
    FROM batch
), steps AS (
    SELECT m.global_position, m.aggregate_id, m.amount,
        COALESCE(t.balance, 0) + SUM(m.amount) OVER upto AS balance_after,
        COUNT(*) OVER upto AS movements,
        ROW_NUMBER() OVER (PARTITION BY m.aggregate_id ORDER BY m.global_position DESC) AS from_last
    FROM movements m
    LEFT JOIN running_totals t USING (aggregate_id)
    WINDOW upto AS (PARTITION BY m.aggregate_id ORDER BY m.global_position)
), history AS (
    INSERT INTO running_total_history
    SELECT global_position, aggregate_id, amount, balance_after FROM steps
)
INSERT INTO running_totals AS t
SELECT aggregate_id, balance_after, movements, global_position FROM steps WHERE from_last = 1
ON CONFLICT (aggregate_id) DO UPDATE
    SET balance = EXCLUDED.balance,
        movements = t.movements + EXCLUDED.movements,
        last_global_position = EXCLUDED.last_global_position;

-- reset
TRUNCATE running_totals, running_total_history;
