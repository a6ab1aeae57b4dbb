//! The projector against a real PostgreSQL (`DATABASE_URL`). Each test works in a schema of
//! its own, dropped when it ends, so tests run in parallel.

#![allow(unreachable_pub)]

mod cli;
mod connection;
mod gap;
mod hardening;
mod hostile;
mod newcomer;
mod partition;
mod pupsourcing;
mod repartition;
mod repartition_command;
mod runtime;
mod store;
mod store_shape;
mod util;
