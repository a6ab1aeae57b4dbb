//! Read your writes: `wait_for` and `projector wait` return once the read model has the event,
//! and say how far the projection is when it has not got there in time.

use std::time::Duration;

use projector::postgres::fallible_iterator::FallibleIterator;
use projector::postgres::{Client, NoTls, Transaction};
use projector::projections::AggregateStats;
use projector::{
    Applied, BoxError, Builder, Context, Error, Event, ExpectedVersion, NewEvent, PoisonPolicy,
    Projection, Runner, Settings, Until, Waiter, partition_of, wait_for,
};

use crate::util::{TestSchema, insert_event, join_within, run_within, text};

const LIMIT: Duration = Duration::from_secs(60);

/// `aggregate-stats`, slowed down: each event takes a while to apply, so a read of the read
/// model right after an append would miss it.
#[derive(Clone)]
struct SlowStats;

impl Projection for SlowStats {
    fn name(&self) -> &str {
        "slow-stats"
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
        std::thread::sleep(Duration::from_millis(300));
        AggregateStats.apply(tx, event, context)
    }
}

fn start(schema: &TestSchema) -> Runner {
    Builder::new(schema.database.clone(), SlowStats)
        .partitions(0..4)
        .total_partitions(4)
        .start()
        .expect("start the runner")
}

fn stop(runner: Runner) {
    runner.shutdown();
    join_within(runner, LIMIT).expect("the runner stops cleanly");
}

fn append(schema: &TestSchema, aggregate_id: &str) -> i64 {
    let event = NewEvent::new("test", "Thing", aggregate_id, "Happened", b"{}".to_vec());
    projector::append(&mut schema.client(), ExpectedVersion::Any, &[event]).expect("append")[0]
}

/// Waits for `slow-stats` to apply `until`, for as long as a test may take.
fn wait(schema: &TestSchema, until: Until) -> Result<Applied, Error> {
    wait_for(&schema.database, "slow-stats", until, LIMIT)
}

/// The `aggregate_stats` row of `aggregate_id`: events applied and last position applied.
fn read_model(schema: &TestSchema, aggregate_id: &str) -> Option<(i64, i64)> {
    schema
        .client()
        .query_opt(
            "SELECT events_applied, last_global_position FROM aggregate_stats \
             WHERE aggregate_id = $1",
            &[&aggregate_id],
        )
        .expect("read aggregate_stats")
        .map(|row| (row.get(0), row.get(1)))
}

#[test]
fn wait_for_returns_once_the_write_is_in_the_read_model() {
    let schema = TestSchema::migrated("wait_read_model");
    let runner = start(&schema);
    let mut waiter = Waiter::connect(&schema.database).expect("connect a waiter");
    for n in 1..=4 {
        let id = format!("cart-{n}");
        let position = append(&schema, &id);
        let applied = if n % 2 == 0 {
            waiter.wait_for("slow-stats", Until::Position(position), LIMIT)
        } else {
            wait(&schema, Until::Position(position))
        }
        .expect("the write is applied");
        assert_eq!(read_model(&schema, &id), Some((1, position)), "{applied:?}");
        assert_eq!(applied.position, position);
        assert_eq!(applied.aggregate_id.as_deref(), Some(id.as_str()));
        assert_eq!(applied.partition, Some(partition_of(&id, 4)));
        assert_eq!(applied.total_partitions, 4);
        assert!(applied.checkpoint >= position, "{applied:?}");
    }
    stop(runner);
}

#[test]
fn wait_for_an_aggregate_returns_once_its_latest_event_is_applied() {
    let schema = TestSchema::migrated("wait_aggregate");
    let runner = start(&schema);
    let events: Vec<NewEvent> = (0..3)
        .map(|_| NewEvent::new("test", "Thing", "order-9", "Happened", b"{}".to_vec()))
        .collect();
    let positions = projector::append(&mut schema.client(), ExpectedVersion::NoStream, &events)
        .expect("append three events");
    let last = positions[2];
    let applied = wait(&schema, Until::Aggregate("order-9".into()))
        .expect("the aggregate's events are applied");
    assert_eq!(read_model(&schema, "order-9"), Some((3, last)));
    assert_eq!(
        (applied.position, applied.partition),
        (last, Some(partition_of("order-9", 4)))
    );

    // Nothing to wait for: the partition that would own it is named all the same.
    let nothing = wait(&schema, Until::Aggregate("never-written".into()))
        .expect("an aggregate with no events");
    assert_eq!(nothing.position, 0);
    assert_eq!(nothing.aggregate_id, None);
    assert_eq!(nothing.partition, Some(partition_of("never-written", 4)));
    stop(runner);
}

