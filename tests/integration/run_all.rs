//! `scripts/run-all.sh`: one process per partition, after moving every projection it runs
//! (those of `--projection` lists and of `--projection-file` files) to the partition count.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::util::{TestSchema, run_within, text};

const LIMIT: Duration = Duration::from_secs(120);

/// `scripts/run-all.sh N ARGS...` in `schema`, with the test's binary (nothing is built) and a
/// pid file of its own; each process stops once caught up. Returns its exit code and output.
fn run_all(schema: &TestSchema, n: &str, args: &[&str]) -> (Option<i32>, String) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let pidfile = std::env::temp_dir().join(format!("run_all_{}.pids", schema.name));
    let mut command = Command::new("bash");
    command
        .arg(root.join("scripts/run-all.sh"))
        .arg(n)
        .args(args)
        .arg("--exit-when-caught-up")
        .env("DATABASE_URL", &schema.url)
        .env("PROJECTOR_SCHEMA", &schema.name)
        .env("PROJECTOR_BIN", env!("CARGO_BIN_EXE_projector"))
        .env("RUN_ALL_PIDFILE", &pidfile)
        .env_remove("PARTITION_KEY")
        .env_remove("TOTAL_PARTITIONS");
    let output = run_within(command, LIMIT);
    let _ = std::fs::remove_file(pidfile);
    (
        output.status.code(),
        text(&output.stdout) + &text(&output.stderr),
    )
}

/// Each projection with checkpoints, with its number of partitions, from `status --json`.
fn layouts(schema: &TestSchema) -> Vec<(String, u64)> {
    let output = run_within(schema.projector(&["status", "--json"]), LIMIT);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let document: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    document["projections"]
        .as_array()
        .expect("projections")
        .iter()
        .map(|p| {
            (
                p["projection"].as_str().unwrap_or_default().to_owned(),
                p["total_partitions"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

#[test]
fn run_all_moves_every_projection_it_runs_to_its_partition_count() {
    let schema = TestSchema::migrated("run_all");
    schema.seed(20, 2);
    let folder = std::env::temp_dir().join(format!("run_all_{}", schema.name));
    std::fs::create_dir_all(&folder).expect("a folder for the projection files");
    for name in ["counted", "seen"] {
        std::fs::write(
            folder.join(format!("{name}.sql")),
            format!(
                "-- projection: {name}\n-- setup\n\
                 CREATE TABLE IF NOT EXISTS {name} (global_position BIGINT PRIMARY KEY);\n\
                 -- apply\nINSERT INTO {name} SELECT global_position FROM batch;\n"
            ),
        )
        .expect("write a projection file");
    }
    let file = folder.join("counted.sql").display().to_string();
    let folder_text = folder.display().to_string();

    for n in ["2", "3"] {
        let (code, output) = run_all(&schema, n, &["--projection-file", &file]);
        assert_eq!(code, Some(0), "run-all {n} --projection-file: {output}");
        assert_eq!(
            layouts(&schema),
            [("counted".to_owned(), n.parse().unwrap())]
        );
    }
    for n in ["2", "3"] {
        let args = [
            "--projection",
            "aggregate-stats,noop",
            "--projection-file",
            &folder_text,
        ];
        let (code, output) = run_all(&schema, n, &args);
        assert_eq!(code, Some(0), "run-all {n} {args:?}: {output}");
        let total: u64 = n.parse().unwrap();
        assert_eq!(
            layouts(&schema),
            ["aggregate-stats", "counted", "noop", "seen"].map(|p| (p.to_owned(), total))
        );
    }
    assert_eq!(schema.stats_mismatches(), 0);
    assert_eq!(schema.count("SELECT COUNT(*) FROM seen"), 40);
    let _ = std::fs::remove_dir_all(folder);
}
