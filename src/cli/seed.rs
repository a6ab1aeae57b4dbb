//! `projector seed`: demo users appended through the library's append, thousands of events
//! per transaction.

use std::time::Instant;

use log::info;
use projector::{Appender, Database, Error, ExpectedVersion, NewEvent};
use uuid::Uuid;

use super::args::Seed;

const CONTEXT: &str = "identity";
const AGGREGATE: &str = "User";

/// About how many events one transaction of `seed` appends: a commit per user would cap it at
/// the server's commit rate.
const EVENTS_PER_TRANSACTION: u64 = 5000;

pub(crate) fn seed(database: &Database, seed: &Seed) -> Result<(), Error> {
    let users = count("--users", seed.users.as_deref(), 1000, 100_000_000)?;
    let renames = count("--renames", seed.renames.as_deref(), 1, 1000)?;
    let email_changes = count("--email-changes", seed.email_changes.as_deref(), 1, 1000)?;
    let mut client = database.connect()?;
    super::check_store(&mut client, database)?;
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
    let per_user = 1 + u64::from(renames) + u64::from(email_changes);
    let users_per_transaction = (EVENTS_PER_TRANSACTION / per_user).max(1);
    let appender = Appender::prepare(&mut client)?;
    let started = Instant::now();
    let mut seeded = 0u64;
    while seeded < u64::from(users) {
        let batch = users_per_transaction.min(u64::from(users) - seeded);
        let mut tx = client.transaction().map_err(|source| Error::Database {
            action: "starting to seed".into(),
            source,
        })?;
        for n in seeded..seeded + batch {
            appender.append(
                &mut tx,
                ExpectedVersion::NoStream,
                &user_events(n, renames, email_changes),
            )?;
        }
        tx.commit().map_err(|source| Error::Database {
            action: "committing seeded users".into(),
            source,
        })?;
        let before = seeded;
        seeded += batch;
        if seeded / 10_000 > before / 10_000 {
            info!("seeded {seeded} users ({} events)", seeded * per_user);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let events = seeded * per_user;
    info!(
        "seeded {seeded} users: {events} events in {seconds:.1} s ({:.0} events/s)",
        events as f64 / seconds.max(0.001)
    );
    Ok(())
}

/// The events of demo user number `n`: created, renamed `renames` times, and given
/// `email_changes` new e-mail addresses.
fn user_events(n: u64, renames: u32, email_changes: u32) -> Vec<NewEvent> {
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
    events
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

fn event(id: &str, event_type: &str, payload: serde_json::Value) -> NewEvent {
    NewEvent::new(
        CONTEXT,
        AGGREGATE,
        id,
        event_type,
        payload.to_string().into_bytes(),
    )
}
