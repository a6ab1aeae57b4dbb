//! Catch-up reads from a physical streaming replica (`--read-replica-url`): far from the head
//! the fetcher reads below a position settled on the primary and replayed on the replica;
//! a replica that lags, stops replaying or is down is left for the primary, and nothing is
//! skipped or doubled either way. Each test starts its own primary and `pg_basebackup -R`
//! replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use projector::postgres::{Client, NoTls, Transaction};
use projector::projections::AggregateStats;
use projector::{BoxError, Builder, Context, Database, Event, Projection, Runner, Settings};

use crate::cluster::Cluster;
use crate::util::{TestSchema, eventually, insert_event, join_within, run_within, text};

/// A primary with a schema of its own and a streaming replica of it.
struct Pair {
    schema: TestSchema,
    replica: Cluster,
    // Dropped last: the replica streams from it.
    _primary: Cluster,
}

impl Pair {
    /// A primary, the projector's tables in a schema on it, and a replica taken after.
    fn start(test: &str) -> Pair {
        let primary = Cluster::start(test);
        let schema = TestSchema::migrated_on(&primary.url(), test);
        let replica = Cluster::replica_of(&primary, test);
        Pair {
            schema,
            replica,
            _primary: primary,
        }
    }

    /// The replica as the runner is given it (the schema is the primary's).
    fn replica_database(&self) -> Database {
        Database::new(&self.replica.url()).expect("the replica's URL is valid")
    }

    fn replica_client(&self) -> Client {
        Client::connect(&self.replica.url(), NoTls).expect("connect to the replica")
    }

    /// Waits until the replica has replayed everything the primary has written so far.
    fn replica_replays_all(&self) {
        let lsn: String = self
            .schema
            .client()
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .expect("read the primary's LSN")
            .get(0);
        let mut replica = self.replica_client();
        eventually("the replica to replay the primary's WAL", WAIT, || {
            replica
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .expect("read the replica's replay LSN")
                .get(0)
        });
    }
}

const WAIT: Duration = Duration::from_secs(60);

/// Events the runner has read from the replica, from its metrics.
fn read_from_replica(runner_metrics: &projector::Metrics) -> u64 {
    counter(runner_metrics, "projector_replica_events_read_total")
}

