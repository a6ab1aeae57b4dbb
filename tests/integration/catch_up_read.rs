//! Partitions that start far behind the shared read (a projection added to a running group, a
//! new version built beside the live one) are read for together: the stream is read once for
//! them, not once per partition, and every event still reaches each exactly once, in order,
//! also when one of them falls behind the others and reads the rest by itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use projector::{Builder, Database, Settings};

use crate::several_projections::{Recorder, catch_up, recorded_exactly};
use crate::util::{TestSchema, cut_connections_named, database_named, eventually, insert_event};

/// Rows of `events` read so far, by sequential and index scans, as the server counts them.
fn events_rows_read(schema: &TestSchema) -> i64 {
    let mut client = schema.client();
    client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .expect("clear the statistics snapshot");
    client
        .query_one(
            "SELECT (COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0))::bigint \
             FROM pg_stat_user_tables WHERE relid = 'events'::regclass",
            &[],
        )
        .expect("read the events table's statistics")
        .get(0)
}

/// Waits until the server's count of rows read from `events` has stopped moving (a backend
/// reports its counts when it goes idle or exits).
fn settled_rows_read(schema: &TestSchema) -> i64 {
    let mut last = events_rows_read(schema);
    let mut still = 0;
    while still < 4 {
        std::thread::sleep(Duration::from_millis(500));
        let now = events_rows_read(schema);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    last
}

/// `live` caught up on 4 partitions in `schema`, as a running service's projection is.
fn live_caught_up(schema: &TestSchema) {
    catch_up(Builder::new(
        schema.database.clone(),
        Recorder::named("live"),
    ));
}

/// `live` and `newcomer` in one runner on 4 partitions, the newcomer starting far behind
/// (beyond 100 positions).
fn beside_live(database: Database, newcomer: Recorder, mut settings: Settings) -> Builder {
    settings.catch_up_alone_beyond = 100;
    Builder::new(database, Recorder::named("live"))
        .projection(newcomer)
        .partitions(0..4)
        .total_partitions(4)
        .settings(settings)
}

#[test]
fn partitions_that_start_behind_are_read_for_in_one_read_of_the_stream() {
    let schema = TestSchema::migrated("behind_one_read");
    let events = schema.seed(500, 40);
    // Planned with statistics, reads go by the index: rows fetched are rows read.
    schema
        .client()
        .batch_execute("ANALYZE events")
        .expect("analyze the events");
    live_caught_up(&schema);
    let before = settled_rows_read(&schema);

    let mut settings = Settings::default();
    settings.batch_size = 1_000;
    settings.exit_when_caught_up = true;
    let summary = beside_live(
        schema.database.clone(),
        Recorder::named("newcomer"),
        settings,
    )
    .start()
    .expect("start")
    .join()
    .expect("join");
    assert_eq!(summary.projections[1].applied(), events as u64);
    assert!(recorded_exactly(&schema, "newcomer", 500, 40));

    let read = settled_rows_read(&schema) - before;
    // Read one partition at a time, each of the 4 would look at every row of the stream.
    assert!(
        read >= events && read < events * 2,
        "the {events} events are read about once for the 4 partitions behind, not once per \
         partition: {read} rows read"
    );
}

#[test]
fn a_fed_partition_too_slow_for_the_read_catches_up_alone_and_nothing_is_lost_or_doubled() {
    let schema = TestSchema::migrated("behind_too_slow");
    schema.seed(200, 20);
    live_caught_up(&schema);

    // The newcomer takes far longer per event than the read takes to hand events out: the
    // read leaves its partitions behind (each reads the rest by itself) while a writer
    // appends throughout.
    let mut newcomer = Recorder::named("newcomer");
    newcomer.per_event = Duration::from_millis(1);
    let mut settings = Settings::default();
    settings.batch_size = 100;
    settings.queue_depth = 1;
    settings.straggler_after = Duration::from_millis(200);
    let runner = beside_live(schema.database.clone(), newcomer, settings)
        .start()
        .expect("start");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (database, stop) = (schema.database.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut client = database.connect().expect("connect the writer");
            let mut version = 0;
            while !stop.load(Ordering::Relaxed) {
                version += 1;
                for aggregate in 1..=5 {
                    insert_event(&mut client, &format!("fresh-{aggregate}"), version);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            version
        })
    };
    eventually("the newcomer rebuilds", Duration::from_secs(120), || {
        recorded_exactly(&schema, "newcomer", 200, 20)
    });
    stop.store(true, Ordering::Relaxed);
    let versions = writer.join().expect("the writer");
    let head: i64 = schema
        .client()
        .query_one("SELECT MAX(global_position) FROM events", &[])
        .expect("read the head")
        .get(0);
    eventually("both reach the head", Duration::from_secs(60), || {
        ["live", "newcomer"].iter().all(|projection| {
            schema.count(&format!(
                "SELECT COUNT(*) FROM projector_checkpoints WHERE projection = '{projection}' \
                 AND last_position >= {head}"
            )) == 4
        })
    });
    runner.shutdown();
    runner.join().expect("join");
    for projection in ["live", "newcomer"] {
        assert!(recorded_exactly(&schema, projection, 200, 20));
        let fresh = schema
            .client()
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE n = $2 AND last_version = $2 AND in_order), \
                 COUNT(*) FROM recorded WHERE projection = $1 AND aggregate_id LIKE 'fresh-%'",
                &[&projection, &versions],
            )
            .expect("read recorded");
        assert_eq!(
            (fresh.get::<_, i64>(0), fresh.get::<_, i64>(1)),
            (5, 5),
            "'{projection}' applied each of the {versions} appends of 5 aggregates once, in order"
        );
    }
}

#[test]
fn connections_cut_while_the_partitions_behind_are_fed_lose_and_double_nothing() {
    let schema = TestSchema::migrated("behind_cut");
    schema.seed(300, 40);
    live_caught_up(&schema);
    // A name of its own, so that only this test's connections are cut.
    let database = database_named(&schema, "cut_behind");
    let mut settings = Settings::default();
    settings.batch_size = 200;
    settings.exit_when_caught_up = true;
    // Slow enough that its workers are still being fed (mid-transaction) when cut.
    let mut newcomer = Recorder::named("newcomer");
    newcomer.per_event = Duration::from_micros(300);
    let runner = beside_live(database, newcomer, settings)
        .start()
        .expect("start");
    let mut admin = crate::util::admin();
    let mut kills = 0;
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        kills += cut_connections_named(&mut admin, "cut_behind");
    }
    runner.join().expect("the runner survives lost connections");
    assert!(kills > 0, "no connection was cut: the test proves nothing");
    assert!(recorded_exactly(&schema, "newcomer", 300, 40));
    assert!(recorded_exactly(&schema, "live", 300, 40));
}
