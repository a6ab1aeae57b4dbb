//! The runtime under conditions a healthy test run never meets: standbys during a layout
//! switch, lock holders that never write, prepared transactions, poison events in a busy
//! stream, errors that are not a lost connection, and gaps held for long.

use std::process::Child;
use std::time::{Duration, Instant};

use projector::postgres::Transaction;
use projector::projections::AggregateStats;
use projector::{BoxError, Builder, Context, Error, Event, Projection, Runner};

use crate::util::{
    TestSchema, eventually, insert_event as insert, join_within, signal, text, wait_within,
};

const LIMIT: Duration = Duration::from_secs(60);

fn start_live(schema: &TestSchema, keys: std::ops::Range<u32>, total: u32) -> Runner {
    Builder::new(schema.database.clone(), AggregateStats)
        .partitions(keys)
        .total_partitions(total)
        .batch_size(50)
        .poll_interval(Duration::from_millis(50))
        .start()
        .expect("start the projector")
}

#[test]
fn standbys_of_a_replaced_layout_are_fenced_and_never_hold_the_new_layout_back() {
    let schema = TestSchema::migrated("standby_switch");
    let first = schema.seed(60, 4);
    let owner = start_live(&schema, 0..4, 4);
    eventually("the owner to catch up", LIMIT, || {
        schema.stats_applied() == first
    });
    // A standby on every partition: each takes its partition over when the owner lets go.
    let standby = start_live(&schema, 0..4, 4);
    std::thread::sleep(Duration::from_millis(500));

    projector::repartition(&schema.database, "aggregate-stats", 3).expect("re-partition to 3");
    let new = Builder::new(schema.database.clone(), AggregateStats)
        .partitions(0..3)
        .total_partitions(3)
        .poll_interval(Duration::from_millis(50))
        .start()
        .expect("start the new layout");
    let second = schema.seed(60, 2);
    for (name, runner) in [("owner", owner), ("standby", standby)] {
        match join_within(runner, Duration::from_secs(20)) {
            Err(Error::Fenced { total, current, .. }) => {
                assert_eq!((total, current), (4, vec![3]), "{name}")
            }
            other => panic!("expected the {name} of the old layout to be fenced, got {other:?}"),
        }
    }
    eventually(
        "the new layout to apply what came after the switch",
        Duration::from_secs(20),
        || schema.stats_applied() == first + second,
    );
    new.shutdown();
    let summary = join_within(new, Duration::from_secs(10)).expect("the new layout");
    assert_eq!(summary.applied(), second as u64);
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn lock_holders_that_cannot_write_a_position_never_hold_a_rolled_back_one() {
    let schema = TestSchema::migrated("gap_non_writers");
    schema.seed(3, 1);
    let runner = start_live(&schema, 0..2, 2);
    eventually("the backlog", LIMIT, || schema.stats_applied() == 3);

    // What autovacuum, ANALYZE and CREATE INDEX CONCURRENTLY hold (SHARE UPDATE EXCLUSIVE),
    // and what SELECT … FOR SHARE and foreign-key checks hold (ROW SHARE), for the whole test.
    let mut reader = schema.client();
    let mut reading = reader.transaction().expect("begin");
    reading
        .batch_execute(
            "LOCK TABLE events IN SHARE UPDATE EXCLUSIVE MODE; \
             SELECT * FROM events FOR SHARE",
        )
        .expect("lock like a vacuum and a FOR SHARE reader");

    let mut writer = schema.client();
    {
        let mut doomed = writer.transaction().expect("begin");
        insert(&mut doomed, "doomed-1", 1);
        doomed.rollback().expect("roll back");
    }
    insert(&mut writer, "after-1", 1);
    insert(&mut writer, "after-2", 1);
    let started = Instant::now();
    eventually(
        "the events after the rolled-back position",
        Duration::from_secs(10),
        || schema.stats_applied() == 5,
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "held for {:?} by transactions that cannot commit a position",
        started.elapsed()
    );
    reading.rollback().expect("end the reader");
    runner.shutdown();
    join_within(runner, Duration::from_secs(10)).expect("clean stop");
}

#[test]
fn a_position_whose_transaction_is_prepared_while_awaited_is_applied_when_committed() {
    let schema = TestSchema::migrated("gap_prepared");
    let runner = start_live(&schema, 0..1, 1);
    let gid = format!("{}-prepared", schema.name);

    let mut holder = schema.client();
    holder.batch_execute("BEGIN").expect("begin");
    let p = insert(&mut holder, "slow-1", 1);
    let mut other = schema.client();
    let after = insert(&mut other, "fast-1", 1);
    assert_eq!(after, p + 1);
    // The fetcher sees p + 1, and starts watching the transaction that holds p.
    std::thread::sleep(Duration::from_millis(500));
    holder
        .batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
        .expect("prepare the transaction (max_prepared_transactions > 0)");
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        schema.stats_applied(),
        0,
        "nothing is applied past a position a prepared transaction may still commit"
    );

    holder
        .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
        .expect("commit the prepared transaction");
    eventually("both events", Duration::from_secs(10), || {
        schema.stats_applied() == 2
    });
    runner.shutdown();
    join_within(runner, Duration::from_secs(10)).expect("clean stop");
    assert_eq!(
        schema.stats_mismatches(),
        0,
        "the prepared event was applied"
    );
}

