//! Stores the projector did not set up: a database pupsourcing (Go) created, one migrated by
//! an earlier version of the projector, and a role that is not superuser.

use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use projector::postgres::{Client, NoTls};
use serde_json::Value;

use crate::util::{TestSchema, admin, database_url, run_within, text};

const LIMIT: Duration = Duration::from_secs(60);

const PUPSOURCING_V1: &str = include_str!("../data/pupsourcing_v1.sql");

/// The tables an earlier version of the projector created, as it created them.
const EARLIER_VERSION: &str = "
    CREATE TABLE projection_checkpoints (
        projection TEXT NOT NULL,
        total_partitions INT NOT NULL CHECK (total_partitions > 0),
        partition_key INT NOT NULL CHECK (partition_key >= 0 AND partition_key < total_partitions),
        last_position BIGINT NOT NULL DEFAULT 0,
        updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
        PRIMARY KEY (projection, total_partitions, partition_key)
    );
    ALTER TABLE projection_checkpoints ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE projection_priors (
        projection TEXT NOT NULL,
        total_partitions INT NOT NULL CHECK (total_partitions > 0),
        prior_total INT NOT NULL CHECK (prior_total > 0),
        prior_positions BIGINT[] NOT NULL CHECK (cardinality(prior_positions) = prior_total),
        created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
        PRIMARY KEY (projection, total_partitions, prior_total)
    );";

const RUN_AGGREGATE_STATS: [&str; 7] = [
    "--projection",
    "aggregate-stats",
    "--partition-key",
    "0-3",
    "--total-partitions",
    "4",
    "--exit-when-caught-up",
];

/// A schema holding what pupsourcing v1's migration creates.
fn pupsourcing_store(test: &str) -> TestSchema {
    let schema = TestSchema::empty(test);
    schema
        .client()
        .batch_execute(PUPSOURCING_V1)
        .expect("create pupsourcing's tables");
    schema
}

/// Appends as the Go side does: plain inserts into `events` and `aggregate_heads`, in one
/// transaction, no notification. `per_aggregate` more events for each of `aggregates` orders.
fn append_as_go(schema: &TestSchema, aggregates: i64, per_aggregate: i64) {
    schema
        .client()
        .execute(
            "WITH heads AS ( \
                 SELECT 'order-' || a AS id, COALESCE(h.aggregate_version, 0) AS version \
                 FROM generate_series(1, $1::bigint) a \
                 LEFT JOIN aggregate_heads h ON h.bounded_context = 'sales' \
                     AND h.aggregate_type = 'Order' AND h.aggregate_id = 'order-' || a \
             ), inserted AS ( \
                 INSERT INTO events (bounded_context, aggregate_type, aggregate_id, \
                     aggregate_version, event_id, event_type, payload, correlation_id, metadata) \
                 SELECT 'sales', 'Order', heads.id, heads.version + v, gen_random_uuid(), \
                     'OrderLineAdded', convert_to('{\"line\":' || v || '}', 'UTF8'), \
                     'corr-' || v, '{\"source\":\"go\"}' \
                 FROM heads, generate_series(1, $2::bigint) v ORDER BY v, heads.id \
                 RETURNING aggregate_id, aggregate_version \
             ) \
             INSERT INTO aggregate_heads (bounded_context, aggregate_type, aggregate_id, \
                 aggregate_version) \
             SELECT 'sales', 'Order', aggregate_id, MAX(aggregate_version) FROM inserted GROUP BY 1, 2, 3 \
             ON CONFLICT (bounded_context, aggregate_type, aggregate_id) \
             DO UPDATE SET aggregate_version = EXCLUDED.aggregate_version, updated_at = NOW()",
            &[&aggregates, &per_aggregate],
        )
        .expect("append as the Go side");
}

