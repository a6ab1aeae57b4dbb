//! Poison events parked per aggregate (`--on-poison park`): the poison aggregate's later events
//! are parked behind it in order while every other aggregate flows; `retry` applies them once
//! fixed, exactly once and in order, and releases the aggregate; `drop` discards them; a
//! SIGKILL at any moment loses and doubles nothing; the stop policy is unchanged.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use projector::postgres::Transaction;
use projector::{BoxError, Builder, Context, Event, PoisonPolicy, Projection, Settings};

use crate::operations::{free_port, get, samples, spawn_with_metrics};
use crate::several_projections::checkpoints_at;
use crate::util::{TestSchema, eventually, insert_event, run_within, signal, text, wait_within};

const LIMIT: Duration = Duration::from_secs(60);
const POISON: &str = "thing-7";

/// Records per aggregate how many events it applied and whether in version order; fails on
/// `thing-7` version 3 while the shared flag is set.
#[derive(Clone)]
pub struct Flaky {
    pub poisoned: Arc<AtomicBool>,
}

impl Flaky {
    pub fn new() -> Flaky {
        Flaky {
            poisoned: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl Projection for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }

    fn poison_policy(&self) -> PoisonPolicy {
        PoisonPolicy::Park
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS recorded (aggregate_id TEXT PRIMARY KEY, \
             n BIGINT NOT NULL, last_version BIGINT NOT NULL, in_order BOOLEAN NOT NULL, \
             positions BIGINT[] NOT NULL)",
        )?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), BoxError> {
        if self.poisoned.load(Ordering::SeqCst)
            && event.aggregate_id == POISON
            && event.aggregate_version == 3
        {
            return Err("poison: thing-7 version 3 cannot be applied".into());
        }
        tx.execute(
            "INSERT INTO recorded VALUES ($1, 1, $2::bigint, $2::bigint = 1, ARRAY[$3::bigint]) \
             ON CONFLICT (aggregate_id) DO UPDATE SET n = recorded.n + 1, \
             last_version = EXCLUDED.last_version, \
             in_order = recorded.in_order AND recorded.last_version + 1 = EXCLUDED.last_version, \
             positions = recorded.positions || EXCLUDED.positions",
            &[
                &event.aggregate_id,
                &event.aggregate_version,
                &event.global_position,
            ],
        )?;
        Ok(())
    }
}

pub fn quick_retries() -> Settings {
    let mut settings = Settings::default();
    settings.retry_delay = Duration::from_millis(20);
    settings.max_retry_delay = Duration::from_millis(50);
    settings
}

/// Aggregates other than thing-7 recorded `per_aggregate` times in order, and how many.
fn others_exact(schema: &TestSchema, aggregates: i64, per_aggregate: i64) -> bool {
    let row = schema
        .client()
        .query_one(
            "SELECT COUNT(*) FILTER (WHERE n = $2 AND last_version = $2 AND in_order), COUNT(*) \
             FROM recorded WHERE aggregate_id <> $1",
            &[&POISON, &per_aggregate],
        )
        .expect("read recorded");
    row.get::<_, i64>(0) == aggregates - 1 && row.get::<_, i64>(1) == aggregates - 1
}

/// thing-7 as recorded: (events applied, last version, in order).
fn poison_recorded(schema: &TestSchema) -> (i64, i64, bool) {
    let row = schema
        .client()
        .query_one(
            "SELECT n, last_version, in_order FROM recorded WHERE aggregate_id = $1",
            &[&POISON],
        )
        .expect("read thing-7");
    (row.get(0), row.get(1), row.get(2))
}

