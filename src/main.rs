//! The `projector` command: parses flags, sets up logging and signals, calls the library and
//! turns the outcome into an exit code (0 clean stop, 1 runtime failure, 2 bad usage or
//! configuration, 3 a `wait` whose event was parked rather than applied, 130 forced stop).

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let command = match cli::args::parse(&args) {
        Ok(command) => command,
        Err(cli::args::Parsed::Help(text)) => {
            cli::output::line(format_args!("{text}"));
            return ExitCode::SUCCESS;
        }
        Err(cli::args::Parsed::Usage(text)) => {
            cli::output::complain(format_args!("{text}\nRun projector --help for usage."));
            return ExitCode::from(2);
        }
    };
    let format = match cli::logs::LogFormat::chosen(command.log_format.clone()) {
        Ok(format) => format,
        Err(error) => {
            cli::output::complain(format_args!("error: {error}"));
            return ExitCode::from(2);
        }
    };
    cli::logs::init(format);
    match cli::run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let text = projector::error_chain(&error);
            if format == cli::logs::LogFormat::Json {
                // A log pipeline reads every line as JSON, the last one too.
                log::error!("{text}");
            } else {
                cli::output::complain(format_args!("error: {text}"));
            }
            ExitCode::from(error.exit_code())
        }
    }
}
