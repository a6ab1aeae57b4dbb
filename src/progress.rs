//! Progress lines: every few seconds while there is work, how far the partitions are.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select, tick};
use log::info;

use crate::Database;
use crate::fetcher::FetchProgress;
use crate::store;
use crate::worker::Progress;

/// Logs a progress line every few seconds while there is work.
pub(crate) struct Monitor {
    pub(crate) database: Database,
    pub(crate) progress: Vec<(u32, Arc<Progress>)>,
    pub(crate) fetch_progress: Arc<FetchProgress>,
    pub(crate) interval: Duration,
    pub(crate) stop: Receiver<()>,
    /// Disconnects when the fetcher and every worker have ended.
    pub(crate) done: Receiver<()>,
}

impl Monitor {
    pub(crate) fn run(self) {
        let ticks = tick(self.interval);
        let mut client = None;
        let mut last_applied = 0;
        let mut last_time = Instant::now();
        let mut was_lagging = false;
        loop {
            select! {
                recv(self.stop) -> _ => return,
                recv(self.done) -> _ => return,
                recv(ticks) -> _ => {}
            }
            let applied: u64 = self
                .progress
                .iter()
                .map(|(_, p)| p.applied.load(Ordering::Relaxed))
                .sum();
            let checkpoint = self
                .progress
                .iter()
                .map(|(_, p)| p.checkpoint.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0);
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
            let lagging = checkpoint < head;
            if lagging {
                // A rate only over an interval that was busy from end to end: one that began
                // caught up would understate it.
                let rate = if was_lagging {
                    let seconds = last_time.elapsed().as_secs_f64().max(0.001);
                    format!(
                        " ({:.0} events/s)",
                        (applied - last_applied) as f64 / seconds
                    )
                } else {
                    String::new()
                };
                // With several partitions, the one furthest behind is the one to look at.
                let slowest = match &self.progress[..] {
                    [_, _, ..] => self
                        .progress
                        .iter()
                        .min_by_key(|(_, p)| p.checkpoint.load(Ordering::Relaxed))
                        .map(|(key, p)| {
                            format!(
                                " (slowest: partition {key} at {})",
                                p.checkpoint.load(Ordering::Relaxed)
                            )
                        })
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                info!(
                    "progress: {applied} applied{rate}, read {}, checkpoint {checkpoint}, head \
                     {head}, lag {} positions{slowest}",
                    self.fetch_progress.read.load(Ordering::Relaxed),
                    head - checkpoint
                );
            } else if applied != last_applied {
                info!("progress: {applied} applied, caught up at global position {head}");
            }
            was_lagging = lagging;
            last_applied = applied;
            last_time = Instant::now();
        }
    }
}
