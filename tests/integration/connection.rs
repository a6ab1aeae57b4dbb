//! How the projector connects: passwords never printed, schema names of any valid length and
//! case, the user's connection options kept, keepalives bounded, signals during start-up.

use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use projector::postgres::Config;
use projector::projections::AggregateStats;
use projector::{Builder, Database, ExpectedVersion, NewEvent, Settings};

use crate::util::{TestSchema, admin, database_url, eventually, run_within, text, wait_within};

const LIMIT: Duration = Duration::from_secs(60);

/// The test server's host, port, user and database, as the driver reads `DATABASE_URL`.
fn server() -> (String, u16, String, String) {
    let config = Config::from_str(&database_url()).expect("DATABASE_URL parses");
    let host = match config.get_hosts().first() {
        Some(projector::postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let dbname = config.get_dbname().unwrap_or(&user).to_owned();
    (host, port, user, dbname)
}

/// Every piece of `password` of 4 characters or more (and the whole of it).
fn fragments(password: &str) -> Vec<String> {
    let chars: Vec<char> = password.chars().collect();
    let mut pieces = Vec::new();
    for length in 4..=chars.len() {
        for start in 0..=chars.len() - length {
            pieces.push(chars[start..start + length].iter().collect());
        }
    }
    pieces
}

/// A connection string that holds a password, how the binary must end, and what it must say.
struct Case {
    what: &'static str,
    url: String,
    secrets: Vec<&'static str>,
    exit: i32,
    says: &'static str,
}

/// Runs the binary with `case.url` given as a flag and through the environment, at three log
/// levels, and checks that no piece of any secret appears on stdout or stderr.
fn check_never_printed(case: &Case, args: &[&str], schema: Option<&TestSchema>) {
    for (given_as, source) in [
        ("flag", "--database-url"),
        ("environment", "DATABASE_URL (from the environment)"),
    ] {
        for level in [None, Some("debug"), Some("trace")] {
            let mut command = match schema {
                Some(schema) => schema.projector(&[]),
                None => {
                    let mut command = Command::new(env!("CARGO_BIN_EXE_projector"));
                    command.stdin(Stdio::null()).env_remove("RUST_LOG");
                    command
                }
            };
            if given_as == "flag" {
                command
                    .args(["--database-url", &case.url])
                    .env_remove("DATABASE_URL");
            } else {
                command.env("DATABASE_URL", &case.url);
            }
            command.args(args);
            if let Some(level) = level {
                command.env("RUST_LOG", level);
            }
            let output = run_within(command, Duration::from_secs(30));
            let all = text(&output.stdout) + &text(&output.stderr);
            let label = format!("{} ({given_as}, RUST_LOG={level:?})", case.what);
            assert_eq!(output.status.code(), Some(case.exit), "{label}: {all}");
            assert!(
                all.contains(case.says),
                "{label}: expected {:?} in {all}",
                case.says
            );
            if case.exit == 2 && case.says.contains("connection string") {
                assert!(all.contains(source), "{label}: names {source}: {all}");
            }
            for secret in &case.secrets {
                for piece in fragments(secret) {
                    assert!(!all.contains(&piece), "{label}: printed {piece:?}: {all}");
                }
            }
        }
    }
}

#[test]
fn no_piece_of_a_password_is_printed_when_the_database_is_unreachable() {
    let unreachable = "could not connect to the database at app@127.0.0.1:1/events";
    let unparsable = "is not a valid connection string";
    let cases = [
        Case {
            what: "URL with a raw @ in the password",
            url: "postgres://app:Zq7@wXkJv9@127.0.0.1:1/events".into(),
            secrets: vec!["Zq7@wXkJv9"],
            exit: 2,
            says: "%40",
        },
        Case {
            what: "URL with a raw @ and : in the password",
            url: "postgres://app:Zq7@wXk:Jv9@127.0.0.1:1/events".into(),
            secrets: vec!["Zq7@wXk:Jv9"],
            exit: 2,
            says: "%40",
        },
        Case {
            what: "URL with @ and : percent-encoded",
            url: "postgres://app:Zq7%40wXk%3AJv9@127.0.0.1:1/events".into(),
            secrets: vec!["Zq7@wXk:Jv9", "Zq7%40wXk%3AJv9"],
            exit: 1,
            says: unreachable,
        },
        Case {
            what: "URL with a : in the password",
            url: "postgres://app:Zq7:wXkJv9@127.0.0.1:1/events".into(),
            secrets: vec!["Zq7:wXkJv9"],
            exit: 1,
            says: unreachable,
        },
        Case {
            what: "URL with the password as a parameter",
            url: "postgresql://127.0.0.1:1/events?user=app&password=Zq7wXkJv9".into(),
            secrets: vec!["Zq7wXkJv9"],
            exit: 1,
            says: unreachable,
        },
        Case {
            what: "URL with an & in the password parameter",
            url: "postgres://127.0.0.1:1/events?user=app&password=Zq7&wXkJv9=1".into(),
            secrets: vec!["Zq7&wXkJv9=1"],
            exit: 2,
            says: unparsable,
        },
        Case {
            what: "key=value",
            url: "host=127.0.0.1 port=1 user=app password=Zq7wXkJv9 dbname=events".into(),
            secrets: vec!["Zq7wXkJv9"],
            exit: 1,
            says: unreachable,
        },
        Case {
            what: "key = value with spaces around =",
            url: "host = 127.0.0.1 port = 1 user = app password = Zq7wXkJv9 dbname = events".into(),
            secrets: vec!["Zq7wXkJv9"],
            exit: 1,
            says: unreachable,
        },
        Case {
            what: "single-quoted value with spaces, @ and a quote",
            url: r"host=127.0.0.1 port=1 user=app password='Zq7 wX@k\'Jv9' dbname=events".into(),
            secrets: vec!["Zq7 wX@k'Jv9", r"Zq7 wX@k\'Jv9"],
            exit: 1,
            says: unreachable,
        },
        Case {
            what: "unquoted value with a space",
            url: "host=127.0.0.1 port=1 user=app password=Zq7 wXkJv9 dbname=events".into(),
            secrets: vec!["Zq7 wXkJv9"],
            exit: 2,
            says: unparsable,
        },
        Case {
            what: "unquoted value with a space and an = (an unknown key)",
            url: "host=127.0.0.1 port=1 user=app password=Zq7 wXkJv9=abcd".into(),
            secrets: vec!["Zq7 wXkJv9=abcd"],
            exit: 2,
            says: unparsable,
        },
        Case {
            what: "unterminated quoted value",
            url: "host=127.0.0.1 port=1 user=app password='Zq7wXkJv9".into(),
            secrets: vec!["Zq7wXkJv9"],
            exit: 2,
            says: unparsable,
        },
        Case {
            what: "a password that is nowhere valid",
            url: "host=127.0.0.1 port=1 user=app Zq7wXkJv9".into(),
            secrets: vec!["Zq7wXkJv9"],
            exit: 2,
            says: unparsable,
        },
    ];
    for case in &cases {
        check_never_printed(case, &["--partition-key", "0"], None);
    }
}

#[test]
fn no_piece_of_a_password_is_printed_against_the_real_server() {
    let schema = TestSchema::migrated("password_forms");
    schema.seed(5, 2);
    let (host, port, user, dbname) = server();
    // The test server trusts its clients, so any password is accepted.
    let caught_up = "stopped 'aggregate-stats'";
    let cases = [
        Case {
            what: "URL, percent-encoded @ and :",
            url: format!("postgres://{user}:Zq7%40wXk%3AJv9@{host}:{port}/{dbname}"),
            secrets: vec!["Zq7@wXk:Jv9", "Zq7%40wXk%3AJv9"],
            exit: 0,
            says: caught_up,
        },
        Case {
            what: "URL with a raw @",
            url: format!("postgres://{user}:Zq7@wXkJv9@{host}:{port}/{dbname}"),
            secrets: vec!["Zq7@wXkJv9"],
            exit: 2,
            says: "%40",
        },
        Case {
            what: "key = value with a quoted password",
            url: format!(
                "host = {host} port = {port} user = {user} dbname = {dbname} \
                 password = 'Zq7 wX@k:Jv9'"
            ),
            secrets: vec!["Zq7 wX@k:Jv9"],
            exit: 0,
            says: caught_up,
        },
        Case {
            what: "key=value with an unknown key",
            url: format!(
                "host={host} port={port} user={user} dbname={dbname} password=Zq7 wXkJv9=1"
            ),
            secrets: vec!["Zq7 wXkJv9=1"],
            exit: 2,
            says: "is not a valid connection string",
        },
    ];
    let args = [
        "--partition-key",
        "0-3",
        "--projection",
        "aggregate-stats",
        "--exit-when-caught-up",
    ];
    for case in &cases {
        check_never_printed(case, &args, Some(&schema));
    }
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn an_unset_database_url_says_so_and_how_to_set_it() {
    let output = run_within(
        Command::new(env!("CARGO_BIN_EXE_projector"))
            .args(["--partition-key", "0"])
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null()),
        LIMIT,
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr
            .starts_with("error: DATABASE_URL is not set: set DATABASE_URL or pass --database-url"),
        "{stderr}"
    );
}

#[test]
fn a_refused_login_or_a_missing_database_exits_2_saying_what_to_check() {
    let (host, port, _, dbname) = server();
    let pid = std::process::id();
    let cases = [
        (
            format!("postgres://no_such_role_{pid}:Zq7wXkJv9@{host}:{port}/{dbname}"),
            "check the user and password in DATABASE_URL (from the environment)",
        ),
        (
            format!("postgres://postgres@{host}:{port}/no_such_database_{pid}"),
            "check the database name in DATABASE_URL (from the environment)",
        ),
    ];
    for (url, says) in cases {
        let output = run_within(
            Command::new(env!("CARGO_BIN_EXE_projector"))
                .args(["--partition-key", "0"])
                .env("DATABASE_URL", &url)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null()),
            LIMIT,
        );
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{url}: {stderr}");
        assert!(stderr.contains(says), "{url}: {stderr}");
        assert!(!stderr.contains("Zq7w"), "{stderr}");
    }
}

/// A schema named exactly `name`, created quoted and dropped at the end of the test.
struct NamedSchema {
    name: String,
    database: Database,
}

impl NamedSchema {
    fn new(name: String, url: &str) -> NamedSchema {
        admin()
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS \"{name}\" CASCADE; CREATE SCHEMA \"{name}\""
            ))
            .expect("create the schema");
        let database = Database::new(url)
            .and_then(|d| d.schema(&name))
            .expect("a valid schema name");
        NamedSchema { name, database }
    }
}

