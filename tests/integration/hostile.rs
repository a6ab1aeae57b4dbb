//! Hostile input through the real runtime and the real binary: odd aggregate ids and payloads,
//! schema names and projection names written to break SQL.

use std::time::Duration;

use projector::postgres::Transaction;
use projector::projections::AggregateStats;
use projector::{
    BoxError, Builder, Context, Error, Event, ExpectedVersion, NewEvent, Projection, append,
};

use crate::util::{TestSchema, join_within, run_within, text};

const LIMIT: Duration = Duration::from_secs(60);

/// Sixteen MiB.
const BIG: usize = 16 << 20;

/// Keeps every event it is given, as received, keyed by projection and position: applying an
/// event twice fails on the primary key, so a run that ends well applied each at most once.
#[derive(Clone)]
struct Journal {
    name: String,
}

impl Projection for Journal {
    fn name(&self) -> &str {
        &self.name
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS journal (projection TEXT, global_position BIGINT, \
                 aggregate_id TEXT, payload BYTEA, metadata TEXT, \
                 PRIMARY KEY (projection, global_position))",
        )?;
        Ok(())
    }

    fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.execute("DELETE FROM journal WHERE projection = $1", &[&self.name])?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), BoxError> {
        tx.execute(
            "INSERT INTO journal VALUES ($1, $2, $3, $4, $5)",
            &[
                &self.name,
                &event.global_position,
                &event.aggregate_id,
                &event.payload,
                &event.metadata,
            ],
        )?;
        Ok(())
    }
}

/// Events of `projection`'s journal that differ from the stored event, or are missing, or
/// are not stored: zero when every event was received exactly as stored.
fn journal_mismatches(schema: &TestSchema, projection: &str) -> i64 {
    schema
        .client()
        .query_one(
            "SELECT COUNT(*) FROM events e \
             FULL JOIN (SELECT * FROM journal WHERE projection = $1) j USING (global_position) \
             WHERE j.projection IS NULL OR e.event_id IS NULL \
                 OR j.aggregate_id IS DISTINCT FROM e.aggregate_id \
                 OR j.payload IS DISTINCT FROM e.payload \
                 OR j.metadata IS DISTINCT FROM e.metadata::text",
            &[&projection],
        )
        .expect("compare the journal with the events")
        .get(0)
}

fn run_to_the_end<P: Projection>(schema: &TestSchema, projection: P) -> projector::Summary {
    let runner = Builder::new(schema.database.clone(), projection)
        .partitions(0..4)
        .total_partitions(4)
        .exit_when_caught_up(true)
        .start()
        .expect("start the runner");
    join_within(runner, LIMIT).expect("the runner ends well")
}

/// Aggregate ids a real store may hold: empty, 1 KB, unicode (combining marks, right-to-left
/// override, astral plane), and SQL.
fn odd_ids() -> Vec<String> {
    vec![
        String::new(),
        "k".repeat(1024),
        "ünïcødé-日本-ж-😀".into(),
        "a\u{0301}\u{202e}txt.exe".into(),
        "x'; DROP TABLE events; --".into(),
        " ".into(),
    ]
}

