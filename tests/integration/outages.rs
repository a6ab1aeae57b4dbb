//! Outages an operator meets: a database gone for longer than the process should wait, a
//! process whose connections freeze and which dies behind the freeze, and a server with no
//! connection slot left. Each test runs against a cluster of its own.

use std::process::Child;
use std::time::{Duration, Instant};

use projector::postgres::{Client, NoTls};

use crate::cluster::Cluster;
use crate::proxy::Proxy;
use crate::util::{TestSchema, eventually, signal, text, wait_within};

const LIMIT: Duration = Duration::from_secs(60);

/// The binary live on both partitions of 2, on `url`, with `extra` flags.
fn spawn_live(schema: &TestSchema, url: &str, extra: &[&str]) -> Child {
    schema
        .aggregate_stats("0-1", "2", extra)
        .env("DATABASE_URL", url)
        .spawn()
        .expect("start the projector")
}

#[test]
fn a_database_down_for_longer_than_the_give_up_limit_ends_the_process_with_exit_1() {
    let cluster = Cluster::start("give_up");
    let schema = TestSchema::migrated_on(&cluster.url(), "give_up");
    let events = schema.seed(20, 2);
    let child = spawn_live(&schema, &cluster.url(), &["--give-up-after", "3s"]);
    eventually("the catch-up", LIMIT, || schema.stats_applied() == events);

    cluster.stop();
    let stopped = Instant::now();
    let output = wait_within(child, Duration::from_secs(30));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("gave up after") && stderr.contains("--give-up-after"),
        "{stderr}"
    );
    // The limit, plus at most one back-off delay (5 s) and a connect time-out (5 s).
    assert!(
        stopped.elapsed() < Duration::from_secs(3 + 5 + 5 + 2),
        "took {:?}",
        stopped.elapsed()
    );
    cluster.start_again();
}

#[test]
fn a_database_down_for_less_than_the_give_up_limit_is_ridden_out() {
    let cluster = Cluster::start("ride_out");
    let schema = TestSchema::migrated_on(&cluster.url(), "ride_out");
    let first = schema.seed(20, 2);
    let child = spawn_live(&schema, &cluster.url(), &["--give-up-after", "60s"]);
    eventually("the catch-up", LIMIT, || schema.stats_applied() == first);

    cluster.stop();
    std::thread::sleep(Duration::from_secs(4));
    cluster.start_again();
    let second = schema.seed_prefixed("after", 20, 2);
    eventually("the events after the outage", LIMIT, || {
        schema.stats_applied() == first + second
    });
    signal(&child, "TERM");
    let output = wait_within(child, Duration::from_secs(20));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("lost the database"), "{stderr}");
    assert!(stderr.contains("the database is back"), "{stderr}");
    assert_eq!(schema.stats_mismatches(), 0);
}

#[test]
fn an_owner_frozen_and_killed_behind_the_freeze_frees_its_partitions_within_the_session_timeout() {
    let cluster = Cluster::start("half_open");
    let schema = TestSchema::migrated_on(&cluster.url(), "half_open");
    let first = schema.seed(30, 2);
    let proxy = Proxy::to(cluster.port());
    let through = proxy.url(&cluster.url());
    let owner = spawn_live(&schema, &through, &["--session-timeout-secs", "5"]);
    eventually("the owner to catch up", LIMIT, || {
        schema.stats_applied() == first
    });

    // The server never hears that the owner went away: its sessions stay open, holding the
    // partitions, until the session timeout ends them.
    proxy.freeze();
    signal(&owner, "KILL");
    let killed = Instant::now();
    let _ = wait_within(owner, Duration::from_secs(10));
    let replacement = spawn_live(&schema, &cluster.url(), &["--session-timeout-secs", "5"]);
    let second = schema.seed_prefixed("after", 30, 2);
    eventually(
        "the replacement to take the partitions over",
        Duration::from_secs(40),
        || schema.stats_applied() == first + second,
    );
    let took = killed.elapsed();
    signal(&replacement, "TERM");
    let output = wait_within(replacement, Duration::from_secs(20));
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(schema.stats_mismatches(), 0);
    assert!(
        took < Duration::from_secs(5 + 10),
        "the replacement took {took:?} with a 5 s session timeout"
    );
    drop(proxy);
}

#[test]
fn a_server_with_no_connection_slot_left_is_named_with_the_limit_to_raise() {
    let cluster = Cluster::start("slots");
    let schema = TestSchema::migrated_on(&cluster.url(), "slots");
    schema.seed(5, 1);
    // Take every slot the server has.
    let mut held: Vec<Client> = Vec::new();
    while let Ok(client) = Client::connect(&cluster.url(), NoTls) {
        held.push(client);
        assert!(held.len() < 500, "the server never ran out of connections");
    }
    let output = crate::util::run_within(
        schema.projector(&[
            "--partition-key",
            "0",
            "--total-partitions",
            "1",
            "--projection",
            "aggregate-stats",
        ]),
        Duration::from_secs(30),
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no connection slot left") && stderr.contains("max_connections"),
        "{stderr}"
    );
    drop(held);
}
