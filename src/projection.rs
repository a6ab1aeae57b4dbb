//! The trait a read model implements.

use postgres::Transaction;

use crate::error::BoxError;
use crate::event::Event;

/// Where an event is being applied: which partition of how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Context {
    /// The partition key of the worker applying the event.
    pub partition: u32,
    /// The number of partitions the stream is split into.
    pub total_partitions: u32,
}

/// A read model built from the event stream.
///
/// Each worker thread applies the events of its partition, in `global_position` order, inside
/// one database transaction per batch; the same transaction moves the partition's checkpoint.
/// So the read model and the checkpoint commit together or not at all, and an event is applied
/// exactly once however the process stops.
///
/// A handler must not commit or roll back the transaction it is given, and must not write the
/// read model through another connection: such writes would escape the checkpoint's
/// transaction and be repeated after a crash. An error (or a panic) rolls the batch back; the
/// batch is tried [`Settings::max_attempts`](crate::Settings::max_attempts) times in all (3
/// attempts by default), with back-off in between, then the runner stops with
/// [`Error::Projection`](crate::Error::Projection), the checkpoint left just before the event.
///
/// Every worker gets its own clone of the projection.
pub trait Projection: Clone + Send + 'static {
    /// The projection's name: it keys the checkpoints, so renaming it starts from scratch.
    fn name(&self) -> &str;

    /// Prepares the read model (for example `CREATE TABLE IF NOT EXISTS`). Called once when a
    /// runner starts, in its own transaction, before any event is applied.
    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        let _ = tx;
        Ok(())
    }

    /// Clears the read model, for [`reset`](crate::reset) (`projector reset`): called after
    /// [`setup`](Self::setup), in the transaction that deletes the projection's checkpoints,
    /// so that the projection rebuilds from the first event. The default does nothing: the
    /// read model is left as it is, and rebuilding applies every event again on top of it.
    fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        let _ = tx;
        Ok(())
    }

    /// Applies one event to the read model, through `tx`.
    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError>;

    /// Applies several events of one partition, in position order, through `tx`. The default
    /// calls [`apply`](Self::apply) for each; override it to prepare statements once per batch
    /// or to write the read model set-based.
    ///
    /// If it fails, the transaction is rolled back and the same events are applied again one
    /// by one through `apply`, so that a persistent failure names its event. The two must
    /// therefore have the same effect.
    fn apply_batch(
        &mut self,
        tx: &mut Transaction<'_>,
        events: &[Event],
        context: &Context,
    ) -> Result<(), BoxError> {
        for event in events {
            self.apply(tx, event, context)?;
        }
        Ok(())
    }
}
