//! The projection-wide state gauges of `/metrics`: whether a projection of the runner failed
//! here, and whether it is paused (as its workers last read it).

use prometheus::{IntGaugeVec, Opts, Registry};

use crate::engine::lane::LaneState;
use crate::engine::runner::Figures;

pub(crate) struct ProjectionGauges {
    failed: IntGaugeVec,
    paused: IntGaugeVec,
}

impl ProjectionGauges {
    /// The gauges, registered in `registry`.
    pub(crate) fn new(registry: &Registry) -> Result<ProjectionGauges, prometheus::Error> {
        let gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["projection"]);
        let gauges = ProjectionGauges {
            failed: gauge(
                "projector_projection_failed",
                "1 once a partition of the projection stopped on an error in this process (an event that kept failing, a park storm, a fencing, the database given up on); `projector status` shows it as FAILED.",
            )?,
            paused: gauge(
                "projector_projection_paused",
                "1 while the projection is paused (`projector pause`), as its workers last read it (at most a second old while they run).",
            )?,
        };
        registry.register(Box::new(gauges.failed.clone()))?;
        registry.register(Box::new(gauges.paused.clone()))?;
        Ok(gauges)
    }

    /// Sets both gauges of every projection of the runner from its figures.
    pub(crate) fn set(&self, figures: &Figures) {
        for pause in &figures.pauses {
            let name = pause.projection();
            let failed = figures.lanes.iter().any(|lane| {
                lane.projection == name
                    && matches!(lane.state(), LaneState::Failed | LaneState::Fenced)
            });
            self.failed
                .with_label_values(&[name])
                .set(i64::from(failed));
            self.paused
                .with_label_values(&[name])
                .set(i64::from(pause.paused()));
        }
    }
}
