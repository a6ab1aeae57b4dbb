//! What a newcomer meets following the README: messages and logs as it quotes them.

use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::util::{TestSchema, eventually, run_within, signal, text, wait_within};

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

/// Runs the binary with `args` in `schema`, expecting `code`; returns stdout and stderr.
pub fn run_expecting(schema: &TestSchema, args: &[&str], code: i32) -> (String, String) {
    let output = run_within(schema.projector(args), LIMIT);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
    (stdout, stderr)
}

#[test]
fn connection_flags_work_after_the_subcommand_too() {
    let schema = TestSchema::migrated("flags_after");
    schema.seed(4, 2);
    let mut command = schema.projector(&["status", "--schema", &schema.name]);
    command.env_remove("PROJECTOR_SCHEMA");
    let output = run_within(command, LIMIT);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "no checkpoints yet\n");

    // After the subcommand wins over before it.
    let mut command = schema.projector(&[
        "--schema",
        "no_such_schema_here",
        "status",
        "--schema",
        &schema.name,
        "--database-url",
        &crate::util::database_url(),
    ]);
    command
        .env_remove("PROJECTOR_SCHEMA")
        .env_remove("DATABASE_URL");
    let output = run_within(command, LIMIT);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

#[test]
fn projection_before_status_or_reset_is_theirs() {
    let schema = TestSchema::migrated("projection_before");
    schema.seed(4, 2);
    for projection in ["aggregate-stats", "noop"] {
        run_expecting(
            &schema,
            &[
                "--partition-key",
                "0-1",
                "--total-partitions",
                "2",
                "--projection",
                projection,
                "--exit-when-caught-up",
            ],
            0,
        );
    }
    let (stdout, _) = run_expecting(&schema, &["--projection", "noop", "status"], 0);
    let projections: Vec<&str> = stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(projections, ["noop", "noop"], "{stdout}");
    let (_, stderr) = run_expecting(&schema, &["--projection", "noop", "reset"], 2);
    assert!(
        stderr.starts_with("error: reset would delete the 2 checkpoint(s) of projection 'noop'"),
        "{stderr}"
    );
}

#[test]
fn run_flags_given_with_a_subcommand_exit_2_saying_where_they_go() {
    let schema = TestSchema::migrated("run_flags_subcommand");
    for (args, expected) in [
        (
            &["--partition-key", "1", "status"][..],
            "error: --partition-key is for running a projection, and `projector status` does not \
             use it: drop it, or run the projection without a subcommand\n",
        ),
        (
            &["status", "--batch-size", "10"][..],
            "error: --batch-size is for running a projection, and `projector status` does not use \
             it: drop it, or run the projection without a subcommand\n",
        ),
        (
            &["--projection", "users", "migrate"][..],
            "error: `projector migrate` takes no --projection: drop it\n",
        ),
        (
            &["status", "--schema"][..],
            "error: --schema needs a value\n",
        ),
    ] {
        let (_, stderr) = run_expecting(&schema, args, 2);
        assert_eq!(
            stderr,
            format!("{expected}Run projector --help for usage.\n"),
            "{args:?}"
        );
    }
}

#[test]
fn seed_counts_name_the_flag_and_the_accepted_range() {
    let schema = TestSchema::migrated("seed_counts");
    for (flag, value, max) in [
        ("--users", "-3", "100000000"),
        ("--renames", "x", "1000"),
        ("--email-changes", "1001", "1000"),
    ] {
        let (_, stderr) = run_expecting(&schema, &["seed", flag, value], 2);
        assert_eq!(
            stderr,
            format!(
                "error: invalid value '{value}' for {flag}: expected a whole number from 0 to {max}\n"
            )
        );
    }
    assert_eq!(schema.count("SELECT COUNT(*) FROM events"), 0);
}

#[test]
fn a_bad_schema_from_the_environment_is_named_as_the_variable() {
    let schema = TestSchema::empty("bad_schema_env");
    let output = run_within(
        schema
            .projector(&["status"])
            .env("PROJECTOR_SCHEMA", "Bad Schema"),
        LIMIT,
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).starts_with(
            "error: invalid value 'Bad Schema' for PROJECTOR_SCHEMA (from the environment): "
        ),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn status_and_reset_on_a_schema_that_does_not_exist_name_it() {
    let schema = TestSchema::empty("missing_schema");
    let missing = format!("{}_not_there", schema.name);
    for args in [&["status"][..], &["reset", "--projection", "users"][..]] {
        let output = run_within(
            schema.projector(args).env("PROJECTOR_SCHEMA", &missing),
            LIMIT,
        );
        assert_eq!(output.status.code(), Some(2));
        assert_eq!(
            text(&output.stderr),
            format!(
                "error: schema '{missing}' does not exist: check the name given by PROJECTOR_SCHEMA \
                 (from the environment) (it is case-sensitive), or run `projector migrate` to \
                 create it with the projector's tables\n"
            ),
            "{args:?}"
        );
    }
}

#[test]
fn a_missing_partition_key_says_it_is_required() {
    let schema = TestSchema::migrated("key_required");
    let (_, stderr) = run_expecting(&schema, &["--total-partitions", "4"], 2);
    assert_eq!(
        stderr,
        "error: --partition-key is not set: it is required to run a projection: give the \
         partition(s) this process owns, from 0 to 3, as 2, 0,2 or 0-3, or auto to share them \
         with the other live processes (or set PARTITION_KEY)\n"
    );
}

#[test]
fn reset_help_lists_every_built_in_and_the_dry_run_names_each_table() {
    let schema = TestSchema::migrated("reset_tables");
    let (help, _) = run_expecting(&schema, &["reset", "--help"], 0);
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains("users, aggregate-stats, aggregate-stats-batch or noop"),
        "{help}"
    );
    for (projection, clears) in [
        (
            "users",
            "clear its read model (tables users and user_partition_counts)",
        ),
        (
            "aggregate-stats",
            "clear its read model (table aggregate_stats)",
        ),
        (
            "aggregate-stats-batch",
            "clear its read model (table aggregate_stats_batch)",
        ),
        ("noop", "clear nothing else (it has no read model)"),
    ] {
        let (_, stderr) = run_expecting(&schema, &["reset", "--projection", projection], 2);
        assert_eq!(
            stderr,
            format!(
                "error: reset would delete the checkpoints of projection '{projection}' (it has \
                 none) and {clears}, so that its next start rebuilds it from the first event; \
                 pass --yes to go ahead\n"
            )
        );
    }
}