/// Starts the binary live on every partition of 2, with debug logs of its own.
fn spawn_projector(schema: &TestSchema) -> Child {
    spawn_with(schema, &[])
}

#[test]
fn the_held_gap_warning_names_the_open_and_the_prepared_transactions_and_what_to_run() {
    let schema = TestSchema::migrated("gap_warning");
    let gid = format!("{}-warned", schema.name);
    let mut open = schema.client();
    open.batch_execute("BEGIN").expect("begin");
    insert(&mut open, "open-1", 1);
    let open_pid: i32 = open
        .query_one("SELECT pg_backend_pid()", &[])
        .expect("pid")
        .get(0);
    let mut prepared = schema.client();
    prepared.batch_execute("BEGIN").expect("begin");
    insert(&mut prepared, "prepared-1", 1);
    prepared
        .batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
        .expect("prepare");
    let mut other = schema.client();
    insert(&mut other, "fast-1", 1);

    let child = spawn_projector(&schema);
    std::thread::sleep(Duration::from_secs(12));
    signal(&child, "TERM");
    let output = wait_within(child, Duration::from_secs(10));
    let _ = other.batch_execute(&format!("ROLLBACK PREPARED '{gid}'"));
    open.batch_execute("ROLLBACK").expect("roll back");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let warning = stderr
        .lines()
        .find(|line| line.contains("waiting") && line.contains("missing global position"))
        .unwrap_or_else(|| panic!("no held-gap warning in:\n{stderr}"));
    assert!(
        warning.contains(&format!("pid {open_pid}")),
        "names the open transaction's pid: {warning}"
    );
    assert!(
        warning.contains(&format!("pg_terminate_backend({open_pid})")),
        "says what to run, with the pid filled in: {warning}"
    );
    assert!(
        warning.contains(&format!("prepared transaction '{gid}'")),
        "names the prepared transaction: {warning}"
    );
    assert!(
        warning.contains(&format!("ROLLBACK PREPARED '{gid}'")),
        "says how to end the prepared transaction: {warning}"
    );
    assert!(!warning.contains("<pid>"), "{warning}");
}

#[test]
fn a_poison_event_in_a_busy_stream_that_then_goes_quiet_stops_the_process_at_once() {
    let schema = TestSchema::migrated("poison_burst");
    let mut client = schema.client();
    // Version 2 with no version 1: aggregate-stats refuses it, on every attempt.
    let poison = insert(&mut client, "poison-1", 2);
    schema.seed(200, 100);

    let started = Instant::now();
    let child = spawn_projector(&schema);
    let output = wait_within(child, Duration::from_secs(40));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the process ran on for {:?} after the failure:\n{stderr}",
        started.elapsed()
    );
    let error = stderr
        .lines()
        .find(|line| line.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in:\n{stderr}"));
    assert!(
        error.contains(&format!("global position {poison}")) && error.contains("poison-1"),
        "{error}"
    );
}

/// Runs `query_one` on a query that returns no row: the driver's row-count error, which has no
/// SQLSTATE, for one event.
#[derive(Clone)]
struct ExpectsARow;

impl Projection for ExpectsARow {
    fn name(&self) -> &str {
        "expects-a-row"
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), BoxError> {
        if event.aggregate_id == "thing-3" {
            tx.query_one("SELECT 1 WHERE false", &[])?;
        }
        Ok(())
    }
}

