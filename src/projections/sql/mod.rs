//! Projections written in SQL alone: one file with a header and named sections.
//!
//! ```sql
//! -- projection: running-totals
//! -- scope: event_types = Deposited, Withdrawn; aggregate_types = Account
//! -- on-poison: park
//! -- setup
//! CREATE TABLE IF NOT EXISTS running_totals (...);
//! -- apply
//! INSERT INTO running_totals SELECT ... FROM batch ...;
//! -- reset
//! TRUNCATE running_totals;
//! ```
//!
//! The `apply` section runs once per worker transaction over the relation `batch`: the
//! transaction's events of the partition, loaded by binary `COPY` into a temporary table of
//! the worker's connection.

use std::sync::Arc;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::error::SqlState;
use postgres::types::{ToSql, Type};
use postgres::{Client, Transaction};

use crate::error::{BoxError, is_connection_loss};
use crate::event::{Event, Scope};
use crate::projections::projection::PoisonPolicy;
use crate::projections::projection::{Context, Projection, lock_setup};
use crate::store::registry::{enter_version_schema, stored_name};
use crate::{Error, error_chain};

mod file;

use file::{Section, SqlFile};

/// A projection defined by a SQL file: see `docs/sql-projections.md`.
///
/// Parse one with [`SqlProjection::from_file`] or [`SqlProjection::parse`], then add it to a
/// [`Builder`](crate::Builder) like any other projection. Clones share the parsed file.
#[derive(Debug, Clone)]
pub struct SqlProjection {
    file: Arc<SqlFile>,
}

/// Creates, when this connection does not have them yet, the table the batch is copied into,
/// the function that reads a payload as `jsonb` and the view `batch` over both; then empties
/// the table (an event-by-event retry applies several times in one transaction). All are
/// temporary: they belong to the connection, and vanish with a transaction that rolls back
/// after creating them, hence the check every time.
///
/// The server alone decides what `jsonb` takes (a lone surrogate escape, a number past
/// `numeric`'s range, a `\u0000` escape, nesting past its stack are refused, and may differ
/// between versions): `projector_jsonb` casts, and gives NULL for what the cast refuses. Its
/// cost (about a microsecond per event read, a subtransaction each) is paid only by sections
/// that read `payload_json`.
const PREPARE_BATCH: &str = "DO $$BEGIN
IF to_regclass('pg_temp.projector_batch_rows') IS NULL THEN
    CREATE FUNCTION pg_temp.projector_jsonb(payload TEXT) RETURNS jsonb
        LANGUAGE plpgsql IMMUTABLE STRICT AS $f$
        BEGIN
            RETURN payload::jsonb;
        EXCEPTION WHEN data_exception OR program_limit_exceeded THEN
            RETURN NULL;
        END $f$;
    CREATE TEMP TABLE projector_batch_rows (
        global_position BIGINT, bounded_context TEXT, aggregate_type TEXT, aggregate_id TEXT,
        aggregate_version BIGINT, event_id UUID, event_type TEXT, event_version INT,
        payload BYTEA, trace_id TEXT, correlation_id TEXT, causation_id TEXT, metadata TEXT,
        created_at TIMESTAMPTZ, payload_json TEXT, partition INT, total_partitions INT
    ) ON COMMIT DELETE ROWS;
    CREATE TEMP VIEW batch AS SELECT global_position, bounded_context, aggregate_type,
        aggregate_id, aggregate_version, event_id, event_type, event_version, payload, trace_id,
        correlation_id, causation_id, metadata::jsonb AS metadata, created_at,
        pg_temp.projector_jsonb(payload_json) AS payload_json, partition, total_partitions
    FROM pg_temp.projector_batch_rows;
END IF;
END$$;
DELETE FROM pg_temp.projector_batch_rows";

const COPY_BATCH: &str = "COPY pg_temp.projector_batch_rows FROM STDIN (FORMAT binary)";

/// The column types of `projector_batch_rows`, in order.
const COLUMN_TYPES: [Type; 17] = [
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::UUID,
    Type::TEXT,
    Type::INT4,
    Type::BYTEA,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::INT4,
    Type::INT4,
];

impl SqlProjection {
    /// The file's path, as given.
    pub fn path(&self) -> &str {
        &self.file.path
    }

    /// True when the file has a `-- reset` section.
    pub fn has_reset(&self) -> bool {
        self.file.reset.is_some()
    }

