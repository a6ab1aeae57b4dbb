//! The catch-up benchmark's course: migrate and seed, then `--rounds` rounds of R0 to P5 (in
//! forward order on even rounds, reversed on odd ones), then the scaling runs and the big
//! peak-memory run once each, then the report.

use crate::common::Spread;
use crate::outcome::{Outcome, Run};
use crate::report::Report;
use crate::runs::{Bench, all_keys};
use crate::{Machine, Result};

/// One round: each run's outcome (`None` for a run the binary cannot do).
pub(crate) struct Round {
    pub(crate) reversed: bool,
    outcomes: [Option<Outcome>; Run::ALL.len()],
}

impl Round {
    pub(crate) fn get(&self, run: Run) -> Option<&Outcome> {
        self.outcomes[run as usize].as_ref()
    }

    /// `run`'s events/s over `base`'s, both of this round.
    pub(crate) fn rate_ratio(&self, run: Run, base: Run) -> Option<f64> {
        Some(self.get(run)?.rate() / self.get(base)?.rate())
    }

    /// `run`'s wall time over `base`'s, both of this round.
    pub(crate) fn wall_ratio(&self, run: Run, base: Run) -> Option<f64> {
        Some(self.get(run)?.wall.as_secs_f64() / self.get(base)?.wall.as_secs_f64())
    }
}

/// Every round, in the order run.
pub(crate) struct Rounds(pub(crate) Vec<Round>);

impl Rounds {
    /// `figure` of each round that has it, as median, min and max.
    pub(crate) fn spread(&self, figure: impl Fn(&Round) -> Option<f64>) -> Option<Spread> {
        Spread::of(self.0.iter().filter_map(figure))
    }

    /// The outcomes of `run`, one per round that has it.
    pub(crate) fn outcomes(&self, run: Run) -> impl Iterator<Item = &Outcome> {
        self.0.iter().filter_map(move |round| round.get(run))
    }
}

impl Bench<'_> {
    pub(crate) fn run(mut self, machine: Machine) -> Result<()> {
        let n = self.options.events;
        self.projector("migrate", &["migrate".to_owned()])?;
        let existing = self.events()?;
        if existing != 0 {
            return Err(format!(
                "the database already has {existing} events: give the benchmark an empty database"
            )
            .into());
        }
        self.seed(0, n)?;

        let available = self.available_runs()?;
        let mut rounds = Vec::new();
        for round in 0..self.options.rounds {
            rounds.push(self.round(round, &available)?);
        }
        let rounds = Rounds(rounds);

        let mut scale = Vec::new();
        for &total in &self.options.scale {
            let keys = [all_keys(total)];
            let outcome = self.project(&format!("scale T={total}"), "noop", total, &keys)?;
            scale.push((total, outcome));
        }
        let big = if self.options.big_events > 0 {
            self.seed(n, self.options.big_events)?;
            Some(self.project("RSS big", "noop", 4, &["0-3".to_owned()])?)
        } else {
            None
        };

        let report = Report {
            options: self.options,
            rounds,
            scale,
            big,
        };
        report.print(&machine);
        Ok(())
    }

    /// Round `round` (from 0) of the runs in `available`: in their order on an even round,
    /// reversed on an odd one. Each run starts from position 0 with an empty read model.
    fn round(&mut self, round: usize, available: &[Run]) -> Result<Round> {
        let reversed = round % 2 == 1;
        let mut order = available.to_vec();
        if reversed {
            order.reverse();
        }
        let count = self.options.rounds;
        println!(
            "\n## Round {}/{count}, {} order: {}",
            round + 1,
            if reversed { "reversed" } else { "forward" },
            order
                .iter()
                .map(|run| run.label())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut outcomes: [Option<Outcome>; Run::ALL.len()] = Default::default();
        for run in order {
            let label = format!("{} (round {}/{count})", run.label(), round + 1);
            outcomes[run as usize] = Some(self.measure(run, &label)?);
        }
        Ok(Round { reversed, outcomes })
    }
}
