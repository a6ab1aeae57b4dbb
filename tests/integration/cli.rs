//! The `projector` binary: exit codes, messages, signals, several processes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use projector::partition_of;

use crate::util::{TestSchema, eventually, run_within, text, wait_within};

const LIMIT: Duration = Duration::from_secs(60);

fn signal(child: &std::process::Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} failed");
}

#[test]
fn migrate_seed_and_four_processes_apply_each_event_once_by_its_owner() {
    let schema = TestSchema::empty("four_processes");
    let migrate = run_within(schema.projector(&["migrate"]), LIMIT);
    assert_eq!(migrate.status.code(), Some(0), "{}", text(&migrate.stderr));
    let seed = run_within(
        schema.projector(&[
            "seed",
            "--users",
            "120",
            "--renames",
            "2",
            "--email-changes",
            "1",
        ]),
        LIMIT,
    );
    assert_eq!(seed.status.code(), Some(0), "{}", text(&seed.stderr));
    assert_eq!(schema.count("SELECT COUNT(*) FROM events"), 480);

    for projection in ["users", "aggregate-stats"] {
        let children: Vec<_> = (0..4)
            .map(|key| {
                schema
                    .projector(&[
                        "--partition-key",
                        &key.to_string(),
                        "--total-partitions",
                        "4",
                        "--projection",
                        projection,
                        "--exit-when-caught-up",
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start a projector")
            })
            .collect();
        for (key, child) in children.into_iter().enumerate() {
            let output = wait_within(child, LIMIT);
            let stderr = text(&output.stderr);
            assert_eq!(output.status.code(), Some(0), "partition {key}: {stderr}");
            assert!(
                stderr.contains(&format!("projection '{projection}': partitions {key} of 4")),
                "the start line names projection and partition: {stderr}"
            );
        }
    }
    assert_eq!(schema.stats_mismatches(), 0);
    assert_eq!(schema.count("SELECT COUNT(*) FROM users"), 120);
    assert_eq!(
        schema
            .count("SELECT COUNT(*) FROM users WHERE version = 4 AND email LIKE '%.1@example.com'"),
        120
    );
    // Each process created exactly the users of its own partition.
    let mut client = schema.client();
    let ids: Vec<String> = client
        .query("SELECT id FROM users", &[])
        .expect("users")
        .iter()
        .map(|row| row.get(0))
        .collect();
    for key in 0..4u32 {
        let expected = ids.iter().filter(|id| partition_of(id, 4) == key).count() as i64;
        let counted = schema.count(&format!(
            "SELECT COALESCE(SUM(users), 0)::bigint FROM user_partition_counts \
             WHERE total_partitions = 4 AND partition_key = {key}"
        ));
        assert_eq!(counted, expected, "users created by partition {key}");
    }
}

#[test]
fn sigkill_in_the_middle_of_a_catch_up_loses_and_repeats_nothing() {
    let schema = TestSchema::migrated("sigkill");
    let events = schema.seed(500, 60);
    let child = schema
        .projector(&[
            "--partition-key",
            "0-3",
            "--projection",
            "aggregate-stats",
            "--batch-size",
            "20",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the projector");
    eventually("some progress", LIMIT, || schema.stats_applied() > 2_000);
    signal(&child, "KILL");
    let killed = wait_within(child, LIMIT);
    assert_eq!(killed.status.code(), None, "killed by a signal");
    let applied = schema.count("SELECT SUM(events_applied)::bigint FROM aggregate_stats");
    assert!(
        applied < events,
        "the kill came too late to prove anything ({applied} of {events})"
    );

    let restart = run_within(
        schema.projector(&[
            "--partition-key",
            "0-3",
            "--projection",
            "aggregate-stats",
            "--exit-when-caught-up",
        ]),
        LIMIT,
    );
    assert_eq!(restart.status.code(), Some(0), "{}", text(&restart.stderr));
    assert_eq!(schema.stats_mismatches(), 0);
    assert_eq!(
        schema.count("SELECT SUM(events_applied)::bigint FROM aggregate_stats"),
        events
    );
}

#[test]
fn sigterm_stops_cleanly_within_two_seconds() {
    let schema = TestSchema::migrated("sigterm");
    schema.seed(20, 5);
    let child = schema
        .projector(&[
            "--partition-key",
            "0-1",
            "--total-partitions",
            "2",
            "--projection",
            "aggregate-stats",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the projector");
    eventually("the backlog to be applied", LIMIT, || {
        schema.stats_applied() == 100
    });
    let stopping = Instant::now();
    signal(&child, "TERM");
    let output = wait_within(child, Duration::from_secs(10));
    let took = stopping.elapsed();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(took < Duration::from_millis(2_500), "took {took:?}");
    assert!(
        stderr.contains("partition 1/2: applied"),
        "a summary per partition: {stderr}"
    );
}

#[test]
fn bad_flags_exit_2_naming_the_flag_and_the_value() {
    let schema = TestSchema::migrated("bad_flags");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--partition-key", "4", "--total-partitions", "4"],
            "error: invalid value '4' for --partition-key: partition key 4 is not below the number of partitions (4)",
        ),
        (
            &["--partition-key", "-1"],
            "error: invalid value '-1' for --partition-key: '-1' is not a partition key",
        ),
        (
            &["--partition-key", "one"],
            "error: invalid value 'one' for --partition-key: 'one' is not a partition key",
        ),
        (
            &["--total-partitions", "4"],
            "error: invalid value '' for --partition-key: required",
        ),
        (
            &["--partition-key", "0", "--total-partitions", "0"],
            "error: invalid value '0' for --total-partitions: there must be at least 1 partition",
        ),
        (
            &["--partition-key", "0", "--total-partitions", "x"],
            "error: invalid value 'x' for --total-partitions: expected a whole number",
        ),
        (
            &["--partition-key", ""],
            "error: invalid value '' for --partition-key: expected a key, a list such as 0,2 or a range such as 0-3",
        ),
        (
            &["--partition-key", "0", "--batch-size", "0"],
            "error: invalid value '0' for --batch-size: expected a whole number of at least 1",
        ),
        (
            &["--partition-key", "0", "--projection", "nope"],
            "error: invalid value 'nope' for --projection: known projections are users, aggregate-stats, aggregate-stats-batch and noop",
        ),
    ];
    for (args, expected) in cases {
        let output = run_within(schema.projector(args), LIMIT);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(expected),
            "{args:?}:\n{stderr}\nshould start with\n{expected}"
        );
    }
    let output = run_within(
        schema
            .projector(&[])
            .env("PARTITION_KEY", "9")
            .env("TOTAL_PARTITIONS", "8"),
        LIMIT,
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).starts_with(
            "error: invalid value '9' for PARTITION_KEY (from the environment): partition key 9 is not below"
        ),
        "{}",
        text(&output.stderr)
    );
    let unknown = run_within(schema.projector(&["--bogus"]), LIMIT);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        text(&unknown.stderr).contains("--bogus"),
        "{}",
        text(&unknown.stderr)
    );
    let help = run_within(schema.projector(&["--help"]), LIMIT);
    assert_eq!(help.status.code(), Some(0));
    assert!(text(&help.stdout).contains("--partition-key"));
}

#[test]
fn flags_win_over_the_environment() {
    let schema = TestSchema::migrated("flags_win");
    schema.seed(10, 3);
    let output = run_within(
        schema
            .projector(&[
                "--partition-key",
                "1",
                "--total-partitions",
                "2",
                "--exit-when-caught-up",
            ])
            .env("PARTITION_KEY", "7")
            .env("TOTAL_PARTITIONS", "3"),
        LIMIT,
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("partitions 1 of 2"), "{stderr}");
}

#[test]
fn a_different_partition_count_than_stored_exits_2_and_says_why() {
    let schema = TestSchema::migrated("cli_layout");
    schema.seed(10, 3);
    let first = run_within(
        schema.projector(&["--partition-key", "0-3", "--exit-when-caught-up"]),
        LIMIT,
    );
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let second = run_within(
        schema.projector(&[
            "--partition-key",
            "0",
            "--total-partitions",
            "3",
            "--exit-when-caught-up",
        ]),
        LIMIT,
    );
    let stderr = text(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "error: projection 'users' has checkpoints for 4 partition(s), not 3: a checkpoint only \
             holds under the partition count that wrote it, so running with 3 would skip or repeat events"
        ),
        "{stderr}"
    );
}

