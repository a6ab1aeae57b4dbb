//! What the commands print. A reader that went away (`projector status | head -1`) is not an
//! error: printing stops, and the command ends as it would have (0 once its work is done),
//! without a word about the closed pipe. Any other failure to write stdout (a full disk)
//! ends the command with exit code 1, saying so.

use std::io::{ErrorKind, Write};

/// Prints a line on stdout, as `println!` does, without panicking on a closed pipe.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cli::output::line(format_args!($($arg)*))
    };
}
pub(crate) use say;

/// Writes `text` and a newline to stdout (see the module's docs for a failed write).
pub(crate) fn line(text: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(text).and_then(|()| out.write_all(b"\n"));
    if let Err(error) = written.and_then(|()| out.flush()) {
        failed(&error);
    }
}

/// Writes `text` (as it is) to stdout and flushes it; `false` when the reader went away.
pub(crate) fn draw(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(error) => {
            failed(&error);
            false
        }
    }
}

/// Writes a line to stderr; a closed stderr loses it, without a panic.
pub(crate) fn complain(text: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(text).and_then(|()| err.write_all(b"\n"));
}

/// A failed write to stdout: nothing on a closed pipe, else the error and exit code 1.
fn failed(error: &std::io::Error) {
    if error.kind() != ErrorKind::BrokenPipe {
        complain(format_args!(
            "error: cannot write to standard output: {error}"
        ));
        std::process::exit(1);
    }
}
