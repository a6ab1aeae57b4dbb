//! Operations: what an operator asks of projections, running or not.
//!
//! - [`status`]: where each partition's checkpoint stands, which process holds it, and
//!   [`reset`](crate::reset) to rebuild a projection.
//! - [`metrics`]: a runner's figures in the Prometheus text format, read from the engine's
//!   lane figures ([`crate::engine::progress`]) and the database; [`metric_families`] names
//!   and registers them.
//! - [`projection_gauges`]: the gauges of a projection that failed here, or is paused.
//! - [`replica_gauges`]: what the read replica served, and how far behind it was.
//! - [`health`]: liveness and readiness of a runner, for probes.
//! - [`members`]: the processes that share a projection's partitions, for `status`.
//! - [`rewind`]: a projection's checkpoints moved back to a position or a time, its read model
//!   left as it is.
//! - [`version`]: the versions of a projection; [`promote`](crate::promote) and
//!   [`retire`](crate::retire).
//!
//! Operations read the engine's state; the engine never reads them.

pub(crate) mod health;
pub(crate) mod members;
mod metric_families;
pub(crate) mod metrics;
pub(crate) mod projection_gauges;
pub(crate) mod replica_gauges;
pub(crate) mod rewind;
pub(crate) mod status;
pub(crate) mod version;
