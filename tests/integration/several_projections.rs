//! Several projections in one process: one read of the stream, each projection on its own
//! checkpoints and transactions, failing alone, rebuilding beside live ones, and scopes.

use std::thread;
use std::time::{Duration, Instant};

use projector::postgres::Transaction;
use projector::{BoxError, Builder, Context, Error, Event, Projection, Scope, Settings, Summary};

use crate::util::{TestSchema, eventually, insert_event, run_within, text};

/// Records, per projection and aggregate, how many events it applied and whether they came in
/// version order: a doubled event shows as a count too high, a lost one as a count too low.
#[derive(Clone)]
pub(crate) struct Recorder {
    name: String,
    scope: Scope,
    /// Fails on this aggregate's event of this version.
    poison: Option<(String, i64)>,
    /// Time taken per event, to make a rebuild slow.
    pub(crate) per_event: Duration,
}

impl Recorder {
    pub(crate) fn named(name: &str) -> Recorder {
        Recorder {
            name: name.into(),
            scope: Scope::all(),
            poison: None,
            per_event: Duration::ZERO,
        }
    }
}

impl Projection for Recorder {
    fn name(&self) -> &str {
        &self.name
    }

    fn scope(&self) -> Scope {
        self.scope.clone()
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS recorded (projection TEXT, aggregate_id TEXT, \
             n BIGINT NOT NULL, last_version BIGINT NOT NULL, in_order BOOLEAN NOT NULL, \
             event_types TEXT[] NOT NULL, PRIMARY KEY (projection, aggregate_id))",
        )?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), BoxError> {
        if let Some((aggregate, version)) = &self.poison {
            if event.aggregate_id == *aggregate && event.aggregate_version == *version {
                return Err(format!("poison at {aggregate} v{version}").into());
            }
        }
        if !self.per_event.is_zero() {
            thread::sleep(self.per_event);
        }
        tx.execute(
            "INSERT INTO recorded VALUES ($1, $2, 1, $3::bigint, $3::bigint = 1, ARRAY[$4::text]) \
             ON CONFLICT (projection, aggregate_id) DO UPDATE SET n = recorded.n + 1, \
             last_version = EXCLUDED.last_version, \
             in_order = recorded.in_order AND recorded.last_version + 1 = EXCLUDED.last_version, \
             event_types = recorded.event_types || EXCLUDED.event_types",
            &[
                &self.name,
                &event.aggregate_id,
                &event.aggregate_version,
                &event.event_type,
            ],
        )?;
        Ok(())
    }
}

/// Aggregates `thing-1..=aggregates` each recorded by `projection` exactly `per_aggregate`
/// times, in order.
pub(crate) fn recorded_exactly(
    schema: &TestSchema,
    projection: &str,
    aggregates: i64,
    per_aggregate: i64,
) -> bool {
    let exact = schema
        .client()
        .query_one(
            "SELECT COUNT(*) FILTER (WHERE n = $2 AND last_version = $2 AND in_order), COUNT(*) \
             FROM recorded WHERE projection = $1 AND aggregate_id LIKE 'thing-%'",
            &[&projection, &per_aggregate],
        )
        .expect("read recorded");
    exact.get::<_, i64>(0) == aggregates && exact.get::<_, i64>(1) == aggregates
}

