//! Event stores set up by hand: a position sequence not owned by its column, or none, and
//! columns of other types than the projector reads.

use std::time::Duration;

use projector::projections::{AggregateStats, Noop};
use projector::{Builder, Error, Projection};

use crate::util::{TestSchema, eventually, run_within, text};

fn start<P: Projection>(schema: &TestSchema, projection: P) -> Result<projector::Runner, Error> {
    Builder::new(schema.database.clone(), projection)
        .poll_interval(Duration::from_millis(50))
        .start()
}

fn refusal(schema: &TestSchema) -> String {
    match start(schema, Noop) {
        Err(error) if error.is_configuration() => error.to_string(),
        Err(error) => panic!("refused, but not as a configuration error: {error:?}"),
        Ok(runner) => {
            runner.shutdown();
            let _ = runner.join();
            panic!("the projector started")
        }
    }
}

#[test]
fn a_cached_sequence_not_owned_by_its_column_is_refused_with_the_fix() {
    let schema = TestSchema::migrated("seq_unowned_cache");
    schema
        .client()
        .batch_execute("ALTER SEQUENCE events_global_position_seq OWNED BY NONE CACHE 20")
        .expect("disown the sequence");
    let refused = refusal(&schema);
    assert!(
        refused.contains(&format!(
            "ALTER SEQUENCE {}.events_global_position_seq CACHE 1",
            schema.name
        )),
        "{refused}"
    );
}

#[test]
fn a_mixed_case_sequence_not_owned_by_its_column_is_found() {
    let schema = TestSchema::migrated("seq_mixed_case");
    schema
        .client()
        .batch_execute(
            "CREATE SEQUENCE \"Positions Seq\" CACHE 20; \
             ALTER TABLE events ALTER COLUMN global_position SET DEFAULT nextval('\"Positions Seq\"'); \
             DROP SEQUENCE events_global_position_seq",
        )
        .expect("draw positions from another sequence");
    let refused = refusal(&schema);
    assert!(
        refused.contains(&format!(
            "ALTER SEQUENCE {}.\"Positions Seq\" CACHE 1",
            schema.name
        )),
        "{refused}"
    );
}

#[test]
fn positions_not_drawn_from_a_sequence_are_refused() {
    let schema = TestSchema::migrated("seq_none");
    schema
        .client()
        .batch_execute(
            "ALTER SEQUENCE events_global_position_seq OWNED BY NONE; \
             ALTER TABLE events ALTER COLUMN global_position DROP DEFAULT",
        )
        .expect("take the default away");
    let refused = refusal(&schema);
    assert!(
        refused.contains("events.global_position")
            && refused.contains("positions must come from a sequence"),
        "{refused}"
    );
}

#[test]
fn a_position_drawn_from_an_unowned_sequence_and_inserted_late_is_applied() {
    let schema = TestSchema::migrated("seq_unowned_late");
    schema
        .client()
        .batch_execute("ALTER SEQUENCE events_global_position_seq OWNED BY NONE")
        .expect("disown the sequence");
    let runner = start(&schema, AggregateStats).expect("start the projector");

    // A writer draws its position first and inserts it later, in the same transaction.
    let mut late = schema.client();
    let mut late_tx = late.transaction().expect("begin");
    let position: i64 = late_tx
        .query_one("SELECT nextval('events_global_position_seq')", &[])
        .expect("draw a position")
        .get(0);
    schema
        .client()
        .execute(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                 event_id, event_type, payload) \
             VALUES ('test', 'Thing', 'early-1', 1, gen_random_uuid(), 'Happened', '\\x7b7d')",
            &[],
        )
        .expect("a higher position commits first");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        schema.stats_applied(),
        0,
        "nothing past the drawn position is applied while it may still commit"
    );
    late_tx
        .execute(
            "INSERT INTO events (global_position, bounded_context, aggregate_type, aggregate_id, \
                 aggregate_version, event_id, event_type, payload) \
             VALUES ($1, 'test', 'Thing', 'late-1', 1, gen_random_uuid(), 'Happened', '\\x7b7d')",
            &[&position],
        )
        .expect("insert at the drawn position");
    late_tx.commit().expect("commit late");

    eventually("both events applied", Duration::from_secs(10), || {
        schema.stats_applied() == 2
    });
    runner.shutdown();
    runner.join().expect("clean stop");
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn an_events_table_with_an_int_position_exits_2_naming_the_column() {
    let schema = TestSchema::migrated("shape_int_position");
    schema
        .client()
        .batch_execute("ALTER TABLE events ALTER COLUMN global_position TYPE INT")
        .expect("narrow the position");
    schema.seed(3, 2);
    for args in [
        &["--partition-key", "0", "--exit-when-caught-up"][..],
        &["status"][..],
    ] {
        let output = run_within(schema.projector(args), Duration::from_secs(15));
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("events.global_position is integer, expected bigint"),
            "{args:?}: {stderr}"
        );
    }
}
