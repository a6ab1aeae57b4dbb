//! The `projector` command: parses flags, sets up logging and signals, calls the library and
//! turns the outcome into an exit code (0 clean stop, 1 runtime failure, 2 bad usage or
//! configuration, 130 forced stop).

mod cli;

use std::process::ExitCode;

/// The projector's own lines at info, or at the level RUST_LOG gives alone (`RUST_LOG=debug`);
/// other crates (the database driver logs every statement at debug) at warn, unless RUST_LOG
/// names them (`RUST_LOG=tokio_postgres=debug`).
fn init_logging() {
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(log::LevelFilter::Warn)
        .filter_module("projector", log::LevelFilter::Info)
        .format_target(false);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        match spec.trim().parse::<log::LevelFilter>() {
            Ok(level) => {
                builder.filter_module("projector", level);
            }
            Err(_) => {
                builder.parse_filters(&spec);
            }
        }
    }
    builder.init();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let command = match cli::args::parse(&args) {
        Ok(command) => command,
        Err(cli::args::Parsed::Help(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(cli::args::Parsed::Usage(text)) => {
            eprintln!("{text}");
            eprintln!("Run projector --help for usage.");
            return ExitCode::from(2);
        }
    };
    init_logging();
    match cli::run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", projector::error_chain(&error));
            ExitCode::from(if error.is_configuration() { 2 } else { 1 })
        }
    }
}