pub(crate) fn checkpoints_at(schema: &TestSchema, projection: &str) -> Vec<i64> {
    schema
        .client()
        .query(
            "SELECT last_position FROM projector_checkpoints WHERE projection = $1 \
             ORDER BY partition_key",
            &[&projection],
        )
        .expect("read checkpoints")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

pub(crate) fn catch_up(builder: Builder) -> Summary {
    builder
        .partitions(0..4)
        .total_partitions(4)
        .batch_size(500)
        .exit_when_caught_up(true)
        .start()
        .expect("start")
        .join()
        .expect("join")
}

#[test]
fn two_projections_in_one_process_each_apply_every_event_once_in_order() {
    let schema = TestSchema::migrated("two_projections");
    let events = schema.seed(300, 8);
    let builder = Builder::new(schema.database.clone(), Recorder::named("first"))
        .projection(Recorder::named("second"));
    let summary = catch_up(builder);

    assert_eq!(summary.projections.len(), 2);
    assert_eq!(summary.applied(), 2 * events as u64);
    assert_eq!(summary.events_read, events as u64, "one read for both");
    for name in ["first", "second"] {
        assert!(recorded_exactly(&schema, name, 300, 8), "{name}");
        assert_eq!(checkpoints_at(&schema, name), vec![events; 4], "{name}");
    }
}

#[test]
fn ten_projections_share_one_read_of_the_stream() {
    let schema = TestSchema::migrated("ten_projections");
    let events = schema.seed(200, 5);
    let names: Vec<String> = (0..10).map(|n| format!("p{n}")).collect();
    let mut builder = Builder::new(schema.database.clone(), Recorder::named(&names[0]));
    for name in &names[1..] {
        builder = builder.projection(Recorder::named(name));
    }
    let summary = catch_up(builder);

    assert_eq!(
        summary.events_read, events as u64,
        "the stream is read once"
    );
    for name in &names {
        assert!(recorded_exactly(&schema, name, 200, 5), "{name}");
        assert_eq!(checkpoints_at(&schema, name), vec![events; 4], "{name}");
    }
}

#[test]
fn a_projection_named_twice_is_refused() {
    let schema = TestSchema::migrated("named_twice");
    let error = Builder::new(schema.database.clone(), Recorder::named("same"))
        .projection(Recorder::named("same"))
        .start()
        .expect_err("refused");
    assert!(
        error.to_string().contains("'same'") || error.to_string().contains("same"),
        "{error}"
    );
    assert!(error.to_string().contains("twice"), "{error}");
}

#[test]
fn a_failing_projection_stops_alone_and_the_others_stay_exact_and_moving() {
    let schema = TestSchema::migrated("failing_alone");
    let events = schema.seed(100, 6);
    let mut bad = Recorder::named("bad");
    bad.poison = Some(("thing-7".into(), 3));
    let mut settings = Settings::default();
    settings.retry_delay = Duration::from_millis(10);
    let runner = Builder::new(schema.database.clone(), Recorder::named("good"))
        .projection(bad)
        .partitions(0..4)
        .total_partitions(4)
        .settings(settings)
        .start()
        .expect("start");

    eventually(
        "the good projection catches up",
        Duration::from_secs(30),
        || recorded_exactly(&schema, "good", 100, 6),
    );
    // The bad one stopped just before the poison event, in that event's partition only.
    let poison: i64 = schema.count(
        "SELECT global_position FROM events WHERE aggregate_id = 'thing-7' AND aggregate_version = 3",
    );
    eventually(
        "the bad projection's partitions stop",
        Duration::from_secs(30),
        || {
            let bad = checkpoints_at(&schema, "bad");
            bad.contains(&(poison - 1)) && bad.iter().filter(|&&c| c == events).count() == 3
        },
    );
    // The good one keeps moving after the failure.
    let more = schema.seed(100, 2);
    eventually(
        "the good projection applies later events",
        Duration::from_secs(30),
        || recorded_exactly(&schema, "good", 100, 8),
    );
    assert_eq!(checkpoints_at(&schema, "good"), vec![events + more; 4]);
    assert!(checkpoints_at(&schema, "bad").iter().all(|&c| c <= events));

    runner.shutdown();
    match runner.join() {
        Err(Error::Projection {
            projection,
            position,
            ..
        }) => {
            assert_eq!(projection, "bad");
            assert_eq!(position, poison);
        }
        other => panic!("expected the bad projection's error, got {other:?}"),
    }
}

#[test]
fn a_projection_added_to_a_running_group_rebuilds_while_the_others_stay_live() {
    let schema = TestSchema::migrated("added_projection");
    let events = schema.seed(200, 10);
    catch_up(Builder::new(
        schema.database.clone(),
        Recorder::named("live"),
    ));

    // The service is restarted with a new projection beside the live one: the newcomer starts
    // from the first event, slowly, while the live one must go on applying new events.
    let mut newcomer = Recorder::named("newcomer");
    newcomer.per_event = Duration::from_millis(2);
    let mut settings = Settings::default();
    settings.catch_up_alone_beyond = 100;
    settings.batch_size = 200;
    let runner = Builder::new(schema.database.clone(), Recorder::named("live"))
        .projection(newcomer)
        .partitions(0..4)
        .total_partitions(4)
        .settings(settings)
        .start()
        .expect("start");
    let appended = Instant::now();
    let mut client = schema.client();
    let position = insert_event(&mut client, "fresh-1", 1);
    eventually(
        "the live projection applies a new event",
        Duration::from_secs(10),
        || {
            schema.count("SELECT COUNT(*) FROM recorded WHERE projection = 'live' AND aggregate_id = 'fresh-1'") == 1
        },
    );
    let live_latency = appended.elapsed();
    let newcomer_done = schema
        .count("SELECT COALESCE(SUM(n), 0)::bigint FROM recorded WHERE projection = 'newcomer'");
    assert!(
        newcomer_done < events,
        "the newcomer was still rebuilding ({newcomer_done} of {events}) when the live \
         projection applied the new event after {live_latency:?}"
    );

    eventually("the newcomer rebuilds", Duration::from_secs(120), || {
        recorded_exactly(&schema, "newcomer", 200, 10)
    });
    // Once caught up it is on the shared read: a later event reaches both.
    let later = insert_event(&mut client, "fresh-2", 1);
    eventually("both apply a later event", Duration::from_secs(10), || {
        checkpoints_at(&schema, "newcomer")
            .iter()
            .all(|&c| c >= later)
            && checkpoints_at(&schema, "live").iter().all(|&c| c >= later)
    });
    runner.shutdown();
    let summary = runner.join().expect("join");
    assert!(position < later);
    assert!(recorded_exactly(&schema, "live", 200, 10));
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM recorded WHERE aggregate_id LIKE 'fresh-%' AND n = 1"),
        4
    );
    assert_eq!(summary.projections[1].applied(), events as u64 + 2);
}

