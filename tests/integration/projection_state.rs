//! A projection's stored state: a projection that stopped on an event shows as FAILED in
//! `status` until a later successful start; `pause` holds its partitions without applying until
//! `resume`; and an embedder is told when a projection stops, and whether the runner is done.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use projector::{BoxError, Builder, Event, Settings};

use crate::util::{EachEvent, TestSchema, eventually, insert_event, run_within, signal, text};

const LIMIT: Duration = Duration::from_secs(60);

/// Runs the binary with `args` in `schema`; returns its exit code, stdout and stderr.
fn run(schema: &TestSchema, args: &[&str]) -> (Option<i32>, String, String) {
    let output = run_within(schema.projector(args), LIMIT);
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// `aggregate-stats` on partitions 0-1 of 2, to the head: its exit code and stderr.
fn catch_up(schema: &TestSchema) -> (Option<i32>, String) {
    let output = run_within(
        schema.aggregate_stats("0-1", "2", &["--exit-when-caught-up"]),
        LIMIT,
    );
    (output.status.code(), text(&output.stderr))
}

#[test]
fn a_projection_stopped_on_an_event_shows_failed_until_a_successful_start() {
    let schema = TestSchema::migrated("state_failed");
    schema.seed(6, 2);
    assert_eq!(catch_up(&schema).0, Some(0));
    // The read model refuses one aggregate: the projection stops on its event.
    schema
        .client()
        .batch_execute(
            "ALTER TABLE aggregate_stats ADD CONSTRAINT no_bad CHECK (aggregate_id <> 'bad-1')",
        )
        .expect("add the constraint");
    let position = insert_event(&mut schema.client(), "bad-1", 1);
    let (code, stderr) = catch_up(&schema);
    assert_eq!(code, Some(1), "{stderr}");

    let (code, stdout, stderr) = run(&schema, &["status"]);
    assert_eq!(code, Some(0), "{stderr}");
    let line = stdout
        .lines()
        .find(|line| line.contains("FAILED"))
        .unwrap_or_else(|| panic!("no FAILED line in:\n{stdout}"));
    assert!(
        line.starts_with("aggregate-stats: FAILED")
            && line.contains(&format!("global position {position}"))
            && line.contains("no_bad"),
        "{line}"
    );
    let (_, json, _) = run(&schema, &["status", "--json"]);
    let document: serde_json::Value = serde_json::from_str(&json).expect("status --json");
    let state = &document["projections"][0]["state"];
    assert_eq!(state["state"], "failed", "{json}");
    assert_eq!(state["position"], position, "{json}");
    assert!(
        state["error"]
            .as_str()
            .is_some_and(|e| e.contains("no_bad"))
    );

    // Fixed: the next start clears it.
    schema
        .client()
        .batch_execute("ALTER TABLE aggregate_stats DROP CONSTRAINT no_bad")
        .expect("drop the constraint");
    assert_eq!(catch_up(&schema).0, Some(0));
    let (_, stdout, _) = run(&schema, &["status"]);
    assert!(!stdout.contains("FAILED"), "{stdout}");
    let (_, json, _) = run(&schema, &["status", "--json"]);
    let document: serde_json::Value = serde_json::from_str(&json).expect("status --json");
    assert!(document["projections"][0]["state"].is_null(), "{json}");
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn a_paused_projection_applies_nothing_until_resumed_and_then_everything_once() {
    let schema = TestSchema::migrated("state_paused");
    schema.seed(20, 2);
    let child = schema
        .aggregate_stats("0-1", "2", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the projector");
    let stopper = scopeguard(child);
    eventually("the first events applied", LIMIT, || {
        schema.stats_applied() == 40
    });

    let (code, stdout, stderr) = run(&schema, &["pause", "--projection", "aggregate-stats"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("paused 'aggregate-stats'"), "{stdout}");
    // Twice is harmless.
    assert_eq!(
        run(&schema, &["pause", "--projection", "aggregate-stats"]).0,
        Some(0)
    );
    // Running processes see it within about a second.
    std::thread::sleep(Duration::from_millis(1500));
    for round in 0..5 {
        schema.seed(20, 1);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            schema.stats_applied(),
            40,
            "applied while paused (round {round})"
        );
    }
    let (_, stdout, _) = run(&schema, &["status"]);
    assert!(stdout.contains("aggregate-stats: PAUSED"), "{stdout}");
    let (_, json, _) = run(&schema, &["status", "--json"]);
    let document: serde_json::Value = serde_json::from_str(&json).expect("status --json");
    assert_eq!(document["projections"][0]["paused"], true, "{json}");
    assert_eq!(
        document["projections"][0]["state"]["state"], "paused",
        "{json}"
    );
    let (code, _, stderr) = run(
        &schema,
        &[
            "wait",
            "--projection",
            "aggregate-stats",
            "--position",
            "100",
            "--timeout",
            "1",
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("paused"), "{stderr}");

    let (code, stdout, stderr) = run(&schema, &["resume", "--projection", "aggregate-stats"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("resumed 'aggregate-stats'"), "{stdout}");
    eventually("every event applied after resume", LIMIT, || {
        schema.stats_applied() == 140
    });
    assert_eq!(schema.stats_mismatches(), 0, "every event once, in order");
    let (_, stdout, _) = run(&schema, &["status"]);
    assert!(!stdout.contains("PAUSED"), "{stdout}");
    drop(stopper);
}

#[test]
fn pausing_a_projection_that_is_not_known_exits_2_naming_it() {
    let schema = TestSchema::migrated("state_unknown");
    for command in ["pause", "resume"] {
        let (code, stdout, stderr) = run(&schema, &[command, "--projection", "nope"]);
        assert_eq!(code, Some(2), "{stdout}{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains("'nope'"),
            "{stderr}"
        );
    }
}

#[test]
fn a_schema_of_an_earlier_version_runs_without_the_states_and_says_to_migrate() {
    let schema = TestSchema::migrated("state_earlier_schema");
    schema
        .client()
        .batch_execute("DROP TABLE projector_projection_states")
        .expect("drop the table");
    schema.seed(4, 2);
    let (code, stderr) = catch_up(&schema);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("no table projector_projection_states")
            && stderr.contains("run `projector migrate`"),
        "{stderr}"
    );
    assert_eq!(run(&schema, &["status"]).0, Some(0));
    let (code, _, stderr) = run(&schema, &["pause", "--projection", "aggregate-stats"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("projector migrate"), "{stderr}");
}

#[test]
fn an_embedder_is_told_when_each_projection_stops_and_when_the_runner_is_finished() {
    let schema = TestSchema::migrated("state_embedder");
    schema.seed(4, 2);
    let fails = EachEvent {
        name: "fails",
        apply: |event: &Event| -> Result<(), BoxError> {
            if event.aggregate_id == "thing-2" {
                Err("no thing-2 here".into())
            } else {
                Ok(())
            }
        },
    };
    let fine = EachEvent {
        name: "fine",
        apply: |_: &Event| -> Result<(), BoxError> { Ok(()) },
    };
    let mut settings = Settings::default();
    settings.retry_delay = Duration::from_millis(10);
    settings.max_retry_delay = Duration::from_millis(20);
    let runner = Builder::new(schema.database.clone(), fails)
        .projection(fine)
        .partitions(0..2)
        .total_partitions(2)
        .settings(settings)
        .start()
        .expect("start");
    let stopped = runner.stopped_projections();
    let first = stopped.recv_timeout(LIMIT).expect("told of the failure");
    assert_eq!(first.projection, "fails");
    assert!(
        first
            .error
            .as_deref()
            .is_some_and(|e| e.contains("no thing-2 here")),
        "{first:?}"
    );
    // The other projection runs on.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!runner.is_finished());
    assert!(stopped.try_recv().is_err());
    // Metrics say so too, and show a pause.
    assert!(projector::pause(&schema.database, "fine").expect("pause"));
    let metrics = runner.metrics().render();
    for line in [
        "projector_projection_failed{projection=\"fails\",version=\"1\"} 1",
        "projector_projection_failed{projection=\"fine\",version=\"1\"} 0",
        "projector_projection_paused{projection=\"fails\",version=\"1\"} 0",
        "projector_projection_paused{projection=\"fine\",version=\"1\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in:\n{metrics}"
        );
    }
    assert!(projector::resume(&schema.database, "fine").expect("resume"));

    runner.shutdown();
    let second = stopped.recv_timeout(LIMIT).expect("told of the stop");
    assert_eq!(second.projection, "fine");
    assert_eq!(second.error, None);
    eventually("the runner finished", LIMIT, || runner.is_finished());
    assert!(stopped.recv().is_err(), "the channel ends with the run");
    assert!(runner.join().is_err(), "join returns the failure");
}

#[test]
fn a_paused_projection_holds_alone_while_the_other_projections_of_its_process_go_on() {
    let schema = TestSchema::migrated("state_paused_beside");
    schema.seed(10, 2);
    let counter = |name: &'static str, count: &Arc<AtomicI64>| {
        let count = Arc::clone(count);
        EachEvent {
            name,
            apply: move |_: &Event| -> Result<(), BoxError> {
                count.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        }
    };
    let (paused, going) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
    let runner = Builder::new(schema.database.clone(), counter("paused", &paused))
        .projection(counter("going", &going))
        .partitions(0..2)
        .total_partitions(2)
        .start()
        .expect("start");
    eventually("both caught up", LIMIT, || {
        paused.load(Ordering::SeqCst) == 20 && going.load(Ordering::SeqCst) == 20
    });
    assert!(projector::pause(&schema.database, "paused").expect("pause"));
    std::thread::sleep(Duration::from_millis(1500));
    schema.seed(10, 3);
    eventually("the other projection applied the new events", LIMIT, || {
        going.load(Ordering::SeqCst) == 50
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(paused.load(Ordering::SeqCst), 20, "applied while paused");
    assert!(projector::resume(&schema.database, "paused").expect("resume"));
    eventually("the paused projection caught up", LIMIT, || {
        paused.load(Ordering::SeqCst) == 50
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(paused.load(Ordering::SeqCst), 50, "each event once");
    runner.shutdown();
    assert!(runner.join().is_ok());
}

/// Stops the child (TERM, then waits) when dropped, even when the test fails.
fn scopeguard(child: std::process::Child) -> impl Drop {
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            signal(&self.0, "TERM");
            let _ = self.0.wait();
        }
    }
    Stop(child)
}
