//! The catch-up benchmark's report: each round's ratios, one table of medians over the rounds
//! (each round's ratios taken against that round's own R0), the floors judged on the medians,
//! and a summary line per ratio for `scripts/bench.sh`.

use crate::common::{Spread, Target, print_ratio};
use crate::outcome::{Outcome, Run};
use crate::rounds::{Round, Rounds};
use crate::runs::{BATCH_PROJECTION, all_keys};
use crate::text::{mib, pass, short_count, thousands, thousands_f};
use crate::{Machine, Options};

/// P5's floor, as a fraction of R0.
const P5_FLOOR_X_R0: f64 = 0.15;
/// Throughput of the Go pupsourcing v1 projection runtime, for comparison with P3.
const GO_REFERENCE: f64 = 4_100.0;
/// P3's floor: ten times the Go reference.
const P3_FLOOR: f64 = 41_000.0;
const RSS_CEILING_MIB: f64 = 64.0;

/// Everything measured.
pub(crate) struct Report<'a> {
    pub(crate) options: &'a Options,
    pub(crate) rounds: Rounds,
    pub(crate) scale: Vec<(u32, Outcome)>,
    pub(crate) big: Option<Outcome>,
}

/// One ratio of a round, reported per round, as a median, and as a summary line.
struct Ratio {
    key: &'static str,
    /// Its column in the table of rounds.
    column: &'static str,
    of: fn(&Round) -> Option<f64>,
    what: &'static str,
    target: Option<Target>,
}

/// The ratios every round gives, against that round's own R0 (P2 against its P1).
fn ratios() -> [Ratio; 7] {
    [
        Ratio {
            key: "catch_up R0 events/s",
            column: "R0 events/s",
            of: |round| round.get(Run::R0).map(Outcome::rate),
            what: "binary COPY of every event in order (the limit the ratios are taken against)",
            target: None,
        },
        Ratio {
            key: "catch_up P1 x R0",
            column: "P1 x R0",
            of: |round| round.rate_ratio(Run::P1, Run::R0),
            what: "noop, 1 process, partitions 0-3 of 4, events/s over R0's",
            target: Some(Target::AtLeast(0.95)),
        },
        Ratio {
            key: "catch_up P2 x P1",
            column: "P2 x P1 wall",
            of: |round| round.wall_ratio(Run::P2, Run::P1),
            what: "noop, 4 processes (partition K of 4 each), wall time over P1's",
            target: Some(Target::AtMost(1.25)),
        },
        Ratio {
            key: "catch_up P3 plain x R0",
            column: "P3 plain x R0",
            of: |round| round.rate_ratio(Run::P3Plain, Run::R0),
            what: "aggregate-stats, one statement per event, events/s over R0's",
            target: None,
        },
        Ratio {
            key: "catch_up P3 queued x R0",
            column: "P3 queued x R0",
            of: |round| round.rate_ratio(Run::P3Queued, Run::R0),
            what: "aggregate-stats, queued writes, events/s over R0's",
            target: Some(Target::AtLeast(0.25)),
        },
        Ratio {
            key: "catch_up P4 x R0",
            column: "P4 x R0",
            of: |round| round.rate_ratio(Run::P4, Run::R0),
            what: "aggregate-stats-batch (set-based), events/s over R0's",
            target: None,
        },
        Ratio {
            key: "catch_up P5 x R0",
            column: "P5 x R0",
            of: |round| round.rate_ratio(Run::P5, Run::R0),
            what: "aggregate-stats in SQL (projection file), events/s over R0's",
            target: None,
        },
    ]
}

/// One row of the results table.
struct Row {
    run: String,
    what: String,
    /// Median wall time, s.
    wall: Option<Spread>,
    /// Median events/s.
    rate: Option<Spread>,
    ratio: String,
    notes: String,
}

