//! What the library-driven benchmarks (`park`, `projections`) share: running one, a schema of
//! its own, seeding, medians. Each benchmark uses only some of it.
#![allow(dead_code)]

use std::time::Duration;

use projector::postgres::{Client, NoTls};
use projector::{BoxError, Database};

pub(crate) type Result<T, E = BoxError> = std::result::Result<T, E>;

/// The benchmark's `main`: runs only under `cargo bench` (`--bench` among the arguments),
/// prints `usage` when `options` finds `--help` (`None`), and an error chain with exit 1.
pub(crate) fn main_of<O>(
    name: &str,
    usage: &str,
    options: impl FnOnce() -> Result<Option<O>>,
    run: impl FnOnce(&O) -> Result<()>,
) {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("benchmark not run: use cargo bench --bench {name} (or scripts/bench.sh)");
        return;
    }
    let outcome = options().and_then(|options| match options {
        Some(options) => run(&options),
        None => {
            println!("{usage}");
            Ok(())
        }
    });
    if let Err(error) = outcome {
        eprintln!("{name}: {}", projector::error_chain(error.as_ref()));
        std::process::exit(1);
    }
}

/// Runs `measure` on the database at `url` in a schema of its own (`bench_<name>_<pid>`),
/// dropped before and after.
pub(crate) fn in_own_schema(
    url: &str,
    name: &str,
    measure: impl FnOnce(&Database) -> Result<()>,
) -> Result<()> {
    let schema = format!("bench_{name}_{}", std::process::id());
    let mut admin = Client::connect(url, NoTls)?;
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    let database = Database::new(url)?.schema(&schema)?;
    let outcome = measure(&database);
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    outcome
}

/// Appends events `0..events` with `seed_sql` (parameters: first and last event number, and
/// `aggregates`), 250,000 per statement, then vacuums and analyzes the table.
pub(crate) fn seed(
    database: &Database,
    seed_sql: &str,
    events: i64,
    aggregates: i64,
) -> Result<()> {
    let mut client = database.connect()?;
    let insert = client.prepare(seed_sql)?;
    let mut low = 0;
    while low < events {
        let high = (low + 250_000).min(events) - 1;
        client.execute(&insert, &[&low, &high, &aggregates])?;
        low = high + 1;
    }
    client.batch_execute("VACUUM ANALYZE events")?;
    Ok(())
}

/// The median of `walls` (sorted in place).
pub(crate) fn median(walls: &mut [Duration]) -> Duration {
    walls.sort_unstable();
    walls[walls.len() / 2]
}