/// The positions of thing-7's events from version `from` on, in order.
fn poison_positions_from(schema: &TestSchema, from: i64) -> Vec<i64> {
    schema
        .client()
        .query(
            "SELECT global_position FROM events WHERE aggregate_id = $1 AND aggregate_version >= $2 \
             ORDER BY global_position",
            &[&POISON, &from],
        )
        .expect("read thing-7's events")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// The parked positions of `projection`, in order, with (attempts, error) of each.
pub fn parked(schema: &TestSchema, projection: &str) -> Vec<(i64, String, i32, String)> {
    schema
        .client()
        .query(
            "SELECT global_position, aggregate_id, attempts, error FROM projection_dead_letters \
             WHERE projection = $1 ORDER BY global_position",
            &[&projection],
        )
        .expect("read the dead letters")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect()
}

/// `projector dead-letters ARGS...` run to its end.
fn dead_letters(schema: &TestSchema, args: &[&str]) -> std::process::Output {
    let mut all = vec!["dead-letters"];
    all.extend_from_slice(args);
    run_within(schema.projector(&all), LIMIT)
}

fn head(schema: &TestSchema) -> i64 {
    schema.count("SELECT COALESCE(MAX(global_position), 0) FROM events")
}

#[test]
fn park_sets_the_poison_aggregate_aside_in_order_and_retry_releases_it_while_running() {
    let schema = TestSchema::migrated("park_retry");
    let events = schema.seed(300, 8);
    let projection = Flaky::new();
    let poisoned = Arc::clone(&projection.poisoned);
    let runner = Builder::new(schema.database.clone(), projection.clone())
        .partitions(0..4)
        .total_partitions(4)
        .settings({
            let mut s = quick_retries();
            s.batch_size = 500;
            s
        })
        .start()
        .expect("start");

    // Every other aggregate flows, thing-7 stops at version 2 and versions 3..8 are parked in
    // order, the failing one first with its attempts; every checkpoint reaches the head.
    eventually("checkpoints at the head", LIMIT, || {
        checkpoints_at(&schema, "flaky") == vec![head(&schema); 4]
    });
    assert!(others_exact(&schema, 300, 8));
    assert_eq!(poison_recorded(&schema), (2, 2, true));
    let letters = parked(&schema, "flaky");
    let positions: Vec<i64> = letters.iter().map(|l| l.0).collect();
    assert_eq!(
        positions,
        poison_positions_from(&schema, 3),
        "parked in order"
    );
    assert!(letters.iter().all(|l| l.1 == POISON));
    assert_eq!(letters[0].2, 3, "the failing event was tried 3 times");
    assert!(letters[0].3.contains("poison"), "{}", letters[0].3);
    assert!(
        letters[1..].iter().all(|l| l.2 == 0),
        "the rest are parked behind it"
    );
    let status = projector::status(&mut schema.client(), Some("flaky")).expect("status");
    let partition = projector::partition_of(POISON, 4);
    for row in &status {
        let expected = if row.partition_key == partition {
            (1, 6)
        } else {
            (0, 0)
        };
        assert_eq!((row.parked_aggregates, row.parked_events), expected);
    }
    assert_eq!(events, 2400);

    // A later event of thing-7, appended live, is parked behind the others.
    let mut client = schema.client();
    let ninth = insert_event(&mut client, POISON, 9);
    eventually("thing-7 v9 parked", LIMIT, || {
        parked(&schema, "flaky").last().map(|l| l.0) == Some(ninth)
    });

    // Retried while still poisoned: nothing is applied, the events stay parked.
    let mut retrying = projection.clone();
    let outcomes =
        projector::retry(&mut schema.client(), &mut retrying, Some(POISON)).expect("retry");
    assert_eq!(outcomes.len(), 1);
    assert!(outcomes[0].failure.is_some(), "still poisoned");
    assert_eq!(parked(&schema, "flaky").len(), 7);
    assert_eq!(
        parked(&schema, "flaky")[0].2,
        4,
        "one more attempt recorded"
    );
    assert_eq!(poison_recorded(&schema), (2, 2, true));

    // Fixed: retried while the runner runs, applied in order exactly once, and released.
    poisoned.store(false, Ordering::SeqCst);
    let outcomes =
        projector::retry(&mut schema.client(), &mut retrying, Some(POISON)).expect("retry");
    assert!(outcomes[0].failure.is_none(), "{:?}", outcomes[0].failure);
    assert!(parked(&schema, "flaky").is_empty());
    assert_eq!(poison_recorded(&schema), (9, 9, true));

    // Its next events are applied by the runner again, in order.
    insert_event(&mut client, POISON, 10);
    eventually("thing-7 v10 applied", LIMIT, || {
        poison_recorded(&schema) == (10, 10, true)
    });
    assert!(parked(&schema, "flaky").is_empty());
    runner.shutdown();
    let summary = runner.join().expect("clean stop");
    assert_eq!(summary.parked(), 7, "versions 3 to 9 of thing-7");
    assert_eq!(
        summary.applied(),
        2400 - 6 + 1,
        "all but versions 3 to 8, and version 10"
    );
    assert!(others_exact(&schema, 300, 8));
}

#[test]
fn the_other_partitions_go_on_to_the_head_while_a_poison_event_is_retried() {
    // The poisoned partition holds the batches that arrive while it waits to retry.
    others_go_on_while_retrying(
        "park_hold",
        Settings::default().max_events_held_while_retrying,
    );
}

#[test]
fn a_partition_retrying_past_its_hold_limit_leaves_the_shared_read_and_loses_nothing() {
    // It can hold only one batch: it leaves the shared read, and later reads what it missed.
    others_go_on_while_retrying("park_step_aside", 1);
}

fn others_go_on_while_retrying(name: &str, held_while_retrying: usize) {
    let schema = TestSchema::migrated(name);
    schema.seed(300, 8);
    let head = head(&schema);
    let partition = projector::partition_of(POISON, 4) as usize;
    let mut settings = Settings::default();
    // One retry, long after the first failure; small reads, each handed out at once, so that
    // the poisoned partition's queue is full long before the retry (and the router would wait
    // for it far longer than the retry takes before leaving it behind).
    settings.max_attempts = 2;
    settings.retry_delay = Duration::from_secs(4);
    settings.batch_size = 100;
    settings.min_events_per_batch = 1;
    settings.straggler_after = Duration::from_secs(120);
    settings.max_events_held_while_retrying = held_while_retrying;
    let runner = Builder::new(schema.database.clone(), Flaky::new())
        .partitions(0..4)
        .total_partitions(4)
        .settings(settings)
        .start()
        .expect("start");

    // Before the poison event is parked (it is being retried), the other partitions are done.
    let others_at_head = |checkpoints: &[i64]| {
        checkpoints.len() == 4 && (0..4).all(|key| key == partition || checkpoints[key] == head)
    };
    let mut first = None;
    eventually(
        "the other partitions at the head, or the event parked",
        LIMIT,
        || {
            let parked_yet = !parked(&schema, "flaky").is_empty();
            let checkpoints = checkpoints_at(&schema, "flaky");
            if parked_yet || others_at_head(&checkpoints) {
                first = Some((parked_yet, checkpoints));
            }
            first.is_some()
        },
    );
    let (parked_first, checkpoints) = first.expect("one of them");
    assert!(
        !parked_first,
        "the other partitions waited for the retry: checkpoints {checkpoints:?} when the poison \
         event was parked, head {head}"
    );

    // Then the poisoned partition parks the event, reads what it missed and reaches the head.
    eventually("every checkpoint at the head", LIMIT, || {
        checkpoints_at(&schema, "flaky") == vec![head; 4]
    });
    runner.shutdown();
    runner.join().expect("clean stop");
    assert!(others_exact(&schema, 300, 8));
    assert_eq!(poison_recorded(&schema), (2, 2, true));
    let positions: Vec<i64> = parked(&schema, "flaky").iter().map(|l| l.0).collect();
    assert_eq!(
        positions,
        poison_positions_from(&schema, 3),
        "parked in order"
    );
}

#[test]
fn a_parked_aggregate_stays_parked_across_a_repartitioning_and_a_reset_clears_it() {
    let schema = TestSchema::migrated("park_repartition");
    schema.seed(200, 6);
    let projection = Flaky::new();
    let run = |total: u32| {
        Builder::new(schema.database.clone(), projection.clone())
            .partitions(0..total)
            .total_partitions(total)
            .settings(quick_retries())
            .exit_when_caught_up(true)
            .start()
            .expect("start")
            .join()
            .expect("caught up")
    };
    run(4);
    assert_eq!(parked(&schema, "flaky").len(), 4);

    projector::repartition(&schema.database, "flaky", 3).expect("repartition");
    schema.seed(200, 2);
    run(3);
    // Under the new layout thing-7's new events are parked behind the old ones, nothing twice.
    let positions: Vec<i64> = parked(&schema, "flaky").iter().map(|l| l.0).collect();
    assert_eq!(positions, poison_positions_from(&schema, 3));
    assert!(others_exact(&schema, 200, 8));
    assert_eq!(checkpoints_at(&schema, "flaky"), vec![head(&schema); 3]);

    let mut reset = projection.clone();
    projector::reset(&mut schema.client(), &mut reset).expect("reset");
    assert!(
        parked(&schema, "flaky").is_empty(),
        "reset clears the dead letters"
    );
}

/// Makes `aggregate_stats` refuse thing-7's version 3 while table `poison` has a row: the
/// binary's `aggregate-stats` then fails on that event on every attempt.
fn poison_aggregate_stats(schema: &TestSchema) {
    let mut client = schema.client();
    let mut tx = client.transaction().expect("begin");
    projector::projections::AggregateStats
        .setup(&mut tx)
        .expect("create aggregate_stats");
    tx.batch_execute(
        "CREATE TABLE poison (aggregate_id TEXT, version BIGINT); \
         INSERT INTO poison VALUES ('thing-7', 3); \
         CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF EXISTS (SELECT 1 FROM poison p WHERE p.aggregate_id = NEW.aggregate_id \
                 AND p.version = NEW.last_version) THEN \
                 RAISE EXCEPTION 'poison: % version % is refused', NEW.aggregate_id, NEW.last_version; \
             END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON aggregate_stats \
             FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .expect("create the poison trigger");
    tx.commit().expect("commit");
}

#[test]
fn the_binary_parks_lists_shows_in_status_retries_and_drops() {
    let schema = TestSchema::migrated("park_binary");
    poison_aggregate_stats(&schema);
    schema.seed(100, 5);
    let mut client = schema.client();
    insert_event(&mut client, "other-1", 1);
    insert_event(&mut client, "other-1", 2);
    client
        .batch_execute("INSERT INTO poison VALUES ('other-1', 1)")
        .expect("poison other-1 too");
    insert_event(&mut client, "other-2", 1);
    client
        .batch_execute("INSERT INTO poison VALUES ('other-2', 1)")
        .expect("poison other-2 too");
    let output = run_within(
        schema.aggregate_stats(
            "0-3",
            "4",
            &["--on-poison", "park", "--exit-when-caught-up"],
        ),
        LIMIT,
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("parked aggregate 'thing-7'") && stderr.contains("dead-letters retry"),
        "{stderr}"
    );
    // thing-7: versions 3 to 5 parked; other-1: v1 fails, v2 behind it; other-2: v1 fails.
    assert_eq!(parked(&schema, "aggregate-stats").len(), 3 + 2 + 1);
    assert_eq!(
        schema.stats_mismatches(),
        3,
        "only the three parked aggregates differ"
    );

    let list = dead_letters(&schema, &["list"]);
    let stdout = text(&list.stdout);
    assert_eq!(list.status.code(), Some(0), "{}", text(&list.stderr));
    assert!(
        stdout.contains("6 parked event(s) of 3 aggregate(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("poison: thing-7 version 3 is refused"),
        "{stdout}"
    );

    let status = run_within(schema.projector(&["status"]), LIMIT);
    let stdout = text(&status.stdout);
    assert!(stdout.contains("PARKED"), "{stdout}");
    assert!(
        stdout.contains("aggregate-stats: 3 aggregate(s) parked, with 6 event(s)"),
        "{stdout}"
    );
    let json = run_within(schema.projector(&["status", "--json"]), LIMIT);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(
        value["projections"][0]["parked"],
        serde_json::json!({"aggregates": 3, "events": 6})
    );

    // Still poisoned: retry exits 1 saying why, and leaves them parked.
    let retry = dead_letters(
        &schema,
        &[
            "retry",
            "--projection",
            "aggregate-stats",
            "--aggregate",
            POISON,
        ],
    );
    assert_eq!(retry.status.code(), Some(1), "{}", text(&retry.stderr));
    assert!(
        text(&retry.stderr).contains("stay parked"),
        "{}",
        text(&retry.stderr)
    );
    assert_eq!(parked(&schema, "aggregate-stats").len(), 6);

    // Fixed: retrying every aggregate applies thing-7's and other-2's; other-1 is dropped.
    client
        .batch_execute("DELETE FROM poison WHERE aggregate_id <> 'other-1'")
        .expect("fix");
    let drop_unconfirmed = dead_letters(
        &schema,
        &[
            "drop",
            "--projection",
            "aggregate-stats",
            "--aggregate",
            "other-1",
        ],
    );
    assert_eq!(drop_unconfirmed.status.code(), Some(2));
    assert!(text(&drop_unconfirmed.stderr).contains("--yes"));
    let dropped = run_within(
        schema
            .projector(&[
                "dead-letters",
                "drop",
                "--projection",
                "aggregate-stats",
                "--aggregate",
                "other-1",
                "--yes",
            ])
            .env("USER", "tester"),
        LIMIT,
    );
    let stderr = text(&dropped.stderr);
    assert_eq!(dropped.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("OS user 'tester'") && stderr.contains("database user"),
        "who dropped what is logged: {stderr}"
    );
    let retry = dead_letters(&schema, &["retry", "--projection", "aggregate-stats"]);
    assert_eq!(retry.status.code(), Some(0), "{}", text(&retry.stderr));
    assert!(parked(&schema, "aggregate-stats").is_empty());
    // thing-7 and other-2 are exact again; other-1 (dropped) has nothing applied.
    assert_eq!(schema.stats_mismatches(), 1);
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM aggregate_stats WHERE aggregate_id = 'other-1'"),
        0
    );
    let unknown = dead_letters(
        &schema,
        &[
            "retry",
            "--projection",
            "aggregate-stats",
            "--aggregate",
            "nobody",
        ],
    );
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown.stderr));
    let bad = run_within(
        schema.aggregate_stats("0-3", "4", &["--on-poison", "skip"]),
        LIMIT,
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("--on-poison"));
}

