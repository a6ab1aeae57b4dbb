//! `projector seed`: demo users appended through the library's append.

use log::info;
use projector::{Database, Error, ExpectedVersion, NewEvent, postgres};
use uuid::Uuid;

use super::args::Seed;

const CONTEXT: &str = "identity";
const AGGREGATE: &str = "User";

pub(crate) fn seed(database: &Database, seed: &Seed) -> Result<(), Error> {
    let users = count("--users", seed.users.as_deref(), 1000, 100_000_000)?;
    let renames = count("--renames", seed.renames.as_deref(), 1, 1000)?;
    let email_changes = count("--email-changes", seed.email_changes.as_deref(), 1, 1000)?;
    let mut client = database.connect()?;
    check_store(&mut client, database)?;
    if seed.if_empty {
        let any = client
            .query_opt("SELECT 1 FROM events LIMIT 1", &[])
            .map_err(|source| Error::Database {
                action: "looking for events (did you run `projector migrate`?)".into(),
                source,
            })?;
        if any.is_some() {
            info!("the store already holds events: seeding nothing");
            return Ok(());
        }
    }
    let mut appended = 0u64;
    for n in 0..users {
        let id = Uuid::new_v4().to_string();
        let mut events = vec![event(
            &id,
            "UserCreated",
            serde_json::json!({ "email": format!("user{n}@example.com"), "name": format!("User {n}") }),
        )];
        for r in 1..=renames {
            events.push(event(
                &id,
                "UserRenamed",
                serde_json::json!({ "name": format!("User {n} ({r})") }),
            ));
        }
        for e in 1..=email_changes {
            events.push(event(
                &id,
                "UserEmailChanged",
                serde_json::json!({ "email": format!("user{n}.{e}@example.com") }),
            ));
        }
        appended += events.len() as u64;
        projector::append(&mut client, ExpectedVersion::NoStream, &events)?;
        if (n + 1) % 10_000 == 0 {
            info!("seeded {} users ({appended} events)", n + 1);
        }
    }
    info!("seeded {users} users: {appended} events");
    Ok(())
}

/// The whole number `flag` was given (`default` when absent), from 0 to `max`.
fn count(flag: &str, text: Option<&str>, default: u32, max: u32) -> Result<u32, Error> {
    let Some(text) = text else {
        return Ok(default);
    };
    match text.trim().parse::<u32>() {
        Ok(value) if value <= max => Ok(value),
        _ => Err(Error::invalid_setting(
            flag,
            text,
            format!("expected a whole number from 0 to {max}"),
        )),
    }
}

/// Fails with [`Error::MissingTables`] (run `projector migrate` first) unless the event store's
/// tables exist.
fn check_store(client: &mut postgres::Client, database: &Database) -> Result<(), Error> {
    let row = client
        .query_one(
            "SELECT to_regclass('events') IS NULL, to_regclass('aggregate_heads') IS NULL",
            &[],
        )
        .map_err(|source| Error::Database {
            action: "looking for the event store".into(),
            source,
        })?;
    let missing: Vec<String> = [("events", row.get(0)), ("aggregate_heads", row.get(1))]
        .into_iter()
        .filter(|&(_, missing)| missing)
        .map(|(table, _)| table.to_owned())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingTables {
            schema: database.schema_name().to_owned(),
            tables: missing,
        })
    }
}

fn event(id: &str, event_type: &str, payload: serde_json::Value) -> NewEvent {
    NewEvent::new(
        CONTEXT,
        AGGREGATE,
        id,
        event_type,
        payload.to_string().into_bytes(),
    )
}