/// Appends two events to each odd id (one of them with a payload that is not UTF-8, or has
/// NULL metadata, or unicode metadata) and one 16 MiB payload; returns the number appended.
fn append_odd_events(schema: &TestSchema) -> i64 {
    let mut client = schema.client();
    let mut appended = 0;
    for (n, id) in odd_ids().into_iter().enumerate() {
        let mut first = NewEvent::new(
            "test",
            "Thing",
            id.clone(),
            "Happened",
            vec![0xff, 0xfe, 0, 0x80],
        );
        first.metadata = (n % 2 == 0).then(|| r#"{"note": "ü 😀 \" ;"}"#.to_owned());
        let second = NewEvent::new("test", "Thing", id, "Happened", "{\"n\":2}");
        appended += append(&mut client, ExpectedVersion::NoStream, &[first, second])
            .expect("append to an odd aggregate id")
            .len() as i64;
    }
    let big = NewEvent::new("test", "Thing", "big", "Happened", vec![0xab; BIG]);
    appended += append(&mut client, ExpectedVersion::Any, &[big])
        .expect("append a 16 MiB payload")
        .len() as i64;
    appended
}

#[test]
fn hostile_events_are_applied_exactly_once_by_the_library_runtime() {
    let schema = TestSchema::migrated("hostile_events");
    let events = append_odd_events(&schema);

    // Refused clearly by the store, not stored, and no panic: metadata that is not JSON and a
    // NUL character in text, which PostgreSQL cannot store.
    let mut client = schema.client();
    let mut not_json = NewEvent::new("test", "Thing", "m", "Happened", "{}");
    not_json.metadata = Some("{not json".into());
    let nul = NewEvent::new("test", "Thing", "nul\0id", "Happened", "{}");
    for refused in [not_json, nul] {
        match append(&mut client, ExpectedVersion::Any, &[refused]) {
            Err(error @ Error::Database { .. }) => {
                assert!(
                    error
                        .to_string()
                        .starts_with("database error while appending to test/Thing/"),
                    "{error}"
                );
            }
            other => panic!("expected a database error, got {other:?}"),
        }
    }
    assert_eq!(schema.count("SELECT COUNT(*) FROM events"), events);

    let stats = run_to_the_end(&schema, AggregateStats);
    assert_eq!(stats.applied(), events as u64);
    assert_eq!(schema.stats_mismatches(), 0);

    let journal = Journal {
        name: "journal".into(),
    };
    assert_eq!(run_to_the_end(&schema, journal).applied(), events as u64);
    assert_eq!(journal_mismatches(&schema, "journal"), 0);
    assert_eq!(
        schema
            .count("SELECT octet_length(payload)::bigint FROM journal WHERE aggregate_id = 'big'"),
        BIG as i64
    );
}

#[test]
fn hostile_events_through_the_binary_are_applied_once_in_bounded_memory() {
    let schema = TestSchema::migrated("hostile_binary");
    let events = append_odd_events(&schema);
    let output = run_within(
        schema.projector(&[
            "--partition-key",
            "0-3",
            "--projection",
            "aggregate-stats-batch",
            "--exit-when-caught-up",
        ]),
        LIMIT,
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(&format!("applied {events} (")), "{stderr}");
    assert_eq!(schema.stats_mismatches_in("aggregate_stats_batch"), 0);
    // One 16 MiB payload is held a few times over (the driver's buffer, the event), never
    // once per event or per partition.
    let peak: f64 = stderr
        .split("peak memory ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|mib| mib.parse().ok())
        .unwrap_or_else(|| panic!("no peak memory in {stderr}"));
    println!("peak memory with one 16 MiB payload: {peak} MiB");
    assert!(peak < 100.0, "peak memory {peak} MiB: {stderr}");
}

/// Schema names that must never reach SQL as written.
const HOSTILE_SCHEMAS: [&str; 10] = [
    "x\"; DROP TABLE events; --",
    "x'; DROP TABLE events; --",
    "public; DROP TABLE events",
    "two words",
    "back\\slash",
    "ünïcødé",
    "tab\there",
    "1starts_with_a_digit",
    "dash-ed",
    "a_name_that_is_sixty_four_characters_long_which_is_one_too_many__",
];

#[test]
fn hostile_schema_names_are_refused_before_any_sql_by_flag_and_environment() {
    let schema = TestSchema::migrated("hostile_schema");
    schema.seed(3, 2);
    for name in HOSTILE_SCHEMAS {
        for (how, args) in [
            ("flag", vec!["--schema", name, "migrate"]),
            ("flag", vec!["--schema", name, "status"]),
            ("environment", vec!["migrate"]),
        ] {
            let mut command = schema.projector(&args);
            if how == "environment" {
                command.env("PROJECTOR_SCHEMA", name);
            }
            let output = run_within(command, LIMIT);
            let stderr = text(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{name:?} by {how}: {stderr}");
            assert!(
                stderr.contains(&format!("error: invalid value '{name}' for "))
                    && stderr.contains(
                        ": schema names are up to 63 letters, digits and underscores, not \
                         starting with a digit"
                    ),
                "{name:?} by {how}: {stderr}"
            );
        }
    }
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM events"),
        6,
        "the events are all there"
    );
    let created: i64 = schema
        .client()
        .query_one(
            "SELECT COUNT(*) FROM pg_namespace WHERE nspname::text = ANY($1)",
            &[&HOSTILE_SCHEMAS.to_vec()],
        )
        .expect("look for the schemas")
        .get(0);
    assert_eq!(created, 0, "no schema of a hostile name was created");
}

#[test]
fn hostile_projection_names_reach_sql_only_as_parameters() {
    let schema = TestSchema::migrated("hostile_projection");
    let events = schema.seed(20, 3);
    let names = [
        "x'; DROP TABLE events; --",
        "x\"; DROP TABLE journal; --",
        "quote ' and \" and \\ and $1 and %I",
        "ünïcødé 😀 \u{202e}",
    ];
    for name in names {
        let journal = Journal { name: name.into() };
        assert_eq!(
            run_to_the_end(&schema, journal.clone()).applied(),
            events as u64,
            "{name}"
        );
        assert_eq!(journal_mismatches(&schema, name), 0, "{name}");

        let mut client = schema.client();
        let status = projector::status(&mut client, Some(name)).expect("status");
        assert_eq!(status.len(), 4, "{name}: {status:?}");
        assert!(
            status.iter().all(|s| s.projection == name
                && s.last_position == events
                && s.held_by_pid.is_none()),
            "{name}: {status:?}"
        );
        let all = projector::status(&mut client, None).expect("status of all");
        assert_eq!(
            all.iter().filter(|s| s.projection == name).count(),
            4,
            "{name}"
        );

        // Re-partitioned and rebuilt under the same name, exactly.
        let change = projector::repartition(&schema.database, name, 3).expect("repartition");
        assert_eq!(
            change,
            projector::LayoutChange::Replaced { from: 4 },
            "{name}"
        );
        let mut reset_journal = journal.clone();
        assert_eq!(
            projector::reset(&mut client, &mut reset_journal).expect("reset"),
            3,
            "{name}"
        );
        assert!(
            projector::status(&mut client, Some(name))
                .expect("status")
                .is_empty()
        );
        assert_eq!(
            schema
                .client()
                .query_one(
                    "SELECT COUNT(*) FROM journal WHERE projection = $1",
                    &[&name]
                )
                .expect("count the journal")
                .get::<_, i64>(0),
            0,
            "{name}: reset cleared its read model"
        );
        assert_eq!(
            run_to_the_end(&schema, journal).applied(),
            events as u64,
            "{name}"
        );
        assert_eq!(journal_mismatches(&schema, name), 0, "{name}: rebuilt");
    }
    assert_eq!(schema.count("SELECT COUNT(*) FROM events"), events);
    assert_eq!(
        schema.count("SELECT COUNT(DISTINCT projection) FROM journal"),
        names.len() as i64
    );
}

/// A store whose table lets a column the projector needs hold NULL (`event_from_row` would
/// panic on such a row, and the runner end with "thread 'projector-route' panicked").
#[test]
fn hostile_events_table_allowing_null_where_an_event_needs_a_value_is_refused_at_start() {
    let schema = TestSchema::migrated("hostile_null");
    schema.seed(2, 1);
    let mut client = schema.client();
    client
        .batch_execute(
            "ALTER TABLE events ALTER COLUMN event_type DROP NOT NULL; \
             INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                 event_id, event_type, payload) \
             VALUES ('test', 'Thing', 'null-type', 1, gen_random_uuid(), NULL, '\\x7b7d')",
        )
        .expect("a NULL event type");
    let started = Builder::new(schema.database.clone(), AggregateStats)
        .partitions(0..4)
        .total_partitions(4)
        .exit_when_caught_up(true)
        .start();
    match started {
        Err(error @ Error::UnexpectedColumns { .. }) => {
            assert!(error.is_configuration());
            assert!(
                error
                    .to_string()
                    .contains("(events.event_type is text allowing NULL, expected text NOT NULL)"),
                "{error}"
            );
        }
        Err(other) => panic!("expected UnexpectedColumns, got {other:?}"),
        Ok(_) => panic!("a runner started on an events table allowing NULL event types"),
    }
    let output = run_within(
        schema.projector(&["--partition-key", "0-3", "--projection", "noop"]),
        LIMIT,
    );
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
}