#[test]
fn the_stop_policy_is_unchanged_and_parks_nothing() {
    let schema = TestSchema::migrated("park_stop");
    poison_aggregate_stats(&schema);
    schema.seed(50, 5);
    let output = run_within(
        schema.aggregate_stats("0-3", "4", &["--exit-when-caught-up"]),
        LIMIT,
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("its checkpoint is left before this event"),
        "{stderr}"
    );
    assert!(parked(&schema, "aggregate-stats").is_empty());
    let poison = poison_positions_from(&schema, 3)[0];
    assert!(checkpoints_at(&schema, "aggregate-stats").contains(&(poison - 1)));
}

#[test]
fn sigkill_at_random_moments_while_parking_loses_and_doubles_nothing() {
    let schema = TestSchema::migrated("park_kill");
    poison_aggregate_stats(&schema);
    let events = schema.seed(2000, 20);
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64);
    let mut random = move |bound: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % bound
    };
    let args = ["--on-poison", "park", "--batch-size", "500"];
    for round in 0..8 {
        let child = schema
            .aggregate_stats("0-3", "4", &args)
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(150 + random(900)));
        signal(&child, "KILL");
        let output = wait_within(child, LIMIT);
        assert_eq!(output.status.code(), None, "round {round}: killed");
    }
    let mut finish = args.to_vec();
    finish.push("--exit-when-caught-up");
    let output = run_within(schema.aggregate_stats("0-3", "4", &finish), LIMIT * 2);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));

    // Every event is either applied once or parked once, in one chain behind the poison.
    assert_eq!(schema.stats_mismatches(), 1, "only thing-7 differs");
    let applied = schema.stats_applied();
    let letters = parked(&schema, "aggregate-stats");
    assert_eq!(
        applied + letters.len() as i64,
        events,
        "nothing lost or doubled"
    );
    let positions: Vec<i64> = letters.iter().map(|l| l.0).collect();
    assert_eq!(
        positions,
        poison_positions_from(&schema, 3),
        "one chain, in order"
    );
    assert_eq!(
        letters.iter().filter(|l| l.2 > 0).count(),
        1,
        "one failed event"
    );
    assert_eq!(
        checkpoints_at(&schema, "aggregate-stats"),
        vec![head(&schema); 4]
    );

    schema
        .client()
        .batch_execute("DELETE FROM poison")
        .expect("fix");
    let retry = dead_letters(&schema, &["retry", "--projection", "aggregate-stats"]);
    assert_eq!(retry.status.code(), Some(0), "{}", text(&retry.stderr));
    assert_eq!(schema.stats_mismatches(), 0);
    assert_eq!(schema.stats_applied(), events);
}

