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
