//! Transactions that commit out of order, roll back, or stay open: nothing is skipped.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use projector::postgres::{Client, Transaction};
use projector::projections::AggregateStats;
use projector::{BoxError, Builder, Context, Event, Projection, Runner};

use crate::util::{TestSchema, eventually};

/// Records every applied event in `journal`, in the order applied; a position applied twice
/// violates the primary key. Also keeps `aggregate_stats`, which checks per-aggregate order.
#[derive(Clone)]
struct Journal;

impl Projection for Journal {
    fn name(&self) -> &str {
        "journal"
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS journal (
                 n BIGSERIAL,
                 global_position BIGINT PRIMARY KEY,
                 aggregate_id TEXT NOT NULL
             )",
        )?;
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
        let positions: Vec<i64> = events.iter().map(|e| e.global_position).collect();
        let ids: Vec<&str> = events.iter().map(|e| e.aggregate_id.as_str()).collect();
        tx.execute(
            "INSERT INTO journal (global_position, aggregate_id) \
             SELECT p, a FROM unnest($1::bigint[], $2::text[]) WITH ORDINALITY AS j(p, a, o) \
             ORDER BY o",
            &[&positions, &ids],
        )?;
        AggregateStats.apply_batch(tx, events, context)
    }
}

fn start_live(schema: &TestSchema, total: u32) -> Runner {
    Builder::new(schema.database.clone(), Journal)
        .partitions(0..total)
        .total_partitions(total)
        .poll_interval(Duration::from_millis(50))
        .start()
        .expect("start the projector")
}

/// Inserts one event for `aggregate_id` at `version` through `client` (no notification, as a
/// writer that knows nothing of the projector would), returning its position.
fn insert(
    client: &mut impl projector::postgres::GenericClient,
    aggregate_id: &str,
    version: i64,
) -> i64 {
    client
        .query_one(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                 event_id, event_type, payload) \
             VALUES ('test', 'Thing', $1, $2, gen_random_uuid(), 'Happened', '\\x7b7d') \
             RETURNING global_position",
            &[&aggregate_id, &version],
        )
        .expect("insert an event")
        .get(0)
}

fn journal(schema: &TestSchema) -> Vec<i64> {
    schema
        .client()
        .query("SELECT global_position FROM journal ORDER BY n", &[])
        .expect("read the journal")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn max_checkpoint(schema: &TestSchema) -> i64 {
    schema.count("SELECT COALESCE(MAX(last_position), 0) FROM projector_checkpoints")
}

#[test]
fn a_position_held_by_an_open_transaction_is_waited_for_then_applied_in_order() {
    let schema = TestSchema::migrated("gap_held");
    schema.seed(3, 2);
    let runner = start_live(&schema, 1);
    eventually("the backlog", Duration::from_secs(20), || {
        journal(&schema).len() == 6
    });

    let mut holder = schema.client();
    let mut held = holder.transaction().expect("begin");
    let p = insert(&mut held, "slow-1", 1);
    let mut other = schema.client();
    let after = insert(&mut other, "fast-1", 1);
    assert_eq!(after, p + 1);

    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        journal(&schema).len(),
        6,
        "nothing past the open position is applied"
    );
    assert!(
        max_checkpoint(&schema) < p,
        "the checkpoint stays before the open position"
    );

    held.commit().expect("commit the slow transaction");
    eventually("both events", Duration::from_secs(5), || {
        journal(&schema).len() == 8
    });
    assert_eq!(
        journal(&schema)[6..],
        [p, p + 1],
        "applied in position order"
    );
    runner.shutdown();
    runner.join().expect("clean stop");
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn a_rolled_back_position_is_passed_within_a_second() {
    let schema = TestSchema::migrated("gap_rollback");
    let runner = start_live(&schema, 2);
    let mut holder = schema.client();
    let mut held = holder.transaction().expect("begin");
    let p = insert(&mut held, "doomed-1", 1);
    let mut other = schema.client();
    let after = insert(&mut other, "fast-1", 1);
    assert_eq!(after, p + 1);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        journal(&schema).is_empty(),
        "held back while the position may commit"
    );

    held.rollback().expect("roll back");
    let rolled_back = Instant::now();
    eventually("the event after the hole", Duration::from_secs(5), || {
        journal(&schema) == [after]
    });
    let took = rolled_back.elapsed();
    assert!(took < Duration::from_millis(1_200), "took {took:?}");
    runner.shutdown();
    runner.join().expect("clean stop");
}

