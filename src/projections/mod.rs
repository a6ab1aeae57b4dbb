//! The projections the command-line tool offers: `users`, `aggregate-stats`,
//! `aggregate-stats-batch` and `noop`.

mod aggregate_stats;
mod noop;
mod users;

pub use aggregate_stats::{AggregateStats, AggregateStatsBatch};
pub use noop::Noop;
pub use users::Users;