/// Appends `n` events of type `event_type` to aggregates `prefix-1..=n`, one each.
fn append_typed(schema: &TestSchema, prefix: &str, event_type: &str, n: i64) {
    schema
        .client()
        .execute(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                 event_id, event_type, payload) \
             SELECT 'test', 'Typed', $1 || '-' || a, 1, gen_random_uuid(), $2, '\\x7b7d' \
             FROM generate_series(1, $3::bigint) a",
            &[&prefix, &event_type, &n],
        )
        .expect("append typed events");
}

fn scoped(name: &str, event_types: &[&str]) -> Recorder {
    let mut recorder = Recorder::named(name);
    recorder.scope = Scope::all().event_types(event_types.iter().copied());
    recorder
}

#[test]
fn scoped_projections_receive_only_their_events_and_their_checkpoints_reach_the_head() {
    let schema = TestSchema::migrated("scoped");
    schema.seed(100, 5);
    append_typed(&schema, "rare", "Rare", 7);
    schema.seed(100, 5);
    append_typed(&schema, "odd", "Odd", 3);
    schema.seed(10, 1);
    let head = schema.count("SELECT MAX(global_position) FROM events");

    // Two scoped projections: the server filters the read.
    let builder = Builder::new(schema.database.clone(), scoped("rare", &["Rare"]))
        .projection(scoped("rare-or-odd", &["Rare", "Odd"]));
    let summary = catch_up(builder);
    assert_eq!(summary.projections[0].applied(), 7);
    assert_eq!(summary.projections[1].applied(), 10);
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM recorded WHERE projection = 'rare' AND event_types = ARRAY['Rare']"),
        7
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM recorded WHERE projection = 'rare'"),
        7
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM recorded WHERE projection = 'rare-or-odd'"),
        10
    );
    assert_eq!(checkpoints_at(&schema, "rare"), vec![head; 4]);
    assert_eq!(checkpoints_at(&schema, "rare-or-odd"), vec![head; 4]);

    // A scoped projection beside one that takes everything: each still gets only its own.
    let builder = Builder::new(schema.database.clone(), scoped("odd", &["Odd"]))
        .projection(Recorder::named("everything"));
    let summary = catch_up(builder);
    assert_eq!(summary.projections[0].applied(), 3);
    assert_eq!(summary.projections[1].applied(), head as u64);
    assert_eq!(checkpoints_at(&schema, "odd"), vec![head; 4]);
}

#[test]
fn a_scoped_projection_waits_at_a_hole_of_any_type_and_passes_it_once_rolled_back() {
    let schema = TestSchema::migrated("scoped_hole");
    append_typed(&schema, "before", "Rare", 2);
    let runner = Builder::new(schema.database.clone(), scoped("rare", &["Rare"]))
        .projection(scoped("odd", &["Odd"]))
        .partitions(0..2)
        .total_partitions(2)
        .poll_interval(Duration::from_millis(20))
        .start()
        .expect("start");
    eventually(
        "the first events are applied",
        Duration::from_secs(10),
        || schema.count("SELECT COUNT(*) FROM recorded WHERE projection = 'rare'") == 2,
    );

    // A writer holds a position with an event in neither scope; a later in-scope event commits.
    let mut holder = schema.client();
    let mut open = holder.transaction().expect("begin");
    let hole = insert_event(&mut open, "outside-1", 1);
    append_typed(&schema, "after", "Rare", 1);
    thread::sleep(Duration::from_millis(600));
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM recorded WHERE aggregate_id = 'after-1'"),
        0,
        "an event above a position that may still commit was applied"
    );
    assert!(checkpoints_at(&schema, "rare").iter().all(|&c| c < hole));

    open.rollback().expect("roll back");
    eventually(
        "the event above the rolled-back hole is applied",
        Duration::from_secs(5),
        || {
            schema.count("SELECT COUNT(*) FROM recorded WHERE projection = 'rare' AND aggregate_id = 'after-1'") == 1
        },
    );
    let head = schema.count("SELECT MAX(global_position) FROM events");
    eventually(
        "every checkpoint reaches the head",
        Duration::from_secs(5),
        || {
            checkpoints_at(&schema, "rare")
                .iter()
                .chain(&checkpoints_at(&schema, "odd"))
                .all(|&c| c == head)
        },
    );
    runner.shutdown();
    runner.join().expect("join");
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM recorded WHERE projection = 'odd'"),
        0
    );
}

