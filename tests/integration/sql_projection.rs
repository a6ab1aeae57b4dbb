//! Projections written in SQL (`--projection-file`), through the real binary: the SQL
//! `aggregate-stats` equals the events and the Rust read model, across a restart, a
//! re-partitioning and a reset; the running total stays right with several events of one
//! aggregate in a batch; bad files are refused at start (exit 2) before anything is applied; a
//! payload that is not JSON reaches `batch` with `payload_json` NULL.

use std::path::PathBuf;
use std::time::Duration;

use crate::util::{TestSchema, run_within, text};

const LIMIT: Duration = Duration::from_secs(90);

fn example(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/sql")
        .join(name)
        .display()
        .to_string()
}

/// A file of `text` in a temporary folder of its own, removed with the returned guard.
struct TempFile {
    folder: PathBuf,
    path: String,
}

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let folder = std::env::temp_dir().join(format!(
            "projector_sql_{}_{}",
            std::process::id(),
            name.replace('.', "_")
        ));
        std::fs::create_dir_all(&folder).expect("create a temporary folder");
        let path = folder.join(name);
        std::fs::write(&path, text).expect("write the projection file");
        TempFile {
            folder,
            path: path.display().to_string(),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.folder);
    }
}

/// Runs the binary on partitions `keys` of `total` with `projection_args`, to the head; returns
/// its exit code and stderr.
fn run(schema: &TestSchema, keys: &str, total: &str, projection_args: &[&str]) -> (i32, String) {
    let mut args = vec![
        "--partition-key",
        keys,
        "--total-partitions",
        total,
        "--exit-when-caught-up",
    ];
    args.extend_from_slice(projection_args);
    let output = run_within(schema.projector(&args), LIMIT);
    (output.status.code().unwrap_or(-1), text(&output.stderr))
}

/// Rows in which two aggregate-stats-shaped tables differ.
fn differences(schema: &TestSchema, a: &str, b: &str) -> i64 {
    schema.count(&format!(
        "SELECT COUNT(*) FROM ((SELECT * FROM {a} EXCEPT SELECT * FROM {b}) \
         UNION ALL (SELECT * FROM {b} EXCEPT SELECT * FROM {a})) d"
    ))
}

fn assert_both_exact(schema: &TestSchema, when: &str) {
    assert_eq!(
        schema.stats_mismatches_in("aggregate_stats_sql"),
        0,
        "{when}: the SQL read model differs from the events"
    );
    assert_eq!(schema.stats_mismatches(), 0, "{when}: aggregate_stats");
    assert_eq!(
        differences(schema, "aggregate_stats", "aggregate_stats_sql"),
        0,
        "{when}: the SQL and Rust read models differ"
    );
}

#[test]
fn sql_projection_aggregate_stats_equals_the_events_and_the_rust_read_model() {
    let schema = TestSchema::migrated("sql_stats");
    let file = example("aggregate_stats.sql");
    let both = [
        "--projection",
        "aggregate-stats",
        "--projection-file",
        &file,
    ];
    schema.seed(300, 7);
    let (code, stderr) = run(&schema, "0-3", "4", &both);
    assert_eq!(code, 0, "{stderr}");
    assert_both_exact(&schema, "first run");
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM aggregate_stats_sql"),
        300
    );

    // A restart carries on from the checkpoints: new events of the same aggregates, new ones.
    schema.seed(300, 5);
    schema.seed_prefixed("other", 50, 4);
    let (code, stderr) = run(&schema, "0-3", "4", &both);
    assert_eq!(code, 0, "{stderr}");
    assert_both_exact(&schema, "after a restart");

    // Re-partitioned by name to 3, then run by two processes of the new layout.
    for name in ["aggregate-stats-sql", "aggregate-stats"] {
        let output = run_within(
            schema.projector(&["repartition", "--projection", name, "--to", "3"]),
            LIMIT,
        );
        assert_eq!(
            output.status.code(),
            Some(0),
            "repartition {name}: {}",
            text(&output.stderr)
        );
    }
    schema.seed(300, 3);
    for keys in ["0", "1-2"] {
        let (code, stderr) = run(&schema, keys, "3", &both);
        assert_eq!(code, 0, "partitions {keys} of 3: {stderr}");
    }
    assert_both_exact(&schema, "after re-partitioning to 3");

    // status shows it by name.
    let output = run_within(
        schema.projector(&["status", "--projection", "aggregate-stats-sql"]),
        LIMIT,
    );
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(
        stdout.matches("aggregate-stats-sql ").count(),
        3,
        "one line per partition:\n{stdout}"
    );

    // reset: a dry run first, then the file's reset section, then a rebuild.
    let output = run_within(
        schema.projector(&["reset", "--projection-file", &file]),
        LIMIT,
    );
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(schema.count("SELECT COUNT(*) FROM aggregate_stats_sql") > 0);
    let output = run_within(
        schema.projector(&["reset", "--projection-file", &file, "--yes"]),
        LIMIT,
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(schema.count("SELECT COUNT(*) FROM aggregate_stats_sql"), 0);
    let checkpoints = "SELECT COUNT(*) FROM projector_checkpoints \
                       WHERE projection = 'aggregate-stats-sql'";
    assert_eq!(schema.count(checkpoints), 0);
    let (code, stderr) = run(&schema, "0-1", "2", &["--projection-file", &file]);
    assert_eq!(code, 0, "{stderr}");
    assert_both_exact(&schema, "after a reset and a rebuild on 2 partitions");
}

