//! The trait a read model implements.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};

use postgres::Transaction;
use postgres::types::ToSql;

use crate::Error;
use crate::error::BoxError;
use crate::event::{Event, Scope};
use crate::projections::queued::{Queue, QueuedWrite};
use crate::store::registry::{read_model_schema, stored_name};

/// What a projection does with an event that still fails after
/// [`Settings::max_attempts`](crate::Settings::max_attempts) attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PoisonPolicy {
    /// Stop the projection just before the event ([`Error::Projection`]); the default.
    #[default]
    Stop,
    /// Park the event in `projection_dead_letters`, in the transaction that moves the
    /// checkpoint past it, park every later event of its aggregate behind it (in order), and go
    /// on with the other aggregates. [`retry`](crate::retry) applies them once fixed; [`drop_parked`](crate::drop_parked)
    /// discards them.
    Park,
}

impl PoisonPolicy {
    /// `stop` or `park`, as `--on-poison` takes it; `setting` names where the text came from.
    pub fn parse(setting: &str, text: &str) -> Result<PoisonPolicy, Error> {
        match text.trim() {
            "stop" => Ok(PoisonPolicy::Stop),
            "park" => Ok(PoisonPolicy::Park),
            _ => Err(Error::invalid_setting(
                setting,
                text,
                "expected stop (the projection stops just before an event that keeps failing) \
                 or park (the event and the later events of its aggregate are parked in \
                 projection_dead_letters, and the other aggregates go on)",
            )),
        }
    }
}

/// Where an event is being applied (which partition of how many), and the writes its
/// [`apply`](Projection::apply) queued.
#[derive(Debug)]
#[non_exhaustive]
pub struct Context {
    /// The partition key of the worker applying the event.
    pub partition: u32,
    /// The number of partitions the stream is split into.
    pub total_partitions: u32,
    /// The version of the projection applying it ([`Projection::version`]).
    pub version: u32,
    /// Rows queued by `apply` since the last flush.
    queued: RefCell<Queue>,
}

impl Context {
    pub(crate) fn new(partition: u32, total_partitions: u32, version: u32) -> Context {
        Context {
            partition,
            total_partitions,
            version,
            queued: RefCell::new(Queue::default()),
        }
    }

    /// Queues one row of `write` (its values in column order), instead of a statement of its
    /// own: the worker sends the rows of the transaction's events together, one execution per
    /// statement, before it writes the checkpoint, in the same transaction. A transaction
    /// costs a few round trips instead of one per event, with the same guarantees: applied
    /// exactly once, in order per key (see [`QueuedWrite`]); a failure of the sent statement
    /// names its event (the events are applied again one by one, each sending its own rows, to
    /// find it), and an event whose `apply` fails or panics leaves none of its rows.
    ///
    /// The values are encoded at once: one of the wrong type or count for the statement fails
    /// here. Only the worker's transaction sees the rows, after `apply` returns: `apply` must
    /// not read back what it queued.
    ///
    /// ```
    /// use projector::{BoxError, Context, Event, Projection, QueuedWrite};
    /// use projector::postgres::Transaction;
    /// use projector::postgres::types::Type;
    ///
    /// const LAST_SEEN: QueuedWrite = QueuedWrite::new(
    ///     "INSERT INTO last_seen AS l (aggregate_id, position) \
    ///      SELECT * FROM unnest($1::text[], $2::int8[]) \
    ///      ON CONFLICT (aggregate_id) DO UPDATE SET position = EXCLUDED.position",
    ///     &[Type::TEXT_ARRAY, Type::INT8_ARRAY],
    /// )
    /// .keyed_by(1);
    ///
    /// #[derive(Clone)]
    /// struct LastSeen;
    ///
    /// impl Projection for LastSeen {
    ///     fn name(&self) -> &str {
    ///         "last-seen"
    ///     }
    ///
    ///     fn apply(&mut self, _: &mut Transaction<'_>, event: &Event, context: &Context)
    ///         -> Result<(), BoxError> {
    ///         context.queue(&LAST_SEEN, &[&event.aggregate_id, &event.global_position])
    ///     }
    /// }
    /// ```
    pub fn queue(&self, write: &QueuedWrite, row: &[&(dyn ToSql + Sync)]) -> Result<(), BoxError> {
        self.queued.borrow_mut().push(write, row)
    }

    /// Sends the rows queued so far through `tx`.
    pub(crate) fn flush_queued(&self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        self.queued.borrow_mut().flush(tx)
    }

