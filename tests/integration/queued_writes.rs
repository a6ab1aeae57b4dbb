//! Queued writes (`Context::queue`): sent together before the checkpoint, in the same
//! transaction, with the guarantees of one statement per event: exactly once, each aggregate
//! in order, and a failure that names its event (which then stops or is parked as configured).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use projector::postgres::Transaction;
use projector::postgres::types::Type;
use projector::projections::{AggregateStats, AggregateStatsBatch, Users};
use projector::{
    BoxError, Builder, Context, Error, Event, PoisonPolicy, Projection, QueuedWrite, Settings,
    Summary, dead_letters,
};

use crate::util::{TestSchema, join_within};

const LIMIT: Duration = Duration::from_secs(60);

fn quick_retries() -> Settings {
    let mut settings = Settings::default();
    settings.retry_delay = Duration::from_millis(20);
    settings.max_retry_delay = Duration::from_millis(50);
    settings
}

/// Runs `projection` until caught up on partitions 0-1 of 2, in batches of `batch` events.
fn catch_up<P: Projection>(
    schema: &TestSchema,
    projection: P,
    policy: PoisonPolicy,
    batch: u32,
) -> Result<Summary, Error> {
    let runner = Builder::new(schema.database.clone(), projection)
        .partitions(0..2)
        .total_partitions(2)
        .batch_size(batch)
        .settings(quick_retries())
        .on_poison(policy)
        .exit_when_caught_up(true)
        .start()?;
    join_within(runner, LIMIT)
}

/// Per aggregate: the name and position of its last event (a later write of the same key
/// wins), written by two statements in turn (odd and even versions), and how many events it
/// had (an increment per event: none lost, none doubled).
const NAME_ODD: QueuedWrite = QueuedWrite::new(
    "INSERT INTO names AS n (id, name, position) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) \
     ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, position = EXCLUDED.position",
    &[Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::INT8_ARRAY],
)
.keyed_by(1);
const NAME_EVEN: QueuedWrite = QueuedWrite::new(
    "UPDATE names AS n SET name = r.name, position = r.position \
     FROM unnest($1::text[], $2::text[], $3::int8[]) AS r(id, name, position) WHERE n.id = r.id",
    &[Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::INT8_ARRAY],
)
.keyed_by(1);
const COUNT: QueuedWrite = QueuedWrite::new(
    "INSERT INTO name_counts AS c (id, events) SELECT id, 1 FROM unnest($1::text[]) AS r(id) \
     ON CONFLICT (id) DO UPDATE SET events = c.events + 1",
    &[Type::TEXT_ARRAY],
)
.keyed_by(1);
/// One row per event applied: a second application of an event breaks the primary key.
const APPLIED: QueuedWrite = QueuedWrite::new(
    "INSERT INTO applied (position, aggregate_id, check_value) \
     SELECT * FROM unnest($1::int8[], $2::text[], $3::int4[])",
    &[Type::INT8_ARRAY, Type::TEXT_ARRAY, Type::INT4_ARRAY],
);