/// Appends `per_account` movements to each of `accounts` accounts, interleaved, alternating
/// deposits and withdrawals of varying amounts, plus an event of another type in between
/// (outside the projection's scope).
fn append_movements(schema: &TestSchema, accounts: i64, per_account: i64) {
    schema
        .client()
        .execute(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                 event_id, event_type, payload) \
             SELECT 'bank', 'Account', 'acct-' || a, v, gen_random_uuid(), \
                 CASE WHEN v % 5 = 0 THEN 'Noted' WHEN v % 3 = 0 THEN 'Withdrawn' \
                     ELSE 'Deposited' END, \
                 convert_to('{\"amount\": ' || (v * 7 % 13) || '.5}', 'UTF8') \
             FROM generate_series(1, $1::bigint) v, generate_series(1, $2::bigint) a \
             ORDER BY v, a",
            &[&per_account, &accounts],
        )
        .expect("append movements");
}

#[test]
fn sql_projection_running_totals_stay_right_with_several_events_of_an_aggregate_per_batch() {
    let schema = TestSchema::migrated("sql_totals");
    append_movements(&schema, 5, 60);
    // The folder runs both examples; one partition and the default batch size put all 60
    // movements of an account in one batch.
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/sql")
        .display()
        .to_string();
    let (code, stderr) = run(&schema, "0", "1", &["--projection-file", &folder]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("'running-totals'") && stderr.contains("'aggregate-stats-sql'"),
        "{stderr}"
    );
    // Each movement's balance after it, and each account's balance, from the events.
    let expected = "WITH m AS (SELECT global_position, aggregate_id, \
             CASE event_type WHEN 'Withdrawn' THEN -1 ELSE 1 END \
                 * (convert_from(payload, 'UTF8')::jsonb ->> 'amount')::numeric AS amount \
             FROM events WHERE event_type IN ('Deposited', 'Withdrawn')) \
         SELECT global_position, aggregate_id, amount, \
             SUM(amount) OVER (PARTITION BY aggregate_id ORDER BY global_position) AS balance_after \
         FROM m";
    let history_wrong =
        format!("SELECT COUNT(*) FROM (({expected}) EXCEPT SELECT * FROM running_total_history) d");
    let movements = "SELECT COUNT(*) FROM events WHERE event_type IN ('Deposited', 'Withdrawn')";
    assert_eq!(schema.count(&history_wrong), 0);
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM running_total_history"),
        schema.count(movements)
    );
    let totals_wrong = format!(
        "SELECT COUNT(*) FROM (SELECT aggregate_id, SUM(amount) AS balance, COUNT(*) AS n \
             FROM ({expected}) e GROUP BY 1) e \
         FULL JOIN running_totals t USING (aggregate_id) \
         WHERE t.balance IS DISTINCT FROM e.balance OR t.movements IS DISTINCT FROM e.n"
    );
    assert_eq!(schema.count(&totals_wrong), 0);
    // More movements, on 2 partitions after a re-partitioning, in small batches.
    let output = run_within(
        schema.projector(&["repartition", "--projection", "running-totals", "--to", "2"]),
        LIMIT,
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let start: i64 = schema.count("SELECT MAX(aggregate_version) FROM events");
    schema
        .client()
        .execute(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                 event_id, event_type, payload) \
             SELECT 'bank', 'Account', 'acct-' || a, $1 + v, gen_random_uuid(), 'Deposited', \
                 convert_to('{\"amount\": ' || v || '}', 'UTF8') \
             FROM generate_series(1, 20::bigint) v, generate_series(1, 5::bigint) a \
             ORDER BY v, a",
            &[&start],
        )
        .expect("append more movements");
    let file = example("running_totals.sql");
    let (code, stderr) = run(
        &schema,
        "0-1",
        "2",
        &["--projection-file", &file, "--batch-size", "7"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(schema.count(&history_wrong), 0);
    assert_eq!(schema.count(&totals_wrong), 0);
}

#[test]
fn sql_projection_bad_files_are_refused_at_start_before_anything_is_applied() {
    let schema = TestSchema::migrated("sql_bad");
    schema.seed(10, 3);
    let setup = "-- setup\nCREATE TABLE IF NOT EXISTS bad_model (id TEXT PRIMARY KEY);\n";
    let cases: [(&str, String, &[&str]); 7] = [
        (
            "syntax.sql",
            format!(
                "-- projection: bad-syntax\n{setup}-- apply\nINSERT INTO bad_model\nSELEC aggregate_id FROM batch;\n"
            ),
            &["section `-- apply` (line 6)", "syntax error at or near \"SELEC\""],
        ),
        (
            "column.sql",
            format!(
                "-- projection: bad-column\n{setup}-- apply\nINSERT INTO bad_model SELECT no_such_column FROM batch;\n"
            ),
            &[
                "section `-- apply` (line 5)",
                "column \"no_such_column\" does not exist",
            ],
        ),
        (
            "table.sql",
            "-- projection: bad-table\n-- apply\nINSERT INTO missing_table SELECT aggregate_id FROM batch;\n".into(),
            &["section `-- apply`", "relation \"missing_table\" does not exist"],
        ),
        (
            "no_apply.sql",
            format!("-- projection: no-apply\n{setup}"),
            &["section `-- apply`", "no `-- apply` section"],
        ),
        (
            "setup.sql",
            "-- projection: bad-setup\n-- setup\nCREATE TABLE bad_setup (id TEXT PRIMARY KEY;\n-- apply\nSELECT 1;\n".into(),
            &["section `-- setup` (line 3)", "syntax error at or near \";\""],
        ),
        (
            "commit.sql",
            "-- projection: commits\n-- apply\nSELECT 1;\nCOMMIT;\n".into(),
            &["section `-- apply` (line 2)", "ends the transaction it runs in"],
        ),
        (
            "typo.sql",
            "-- projection: typo\n-- apply\nSELECT 1;\n-- rest\nTRUNCATE bad_model;\n".into(),
            &["(line 4)", "`-- rest` looks like a misspelt `-- reset`"],
        ),
    ];
    for (name, body, expected) in cases {
        let file = TempFile::new(name, &body);
        let (code, stderr) = run(
            &schema,
            "0-1",
            "2",
            &[
                "--projection",
                "aggregate-stats",
                "--projection-file",
                &file.path,
            ],
        );
        assert_eq!(code, 2, "{name}: {stderr}");
        let wanted = format!("error: projection file '{}'", file.path);
        assert!(stderr.contains(&wanted), "{name}: {stderr}");
        for part in expected {
            assert!(stderr.contains(part), "{name}: `{part}` not in:\n{stderr}");
        }
        // Nothing was applied or created: no checkpoints, no read models.
        assert_eq!(
            schema.count("SELECT COUNT(*) FROM projector_checkpoints"),
            0,
            "{name}"
        );
        assert_eq!(schema.stats_applied(), 0, "{name}");
        assert_eq!(
            schema.count(
                "SELECT COUNT(*) FROM pg_tables WHERE tablename IN ('bad_model', 'bad_setup')"
            ),
            0,
            "{name}"
        );
    }
    // A file that cannot be read, and a reset of a file without a reset section.
    let (code, stderr) = run(
        &schema,
        "0",
        "1",
        &["--projection-file", "/no/such/file.sql"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("projection file '/no/such/file.sql': cannot be read"),
        "{stderr}"
    );
    let file = TempFile::new(
        "no_reset.sql",
        "-- projection: no-reset\n-- apply\nSELECT 1 FROM batch;\n",
    );
    let output = run_within(
        schema.projector(&["reset", "--projection-file", &file.path, "--yes"]),
        LIMIT,
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("has no `-- reset` section"), "{stderr}");
}

#[test]
fn sql_projection_payload_that_is_not_json_has_payload_json_null() {
    let schema = TestSchema::migrated("sql_json");
    let mut client = schema.client();
    let payloads: [&[u8]; 4] = [b"{\"n\": 1}", b"not json", &[0xff, 0x00, 0xfe], b"[1, 2]"];
    for (version, payload) in payloads.iter().enumerate() {
        client
            .execute(
                "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
                     aggregate_version, event_id, event_type, payload) \
                 VALUES ('test', 'Thing', 'json-1', $1, gen_random_uuid(), 'Happened', $2)",
                &[&(version as i64 + 1), payload],
            )
            .expect("insert an event");
    }
    let file = TempFile::new(
        "seen.sql",
        "-- projection: seen\n\
         -- setup\n\
         CREATE TABLE IF NOT EXISTS seen (global_position BIGINT PRIMARY KEY, payload BYTEA, \
             payload_json JSONB, partition INT, total_partitions INT);\n\
         -- apply\n\
         INSERT INTO seen SELECT global_position, payload, payload_json, partition, \
             total_partitions FROM batch;\n",
    );
    let (code, stderr) = run(&schema, "0-2", "3", &["--projection-file", &file.path]);
    assert_eq!(code, 0, "{stderr}");
    let rows = client
        .query(
            "SELECT payload, payload_json::text, partition, total_partitions FROM seen \
             ORDER BY global_position",
            &[],
        )
        .expect("read seen");
    let seen: Vec<(Vec<u8>, Option<String>, i32)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(3)))
        .collect();
    assert_eq!(
        seen,
        [
            (payloads[0].to_vec(), Some("{\"n\": 1}".to_owned()), 3),
            (payloads[1].to_vec(), None, 3),
            (payloads[2].to_vec(), None, 3),
            (payloads[3].to_vec(), Some("[1, 2]".to_owned()), 3),
        ]
    );
    let partition: i32 = rows[0].get(2);
    let expected = projector::partition_of("json-1", 3) as i32;
    assert_eq!(partition, expected);
}

