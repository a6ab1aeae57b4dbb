//! Versions of a projection: a new version builds beside the live one (in the same process or
//! in its own), readers move to it in one transaction through the readers' schema, the old
//! version's processes stop, `retire` leaves nothing of it, and a projection with side effects
//! starts its new version where the live one is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use projector::postgres::Transaction;
use projector::{BoxError, Builder, Context, Error, Event, Projection, Runner};

use crate::util::{TestSchema, eventually, insert_event, run_within, signal, text, wait_within};

/// Counts each aggregate's events in `tally`, stamping each row with the version that wrote
/// it; records the position of every event it applies (its "side effect").
#[derive(Clone)]
pub(crate) struct Tally {
    version: u32,
    side_effects: bool,
    applied: Arc<Mutex<Vec<i64>>>,
    /// Time taken per event, to make a rebuild slow.
    per_event: Duration,
}

impl Tally {
    pub(crate) fn at(version: u32) -> Tally {
        Tally {
            version,
            side_effects: false,
            applied: Arc::default(),
            per_event: Duration::ZERO,
        }
    }

    fn with_side_effects(version: u32) -> Tally {
        Tally {
            side_effects: true,
            ..Tally::at(version)
        }
    }
}

impl Projection for Tally {
    fn name(&self) -> &str {
        "tally"
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn has_side_effects(&self) -> bool {
        self.side_effects
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS tally (aggregate_id TEXT PRIMARY KEY, \
             n BIGINT NOT NULL, version INT NOT NULL)",
        )?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError> {
        thread::sleep(self.per_event);
        let version = i32::try_from(context.version)?;
        tx.execute(
            "INSERT INTO tally VALUES ($1, 1, $2) ON CONFLICT (aggregate_id) \
             DO UPDATE SET n = tally.n + 1, version = $2",
            &[&event.aggregate_id, &version],
        )?;
        self.applied
            .lock()
            .map_err(|_| "poisoned")?
            .push(event.global_position);
        Ok(())
    }
}

/// The same read model as a projection file, at `version`.
pub(crate) fn tally_file(dir: &std::path::Path, version: u32) -> String {
    let path = dir.join(format!("tally_v{version}.sql"));
    std::fs::write(
        &path,
        format!(
            "-- projection: tally\n\
             -- version: {version}\n\
             -- setup\n\
             CREATE TABLE IF NOT EXISTS tally (aggregate_id TEXT PRIMARY KEY, n BIGINT NOT NULL, \
                 version INT NOT NULL);\n\
             -- apply\n\
             INSERT INTO tally SELECT aggregate_id, count(*), {version} FROM batch \
                 GROUP BY aggregate_id ON CONFLICT (aggregate_id) \
                 DO UPDATE SET n = tally.n + EXCLUDED.n, version = EXCLUDED.version;\n"
        ),
    )
    .expect("write the projection file");
    path.to_string_lossy().into_owned()
}

/// Four writers appending to their own aggregates until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Writers {
    fn start(schema: &TestSchema) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..4)
            .map(|writer| {
                let (stop, mut client) = (Arc::clone(&stop), schema.client());
                thread::spawn(move || {
                    let mut version = 0;
                    while !stop.load(Ordering::Relaxed) {
                        version += 1;
                        for aggregate in 0..8 {
                            insert_event(&mut client, &format!("w{writer}-{aggregate}"), version);
                        }
                        thread::sleep(Duration::from_millis(50));
                    }
                })
            })
            .collect();
        Writers { stop, threads }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("a writer panicked");
        }
    }
}

/// What a reader saw of the readers' view, one query at a time: (events counted, lowest
/// version, highest version).
struct Reader {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(i64, i32, i32)>>,
}

impl Reader {
    fn start(schema: &TestSchema) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let mut client = schema.client();
        let sql = format!(
            "SELECT COALESCE(SUM(n), 0)::bigint, COALESCE(MIN(version), 0), \
             COALESCE(MAX(version), 0) FROM {}_readers.tally",
            schema.name
        );
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let row = client.query_one(&sql, &[]).expect("read the readers' view");
                    seen.push((row.get(0), row.get(1), row.get(2)));
                }
                seen
            })
        };
        Reader { stop, thread }
    }

    /// Stops reading; fails unless every read saw one version's complete model: never two
    /// versions at once, never a version older than one seen before, never fewer events than
    /// before (a partial model). Returns the reads.
    fn stop(self) -> Vec<(i64, i32, i32)> {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.thread.join().expect("the reader panicked");
        let mut last = (0, 0);
        for &(events, lowest, highest) in &seen {
            assert_eq!(lowest, highest, "a read saw two versions at once: {seen:?}");
            assert!(
                (highest, events) >= last && events >= last.1,
                "a read went back from {last:?} to ({highest}, {events})"
            );
            last = (highest, events);
        }
        seen
    }
}