    /// Runs the `setup` section, then the `apply` section over an empty `batch`, in a
    /// transaction rolled back whatever happens: a syntax error, an unknown table or column is
    /// reported as [`Error::SqlProjectionFile`] before anything is created or applied.
    pub fn check(&self, client: &mut Client) -> Result<(), Error> {
        let mut tx = client
            .transaction()
            .map_err(Error::database("starting to check a projection file"))?;
        let name = stored_name(&self.file.name, self.file.version);
        lock_setup(&mut tx, &name)
            .map_err(Error::database("waiting for other processes' setup"))?;
        enter_version_schema(&mut tx, self.file.version)
            .map_err(Error::database("entering the version's schema"))?;
        self.set_up(&mut tx)
        // Dropping the transaction rolls it back.
    }

    /// The `setup` section, then a trial of `apply` on an empty batch, rolled back.
    fn set_up(&self, tx: &mut Transaction<'_>) -> Result<(), Error> {
        if let Some(setup) = &self.file.setup {
            tx.batch_execute(&setup.sql)
                .map_err(|error| self.refused(setup, error))?;
        }
        let mut trial = tx.transaction().map_err(|error| {
            self.ended_transaction(self.file.setup.as_ref(), error, "starting a trial of apply")
        })?;
        trial
            .batch_execute(PREPARE_BATCH)
            .map_err(Error::database("creating the temporary relation `batch`"))?;
        let apply = &self.file.apply;
        trial
            .batch_execute(&apply.sql)
            .map_err(|error| self.refused(apply, error))?;
        trial.rollback().map_err(|error| {
            self.ended_transaction(Some(apply), error, "rolling back the trial of apply")
        })
    }

    /// `error` from `action`: a section that ended the transaction it runs in (`COMMIT`,
    /// `ROLLBACK`) is the file's fault, and says so; anything else is a database error.
    fn ended_transaction(
        &self,
        section: Option<&Section>,
        error: postgres::Error,
        action: &str,
    ) -> Error {
        match section {
            Some(section) if error.code() == Some(&SqlState::NO_ACTIVE_SQL_TRANSACTION) => {
                Error::SqlProjectionFile {
                    file: self.file.path.clone(),
                    section: Some(section.name.to_owned()),
                    line: Some(section.first_line - 1),
                    reason: "it ends the transaction it runs in (COMMIT, ROLLBACK or END): \
                             remove that statement; each batch is applied in the worker's own \
                             transaction, the one that also moves the checkpoint"
                        .into(),
                }
            }
            _ => Error::Database {
                action: action.to_owned(),
                source: error,
            },
        }
    }

    /// The error for `section`, refused by the database with `error` while checked or run
    /// without events; a lost connection is not the file's fault, and stays a database error.
    fn refused(&self, section: &Section, error: postgres::Error) -> Error {
        self.refused_because(section, error, |message| {
            format!("the database refused it: {message}; fix the section and try again")
        })
    }

    /// The error for the `apply` section, refused by the database with `error` over `events`:
    /// the section passed its trial on an empty batch, so the events' data may be at fault as
    /// much as the section; the events are named (one, when the worker retries it alone).
    fn refused_applying(&self, events: &[Event], error: postgres::Error) -> Error {
        let refused = match events {
            [event] => format!(
                "the database refused the event at global position {} (aggregate '{}', event \
                 type '{}')",
                event.global_position, event.aggregate_id, event.event_type
            ),
            [first, .., last] => format!(
                "the database refused the batch of {} events at global positions {} to {}",
                events.len(),
                first.global_position,
                last.global_position
            ),
            [] => "the database refused it".to_owned(),
        };
        self.refused_because(&self.file.apply, error, |message| {
            format!(
                "{refused}: {message}; the event's data or the section may be at fault: fix the \
                 section, or set the event aside (`-- on-poison: park`, then `projector \
                 dead-letters`)"
            )
        })
    }

