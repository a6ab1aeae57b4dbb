//! Progress lines: every few seconds while there is work, how far each projection is; and, while
//! a projection has parked events, a warning (with the progress line, or every minute when idle).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select, tick};
use log::{log, warn};

use crate::engine::lane::LaneProgress;
use crate::engine::router::FetchProgress;
use crate::store;
use crate::{Database, readable_duration};

/// Logs a progress line every few seconds while there is work.
pub(crate) struct Monitor {
    pub(crate) database: Database,
    /// Grouped by projection, in order.
    pub(crate) progress: Vec<LaneProgress>,
    pub(crate) fetch_progress: Arc<FetchProgress>,
    pub(crate) interval: Duration,
    pub(crate) stop: Receiver<()>,
    /// Disconnects when the fetcher and every worker have ended.
    pub(crate) done: Receiver<()>,
}

/// How often an idle projection with parked events is reminded of them.
const PARKED_REMINDER: Duration = Duration::from_secs(60);

/// What the monitor remembers of a projection from one tick to the next.
#[derive(Default, Clone)]
struct Seen {
    applied: u64,
    lagging: bool,
    /// Each partition's checkpoint.
    checkpoints: Vec<i64>,
    /// Parked aggregates and events.
    parked: (i64, i64),
    /// When a line last said what is parked.
    parked_said: Option<Instant>,
}

impl Monitor {
    pub(crate) fn run(self) {
        let ticks = tick(self.interval);
        let mut client = None;
        let projections: Vec<&[LaneProgress]> = self
            .progress
            .chunk_by(|a, b| a.projection == b.projection)
            .collect();
        let mut seen = vec![Seen::default(); projections.len()];
        let mut last_time = Instant::now();
        loop {
            select! {
                recv(self.stop) -> _ => return,
                recv(self.done) -> _ => return,
                recv(ticks) -> _ => {}
            }
            if client.is_none() {
                client = self.database.connect().ok();
            }
            let head = client
                .as_mut()
                .and_then(|c| store::head_position(c).ok())
                .unwrap_or_else(|| self.fetch_progress.position.load(Ordering::Relaxed));
            // A lost connection is opened again at the next tick.
            if client.as_ref().is_some_and(|c| c.is_closed()) {
                client = None;
            }
            let names: Vec<&str> = projections
                .iter()
                .filter_map(|lanes| Some(lanes.first()?.projection.as_str()))
                .collect();
            // `None` when the database did not answer: each projection keeps what it last saw.
            let parked = client
                .as_mut()
                .and_then(|c| crate::dead_letters::parked_totals(c, &names).ok());
            let seconds = last_time.elapsed().as_secs_f64().max(0.001);
            for (lanes, seen) in projections.iter().zip(&mut seen) {
                let parked = match (&parked, lanes.first()) {
                    (Some(parked), Some(lane)) => parked
                        .iter()
                        .find(|(name, _, _)| *name == lane.projection)
                        .map_or((0, 0), |&(_, aggregates, events)| (aggregates, events)),
                    _ => seen.parked,
                };
                *seen = self.report(lanes, seen, head, seconds, parked);
            }
            last_time = Instant::now();
        }
    }

    /// Logs one projection's line, if it has work or has just caught up: the rate over the
    /// last interval and, from it, when the projection and its slowest partition will have
    /// caught up.
    fn report(
        &self,
        lanes: &[LaneProgress],
        before: &Seen,
        head: i64,
        seconds: f64,
        parked: (i64, i64),
    ) -> Seen {
        let checkpoints: Vec<i64> = lanes.iter().map(LaneProgress::checkpoint).collect();
        let Some(first) = lanes.first() else {
            return before.clone();
        };
        let name = &first.projection;
        let applied: u64 = lanes.iter().map(LaneProgress::applied).sum();
        let checkpoint = checkpoints.iter().copied().min().unwrap_or(0);
        let lagging = checkpoint < head;
        if lagging {
            // A rate only over an interval that was busy from end to end: one that began
            // caught up would understate it.
            let rate = if before.lagging {
                format!(
                    " ({:.0} events/s)",
                    (applied - before.applied) as f64 / seconds
                )
            } else {
                String::new()
            };
            // Each partition's ETA at its own pace (positions per second); the projection is
            // done when its slowest partition is.
            let etas: Vec<Option<f64>> = checkpoints
                .iter()
                .enumerate()
                .map(|(i, &now)| {
                    let was = *before.checkpoints.get(i)?;
                    let pace = (now - was) as f64 / seconds;
                    (before.lagging && pace > 0.0).then(|| (head - now).max(0) as f64 / pace)
                })
                .collect();
            let eta = if etas.iter().all(Option::is_some) {
                etas.iter()
                    .flatten()
                    .copied()
                    .reduce(f64::max)
                    .map_or(String::new(), |s| {
                        format!(", ETA {}", readable_duration(Duration::from_secs_f64(s)))
                    })
            } else {
                String::new()
            };
            // With several partitions, the one furthest behind is the one to look at.
            let slowest = match lanes {
                [_, _, ..] => checkpoints
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, c)| **c)
                    .map(|(i, c)| {
                        let eta = etas[i].map_or(String::new(), |s| {
                            format!(", ETA {}", readable_duration(Duration::from_secs_f64(s)))
                        });
                        format!(" (slowest: partition {} at {c}{eta})", lanes[i].partition)
                    })
                    .unwrap_or_default(),
                _ => String::new(),
            };
            log!(
                level(parked),
                "progress of '{name}': {applied} applied{rate}, read {}, checkpoint \
                 {checkpoint}, head {head}, lag {} positions{eta}{slowest}{}",
                self.fetch_progress.read.load(Ordering::Relaxed),
                head - checkpoint,
                parked_note(name, parked)
            );
        } else if applied != before.applied {
            log!(
                level(parked),
                "progress of '{name}': {applied} applied, caught up at global position \
                 {head}{}",
                parked_note(name, parked)
            );
        } else if parked.0 > 0
            && (parked != before.parked
                || before
                    .parked_said
                    .is_none_or(|at| at.elapsed() >= PARKED_REMINDER))
        {
            warn!(
                "'{name}' is caught up at global position {head}{}",
                parked_note(name, parked)
            );
        } else {
            return Seen {
                applied,
                lagging,
                checkpoints,
                ..before.clone()
            };
        }
        Seen {
            applied,
            lagging,
            checkpoints,
            parked,
            parked_said: (parked.0 > 0).then(Instant::now),
        }
    }
}

/// A progress line is a warning while the projection has parked events.
fn level(parked: (i64, i64)) -> log::Level {
    if parked.0 > 0 {
        log::Level::Warn
    } else {
        log::Level::Info
    }
}

/// `; 2 aggregate(s) parked (7 event(s)): ...` while the projection has parked events.
fn parked_note(name: &str, (aggregates, events): (i64, i64)) -> String {
    if aggregates == 0 {
        return String::new();
    }
    format!(
        "; {aggregates} aggregate(s) parked ({events} event(s)): `projector dead-letters list \
         --projection {}` shows them, `retry` or `drop` releases them",
        crate::shell_word(name)
    )
}
