//! What one run of the catch-up benchmark is and what it gave.

use std::time::Duration;

/// The runs of a round, in their forward order ([`Run::ALL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Run {
    R0,
    P1,
    P2,
    P3Plain,
    P3Queued,
    P4,
    P5,
}

impl Run {
    pub(crate) const ALL: [Run; 7] = [
        Run::R0,
        Run::P1,
        Run::P2,
        Run::P3Plain,
        Run::P3Queued,
        Run::P4,
        Run::P5,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Run::R0 => "R0",
            Run::P1 => "P1",
            Run::P2 => "P2",
            Run::P3Plain => "P3 plain",
            Run::P3Queued => "P3 queued",
            Run::P4 => "P4",
            Run::P5 => "P5",
        }
    }
}

/// One run (R0 or a projector run): its wall time, each process's summary line, and the
/// check of its read model.
pub(crate) struct Outcome {
    pub(crate) wall: Duration,
    /// Events in the stream when it ran.
    pub(crate) events: i64,
    pub(crate) processes: Vec<ProcessSummary>,
    /// Whether the read model holds every aggregate and event once (`aggregate-stats` runs).
    pub(crate) check: Option<Check>,
    /// Bytes the `COPY` of R0 read (0 for the other runs).
    pub(crate) copied_bytes: u64,
}

/// The check of an `aggregate-stats` read model after a run.
pub(crate) struct Check {
    pub(crate) ok: bool,
    pub(crate) text: String,
}

impl Outcome {
    /// Events of the stream per second of wall time.
    pub(crate) fn rate(&self) -> f64 {
        self.events as f64 / self.wall.as_secs_f64()
    }

    pub(crate) fn peak_mib(&self) -> Option<f64> {
        self.processes
            .iter()
            .filter_map(|p| p.peak_mib)
            .reduce(f64::max)
    }

    pub(crate) fn applied(&self) -> u64 {
        self.processes.iter().map(|p| p.applied).sum()
    }
}

/// The figures of a projector's `stopped '...' after ...` line.
pub(crate) struct ProcessSummary {
    pub(crate) read: u64,
    pub(crate) applied: u64,
    pub(crate) peak_mib: Option<f64>,
}

impl ProcessSummary {
    pub(crate) fn parse(stderr: &str) -> Option<Self> {
        let line = stderr
            .lines()
            .rev()
            .find(|line| line.contains("stopped '"))?;
        Some(Self {
            read: number_after(line, ": read ")?.parse().ok()?,
            applied: number_after(line, ", applied ")?.parse().ok()?,
            peak_mib: number_after(line, "peak memory ").and_then(|n| n.parse().ok()),
        })
    }
}

/// The number (digits and dots) right after `marker` in `line`.
fn number_after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}