#[test]
fn the_binary_runs_a_comma_separated_list_of_projections_on_one_read() {
    let schema = TestSchema::migrated("binary_list");
    let events = schema.seed(150, 4);
    let output = run_within(
        schema.projector(&[
            "--partition-key",
            "0-3",
            "--total-partitions",
            "4",
            "--projection",
            "aggregate-stats,aggregate-stats-batch",
            "--exit-when-caught-up",
        ]),
        Duration::from_secs(60),
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(schema.stats_mismatches_in("aggregate_stats"), 0);
    assert_eq!(schema.stats_mismatches_in("aggregate_stats_batch"), 0);
    assert!(
        stderr.contains("stopped 'aggregate-stats', 'aggregate-stats-batch' after")
            && stderr.contains(&format!("read {events} events, applied {}", 2 * events)),
        "one read, both applied: {stderr}"
    );

    // A name that is not a projection, anywhere in the list, is refused before anything runs.
    let output = run_within(
        schema.projector(&[
            "--partition-key",
            "0",
            "--total-partitions",
            "4",
            "--projection",
            "users,nope",
        ]),
        Duration::from_secs(30),
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--projection") && stderr.contains("nope"),
        "{stderr}"
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projector_checkpoints WHERE projection = 'users'"),
        0
    );
}

#[test]
fn re_partitioning_one_projection_of_a_group_fences_it_alone() {
    let schema = TestSchema::migrated("group_repartition");
    let events = schema.seed(100, 4);
    let runner = Builder::new(schema.database.clone(), Recorder::named("moved"))
        .projection(Recorder::named("stays"))
        .partitions(0..2)
        .total_partitions(2)
        .poll_interval(Duration::from_millis(20))
        .start()
        .expect("start");
    eventually("both catch up", Duration::from_secs(30), || {
        recorded_exactly(&schema, "moved", 100, 4) && recorded_exactly(&schema, "stays", 100, 4)
    });

    projector::repartition(&schema.database, "moved", 3).expect("repartition");
    let more = schema.seed(100, 1);
    eventually(
        "the other projection goes on",
        Duration::from_secs(30),
        || recorded_exactly(&schema, "stays", 100, 5),
    );
    assert_eq!(checkpoints_at(&schema, "stays"), vec![events + more; 2]);
    runner.shutdown();
    match runner.join() {
        Err(Error::Fenced { .. }) => {}
        other => panic!("expected the moved projection to be fenced, got {other:?}"),
    }
    // The replaced layout applied nothing after the switch: the new one applies the rest.
    Builder::new(schema.database.clone(), Recorder::named("moved"))
        .partitions(0..3)
        .total_partitions(3)
        .exit_when_caught_up(true)
        .start()
        .expect("start the new layout")
        .join()
        .expect("the new layout catches up");
    assert!(recorded_exactly(&schema, "moved", 100, 5));
}

#[test]
fn a_newcomer_catching_up_alone_still_finishes_when_the_runner_exits_once_caught_up() {
    let schema = TestSchema::migrated("newcomer_exits");
    schema.seed(120, 5);
    catch_up(Builder::new(
        schema.database.clone(),
        Recorder::named("first"),
    ));
    let mut settings = Settings::default();
    settings.catch_up_alone_beyond = 10;
    settings.batch_size = 50;
    settings.exit_when_caught_up = true;
    let summary = Builder::new(schema.database.clone(), Recorder::named("first"))
        .projection(Recorder::named("second"))
        .partitions(0..4)
        .total_partitions(4)
        .settings(settings)
        .start()
        .expect("start")
        .join()
        .expect("join");
    assert_eq!(summary.projections[0].applied(), 0);
    assert_eq!(summary.projections[1].applied(), 600);
    assert!(recorded_exactly(&schema, "second", 120, 5));
    assert_eq!(checkpoints_at(&schema, "second"), vec![600; 4]);
}
