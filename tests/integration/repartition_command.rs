//! `projector repartition`: the one way to change a projection's number of partitions, which a
//! process restarted with stale flags cannot undo.

use std::process::{Child, Command};
use std::time::Duration;

use crate::util::{TestSchema, eventually, run_within, text, wait_within};

const LIMIT: Duration = Duration::from_secs(60);

fn spawn(schema: &TestSchema, keys: &str, total: &str) -> Child {
    schema
        .aggregate_stats(keys, total, &[])
        .spawn()
        .expect("start a projector")
}

fn repartition(schema: &TestSchema, to: &str) -> (i32, String) {
    let output = run_within(
        schema.projector(&["repartition", "--projection", "aggregate-stats", "--to", to]),
        LIMIT,
    );
    let all = text(&output.stdout) + &text(&output.stderr);
    (output.status.code().unwrap_or(-1), all)
}

fn stored_layouts(schema: &TestSchema) -> Vec<i32> {
    schema
        .client()
        .query(
            "SELECT DISTINCT total_partitions FROM projector_checkpoints \
             WHERE projection = 'aggregate-stats' ORDER BY 1",
            &[],
        )
        .expect("read the layouts")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn a_process_restarted_with_the_old_count_cannot_move_the_layout_back() {
    let schema = TestSchema::migrated("stale_restart");
    schema.seed(40, 3);
    let first = run_within(
        schema.aggregate_stats("0-3", "4", &["--exit-when-caught-up"]),
        LIMIT,
    );
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));

    let (code, said) = repartition(&schema, "3");
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("projection 'aggregate-stats' now has 3 partitions (was 4)"),
        "{said}"
    );
    let (code, said) = repartition(&schema, "3");
    assert_eq!(code, 0, "{said}");
    assert!(
        said.contains("projection 'aggregate-stats' already has 3 partitions: nothing to do"),
        "{said}"
    );

    // A supervisor restarts a process with its old flags, with or without --repartition.
    for extra in [&[][..], &["--repartition"][..]] {
        let stale = run_within(schema.aggregate_stats("0", "4", extra), LIMIT);
        let stderr = text(&stale.stderr);
        assert_eq!(stale.status.code(), Some(2), "{extra:?}: {stderr}");
        let expected = match extra {
            [] => {
                "error: projection 'aggregate-stats' has checkpoints for 3 partition(s), not 4: \
                 a checkpoint only holds under the partition count that wrote it, so running \
                 with 4 would skip or repeat events. Start with --total-partitions 3, or run \
                 `projector repartition --projection aggregate-stats --to 4` to move to 4 \
                 partitions exactly"
            }
            _ => "error: --repartition was removed",
        };
        assert!(stderr.starts_with(expected), "{extra:?}: {stderr}");
        assert_eq!(stored_layouts(&schema), [3], "{extra:?}");
    }

    let new = run_within(
        schema.aggregate_stats("0-2", "3", &["--exit-when-caught-up"]),
        LIMIT,
    );
    assert_eq!(new.status.code(), Some(0), "{}", text(&new.stderr));
    assert_eq!(schema.stats_applied(), 120);
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn repartition_while_the_old_layout_runs_fences_it_and_the_new_one_applies_each_event_once() {
    let schema = TestSchema::migrated("repartition_live");
    let first = schema.seed(100, 5);
    let old = spawn(&schema, "0-3", "4");
    eventually("the old layout to catch up", LIMIT, || {
        schema.stats_applied() == first
    });
    let (code, said) = repartition(&schema, "3");
    assert_eq!(code, 0, "{said}");
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
    let second = schema.seed(100, 3);
    let new: Vec<Child> = (0..3)
        .map(|key| spawn(&schema, &key.to_string(), "3"))
        .collect();
    eventually("the new layout to apply the new events", LIMIT, || {
        schema.stats_applied() == first + second
    });
    for child in new {
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let output = wait_within(child, LIMIT);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    }
    assert_eq!(schema.stats_applied(), first + second);
    assert_eq!(schema.stats_mismatches(), 0);
    assert_eq!(stored_layouts(&schema), [3]);
}
