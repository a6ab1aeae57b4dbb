//! The `projector` binary: exit codes, messages, signals, several processes.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use projector::partition_of;
use serde_json::{Value, json};

use crate::util::{TestSchema, eventually, run_within, text, wait_within};

const LIMIT: Duration = Duration::from_secs(60);

const STATUS_HEADER: [&str; 9] = [
    "PROJECTION",
    "PARTITION",
    "CHECKPOINT",
    "HEAD",
    "LAG",
    "LAG-TIME",
    "AGE",
    "PARKED",
    "HELD-BY",
];

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
        stderr.contains("partition 1/2 of 'aggregate-stats': applied"),
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
            "error: --partition-key is not set: it is required to run a projection",
        ),
        // Another flag's bad value is named before the missing partition key.
        (
            &["--batch-size", "0"],
            "error: invalid value '0' for --batch-size",
        ),
        (
            &["--on-poison", "maybe"],
            "error: invalid value 'maybe' for --on-poison",
        ),
        (
            &["status", "--watch", "--json"],
            "error: invalid value 'with --watch' for --json: --watch redraws the table",
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
            stderr.contains(
                "table(s) events, aggregate_heads, projector_checkpoints, projector_prior_layouts, \
                 projection_dead_letters not found"
            ) && stderr.contains("run `projector migrate` first"),
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
    assert_eq!(lines[0], STATUS_HEADER);
    assert_eq!(lines.len(), 3, "{stdout}");
    for (line, key) in lines[1..].iter().zip(["0/2", "1/2"]) {
        assert_eq!(
            line[..5],
            ["aggregate-stats", key, "30", "50", "20"],
            "{stdout}"
        );
    }
}