/// Lines of text from a query whose columns are all text.
fn lines(client: &mut Client, sql: &str, schema: &str) -> Vec<String> {
    client
        .query(sql, &[&schema])
        .expect(sql)
        .iter()
        .map(|row| {
            (0..row.len())
                .map(|i| row.get::<_, Option<String>>(i).unwrap_or_default())
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .collect()
}

/// pupsourcing's three tables as a user would compare them: columns, indexes, constraints
/// and every row.
fn pupsourcing_tables(schema: &TestSchema) -> Vec<String> {
    let mut client = schema.client();
    let mut snapshot = lines(
        &mut client,
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text, \
             column_default::text \
         FROM information_schema.columns WHERE table_schema = $1 \
             AND table_name IN ('events', 'aggregate_heads', 'projection_checkpoints') \
         ORDER BY table_name, ordinal_position",
        &schema.name,
    );
    snapshot.extend(lines(
        &mut client,
        "SELECT tablename::text, indexname::text, indexdef FROM pg_indexes WHERE schemaname = $1 \
             AND tablename IN ('events', 'aggregate_heads', 'projection_checkpoints') \
         ORDER BY 1, 2",
        &schema.name,
    ));
    snapshot.extend(lines(
        &mut client,
        "SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid) \
         FROM pg_constraint WHERE connamespace = to_regnamespace($1) \
             AND conrelid::regclass::text IN ('events', 'aggregate_heads', 'projection_checkpoints') \
         ORDER BY 1, 2",
        &schema.name,
    ));
    for table in ["events", "aggregate_heads", "projection_checkpoints"] {
        snapshot.extend(lines(
            &mut client,
            &format!("SELECT t::text FROM {table} t WHERE $1::text IS NOT NULL ORDER BY 1"),
            &schema.name,
        ));
    }
    snapshot
}

fn table_names(schema: &TestSchema) -> Vec<String> {
    lines(
        &mut schema.client(),
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
        &schema.name,
    )
}

fn succeeds(what: &str, output: &Output) {
    assert_eq!(
        output.status.code(),
        Some(0),
        "{what}: {}",
        text(&output.stderr)
    );
}

#[test]
fn migrate_leaves_a_pupsourcing_store_as_it_was() {
    let schema = pupsourcing_store("pup_untouched");
    append_as_go(&schema, 5, 3);
    schema
        .client()
        .batch_execute(
            "INSERT INTO projection_checkpoints (projection_name, last_global_position) \
             VALUES ('order-summary', 12), ('invoices', 3)",
        )
        .expect("checkpoints of the Go side");
    let before = pupsourcing_tables(&schema);

    for _ in 0..2 {
        succeeds(
            "migrate",
            &run_within(schema.projector(&["migrate"]), LIMIT),
        );
    }

    assert_eq!(pupsourcing_tables(&schema), before);
    assert_eq!(
        table_names(&schema),
        [
            "aggregate_heads",
            "events",
            "projection_checkpoints",
            "projection_dead_letter_drops",
            "projection_dead_letters",
            "projector_checkpoints",
            "projector_prior_layouts",
            "projector_projection_states",
            "projector_projection_versions",
        ]
    );
}

#[test]
fn migrate_says_how_to_undo_what_the_earlier_version_did_to_a_pupsourcing_store() {
    let schema = pupsourcing_store("pup_undo");
    let mut client = schema.client();
    // What the earlier version's migration did: a column added to pupsourcing's table, and a
    // table of its own.
    client
        .batch_execute(
            "ALTER TABLE projection_checkpoints ADD COLUMN generation BIGINT NOT NULL DEFAULT 0",
        )
        .expect("the earlier version's column");
    client
        .batch_execute(
            &EARLIER_VERSION[EARLIER_VERSION
                .find("CREATE TABLE projection_priors")
                .expect("priors")..],
        )
        .expect("the earlier version's table");
    let before = pupsourcing_tables(&schema);

    let migrate = run_within(schema.projector(&["migrate"]), LIMIT);
    succeeds("migrate", &migrate);
    let stderr = text(&migrate.stderr);
    assert!(
        stderr.contains(&format!(
            "ALTER TABLE \"{}\".projection_checkpoints DROP COLUMN generation",
            schema.name
        )) && stderr.contains(&format!(
            "DROP TABLE \"{}\".projection_priors;",
            schema.name
        )) && !stderr.contains(&format!(
            "DROP TABLE \"{}\".projection_checkpoints",
            schema.name
        )),
        "{stderr}"
    );
    assert_eq!(
        pupsourcing_tables(&schema),
        before,
        "nothing is run for the user"
    );
}

#[test]
fn the_projector_runs_on_a_pupsourcing_store_beside_the_go_checkpoints() {
    let schema = pupsourcing_store("pup_runs");
    schema
        .client()
        .batch_execute(
            "INSERT INTO projection_checkpoints (projection_name, last_global_position) \
             VALUES ('order-summary', 7)",
        )
        .expect("a checkpoint of the Go side");
    succeeds(
        "migrate",
        &run_within(schema.projector(&["migrate"]), LIMIT),
    );
    append_as_go(&schema, 40, 5);

    succeeds(
        "run",
        &run_within(schema.projector(&RUN_AGGREGATE_STATS), LIMIT),
    );
    assert_eq!(schema.stats_applied(), 200);
    assert_eq!(schema.stats_mismatches(), 0);

    append_as_go(&schema, 40, 2);
    succeeds(
        "second run",
        &run_within(schema.projector(&RUN_AGGREGATE_STATS), LIMIT),
    );
    assert_eq!(schema.stats_applied(), 280);
    assert_eq!(schema.stats_mismatches(), 0);

    let status = run_within(schema.projector(&["status", "--json"]), LIMIT);
    succeeds("status", &status);
    let document: Value = serde_json::from_slice(&status.stdout).expect("status prints JSON");
    let projections: Vec<&str> = document["projections"]
        .as_array()
        .expect("a list of projections")
        .iter()
        .filter_map(|p| p["projection"].as_str())
        .collect();
    assert_eq!(projections, ["aggregate-stats"], "{document}");
    assert_eq!(
        lines(
            &mut schema.client(),
            "SELECT projection_name || ' ' || last_global_position FROM projection_checkpoints \
             WHERE $1::text IS NOT NULL",
            &schema.name
        ),
        ["order-summary 7"]
    );
}

#[test]
fn a_same_named_table_of_another_shape_is_refused_and_left_as_it_was() {
    let schema = TestSchema::empty("pup_foreign");
    schema
        .client()
        .batch_execute("CREATE TABLE projector_checkpoints (id INT); INSERT INTO projector_checkpoints VALUES (1)")
        .expect("another tool's table");

    let output = run_within(schema.projector(&["migrate"]), LIMIT);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("table '{}.projector_checkpoints'", schema.name))
            && stderr.contains("projector_checkpoints.projection is missing")
            && stderr.contains("another tool")
            && stderr.contains("--schema"),
        "{stderr}"
    );
    assert_eq!(table_names(&schema), ["projector_checkpoints"]);
    assert_eq!(
        lines(
            &mut schema.client(),
            "SELECT column_name::text || ' ' || data_type FROM information_schema.columns \
             WHERE table_schema = $1 ORDER BY ordinal_position",
            &schema.name
        ),
        ["id integer"]
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projector_checkpoints"),
        1
    );
}

