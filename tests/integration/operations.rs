//! Operating the binary: metrics and health over HTTP, JSON logs, `status --watch`.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{TestSchema, eventually, insert_event, run_within, signal, text, wait_within};

/// A port nobody listens on now.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// `GET url`: the status code and the body (a 503 is an answer too).
pub(crate) fn get(url: &str) -> Option<(u16, String)> {
    match ureq::get(url).timeout(Duration::from_secs(10)).call() {
        Ok(response) => {
            let status = response.status();
            Some((status, response.into_string().ok()?))
        }
        Err(ureq::Error::Status(status, response)) => Some((status, response.into_string().ok()?)),
        Err(_) => None,
    }
}

/// The sum of a metric's samples over every label set.
fn sum_of(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The samples of a metric, as (labels, value).
pub(crate) fn samples(metrics: &str, name: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter_map(|line| {
            let (labels, value) = line.rsplit_once(' ')?;
            Some((labels[name.len()..].to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The binary running `projections` on partitions 0-3 of 4 with metrics on `port`, and `extra`
/// flags; its stderr piped.
pub(crate) fn spawn_with_metrics(
    schema: &TestSchema,
    projections: &str,
    port: u16,
    extra: &[&str],
) -> Child {
    let address = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--partition-key",
        "0-3",
        "--total-partitions",
        "4",
        "--projection",
        projections,
        "--batch-size",
        "500",
        "--metrics-addr",
        &address,
    ];
    args.extend_from_slice(extra);
    schema
        .projector(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the projector")
}

#[test]
fn metrics_grow_during_a_catch_up_and_the_lag_matches_status_while_a_gap_is_held() {
    let schema = TestSchema::migrated("metrics_scrape");
    let events = schema.seed(20_000, 10);
    let port = free_port();
    let child = spawn_with_metrics(&schema, "aggregate-stats", port, &[]);
    let base = format!("http://127.0.0.1:{port}");

    // Scrape while it catches up: the applied counter grows, and it is not ready meanwhile.
    let mut seen = Vec::new();
    let mut ready_while_behind = None;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let Some((200, metrics)) = get(&format!("{base}/metrics")) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let applied = sum_of(&metrics, "projector_events_applied_total");
        if applied < events as f64 && ready_while_behind.is_none() {
            ready_while_behind = get(&format!("{base}/health/ready")).map(|(status, _)| status);
        }
        seen.push(applied);
        if applied == events as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        seen.last().copied(),
        Some(events as f64),
        "scrapes: {seen:?}"
    );
    assert!(
        seen.iter().any(|&a| a > 0.0 && a < events as f64),
        "a scrape during the catch-up saw a partial count: {seen:?}"
    );
    assert_eq!(ready_while_behind, Some(503), "not ready while far behind");
    eventually("ready once caught up", Duration::from_secs(10), || {
        get(&format!("{base}/health/ready")).is_some_and(|(status, _)| status == 200)
    });
    assert_eq!(
        get(&format!("{base}/health/live")).map(|(s, _)| s),
        Some(200)
    );

    // A writer holds a position open; five events commit above it. The checkpoints stay below
    // the gap: the lag gauge shows what `status` shows, and readiness turns 503 after 5 s.
    let mut holder = schema.client();
    let mut open = holder.transaction().expect("begin");
    insert_event(&mut open, "held-1", 1);
    let mut client = schema.client();
    for n in 1..=5 {
        insert_event(&mut client, &format!("above-{n}"), 1);
    }
    eventually(
        "readiness turns 503 while the gap is held",
        Duration::from_secs(15),
        || {
            get(&format!("{base}/health/ready"))
                .is_some_and(|(status, body)| status == 503 && body.contains("may still commit"))
        },
    );
    let (_, metrics) = get(&format!("{base}/metrics")).expect("scrape");
    let rows = projector::status(&mut schema.client(), Some("aggregate-stats")).expect("status");
    let lags = samples(&metrics, "projector_lag_events");
    assert_eq!(lags.len(), 4, "{metrics}");
    for row in &rows {
        let labels = format!(
            "{{partition=\"{}\",projection=\"aggregate-stats\",total_partitions=\"4\",version=\"1\"}}",
            row.partition_key
        );
        let lag = lags.iter().find(|(l, _)| *l == labels).map(|(_, v)| *v);
        assert_eq!(
            lag,
            Some(row.lag_events as f64),
            "partition {}",
            row.partition_key
        );
        assert_eq!(row.lag_events, 5);
    }
    assert!(
        sum_of(&metrics, "projector_gap_held_seconds") > 0.0,
        "{metrics}"
    );
    assert!(
        sum_of(&metrics, "projector_gap_blocking_pid") > 0.0,
        "{metrics}"
    );

    open.rollback().expect("roll back");
    eventually(
        "ready again once the gap is passed",
        Duration::from_secs(10),
        || get(&format!("{base}/health/ready")).is_some_and(|(status, _)| status == 200),
    );
    signal(&child, "TERM");
    let output = wait_within(child, Duration::from_secs(20));
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
}

#[test]
fn a_fenced_projection_makes_the_process_not_ready_while_the_other_goes_on() {
    let schema = TestSchema::migrated("metrics_fenced");
    schema.seed(100, 3);
    let port = free_port();
    let child = spawn_with_metrics(&schema, "aggregate-stats,noop", port, &[]);
    let base = format!("http://127.0.0.1:{port}");
    eventually("ready", Duration::from_secs(30), || {
        get(&format!("{base}/health/ready")).is_some_and(|(status, _)| status == 200)
    });
    let output = run_within(
        schema.projector(&["repartition", "--projection", "noop", "--to", "2"]),
        Duration::from_secs(30),
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    eventually("not ready: noop is fenced", Duration::from_secs(15), || {
        get(&format!("{base}/health/ready"))
            .is_some_and(|(status, body)| status == 503 && body.contains("of 'noop' is fenced"))
    });
    // Still live: the other projection goes on.
    assert_eq!(
        get(&format!("{base}/health/live")).map(|(s, _)| s),
        Some(200)
    );
    // The partition whose worker met the fence says so; the projection's others stop with it
    // (once that worker has told them, and they have finished what they were doing).
    let noop_in = |metrics: &str, state: &str| {
        samples(metrics, "projector_partition_state")
            .iter()
            .filter(|(labels, value)| {
                labels.contains("projection=\"noop\"")
                    && labels.contains(&format!("state=\"{state}\""))
                    && *value == 1.0
            })
            .count()
    };
    let mut metrics = String::new();
    eventually(
        "every noop partition fenced or stopped",
        Duration::from_secs(15),
        || {
            metrics = get(&format!("{base}/metrics")).map_or(String::new(), |(_, m)| m);
            noop_in(&metrics, "fenced") + noop_in(&metrics, "stopped") == 4
        },
    );
    assert!(noop_in(&metrics, "fenced") >= 1, "{metrics}");
    signal(&child, "TERM");
    let output = wait_within(child, Duration::from_secs(20));
    // The fenced projection's error is the process's.
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
}

#[test]
fn a_metrics_address_in_use_exits_2_before_anything_runs() {
    let schema = TestSchema::migrated("metrics_in_use");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let output = run_within(
        schema.aggregate_stats("0", "1", &["--metrics-addr", &address]),
        Duration::from_secs(30),
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--metrics-addr") && stderr.contains(&address),
        "{stderr}"
    );
    assert_eq!(
        schema.count("SELECT COUNT(*) FROM projector_checkpoints"),
        0
    );
}

#[test]
fn json_log_lines_each_parse_and_name_what_they_are_about() {
    let schema = TestSchema::migrated("json_logs");
    schema.seed(50, 4);
    let output = run_within(
        schema.aggregate_stats(
            "0-1",
            "2",
            &["--exit-when-caught-up", "--log-format", "json"],
        ),
        Duration::from_secs(60),
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(lines.len() >= 3, "{stderr}");
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["message"].is_string())
    );
    assert!(
        lines.iter().any(|l| l["projection"] == "aggregate-stats"
            && l["partition"] == 1
            && l["total_partitions"] == 2),
        "{stderr}"
    );

    // A failure is a JSON line too.
    let output = run_within(
        schema.aggregate_stats("7", "2", &["--log-format", "json"]),
        Duration::from_secs(30),
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let last: Value = serde_json::from_str(stderr.lines().last().unwrap_or("")).expect("JSON");
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("--partition-key"))
    );
}

/// Reads what `child` prints for `for_how_long`, then kills it.
fn output_for(mut child: Child, for_how_long: Duration) -> String {
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    std::thread::sleep(for_how_long);
    let _ = child.kill();
    let _ = child.wait();
    reader.join().expect("reader")
}

#[test]
fn status_watch_prints_tables_with_rate_and_eta_on_a_pipe_and_redraws_on_a_terminal() {
    let schema = TestSchema::migrated("status_watch");
    schema.seed(20, 2);
    let output = run_within(
        schema.aggregate_stats("0-3", "4", &["--exit-when-caught-up"]),
        Duration::from_secs(30),
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));

    // On a pipe: one table after another.
    let child = schema
        .projector(&["status", "--watch", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start status --watch");
    let printed = output_for(child, Duration::from_millis(2_600));
    assert!(printed.matches("PROJECTION").count() >= 2, "{printed}");
    assert!(
        printed.contains("RATE") && printed.contains("ETA"),
        "{printed}"
    );
    assert!(
        !printed.contains('\x1b'),
        "no terminal codes on a pipe: {printed:?}"
    );
    assert!(printed.contains("aggregate-stats"), "{printed}");

    // On a terminal (a pseudo-terminal from `script`): drawn in place.
    let command = format!("{} status --watch 1", env!("CARGO_BIN_EXE_projector"));
    let child = std::process::Command::new("script")
        .args(["-qfc", &command, "/dev/null"])
        .env("DATABASE_URL", &schema.url)
        .env("PROJECTOR_SCHEMA", &schema.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("`script` (util-linux) runs the command under a pseudo-terminal");
    let drawn = output_for(child, Duration::from_millis(2_600));
    assert!(
        drawn.contains("\x1b[H"),
        "cursor home on a terminal: {drawn:?}"
    );
    assert!(drawn.matches("PROJECTION").count() >= 2, "{drawn:?}");
}