#[test]
fn missing_tables_exit_2_and_say_to_migrate() {
    let schema = TestSchema::empty("missing_tables");
    for args in [&["--partition-key", "0"][..], &["status"][..]] {
        let output = run_within(schema.projector(args), LIMIT);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("table(s) events, aggregate_heads, projection_checkpoints not found")
                && stderr.contains("run `projector migrate` first"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn an_unreachable_database_exits_1_quickly_without_printing_the_password() {
    let started = Instant::now();
    let output = run_within(
        Command::new(env!("CARGO_BIN_EXE_projector"))
            .args(["--partition-key", "0"])
            .env(
                "DATABASE_URL",
                "postgres://app:sup3r-secret@127.0.0.1:1/events",
            )
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        stderr.starts_with("error: could not connect to the database at app@127.0.0.1:1/events"),
        "{stderr}"
    );
    assert!(!stderr.contains("sup3r-secret") && !text(&output.stdout).contains("sup3r-secret"));

    let missing = run_within(
        Command::new(env!("CARGO_BIN_EXE_projector"))
            .args(["--partition-key", "0"])
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null()),
        LIMIT,
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("set DATABASE_URL or pass --database-url"));
}

#[test]
fn the_password_never_appears_in_a_normal_run() {
    let schema = TestSchema::migrated("password");
    schema.seed(5, 2);
    // The test server trusts local connections, so any password is accepted and must be hidden.
    let url = crate::util::database_url().replacen("://", "://postgres:hunter2-secret@", 1);
    if url.matches('@').count() != 1 {
        return; // DATABASE_URL already carries credentials; the unreachable test covers this.
    }
    let output = run_within(
        schema
            .projector(&["--partition-key", "0-3", "--exit-when-caught-up"])
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "debug"),
        LIMIT,
    );
    let all = text(&output.stderr) + &text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{all}");
    assert!(
        all.contains("database postgres@"),
        "the start line names the database: {all}"
    );
    assert!(!all.contains("hunter2-secret"), "{all}");
}

#[test]
fn status_shows_checkpoints_head_and_lag() {
    let schema = TestSchema::migrated("status");
    schema.seed(10, 3);
    let run = run_within(
        schema.projector(&[
            "--partition-key",
            "0-1",
            "--total-partitions",
            "2",
            "--projection",
            "aggregate-stats",
            "--exit-when-caught-up",
        ]),
        LIMIT,
    );
    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
    schema.seed(10, 2);
    let status = run_within(schema.projector(&["status"]), LIMIT);
    let stdout = text(&status.stdout);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    let lines: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "PROJECTION",
            "PARTITION",
            "CHECKPOINT",
            "HEAD",
            "LAG",
            "AGE"
        ]
    );
    assert_eq!(lines.len(), 3, "{stdout}");
    for (line, key) in lines[1..].iter().zip(["0/2", "1/2"]) {
        assert_eq!(
            line[..5],
            ["aggregate-stats", key, "30", "50", "20"],
            "{stdout}"
        );
    }
}
