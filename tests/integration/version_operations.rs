//! Versions as operators see them: `status` lists each version with its state, `/metrics`
//! labels figures with the version, `wait` waits on the live version unless given one, and
//! `--promote-within` promotes a new version once it has caught up.

use std::time::Duration;

use projector::Builder;

use crate::util::{TestSchema, eventually, insert_event, run_within, signal, text, wait_within};
use crate::versions::{Tally, checkpoint_floor, head, start, tally_file};

#[test]
fn status_metrics_and_wait_tell_the_versions_apart() {
    let schema = TestSchema::migrated("versions_status");
    schema.seed(20, 10);
    let database = schema.database.clone();
    start(Builder::new(database.clone(), Tally::at(1)).exit_when_caught_up(true))
        .join()
        .expect("version 1 catches up");
    let v2 = start(Builder::new(database.clone(), Tally::at(2)));
    eventually("version 2 to catch up", Duration::from_secs(30), || {
        checkpoint_floor(&schema, "tally@2") >= head(&schema)
    });
    let status = run_within(
        schema.projector(&["status", "--projection", "tally"]),
        Duration::from_secs(30),
    );
    let shown = text(&status.stdout);
    assert!(shown.contains("tally@2 "), "{shown}");
    assert!(
        shown.contains("tally: version 1 live, 0 position(s) behind the head; version 2 building"),
        "{shown}"
    );
    let json = run_within(
        schema.projector(&["status", "--json"]),
        Duration::from_secs(30),
    );
    let document: serde_json::Value =
        serde_json::from_slice(&json.stdout).expect("status --json is JSON");
    let states: Vec<(u64, String)> = document["versions"]
        .as_array()
        .expect("a versions list")
        .iter()
        .map(|v| (v["version"].as_u64().unwrap_or(0), v["state"].to_string()))
        .collect();
    assert_eq!(
        states,
        [(1, "\"live\"".to_owned()), (2, "\"building\"".to_owned())]
    );
    let metrics = v2.metrics().render();
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("projector_checkpoint_position{")
                && line.contains("projection=\"tally@2\"")
                && line.contains("version=\"2\"")),
        "{metrics}"
    );
    // `wait` waits on the live version: version 1, which no process runs now.
    let position = insert_event(&mut schema.client(), "later-1", 1);
    let position = position.to_string();
    let on_live = run_within(
        schema.projector(&[
            "wait",
            "--projection",
            "tally",
            "--position",
            &position,
            "--timeout",
            "1s",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(on_live.status.code(), Some(1), "{}", text(&on_live.stderr));
    let on_two = run_within(
        schema.projector(&[
            "wait",
            "--projection",
            "tally",
            "--version",
            "2",
            "--position",
            &position,
        ]),
        Duration::from_secs(30),
    );
    assert!(on_two.status.success(), "{}", text(&on_two.stderr));
    projector::promote(&database, "tally", 2, Duration::from_secs(30)).expect("promote");
    let position = insert_event(&mut schema.client(), "later-1", 2).to_string();
    let after = run_within(
        schema.projector(&["wait", "--projection", "tally", "--position", &position]),
        Duration::from_secs(30),
    );
    assert!(after.status.success(), "{}", text(&after.stderr));
    assert!(
        text(&after.stdout).contains("projection 'tally@2' has applied"),
        "{}",
        text(&after.stdout)
    );
    v2.shutdown();
    v2.join().expect("version 2 stops cleanly");
}

#[test]
fn a_new_version_run_with_promote_within_is_promoted_once_caught_up_and_not_before() {
    let schema = TestSchema::migrated("versions_auto");
    schema.seed(20, 10);
    let dir = std::env::temp_dir().join(format!("{}_files", schema.name));
    std::fs::create_dir_all(&dir).expect("create the files' folder");
    let (v1_file, v2_file) = (tally_file(&dir, 1), tally_file(&dir, 2));
    let run = |file: &str, extra: &[&str]| {
        let mut args = vec!["--projection-file", file, "--partition-key", "0-3"];
        args.extend_from_slice(extra);
        schema.projector(&args)
    };
    let v1 = run_within(
        run(&v1_file, &["--exit-when-caught-up"]),
        Duration::from_secs(60),
    );
    assert!(v1.status.success(), "{}", text(&v1.stderr));
    let live = || {
        schema.count(
            "SELECT COALESCE(MAX(version), 1)::bigint FROM projector_projection_versions \
             WHERE projection = 'tally' AND state = 'live'",
        )
    };
    // Without the flag, a caught-up version waits for the command.
    let v2 = run_within(
        run(&v2_file, &["--exit-when-caught-up"]),
        Duration::from_secs(60),
    );
    assert!(v2.status.success(), "{}", text(&v2.stderr));
    assert_eq!(live(), 1);
    let mut v2 = run(
        &v2_file,
        &["--promote-within", "10", "--poll-interval-ms", "20"],
    );
    let v2 = v2
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start version 2");
    eventually("version 2 to be promoted", Duration::from_secs(30), || {
        live() == 2
    });
    assert_eq!(
        schema.count(&format!(
            "SELECT MIN(version)::bigint FROM {}_readers.tally",
            schema.name
        )),
        2
    );
    signal(&v2, "TERM");
    let v2 = wait_within(v2, Duration::from_secs(30));
    assert_eq!(v2.status.code(), Some(0), "{}", text(&v2.stderr));
    assert!(
        text(&v2.stderr).contains("version 2 promoted (--promote-within 10)"),
        "{}",
        text(&v2.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn version_one_runs_as_before_in_a_schema_migrated_before_versions_and_a_later_one_asks_for_migrate()
 {
    let schema = TestSchema::migrated("versions_before");
    // As an earlier release left the schema: no registry of versions.
    schema
        .client()
        .batch_execute("DROP TABLE projector_projection_versions")
        .expect("drop the registry");
    schema.seed(10, 5);
    let database = schema.database.clone();
    start(Builder::new(database.clone(), Tally::at(1)).exit_when_caught_up(true))
        .join()
        .expect("version 1 runs");
    assert_eq!(
        schema.count(
            "SELECT COUNT(*) FROM projector_checkpoints WHERE projection = 'tally' \
             AND last_position = 50"
        ),
        4
    );
    assert_eq!(schema.count("SELECT SUM(n)::bigint FROM tally"), 50);
    let refused = Builder::new(database, Tally::at(2)).start().map(drop);
    match refused {
        Err(projector::Error::MissingTables { tables, .. }) => {
            assert_eq!(tables, ["projector_projection_versions"]);
        }
        other => panic!("version 2 without the registry: {other:?}"),
    }
}

/// A projection file `name` (`name_counts` its table) at `version`.
fn counts_file(dir: &std::path::Path, name: &str, version: u32) -> String {
    let path = dir.join(format!("{name}_v{version}.sql"));
    std::fs::write(
        &path,
        format!(
            "-- projection: {name}\n\
             -- version: {version}\n\
             -- setup\n\
             CREATE TABLE IF NOT EXISTS {name}_counts (aggregate_id TEXT PRIMARY KEY, \
                 n BIGINT NOT NULL);\n\
             -- apply\n\
             INSERT INTO {name}_counts SELECT aggregate_id, count(*) FROM batch \
                 GROUP BY aggregate_id ON CONFLICT (aggregate_id) \
                 DO UPDATE SET n = {name}_counts.n + EXCLUDED.n;\n"
        ),
    )
    .expect("write the projection file");
    path.to_string_lossy().into_owned()
}

#[test]
fn retire_drops_nothing_for_a_version_that_does_not_exist_nor_another_projections_read_model() {
    let schema = TestSchema::migrated("versions_retire_other");
    schema.seed(20, 5);
    let dir = std::env::temp_dir().join(format!("{}_files", schema.name));
    std::fs::create_dir_all(&dir).expect("create the files' folder");
    let build = |file: &str| {
        run_within(
            schema.projector(&[
                "--projection-file",
                file,
                "--partition-key",
                "0-3",
                "--exit-when-caught-up",
            ]),
            Duration::from_secs(60),
        )
    };
    // Version 2 of `left`, built in `<schema>_v2`.
    let built = build(&counts_file(&dir, "left", 2));
    assert!(built.status.success(), "{}", text(&built.stderr));
    // A version 2 of another projection would share that schema: refused, naming a number.
    let refused = build(&counts_file(&dir, "right", 2));
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "schema '{}_v2' already holds version 2 of 'left'",
            schema.name
        )) && stderr.contains("such as 3"),
        "{stderr}"
    );
    let rows = |table: &str| {
        schema.count(&format!(
            "SELECT COALESCE(SUM(n), 0)::bigint FROM {}_v2.{table}",
            schema.name
        ))
    };
    assert_eq!(rows("left_counts"), 100);
    // No such projection, and no version 3 of an existing one: refused, with --yes too.
    for (projection, version) in [("nosuch", "2"), ("left", "3")] {
        for yes in [false, true] {
            let mut args = vec!["retire", "--projection", projection, "--version", version];
            if yes {
                args.push("--yes");
            }
            let refused = run_within(schema.projector(&args), Duration::from_secs(30));
            let stderr = text(&refused.stderr);
            assert_eq!(refused.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(
                stderr.contains(&format!("has no version {version}")),
                "{args:?}: {stderr}"
            );
        }
    }
    assert_eq!(rows("left_counts"), 100);
    // A schema where two projections got a version 2 before that rule (made here by hand):
    // retiring one leaves the schema they share, and the other's rows in it.
    schema
        .client()
        .batch_execute(&format!(
            "INSERT INTO projector_projection_versions (projection, version, state) \
                 VALUES ('right', 2, 'building'); \
             CREATE TABLE {}_v2.right_counts AS SELECT * FROM {}_v2.left_counts",
            schema.name, schema.name
        ))
        .expect("a second version 2");
    let retired = projector::retire(&schema.database, "left", 2).expect("retire left@2");
    assert!(retired.dropped.is_empty(), "{retired:?}");
    assert_eq!(retired.kept_for, ["right"]);
    assert_eq!(rows("right_counts"), 100);
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projector_checkpoints WHERE projection = 'left@2'"),
        0
    );
    // Its record stays, retired, its tables being still there: retiring the other keeps the
    // schema too (dropped by hand in such a schema), and both their rows.
    assert_eq!(
        schema.count(
            "SELECT COUNT(*) FROM projector_projection_versions \
             WHERE projection = 'left' AND version = 2 AND state = 'retired'"
        ),
        1
    );
    let retired = projector::retire(&schema.database, "right", 2).expect("retire right@2");
    assert!(retired.dropped.is_empty(), "{retired:?}");
    assert_eq!(retired.kept_for, ["left"]);
    assert_eq!((rows("left_counts"), rows("right_counts")), (100, 100));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn after_a_promotion_pause_resume_and_rewind_act_on_the_live_version_when_named_without_one() {
    let schema = TestSchema::migrated("versions_bare_name");
    schema.seed(10, 5);
    let database = schema.database.clone();
    for version in [1, 2] {
        start(Builder::new(database.clone(), Tally::at(version)).exit_when_caught_up(true))
            .join()
            .expect("the version catches up");
    }
    projector::promote(&database, "tally", 2, Duration::from_secs(30)).expect("promote");
    let paused = run_within(
        schema.projector(&["pause", "--projection", "tally"]),
        Duration::from_secs(30),
    );
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    assert!(
        text(&paused.stdout).contains("paused 'tally@2'"),
        "{}",
        text(&paused.stdout)
    );
    // Version 2's process holds its partitions without applying.
    let v2 = start(Builder::new(database.clone(), Tally::at(2)));
    let position = insert_event(&mut schema.client(), "later-1", 1);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        checkpoint_floor(&schema, "tally@2") < position
            && schema.count(&format!(
                "SELECT COUNT(*) FROM {}_v2.tally WHERE aggregate_id = 'later-1'",
                schema.name
            )) == 0,
        "version 2 applied while its projection was paused"
    );
    let resumed = run_within(
        schema.projector(&["resume", "--projection", "tally"]),
        Duration::from_secs(30),
    );
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    eventually(
        "version 2 to apply once resumed",
        Duration::from_secs(30),
        || {
            schema.count(&format!(
                "SELECT COUNT(*) FROM {}_v2.tally WHERE aggregate_id = 'later-1'",
                schema.name
            )) == 1
        },
    );
    v2.shutdown();
    v2.join().expect("a clean stop");
    // The library's plan of a rewind, and the command's dry run, act on version 2.
    let plan = projector::plan_rewind(
        &mut schema.client(),
        "tally",
        projector::RewindTo::Position(0),
    )
    .expect("a plan");
    assert_eq!(plan.projection, "tally@2");
    let rewind = run_within(
        schema.projector(&["rewind", "--projection", "tally", "--to-position", "0"]),
        Duration::from_secs(30),
    );
    assert_eq!(rewind.status.code(), Some(2), "{}", text(&rewind.stderr));
    let said = format!("{}{}", text(&rewind.stdout), text(&rewind.stderr));
    assert!(said.contains("'tally@2'"), "{said}");
}
