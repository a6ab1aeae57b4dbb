//! Health of a running group of projections: liveness and readiness, as an embedding service
//! or `projector --metrics-addr` serves them (`/health/live`, `/health/ready`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use crate::engine::lane::LaneState;
use crate::ops::metrics::Metrics;

/// A gap held for longer than this makes the process not ready.
pub const READY_GAP_LIMIT: Duration = Duration::from_secs(5);

/// A health check's answer: `ok` (HTTP 200) or not (503), and a JSON body saying why.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Health {
    /// True when healthy.
    pub ok: bool,
    /// `{"status": "ok" | "unavailable", "reasons": [...], ...}`.
    pub body: String,
}

impl Metrics {
    /// Liveness: the fetcher and at least one worker are running. Read from the process alone:
    /// it never waits on the database.
    pub fn live(&self) -> Health {
        let mut reasons = Vec::new();
        if !self.shared.figures.fetch.running.load(Ordering::Acquire) {
            reasons.push("the fetcher has stopped".to_owned());
        }
        if self
            .shared
            .figures
            .lanes
            .iter()
            .all(|lane| lane.state().is_done())
        {
            reasons.push("every partition's worker has stopped".to_owned());
        }
        health(reasons, json!({}))
    }

    /// Readiness: live, no gap held for longer than [`READY_GAP_LIMIT`], and every owned
    /// partition (standbys included; with shared partitions, those this process is to hold)
    /// within `max_lag` events of the head, none fenced, failed or stopped. A partition's lag is what it still has to apply: the events stored after
    /// the position up to which every event of it is applied in this process (past its
    /// checkpoint while it receives nothing of its own). The database is asked as
    /// [`Metrics::render`] asks it: when another scrape is asking, its last answer counts.
    pub fn ready(&self, max_lag: i64) -> Health {
        let live = self.live();
        let mut reasons: Vec<String> = Vec::new();
        if !live.ok {
            reasons.push("not live".into());
        }
        let figures = self.refresh();
        let lags = figures.lags;
        let Some(head) = figures.head else {
            reasons.push(format!(
                "the database cannot be reached or did not answer within {} s",
                crate::ops::metrics::SCRAPE_TIMEOUT.as_secs()
            ));
            return health(reasons, json!({}));
        };
        let held = self.shared.figures.fetch.gap_held_for();
        if let Some(age) = held.filter(|age| *age > READY_GAP_LIMIT) {
            reasons.push(format!(
                "the fetcher has waited {:.0} s at a position that may still commit (pid {})",
                age.as_secs_f64(),
                self.shared.figures.fetch.gap_pid.load(Ordering::Relaxed)
            ));
        }
        let mut partitions = Vec::new();
        for (index, lane) in self.shared.figures.lanes.iter().enumerate() {
            let state = lane.state();
            let lag = lags.get(index).map_or(0, |lag| lag.events);
            let name = format!(
                "partition {}/{} of '{}'",
                lane.partition, lane.total, lane.projection
            );
            // Sharing partitions: one another process is to hold is not this process's to
            // keep up with.
            let here = lane.progress.is_wanted();
            match state {
                _ if !here && !state.is_done() => {}
                LaneState::Fenced | LaneState::Failed | LaneState::Stopped => {
                    reasons.push(format!("{name} is {}", state.name()));
                }
                _ if lag > max_lag => {
                    reasons.push(format!(
                        "{name} is {lag} positions behind the head (more than {max_lag})"
                    ));
                }
                _ => {}
            }
            partitions.push(json!({
                "projection": lane.projection,
                "partition": lane.partition,
                "total_partitions": lane.total,
                "state": state.name(),
                "checkpoint": lane.checkpoint(),
                "applied_through": lane.applied_through(),
                "lag_events": lag,
                "held_here": lane.progress.holds.load(Ordering::Relaxed),
            }));
        }
        health(
            reasons,
            json!({ "head_position": head, "partitions": partitions }),
        )
    }
}

fn health(reasons: Vec<String>, mut details: Value) -> Health {
    let ok = reasons.is_empty();
    if let Value::Object(map) = &mut details {
        map.insert(
            "status".into(),
            json!(if ok { "ok" } else { "unavailable" }),
        );
        map.insert("reasons".into(), json!(reasons));
    }
    Health {
        ok,
        body: details.to_string(),
    }
}
