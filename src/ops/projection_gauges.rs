//! The projection-wide state gauges of `/metrics`: whether a projection of the runner failed
//! (here, or as stored by any process) and whether it is paused, as a scrape reads them from
//! `projector_projection_states` (see [`crate::store::state`]).

use prometheus::{IntGaugeVec, Opts, Registry};

use crate::engine::lane::LaneState;
use crate::engine::runner::Figures;
use crate::store::registry::version_label;
use crate::store::state::{ProjectionState, StateKind};

pub(crate) struct ProjectionGauges {
    failed: IntGaugeVec,
    paused: IntGaugeVec,
}

impl ProjectionGauges {
    /// The gauges, registered in `registry`.
    pub(crate) fn new(registry: &Registry) -> Result<ProjectionGauges, prometheus::Error> {
        let gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["projection", "version"])
        };
        let gauges = ProjectionGauges {
            failed: gauge(
                "projector_projection_failed",
                "1 while the projection is stored as failed (`projector status` shows FAILED: it stopped on an event, a park storm, a fencing or the database given up on, until a successful start), or once a partition of it failed in this process.",
            )?,
            paused: gauge(
                "projector_projection_paused",
                "1 while the projection is paused (`projector pause`): its processes hold their partitions and apply nothing until `projector resume`.",
            )?,
        };
        registry.register(Box::new(gauges.failed.clone()))?;
        registry.register(Box::new(gauges.paused.clone()))?;
        Ok(gauges)
    }

    /// Sets both gauges of every projection of the runner from the stored `states` and the
    /// lanes' figures.
    pub(crate) fn set(&self, figures: &Figures, states: &[ProjectionState]) {
        let stored = |name: &str, kind: StateKind| {
            states
                .iter()
                .any(|state| state.projection == name && state.state == kind)
        };
        let mut names: Vec<&str> = figures
            .lanes
            .iter()
            .map(|lane| lane.projection.as_str())
            .collect();
        names.dedup();
        for name in names {
            let failed = stored(name, StateKind::Failed)
                || figures.lanes.iter().any(|lane| {
                    lane.projection == name
                        && matches!(lane.state(), LaneState::Failed | LaneState::Fenced)
                });
            let version = version_label(name);
            self.failed
                .with_label_values(&[name, &version])
                .set(i64::from(failed));
            self.paused
                .with_label_values(&[name, &version])
                .set(i64::from(stored(name, StateKind::Paused)));
        }
    }
}
