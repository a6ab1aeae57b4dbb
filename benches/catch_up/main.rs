//! Catch-up benchmark: seeds the `events` table set-based, measures the fastest possible read
//! of it (R0, a binary `COPY`), then times the `projector` binary catching up from position 0
//! in several layouts, and prints one markdown table with the floors the runtime should meet.
//!
//! R0 and the runs P1 to P5 are measured `--rounds` times, in forward order in even rounds and
//! reversed in odd ones; each round's ratios are taken against that round's own R0, and the
//! table shows the medians over the rounds (`rounds.rs`, `report.rs`). The scaling runs and the
//! big peak-memory run come once, after the rounds. A summary line per ratio
//! (`ratio|key|median|min|max|rounds|what`) ends the output, for `scripts/bench.sh`.
//!
//! Usually run by `scripts/bench.sh`, which creates and drops a database for it. Directly:
//!
//! ```text
//! cargo bench --bench catch_up -- --database-url URL [--events N] [--big-events N]
//!     [--rounds R] [--scale 1,2,4,8,16] [--batch-size B] [--projector PATH]
//! ```
//!
//! The database must have no events yet; the benchmark migrates it and seeds it.

use std::path::PathBuf;

use postgres::{Client, NoTls};

#[path = "../common/mod.rs"]
mod common;
mod outcome;
mod plain;
mod report;
mod rounds;
mod runs;
mod text;

use runs::Bench;
use text::redact;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type Result<T, E = BoxError> = std::result::Result<T, E>;

const USAGE: &str = "usage: catch_up [--database-url URL] [--events N] [--big-events N] \
    [--rounds R] [--scale T,T,...] [--batch-size B] [--projector PATH]
  --database-url  database to seed and run against (env DATABASE_URL); must have no events
  --events        events in the main runs, default 1000000
  --big-events    events for the second peak-memory run, default 5000000; 0 skips it
  --rounds        rounds of R0 to P5, every other one in reverse order; medians reported,
                  default 3
  --scale         partition counts for the scaling runs, default 1,2,4,8,16
  --batch-size    --batch-size passed to every projector run (default: the projector's)
  --projector     the projector binary (default: the one cargo built with this benchmark)";

pub(crate) struct Options {
    pub(crate) database_url: String,
    pub(crate) events: i64,
    pub(crate) big_events: i64,
    /// Rounds of R0 to P5, at least 1.
    pub(crate) rounds: usize,
    pub(crate) scale: Vec<u32>,
    pub(crate) batch_size: Option<u32>,
    pub(crate) projector: PathBuf,
}

fn main() {
    // `cargo bench` passes --bench; anything else (such as `cargo test --all-targets`) only
    // checks that the benchmark builds.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("benchmark not run: use scripts/bench.sh");
        return;
    }
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(message) => {
            eprintln!("catch_up: {message}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(&options) {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        eprintln!("catch_up: {message}");
        std::process::exit(1);
    }
}

/// `Ok(None)` when help was asked for.
fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut database_url = std::env::var("DATABASE_URL").ok();
    let mut projector = option_env!("CARGO_BIN_EXE_projector").map(PathBuf::from);
    let mut options = Options {
        database_url: String::new(),
        events: 1_000_000,
        big_events: 5_000_000,
        rounds: 3,
        scale: vec![1, 2, 4, 8, 16],
        batch_size: None,
        projector: PathBuf::new(),
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            // `cargo bench` passes this to every benchmark binary.
            "--bench" => {}
            "-h" | "--help" => return Ok(None),
            "--database-url" => database_url = Some(value()?),
            "--events" => options.events = count(&arg, &value()?)?,
            "--big-events" => options.big_events = count(&arg, &value()?)?,
            "--rounds" => options.rounds = positive(&arg, &value()?)? as usize,
            "--batch-size" => options.batch_size = Some(positive(&arg, &value()?)?),
            "--projector" => projector = Some(PathBuf::from(value()?)),
            "--scale" => {
                options.scale = value()?
                    .split(',')
                    .map(|part| positive(&arg, part))
                    .collect::<Result<_, _>>()?;
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    options.database_url = database_url
        .filter(|url| !url.is_empty())
        .ok_or("no database: pass --database-url or set DATABASE_URL")?;
    options.projector = projector.ok_or(
        "the projector binary was not built with this benchmark (feature `cli` off): \
         pass --projector PATH",
    )?;
    if options.events < 1 {
        return Err("--events must be at least 1".into());
    }
    if options.big_events != 0 && options.big_events <= options.events {
        return Err("--big-events must be 0 or more than --events".into());
    }
    Ok(Some(options))
}

fn count(flag: &str, text: &str) -> Result<i64, String> {
    text.replace('_', "")
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| format!("{flag}: '{text}' is not a whole number"))
}

fn positive(flag: &str, text: &str) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{flag}: '{text}' is not a whole number of at least 1"))
}

fn run(options: &Options) -> Result<()> {
    let mut client = Client::connect(&options.database_url, NoTls)
        .map_err(|error| format!("connecting to {}: {error}", redact(&options.database_url)))?;
    let machine = Machine::probe(&mut client)?;
    machine.print();
    let bench = Bench { options, client };
    bench.run(machine)
}

/// What the numbers were measured on.
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) cpu_model: String,
    pub(crate) server_version: String,
}

impl Machine {
    fn probe(client: &mut Client) -> Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(0, usize::from);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let server_version = client
            .query_one("SHOW server_version", &[])?
            .get::<_, String>(0);
        Ok(Self {
            cpus,
            cpu_model,
            server_version,
        })
    }

    fn print(&self) {
        println!("machine: nproc {}", self.cpus);
        println!("machine: CPU {}", self.cpu_model);
        println!("machine: PostgreSQL {}", self.server_version);
    }
}