#[test]
fn a_position_with_no_event_is_waited_for_on_every_partition() {
    let schema = TestSchema::migrated("wait_no_event");
    let runner = start(&schema);
    // A rolled-back insert leaves its position empty for good.
    let mut client = schema.client();
    let mut tx = client.transaction().expect("begin");
    let hole = insert_event(&mut tx, "rolled-back", 1);
    tx.rollback().expect("roll back");
    let after = append(&schema, "after-the-hole");
    assert!(after > hole);
    let applied = wait(&schema, Until::Position(hole)).expect("every partition passes the hole");
    assert_eq!((applied.aggregate_id, applied.partition), (None, None));
    let lowest = schema.count(
        "SELECT MIN(last_position) FROM projector_checkpoints WHERE projection = 'slow-stats'",
    );
    assert!(
        lowest >= hole,
        "a checkpoint is still below {hole}: {lowest}"
    );
    stop(runner);
}

#[test]
fn wait_for_times_out_saying_how_far_the_projection_is_when_no_projector_runs() {
    let schema = TestSchema::migrated("wait_timeout");
    stop(start(&schema));
    let position = append(&schema, "cart-1");
    let partition = partition_of("cart-1", 4);
    let error = wait_for(
        &schema.database,
        "slow-stats",
        Until::Position(position),
        Duration::from_secs(1),
    )
    .expect_err("no projector runs");
    let message = error.to_string();
    match error {
        Error::NotAppliedInTime {
            projection,
            position: waited_for,
            aggregate_id,
            partition: at,
            total,
            checkpoint,
            behind,
            held_by_pid,
            ..
        } => {
            assert_eq!(projection, "slow-stats");
            assert_eq!((waited_for, at, total), (position, partition, 4));
            assert_eq!(aggregate_id.as_deref(), Some("cart-1"));
            assert!(checkpoint < position, "{message}");
            assert_eq!(behind, Some(1), "{message}");
            assert_eq!(held_by_pid, None, "{message}");
        }
        other => panic!("expected a time-out, got {other:?}"),
    }
    for expected in [
        format!("projection 'slow-stats' has not applied global position {position} after 1."),
        format!("partition {partition}/4, which applies it (aggregate 'cart-1'), is at checkpoint"),
        "1 event(s) behind".to_owned(),
        "no live process holds that partition: is a projector running for 'slow-stats'?".to_owned(),
    ] {
        assert!(
            message.contains(&expected),
            "{expected:?} not in: {message}"
        );
    }
    assert_eq!(read_model(&schema, "cart-1"), None);
}

#[test]
fn an_unknown_projection_is_an_error_at_once() {
    let schema = TestSchema::migrated("wait_unknown");
    let database = schema.database.clone();
    let (sender, receiver) = std::sync::mpsc::channel();
    // An hour's timeout: a wait would outlast the test's limit.
    std::thread::spawn(move || {
        let _ = sender.send(wait_for(
            &database,
            "never-ran",
            Until::Position(1),
            Duration::from_secs(3600),
        ));
    });
    let outcome = receiver
        .recv_timeout(LIMIT)
        .expect("wait_for returns at once for a projection with no checkpoints");
    match outcome {
        Err(error @ Error::NotStarted { .. }) => {
            assert!(error.is_configuration());
            assert_eq!(
                error.to_string(),
                format!(
                    "projection 'never-ran' has no checkpoints in schema '{}': no projector has \
                     run it there (or it was reset since); start one for it first, or check the \
                     projection's name and the schema",
                    schema.name
                )
            );
        }
        other => panic!("expected NotStarted, got {other:?}"),
    }

    let empty = TestSchema::empty("wait_no_tables");
    match wait_for(
        &empty.database,
        "never-ran",
        Until::Position(1),
        Duration::from_secs(3600),
    ) {
        Err(error @ Error::MissingTables { .. }) => {
            assert!(error.to_string().contains("run `projector migrate` first"))
        }
        other => panic!("expected MissingTables, got {other:?}"),
    }
}