impl Report<'_> {
    pub(crate) fn print(&self, machine: &Machine) {
        let n = self.options.events;
        let count = self.rounds.0.len();
        let ratios = ratios();
        self.print_rounds(&ratios);

        println!(
            "\n## Catch-up benchmark: {} events, median of {count} round(s), alternating order\n",
            thousands(n)
        );
        println!(
            "machine: nproc {}, CPU {}, PostgreSQL {}; projector {}; batch size {}",
            machine.cpus,
            machine.cpu_model,
            machine.server_version,
            self.options.projector.display(),
            self.options
                .batch_size
                .map_or_else(|| "default".into(), |b| b.to_string())
        );
        println!(
            "\nR0 to P5 ran in each round, in forward order in rounds 1, 3, ... and reversed in \
             rounds 2, 4, ...; each round's ratios are taken against its own R0 (P2 against \
             its own P1). Wall and events/s: medians; ratios: median (min–max) of the \
             rounds' ratios. The scaling and big peak-memory runs ran once, after the rounds.\n"
        );
        println!("| run | what | wall s | events/s | ratio | notes |");
        println!("|---|---|---:|---:|---:|---|");
        for row in self.rows(&ratios) {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                row.run,
                row.what,
                row.wall
                    .map_or_else(|| "n/a".into(), |w| format!("{:.2}", w.median)),
                row.rate
                    .map_or_else(|| "n/a".into(), |r| thousands_f(r.median.round())),
                row.ratio,
                row.notes
            );
        }
        self.print_floors(&ratios);
        println!();
        for ratio in &ratios {
            print_ratio(
                ratio.key,
                self.rounds.spread(ratio.of),
                ratio.what,
                ratio.target,
            );
        }
    }

    /// Each round's order and ratios.
    fn print_rounds(&self, ratios: &[Ratio]) {
        println!("\n### Rounds\n");
        let columns: Vec<&str> = ratios.iter().map(|ratio| ratio.column).collect();
        println!("| round | order | {} |", columns.join(" | "));
        println!("|---:|---|{}", "---:|".repeat(columns.len()));
        for (i, round) in self.rounds.0.iter().enumerate() {
            let cells: Vec<String> = ratios
                .iter()
                .map(|ratio| match (ratio.of)(round) {
                    Some(value) if value >= 1_000.0 => thousands_f(value.round()),
                    Some(value) => format!("{value:.3}"),
                    None => "n/a".into(),
                })
                .collect();
            println!(
                "| {} | {} | {} |",
                i + 1,
                if round.reversed {
                    "reversed"
                } else {
                    "forward"
                },
                cells.join(" | ")
            );
        }
    }

    fn rows(&self, ratios: &[Ratio]) -> Vec<Row> {
        let n = self.options.events;
        let size = short_count(n);
        let spread = |ratio: usize| self.rounds.spread(ratios[ratio].of);
        let of_rounds = |figure: fn(&Round) -> Option<f64>| self.rounds.spread(figure);
        let r0_mb = self
            .rounds
            .outcomes(Run::R0)
            .map(|r0| r0.copied_bytes as f64 / 1e6)
            .next()
            .unwrap_or(f64::NAN);
        let mb_s = of_rounds(|round| {
            let r0 = round.get(Run::R0)?;
            Some(r0.copied_bytes as f64 / 1e6 / r0.wall.as_secs_f64())
        });
        let p1_peak = self.peak_mib(Run::P1);
        let p2_peak = self.peak_mib(Run::P2);
        let p3_rate = self.run_rate(Run::P3Queued);
        let mut rows = vec![
            Row {
                what: format!(
                    "binary COPY of all {} events in order (the limit)",
                    thousands(n)
                ),
                ratio: "1.00".into(),
                notes: format!(
                    "{r0_mb:.1} MB, {} MB/s, faster of 2 COPYs in each round",
                    spread_text(mb_s, 0)
                ),
                ..self.row(Run::R0)
            },
            Row {
                what: "noop, 1 process, partitions 0-3 of 4".into(),
                ratio: format!("{} x R0", spread_text(spread(1), 2)),
                notes: format!("peak RSS {}", peak_text(p1_peak)),
                ..self.row(Run::P1)
            },
            Row {
                what: "noop, 4 processes, partition K of 4 each (K = 0..3)".into(),
                ratio: format!("{} x P1 wall", spread_text(spread(2), 2)),
                notes: format!(
                    "wall until the last exits; events/s = events / wall; peak RSS {} (the \
                     largest process)",
                    peak_text(p2_peak)
                ),
                ..self.row(Run::P2)
            },
            Row {
                what: "aggregate-stats read model, one statement per event, 1 process (in the \
                       benchmark, through the library), 0-3 of 4"
                    .into(),
                ratio: format!("{} x R0", spread_text(spread(3), 3)),
                notes: self.checks(Run::P3Plain),
                ..self.row(Run::P3Plain)
            },
            Row {
                what: "aggregate-stats (per-event upsert, queued writes), 1 process, 0-3 of 4"
                    .into(),
                ratio: format!("{} x R0", spread_text(spread(4), 3)),
                notes: format!(
                    "{} x P3 plain; {:.1} x Go pupsourcing v1 reference ({} events/s); floor {} \
                     events/s: {}; {}",
                    spread_text(
                        of_rounds(|round| round.rate_ratio(Run::P3Queued, Run::P3Plain)),
                        2
                    ),
                    p3_rate / GO_REFERENCE,
                    thousands_f(GO_REFERENCE),
                    thousands_f(P3_FLOOR),
                    pass(p3_rate >= P3_FLOOR),
                    self.checks(Run::P3Queued)
                ),
                ..self.row(Run::P3Queued)
            },
        ];
        rows.push(if self.rounds.outcomes(Run::P4).next().is_some() {
            Row {
                what: format!("{BATCH_PROJECTION} (set-based batch), 1 process, 0-3 of 4"),
                ratio: format!("{} x R0", spread_text(spread(5), 3)),
                notes: format!(
                    "{} x P3 queued; {}",
                    spread_text(
                        of_rounds(|round| round.rate_ratio(Run::P4, Run::P3Queued)),
                        2
                    ),
                    self.checks(Run::P4)
                ),
                ..self.row(Run::P4)
            }
        } else {
            Row {
                what: format!("{BATCH_PROJECTION} (set-based batch)"),
                ratio: "n/a".into(),
                notes: "n/a (no batch handler yet)".into(),
                ..self.row(Run::P4)
            }
        });
        if self.rounds.outcomes(Run::P5).next().is_some() {
            rows.push(Row {
                what: "aggregate-stats in SQL (examples/sql/aggregate_stats.sql), 1 process, \
                       0-3 of 4"
                    .into(),
                ratio: format!("{} x R0", spread_text(spread(6), 3)),
                notes: format!(
                    "{} x P4; {}",
                    spread_text(of_rounds(|round| round.rate_ratio(Run::P5, Run::P4)), 2),
                    self.checks(Run::P5)
                ),
                ..self.row(Run::P5)
            });
        }
        let rss_n = p1_peak.map(|peak| peak.median);
        let rss_big = self.big.as_ref().and_then(Outcome::peak_mib);
        rows.push(Row {
            run: format!("RSS {size}"),
            what: format!("peak RSS of P1 at {} events", thousands(n)),
            ratio: "-".into(),
            notes: format!("{} (the P1 runs)", peak_text(p1_peak)),
            ..self.row(Run::P1)
        });
        rows.push(match &self.big {
            Some(outcome) => Row {
                run: "RSS big".into(),
                what: format!(
                    "peak RSS of P1 at {} events (once)",
                    thousands(self.options.big_events)
                ),
                wall: Spread::of([outcome.wall.as_secs_f64()]),
                rate: Spread::of([outcome.rate()]),
                ratio: match (rss_big, rss_n) {
                    (Some(big), Some(small)) => format!("{:.2} x RSS {size}", big / small),
                    _ => "n/a".into(),
                },
                notes: mib(rss_big),
            },
            None => Row {
                run: "RSS big".into(),
                what: "peak RSS of P1 at the big size".into(),
                wall: None,
                rate: None,
                ratio: "n/a".into(),
                notes: "skipped (--big-events 0)".into(),
            },
        });
        let one = self.scale_rate(1);
        for (total, outcome) in &self.scale {
            rows.push(Row {
                run: format!("scale T={total}"),
                what: format!(
                    "noop, 1 process, partitions {} of {total} (once)",
                    all_keys(*total)
                ),
                wall: Spread::of([outcome.wall.as_secs_f64()]),
                rate: Spread::of([outcome.rate()]),
                ratio: one.map_or_else(
                    || "n/a".into(),
                    |one| format!("{:.2} x T=1", outcome.rate() / one),
                ),
                notes: format!("peak RSS {}", mib(outcome.peak_mib())),
            });
        }
        rows
    }

    /// The row of `run` with its median wall time and events/s.
    fn row(&self, run: Run) -> Row {
        Row {
            run: run.label().into(),
            what: String::new(),
            wall: Spread::of(
                self.rounds
                    .outcomes(run)
                    .map(|outcome| outcome.wall.as_secs_f64()),
            ),
            rate: Spread::of(self.rounds.outcomes(run).map(Outcome::rate)),
            ratio: String::new(),
            notes: String::new(),
        }
    }

    /// The median events/s of `run` over the rounds (NaN when it did not run).
    fn run_rate(&self, run: Run) -> f64 {
        self.row(run).rate.map_or(f64::NAN, |rate| rate.median)
    }

    /// The peak RSS of `run` (its largest process) over the rounds.
    fn peak_mib(&self, run: Run) -> Option<Spread> {
        Spread::of(self.rounds.outcomes(run).filter_map(Outcome::peak_mib))
    }

    fn scale_rate(&self, total: u32) -> Option<f64> {
        self.scale
            .iter()
            .find(|(t, _)| *t == total)
            .map(|(_, outcome)| outcome.rate())
    }

    /// The read model checks of `run`'s rounds: the last one's when every round was ok, else
    /// each failed one.
    fn checks(&self, run: Run) -> String {
        let mut failed = Vec::new();
        let mut last = None;
        for (i, round) in self.rounds.0.iter().enumerate() {
            if let Some(check) = round.get(run).and_then(|outcome| outcome.check.as_ref()) {
                if !check.ok {
                    failed.push(format!("round {}: {}", i + 1, check.text));
                }
                last = Some(check.text.as_str());
            }
        }
        match (failed.is_empty(), last) {
            (true, Some(last)) => format!("{last} (every round)"),
            (true, None) => "not checked".into(),
            (false, _) => failed.join("; "),
        }
    }

    fn print_floors(&self, ratios: &[Ratio]) {
        let size = short_count(self.options.events);
        let median = |ratio: usize| {
            self.rounds
                .spread(ratios[ratio].of)
                .map_or(f64::NAN, |spread| spread.median)
        };
        let (p1, p2, p3_plain, p3, p5) = (median(1), median(2), median(3), median(4), median(6));
        let p3_rate = self.run_rate(Run::P3Queued);
        let rss_n = self.peak_mib(Run::P1);
        let rss_big = self.big.as_ref().and_then(Outcome::peak_mib);
        let (one, sixteen) = (self.scale_rate(1), self.scale_rate(16));

        println!("\n### Floors (reported, not asserted; on the medians)\n");
        floor("P1 >= 0.5 x R0", format!("{p1:.2} x R0"), Some(p1 >= 0.5));
        floor(
            "P2 wall <= 2 x P1 wall",
            format!("{p2:.2} x P1 wall"),
            Some(p2 <= 2.0),
        );
        floor(
            "P3 queued >= 0.25 x R0",
            format!("{p3:.3} x R0 (P3 plain {p3_plain:.3} x R0)"),
            Some(p3 >= 0.25),
        );
        floor(
            "P3 queued >= 41,000 events/s",
            format!(
                "{} events/s, {p3:.3} x R0, {:.1} x Go pupsourcing v1 (4,100 events/s)",
                thousands_f(p3_rate.round()),
                p3_rate / GO_REFERENCE
            ),
            Some(p3_rate >= P3_FLOOR),
        );
        if self.rounds.outcomes(Run::P5).next().is_some() {
            floor(
                "P5 (SQL) >= 0.15 x R0",
                format!("{p5:.3} x R0"),
                Some(p5 >= P5_FLOOR_X_R0),
            );
        }
        let peak = rss_n
            .map(|rss| rss.max)
            .into_iter()
            .chain(rss_big)
            .reduce(f64::max);
        floor(
            "peak RSS <= 64 MiB",
            format!(
                "RSS {size} {} (highest of the rounds), RSS big {}",
                mib(rss_n.map(|rss| rss.max)),
                mib(rss_big)
            ),
            peak.map(|peak| peak <= RSS_CEILING_MIB),
        );
        let rss_n = rss_n.map(|rss| rss.median);
        floor(
            &format!("RSS not growing with backlog: RSS big <= 1.25 x RSS {size} (median)"),
            match (rss_big, rss_n) {
                (Some(big), Some(small)) => format!("{:.2} x", big / small),
                _ => "n/a (no big run)".into(),
            },
            rss_big.zip(rss_n).map(|(big, small)| big <= 1.25 * small),
        );
        floor(
            "P1 at 16 partitions >= 0.75 x P1 at 1",
            match (sixteen, one) {
                (Some(sixteen), Some(one)) => format!("{:.2} x", sixteen / one),
                _ => "n/a (T=1 or T=16 not run)".into(),
            },
            sixteen.zip(one).map(|(sixteen, one)| sixteen >= 0.75 * one),
        );
    }
}

fn spread_text(spread: Option<Spread>, decimals: usize) -> String {
    spread.map_or_else(|| "n/a".into(), |spread| spread.text(decimals))
}

fn peak_text(peak: Option<Spread>) -> String {
    peak.map_or_else(|| "n/a".into(), |peak| format!("{} MiB", peak.text(1)))
}

fn floor(check: &str, value: String, passed: Option<bool>) {
    let verdict = passed.map_or("n/a", pass);
    println!("- {check}: {value} -> **{verdict}**");
}