#[test]
fn checkpoints_of_the_earlier_version_are_carried_over_and_resumed_without_repeats() {
    let schema = pupsourcing_store("pup_upgrade");
    let mut client = schema.client();
    client
        .batch_execute("DROP TABLE projection_checkpoints")
        .expect("the earlier version's store has no Go checkpoints");
    client
        .batch_execute(EARLIER_VERSION)
        .expect("the earlier version's tables");
    let first = schema.seed(30, 4);
    // The earlier version applied every event so far, under 4 partitions, and had retired
    // nothing of an earlier layout of 2 yet.
    client
        .batch_execute(
            "CREATE TABLE aggregate_stats (bounded_context TEXT NOT NULL, aggregate_type TEXT NOT NULL, \
                 aggregate_id TEXT NOT NULL, events_applied BIGINT NOT NULL, \
                 last_version BIGINT NOT NULL, last_global_position BIGINT NOT NULL, \
                 PRIMARY KEY (bounded_context, aggregate_type, aggregate_id)); \
             INSERT INTO aggregate_stats SELECT bounded_context, aggregate_type, aggregate_id, \
                 COUNT(*), MAX(aggregate_version), MAX(global_position) FROM events GROUP BY 1, 2, 3; \
             INSERT INTO projection_checkpoints \
                 (projection, total_partitions, partition_key, last_position, generation) \
             SELECT 'aggregate-stats', 4, k, (SELECT MAX(global_position) FROM events), 77 \
             FROM generate_series(0, 3) k; \
             INSERT INTO projection_priors (projection, total_partitions, prior_total, prior_positions) \
             VALUES ('aggregate-stats', 4, 2, '{5,6}')",
        )
        .expect("the earlier version's checkpoints and read model");
    let old_rows = |client: &mut Client| {
        let mut rows = lines(
            client,
            "SELECT t::text FROM projection_checkpoints t WHERE $1::text IS NOT NULL ORDER BY 1",
            &schema.name,
        );
        rows.extend(lines(
            client,
            "SELECT t::text FROM projection_priors t WHERE $1::text IS NOT NULL ORDER BY 1",
            &schema.name,
        ));
        rows
    };
    let before = old_rows(&mut client);
    assert_eq!(schema.stats_applied(), first);

    let migrate = run_within(schema.projector(&["migrate"]), LIMIT);
    succeeds("migrate", &migrate);
    let stderr = text(&migrate.stderr);
    assert!(
        stderr.contains(&format!(
            "DROP TABLE \"{}\".projection_checkpoints",
            schema.name
        )) && stderr.contains(&format!("DROP TABLE \"{}\".projection_priors", schema.name)),
        "{stderr}"
    );
    succeeds(
        "migrate again",
        &run_within(schema.projector(&["migrate"]), LIMIT),
    );
    assert_eq!(
        schema.count(
            "SELECT COUNT(*) FROM projector_checkpoints \
             WHERE projection = 'aggregate-stats' AND total_partitions = 4 AND generation = 77"
        ),
        4
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projector_prior_layouts"),
        1
    );

    let more = schema.seed(30, 2);
    succeeds(
        "run",
        &run_within(schema.projector(&RUN_AGGREGATE_STATS), LIMIT),
    );
    assert_eq!(
        schema.stats_applied(),
        first + more,
        "nothing applied twice"
    );
    assert_eq!(schema.stats_mismatches(), 0);
    assert_eq!(
        schema.count("SELECT MIN(last_position) FROM projector_checkpoints"),
        schema.count("SELECT MAX(global_position) FROM events")
    );
    assert_eq!(
        old_rows(&mut client),
        before,
        "the old tables are untouched"
    );
}

