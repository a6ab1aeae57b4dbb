//! The projections the command-line tool offers: `users` and `aggregate-stats`.

mod aggregate_stats;
mod users;

pub use aggregate_stats::AggregateStats;
pub use users::Users;