#[test]
fn the_policy_is_per_projection_from_a_sql_header_or_a_named_flag() {
    let schema = TestSchema::migrated("park_per_projection");
    schema.seed(20, 4);
    let folder = std::env::temp_dir().join(format!("park_per_projection_{}", std::process::id()));
    std::fs::create_dir_all(&folder).expect("make a folder");
    let file = folder.join("picky.sql");
    // Fails (division by zero) on thing-7's version 3 and parks it, by its header.
    let picky = |version: &str| {
        format!(
            "-- projection: picky\n\
             -- on-poison: park\n\
             -- setup\n\
             CREATE TABLE IF NOT EXISTS picky (aggregate_id TEXT, version BIGINT);\n\
             -- apply\n\
             INSERT INTO picky SELECT aggregate_id, {version} FROM batch;\n"
        )
    };
    std::fs::write(
        &file,
        picky(
            "aggregate_version / (CASE WHEN aggregate_id = 'thing-7' AND aggregate_version = 3 \
             THEN 0 ELSE 1 END)",
        ),
    )
    .expect("write the projection file");
    let file = file.to_string_lossy().into_owned();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--projection-file",
            file.as_str(),
            "--projection",
            "noop",
            "--partition-key",
            "0-1",
            "--total-partitions",
            "2",
            "--exit-when-caught-up",
        ];
        args.extend_from_slice(extra);
        run_within(schema.projector(&args), LIMIT)
    };

    // A policy for a projection that does not run here: refused, nothing started.
    let output = run(&["--on-poison", "pikcy=park"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--on-poison") && stderr.contains("pikcy") && stderr.contains("'picky'"),
        "{stderr}"
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projector_checkpoints"),
        0
    );
    let output = run(&["--on-poison", "picky=park,picky=stop"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'picky' is given twice"), "{stderr}");

    // The flag, naming it, wins over the header: the projection stops at the event.
    let output = run(&["--on-poison", "park,picky=stop"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("division by zero"), "{stderr}");
    assert!(parked(&schema, "picky").is_empty());

    // The header alone: thing-7 from version 3 on is parked, everything else applied.
    let output = run(&[]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let positions: Vec<i64> = parked(&schema, "picky").iter().map(|l| l.0).collect();
    assert_eq!(positions, poison_positions_from(&schema, 3));
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM picky"),
        20 * 4 - 2,
        "all but thing-7's last two events"
    );

    // Fixed, the file's parked events are retried through it, in order, and released.
    std::fs::write(&file, picky("aggregate_version")).expect("fix the projection file");
    let output = dead_letters(&schema, &["retry", "--projection-file", &file]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(parked(&schema, "picky").is_empty());
    assert_eq!(
        schema.count(
            "SELECT COUNT(*) FROM picky WHERE aggregate_id = 'thing-7' AND version IN (3, 4)"
        ),
        2
    );
    let output = dead_letters(&schema, &["retry", "--projection", "picky"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("--projection-file"));
    std::fs::remove_dir_all(&folder).expect("remove the folder");
}

#[test]
fn a_poison_event_while_the_stream_is_busy_then_quiet_is_parked_said_and_counted() {
    let schema = TestSchema::migrated("park_busy_quiet");
    poison_aggregate_stats(&schema);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn_with_metrics(&schema, "aggregate-stats", port, &["--on-poison", "park"]);
    let log = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buffer) {
                log.lock()
                    .expect("log")
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        })
    };
    let parked_gauges = || {
        let (_, metrics) = get(&format!("{base}/metrics"))?;
        let one = |name| {
            samples(&metrics, name)
                .into_iter()
                .find(|(labels, _)| labels.contains("projection=\"aggregate-stats\""))
                .map(|(_, value)| value as i64)
        };
        Some((
            one("projector_parked_aggregates")?,
            one("projector_parked_events")?,
        ))
    };
    eventually("metrics served", LIMIT, || parked_gauges() == Some((0, 0)));

    // Busy: appends in several transactions while it runs, thing-7's version 3 among them.
    for _ in 0..5 {
        schema.seed(400, 1);
    }
    eventually("thing-7 parked, and the gauges say so", LIMIT, || {
        parked_gauges() == Some((1, 3))
    });
    eventually("every checkpoint at the head", LIMIT, || {
        checkpoints_at(&schema, "aggregate-stats") == vec![head(&schema); 4]
    });
    assert_eq!(
        get(&format!("{base}/health/ready")).map(|(status, _)| status),
        Some(200),
        "parked events do not make the process unready: it is not behind"
    );

    // Quiet: the log still says what is parked (with the progress line, or on the next tick).
    eventually("the log says what is parked", LIMIT, || {
        let log = log.lock().expect("log");
        log.contains("parked aggregate 'thing-7'")
            && log.contains("1 aggregate(s) parked (3 event(s))")
    });
    assert_eq!(schema.stats_mismatches(), 1, "only thing-7 differs");

    // Dropped: the gauges go back to 0 and the process goes on.
    let output = dead_letters(
        &schema,
        &[
            "drop",
            "--projection",
            "aggregate-stats",
            "--aggregate",
            POISON,
            "--yes",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    eventually("the gauges back to 0", LIMIT, || {
        parked_gauges() == Some((0, 0))
    });
    signal(&child, "TERM");
    let status = child.wait().expect("wait");
    reader.join().expect("reader");
    assert_eq!(status.code(), Some(0), "{}", log.lock().expect("log"));
}

#[test]
fn a_restart_with_the_stop_policy_still_parks_behind_a_parked_aggregate() {
    let schema = TestSchema::migrated("park_then_stop");
    schema.seed(300, 8);
    let run = |policy: PoisonPolicy| {
        Builder::new(schema.database.clone(), Flaky::new())
            .partitions(0..4)
            .total_partitions(4)
            .settings(quick_retries())
            .on_poison(policy)
            .exit_when_caught_up(true)
            .start()
            .expect("start")
            .join()
            .expect("caught up")
    };
    run(PoisonPolicy::Park);
    assert_eq!(parked(&schema, "flaky").len(), 6, "versions 3 to 8");

    // Restarted with the default policy (a supervisor's old flags, a standby without
    // --on-poison park): thing-7's next event still waits behind the parked ones.
    let ninth = insert_event(&mut schema.client(), POISON, 9);
    let summary = run(PoisonPolicy::Stop);
    assert_eq!(summary.parked(), 1);
    assert_eq!(
        parked(&schema, "flaky").last().map(|l| l.0),
        Some(ninth),
        "parked behind the others"
    );
    assert_eq!(
        poison_recorded(&schema),
        (2, 2, true),
        "never applied around the hole"
    );
    assert!(others_exact(&schema, 300, 8));
}