#[test]
fn an_error_without_a_sqlstate_is_not_taken_for_a_lost_connection() {
    let schema = TestSchema::migrated("no_sqlstate");
    schema.seed(5, 2);
    let runner = Builder::new(schema.database.clone(), ExpectsARow)
        .exit_when_caught_up(true)
        .start()
        .expect("start");
    match join_within(runner, Duration::from_secs(20)) {
        Err(Error::Projection {
            aggregate_id,
            attempts,
            ..
        }) => assert_eq!((aggregate_id.as_str(), attempts), ("thing-3", 3)),
        other => panic!("expected the projection to fail on thing-3, got {other:?}"),
    }
}

#[test]
fn a_held_gap_is_watched_without_reading_the_batch_above_it_again() {
    let schema = TestSchema::migrated("gap_bounded");
    let runner = start_live(&schema, 0..1, 1);
    let mut holder = schema.client();
    let mut held = holder.transaction().expect("begin");
    insert(&mut held, "slow-1", 1);
    schema.seed(1_000, 5);
    // Let the fetcher reach the gap and settle.
    std::thread::sleep(Duration::from_secs(1));
    let rows_read = || {
        schema.count(
            "SELECT (COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0))::bigint \
             FROM pg_stat_user_tables WHERE relid = 'events'::regclass",
        )
    };
    let before = rows_read();
    std::thread::sleep(Duration::from_secs(3));
    let during = rows_read() - before;
    held.rollback().expect("roll back");
    eventually("the events above the gap", LIMIT, || {
        schema.stats_applied() == 5_000
    });
    runner.shutdown();
    join_within(runner, Duration::from_secs(10)).expect("clean stop");
    assert!(
        during < 1_000,
        "{during} rows read in 3 s while waiting at the gap"
    );
}

#[test]
fn a_batch_size_beyond_the_limit_is_refused_naming_the_flag() {
    let schema = TestSchema::migrated("batch_limit");
    let output = crate::util::run_within(
        schema.projector(&[
            "--partition-key",
            "0",
            "--total-partitions",
            "1",
            "--batch-size",
            "10000000",
        ]),
        Duration::from_secs(20),
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value '10000000' for --batch-size"),
        "{stderr}"
    );
}

#[test]
fn a_give_up_limit_that_is_not_a_duration_is_refused_naming_the_flag() {
    let schema = TestSchema::migrated("give_up_flag");
    for bad in ["0", "5x", "-3m", "m"] {
        let output = crate::util::run_within(
            schema.projector(&[
                "--partition-key",
                "0",
                "--total-partitions",
                "1",
                "--give-up-after",
                bad,
            ]),
            Duration::from_secs(20),
        );
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid value '{bad}' for --give-up-after")),
            "{stderr}"
        );
    }
}

/// The binary live on both partitions of 2, with a short session timeout.
fn spawn_with_session_timeout(schema: &TestSchema, seconds: &str) -> Child {
    spawn_with(schema, &["--session-timeout-secs", seconds])
}

/// The binary live on both partitions of 2, with `extra` flags.
fn spawn_with(schema: &TestSchema, extra: &[&str]) -> Child {
    schema
        .aggregate_stats("0-1", "2", extra)
        .spawn()
        .expect("start the projector")
}

#[test]
fn a_paused_owner_loses_its_partitions_within_the_session_timeout_and_applies_nothing_twice() {
    let schema = TestSchema::migrated("paused_owner");
    let first = schema.seed(50, 4);
    let owner = spawn_with_session_timeout(&schema, "5");
    eventually("the owner to catch up", LIMIT, || {
        schema.stats_applied() == first
    });
    let standby = spawn_with_session_timeout(&schema, "5");
    std::thread::sleep(Duration::from_secs(1));

    signal(&owner, "STOP");
    let paused = Instant::now();
    let second = schema.seed_prefixed("during", 50, 2);
    eventually(
        "the standby to take over from the paused owner",
        Duration::from_secs(30),
        || schema.stats_applied() == first + second,
    );
    let took = paused.elapsed();

    signal(&owner, "CONT");
    let third = schema.seed_prefixed("after", 50, 1);
    eventually("the events after the owner came back", LIMIT, || {
        schema.stats_applied() == first + second + third
    });
    std::thread::sleep(Duration::from_secs(2));
    for child in [&owner, &standby] {
        signal(child, "TERM");
    }
    let owner = wait_within(owner, Duration::from_secs(20));
    let standby = wait_within(standby, Duration::from_secs(20));
    assert_eq!(
        owner.status.code(),
        Some(0),
        "the owner, back from its pause: {}",
        text(&owner.stderr)
    );
    assert_eq!(standby.status.code(), Some(0), "{}", text(&standby.stderr));
    assert_eq!(schema.stats_applied(), first + second + third);
    assert_eq!(schema.stats_mismatches(), 0, "nothing applied twice");
    assert!(
        took < Duration::from_secs(5 + 5),
        "the standby took {took:?} with a 5 s session timeout"
    );
}