/// The value of the unlabelled figure `name` in the runner's metrics (0 before it shows).
fn counter(runner_metrics: &projector::Metrics, name: &str) -> u64 {
    let rendered = runner_metrics.render();
    rendered
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

/// Four partitions of `projection`, reading far from the head from `pair`'s replica.
fn builder<P: Projection>(pair: &Pair, projection: P, settings: Settings) -> Builder {
    Builder::new(pair.schema.database.clone(), projection)
        .settings(settings)
        .partitions(0..4)
        .total_partitions(4)
        .read_replica(pair.replica_database())
}

fn small_batches() -> Settings {
    let mut settings = Settings::default();
    settings.batch_size = 1_000;
    settings
}

#[test]
fn a_catch_up_reads_from_the_replica_every_event_once_in_order() {
    let pair = Pair::start("replica_catch_up");
    let events = pair.schema.seed(500, 100);
    pair.replica_replays_all();
    // The runner's own start-up writes (setup, checkpoints) must reach the replica before the
    // first bound is readable there; until then the primary serves. The gate holds the workers
    // (and so the fetcher, once the queues are full) near the start until the replica has
    // replayed them, however slow the machine: from then on every read is the replica's.
    let gate = Arc::new(AtomicBool::new(false));
    let (gated, mut settings) = held_back_from(2_000, &gate);
    settings.exit_when_caught_up = true;
    let runner = builder(&pair, gated, settings)
        .start()
        .expect("start the runner");
    let metrics = runner.metrics();
    let read_before = read_until_held_back(&metrics);
    pair.replica_replays_all();
    let replica_before = read_from_replica(&metrics);
    gate.store(true, Ordering::Release);
    join_within(runner, WAIT).expect("the runner catches up");
    assert_eq!(pair.schema.stats_applied(), events);
    assert_eq!(
        pair.schema.stats_mismatches(),
        0,
        "every event once, in order"
    );
    let replica_events = read_from_replica(&metrics) - replica_before;
    assert!(
        read_before < events as u64 / 2,
        "the gate holds the fetcher near the start: it read {read_before}"
    );
    // The read the fetcher held when it stopped (one batch) is not yet in its position.
    let rest = events as u64 - read_before;
    assert!(
        replica_events >= rest - 1_000,
        "once the replica has replayed the bound, the rest of the catch-up is read from it: \
         read {replica_events} of the {rest} after {read_before}"
    );
}

/// Waits until the fetcher, held back by gated workers, has stopped reading; returns the
/// position it read to (as many events, the stream having no holes).
fn read_until_held_back(metrics: &projector::Metrics) -> u64 {
    let read = || counter(metrics, "projector_read_position");
    let mut last = read();
    let mut still_since = std::time::Instant::now();
    eventually("the fetcher to be held back by the gate", WAIT, || {
        let now = read();
        if now != last || now == 0 {
            last = now;
            still_since = std::time::Instant::now();
        }
        still_since.elapsed() >= Duration::from_millis(500)
    });
    last
}

/// A `Gated` projection held back past `from` until `gate` opens, and settings under which the
/// held-back workers hold the fetcher back (instead of stepping aside): small batches, one
/// batch queued, no straggler for two minutes.
fn held_back_from(from: i64, gate: &Arc<AtomicBool>) -> (Gated, Settings) {
    let mut settings = small_batches();
    settings.straggler_after = Duration::from_secs(120);
    settings.queue_depth = 1;
    settings.max_events_per_transaction = 1_000;
    let gated = Gated {
        gate: Arc::clone(gate),
        from,
    };
    (gated, settings)
}

/// `AggregateStats`, whose worker waits for `gate` before applying an event past `from`.
#[derive(Clone)]
struct Gated {
    gate: Arc<AtomicBool>,
    from: i64,
}

impl Projection for Gated {
    fn name(&self) -> &str {
        "aggregate-stats"
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
        self.apply_batch(tx, std::slice::from_ref(event), context)
    }

    fn apply_batch(
        &mut self,
        tx: &mut Transaction<'_>,
        events: &[Event],
        context: &Context,
    ) -> Result<(), BoxError> {
        if events.iter().any(|e| e.global_position > self.from) {
            while !self.gate.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        AggregateStats.apply_batch(tx, events, context)
    }
}

#[test]
fn a_replica_that_stops_replaying_is_left_for_the_primary_until_it_replays_again() {
    let pair = Pair::start("replica_paused");
    let first = pair.schema.seed(300, 100);
    pair.replica_replays_all();
    pair.replica_client()
        .batch_execute("SELECT pg_wal_replay_pause()")
        .expect("pause the replica's replay");
    let more = pair.schema.seed_prefixed("more", 600, 100);
    let gate = Arc::new(AtomicBool::new(false));
    let (gated, settings) = held_back_from(10_000, &gate);
    let runner: Runner = builder(&pair, gated, settings)
        .start()
        .expect("start the runner");
    let metrics = runner.metrics();
    eventually("events below the gate to be applied", WAIT, || {
        pair.schema.stats_applied() >= 5_000
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read_from_replica(&metrics),
        0,
        "nothing is read from a replica that has not replayed the settled positions"
    );
    pair.replica_client()
        .batch_execute("SELECT pg_wal_replay_resume()")
        .expect("resume the replica's replay");
    pair.replica_replays_all();
    gate.store(true, Ordering::Release);
    eventually("every event to be applied", WAIT, || {
        pair.schema.stats_applied() == first + more
    });
    runner.shutdown();
    join_within(runner, WAIT).expect("the runner stops cleanly");
    assert_eq!(
        pair.schema.stats_mismatches(),
        0,
        "every event once, in order"
    );
    let replica_events = read_from_replica(&metrics);
    assert!(
        replica_events >= 20_000,
        "once it replays again, the replica serves the rest of the catch-up; read \
         {replica_events} from it"
    );
}

#[test]
fn a_replica_that_is_down_is_left_for_the_primary_with_one_warning() {
    let pair = Pair::start("replica_down");
    let events = pair.schema.seed(200, 100);
    pair.replica.stop();
    let url = format!(
        "postgres://postgres:replica-s3cret@127.0.0.1:{}/postgres",
        pair.replica.port()
    );
    let output = run_within(
        pair.schema.aggregate_stats(
            "0-3",
            "4",
            &[
                "--exit-when-caught-up",
                "--batch-size",
                "1000",
                "--read-replica-url",
                &url,
            ],
        ),
        WAIT,
    );
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "exits 0; stderr:\n{stderr}");
    assert_eq!(pair.schema.stats_applied(), events);
    assert_eq!(
        pair.schema.stats_mismatches(),
        0,
        "every event once, in order"
    );
    let warnings = stderr
        .lines()
        .filter(|line| line.contains("read replica") && line.contains("WARN"))
        .count();
    assert_eq!(warnings, 1, "one warning for the outage; stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "postgres@127.0.0.1:{}/postgres",
            pair.replica.port()
        )),
        "the warning names the replica; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("s3cret"),
        "the password is never printed; stderr:\n{stderr}"
    );
}

