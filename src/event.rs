//! Events as stored in the `events` table, and events about to be appended.

use std::time::SystemTime;

use uuid::Uuid;

/// A stored event, as a projection receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Position in the whole store; increases with every append.
    pub global_position: i64,
    /// The bounded context the aggregate lives in.
    pub bounded_context: String,
    /// The aggregate's type.
    pub aggregate_type: String,
    /// The aggregate's id: it decides the event's partition.
    pub aggregate_id: String,
    /// The aggregate's version after this event (1 for its first event).
    pub aggregate_version: i64,
    /// Unique id of the event.
    pub event_id: Uuid,
    /// The event's type, such as `UserCreated`.
    pub event_type: String,
    /// Version of the event type's schema.
    pub event_version: i32,
    /// The payload, as written (often JSON).
    pub payload: Vec<u8>,
    /// Optional trace id.
    pub trace_id: Option<String>,
    /// Optional correlation id.
    pub correlation_id: Option<String>,
    /// Optional causation id.
    pub causation_id: Option<String>,
    /// Optional metadata, as JSON text.
    pub metadata: Option<String>,
    /// When the event was stored.
    pub created_at: SystemTime,
}

/// An event to append; the store adds position, aggregate version and time.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The bounded context the aggregate lives in.
    pub bounded_context: String,
    /// The aggregate's type.
    pub aggregate_type: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// Unique id of the event.
    pub event_id: Uuid,
    /// The event's type.
    pub event_type: String,
    /// Version of the event type's schema.
    pub event_version: i32,
    /// The payload.
    pub payload: Vec<u8>,
    /// Optional trace id.
    pub trace_id: Option<String>,
    /// Optional correlation id.
    pub correlation_id: Option<String>,
    /// Optional causation id.
    pub causation_id: Option<String>,
    /// Optional metadata, as JSON text.
    pub metadata: Option<String>,
}

impl NewEvent {
    /// An event of `event_type` for one aggregate, with a fresh id, schema version 1 and no
    /// trace, correlation, causation or metadata.
    pub fn new(
        bounded_context: impl Into<String>,
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> NewEvent {
        NewEvent {
            bounded_context: bounded_context.into(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_id: Uuid::new_v4(),
            event_type: event_type.into(),
            event_version: 1,
            payload: payload.into(),
            trace_id: None,
            correlation_id: None,
            causation_id: None,
            metadata: None,
        }
    }
}

/// What an append expects of the aggregate's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the current version is.
    Any,
    /// The aggregate must have no events yet.
    NoStream,
    /// The aggregate must be at exactly this version.
    Exact(i64),
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(version) => write!(f, "version {version}"),
        }
    }
}

/// The events a projection wants, by bounded context, aggregate type and event type; see
/// [`Projection::scope`](crate::Projection::scope).
///
/// An event is in scope when it matches every list that is not empty: `Scope::all()` (every
/// list empty) takes every event. The filter is applied in the query that reads the stream, so
/// the events a process's projections do not want are never sent by the server.
///
/// ```
/// use projector::Scope;
/// let orders = Scope::all()
///     .aggregate_types(["Order"])
///     .event_types(["OrderPlaced", "OrderCancelled"]);
/// assert!(!orders.is_all());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    bounded_contexts: Vec<String>,
    aggregate_types: Vec<String>,
    event_types: Vec<String>,
}

impl Scope {
    /// Every event.
    pub fn all() -> Scope {
        Scope::default()
    }

    /// Only events of these bounded contexts.
    pub fn bounded_contexts<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.bounded_contexts = names.into_iter().map(Into::into).collect();
        self
    }

    /// Only events of aggregates of these types.
    pub fn aggregate_types<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.aggregate_types = names.into_iter().map(Into::into).collect();
        self
    }

    /// Only events of these types.
    pub fn event_types<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.event_types = names.into_iter().map(Into::into).collect();
        self
    }

    /// True when the scope takes every event.
    pub fn is_all(&self) -> bool {
        self.bounded_contexts.is_empty()
            && self.aggregate_types.is_empty()
            && self.event_types.is_empty()
    }

    /// True when `event` is in the scope.
    pub fn contains(&self, event: &Event) -> bool {
        let wants =
            |names: &[String], value: &str| names.is_empty() || names.iter().any(|n| n == value);
        wants(&self.bounded_contexts, &event.bounded_context)
            && wants(&self.aggregate_types, &event.aggregate_type)
            && wants(&self.event_types, &event.event_type)
    }

    /// The lists that are not empty, as `(column, names)`.
    pub(crate) fn conditions(&self) -> impl Iterator<Item = (&'static str, &[String])> {
        [
            ("bounded_context", &self.bounded_contexts[..]),
            ("aggregate_type", &self.aggregate_types[..]),
            ("event_type", &self.event_types[..]),
        ]
        .into_iter()
        .filter(|(_, names)| !names.is_empty())
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_all() {
            return f.write_str("every event");
        }
        let parts: Vec<String> = self
            .conditions()
            .map(|(column, names)| format!("{column} in ({})", names.join(", ")))
            .collect();
        f.write_str(&parts.join(" and "))
    }
}
