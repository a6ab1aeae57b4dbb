//! The versions benchmark's figures: each round's rebuilds and latencies, and the report of
//! the rounds (medians of each round's ratios, and their summary lines).

use std::time::Duration;

use crate::Options;
use crate::common::{self, Spread, Target};

/// A rebuild: how long it took, and how many events it applied (the head at its start).
#[derive(Clone, Copy)]
pub(crate) struct Rebuild {
    pub(crate) took: Duration,
    pub(crate) events: i64,
}

impl Rebuild {
    fn per_event(&self) -> f64 {
        self.took.as_secs_f64() / self.events.max(1) as f64
    }
}

/// One round's figures.
pub(crate) struct Round {
    pub(crate) alone_first: bool,
    pub(crate) alone: Rebuild,
    pub(crate) beside: Beside,
}

/// The live version's latencies quiet and while version 2 rebuilds beside it, and that rebuild.
pub(crate) struct Beside {
    pub(crate) quiet: Latencies,
    pub(crate) loaded: Latencies,
    pub(crate) rebuild: Rebuild,
}

impl Round {
    fn p99_ratio(&self) -> f64 {
        self.beside.loaded.p99 / self.beside.quiet.p99.max(0.001)
    }

    /// The rebuild beside the live version over the rebuild alone, per event rebuilt.
    fn rebuild_ratio(&self) -> f64 {
        self.beside.rebuild.per_event() / self.alone.per_event().max(f64::MIN_POSITIVE)
    }

    pub(crate) fn print(&self, options: &Options) {
        println!();
        println!(
            "live version's latency from append commit to read-model commit, {} appends/s from 2 \
             writers, 4 partitions in one process",
            options.rate
        );
        println!("| live version | samples | p50 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|");
        self.beside.quiet.print_row("alone (quiet)");
        self.beside
            .loaded
            .print_row("while version 2 rebuilds beside it");
        println!();
        println!("| rebuild | events | s |");
        println!("|---|---|---|");
        for (what, rebuild) in [
            ("alone (reset and rebuild)", self.alone),
            ("as version 2 beside the live version", self.beside.rebuild),
        ] {
            println!(
                "| {what} | {} | {:.2} |",
                rebuild.events,
                rebuild.took.as_secs_f64()
            );
        }
        println!();
        println!(
            "loaded p99 / quiet p99: {:.2} (target <= 2); rebuild beside / alone: {:.2} per event \
             (target <= 1.3)",
            self.p99_ratio(),
            self.rebuild_ratio()
        );
    }
}

/// Each round's ratios, their medians, and the summary lines.
pub(crate) fn report(options: &Options, rounds: &[Round]) {
    println!(
        "\n## Versions: {} events, {} appends/s, median of {} round(s), alternating order\n",
        options.events,
        options.rate,
        rounds.len()
    );
    println!(
        "| round | first | quiet p99 ms | loaded p99 ms | loaded / quiet | alone s | beside s | \
         beside / alone (per event) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for (i, round) in rounds.iter().enumerate() {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            i + 1,
            if round.alone_first { "alone" } else { "beside" },
            round.beside.quiet.p99,
            round.beside.loaded.p99,
            round.p99_ratio(),
            round.alone.took.as_secs_f64(),
            round.beside.rebuild.took.as_secs_f64(),
            round.rebuild_ratio()
        );
    }
    let p99 = Spread::of(rounds.iter().map(Round::p99_ratio));
    let rebuild = Spread::of(rounds.iter().map(Round::rebuild_ratio));
    let text = |spread: Option<Spread>| spread.map_or("n/a".into(), |s| s.text(2));
    println!(
        "\nloaded p99 / quiet p99: {} (target <= 2); rebuild beside / alone: {} (target <= 1.3); \
         medians (min–max) of the rounds' ratios\n",
        text(p99),
        text(rebuild)
    );
    common::print_ratio(
        "versions loaded p99 / quiet p99",
        p99,
        "live version's append-to-applied p99 while version 2 rebuilds beside it over its quiet \
         p99",
        Some(Target::AtMost(2.0)),
    );
    common::print_ratio(
        "versions rebuild beside / alone",
        rebuild,
        "rebuild of version 2 beside the live version over the rebuild alone, per event",
        Some(Target::AtMost(1.3)),
    );
}

/// Percentiles of a run's latencies, ms.
pub(crate) struct Latencies {
    pub(crate) samples: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Latencies {
    pub(crate) fn of(mut samples: Vec<f64>) -> Latencies {
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| {
            samples
                .get(((samples.len().max(1) - 1) as f64 * q) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        Latencies {
            samples: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }

    fn print_row(&self, what: &str) {
        println!(
            "| {what} | {} | {:.2} | {:.2} | {:.2} |",
            self.samples, self.p50, self.p99, self.max
        );
    }
}
