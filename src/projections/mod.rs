//! The projections the command-line tool offers: `users`, `aggregate-stats` and `noop`.

mod aggregate_stats;
mod noop;
mod users;

pub use aggregate_stats::AggregateStats;
pub use noop::Noop;
pub use users::Users;