impl Drop for NamedSchema {
    fn drop(&mut self) {
        let _ = admin().batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name));
    }
}

/// Migrates, starts a live runner that only a notification can wake in time, appends one
/// event through the library and expects it applied within 5 s.
fn a_live_runner_wakes_on_an_append(schema: &NamedSchema) {
    projector::migrate(&schema.database).expect("migrate");
    let mut client = schema.database.connect().expect("connect");
    let tables: i64 = client
        .query_one(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = $1 \
                 AND table_name IN ('events', 'aggregate_heads')",
            &[&schema.name],
        )
        .expect("look for the tables")
        .get(0);
    assert_eq!(
        tables, 2,
        "the tables are in schema {:?} exactly",
        schema.name
    );
    let mut settings = Settings::default();
    settings.poll_interval = Duration::from_secs(120);
    settings.max_poll_interval = Duration::from_secs(120);
    let runner = Builder::new(schema.database.clone(), AggregateStats)
        .settings(settings)
        .partitions(0..2)
        .total_partitions(2)
        .start()
        .expect("start");
    let applied = |client: &mut projector::postgres::Client| -> i64 {
        client
            .query_one(
                "SELECT COALESCE(SUM(events_applied), 0)::bigint FROM aggregate_stats",
                &[],
            )
            .map(|row| row.get(0))
            .unwrap_or(0)
    };
    // Let the fetcher reach its first long wait.
    std::thread::sleep(Duration::from_millis(500));
    let appended = Instant::now();
    projector::append(
        &mut client,
        ExpectedVersion::NoStream,
        &[NewEvent::new(
            "test",
            "Thing",
            "thing-1",
            "Happened",
            b"{}".to_vec(),
        )],
    )
    .expect("append");
    eventually(
        "the notified runner to apply the event",
        Duration::from_secs(5),
        || applied(&mut client) == 1,
    );
    assert!(appended.elapsed() < Duration::from_secs(5));
    runner.shutdown();
    runner.join().expect("the runner stops cleanly");
}