    /// Forgets the rows queued so far (their event failed, or its transaction did).
    pub(crate) fn discard_queued(&self) {
        self.queued.borrow_mut().clear();
    }
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
/// transaction and be repeated after a crash. An error (or a panic) rolls the batch back, and
/// it is tried again with back-off; once one event has failed
/// [`Settings::max_attempts`](crate::Settings::max_attempts) times (3 by default; each event's
/// failures are counted on their own), the runner stops with
/// [`Error::Projection`], the checkpoint left just before the event.
///
/// Every worker gets its own clone of the projection.
pub trait Projection: Clone + Send + 'static {
    /// The projection's name: it keys the checkpoints, so renaming it starts from scratch.
    fn name(&self) -> &str;

    /// The projection's version (default 1). Each version has its own checkpoints, layout,
    /// parked events and states, kept under the name `name@N` from version 2 on (version 1
    /// keeps the plain name, as before versions existed), and its own read model: the
    /// transactions of version `N >= 2` have the schema `<schema>_vN` first in their
    /// `search_path`, so the tables `setup` creates without a schema land there, beside version
    /// 1's. A new version builds beside the live one; `projector promote` moves readers to it
    /// (see the crate docs' *Versions*).
    fn version(&self) -> u32 {
        1
    }

    /// True when applying an event does something outside the read model's transaction
    /// (sends mail, calls a web service), which a rebuild must not do again. A new version of
    /// such a projection starts where the live version's checkpoints are when it is first
    /// started, instead of at the first event (unless told otherwise:
    /// [`Builder::replay_side_effects`](crate::Builder::replay_side_effects)). Default: false.
    fn has_side_effects(&self) -> bool {
        false
    }

    /// The events this projection wants (default: every event). Only events in scope reach
    /// [`apply`](Self::apply); the checkpoint still moves across the others. Projections of
    /// one process that all declare a scope have the filter applied by the server, in the
    /// query that reads the stream (indexes on `(event_type, global_position)` and
    /// `(aggregate_type, global_position)` serve it).
    fn scope(&self) -> Scope {
        Scope::all()
    }

    /// What to do with an event that still fails after the last attempt: stop just before it
    /// (the default), or park it and the later events of its aggregate and go on
    /// ([`PoisonPolicy::Park`]). [`Builder::on_poison`](crate::Builder::on_poison) overrides it
    /// for every projection of a runner.
    fn poison_policy(&self) -> PoisonPolicy {
        PoisonPolicy::Stop
    }

    /// The most events one worker transaction applies while catching up; `None` (the default)
    /// takes [`Settings::max_events_per_transaction`](crate::Settings::max_events_per_transaction).
    /// A set-based [`apply_batch`](Self::apply_batch) that writes each aggregate once per
    /// transaction gains from larger ones (20,000 doubles `aggregate-stats-batch`); a
    /// projection that updates the same row once per event loses (its row versions pile up
    /// until the transaction commits).
    fn events_per_transaction(&self) -> Option<usize> {
        None
    }

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

/// A projection of any type, so that one runner can host projections of different types,
/// named by its stored name (`name@N` from version 2 on), with the version's read-model schema
/// put first in the `search_path` of every transaction that runs its code.
pub(crate) struct AnyProjection {
    inner: Box<dyn DynProjection>,
    stored_name: String,
    /// For a version whose read model has its own schema: that schema, and the statement that
    /// puts it first in a transaction's `search_path`.
    own_schema: Option<(String, String)>,
}

/// Applies `events` one by one through `projection`, each sending the writes it queued
/// (calling `applied` after each), so that a failure names its event: the index of the one
/// that failed, and why (a panic included).
pub(crate) fn apply_each<P: Projection>(
    projection: &mut P,
    tx: &mut Transaction<'_>,
    events: &[Event],
    context: &Context,
    mut applied: impl FnMut(&Event),
) -> Result<(), (Option<usize>, BoxError)> {
    context.discard_queued();
    for (index, event) in events.iter().enumerate() {
        let outcome = match catch_unwind(AssertUnwindSafe(|| projection.apply(tx, event, context)))
        {
            Ok(Ok(())) => context.flush_queued(tx),
            Ok(Err(source)) => Err(source),
            Err(panic) => Err(panic_message(panic).into()),
        };
        if let Err(source) = outcome {
            context.discard_queued();
            return Err((Some(index), source));
        }
        applied(event);
    }
    Ok(())
}

/// What a projection's panic said, as an error message.
pub(crate) fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic payload".to_owned());
    format!("panicked: {message}")
}

/// In `tx`, waits until no other process is running projection `name`'s setup (or reset), and
/// keeps the others out until `tx` ends: processes starting together must not race to create
/// the same read-model tables. The notices of `CREATE ... IF NOT EXISTS` are silenced for `tx`.
pub(crate) fn lock_setup(tx: &mut Transaction<'_>, name: &str) -> Result<(), postgres::Error> {
    tx.execute("SET LOCAL client_min_messages = warning", &[])?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('projector setup ' || $1))",
        &[&name],
    )?;
    Ok(())
}

