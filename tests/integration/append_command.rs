//! `projector append` (one event from flags, or many from a JSON-lines file) and `projector
//! seed`, both through the library's append: versions checked, heads moved.

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use crate::newcomer::run_expecting;
use crate::util::{TestSchema, text, wait_within};

const LIMIT: Duration = Duration::from_secs(60);

/// `projector append` for `aggregate` of type Cart with `extra` flags.
fn append_args<'a>(aggregate: &'a str, payload: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "append",
        "--aggregate-type",
        "Cart",
        "--aggregate-id",
        aggregate,
        "--event-type",
        "ItemAdded",
        "--payload",
        payload,
    ];
    args.extend_from_slice(extra);
    args
}

/// (bounded context, version, event type, payload as text) of each event of `aggregate`.
fn stored(schema: &TestSchema, aggregate: &str) -> Vec<(String, i64, String, String)> {
    schema
        .client()
        .query(
            "SELECT bounded_context, aggregate_version, event_type, convert_from(payload, 'UTF8') \
             FROM events WHERE aggregate_id = $1 ORDER BY global_position",
            &[&aggregate],
        )
        .expect("read the events")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect()
}

fn head_version(schema: &TestSchema, aggregate: &str) -> i64 {
    schema
        .client()
        .query_opt(
            "SELECT aggregate_version FROM aggregate_heads \
             WHERE bounded_context = 'default' AND aggregate_id = $1",
            &[&aggregate],
        )
        .expect("read the head")
        .map_or(0, |row| row.get(0))
}