#[test]
fn a_schema_name_of_63_characters_works_and_wakes_runners() {
    let mut name = format!("long_{}_", std::process::id());
    while name.len() < 63 {
        name.push('x');
    }
    let schema = NamedSchema::new(name, &database_url());
    a_live_runner_wakes_on_an_append(&schema);
}

#[test]
fn a_mixed_case_schema_name_is_taken_exactly_and_wakes_runners() {
    let schema = NamedSchema::new(format!("TenantA_{}", std::process::id()), &database_url());
    a_live_runner_wakes_on_an_append(&schema);
}

/// `url` with one more query parameter.
fn with_parameter(url: &str, parameter: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{parameter}")
}

/// The server's value of each setting on a connection, in its base unit.
fn server_settings(client: &mut projector::postgres::Client, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|name| {
            client
                .query_one("SELECT setting FROM pg_settings WHERE name = $1", &[name])
                .expect("read a setting")
                .get(0)
        })
        .collect()
}

#[test]
fn the_users_connection_options_are_kept_alongside_the_schema() {
    let url = with_parameter(&database_url(), "options=-c%20statement_timeout%3D12345");
    let schema = NamedSchema::new(format!("opts_{}", std::process::id()), &url);
    let mut client = schema.database.connect().expect("connect");
    let statement_timeout: String = client
        .query_one("SHOW statement_timeout", &[])
        .expect("show")
        .get(0);
    let current: Option<String> = client
        .query_one("SELECT current_schema()::text", &[])
        .expect("current schema")
        .get(0);
    assert_eq!(statement_timeout, "12345ms");
    assert_eq!(current.as_deref(), Some(schema.name.as_str()));
}