#[test]
fn a_replica_that_goes_down_while_read_is_left_for_the_primary_nothing_skipped() {
    let pair = Pair::start("replica_goes_down");
    let events = pair.schema.seed(600, 100);
    pair.replica_replays_all();
    let gate = Arc::new(AtomicBool::new(false));
    let (gated, settings) = held_back_from(10_000, &gate);
    let runner = builder(&pair, gated, settings)
        .start()
        .expect("start the runner");
    let metrics = runner.metrics();
    eventually("the fetcher to read from the replica", WAIT, || {
        read_from_replica(&metrics) > 0
    });
    pair.replica.stop();
    gate.store(true, Ordering::Release);
    eventually("every event to be applied", WAIT, || {
        pair.schema.stats_applied() == events
    });
    runner.shutdown();
    join_within(runner, WAIT).expect("the runner stops cleanly");
    assert_eq!(
        pair.schema.stats_mismatches(),
        0,
        "every event once, in order"
    );
    let replica_events = read_from_replica(&metrics);
    assert!(
        (replica_events as i64) < events,
        "the rest is read from the primary; read {replica_events} of {events} from the replica"
    );
}

#[test]
fn a_hole_held_open_on_the_primary_is_never_passed_through_the_replica() {
    let pair = Pair::start("replica_hole");
    let before = pair.schema.seed(400, 100);
    let mut holder = pair.schema.client();
    let mut open = holder.transaction().expect("begin");
    let hole = insert_event(&mut open, "hole-1", 1);
    assert_eq!(hole, before + 1);
    let after = pair.schema.seed_prefixed("after", 400, 100);
    pair.replica_replays_all();
    let runner = builder(&pair, AggregateStats, small_batches())
        .start()
        .expect("start the runner");
    eventually("the events below the hole to be applied", WAIT, || {
        pair.schema.stats_applied() >= before
    });
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        pair.schema.stats_applied(),
        before,
        "nothing above the open transaction's position is applied while it may commit"
    );
    open.commit().expect("commit the hole");
    eventually("every event to be applied", WAIT, || {
        pair.schema.stats_applied() == before + 1 + after
    });
    runner.shutdown();
    join_within(runner, WAIT).expect("the runner stops cleanly");
    assert_eq!(
        pair.schema.stats_mismatches(),
        0,
        "every event once, in order"
    );
}

#[test]
fn a_bad_read_replica_url_exits_2_naming_its_setting_without_the_password() {
    let schema = TestSchema::migrated("replica_bad_url");
    let bad = "postgres://reader:pa@s3cr3t@replica.example/app";
    let by_flag = run_within(
        schema.aggregate_stats("0", "1", &["--read-replica-url", bad]),
        WAIT,
    );
    let mut by_env = schema.aggregate_stats("0", "1", &[]);
    by_env.env("READ_REPLICA_URL", bad);
    let by_env = run_within(by_env, WAIT);
    for (output, setting) in [
        (by_flag, "--read-replica-url"),
        (by_env, "READ_REPLICA_URL"),
    ] {
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "stderr:\n{stderr}");
        assert!(
            stderr.contains(setting) && stderr.contains("is not a valid connection string"),
            "names {setting}; stderr:\n{stderr}"
        );
        assert!(
            !stderr.contains("s3cr3t"),
            "no part of the password; stderr:\n{stderr}"
        );
    }
}
