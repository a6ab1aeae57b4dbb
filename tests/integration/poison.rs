//! Poison events, counted fairly and kept in bounds: attempts are counted per event (a
//! transient failure of one event spends none of another's), the parked aggregates are looked
//! up at a cost that does not grow with their parked events, and a projection that parks
//! aggregate after aggregate (a bug, not bad events) is stopped by a breaker.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use projector::postgres::GenericClient;
use projector::{BoxError, Builder, Error, Event, PoisonPolicy, Projection, Settings, Summary};

use crate::util::{EachEvent, TestSchema, join_within, run_within, text};

const LIMIT: Duration = Duration::from_secs(60);

fn quick_retries() -> Settings {
    let mut settings = Settings::default();
    settings.retry_delay = Duration::from_millis(20);
    settings.max_retry_delay = Duration::from_millis(50);
    settings
}

/// Runs `projection` over the stream until caught up, on two partitions, with `policy`.
fn catch_up<F>(
    schema: &TestSchema,
    projection: EachEvent<F>,
    policy: PoisonPolicy,
    settings: Settings,
) -> Result<Summary, Error>
where
    F: FnMut(&Event) -> Result<(), BoxError> + Clone + Send + 'static,
{
    let runner = Builder::new(schema.database.clone(), projection)
        .partitions(0..2)
        .total_partitions(2)
        .settings(settings)
        .on_poison(policy)
        .exit_when_caught_up(true)
        .start()
        .expect("start");
    join_within(runner, LIMIT)
}

fn parked_events(schema: &TestSchema) -> i64 {
    schema.count("SELECT COUNT(*) FROM projection_dead_letters")
}

#[test]
fn transient_failures_of_several_events_of_one_batch_each_spend_only_their_own_attempts() {
    for policy in [PoisonPolicy::Stop, PoisonPolicy::Park] {
        let schema = TestSchema::migrated("per_event_attempts");
        let events = schema.seed(40, 2);
        // The first event of eight aggregates fails once (a deadlock, a serialization failure),
        // then applies: each is in the first batch of its partition.
        let failed_once = Arc::new(Mutex::new(HashSet::new()));
        let flaky_once = EachEvent {
            name: "flaky-once",
            apply: move |event: &Event| -> Result<(), BoxError> {
                let transient = event.aggregate_version == 1
                    && ["thing-1", "thing-2", "thing-3", "thing-4"]
                        .iter()
                        .chain(&["thing-5", "thing-6", "thing-7", "thing-8"])
                        .any(|id| *id == event.aggregate_id);
                if transient
                    && failed_once
                        .lock()
                        .expect("lock")
                        .insert(event.global_position)
                {
                    return Err("deadlock detected (SQLSTATE 40P01)".into());
                }
                Ok(())
            },
        };
        let summary = catch_up(&schema, flaky_once, policy, quick_retries())
            .unwrap_or_else(|e| panic!("{policy:?}: stopped on transient failures: {e}"));
        assert_eq!(
            summary.parked(),
            0,
            "{policy:?}: parked a healthy aggregate"
        );
        assert_eq!(parked_events(&schema), 0, "{policy:?}");
        assert_eq!(summary.applied(), events as u64, "{policy:?}: {summary:?}");
    }
}

#[test]
fn a_projection_that_fails_on_every_event_is_stopped_by_the_park_storm_breaker() {
    let schema = TestSchema::migrated("park_storm");
    schema.seed(200, 1);
    let broken = EachEvent {
        name: "broken",
        apply: |_: &Event| -> Result<(), BoxError> { Err("column \"nme\" does not exist".into()) },
    };
    let error = catch_up(&schema, broken, PoisonPolicy::Park, quick_retries())
        .expect_err("a park storm stops the projection");
    let message = error.to_string();
    let limit = Settings::default().park_storm_limit;
    assert!(
        matches!(error, Error::ParkStorm { .. }),
        "{error:?}: {message}"
    );
    assert!(
        message.contains("'broken'")
            && message.contains(&format!("{limit} aggregates"))
            && message.contains("dead-letters list"),
        "{message}"
    );
    let parked = schema.count("SELECT COUNT(DISTINCT aggregate_id) FROM projection_dead_letters");
    // Up to the limit (fewer when a worker was stopped between deciding to park and parking).
    assert!(
        (1..=i64::from(limit)).contains(&parked),
        "{parked} aggregates parked, the limit is {limit}"
    );
}