pub(crate) fn checkpoint_floor(schema: &TestSchema, stored: &str) -> i64 {
    schema.count(&format!(
        "SELECT COALESCE(MIN(last_position), 0) FROM projector_checkpoints \
         WHERE projection = '{stored}'"
    ))
}

pub(crate) fn head(schema: &TestSchema) -> i64 {
    schema.count("SELECT COALESCE(MAX(global_position), 0) FROM events")
}

/// Nothing of version 1 of `tally` is left: no table, no row kept under its name.
fn assert_nothing_left_of_version_one(schema: &TestSchema) {
    let left = schema.count(&format!(
        "SELECT (SELECT COUNT(*) FROM pg_tables WHERE schemaname = '{}' AND tablename = 'tally') \
         + (SELECT COUNT(*) FROM projector_checkpoints WHERE projection = 'tally') \
         + (SELECT COUNT(*) FROM projector_prior_layouts WHERE projection = 'tally') \
         + (SELECT COUNT(*) FROM projection_dead_letters WHERE projection = 'tally') \
         + (SELECT COUNT(*) FROM projector_projection_states WHERE projection = 'tally') \
         + (SELECT COUNT(*) FROM projector_projection_versions \
             WHERE projection = 'tally' AND version = 1)",
        schema.name
    ));
    assert_eq!(left, 0, "retire left something of version 1");
}

pub(crate) fn start(builder: Builder) -> Runner {
    builder
        .partitions(0..4)
        .total_partitions(4)
        .poll_interval(Duration::from_millis(20))
        .start()
        .expect("start the runner")
}

#[test]
fn a_new_version_built_in_the_same_process_takes_over_atomically_and_the_old_one_retires() {
    let schema = TestSchema::migrated("versions_one_process");
    schema.seed(50, 20);
    let database = schema.database.clone();
    let v1 = start(Builder::new(database.clone(), Tally::at(1)));
    eventually("version 1 to catch up", Duration::from_secs(30), || {
        checkpoint_floor(&schema, "tally") >= head(&schema)
    });
    let writers = Writers::start(&schema);
    // The process restarted with version 2 added beside version 1.
    v1.shutdown();
    v1.join().expect("version 1 alone stops cleanly");
    let slow = Tally {
        per_event: Duration::from_millis(1),
        ..Tally::at(2)
    };
    let both = start(Builder::new(database.clone(), Tally::at(1)).projection(slow));
    let stopped = both.stopped_projections();
    let reader = Reader::start(&schema);
    // Promoted while far behind: the switch waits for version 2 to reach version 1.
    eventually("version 2 to start", Duration::from_secs(60), || {
        checkpoint_floor(&schema, "tally@2") > 0
    });
    assert!(checkpoint_floor(&schema, "tally@2") < head(&schema) - 200);
    let promoted = projector::promote(&database, "tally", 2, Duration::from_secs(30))
        .expect("promote version 2");
    assert_eq!((promoted.from, promoted.to), (1, 2));
    assert_eq!(promoted.views, ["tally"]);
    let notice = stopped
        .recv_timeout(Duration::from_secs(20))
        .expect("version 1 stops after the switch");
    assert_eq!(notice.projection, "tally");
    let message = notice.error.unwrap_or_default();
    assert!(
        message.contains("version 1 of projection 'tally' was retired: version 2 is live"),
        "{message}"
    );
    // A planned end: `status` does not show version 1 as failed.
    let states = projector::projection_states(&mut schema.client(), Some("tally")).expect("states");
    assert!(states.is_empty(), "{states:?}");
    thread::sleep(Duration::from_millis(300));
    writers.stop();
    let total = head(&schema);
    eventually(
        "version 2 to apply every event",
        Duration::from_secs(30),
        || {
            schema.count(&format!(
                "SELECT COALESCE(SUM(n), 0)::bigint FROM {}_readers.tally",
                schema.name
            )) == total
        },
    );
    let seen = reader.stop();
    assert!(
        seen.iter().any(|s| s.2 == 1),
        "the reader never saw version 1"
    );
    assert!(
        seen.iter().any(|s| s.2 == 2),
        "the reader never saw version 2"
    );
    // A process of the retired version is refused, saying why.
    let refused = Builder::new(database.clone(), Tally::at(1)).start();
    assert!(
        matches!(
            refused,
            Err(Error::VersionRetired {
                version: 1,
                live: 2,
                ..
            })
        ),
        "{refused:?}"
    );
    let retired = projector::retire(&database, "tally", 1).expect("retire version 1");
    assert_eq!(retired.dropped, ["tally"]);
    assert_nothing_left_of_version_one(&schema);
    both.shutdown();
    let _ = both.join();
}

