//! The projector against a real PostgreSQL (`DATABASE_URL`). Each test works in a schema of
//! its own, dropped when it ends, so tests run in parallel.

#![allow(unreachable_pub)]

mod cli;
mod cluster;
mod faults;
mod gap;
mod hardening;
mod partition;
mod proxy;
mod repartition;
mod runtime;
mod store;
mod util;
