//! Event stores set up by hand: columns of other types than the projector reads.

use std::time::Duration;

use crate::util::{TestSchema, run_within, text};

#[test]
fn an_events_table_with_an_int_position_exits_2_naming_the_column() {
    let schema = TestSchema::migrated("shape_int_position");
    schema
        .client()
        .batch_execute("ALTER TABLE events ALTER COLUMN global_position TYPE INT")
        .expect("narrow the position");
    schema.seed(3, 2);
    for args in [
        &["--partition-key", "0", "--exit-when-caught-up"][..],
        &["status"][..],
    ] {
        let output = run_within(schema.projector(args), Duration::from_secs(15));
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("events.global_position is integer, expected bigint"),
            "{args:?}: {stderr}"
        );
    }
}
