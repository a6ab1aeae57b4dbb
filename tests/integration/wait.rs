//! Read your writes: a worker's commit tells waiters that its checkpoint moved.

use std::time::Duration;

use projector::Builder;
use projector::postgres::fallible_iterator::FallibleIterator;
use projector::postgres::{Client, NoTls};
use projector::projections::AggregateStats;

use crate::util::TestSchema;

/// The channel a commit notifies, worked out here on its own: the prefix and the schema's name
/// when they fit PostgreSQL's 63 bytes, else the prefix and the schema's MD5.
fn applied_channel(client: &mut Client, schema: &str) -> String {
    let prefix = "projector_applied_";
    if prefix.len() + schema.len() <= 63 {
        return format!("{prefix}{schema}");
    }
    let md5: String = client
        .query_one("SELECT md5($1)", &[&schema])
        .expect("md5")
        .get(0);
    format!("{prefix}{md5}")
}

#[test]
fn a_commit_that_moves_a_checkpoint_notifies_its_schema_applied_channel() {
    // The second name is too long for the prefix (63 bytes at most): its MD5 stands in.
    for test in [
        "wait_channel",
        "wait_channel_of_a_schema_too_long_for_the_prefix",
    ] {
        let schema = TestSchema::migrated(test);
        let mut listener = Client::connect(&schema.url, NoTls).expect("connect");
        let channel = applied_channel(&mut listener, &schema.name);
        listener
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .expect("listen");
        schema.seed(4, 2);
        Builder::new(schema.database.clone(), AggregateStats)
            .partitions(0..2)
            .total_partitions(2)
            .exit_when_caught_up(true)
            .start()
            .and_then(|runner| runner.join())
            .expect("catch up");
        let md5: String = listener
            .query_one("SELECT md5('aggregate-stats')", &[])
            .expect("md5")
            .get(0);
        let payloads: Vec<String> = listener
            .notifications()
            .timeout_iter(Duration::from_secs(5))
            .map(|n| Ok(n.payload().to_owned()))
            .take(2)
            .collect()
            .expect("notifications");
        assert!(!payloads.is_empty(), "{}: no notification", schema.name);
        assert!(payloads.iter().all(|p| *p == md5), "{payloads:?}");
    }
}