/// The channel a commit notifies, worked out here on its own: the prefix and the schema's name
/// when they fit PostgreSQL's 63 bytes, else the prefix and the schema's MD5.
fn applied_channel(client: &mut Client, schema: &str) -> String {
    let prefix = "projector_applied_";
    if prefix.len() + schema.len() <= 63 {
        return format!("{prefix}{schema}");
    }
    let md5: String = client
        .query_one("SELECT md5($1)", &[&schema])
        .expect("md5")
        .get(0);
    format!("{prefix}{md5}")
}

#[test]
fn a_commit_that_moves_a_checkpoint_notifies_its_schema_applied_channel() {
    // The second name is too long for the prefix (63 bytes at most): its MD5 stands in.
    for test in [
        "wait_channel",
        "wait_channel_of_a_schema_too_long_for_the_prefix",
    ] {
        let schema = TestSchema::migrated(test);
        let mut listener = Client::connect(&schema.url, NoTls).expect("connect");
        let channel = applied_channel(&mut listener, &schema.name);
        listener
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .expect("listen");
        schema.seed(4, 2);
        Builder::new(schema.database.clone(), AggregateStats)
            .partitions(0..2)
            .total_partitions(2)
            .exit_when_caught_up(true)
            .start()
            .and_then(|runner| runner.join())
            .expect("catch up");
        let md5: String = listener
            .query_one("SELECT md5('aggregate-stats')", &[])
            .expect("md5")
            .get(0);
        // Every commit has been sent by now: take them until a second passes without one.
        let payloads: Vec<String> = listener
            .notifications()
            .timeout_iter(Duration::from_secs(1))
            .map(|n| Ok(n.payload().to_owned()))
            .collect()
            .expect("notifications");
        assert!(!payloads.is_empty(), "{}: no notification", schema.name);
        // `md5(projection) total key checkpoint`; the last of each partition's is its checkpoint.
        for key in 0..2 {
            let prefix = format!("{md5} 2 {key} ");
            let last = payloads
                .iter()
                .filter_map(|p| p.strip_prefix(&prefix)?.parse::<i64>().ok())
                .max();
            let checkpoint = schema.count(&format!(
                "SELECT last_position FROM projector_checkpoints WHERE partition_key = {key}"
            ));
            assert_eq!(last, Some(checkpoint), "partition {key}: {payloads:?}");
        }
        assert!(
            payloads.iter().all(|p| p.starts_with(&format!("{md5} 2 "))),
            "{payloads:?}"
        );
    }
}

