//! Appending and reading events, with optimistic concurrency.

use projector::{Error, ExpectedVersion, NewEvent, append, read_stream};

use crate::util::TestSchema;

fn event(id: &str, event_type: &str) -> NewEvent {
    NewEvent::new("shop", "Order", id, event_type, br#"{"x":1}"#.to_vec())
}

#[test]
fn append_numbers_versions_and_read_stream_returns_them_in_order() {
    let schema = TestSchema::migrated("append_order");
    let mut client = schema.client();
    let first = append(
        &mut client,
        ExpectedVersion::NoStream,
        &[event("o-1", "Placed"), event("o-1", "Paid")],
    )
    .expect("first append");
    append(
        &mut client,
        ExpectedVersion::NoStream,
        &[event("o-2", "Placed")],
    )
    .expect("other aggregate");
    let third = append(
        &mut client,
        ExpectedVersion::Exact(2),
        &[event("o-1", "Shipped")],
    )
    .expect("append at version 2");
    append(
        &mut client,
        ExpectedVersion::Any,
        &[event("o-1", "Delivered")],
    )
    .expect("append at any");

    assert_eq!(first.len(), 2);
    assert!(first[0] < first[1] && first[1] < third[0]);
    let stream = read_stream(&mut client, "shop", "Order", "o-1").expect("read the stream");
    let seen: Vec<(i64, &str)> = stream
        .iter()
        .map(|e| (e.aggregate_version, e.event_type.as_str()))
        .collect();
    assert_eq!(
        seen,
        [(1, "Placed"), (2, "Paid"), (3, "Shipped"), (4, "Delivered")]
    );
    assert_eq!(stream[0].global_position, first[0]);
    assert_eq!(stream[0].payload, br#"{"x":1}"#);
    assert_eq!(
        schema.count("SELECT aggregate_version FROM aggregate_heads WHERE aggregate_id = 'o-1'"),
        4
    );
}

#[test]
fn append_with_a_stale_version_is_a_conflict_and_stores_nothing() {
    let schema = TestSchema::migrated("append_conflict");
    let mut client = schema.client();
    append(
        &mut client,
        ExpectedVersion::NoStream,
        &[event("o-1", "Placed")],
    )
    .expect("first append");

    let stale = append(
        &mut client,
        ExpectedVersion::Exact(0),
        &[event("o-1", "Paid")],
    );
    match stale {
        Err(error @ Error::VersionConflict { .. }) => assert_eq!(
            error.to_string(),
            "version conflict on shop/Order/o-1: expected version 0, found version 1; reload the \
             aggregate and retry"
        ),
        other => panic!("expected a version conflict, got {other:?}"),
    }
    let exists = append(
        &mut client,
        ExpectedVersion::NoStream,
        &[event("o-1", "Paid")],
    );
    assert!(
        matches!(
            exists,
            Err(Error::VersionConflict {
                expected: ExpectedVersion::NoStream,
                actual: Some(1),
                ..
            })
        ),
        "{exists:?}"
    );
    assert_eq!(schema.count("SELECT COUNT(*) FROM events"), 1);
}

#[test]
fn append_refuses_events_of_two_aggregates() {
    let schema = TestSchema::migrated("append_two");
    let mut client = schema.client();
    let mixed = append(
        &mut client,
        ExpectedVersion::Any,
        &[event("o-1", "Placed"), event("o-2", "Placed")],
    );
    assert!(
        matches!(mixed, Err(Error::InvalidAppend { .. })),
        "{mixed:?}"
    );
    assert_eq!(schema.count("SELECT COUNT(*) FROM events"), 0);
}

#[test]
fn concurrent_appends_at_one_version_let_exactly_one_win() {
    let schema = TestSchema::migrated("append_race");
    let outcomes: Vec<_> = (0..8)
        .map(|_| {
            let database = schema.database.clone();
            std::thread::spawn(move || {
                let mut client = database.connect().expect("connect");
                append(
                    &mut client,
                    ExpectedVersion::NoStream,
                    &[event("o-9", "Placed")],
                )
            })
        })
        .map(|t| t.join().expect("appender thread"))
        .collect();
    let wins = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(wins, 1, "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .filter_map(|o| o.as_ref().err())
            .all(|e| matches!(e, Error::VersionConflict { .. }))
    );
    assert_eq!(schema.count("SELECT COUNT(*) FROM events"), 1);
}

#[test]
fn migrate_runs_twice_and_from_several_processes_at_once() {
    let schema = TestSchema::empty("migrate_twice");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let database = schema.database.clone();
            std::thread::spawn(move || projector::migrate(&database))
        })
        .collect();
    for thread in threads {
        thread.join().expect("migrate thread").expect("migrate");
    }
    projector::migrate(&schema.database).expect("migrate again");
    let mut client = schema.client();
    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 \
             ORDER BY 1",
            &[&schema.name],
        )
        .expect("list tables")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        tables,
        [
            "aggregate_heads",
            "events",
            "projection_dead_letter_drops",
            "projection_dead_letters",
            "projector_checkpoints",
            "projector_prior_layouts",
            "projector_projection_states",
            "projector_projection_versions",
        ]
    );
}

#[test]
fn an_appender_appends_in_the_callers_transaction_which_commits_or_rolls_back_them_all() {
    let schema = TestSchema::migrated("appender");
    let mut client = schema.client();
    let appender = projector::Appender::prepare(&mut client).expect("prepare");

    let mut tx = client.transaction().expect("begin");
    appender
        .append(
            &mut tx,
            ExpectedVersion::NoStream,
            &[event("o-1", "Placed")],
        )
        .expect("o-1");
    let conflict = appender.append(&mut tx, ExpectedVersion::Exact(5), &[event("o-1", "Paid")]);
    assert!(matches!(conflict, Err(Error::VersionConflict { .. })));
    drop(tx);
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM events"),
        0,
        "rolled back"
    );

    let mut tx = client.transaction().expect("begin");
    for id in ["o-1", "o-2"] {
        appender
            .append(&mut tx, ExpectedVersion::NoStream, &[event(id, "Placed")])
            .expect("append");
    }
    appender
        .append(&mut tx, ExpectedVersion::Exact(1), &[event("o-1", "Paid")])
        .expect("o-1 again");
    tx.commit().expect("commit");
    assert_eq!(
        schema.count("SELECT COUNT(DISTINCT xmin::text) FROM events"),
        1
    );
    assert_eq!(
        schema.count("SELECT SUM(aggregate_version)::bigint FROM aggregate_heads"),
        3
    );
}