#[test]
fn the_binary_stops_a_park_storm_at_the_limit_given() {
    let schema = TestSchema::migrated("park_storm_binary");
    schema.seed(50, 1);
    // aggregate_stats refuses every write.
    let mut client = schema.client();
    let mut tx = client.transaction().expect("begin");
    projector::projections::AggregateStats
        .setup(&mut tx)
        .expect("create aggregate_stats");
    tx.batch_execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             RAISE EXCEPTION 'refused: %', NEW.aggregate_id; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON aggregate_stats \
             FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .expect("create the trigger");
    tx.commit().expect("commit");
    let output = run_within(
        schema.aggregate_stats(
            "0-1",
            "2",
            &[
                "--on-poison",
                "park",
                "--park-storm-limit",
                "3",
                "--exit-when-caught-up",
            ],
        ),
        LIMIT,
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("park storm") && stderr.contains("'aggregate-stats'"),
        "{stderr}"
    );
    let parked = schema.count("SELECT COUNT(DISTINCT aggregate_id) FROM projection_dead_letters");
    assert!((1..=3).contains(&parked), "{parked} parked");
}

/// The query a worker runs in each transaction to find its projection's parked aggregates.
const PARKED_AGGREGATES: &str = include_str!("../../sql/parked_aggregates.sql");

/// Rows the transaction `client` is in has read from `projection_dead_letters` and its
/// indexes so far.
fn dead_letter_rows_read(client: &mut impl GenericClient) -> i64 {
    client
        .query_one(
            "SELECT SUM(pg_stat_get_xact_tuples_returned(oid))::bigint FROM pg_class \
             WHERE oid = 'projection_dead_letters'::regclass OR oid IN ( \
                 SELECT indexrelid FROM pg_index \
                 WHERE indrelid = 'projection_dead_letters'::regclass)",
            &[],
        )
        .expect("read the table statistics")
        .get(0)
}

#[test]
fn the_parked_aggregates_are_found_without_reading_their_parked_events() {
    let schema = TestSchema::migrated("parked_lookup");
    let mut client = schema.client();
    // A million parked events of one aggregate, and one of three others (and of another
    // projection).
    client
        .batch_execute(
            "INSERT INTO projection_dead_letters (projection, global_position, bounded_context, \
                 aggregate_type, aggregate_id, event_type, error, attempts) \
             SELECT 'busy', p, 'test', 'Thing', 'hot-1', 'Happened', 'parked behind', 0 \
             FROM generate_series(1, 1000000) p; \
             INSERT INTO projection_dead_letters (projection, global_position, bounded_context, \
                 aggregate_type, aggregate_id, event_type, error, attempts) \
             VALUES ('busy', 2000001, 'test', 'Thing', 'cold-1', 'Happened', 'failed', 3), \
                 ('busy', 2000002, 'test', 'Thing', 'cold-2', 'Happened', 'failed', 3), \
                 ('busy', 2000003, 'test', 'Thing', 'a-0', 'Happened', 'failed', 3), \
                 ('other', 2000004, 'test', 'Thing', 'else-1', 'Happened', 'failed', 3)",
        )
        .expect("park a million events");
    client
        .batch_execute("VACUUM ANALYZE projection_dead_letters")
        .expect("vacuum");
    let mut tx = client.transaction().expect("begin");
    // Parallel workers' reads would not be counted in this session's statistics.
    tx.batch_execute("SET LOCAL max_parallel_workers_per_gather = 0")
        .expect("no parallel workers");
    let before = dead_letter_rows_read(&mut tx);
    let started = Instant::now();
    let mut found: Vec<String> = tx
        .query(PARKED_AGGREGATES, &[&"busy"])
        .expect("look the parked aggregates up")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let took = started.elapsed();
    let read = dead_letter_rows_read(&mut tx) - before;
    found.sort();
    assert_eq!(found, ["a-0", "cold-1", "cold-2", "hot-1"]);
    assert!(
        read < 100,
        "the lookup read {read} rows of projection_dead_letters (in {took:?}) for 4 parked \
         aggregates"
    );
    eprintln!("parked-aggregate lookup over 1,000,004 parked events: {read} rows, {took:?}");
}