impl AnyProjection {
    pub(crate) fn new<P: Projection>(projection: P) -> AnyProjection {
        let stored_name = stored_name(projection.name(), projection.version());
        AnyProjection {
            inner: Box::new(projection),
            stored_name,
            own_schema: None,
        }
    }

    /// The projection as it runs over the database's `schema`: a version from 2 on finds and
    /// creates its tables in its own schema first.
    pub(crate) fn over_schema(mut self, schema: &str) -> AnyProjection {
        self.own_schema = read_model_schema(schema, self.inner.version()).map(|own| {
            let search_path = format!("SET LOCAL search_path = \"{own}\", \"{schema}\"");
            (own, search_path)
        });
        self
    }

    /// The name the projection gives itself, without the version.
    pub(crate) fn given_name(&self) -> &str {
        self.inner.name()
    }

    /// Puts the version's schema first in `tx`'s `search_path`, when it has one.
    fn enter_schema(&self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        if let Some((_, search_path)) = &self.own_schema {
            tx.batch_execute(search_path)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for AnyProjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AnyProjection")
            .field(&self.stored_name)
            .finish()
    }
}

/// [`Projection`] without `Clone`, which a trait object cannot have.
trait DynProjection: Send {
    fn name(&self) -> &str;
    fn version(&self) -> u32;
    fn has_side_effects(&self) -> bool;
    fn scope(&self) -> Scope;
    fn poison_policy(&self) -> PoisonPolicy;
    fn events_per_transaction(&self) -> Option<usize>;
    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError>;
    fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError>;
    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError>;
    fn apply_batch(
        &mut self,
        tx: &mut Transaction<'_>,
        events: &[Event],
        context: &Context,
    ) -> Result<(), BoxError>;
    fn clone_boxed(&self) -> Box<dyn DynProjection>;
}

impl<P: Projection> DynProjection for P {
    fn name(&self) -> &str {
        Projection::name(self)
    }
    fn version(&self) -> u32 {
        Projection::version(self)
    }
    fn has_side_effects(&self) -> bool {
        Projection::has_side_effects(self)
    }
    fn scope(&self) -> Scope {
        Projection::scope(self)
    }
    fn poison_policy(&self) -> PoisonPolicy {
        Projection::poison_policy(self)
    }
    fn events_per_transaction(&self) -> Option<usize> {
        Projection::events_per_transaction(self)
    }
    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        Projection::setup(self, tx)
    }
    fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        Projection::reset(self, tx)
    }
    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError> {
        Projection::apply(self, tx, event, context)
    }
    fn apply_batch(
        &mut self,
        tx: &mut Transaction<'_>,
        events: &[Event],
        context: &Context,
    ) -> Result<(), BoxError> {
        Projection::apply_batch(self, tx, events, context)
    }
    fn clone_boxed(&self) -> Box<dyn DynProjection> {
        Box::new(self.clone())
    }
}

impl Clone for AnyProjection {
    fn clone(&self) -> AnyProjection {
        AnyProjection {
            inner: self.inner.clone_boxed(),
            stored_name: self.stored_name.clone(),
            own_schema: self.own_schema.clone(),
        }
    }
}

impl Projection for AnyProjection {
    /// The stored name: `name@N` from version 2 on.
    fn name(&self) -> &str {
        &self.stored_name
    }
    fn version(&self) -> u32 {
        self.inner.version()
    }
    fn has_side_effects(&self) -> bool {
        self.inner.has_side_effects()
    }
    fn scope(&self) -> Scope {
        self.inner.scope()
    }
    fn poison_policy(&self) -> PoisonPolicy {
        self.inner.poison_policy()
    }
    fn events_per_transaction(&self) -> Option<usize> {
        self.inner.events_per_transaction()
    }
    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        if let Some((own, _)) = &self.own_schema {
            tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{own}\""))?;
        }
        self.enter_schema(tx)?;
        self.inner.setup(tx)
    }
    fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        self.enter_schema(tx)?;
        self.inner.reset(tx)
    }
    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError> {
        self.enter_schema(tx)?;
        self.inner.apply(tx, event, context)
    }
    fn apply_batch(
        &mut self,
        tx: &mut Transaction<'_>,
        events: &[Event],
        context: &Context,
    ) -> Result<(), BoxError> {
        self.enter_schema(tx)?;
        self.inner.apply_batch(tx, events, context)
    }
}