#[test]
fn a_pool_smaller_than_the_owned_partitions_is_refused_saying_how_large_it_must_be() {
    let schema = TestSchema::migrated("small_pool");
    let error = Builder::new(schema.database.clone(), AggregateStats)
        .partitions(0..4)
        .total_partitions(4)
        .pool(schema.database.pool(2))
        .start()
        .expect_err("two connections cannot serve four workers");
    assert!(error.is_configuration());
    assert!(
        error
            .to_string()
            .contains("give a pool of at least 4 connection(s)"),
        "{error}"
    );
    // Enough connections for the workers: it runs.
    let summary = Builder::new(schema.database.clone(), AggregateStats)
        .partitions(0..4)
        .total_partitions(4)
        .pool(schema.database.pool(4))
        .exit_when_caught_up(true)
        .start()
        .and_then(|runner| runner.join())
        .expect("a pool of one connection per partition");
    assert_eq!(summary.projections[0].partitions.len(), 4);
}

/// `aggregate-stats`, sleeping 60 ms on every event of partition 0 (of the runner's count).
#[derive(Clone)]
struct SlowOnPartitionZero;

impl Projection for SlowOnPartitionZero {
    fn name(&self) -> &str {
        "slow-on-zero"
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        AggregateStats.setup(tx)
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError> {
        if context.partition == 0 {
            tx.execute("SELECT pg_sleep(0.06)", &[])?;
        }
        AggregateStats.apply(tx, event, context)
    }
}

fn slow_settings() -> projector::Settings {
    let mut settings = projector::Settings::default();
    settings.batch_size = 50;
    settings.min_events_per_batch = 10;
    settings.straggler_after = Duration::from_millis(300);
    settings.poll_interval = Duration::from_millis(50);
    settings
}

fn checkpoints(schema: &TestSchema, projection: &str) -> Vec<i64> {
    projector::status(&mut schema.client(), Some(projection))
        .expect("status")
        .iter()
        .map(|row| row.last_position)
        .collect()
}

#[test]
fn a_slow_partition_does_not_hold_the_others_back_and_catches_up_exactly() {
    let schema = TestSchema::migrated("straggler");
    let events = schema.seed(200, 5);
    let runner = Builder::new(schema.database.clone(), SlowOnPartitionZero)
        .settings(slow_settings())
        .partitions(0..2)
        .total_partitions(2)
        .start()
        .expect("start");
    // Partition 0 needs 30 s for its 500 events; partition 1 must not wait for it.
    let started = Instant::now();
    let mut seen = checkpoints(&schema, "slow-on-zero");
    while seen.get(1) != Some(&events) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "partition 1 did not reach the head ({events}) in 20 s: checkpoints {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
        seen = checkpoints(&schema, "slow-on-zero");
    }
    assert!(seen[0] < events, "partition 0 is still behind: {seen:?}");
    // Appends while partition 0 catches up on its own reach both partitions once.
    let more = schema.seed_prefixed("later", 20, 2);
    eventually("every event", LIMIT, || {
        schema.stats_applied() == events + more
    });
    runner.shutdown();
    join_within(runner, Duration::from_secs(20)).expect("clean stop");
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn a_slow_partition_still_applies_everything_before_a_caught_up_runner_exits() {
    let schema = TestSchema::migrated("straggler_exit");
    let events = schema.seed(40, 5);
    let runner = Builder::new(schema.database.clone(), SlowOnPartitionZero)
        .settings(slow_settings())
        .partitions(0..2)
        .total_partitions(2)
        .exit_when_caught_up(true)
        .start()
        .expect("start");
    let summary = join_within(runner, LIMIT).expect("caught up");
    assert_eq!(summary.applied(), events as u64);
    assert_eq!(schema.stats_mismatches(), 0);
}
