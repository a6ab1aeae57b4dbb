//! The projections the command-line tool offers: `users`, `aggregate-stats`,
//! `aggregate-stats-batch` and `noop`; and [`SqlProjection`], a projection written in SQL.
//!
//! Each is a [`Projection`](crate::Projection) a service can run too, alone or beside its own,
//! on one read of the stream:
//!
//! ```no_run
//! use projector::projections::{AggregateStats, SqlProjection};
//! use projector::{Builder, Database};
//!
//! # fn main() -> Result<(), projector::Error> {
//! let database = Database::new("postgres://app@localhost/app")?;
//! let totals = SqlProjection::from_file("examples/sql/running_totals.sql")?;
//! let runner = Builder::new(database, AggregateStats)
//!     .projection(totals)
//!     .share_partitions(true) // with the other live processes running these projections
//!     .total_partitions(12)
//!     .start()?;
//! runner.join()?;
//! # Ok(())
//! # }
//! ```

mod aggregate_stats;
mod noop;
pub(crate) mod projection;
pub(crate) mod queued;
mod sql;
mod users;

pub use aggregate_stats::{AggregateStats, AggregateStatsBatch};
pub use noop::Noop;
pub use sql::SqlProjection;
pub use users::Users;
