//! `noop`: applies nothing; only the checkpoints move. For measuring the runtime itself.

use postgres::Transaction;

use crate::error::BoxError;
use crate::event::Event;
use crate::projections::projection::{Context, Projection};

/// A projection that applies nothing: the workers still commit their checkpoints, so a run
/// measures reading, routing and checkpointing alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noop;

impl Projection for Noop {
    fn name(&self) -> &str {
        "noop"
    }

    fn apply(&mut self, _: &mut Transaction<'_>, _: &Event, _: &Context) -> Result<(), BoxError> {
        Ok(())
    }
}