/// A live process of `projection` owning partitions 0-1 of 2, once it holds them.
pub(crate) fn spawn_holder(schema: &TestSchema, projection: &str) -> Child {
    let child = schema
        .projector(&[
            "--partition-key",
            "0-1",
            "--total-partitions",
            "2",
            "--projection",
            projection,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a projector");
    eventually("the process to hold its partitions", LIMIT, || {
        schema.count(&format!(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 \
             AND granted AND classid = hashtext('projector ' || current_schema() || ' {projection}')::oid"
        )) == 2
    });
    child
}

fn stop(child: Child) {
    signal(&child, "TERM");
    let output = wait_within(child, LIMIT);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

#[test]
fn the_reset_dry_run_says_it_would_be_refused_while_a_process_holds_a_partition() {
    let schema = TestSchema::migrated("reset_dry_held");
    schema.seed(4, 2);
    let live = spawn_holder(&schema, "noop");
    let (_, stderr) = run_expecting(&schema, &["reset", "--projection", "noop"], 2);
    stop(live);
    let expected = "error: reset would delete the 2 checkpoint(s) of projection 'noop' (2 \
                    partitions, at global positions 8 to 8) and clear nothing else (it has no \
                    read model), so that its next start rebuilds it from the first event; --yes \
                    would be refused for now: projection 'noop' is running: live processes hold \
                    partition(s) 0/2 (server pid ";
    assert!(stderr.starts_with(expected), "{stderr}");
    assert!(stderr.contains("stop them first\n"), "{stderr}");
    assert!(!stderr.contains("pass --yes to go ahead"), "{stderr}");
}

#[test]
fn status_sizes_the_name_column_and_names_the_holders_client() {
    let schema = TestSchema::migrated("status_holder");
    schema.seed(4, 2);
    let live = spawn_holder(&schema, "aggregate-stats-batch");
    run_expecting(
        &schema,
        &[
            "--partition-key",
            "0-1",
            "--total-partitions",
            "2",
            "--projection",
            "aggregate-stats",
            "--exit-when-caught-up",
        ],
        0,
    );
    let (table, _) = run_expecting(&schema, &["status"], 0);
    let (json, _) = run_expecting(&schema, &["status", "--json"], 0);
    let live_pid = live.id();
    stop(live);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    // Every column ends where its header ends.
    let end_of = |line: &str, word: usize| {
        let mut ends = line
            .char_indices()
            .zip(line.chars().skip(1).chain([' ']))
            .filter(|&((_, c), next)| c != ' ' && next == ' ')
            .map(|((at, _), _)| at);
        ends.nth(word).expect("a column")
    };
    for line in &lines[1..] {
        assert_eq!(end_of(line, 1), end_of(lines[0], 1), "{table}");
    }
    let json: Value = serde_json::from_str(&json).expect("JSON");
    let batch = &json["projections"][1];
    assert_eq!(batch["projection"], "aggregate-stats-batch", "{json}");
    for (line, partition) in lines[3..]
        .iter()
        .zip(batch["partitions"].as_array().expect("partitions"))
    {
        let pid = partition["held_by_pid"].as_i64().expect("a pid");
        let client = partition["held_by_client"].as_str().expect("a client");
        assert!(
            client.starts_with("127.0.0.1:") || client == "local socket",
            "{json}"
        );
        let process = live_pid;
        assert_eq!(
            partition["held_by_application"],
            format!("projector pid {process}"),
            "{json}"
        );
        assert!(
            line.ends_with(&format!("  pid={pid} process={process} client={client}")),
            "{line}"
        );
    }
    assert_eq!(
        json["projections"][0]["partitions"][0]["held_by_client"],
        Value::Null
    );
}

#[test]
fn the_readme_quotes_the_missing_tables_message_as_the_binary_prints_it() {
    let schema = TestSchema::empty("readme_missing");
    let output = run_within(schema.projector(&["--partition-key", "0"]), LIMIT);
    assert_eq!(output.status.code(), Some(2));
    let message = text(&output.stderr).replace(&schema.name, "public");
    let readme = include_str!("../../README.md");
    assert!(
        readme.contains(message.trim_end()),
        "README.md does not quote:\n{message}"
    );
}
