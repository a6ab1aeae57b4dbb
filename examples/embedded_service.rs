//! A plain (non-async) service that runs a projection on background threads while it does its
//! own work, then stops it cleanly.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo run --example embedded_service
//! ```
//!
//! It needs only the library: `projector = { path = "../projector", default-features = false }`
//! (not on crates.io yet: depend on a checkout, or on the repository with `git = "URL"`).

use std::time::Duration;

use projector::postgres::Transaction;
use projector::{BoxError, Builder, Context, Database, Event, Projection};

/// Counts events per type in `event_type_counts`.
#[derive(Clone)]
struct EventTypeCounts;

impl Projection for EventTypeCounts {
    fn name(&self) -> &str {
        "event-type-counts"
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS event_type_counts (
                 event_type TEXT PRIMARY KEY,
                 events BIGINT NOT NULL
             )",
        )?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        _: &Context,
    ) -> Result<(), BoxError> {
        // Same transaction as the checkpoint: no commit here, and no other connection.
        tx.execute(
            "INSERT INTO event_type_counts VALUES ($1, 1) \
             ON CONFLICT (event_type) DO UPDATE SET events = event_type_counts.events + 1",
            &[&event.event_type],
        )?;
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One readable line with every cause, as the `projector` binary prints it.
            eprintln!("error: {}", projector::error_chain(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let database = Database::new(&url)?;
    projector::migrate(&database)?;

    // This process owns all four partitions; another deployment could split them.
    let runner = Builder::new(database.clone(), EventTypeCounts)
        .partitions(0..4)
        .total_partitions(4)
        .batch_size(500)
        .poll_interval(Duration::from_millis(200))
        .start()?;

    // The service's own work; here, a few reports of the read model.
    let mut client = database.connect()?;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        let rows = client.query(
            "SELECT event_type, events FROM event_type_counts ORDER BY 1",
            &[],
        )?;
        let counts: Vec<String> = rows
            .iter()
            .map(|row| format!("{}={}", row.get::<_, String>(0), row.get::<_, i64>(1)))
            .collect();
        println!("event counts: {}", counts.join(", "));
    }

    // Stop: in-flight transactions commit or roll back whole, then the threads end.
    runner.shutdown();
    let summary = runner.join()?;
    println!(
        "applied {} events in {:?}",
        summary.applied(),
        summary.elapsed
    );
    Ok(())
}
