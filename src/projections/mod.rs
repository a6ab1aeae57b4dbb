//! The projections the command-line tool offers: `users`, `aggregate-stats`,
//! `aggregate-stats-batch` and `noop`; and [`SqlProjection`], a projection written in SQL.

mod aggregate_stats;
mod noop;
pub(crate) mod projection;
mod sql;
mod users;

pub use aggregate_stats::{AggregateStats, AggregateStatsBatch};
pub use noop::Noop;
pub use sql::SqlProjection;
pub use users::Users;
