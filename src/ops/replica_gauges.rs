//! The read replica's figures on `/metrics` (`--read-replica-url`): events it served, how far
//! behind it was, and whether the fetcher reads from it now. Absent without a replica.

use std::sync::atomic::Ordering;

use prometheus::{IntCounter, IntGauge, Registry};

use crate::store::replica::ReplicaFigures;

pub(crate) struct ReplicaGauges {
    events_read: IntCounter,
    lag_bytes: IntGauge,
    in_use: IntGauge,
}

impl ReplicaGauges {
    /// The gauges, registered in `registry`.
    pub(crate) fn new(registry: &Registry) -> Result<ReplicaGauges, prometheus::Error> {
        let gauges = ReplicaGauges {
            events_read: IntCounter::new(
                "projector_replica_events_read_total",
                "Events the fetcher read from the read replica instead of the primary.",
            )?,
            lag_bytes: IntGauge::new(
                "projector_replica_lag_bytes",
                "Bytes of the primary's WAL the read replica had still to replay, at the fetcher's last look, up to where the stream is settled; 0 when it had replayed them.",
            )?,
            in_use: IntGauge::new(
                "projector_replica_in_use",
                "1 while the fetcher reads from the read replica (far from the head), 0 while it reads from the primary.",
            )?,
        };
        registry.register(Box::new(gauges.events_read.clone()))?;
        registry.register(Box::new(gauges.lag_bytes.clone()))?;
        registry.register(Box::new(gauges.in_use.clone()))?;
        Ok(gauges)
    }

    /// Sets the gauges from `figures`; `counted` is what the counter shows already.
    pub(crate) fn set(&self, figures: &ReplicaFigures, counted: &mut u64) {
        let read = figures.events_read.load(Ordering::Relaxed);
        if read > *counted {
            self.events_read.inc_by(read - *counted);
            *counted = read;
        }
        self.lag_bytes
            .set(figures.lag_bytes.load(Ordering::Relaxed));
        self.in_use
            .set(i64::from(figures.in_use.load(Ordering::Relaxed)));
    }
}
