//! Test schemas, seeding and checks shared by the tests.

use std::borrow::BorrowMut;
use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use projector::Database;
use projector::postgres::{Client, NoTls};

/// The server the tests run against.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL must point at a PostgreSQL server the tests may create schemas in; \
         scripts/test.sh starts one",
    )
}

/// A schema of its own for one test, dropped (with everything in it) when the test ends.
pub struct TestSchema {
    pub name: String,
    pub database: Database,
    /// The server the schema lives on.
    pub url: String,
}

impl TestSchema {
    /// A new, empty schema (no tables).
    pub fn empty(test: &str) -> TestSchema {
        TestSchema::empty_on(&database_url(), test)
    }

    /// A new, empty schema on the server at `url` (a test's own cluster, say).
    pub fn empty_on(url: &str, test: &str) -> TestSchema {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t_{}_{}_{}",
            test.replace('-', "_"),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = Client::connect(url, NoTls).expect("connect to the test server");
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
            ))
            .expect("create the test schema");
        let database = Database::new(url)
            .and_then(|d| d.schema(&name))
            .expect("the test server's URL is a valid connection string");
        TestSchema {
            name,
            database,
            url: url.to_owned(),
        }
    }

    /// A new schema with the projector's tables.
    pub fn migrated(test: &str) -> TestSchema {
        TestSchema::migrated_on(&database_url(), test)
    }

    /// A new schema with the projector's tables, on the server at `url`.
    pub fn migrated_on(url: &str, test: &str) -> TestSchema {
        let schema = TestSchema::empty_on(url, test);
        projector::migrate(&schema.database).expect("migrate the test schema");
        schema
    }

    /// A connection whose search path is this schema.
    pub fn client(&self) -> Client {
        self.database.connect().expect("connect to the test schema")
    }

    /// Appends `per_aggregate` events to each of `aggregates` aggregates (`thing-1`, …), set-based,
    /// interleaved so that every batch holds many aggregates. Returns the number of events.
    pub fn seed(&self, aggregates: i64, per_aggregate: i64) -> i64 {
        self.seed_prefixed("thing", aggregates, per_aggregate)
    }

    /// As [`seed`](Self::seed), continuing the versions of aggregates named `prefix-N`.
    pub fn seed_prefixed(&self, prefix: &str, aggregates: i64, per_aggregate: i64) -> i64 {
        let mut client = self.client();
        let start: i64 = client
            .query_one(
                "SELECT COALESCE(MAX(aggregate_version), 0) FROM events WHERE aggregate_id LIKE $1 || '-%'",
                &[&prefix],
            )
            .expect("read versions")
            .get(0);
        client
            .execute(
                "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                     event_id, event_type, payload) \
                 SELECT 'test', 'Thing', $1 || '-' || a, $2 + v, gen_random_uuid(), 'Happened', \
                     convert_to('{\"n\":' || v || '}', 'UTF8') \
                 FROM generate_series(1, $3::bigint) v, generate_series(1, $4::bigint) a ORDER BY v, a",
                &[&prefix, &start, &per_aggregate, &aggregates],
            )
            .expect("seed events");
        aggregates * per_aggregate
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.client().query_one(sql, &[]).expect(sql).get(0)
    }

    /// Events applied to `aggregate_stats` so far; 0 before the table exists.
    pub fn stats_applied(&self) -> i64 {
        let mut client = self.client();
        let exists: bool = client
            .query_one("SELECT to_regclass('aggregate_stats') IS NOT NULL", &[])
            .expect("look for aggregate_stats")
            .get(0);
        if !exists {
            return 0;
        }
        client
            .query_one(
                "SELECT COALESCE(SUM(events_applied), 0)::bigint FROM aggregate_stats",
                &[],
            )
            .expect("count applied events")
            .get(0)
    }

    /// Aggregates whose `aggregate_stats` row differs from what the events table says: zero
    /// means every event was applied exactly once, in order.
    pub fn stats_mismatches(&self) -> i64 {
        self.stats_mismatches_in("aggregate_stats")
    }

    /// As [`stats_mismatches`](Self::stats_mismatches), for the read model in `table`.
    pub fn stats_mismatches_in(&self, table: &str) -> i64 {
        self.count(&format!(
            "SELECT COUNT(*) FROM ( \
                 SELECT bounded_context, aggregate_type, aggregate_id, COUNT(*) AS n, \
                     MAX(aggregate_version) AS v, MAX(global_position) AS p \
                 FROM events GROUP BY 1, 2, 3) e \
             FULL JOIN {table} s USING (bounded_context, aggregate_type, aggregate_id) \
             WHERE s.events_applied IS DISTINCT FROM e.n OR s.last_version IS DISTINCT FROM e.v \
                 OR s.last_global_position IS DISTINCT FROM e.p"
        ))
    }

    /// The `projector` binary with this schema and the test database in its environment.
    pub fn projector(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_projector"));
        command
            .args(args)
            .env("DATABASE_URL", &self.url)
            .env("PROJECTOR_SCHEMA", &self.name)
            .env_remove("PARTITION_KEY")
            .env_remove("TOTAL_PARTITIONS")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        command
    }
}

