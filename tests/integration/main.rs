//! The projector against a real PostgreSQL (`DATABASE_URL`). Each test works in a schema of
//! its own, dropped when it ends, so tests run in parallel; tests that restart or cut off a
//! server start a private one (`cluster`, `proxy`).

#![allow(unreachable_pub)]

mod append_command;
mod backlog;
mod catch_up_read;
mod cli;
mod cluster;
mod connection;
mod dead_letters;
mod faults;
mod gap;
mod hardening;
mod hostile;
mod locks;
mod newcomer;
mod operations;
mod operator;
mod outages;
mod partition;
mod poison;
mod probes;
mod projection_state;
mod proxy;
mod pupsourcing;
mod queued_writes;
mod repartition;
mod repartition_command;
mod replica;
mod rewind;
mod run_all;
mod runtime;
mod several_projections;
mod shape;
mod sharing;
mod sql_projection;
mod status;
mod stopping;
mod store;
mod store_shape;
mod util;
mod version_operations;
mod versions;
mod wait;