/// `projector status` as words per line, and `projector status --json`.
fn status(schema: &TestSchema) -> (Vec<Vec<String>>, Value) {
    let table = run_within(schema.projector(&["status"]), LIMIT);
    assert_eq!(table.status.code(), Some(0), "{}", text(&table.stderr));
    let json = run_within(schema.projector(&["status", "--json"]), LIMIT);
    assert_eq!(json.status.code(), Some(0), "{}", text(&json.stderr));
    let lines = text(&table.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    let document = serde_json::from_slice(&json.stdout).expect("status --json prints JSON");
    (lines, document)
}

/// Runs aggregate-stats on `keys` of `total` until caught up, with extra flags.
fn catch_up_cli(schema: &TestSchema, keys: &str, total: &str, extra: &[&str]) {
    let args = [&["--exit-when-caught-up"], extra].concat();
    let output = run_within(schema.aggregate_stats(keys, total, &args), LIMIT);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

/// `projector repartition` of aggregate-stats to `total`; returns what it printed.
fn repartition_cli(schema: &TestSchema, total: &str) -> String {
    let output = run_within(
        schema.projector(&[
            "repartition",
            "--projection",
            "aggregate-stats",
            "--to",
            total,
        ]),
        LIMIT,
    );
    let all = text(&output.stdout) + &text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{all}");
    all
}

/// A projector process on aggregate-stats, running until stopped.
fn spawn_live(schema: &TestSchema, keys: &str, total: &str, extra: &[&str]) -> Child {
    schema
        .aggregate_stats(keys, total, extra)
        .spawn()
        .expect("start a projector")
}

#[test]
fn status_shows_layout_lag_holder_and_repartitioning_as_a_table_and_as_json() {
    let schema = TestSchema::migrated("status_situations");

    // Fresh: nothing yet.
    let (lines, json) = status(&schema);
    assert_eq!(lines, [["no", "checkpoints", "yet"]]);
    assert_eq!(json, json!({"head_position": 0, "projections": []}));

    // Caught up.
    schema.seed(10, 3);
    catch_up_cli(&schema, "0-1", "2", &[]);
    let (lines, json) = status(&schema);
    assert_eq!(lines[0], STATUS_HEADER);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, key) in lines[1..].iter().zip(["0/2", "1/2"]) {
        assert_eq!(line[..6], ["aggregate-stats", key, "30", "30", "0", "0s"]);
        assert_eq!(line[7], "0", "nothing parked: {line:?}");
        assert_eq!(line[8], "-", "no live process holds it: {line:?}");
    }
    let projection = &json["projections"][0];
    assert_eq!(json["head_position"], 30);
    assert_eq!(projection["projection"], "aggregate-stats");
    assert_eq!(projection["total_partitions"], 2);
    assert_eq!(projection["repartitioning"], Value::Null);
    for (key, partition) in projection["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .enumerate()
    {
        assert_eq!(partition["partition"], key);
        assert_eq!(partition["checkpoint"], 30);
        assert_eq!(partition["lag_events"], 0);
        assert_eq!(partition["lag_seconds"], 0.0);
        assert_eq!(partition["live"], false);
        assert_eq!(partition["held_by_pid"], Value::Null);
    }

    // Lagging: 20 events stored over a second ago.
    schema.seed(10, 2);
    std::thread::sleep(Duration::from_millis(1_200));
    let (lines, json) = status(&schema);
    for line in &lines[1..] {
        assert_eq!(line[2..5], ["30", "50", "20"], "{line:?}");
        let seconds: u64 = line[5].trim_end_matches('s').parse().expect("LAG-TIME");
        assert!(seconds >= 1, "{line:?}");
    }
    let lag = json["projections"][0]["partitions"][0]["lag_seconds"]
        .as_f64()
        .expect("lag_seconds");
    assert!(lag >= 1.0, "{json}");
    assert_eq!(json["projections"][0]["partitions"][1]["lag_events"], 20);

    // Held by a live process.
    let live = spawn_live(&schema, "0-1", "2", &[]);
    eventually("the live process to catch up", LIMIT, || {
        schema.stats_applied() == 50
    });
    let (lines, json) = status(&schema);
    let partitions = json["projections"][0]["partitions"].clone();
    for (line, partition) in lines[1..]
        .iter()
        .zip(partitions.as_array().expect("partitions"))
    {
        assert_eq!(partition["live"], true, "{json}");
        let pid = partition["held_by_pid"].as_i64().expect("a pid");
        assert_eq!(line[8], format!("pid={pid}"), "{line:?}");
        assert_eq!(line[4], "0", "{line:?}");
    }
    signal(&live, "TERM");
    let stopped = wait_within(live, LIMIT);
    assert_eq!(stopped.status.code(), Some(0), "{}", text(&stopped.stderr));

    // Re-partitioning in progress: 2 → 3 with the old partitions at 80 and 50, and only
    // partition 0 of the new layout run so far.
    schema.seed(10, 3);
    catch_up_cli(&schema, "0", "2", &[]);
    repartition_cli(&schema, "3");
    catch_up_cli(&schema, "0", "3", &[]);
    let (lines, json) = status(&schema);
    assert_eq!(lines.len(), 5, "{lines:?}");
    let rows: Vec<&[String]> = lines[1..4].iter().map(|l| &l[1..3]).collect();
    assert_eq!(rows, [["0/3", "80"], ["1/3", "50"], ["2/3", "50"]]);
    assert_eq!(
        lines[4].join(" "),
        "aggregate-stats: re-partitioning from 2 to 3 partitions in progress: 1 of 3 \
         partition(s) past global position 80, the last applied under the earlier layout(s); \
         still skipping: 1/3, 2/3"
    );
    assert_eq!(
        json["projections"][0]["repartitioning"],
        json!({
            "from": [{"total_partitions": 2, "checkpoints": [80, 50]}],
            "until_position": 80,
            "partitions_done": 1,
        })
    );

    // Done: the earlier layout is retired, and every event was applied once.
    catch_up_cli(&schema, "1-2", "3", &[]);
    let (lines, json) = status(&schema);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(json["projections"][0]["repartitioning"], Value::Null);
    assert_eq!(schema.stats_applied(), 80);
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn a_process_of_the_old_layout_is_fenced_by_a_new_one_and_exits_2() {
    let schema = TestSchema::migrated("cli_fenced");
    let first = schema.seed(100, 5);
    let old = spawn_live(&schema, "0-3", "4", &[]);
    eventually("the old layout to catch up", LIMIT, || {
        schema.stats_applied() == first
    });
    let switch = repartition_cli(&schema, "3");
    assert!(
        switch.contains("re-partitioning from 4 to 3 partition(s)"),
        "{switch}"
    );
    let new = spawn_live(&schema, "0-2", "3", &[]);
    let second = schema.seed(100, 3);
    let fenced = wait_within(old, Duration::from_secs(20));
    let stderr = text(&fenced.stderr);
    assert_eq!(fenced.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "error: fenced: projection 'aggregate-stats' now runs with 3 partitions; this \
             process (4 partitions) stops"
        ),
        "{stderr}"
    );
    eventually("the new layout to apply the new events", LIMIT, || {
        schema.stats_applied() == first + second
    });
    signal(&new, "TERM");
    let output = wait_within(new, LIMIT);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn a_standby_process_takes_over_within_seconds_after_the_owner_is_killed() {
    let schema = TestSchema::migrated("standby_kill");
    let first = schema.seed(200, 5);
    let owner_name = format!("owner_{}", schema.name);
    let standby_name = format!("standby_{}", schema.name);
    let owner = spawn_live_named(&schema, &owner_name);
    eventually("the owner to catch up", LIMIT, || {
        schema.stats_applied() == first
    });
    let standby = spawn_live_named(&schema, &standby_name);
    // The standby's reader and both workers are connected once it has tried the partitions.
    let connections =
        format!("SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = '{standby_name}'");
    eventually("the standby to connect", LIMIT, || {
        schema.count(&connections) >= 3
    });
    std::thread::sleep(Duration::from_millis(300));
    let holders = |name: &str| {
        let (_, json) = status(&schema);
        json["projections"][0]["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .filter(|p| {
                p["held_by_pid"].as_i64().is_some_and(|pid| {
                    schema.count(&format!(
                        "SELECT COUNT(*) FROM pg_stat_activity \
                         WHERE pid = {pid} AND application_name = '{name}'"
                    )) == 1
                })
            })
            .count()
    };
    assert_eq!(holders(&owner_name), 2, "the owner holds both partitions");

    signal(&owner, "KILL");
    let killed = wait_within(owner, LIMIT);
    assert_eq!(killed.status.code(), None, "killed by a signal");
    let second = schema.seed(200, 2);
    let since = Instant::now();
    eventually("the standby to take over and apply", LIMIT, || {
        schema.stats_applied() == first + second
    });
    let took = since.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(
        holders(&standby_name),
        2,
        "the standby holds both partitions"
    );

    signal(&standby, "TERM");
    let output = wait_within(standby, LIMIT);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("is held by another live process") && stderr.contains("standing by"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the process holding it is gone; taking it over"),
        "{stderr}"
    );
    assert_eq!(schema.stats_mismatches(), 0);
}

fn spawn_live_named(schema: &TestSchema, name: &str) -> Child {
    schema
        .projector(&[
            "--partition-key",
            "0-1",
            "--total-partitions",
            "2",
            "--projection",
            "aggregate-stats",
        ])
        .env("DATABASE_URL", crate::util::url_named(name))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a projector")
}

/// Every row of `table`, ordered, as text.
fn rows_of(schema: &TestSchema, table: &str) -> Vec<String> {
    schema
        .client()
        .query(
            &format!("SELECT t::text FROM {table} t ORDER BY t::text"),
            &[],
        )
        .expect("read the table")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn reset_then_rebuild_gives_the_same_read_model() {
    let schema = TestSchema::migrated("reset_rebuild");
    let seed = run_within(schema.projector(&["seed", "--users", "60"]), LIMIT);
    assert_eq!(seed.status.code(), Some(0), "{}", text(&seed.stderr));
    let build = |keys: &str, total: &str| {
        for projection in ["aggregate-stats", "users"] {
            let output = run_within(
                schema.projector(&[
                    "--partition-key",
                    keys,
                    "--total-partitions",
                    total,
                    "--projection",
                    projection,
                    "--exit-when-caught-up",
                ]),
                LIMIT,
            );
            assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        }
    };
    build("0-3", "4");
    let stats = rows_of(&schema, "aggregate_stats");
    let users = rows_of(&schema, "users");
    assert_eq!((stats.len(), users.len()), (60, 60));

    for projection in ["aggregate-stats", "users"] {
        let output = run_within(
            schema.projector(&["reset", "--projection", projection, "--yes"]),
            LIMIT,
        );
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    }
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projector_checkpoints"),
        0
    );
    assert_eq!(schema.count("SELECT COUNT(*) FROM aggregate_stats"), 0);
    assert_eq!(schema.count("SELECT COUNT(*) FROM users"), 0);
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM user_partition_counts"),
        0
    );

    // Rebuilt under another layout: no checkpoints are left, so it is a fresh start.
    build("0-2", "3");
    assert_eq!(rows_of(&schema, "aggregate_stats"), stats);
    assert_eq!(rows_of(&schema, "users"), users);
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn reset_needs_yes_and_is_refused_while_a_process_holds_a_partition() {
    let schema = TestSchema::migrated("reset_refused");
    schema.seed(20, 8);
    catch_up_cli(&schema, "0-3", "4", &[]);

    let unconfirmed = run_within(
        schema.projector(&["reset", "--projection", "aggregate-stats"]),
        LIMIT,
    );
    let stderr = text(&unconfirmed.stderr);
    assert_eq!(unconfirmed.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(
            "error: reset would delete the 4 checkpoint(s) of projection 'aggregate-stats' \
             (4 partitions, at global positions 160 to 160) and clear its read model (table \
             aggregate_stats), so that its next start rebuilds it from the first event; pass \
             --yes to go ahead"
        ),
        "{stderr}"
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projector_checkpoints"),
        4
    );

    let live = spawn_live(&schema, "2", "4", &[]);
    eventually("the live process to hold its partition", LIMIT, || {
        status(&schema).1["projections"][0]["partitions"][2]["live"] == true
    });
    let refused = run_within(
        schema.projector(&["reset", "--projection", "aggregate-stats", "--yes"]),
        LIMIT,
    );
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(
            "error: projection 'aggregate-stats' is running: live processes hold partition(s) \
             2/4 (server pid "
        ) && stderr.contains("stop them first"),
        "{stderr}"
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projector_checkpoints"),
        4
    );
    assert_eq!(schema.stats_applied(), 160);
    signal(&live, "TERM");
    let stopped = wait_within(live, LIMIT);
    assert_eq!(stopped.status.code(), Some(0), "{}", text(&stopped.stderr));
}