impl TestSchema {
    /// The binary running `aggregate-stats` on partitions `keys` of `total` with `extra` flags,
    /// its output piped: spawn it to run live, or give it `--exit-when-caught-up`.
    pub fn aggregate_stats(&self, keys: &str, total: &str, extra: &[&str]) -> Command {
        let mut args = vec![
            "--partition-key",
            keys,
            "--total-partitions",
            total,
            "--projection",
            "aggregate-stats",
        ];
        args.extend_from_slice(extra);
        let mut command = self.projector(&args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        command
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&self.url, NoTls) {
            // With the schemas of projection versions beside it (`_v2`, ...) and the readers'.
            let _ = admin.batch_execute(&format!(
                "DO $$ DECLARE s text; BEGIN \
                     FOR s IN SELECT nspname FROM pg_namespace \
                         WHERE nspname = '{0}' OR nspname = '{0}_readers' \
                             OR nspname ~ ('^' || '{0}' || '_v[0-9]+$') LOOP \
                         EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', s); \
                     END LOOP; END $$",
                self.name
            ));
        }
    }
}

/// A connection with the server's default search path.
pub fn admin() -> Client {
    Client::connect(&database_url(), NoTls).expect("connect to DATABASE_URL")
}

/// The test database's URL with an `application_name` to find a test's connections by.
pub fn url_named(name: &str) -> String {
    let url = database_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}application_name={name}")
}

/// `schema`'s database with its connections named `name`, so that a test cuts its own alone.
pub fn database_named(schema: &TestSchema, name: &str) -> Database {
    Database::new(&url_named(name))
        .and_then(|d| d.schema(&schema.name))
        .expect("the test database under an application name")
}

/// Terminates every connection of this database named `name`; how many there were.
pub fn cut_connections_named(admin: &mut Client, name: &str) -> usize {
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND datname = current_database()",
            &[&name],
        )
        .expect("terminate the connections")
        .len()
}

/// Runs `command` to its end, failing the test if it takes longer than `limit`.
pub fn run_within(mut command: impl BorrowMut<Command>, limit: Duration) -> Output {
    let child = command
        .borrow_mut()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the projector binary");
    wait_within(child, limit)
}

/// Waits for `child` to exit and collects its output, killing it and failing past `limit`.
pub fn wait_within(mut child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    // Drain the pipes on threads so a chatty child never blocks on a full pipe.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        if let Some(pipe) = stdout.as_mut() {
            let _ = pipe.read_to_end(&mut buffer);
        }
        buffer
    });
    let err = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        if let Some(pipe) = stderr.as_mut() {
            let _ = pipe.read_to_end(&mut buffer);
        }
        buffer
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
            panic!("the projector did not exit within {limit:?}; its stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Polls `condition` until it holds, failing the test after `limit`.
pub fn eventually(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits for `runner` to stop, failing the test past `limit`.
pub fn join_within(
    runner: projector::Runner,
    limit: Duration,
) -> Result<projector::Summary, projector::Error> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || sender.send(runner.join()));
    receiver
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the runner did not stop within {limit:?}"))
}

/// Inserts one event for `aggregate_id` at `version` through `client` (no notification, as a
/// writer that knows nothing of the projector would), returning its position.
pub fn insert_event(
    client: &mut impl projector::postgres::GenericClient,
    aggregate_id: &str,
    version: i64,
) -> i64 {
    client
        .query_one(
            "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version, \
                 event_id, event_type, payload) \
             VALUES ('test', 'Thing', $1, $2, gen_random_uuid(), 'Happened', '\\x7b7d') \
             RETURNING global_position",
            &[&aggregate_id, &version],
        )
        .expect("insert an event")
        .get(0)
}

/// Sends signal `name` (TERM, KILL, STOP, …) to `child`.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} failed");
}

/// A projection for tests that needs no read model: `name`, and `apply` called with each event.
#[derive(Clone)]
pub struct EachEvent<F> {
    pub name: &'static str,
    pub apply: F,
}

impl<F> projector::Projection for EachEvent<F>
where
    F: FnMut(&projector::Event) -> Result<(), projector::BoxError> + Clone + Send + 'static,
{
    fn name(&self) -> &str {
        self.name
    }

    fn apply(
        &mut self,
        _: &mut projector::postgres::Transaction<'_>,
        event: &projector::Event,
        _: &projector::Context,
    ) -> Result<(), projector::BoxError> {
        (self.apply)(event)
    }
}
