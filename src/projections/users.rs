//! `users`: the demo read model of the users that `projector seed` appends.

use std::cell::Cell;

use log::{debug, info};
use postgres::Transaction;
use postgres::types::Type;
use serde_json::Value;

use crate::error::BoxError;
use crate::event::Event;
use crate::projections::projection::{Context, Projection};
use crate::projections::queued::QueuedWrite;

/// A new user: an insert (a second `UserCreated` of one id fails, as a plain insert would).
const CREATE: QueuedWrite = QueuedWrite::new(
    "INSERT INTO users (id, email, name, version) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[])",
    &[
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::INT8_ARRAY,
    ],
)
.keyed_by(1);

/// One more user created on a partition: counted per partition by the statement itself, so
/// its rows need no key.
const COUNT: QueuedWrite = QueuedWrite::new(
    "INSERT INTO user_partition_counts AS c \
     SELECT t, k, count(*) FROM unnest($1::int4[], $2::int4[]) AS r(t, k) GROUP BY t, k \
     ON CONFLICT (total_partitions, partition_key) DO UPDATE SET users = c.users + EXCLUDED.users",
    &[Type::INT4_ARRAY, Type::INT4_ARRAY],
);

/// A new name (of a user that exists).
const RENAME: QueuedWrite = QueuedWrite::new(
    "UPDATE users AS u SET name = r.name, version = r.version \
     FROM unnest($1::text[], $2::text[], $3::int8[]) AS r(id, name, version) WHERE u.id = r.id",
    &[Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::INT8_ARRAY],
)
.keyed_by(1);

/// A new e-mail address (of a user that exists).
const CHANGE_EMAIL: QueuedWrite = QueuedWrite::new(
    "UPDATE users AS u SET email = r.email, version = r.version \
     FROM unnest($1::text[], $2::text[], $3::int8[]) AS r(id, email, version) WHERE u.id = r.id",
    &[Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::INT8_ARRAY],
)
.keyed_by(1);

/// How many created users a worker logs at info level; the rest go to debug.
const SHOWN_PER_PARTITION: u32 = 3;

thread_local! {
    /// Created users this worker (one thread per partition) has logged so far.
    static SHOWN: Cell<u32> = const { Cell::new(0) };
}

/// Logs which partition created which user: the first few per partition at info, then debug,
/// so that the start, progress and summary lines stay readable.
fn show_created(id: &str, email: &str, name: &str, context: &Context) {
    let (partition, total) = (context.partition, context.total_partitions);
    let shown = SHOWN.with(|shown| shown.replace(shown.get().saturating_add(1)));
    if shown < SHOWN_PER_PARTITION {
        info!("partition {partition}/{total} created user {id} <{email}> '{name}'");
    } else {
        if shown == SHOWN_PER_PARTITION {
            info!(
                "partition {partition}/{total}: more users created; each is logged at debug level \
                 (RUST_LOG=projector=debug)"
            );
        }
        debug!("partition {partition}/{total} created user {id} <{email}> '{name}'");
    }
}

/// The `users` read model: one row per user (id, e-mail, name, version), plus how many users
/// each partition created, in `user_partition_counts`.
///
/// Understands `UserCreated` (`{"email", "name"}`), `UserRenamed` (`{"name"}`) and
/// `UserEmailChanged` (`{"email"}`); other events pass through untouched. Its writes are
/// queued ([`Context::queue`]) and sent together per transaction.
#[derive(Debug, Clone, Copy, Default)]
pub struct Users;

impl Projection for Users {
    fn name(&self) -> &str {
        "users"
    }

    fn setup(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS users (
                 id TEXT PRIMARY KEY,
                 email TEXT NOT NULL,
                 name TEXT NOT NULL,
                 version BIGINT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS user_partition_counts (
                 total_partitions INT NOT NULL,
                 partition_key INT NOT NULL,
                 users BIGINT NOT NULL,
                 PRIMARY KEY (total_partitions, partition_key)
             );",
        )?;
        Ok(())
    }

    fn reset(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute("DELETE FROM users; DELETE FROM user_partition_counts")?;
        Ok(())
    }

    fn apply(
        &mut self,
        _: &mut Transaction<'_>,
        event: &Event,
        context: &Context,
    ) -> Result<(), BoxError> {
        let field = |payload: &Value, name: &str| -> Result<String, BoxError> {
            payload
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| {
                    format!("{} payload has no text field '{name}'", event.event_type).into()
                })
        };
        let payload = || -> Result<Value, BoxError> {
            serde_json::from_slice(&event.payload)
                .map_err(|e| format!("{} payload is not JSON: {e}", event.event_type).into())
        };
        let (id, version) = (&event.aggregate_id, &event.aggregate_version);
        match event.event_type.as_str() {
            "UserCreated" => {
                let payload = payload()?;
                let (email, name) = (field(&payload, "email")?, field(&payload, "name")?);
                context.queue(&CREATE, &[id, &email, &name, version])?;
                let (total, key) = (
                    i32::try_from(context.total_partitions)?,
                    i32::try_from(context.partition)?,
                );
                context.queue(&COUNT, &[&total, &key])?;
                show_created(&event.aggregate_id, &email, &name, context);
            }
            "UserRenamed" => {
                let name = field(&payload()?, "name")?;
                context.queue(&RENAME, &[id, &name, version])?;
            }
            "UserEmailChanged" => {
                let email = field(&payload()?, "email")?;
                context.queue(&CHANGE_EMAIL, &[id, &email, version])?;
            }
            _ => {}
        }
        Ok(())
    }
}