#[test]
fn an_unrelated_idle_transaction_does_not_stop_progress() {
    let schema = TestSchema::migrated("gap_idle");
    let mut idle = schema.client();
    idle.batch_execute("CREATE TABLE unrelated (x INT)")
        .expect("create a table");
    // Idle in transaction, having written elsewhere (so it has a transaction id), for the
    // whole test.
    let mut idle_tx = idle.transaction().expect("begin");
    idle_tx
        .execute("INSERT INTO unrelated VALUES (1)", &[])
        .expect("write elsewhere");

    let runner = start_live(&schema, 2);
    let mut writer = schema.client();
    {
        let mut doomed = writer.transaction().expect("begin");
        insert(&mut doomed, "doomed-1", 1);
        doomed.rollback().expect("roll back");
    }
    let after = insert(&mut writer, "fast-1", 1);
    let started = Instant::now();
    eventually("the event after the hole", Duration::from_secs(5), || {
        journal(&schema) == [after]
    });
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "took {:?}",
        started.elapsed()
    );
    idle_tx.rollback().expect("end the idle transaction");
    runner.shutdown();
    runner.join().expect("clean stop");
}

#[test]
fn events_committed_out_of_order_by_many_writers_are_all_applied_once_in_order() {
    const WRITERS: usize = 8;
    const EVENTS: usize = 100_000;
    let schema = TestSchema::migrated("gap_stress");
    let runner = start_live(&schema, 4);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let database = schema.database.clone();
            std::thread::spawn(move || {
                write_randomly(database.connect().expect("connect"), w, EVENTS / WRITERS)
            })
        })
        .collect();
    let started = Instant::now();
    let mut rolled_back = 0;
    for writer in writers {
        rolled_back += writer.join().expect("writer thread");
    }
    eprintln!("writers done in {:?}", started.elapsed());
    let committed = schema.count("SELECT COUNT(*) FROM events");
    assert_eq!(committed as usize, EVENTS);
    assert!(
        rolled_back > EVENTS / 20,
        "only {rolled_back} events rolled back"
    );
    eventually("every committed event", Duration::from_secs(300), || {
        schema.count("SELECT COUNT(*) FROM journal") >= committed
    });
    eprintln!("all applied after {:?}", started.elapsed());
    runner.shutdown();
    runner.join().expect("clean stop");
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM journal"),
        committed,
        "each applied once"
    );
    assert_eq!(
        schema.count(
            "SELECT COUNT(*) FROM journal j LEFT JOIN events e USING (global_position) \
             WHERE e.global_position IS NULL"
        ),
        0,
        "nothing that rolled back was applied"
    );
    assert_eq!(schema.stats_mismatches(), 0, "per-aggregate order held");
}

/// Appends `events` committed events for aggregates of its own, in transactions of 1 to 4
/// events with random delays before commit and about one in ten rolled back. Half the writers
/// notify, as the library's append does; the others are silent. Returns events rolled back.
fn write_randomly(mut client: Client, writer: usize, events: usize) -> usize {
    let mut random =
        Random(0x9e37_79b9_7f4a_7c15 ^ (writer as u64 + 1).wrapping_mul(0x1234_5678_9abc));
    let mut versions: HashMap<String, i64> = HashMap::new();
    let (mut written, mut rolled_back) = (0, 0);
    while written < events {
        let size = (1 + random.below(4) as usize).min(events - written);
        let mut tx = client.transaction().expect("begin");
        let mut staged = Vec::new();
        for _ in 0..size {
            let id = format!("w{writer}-a{}", random.below(40));
            let version = staged
                .iter()
                .rev()
                .find(|(staged_id, _): &&(String, i64)| *staged_id == id)
                .map(|(_, v)| *v)
                .unwrap_or_else(|| versions.get(&id).copied().unwrap_or(0))
                + 1;
            insert(&mut tx, &id, version);
            staged.push((id, version));
        }
        if writer % 2 == 0 {
            tx.execute(
                "SELECT pg_notify('projector_events_' || current_schema(), 'x')",
                &[],
            )
            .expect("notify");
        }
        let pause = random.below(3);
        if pause > 0 {
            std::thread::sleep(Duration::from_micros(pause * 700));
        }
        if random.below(10) == 0 {
            tx.rollback().expect("roll back");
            rolled_back += size;
        } else {
            tx.commit().expect("commit");
            written += size;
            for (id, version) in staged {
                versions.insert(id, version);
            }
        }
    }
    rolled_back
}

/// A small deterministic generator (xorshift), enough for test timing and choices.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn a_sequence_that_caches_positions_is_refused_with_the_fix() {
    let schema = TestSchema::migrated("gap_cache");
    schema
        .client()
        .batch_execute("ALTER SEQUENCE events_global_position_seq CACHE 20")
        .expect("alter the sequence");
    let refused = Builder::new(schema.database.clone(), Journal).start();
    match refused {
        Err(error) => {
            assert!(error.is_configuration(), "{error:?}");
            let message = error.to_string();
            assert!(
                message.starts_with(&format!(
                    "invalid value '20' for the CACHE of sequence {}.events_global_position_seq",
                    schema.name
                )) && message.ends_with("CACHE 1"),
                "{message}"
            );
        }
        Ok(_) => panic!("a cached sequence must be refused"),
    }
}