/// A login role of its own, dropped with everything it owns when the test ends.
struct TestRole {
    name: String,
}

impl TestRole {
    fn create() -> TestRole {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "projector_test_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        admin()
            .batch_execute(&format!(
                "DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
            ))
            .expect("create a role");
        TestRole { name }
    }

    /// `DATABASE_URL` with this role as the user.
    fn url(&self) -> String {
        let url = database_url();
        let (scheme, rest) = url.split_once("://").expect("DATABASE_URL is a URL");
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}@{host}", self.name)
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&database_url(), NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP OWNED BY {0}; DROP ROLE IF EXISTS {0}",
                self.name
            ));
        }
    }
}

#[test]
fn a_role_that_is_not_superuser_migrates_and_runs_the_projector() {
    let schema = pupsourcing_store("pup_role");
    let role = TestRole::create();
    schema
        .client()
        .batch_execute(&format!(
            "GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}; \
             GRANT SELECT, INSERT ON events, aggregate_heads TO {role}; \
             GRANT USAGE ON SEQUENCE events_global_position_seq TO {role}",
            schema = schema.name,
            role = role.name
        ))
        .expect("grant the role what a projector needs");
    append_as_go(&schema, 20, 3);

    let as_role = |args: &[&str]| {
        let mut command = schema.projector(args);
        command.env("DATABASE_URL", role.url());
        run_within(command, LIMIT)
    };
    succeeds("migrate as the role", &as_role(&["migrate"]));
    succeeds("run as the role", &as_role(&RUN_AGGREGATE_STATS));
    assert_eq!(schema.stats_applied(), 60);
    assert_eq!(schema.stats_mismatches(), 0);
    assert_eq!(
        schema.count(&format!(
            "SELECT COUNT(*) FROM pg_tables WHERE schemaname = '{}' AND tableowner = '{}'",
            schema.name, role.name
        )),
        7,
        "the role owns the projector's tables (with the record of drops, the states and the \
         versions) and the read model"
    );
}