#[test]
fn a_new_version_in_its_own_process_takes_over_and_the_old_process_stops_saying_why() {
    let schema = TestSchema::migrated("versions_processes");
    schema.seed(50, 20);
    let dir = std::env::temp_dir().join(format!("{}_files", schema.name));
    std::fs::create_dir_all(&dir).expect("create the files' folder");
    let (v1_file, v2_file) = (tally_file(&dir, 1), tally_file(&dir, 2));
    let run = |file: &str| {
        let mut command = schema.projector(&[
            "--projection-file",
            file,
            "--partition-key",
            "0-3",
            "--total-partitions",
            "4",
            "--poll-interval-ms",
            "20",
        ]);
        command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        command.spawn().expect("start the projector")
    };
    let v1 = run(&v1_file);
    eventually("version 1 to catch up", Duration::from_secs(30), || {
        checkpoint_floor(&schema, "tally") >= head(&schema)
    });
    let writers = Writers::start(&schema);
    let v2 = run(&v2_file);
    eventually(
        "version 2's views to be published",
        Duration::from_secs(30),
        || {
            schema.count(&format!(
                "SELECT COUNT(*) FROM pg_views WHERE schemaname = '{}_readers'",
                schema.name
            )) == 1
        },
    );
    let reader = Reader::start(&schema);
    eventually(
        "version 2 to come near the head",
        Duration::from_secs(60),
        || checkpoint_floor(&schema, "tally@2") >= head(&schema) - 50,
    );
    let promote = run_within(
        schema.projector(&["promote", "--projection", "tally", "--version", "2"]),
        Duration::from_secs(60),
    );
    assert!(promote.status.success(), "{}", text(&promote.stderr));
    assert!(
        text(&promote.stdout).contains("version 2 is live"),
        "{}",
        text(&promote.stdout)
    );
    let v1_exit = wait_within(v1, Duration::from_secs(30));
    assert_eq!(v1_exit.status.code(), Some(2), "{}", text(&v1_exit.stderr));
    assert!(
        text(&v1_exit.stderr).contains(
            "version 1 of projection 'tally' was retired: version 2 is live (`projector \
             promote`), so this process stops"
        ),
        "{}",
        text(&v1_exit.stderr)
    );
    writers.stop();
    let total = head(&schema);
    eventually(
        "version 2 to apply every event",
        Duration::from_secs(30),
        || {
            schema.count(&format!(
                "SELECT COALESCE(SUM(n), 0)::bigint FROM {}_readers.tally",
                schema.name
            )) == total
        },
    );
    let seen = reader.stop();
    assert!(seen.iter().any(|s| s.2 == 1) && seen.iter().any(|s| s.2 == 2));
    let dry = run_within(
        schema.projector(&["retire", "--projection", "tally", "--version", "1"]),
        Duration::from_secs(30),
    );
    assert!(
        text(&dry.stdout).contains("run again with --yes"),
        "{}",
        text(&dry.stdout)
    );
    let retire = run_within(
        schema.projector(&["retire", "--projection", "tally", "--version", "1", "--yes"]),
        Duration::from_secs(30),
    );
    assert!(retire.status.success(), "{}", text(&retire.stderr));
    assert_nothing_left_of_version_one(&schema);
    signal(&v2, "TERM");
    let v2_exit = wait_within(v2, Duration::from_secs(30));
    assert_eq!(v2_exit.status.code(), Some(0), "{}", text(&v2_exit.stderr));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_new_version_with_side_effects_applies_no_event_the_live_version_applied() {
    let schema = TestSchema::migrated("versions_side_effects");
    schema.seed(40, 10);
    let database = schema.database.clone();
    let v1 = Tally::with_side_effects(1);
    start(Builder::new(database.clone(), v1.clone()).exit_when_caught_up(true))
        .join()
        .expect("version 1 catches up");
    let live_until = head(&schema);
    schema.seed_prefixed("later", 10, 3);
    let v2 = Tally::with_side_effects(2);
    start(Builder::new(database.clone(), v2.clone()).exit_when_caught_up(true))
        .join()
        .expect("version 2 catches up");
    let applied = v2.applied.lock().expect("applied").clone();
    assert_eq!(applied.len(), 30, "version 2 applied {applied:?}");
    assert!(
        applied.iter().all(|&position| position > live_until),
        "version 2 applied an event at or before version 1's position {live_until}: {applied:?}"
    );
    // Told otherwise, a new version replays everything.
    let v3 = Tally::with_side_effects(3);
    start(
        Builder::new(database, v3.clone())
            .exit_when_caught_up(true)
            .replay_side_effects(true),
    )
    .join()
    .expect("version 3 catches up");
    assert_eq!(v3.applied.lock().expect("applied").len(), 430);
}