const KEEPALIVES: [&str; 4] = [
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
];

#[test]
fn server_keepalives_follow_the_dead_connection_bound() {
    let schema = TestSchema::empty("keepalives");
    let mut client = schema.client();
    assert_eq!(
        server_settings(&mut client, &KEEPALIVES),
        ["15", "5", "3", "30000"],
        "the default bound of 30 s"
    );
}

#[test]
fn the_dead_connection_bound_is_one_setting_and_the_users_options_win() {
    let schema = TestSchema::empty("keepalive_setting");
    let database = schema
        .database
        .clone()
        .keepalive_timeout_secs(12)
        .expect("12 s is a valid bound");
    let mut client = database.connect().expect("connect");
    assert_eq!(
        server_settings(&mut client, &KEEPALIVES),
        ["6", "2", "3", "12000"]
    );
    let url = with_parameter(&database_url(), "options=-c%20tcp_keepalives_idle%3D7");
    let mut client = Database::new(&url)
        .and_then(|d| d.keepalive_timeout_secs(12))
        .and_then(|d| d.connect())
        .expect("connect");
    assert_eq!(
        server_settings(&mut client, &KEEPALIVES),
        ["7", "2", "3", "12000"],
        "the user's own option wins"
    );
    let error = schema
        .database
        .clone()
        .keepalive_timeout_secs(4)
        .expect_err("4 s is below the minimum");
    assert!(error.is_configuration());

    for (flag, environment, value) in [
        (true, false, "4"),
        (false, true, "4"),
        (true, false, "soon"),
    ] {
        let mut command = schema.projector(&["--partition-key", "0"]);
        if flag {
            command.args(["--keepalive-timeout-secs", value]);
        }
        if environment {
            command.env("PROJECTOR_KEEPALIVE_TIMEOUT_SECS", value);
        }
        let output = run_within(command, LIMIT);
        let stderr = text(&output.stderr);
        let named = match environment {
            true => "PROJECTOR_KEEPALIVE_TIMEOUT_SECS (from the environment)",
            false => "--keepalive-timeout-secs",
        };
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.starts_with(&format!(
                "error: invalid value '{value}' for {named}: expected"
            )),
            "{stderr}"
        );
    }
}

#[test]
fn sigterm_while_waiting_for_the_layout_lock_at_start_up_exits_0_at_once() {
    let schema = TestSchema::migrated("start_up_signal");
    schema.seed(10, 2);
    // Another start (or a repartition) of the same projection holds the layout lock.
    let mut holder = schema.client();
    let mut tx = holder.transaction().expect("begin");
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('projector layout ' || current_schema() || ' ' \
         || 'aggregate-stats'))",
        &[],
    )
    .expect("take the layout lock");
    let child = schema
        .projector(&[
            "--partition-key",
            "0-1",
            "--total-partitions",
            "2",
            "--projection",
            "aggregate-stats",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the projector");
    std::thread::sleep(Duration::from_secs(1));
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let output = wait_within(child, Duration::from_secs(10));
    let took = signalled.elapsed();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(took < Duration::from_secs(2), "took {took:?}: {stderr}");
    assert!(stderr.contains("stopped during start-up"), "{stderr}");
    tx.rollback().expect("release the lock");
    assert_eq!(schema.stats_applied(), 0, "nothing was applied");
}
