//! What a newcomer meets following the README: messages and logs as it quotes them.

use std::time::Duration;

use crate::util::{TestSchema, run_within, text};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn seed_before_migrate_exits_2_and_says_to_migrate() {
    let schema = TestSchema::empty("seed_first");
    let output = run_within(schema.projector(&["seed", "--users", "3"]), LIMIT);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("events, aggregate_heads not found in schema")
            && stderr.contains("run `projector migrate` first"),
        "{stderr}"
    );
}

/// `users` on a fresh schema with 40 seeded users, to the end, with `RUST_LOG` set to `log`.
fn users_run(schema: &TestSchema, log: Option<&str>) -> String {
    for args in [&["migrate"][..], &["seed", "--users", "40"][..]] {
        let output = run_within(schema.projector(args), LIMIT);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    }
    let mut command = schema.projector(&[
        "--partition-key",
        "0-1",
        "--total-partitions",
        "2",
        "--exit-when-caught-up",
    ]);
    if let Some(log) = log {
        command.env("RUST_LOG", log);
    }
    let output = run_within(command, LIMIT);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    stderr
}

#[test]
fn the_users_demo_shows_a_few_users_per_partition_then_the_summary() {
    let schema = TestSchema::empty("users_demo");
    let stderr = users_run(&schema, None);
    let created = stderr
        .lines()
        .filter(|l| l.contains("created user"))
        .count();
    assert_eq!(created, 6, "three per partition:\n{stderr}");
    for partition in ["0/2", "1/2"] {
        assert!(
            stderr.contains(&format!("partition {partition} created user")),
            "{stderr}"
        );
    }
    assert!(stderr.contains("applied 120"), "the summary:\n{stderr}");
}

#[test]
fn rust_log_debug_shows_the_projectors_lines_without_the_drivers() {
    let schema = TestSchema::empty("log_debug");
    let stderr = users_run(&schema, Some("debug"));
    assert!(
        stderr.contains("created user") && stderr.contains("applied"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("executing statement"),
        "the driver's statements flood the log:\n{}",
        &stderr[..stderr.len().min(2_000)]
    );
    let created = stderr
        .lines()
        .filter(|l| l.contains("created user"))
        .count();
    assert_eq!(created, 40, "every user at debug");
}

#[test]
fn rust_log_trace_shows_every_applied_event() {
    let schema = TestSchema::empty("log_trace");
    let stderr = users_run(&schema, Some("projector=trace"));
    let applied = stderr
        .lines()
        .filter(|l| l.contains(": applied User"))
        .count();
    assert_eq!(applied, 120, "one line per event:\n{stderr}");
}