/// Queues the writes above for each event; fails (or panics) after queueing, on the events
/// `fail_on` names, while `broken` is set; and queues a row its table refuses (a check
/// constraint) for the events `refused` names.
#[derive(Clone)]
struct Queuing {
    fail_on: Vec<(&'static str, i64)>,
    refused: Vec<(&'static str, i64)>,
    panic: bool,
    broken: Arc<AtomicBool>,
    /// Calls of `apply`: once per event, unless a transaction failed and was tried again.
    calls: Arc<AtomicU64>,
}

impl Queuing {
    fn plain() -> Queuing {
        Queuing {
            fail_on: Vec::new(),
            refused: Vec::new(),
            panic: false,
            broken: Arc::new(AtomicBool::new(true)),
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    fn names(event: &Event, list: &[(&'static str, i64)]) -> bool {
        list.iter()
            .any(|(id, version)| event.aggregate_id == *id && event.aggregate_version == *version)
    }
}

impl Projection for Queuing {
    fn name(&self) -> &str {
        "queuing"
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS names (id TEXT PRIMARY KEY, name TEXT NOT NULL, \
                 position BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS name_counts (id TEXT PRIMARY KEY, events BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS applied (position BIGINT PRIMARY KEY, \
                 aggregate_id TEXT NOT NULL, check_value INT NOT NULL CHECK (check_value > 0));",
        )?;
        Ok(())
    }

    fn apply(
        &mut self,
        _: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let name = format!("{}@{}", event.aggregate_id, event.aggregate_version);
        let by_parity = if event.aggregate_version % 2 == 1 {
            &NAME_ODD
        } else {
            &NAME_EVEN
        };
        context.queue(
            by_parity,
            &[&event.aggregate_id, &name, &event.global_position],
        )?;
        context.queue(&COUNT, &[&event.aggregate_id])?;
        let check_value: i32 = if Self::names(event, &self.refused) {
            -1
        } else {
            1
        };
        context.queue(
            &APPLIED,
            &[&event.global_position, &event.aggregate_id, &check_value],
        )?;
        if self.broken.load(Ordering::SeqCst) && Self::names(event, &self.fail_on) {
            if self.panic {
                panic!("cannot handle {}", event.event_type);
            }
            return Err("the read model refused it".into());
        }
        Ok(())
    }
}

/// The last version per aggregate, as `names` and `name_counts` should hold it.
fn check_names(schema: &TestSchema, aggregates: i64, per_aggregate: i64) {
    let mut client = schema.client();
    let rows = client
        .query(
            "SELECT n.id, n.name, n.position, c.events, \
                 (SELECT max(global_position) FROM events e WHERE e.aggregate_id = n.id) \
             FROM names n JOIN name_counts c USING (id) ORDER BY n.id",
            &[],
        )
        .expect("read names");
    assert_eq!(rows.len() as i64, aggregates);
    for row in rows {
        let (id, name, position, events, last): (String, String, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!(
            name,
            format!("{id}@{per_aggregate}"),
            "the last write of {id}"
        );
        assert_eq!(position, last, "the last position of {id}");
        assert_eq!(events, per_aggregate, "the events counted for {id}");
    }
}

#[test]
fn a_later_queued_write_of_the_same_key_wins_within_one_transaction() {
    let schema = TestSchema::migrated("queued_order");
    // 8 aggregates of 12 events each, interleaved: one batch holds all 12 of every aggregate,
    // alternating between the two statements that write its name.
    let events = schema.seed(8, 12);
    let projection = Queuing::plain();
    let calls = Arc::clone(&projection.calls);
    let summary = catch_up(&schema, projection, PoisonPolicy::Stop, 1000)
        .expect("catch up with queued writes");
    assert_eq!(summary.applied(), events as u64);
    // Each event was applied once: the transaction's writes were sent together and did not
    // fail (a failure would have applied the events again, one by one).
    assert_eq!(calls.load(Ordering::SeqCst), events as u64);
    check_names(&schema, 8, 12);
    assert_eq!(schema.count("SELECT count(*) FROM applied"), events);
}

#[test]
fn queued_writes_apply_exactly_once_across_a_restart_mid_stream() {
    let schema = TestSchema::migrated("queued_restart");
    let events = schema.seed(30, 10);
    let broken = Arc::new(AtomicBool::new(true));
    let projection = Queuing {
        fail_on: vec![("thing-7", 6)],
        broken: Arc::clone(&broken),
        ..Queuing::plain()
    };
    // The first run stops on thing-7's sixth event, after committing what came before it.
    let error = catch_up(&schema, projection.clone(), PoisonPolicy::Stop, 37)
        .expect_err("stops on thing-7");
    assert!(
        matches!(&error, Error::Projection { aggregate_id, .. } if aggregate_id == "thing-7"),
        "{error}"
    );
    let applied_first = schema.count("SELECT count(*) FROM applied");
    assert!(
        0 < applied_first && applied_first < events,
        "stopped mid-stream: {applied_first} of {events}"
    );
    // Every queued write of a committed event is in, and none of the others.
    let mut client = schema.client();
    let counted: i64 = client
        .query_one(
            "SELECT COALESCE(sum(events), 0)::int8 FROM name_counts",
            &[],
        )
        .expect("sum counts")
        .get(0);
    assert_eq!(counted, applied_first);
    broken.store(false, Ordering::SeqCst);
    let summary = catch_up(&schema, projection, PoisonPolicy::Stop, 37).expect("second run");
    assert_eq!(summary.applied() as i64 + applied_first, events);
    check_names(&schema, 30, 10);
    assert_eq!(schema.count("SELECT count(*) FROM applied"), events);
}

#[test]
fn a_queued_write_the_database_refuses_names_its_event_and_stops_or_is_parked() {
    let refused = ("thing-3", 4);
    let position = |schema: &TestSchema| {
        schema.count(
            "SELECT global_position FROM events WHERE aggregate_id = 'thing-3' \
             AND aggregate_version = 4",
        )
    };
    // Stop: the projection stops just before the event, named.
    let schema = TestSchema::migrated("queued_refused_stop");
    schema.seed(10, 6);
    let projection = Queuing {
        refused: vec![refused],
        ..Queuing::plain()
    };
    let error = catch_up(&schema, projection.clone(), PoisonPolicy::Stop, 1000)
        .expect_err("stops on the refused write");
    match &error {
        Error::Projection {
            position: at,
            aggregate_id,
            attempts,
            source,
            ..
        } => {
            assert_eq!(*at, position(&schema));
            assert_eq!(aggregate_id, "thing-3");
            assert_eq!(*attempts, Settings::default().max_attempts);
            assert!(
                source.to_string().contains("check_value_check") || {
                    let chain = projector::error_chain(source.as_ref());
                    chain.contains("check constraint")
                },
                "{}",
                projector::error_chain(source.as_ref())
            );
        }
        other => panic!("expected the projection to stop on thing-3: {other}"),
    }
    assert_eq!(
        schema.count("SELECT count(*) FROM applied WHERE aggregate_id = 'thing-3'"),
        3
    );

    // Park: the event and the later ones of its aggregate are parked; the others go on.
    let schema = TestSchema::migrated("queued_refused_park");
    let events = schema.seed(10, 6);
    let summary =
        catch_up(&schema, projection, PoisonPolicy::Park, 1000).expect("parks and goes on");
    assert_eq!(summary.parked(), 3);
    assert_eq!(summary.applied() as i64, events - 3);
    let parked = dead_letters(&mut schema.client(), Some("queuing")).expect("list parked");
    assert_eq!(parked.len(), 3);
    assert_eq!(parked[0].global_position, position(&schema));
    assert_eq!(parked[0].aggregate_id, "thing-3");
    assert!(parked[0].error.contains("check"), "{}", parked[0].error);
    assert_eq!(
        schema.count("SELECT count(*) FROM applied WHERE aggregate_id = 'thing-3'"),
        3
    );
    assert_eq!(schema.count("SELECT count(*) FROM applied"), events - 3);
}

#[test]
fn an_event_whose_apply_fails_or_panics_leaves_none_of_its_queued_writes() {
    for panic in [false, true] {
        let schema = TestSchema::migrated(if panic {
            "queued_panic"
        } else {
            "queued_error"
        });
        let events = schema.seed(10, 6);
        let projection = Queuing {
            fail_on: vec![("thing-5", 2)],
            panic,
            ..Queuing::plain()
        };
        let summary = catch_up(&schema, projection, PoisonPolicy::Park, 1000)
            .unwrap_or_else(|e| panic!("panic {panic}: parks and goes on: {e}"));
        // thing-5's events from version 2 are parked; what it queued for version 2 (before
        // failing) is nowhere.
        assert_eq!(summary.parked(), 5, "panic {panic}");
        assert_eq!(
            schema.count("SELECT count(*) FROM applied WHERE aggregate_id = 'thing-5'"),
            1,
            "panic {panic}"
        );
        assert_eq!(
            schema.count("SELECT events FROM name_counts WHERE id = 'thing-5'"),
            1,
            "panic {panic}"
        );
        assert_eq!(
            schema.count("SELECT count(*) FROM applied"),
            events - 5,
            "panic {panic}"
        );
    }
}

/// `aggregate-stats` and `users` as they were written before queued writes: one statement per
/// event, in the same tables. The queued ones must leave the same read models.
#[derive(Clone)]
struct OneStatementPerEvent {
    name: &'static str,
}

impl Projection for OneStatementPerEvent {
    fn name(&self) -> &str {
        self.name
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS aggregate_stats (bounded_context TEXT NOT NULL, \
                 aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, \
                 events_applied BIGINT NOT NULL, last_version BIGINT NOT NULL, \
                 last_global_position BIGINT NOT NULL, \
                 PRIMARY KEY (bounded_context, aggregate_type, aggregate_id));
             CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, email TEXT NOT NULL, \
                 name TEXT NOT NULL, version BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS user_partition_counts (total_partitions INT NOT NULL, \
                 partition_key INT NOT NULL, users BIGINT NOT NULL, \
                 PRIMARY KEY (total_partitions, partition_key));",
        )?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError> {
        if self.name == "aggregate-stats" {
            let written = tx.execute(
                "INSERT INTO aggregate_stats AS s VALUES ($1, $2, $3, 1, $4, $5) \
                 ON CONFLICT (bounded_context, aggregate_type, aggregate_id) DO UPDATE \
                 SET events_applied = s.events_applied + 1, last_version = EXCLUDED.last_version, \
                     last_global_position = EXCLUDED.last_global_position \
                 WHERE s.last_version + 1 = EXCLUDED.last_version",
                &[
                    &event.bounded_context,
                    &event.aggregate_type,
                    &event.aggregate_id,
                    &event.aggregate_version,
                    &event.global_position,
                ],
            )?;
            return if written == 1 {
                Ok(())
            } else {
                Err("out of order".into())
            };
        }
        let payload: serde_json::Value = serde_json::from_slice(&event.payload)?;
        let field = |name: &str| payload[name].as_str().unwrap_or_default().to_owned();
        match event.event_type.as_str() {
            "UserCreated" => {
                tx.execute(
                    "INSERT INTO users (id, email, name, version) VALUES ($1, $2, $3, $4)",
                    &[
                        &event.aggregate_id,
                        &field("email"),
                        &field("name"),
                        &event.aggregate_version,
                    ],
                )?;
                let (total, key) = (context.total_partitions as i32, context.partition as i32);
                tx.execute(
                    "INSERT INTO user_partition_counts VALUES ($1, $2, 1) \
                     ON CONFLICT (total_partitions, partition_key) \
                     DO UPDATE SET users = user_partition_counts.users + 1",
                    &[&total, &key],
                )?;
            }
            "UserRenamed" => {
                tx.execute(
                    "UPDATE users SET name = $2, version = $3 WHERE id = $1",
                    &[
                        &event.aggregate_id,
                        &field("name"),
                        &event.aggregate_version,
                    ],
                )?;
            }
            "UserEmailChanged" => {
                tx.execute(
                    "UPDATE users SET email = $2, version = $3 WHERE id = $1",
                    &[
                        &event.aggregate_id,
                        &field("email"),
                        &event.aggregate_version,
                    ],
                )?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Appends users' lives: each created, then renamed and its e-mail changed in turns, so that
/// one batch holds several events of every user, of different statements.
fn seed_users(schema: &TestSchema, users: i64, per_user: i64) {
    schema
        .client()
        .execute(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
                 aggregate_version, event_id, event_type, payload) \
             SELECT 'test', 'User', 'user-' || u, v, gen_random_uuid(), \
                 CASE WHEN v = 1 THEN 'UserCreated' WHEN v % 2 = 0 THEN 'UserRenamed' \
                     ELSE 'UserEmailChanged' END, \
                 convert_to(json_build_object('email', 'u' || u || '.' || v || '@example.com', \
                     'name', 'User ' || u || ' v' || v)::text, 'UTF8') \
             FROM generate_series(1, $2::int8) v, generate_series(1, $1::int8) u ORDER BY v, u",
            &[&users, &per_user],
        )
        .expect("seed users");
}

/// The read models of `aggregate-stats` and `users`, as text, row by row.
fn read_models(schema: &TestSchema) -> Vec<String> {
    let mut client = schema.client();
    let mut rows = Vec::new();
    for sql in [
        "SELECT format('%s %s %s %s %s %s', bounded_context, aggregate_type, aggregate_id, \
             events_applied, last_version, last_global_position) FROM aggregate_stats ORDER BY 1",
        "SELECT format('%s %s %s %s', id, email, name, version) FROM users ORDER BY 1",
        "SELECT format('%s %s %s', total_partitions, partition_key, users) \
         FROM user_partition_counts ORDER BY 1",
    ] {
        for row in client.query(sql, &[]).expect(sql) {
            rows.push(row.get::<_, String>(0));
        }
    }
    rows
}

#[test]
fn the_queued_built_ins_leave_the_read_models_of_one_statement_per_event() {
    let queued = TestSchema::migrated("queued_built_ins");
    let plain = TestSchema::migrated("plain_built_ins");
    for schema in [&queued, &plain] {
        seed_users(schema, 60, 9);
        schema.seed(50, 7);
    }
    catch_up(&queued, AggregateStats, PoisonPolicy::Stop, 500).expect("queued aggregate-stats");
    catch_up(&queued, Users, PoisonPolicy::Stop, 500).expect("queued users");
    let stats = OneStatementPerEvent {
        name: "aggregate-stats",
    };
    catch_up(&plain, stats, PoisonPolicy::Stop, 500).expect("plain aggregate-stats");
    catch_up(
        &plain,
        OneStatementPerEvent { name: "users" },
        PoisonPolicy::Stop,
        500,
    )
    .expect("plain users");
    let (queued_rows, plain_rows) = (read_models(&queued), read_models(&plain));
    assert_eq!(queued_rows.len(), 60 + 50 + 60 + 2);
    assert_eq!(queued_rows, plain_rows);
    assert_eq!(queued.stats_mismatches(), 0);
}

#[test]
fn queued_aggregate_stats_still_refuses_an_event_out_of_order() {
    let schema = TestSchema::migrated("queued_out_of_order");
    schema.seed(5, 3);
    // thing-2 skips version 4: its version 5 does not follow.
    schema
        .client()
        .batch_execute(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
                 aggregate_version, event_id, event_type, payload) \
             VALUES ('test', 'Thing', 'thing-2', 5, gen_random_uuid(), 'Happened', '{}')",
        )
        .expect("append out of order");
    let error = catch_up(&schema, AggregateStats, PoisonPolicy::Stop, 1000)
        .expect_err("stops on the gap in versions");
    assert!(
        matches!(&error, Error::Projection { aggregate_id, .. } if aggregate_id == "thing-2"),
        "{error}"
    );
    assert_eq!(schema.stats_applied(), 15);
}

#[test]
fn the_built_in_aggregate_stats_tables_leave_room_for_updates_on_their_pages() {
    let schema = TestSchema::migrated("stats_fillfactor");
    schema.seed(3, 2);
    catch_up(&schema, AggregateStats, PoisonPolicy::Stop, 100).expect("aggregate-stats");
    catch_up(&schema, AggregateStatsBatch, PoisonPolicy::Stop, 100).expect("batch");
    let mut client = schema.client();
    for table in ["aggregate_stats", "aggregate_stats_batch"] {
        let options: Option<Vec<String>> = client
            .query_one(
                "SELECT reloptions FROM pg_class WHERE oid = to_regclass($1)",
                &[&table],
            )
            .expect("reloptions")
            .get(0);
        assert_eq!(options, Some(vec!["fillfactor=50".to_owned()]), "{table}");
    }
    assert_eq!(schema.stats_mismatches(), 0);
}
