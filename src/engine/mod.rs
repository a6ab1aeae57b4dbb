//! The engine: the threads that carry an event from the store to a projection's read model.
//!
//! - [`builder`]: checks a run's settings and prepares each projection's layout and
//!   checkpoints before any thread starts ([`Builder`](crate::Builder)).
//! - [`plan`]: each projection's partitions, layout and checkpoints, as prepared for a run.
//! - [`version`]: a projection's version checked at start, and the readers' views made at a
//!   new version's first start (see [`crate::promote`]).
//! - [`runner`]: starts the threads and joins them ([`Runner`](crate::Runner)).
//! - [`balancer`]: shares the partitions with the other live processes
//!   (`--partition-key auto`).
//! - [`fetcher`]: the one thread that reads the stream, in position order, never past a
//!   position that may still commit (see [`crate::store::gap`]).
//! - [`router`]: hands each event over a bounded channel to the worker of its partition, for
//!   every projection of the runner.
//! - [`straggler`]: a partition far behind steps out of the shared read and reads its own
//!   events until it has caught up.
//! - [`catch_up_read`]: the partitions that start far behind (a new version built beside
//!   the live one) are read for together, once, until they near the shared read.
//! - [`worker`]: one thread per owned partition; applies events and commits them with the
//!   checkpoint in one transaction (its parts: commit, retry, ownership, parking).
//! - [`notice`]: a projection that stops is told to an embedder, and stored when it failed.
//! - [`outage`]: a lost database, retried with capped back-off and logged once.
//! - [`progress`]: what each lane has done, read by the progress log and by
//!   [`crate::ops`] for metrics and health.
//! - [`settings`]: every tunable, with its default ([`Settings`](crate::Settings)).

pub(crate) mod balancer;
pub(crate) mod builder;
pub(crate) mod catch_up_read;
pub(crate) mod fetcher;
pub(crate) mod lane;
pub(crate) mod notice;
pub(crate) mod outage;
pub(crate) mod plan;
pub(crate) mod progress;
pub(crate) mod router;
pub(crate) mod runner;
pub(crate) mod settings;
pub(crate) mod straggler;
pub(crate) mod version;
pub(crate) mod wanted;
pub(crate) mod worker;