#[test]
fn append_stores_one_event_checks_the_version_and_moves_the_head() {
    let schema = TestSchema::migrated("append_one");
    let payload = r#"{"sku": "a-1", "qty": 2}"#;
    let (stdout, _) = run_expecting(&schema, &append_args("cart-1", payload, &[]), 0);
    assert_eq!(
        stdout,
        "appended 1 event to default/Cart/cart-1 at global position 1\n"
    );
    assert_eq!(
        stored(&schema, "cart-1"),
        [("default".into(), 1, "ItemAdded".into(), payload.into())],
        "the payload is stored as given"
    );
    assert_eq!(head_version(&schema, "cart-1"), 1);

    run_expecting(
        &schema,
        &append_args("cart-1", "{}", &["--expected-version", "1"]),
        0,
    );
    run_expecting(
        &schema,
        &append_args("cart-1", "{}", &["--expected-version", "1"]),
        1,
    );
    let (_, stderr) = run_expecting(
        &schema,
        &append_args("cart-1", "{}", &["--expected-version", "none"]),
        1,
    );
    assert!(
        stderr.contains(
            "version conflict on default/Cart/cart-1: expected no stream, found version 2"
        ),
        "{stderr}"
    );
    let other_context = ["--expected-version", "none", "--bounded-context", "shop"];
    run_expecting(&schema, &append_args("cart-1", "{}", &other_context), 0);
    run_expecting(
        &schema,
        &append_args("cart-2", "[1]", &["--expected-version", "none"]),
        0,
    );
    run_expecting(
        &schema,
        &append_args("cart-2", "2", &["--expected-version", "any"]),
        0,
    );
    assert_eq!(head_version(&schema, "cart-1"), 2);
    assert_eq!(stored(&schema, "cart-1").len(), 3);
    assert_eq!(head_version(&schema, "cart-2"), 2);

    for (args, expected) in [
        (
            append_args("cart-3", r#"{"sku":"#, &[]),
            "error: invalid value '{\"sku\":' for --payload: not JSON: EOF while parsing a value \
             at line 1 column 7\n",
        ),
        (
            append_args("cart-3", "{}", &["--expected-version", "first"]),
            "error: invalid value 'first' for --expected-version: expected a version number \
             (0 or more), any, or none (the aggregate has no events yet)\n",
        ),
        (
            append_args("", "{}", &[]),
            "error: invalid value '' for --aggregate-id: expected a non-empty text\n",
        ),
    ] {
        let (_, stderr) = run_expecting(&schema, &args, 2);
        assert_eq!(stderr, expected, "{args:?}");
    }
    let (_, stderr) = run_expecting(&schema, &["append", "--aggregate-id", "cart-3"], 2);
    assert!(
        stderr.contains(
            "give --aggregate-type, --aggregate-id, --event-type and --payload, or --file"
        ),
        "{stderr}"
    );
    assert_eq!(schema.count("SELECT COUNT(*) FROM events"), 5);
}

/// `projector append --file -` with `lines` on its standard input.
fn append_stdin(schema: &TestSchema, lines: &str) -> std::process::Output {
    let mut child = schema
        .projector(&["append", "--file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the projector");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("write the lines");
    wait_within(child, LIMIT)
}

#[test]
fn append_from_json_lines_is_one_transaction_and_names_bad_lines() {
    let schema = TestSchema::migrated("append_lines");
    let good = concat!(
        r#"{"aggregate_type": "Cart", "aggregate_id": "cart-1", "event_type": "Opened", "payload": {"by": "ann"}}"#,
        "\n\n",
        r#"{"bounded_context": "shop", "aggregate_type": "Cart", "aggregate_id": "cart-1", "event_type": "ItemAdded", "payload": {"sku": "a"}, "expected_version": 0}"#,
        "\n",
        r#"{"aggregate_type": "Cart", "aggregate_id": "cart-1", "event_type": "ItemAdded", "payload": {"sku": "b"}, "expected_version": 1}"#,
        "\n",
    );
    let file = std::env::temp_dir().join(format!("{}.jsonl", schema.name));
    std::fs::write(&file, good).expect("write the file");
    let path = file.to_string_lossy().into_owned();
    let (stdout, _) = run_expecting(&schema, &["append", "--file", &path], 0);
    let _ = std::fs::remove_file(&file);
    assert_eq!(
        stdout,
        format!("appended 3 event(s) from {path} in one transaction, at global positions 1 to 3\n")
    );
    assert_eq!(
        stored(&schema, "cart-1"),
        [
            (
                "default".into(),
                1,
                "Opened".into(),
                r#"{"by": "ann"}"#.into()
            ),
            (
                "shop".into(),
                1,
                "ItemAdded".into(),
                r#"{"sku": "a"}"#.into()
            ),
            (
                "default".into(),
                2,
                "ItemAdded".into(),
                r#"{"sku": "b"}"#.into()
            ),
        ]
    );
    assert_eq!(
        schema
            .count("SELECT aggregate_version FROM aggregate_heads WHERE bounded_context = 'shop'"),
        1
    );
    assert_eq!(
        schema.count("SELECT COUNT(DISTINCT xmin::text) FROM events"),
        1,
        "one transaction"
    );

    // Bad lines are all named; nothing is appended.
    let bad = concat!(
        r#"{"aggregate_type": "Cart", "aggregate_id": "cart-9", "event_type": "Opened", "payload": {}}"#,
        "\n",
        r#"{"aggregate_type": "Cart", "aggregate_id": "cart-9", "event_type": "#,
        "\n",
        r#"{"aggregate_type": "Cart", "aggregate_id": "cart-9", "payload": {}}"#,
        "\n",
        r#"{"aggregate_type": "Cart", "aggregate_id": "cart-9", "event_type": "X", "payload": {}, "expected": 3}"#,
        "\n",
    );
    let output = append_stdin(&schema, bad);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stderr),
        "error: invalid value '-' for --file: 3 bad line(s), nothing appended: line 2: not JSON: \
         EOF while parsing a value at line 1 column 67; line 3: no event_type; line 4: unknown \
         field expected (the fields are bounded_context, aggregate_type, aggregate_id, \
         event_type, payload, expected_version)\n"
    );
    // A conflict on line 2 rolls back line 1 too.
    let conflict = concat!(
        r#"{"aggregate_type": "Cart", "aggregate_id": "cart-9", "event_type": "Opened", "payload": {}}"#,
        "\n",
        r#"{"aggregate_type": "Cart", "aggregate_id": "cart-1", "event_type": "Closed", "payload": {}, "expected_version": "none"}"#,
        "\n",
    );
    let output = append_stdin(&schema, conflict);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 2 of -: nothing appended (the whole file is one transaction)")
            && stderr.contains(
                "error: version conflict on default/Cart/cart-1: expected no stream, found \
                 version 2"
            ),
        "{stderr}"
    );
    assert_eq!(schema.count("SELECT COUNT(*) FROM events"), 3);
    assert_eq!(head_version(&schema, "cart-9"), 0);
}

#[test]
fn seed_appends_thousands_of_events_per_transaction_and_moves_every_head() {
    let schema = TestSchema::migrated("seed_batches");
    run_expecting(&schema, &["seed", "--users", "2500"], 0);
    assert_eq!(schema.count("SELECT COUNT(*) FROM events"), 7500);
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM aggregate_heads WHERE aggregate_version = 3"),
        2500
    );
    assert_eq!(
        schema.count("SELECT COUNT(DISTINCT xmin::text) FROM events"),
        2,
        "7,500 events in two transactions of about 5,000"
    );
}