/// The server process ids of the connections named `application`, other than this one.
fn backends(client: &mut Client, application: &str) -> Vec<i32> {
    client
        .query(
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid() AND state = 'idle' \
                 AND query LIKE '%projector_checkpoints%'",
            &[&application],
        )
        .expect("read pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Ends the one idle waiter connection named `application` other than `except`, once it is there.
fn terminate_waiter(client: &mut Client, application: &str, except: Option<i32>) -> i32 {
    let mut pid = None;
    crate::util::eventually("the waiter's connection", LIMIT, || {
        pid = backends(client, application)
            .into_iter()
            .find(|&pid| Some(pid) != except);
        pid.is_some()
    });
    let pid = pid.expect("found above");
    client
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .expect("terminate the waiter's connection");
    pid
}

#[test]
fn a_wait_opens_its_connection_again_once_and_fails_when_it_is_lost_twice() {
    let schema = TestSchema::migrated("wait_reconnect");
    stop(start(&schema));
    let application = format!("wait_reconnect_{}", std::process::id());
    let separator = if schema.url.contains('?') { '&' } else { '?' };
    let database = projector::Database::new(&format!(
        "{}{separator}application_name={application}",
        schema.url
    ))
    .and_then(|database| database.schema(&schema.name))
    .expect("the test URL with an application name");
    let mut admin = Client::connect(&schema.url, NoTls).expect("connect");
    let waiting = |position| {
        let database = database.clone();
        std::thread::spawn(move || {
            wait_for(&database, "slow-stats", Until::Position(position), LIMIT)
        })
    };

    // Lost once: the wait goes on, on a new connection, and returns once applied.
    let position = append(&schema, "cart-1");
    let wait = waiting(position);
    let first = terminate_waiter(&mut admin, &application, None);
    crate::util::eventually("the new connection", LIMIT, || {
        backends(&mut admin, &application)
            .iter()
            .any(|&pid| pid != first)
    });
    let runner = start(&schema);
    let applied = wait.join().expect("the wait does not panic");
    assert_eq!(applied.map(|a| a.position).ok(), Some(position));
    stop(runner);

    // Lost twice: the error says what it was doing.
    let position = append(&schema, "cart-2");
    let wait = waiting(position);
    let first = terminate_waiter(&mut admin, &application, None);
    terminate_waiter(&mut admin, &application, Some(first));
    match wait.join().expect("the wait does not panic") {
        Err(error @ Error::Database { .. }) => {
            let message = error.to_string();
            assert!(
                message == "database error while waiting for the projection's commits"
                    || message == "database error while reading the checkpoints",
                "{message}"
            );
        }
        other => panic!("expected the lost connection's error, got {other:?}"),
    }
}

#[test]
fn the_wait_command_exits_0_once_applied_and_1_on_timeout() {
    let schema = TestSchema::migrated("wait_command");
    let position = append(&schema, "thing-1");
    let caught_up = run_within(
        schema.aggregate_stats("0-3", "4", &["--exit-when-caught-up"]),
        LIMIT,
    );
    assert_eq!(
        caught_up.status.code(),
        Some(0),
        "{}",
        text(&caught_up.stderr)
    );
    let partition = partition_of("thing-1", 4);

    let applied = run_within(
        schema.projector(&[
            "wait",
            "--projection",
            "aggregate-stats",
            "--position",
            &position.to_string(),
        ]),
        LIMIT,
    );
    assert_eq!(applied.status.code(), Some(0), "{}", text(&applied.stderr));
    let line = text(&applied.stdout);
    let expected = format!(
        "projection 'aggregate-stats' has applied global position {position} (aggregate \
         'thing-1'): partition {partition}/4 is at checkpoint"
    );
    assert!(line.starts_with(&expected), "{line}");
    assert_eq!(line.lines().count(), 1, "{line}");

    // The projection given before the subcommand, and an aggregate instead of a position.
    let by_aggregate = run_within(
        schema.projector(&[
            "--projection",
            "aggregate-stats",
            "wait",
            "--aggregate",
            "thing-1",
        ]),
        LIMIT,
    );
    assert_eq!(
        by_aggregate.status.code(),
        Some(0),
        "{}",
        text(&by_aggregate.stderr)
    );
    assert!(text(&by_aggregate.stdout).starts_with(&expected));

    // No projector runs now.
    let later = append(&schema, "thing-1");
    let timed_out = run_within(
        schema.projector(&[
            "wait",
            "--projection",
            "aggregate-stats",
            "--position",
            &later.to_string(),
            "--timeout",
            "1s",
        ]),
        LIMIT,
    );
    let stderr = text(&timed_out.stderr);
    assert_eq!(timed_out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: projection 'aggregate-stats' has not applied global position {later} after 1."
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("is a projector running for 'aggregate-stats'? (`projector status --projection aggregate-stats`)"),
        "{stderr}"
    );
}

#[test]
fn the_wait_command_exits_2_for_bad_flags_and_a_projection_that_never_ran() {
    let schema = TestSchema::migrated("wait_command_usage");
    for (args, expected) in [
        (
            "--projection never-ran --position 1",
            "error: projection 'never-ran' has no checkpoints in schema",
        ),
        (
            "--projection aggregate-stats",
            "error: --position or --aggregate is not set: give exactly one of --position N",
        ),
        (
            "--projection aggregate-stats --position 1 --aggregate thing-1",
            "error: invalid value 'thing-1' for --aggregate: --position is given too",
        ),
        (
            "--projection aggregate-stats --position 0",
            "error: invalid value '0' for --position: expected a global position",
        ),
        (
            "--projection aggregate-stats --position x",
            "error: invalid value 'x' for --position",
        ),
        (
            "--projection aggregate-stats --position 1 --timeout soon",
            "error: invalid value 'soon' for --timeout: expected a duration",
        ),
        (
            "--position 1",
            "Required options not provided:\n    --projection",
        ),
        (
            "--projection aggregate-stats --position 1 --partition-key 1",
            "error: --partition-key is for running a projection, and `projector wait` does not \
             use it",
        ),
    ] {
        let args: Vec<&str> = ["wait"].into_iter().chain(args.split(' ')).collect();
        let output = run_within(schema.projector(&args), LIMIT);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// `aggregate-stats` under the park policy, whose events of aggregates `poison-*` always fail:
/// they are parked, never applied.
#[derive(Clone)]
struct ParksPoison;

impl Projection for ParksPoison {
    fn name(&self) -> &str {
        "parks-poison"
    }

    fn poison_policy(&self) -> PoisonPolicy {
        PoisonPolicy::Park
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
        if event.aggregate_id.starts_with("poison-") {
            return Err(format!("{} cannot be applied", event.aggregate_id).into());
        }
        AggregateStats.apply(tx, event, context)
    }
}

/// Starts `parks-poison` on 2 partitions, with quick retries, to the head or live.
fn start_parking(schema: &TestSchema, to_the_head: bool) -> Runner {
    let mut settings = Settings::default();
    settings.retry_delay = Duration::from_millis(100);
    settings.max_retry_delay = Duration::from_millis(100);
    Builder::new(schema.database.clone(), ParksPoison)
        .partitions(0..2)
        .total_partitions(2)
        .settings(settings)
        .exit_when_caught_up(to_the_head)
        .start()
        .expect("start the runner")
}

/// Runs `parks-poison` to the head.
fn park_to_the_head(schema: &TestSchema) {
    join_within(start_parking(schema, true), LIMIT).expect("the runner catches up");
}

#[test]
fn wait_for_a_parked_event_says_it_was_parked_never_applied() {
    let schema = TestSchema::migrated("wait_parked");
    let good = append(&schema, "cart-1");
    let poison = append(&schema, "poison-1");
    let behind = append(&schema, "poison-1");
    park_to_the_head(&schema);
    let partition = partition_of("poison-1", 2);

    let applied = wait_for(
        &schema.database,
        "parks-poison",
        Until::Position(good),
        LIMIT,
    )
    .expect("an event of another aggregate is applied");
    assert_eq!(applied.position, good);
    for (until, position, why) in [
        (
            Until::Position(poison),
            poison,
            "poison-1 cannot be applied",
        ),
        (
            Until::Position(behind),
            behind,
            "parked behind an earlier event",
        ),
        (Until::Aggregate("poison-1".into()), behind, "parked behind"),
    ] {
        let outcome = wait_for(&schema.database, "parks-poison", until.clone(), LIMIT);
        match outcome {
            Err(error @ Error::EventParked { .. }) => {
                let message = error.to_string();
                assert!(!error.is_configuration(), "{message}");
                let Error::EventParked {
                    projection,
                    position: parked,
                    aggregate_id,
                    partition: at,
                    total,
                    first_parked,
                    reason,
                    ..
                } = error
                else {
                    unreachable!()
                };
                assert_eq!(projection, "parks-poison");
                assert_eq!((parked, at, total), (position, partition, 2), "{until:?}");
                assert_eq!(aggregate_id, "poison-1");
                assert_eq!(first_parked, poison, "{message}");
                assert!(reason.contains(why), "{until:?}: {reason}");
                assert!(
                    message.starts_with(&format!(
                        "projection 'parks-poison' has parked global position {position} \
                         (aggregate 'poison-1') instead of applying it"
                    )),
                    "{message}"
                );
            }
            other => panic!("{until:?}: expected EventParked, got {other:?}"),
        }
    }
    assert_eq!(read_model(&schema, "poison-1"), None);

    // Waiting while it is tried (three attempts, 100 ms apart): the commit that parks it ends
    // the wait, and says parked.
    let runner = start_parking(&schema, false);
    let poison = append(&schema, "poison-2");
    match wait_for(
        &schema.database,
        "parks-poison",
        Until::Position(poison),
        LIMIT,
    ) {
        Err(Error::EventParked { position, .. }) => assert_eq!(position, poison),
        other => panic!("expected EventParked, got {other:?}"),
    }
    stop(runner);
}

#[test]
fn the_wait_command_exits_3_for_a_parked_event() {
    let schema = TestSchema::migrated("wait_parked_command");
    let poison = append(&schema, "poison-1");
    park_to_the_head(&schema);
    let output = run_within(
        schema.projector(&[
            "wait",
            "--projection",
            "parks-poison",
            "--position",
            &poison.to_string(),
        ]),
        LIMIT,
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert_eq!(text(&output.stdout), "", "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: projection 'parks-poison' has parked global position {poison} (aggregate \
             'poison-1') instead of applying it: poison-1 cannot be applied"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "`projector dead-letters retry --projection parks-poison --aggregate poison-1`"
        ),
        "{stderr}"
    );
}