    /// `section`'s error, with `reason` made from the database's message (a lost connection
    /// stays a database error).
    fn refused_because(
        &self,
        section: &Section,
        error: postgres::Error,
        reason: impl FnOnce(&str) -> String,
    ) -> Error {
        if is_connection_loss(&error) {
            return Error::Database {
                action: format!(
                    "running the {} section of '{}'",
                    section.name, self.file.path
                ),
                source: error,
            };
        }
        let (line, message) = match error.as_db_error() {
            Some(db) => {
                let line = match db.position() {
                    Some(postgres::error::ErrorPosition::Original(at)) => {
                        let before = section.sql.chars().take((*at as usize).saturating_sub(1));
                        Some(section.first_line + before.filter(|&c| c == '\n').count())
                    }
                    _ => None,
                };
                let mut message = db.message().to_owned();
                if let Some(detail) = db.detail() {
                    message.push_str(&format!(" ({detail})"));
                }
                if let Some(hint) = db.hint() {
                    message.push_str(&format!("; hint: {hint}"));
                }
                (line, format!("{message} [SQLSTATE {}]", db.code().code()))
            }
            None => (None, error_chain(&error)),
        };
        Error::SqlProjectionFile {
            file: self.file.path.clone(),
            section: Some(section.name.to_owned()),
            line: line.or(Some(section.first_line - 1)),
            reason: reason(&message),
        }
    }

    /// Copies `events` into `batch`, then runs the `apply` section.
    fn apply_events(
        &self,
        tx: &mut Transaction<'_>,
        events: &[Event],
        context: &Context,
    ) -> Result<(), BoxError> {
        tx.batch_execute(PREPARE_BATCH)?;
        let partition = context.partition as i32;
        let total = context.total_partitions as i32;
        let mut writer = BinaryCopyInWriter::new(tx.copy_in(COPY_BATCH)?, &COLUMN_TYPES);
        for event in events {
            let payload_json = json_text(&event.payload);
            let row: [&(dyn ToSql + Sync); 17] = [
                &event.global_position,
                &event.bounded_context,
                &event.aggregate_type,
                &event.aggregate_id,
                &event.aggregate_version,
                &event.event_id,
                &event.event_type,
                &event.event_version,
                &event.payload,
                &event.trace_id,
                &event.correlation_id,
                &event.causation_id,
                &event.metadata,
                &event.created_at,
                &payload_json,
                &partition,
                &total,
            ];
            writer.write(&row)?;
        }
        writer.finish()?;
        tx.batch_execute(&self.file.apply.sql).map_err(|error| {
            match self.refused_applying(events, error) {
                // The driver's error, which the worker retries on a new connection.
                Error::Database { source, .. } => Box::new(source) as BoxError,
                refused => Box::new(refused),
            }
        })
    }
}

/// The payload as text, for the server to read as `jsonb` (see [`PREPARE_BATCH`]), when it
/// can be text at all: UTF-8 without a NUL byte (which `text` cannot hold). Else `None`.
fn json_text(payload: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(payload).ok()?;
    (!text.contains('\0')).then_some(text)
}

impl Projection for SqlProjection {
    fn name(&self) -> &str {
        &self.file.name
    }

    /// Each aggregate is written once per transaction: larger ones while catching up mean
    /// fewer writes of the same rows.
    fn events_per_transaction(&self) -> Option<usize> {
        Some(20_000)
    }

    fn scope(&self) -> Scope {
        self.file.scope.clone()
    }

    fn poison_policy(&self) -> PoisonPolicy {
        self.file.poison
    }

    fn version(&self) -> u32 {
        self.file.version
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        self.set_up(tx)
            .map_err(|error| -> BoxError { Box::new(error) })
    }

    fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        match &self.file.reset {
            Some(reset) => tx
                .batch_execute(&reset.sql)
                .map_err(|error| -> BoxError { Box::new(self.refused(reset, error)) }),
            None => Ok(()),
        }
    }

    fn apply(
        &mut self,
        tx: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError> {
        self.apply_events(tx, std::slice::from_ref(event), context)
    }

    fn apply_batch(
        &mut self,
        tx: &mut Transaction<'_>,
        events: &[Event],
        context: &Context,
    ) -> Result<(), BoxError> {
        self.apply_events(tx, events, context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_goes_to_the_server_as_text_when_it_can_be_text() {
        assert_eq!(json_text(br#"{"n": 1}"#), Some(r#"{"n": 1}"#));
        // The server decides what jsonb takes.
        assert_eq!(json_text(br#""\ud83d""#), Some(r#""\ud83d""#));
        assert_eq!(json_text(b"not json"), Some("not json"));
        assert_eq!(json_text(&[0xff, 0xfe]), None);
        assert_eq!(json_text(b"{\"s\": \"a\0b\"}"), None);
    }
}
