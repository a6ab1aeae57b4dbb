//! What an operator can do from the command line about a projection only a service defines,
//! and how parked events are looked at and dropped (with a record of who dropped what).

use std::time::Duration;

use projector::Builder;

use crate::dead_letters::{Flaky, parked, quick_retries};
use crate::newcomer::run_expecting;
use crate::util::{TestSchema, run_within, text};

const LIMIT: Duration = Duration::from_secs(60);

/// Runs the service projection `flaky` (which parks thing-7 from version 3 on) over 4
/// partitions until caught up with `per_aggregate` events of 20 aggregates.
fn park_thing_7(schema: &TestSchema, per_aggregate: i64) {
    schema.seed(20, per_aggregate);
    Builder::new(schema.database.clone(), Flaky::new())
        .partitions(0..4)
        .total_partitions(4)
        .settings(quick_retries())
        .exit_when_caught_up(true)
        .start()
        .expect("start")
        .join()
        .expect("caught up");
    assert_eq!(parked(schema, "flaky").len(), (per_aggregate - 2) as usize);
}

#[test]
fn reset_of_a_service_projection_deletes_its_checkpoints_and_parked_events_only() {
    let schema = TestSchema::migrated("service_reset");
    park_thing_7(&schema, 4);
    let recorded = schema.count("SELECT COUNT(*) FROM recorded");

    let (_, stderr) = run_expecting(&schema, &["reset", "--projection", "flaky"], 2);
    assert!(
        stderr.starts_with(
            "error: reset would delete the 4 checkpoint(s) of projection 'flaky' (4 partitions"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("delete its 2 parked event(s)")
            && stderr.contains("leave its read model as it is: 'flaky' is not a built-in"),
        "{stderr}"
    );

    let (stdout, _) = run_expecting(&schema, &["reset", "--projection", "flaky", "--yes"], 0);
    assert_eq!(
        stdout,
        "projection 'flaky': deleted 4 checkpoint(s) and 2 parked event(s); its read model \
         belongs to the service that defines 'flaky' and was not touched: clear it there (the \
         service's projector::reset does both) before the projection's next start rebuilds it \
         from the first event\n"
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projector_checkpoints WHERE projection = 'flaky'"),
        0
    );
    assert!(parked(&schema, "flaky").is_empty());
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM recorded"),
        recorded,
        "the service's read model is left alone"
    );

    // A name with nothing in the schema is a typo, as for repartition.
    let (_, stderr) = run_expecting(&schema, &["reset", "--projection", "flakey", "--yes"], 2);
    assert!(
        stderr.starts_with("error: invalid value 'flakey' for --projection: known projections")
            && stderr.contains("any projection with checkpoints or parked events in this schema"),
        "{stderr}"
    );
}

#[test]
fn dead_letters_retry_of_a_service_projection_says_what_can_be_done() {
    let schema = TestSchema::migrated("service_retry");
    park_thing_7(&schema, 3);
    let (_, stderr) = run_expecting(
        &schema,
        &["dead-letters", "retry", "--projection", "flaky"],
        2,
    );
    assert_eq!(
        stderr,
        "error: invalid value 'flaky' for --projection: retrying applies the parked events \
         through the projection's code, which this binary has only for the built-in \
         projections (users, aggregate-stats, aggregate-stats-batch, noop) and for SQL files \
         (--projection-file FILE); 'flaky' has 1 parked event(s) of 1 aggregate(s): the service \
         that defines it retries them with projector::retry, or discard them from here with \
         `projector dead-letters drop --projection flaky --aggregate ID --yes`\n"
    );
    assert_eq!(parked(&schema, "flaky").len(), 1, "nothing was touched");
}

#[test]
fn dead_letters_list_shows_payloads_and_a_drop_leaves_a_record_of_who_dropped_what() {
    let schema = TestSchema::migrated("drop_record");
    park_thing_7(&schema, 4);
    let (plain, _) = run_expecting(&schema, &["dead-letters", "list"], 0);
    assert!(!plain.contains(r#"{"n":3}"#), "{plain}");
    let (stdout, _) = run_expecting(&schema, &["dead-letters", "list", "--payload"], 0);
    let payloads: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("    payload: "))
        .collect();
    assert_eq!(payloads, [r#"{"n":3}"#, r#"{"n":4}"#], "{stdout}");

    let positions: Vec<i64> = parked(&schema, "flaky").iter().map(|l| l.0).collect();
    let dropped = run_within(
        schema
            .projector(&[
                "dead-letters",
                "drop",
                "--projection",
                "flaky",
                "--aggregate",
                "thing-7",
                "--yes",
            ])
            .env("USER", "tester"),
        LIMIT,
    );
    assert_eq!(dropped.status.code(), Some(0), "{}", text(&dropped.stderr));
    let rows = schema
        .client()
        .query(
            "SELECT projection, aggregate_id, event_count, positions, database_user, os_user, \
                 application_name, dropped_at > NOW() - interval '1 minute', \
                 dead_letters -> 0 ->> 'error', (dead_letters -> 0 ->> 'attempts')::int, \
                 dead_letters -> 1 ->> 'event_type' \
             FROM projection_dead_letter_drops",
            &[],
        )
        .expect("read the record of drops");
    assert_eq!(rows.len(), 1, "one record per drop");
    let row = &rows[0];
    assert_eq!(row.get::<_, String>(0), "flaky");
    assert_eq!(row.get::<_, String>(1), "thing-7");
    assert_eq!(row.get::<_, i32>(2), 2);
    assert_eq!(row.get::<_, Vec<i64>>(3), positions);
    assert_eq!(
        row.get::<_, String>(4),
        schema
            .client()
            .query_one("SELECT current_user::text", &[])
            .expect("user")
            .get::<_, String>(0)
    );
    assert_eq!(row.get::<_, Option<String>>(5).as_deref(), Some("tester"));
    assert!(
        row.get::<_, Option<String>>(6)
            .is_some_and(|name| name.starts_with("projector pid ")),
        "the dropping process's application_name"
    );
    assert!(row.get::<_, bool>(7));
    assert!(
        row.get::<_, String>(8).contains("poison"),
        "the parked event's error is kept"
    );
    assert_eq!(row.get::<_, i32>(9), 3);
    assert_eq!(row.get::<_, String>(10), "Happened");
    assert!(
        text(&dropped.stdout).contains("recorded in projection_dead_letter_drops"),
        "{}",
        text(&dropped.stdout)
    );
}

#[test]
fn migrate_adds_the_record_of_drops_to_an_install_of_the_earlier_version() {
    let schema = TestSchema::migrated("drop_record_upgrade");
    park_thing_7(&schema, 3);
    // The earlier version's tables: everything but the record of drops.
    schema
        .client()
        .batch_execute("DROP TABLE IF EXISTS projection_dead_letter_drops")
        .expect("go back to the earlier version's tables");
    run_expecting(&schema, &["status"], 0);
    let drop = [
        "dead-letters",
        "drop",
        "--projection",
        "flaky",
        "--aggregate",
        "thing-7",
        "--yes",
    ];
    let (_, stderr) = run_expecting(&schema, &drop, 2);
    assert!(
        stderr.contains("projection_dead_letter_drops") && stderr.contains("projector migrate"),
        "{stderr}"
    );
    assert_eq!(
        parked(&schema, "flaky").len(),
        1,
        "nothing dropped unrecorded"
    );
    run_expecting(&schema, &["migrate"], 0);
    run_expecting(&schema, &drop, 0);
    assert!(parked(&schema, "flaky").is_empty());
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projection_dead_letter_drops"),
        1
    );
}