#[test]
fn sql_projection_payload_that_jsonb_refuses_has_payload_json_null_and_the_projection_goes_on() {
    let schema = TestSchema::migrated("sql_jsonb_refuses");
    let mut client = schema.client();
    // JSON that a JSON parser may take, but `jsonb` refuses: a lone surrogate, a number past
    // numeric's range, a NUL escape; around them, JSON it takes.
    let payloads: [&[u8]; 6] = [
        br#"{"n": 1}"#,
        br#""\ud83d""#,
        b"1e1000000",
        br#"{"s": "\u0000"}"#,
        br#"{"a": ["\ud83d\ude00", 1e100]}"#,
        br#"{"n": 2}"#,
    ];
    for (version, payload) in payloads.iter().enumerate() {
        client
            .execute(
                "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
                     aggregate_version, event_id, event_type, payload) \
                 VALUES ('test', 'Thing', 'jsonb-1', $1, gen_random_uuid(), 'Happened', $2)",
                &[&(version as i64 + 1), payload],
            )
            .expect("insert an event");
    }
    let file = TempFile::new(
        "read_json.sql",
        "-- projection: read-json\n\
         -- setup\n\
         CREATE TABLE IF NOT EXISTS read_json (global_position BIGINT PRIMARY KEY, \
             payload_json JSONB, n TEXT);\n\
         -- apply\n\
         INSERT INTO read_json SELECT global_position, payload_json, payload_json->>'n' \
             FROM batch;\n",
    );
    let (code, stderr) = run(&schema, "0-1", "2", &["--projection-file", &file.path]);
    assert_eq!(code, 0, "{stderr}");
    let seen: Vec<(Option<String>, Option<String>)> = client
        .query(
            "SELECT payload_json::text, n FROM read_json ORDER BY global_position",
            &[],
        )
        .expect("read read_json")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let json = |text: &str| Some(text.to_owned());
    assert_eq!(
        seen.len(),
        payloads.len(),
        "every event is applied: {seen:?}"
    );
    assert_eq!(seen[0], (json(r#"{"n": 1}"#), json("1")));
    assert_eq!(seen[1..4], [(None, None), (None, None), (None, None)]);
    // A surrogate pair and a large number are fine.
    let pair = seen[4].0.as_deref().unwrap_or_default();
    assert!(pair.starts_with(r#"{"a": ["😀", 1000"#), "{pair}");
    assert_eq!(seen[5], (json(r#"{"n": 2}"#), json("2")));
}

#[test]
fn sql_projection_aggregate_stats_fails_on_a_version_that_does_not_follow() {
    let schema = TestSchema::migrated("sql_order");
    schema.seed(5, 3);
    crate::util::insert_event(&mut schema.client(), "thing-2", 5);
    let file = example("aggregate_stats.sql");
    let (code, stderr) = run(&schema, "0", "1", &["--projection-file", &file]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr
            .contains("event version 5 of Thing/thing-2 does not follow the last applied version"),
        "{stderr}"
    );
    // Everything before the event was applied; the checkpoint is left just before it.
    assert_eq!(
        schema
            .count("SELECT events_applied FROM aggregate_stats_sql WHERE aggregate_id = 'thing-2'"),
        3
    );
    assert_eq!(
        schema.count("SELECT MAX(last_global_position) FROM aggregate_stats_sql"),
        15
    );
}

#[test]
fn sql_projection_failing_on_an_events_data_names_the_event_and_both_suspects() {
    let schema = TestSchema::migrated("sql_bad_data");
    schema.seed(3, 1);
    let mut client = schema.client();
    let position: i64 = client
        .query_one(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
                 aggregate_version, event_id, event_type, payload) \
             VALUES ('test', 'Thing', 'thing-2', 2, gen_random_uuid(), 'Counted', \
                 convert_to('{\"n\": \"many\"}', 'UTF8')) \
             RETURNING global_position",
            &[],
        )
        .expect("insert an event")
        .get(0);
    let file = TempFile::new(
        "counts.sql",
        "-- projection: counts\n\
         -- setup\n\
         CREATE TABLE IF NOT EXISTS counts (global_position BIGINT PRIMARY KEY, n INT);\n\
         -- apply\n\
         INSERT INTO counts SELECT global_position, (payload_json->>'n')::int FROM batch;\n",
    );
    let (code, stderr) = run(&schema, "0", "1", &["--projection-file", &file.path]);
    assert_eq!(code, 1, "{stderr}");
    let expected = format!(
        "error: projection 'counts' failed on partition 0/1 at global position {position} \
         (aggregate 'thing-2', event type 'Counted') after 3 attempt(s); its checkpoint is left \
         before this event, fix the cause and restart: projection file '{}', section `-- apply` \
         (line 4): the database refused the event at global position {position} (aggregate \
         'thing-2', event type 'Counted'): invalid input syntax for type integer: \"many\" \
         [SQLSTATE 22P02]; the event's data or the section may be at fault: fix the section, \
         or set the event aside (`-- on-poison: park`, then `projector dead-letters`)\n",
        file.path
    );
    assert!(stderr.ends_with(&expected), "{stderr}");
    assert!(
        !stderr.contains("fix the section and try again"),
        "{stderr}"
    );
}
