//! The partition locks: a session that is not a projector of the projection (another
//! application, or a projector of a projection whose lock key collides) holding the advisory
//! lock a partition takes is named as such, never taken for a projector of the projection.

use std::time::Duration;

use projector::postgres::{Client, NoTls};

use crate::util::{TestSchema, eventually, signal, text, wait_within};

const LIMIT: Duration = Duration::from_secs(60);

/// A connection of another application, named `someone-else`, holding the session advisory
/// lock that partition `key` of `total` of `aggregate-stats` takes in `schema`; and its pid.
fn stranger_holding(schema: &TestSchema, total: i32, key: i32) -> (Client, i32) {
    let mut stranger = Client::connect(&crate::util::url_named("someone-else"), NoTls)
        .expect("connect as another application");
    let pid: i32 = stranger
        .query_one(
            "SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock( \
                 hashtext('projector ' || $1 || ' ' || 'aggregate-stats'), $2 * 65536 + $3)) l",
            &[&schema.name, &total, &key],
        )
        .expect("take the lock")
        .get(0);
    (stranger, pid)
}

/// Runs `aggregate-stats` on partitions 0-1 of 2 until `until` holds (and a moment more for
/// its log lines), then stops it; returns its stderr.
fn run_until(schema: &TestSchema, until: impl FnMut() -> bool) -> String {
    let child = schema
        .aggregate_stats("0-1", "2", &[])
        .spawn()
        .expect("start a projector");
    eventually("the projector to get going", LIMIT, until);
    std::thread::sleep(Duration::from_millis(500));
    signal(&child, "TERM");
    let output = wait_within(child, LIMIT);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    stderr
}

#[test]
fn a_partition_lock_held_by_another_application_is_named_not_taken_for_a_projector() {
    let schema = TestSchema::migrated("lock_stranger");
    let (_stranger, pid) = stranger_holding(&schema, 2, 1);
    schema.seed(20, 2);
    let stderr = run_until(&schema, || {
        schema.count(
            "SELECT COUNT(*) FROM projector_checkpoints \
             WHERE projection = 'aggregate-stats' AND partition_key = 0 AND last_position > 0",
        ) == 1
    });
    for expected in [
        format!("partition 1/2 of 'aggregate-stats' is held by server pid {pid}"),
        "application 'someone-else'".to_owned(),
        "not a projector of 'aggregate-stats'".to_owned(),
    ] {
        assert!(stderr.contains(&expected), "{expected:?} not in:\n{stderr}");
    }
    assert!(
        !stderr.contains("is held by another live process"),
        "{stderr}"
    );
}

#[test]
fn a_lock_of_another_layout_held_by_another_application_is_named_not_waited_for_silently() {
    let schema = TestSchema::migrated("lock_stranger_layout");
    let (_stranger, pid) = stranger_holding(&schema, 3, 0);
    schema.seed(4, 1);
    let stderr = run_until(&schema, || {
        schema.count(
            "SELECT COUNT(*) FROM projector_checkpoints WHERE projection = 'aggregate-stats'",
        ) == 2
    });
    for expected in [
        format!("held by server pid {pid}"),
        "application 'someone-else'".to_owned(),
        "not a projector of 'aggregate-stats'".to_owned(),
    ] {
        assert!(stderr.contains(&expected), "{expected:?} not in:\n{stderr}");
    }
}
