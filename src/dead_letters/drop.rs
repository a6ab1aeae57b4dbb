//! Parked events discarded without being applied, and the record kept of each drop in
//! `projection_dead_letter_drops`.

use std::time::SystemTime;

use log::warn;
use postgres::Client;

use super::{describe_positions, lock_partition_of, parked_aggregates_named, released_meanwhile};
use crate::Error;

/// What [`drop_parked`] discarded, and who did it, as recorded in
/// `projection_dead_letter_drops`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Dropped {
    /// The positions of the discarded events, in order.
    pub positions: Vec<i64>,
    /// The database role that dropped them (`current_user`).
    pub database_user: String,
    /// The address of the dropping client as the server saw it; `None` over a Unix socket.
    pub client_address: Option<String>,
    /// The OS user of the process that dropped them (`USER` or `LOGNAME`), if known.
    pub os_user: Option<String>,
    /// When, by the server's clock.
    pub at: SystemTime,
    /// The id of the drop's row in `projection_dead_letter_drops`.
    pub record: i64,
}

/// Discards the parked events of `aggregate_id` in `projection` without applying them, and
/// releases the aggregate: its later events are applied as usual. Records who dropped what and
/// when in `projection_dead_letter_drops`, in the same transaction (the deleted rows, the
/// database role, the client's address and `application_name`, and the OS user), and logs it
/// at warn. Safe while the projection runs (it locks the aggregate's checkpoint row, as
/// [`retry`](crate::retry) does). Fails with [`Error::InvalidSetting`] when nothing of it is parked, and
/// with [`Error::MissingTables`], dropping nothing, until `migrate` has created the record.
pub fn drop_parked(
    client: &mut Client,
    projection: &str,
    aggregate_id: &str,
) -> Result<Dropped, Error> {
    let schema = crate::store::check_tables_here(client)?;
    crate::store::migration::check_table(
        client,
        &schema,
        &crate::store::migration::DEAD_LETTER_DROPS,
    )?;
    parked_aggregates_named(client, projection, Some(aggregate_id))?;
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting to drop parked events"))?;
    lock_partition_of(&mut tx, projection, aggregate_id)?;
    let os_user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()));
    let Some(row) = tx
        .query_opt(
            "WITH deleted AS ( \
                 DELETE FROM projection_dead_letters WHERE projection = $1 AND aggregate_id = $2 \
                 RETURNING * \
             ) \
             INSERT INTO projection_dead_letter_drops (projection, aggregate_id, event_count, \
                 positions, dead_letters, database_user, client_address, application_name, \
                 os_user) \
             SELECT $1, $2, COUNT(*), \
                 array_agg(global_position ORDER BY global_position), \
                 jsonb_agg(jsonb_build_object('global_position', global_position, \
                     'bounded_context', bounded_context, 'aggregate_type', aggregate_type, \
                     'event_type', event_type, 'error', error, 'attempts', attempts, \
                     'first_failed_at', first_failed_at, 'last_failed_at', last_failed_at) \
                     ORDER BY global_position), \
                 current_user, host(inet_client_addr()), \
                 NULLIF(current_setting('application_name'), ''), $3 \
             FROM deleted HAVING COUNT(*) > 0 \
             RETURNING positions, database_user, client_address, dropped_at, id, \
                 to_char(dropped_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
            &[&projection, &aggregate_id, &os_user],
        )
        .map_err(Error::database(
            "deleting the parked events and recording the drop",
        ))?
    else {
        // A retry or drop running at the same time got there first: nothing to drop, nothing
        // to record.
        return Err(released_meanwhile(aggregate_id));
    };
    tx.commit()
        .map_err(Error::database("committing the drop"))?;
    let dropped = Dropped {
        positions: row.get(0),
        database_user: row.get(1),
        client_address: row.get(2),
        os_user,
        at: row.get(3),
        record: row.get(4),
    };
    let at: String = row.get(5);
    warn!(
        "projection '{projection}': dropped the {} parked event(s) of aggregate '{}' (global \
         positions {}) without applying them, by database user '{}' (OS user '{}') at {at} \
         (server clock), recorded in projection_dead_letter_drops with id {}; the aggregate is \
         released",
        dropped.positions.len(),
        aggregate_id.escape_debug(),
        describe_positions(&dropped.positions),
        dropped.database_user,
        dropped.os_user.as_deref().unwrap_or("unknown"),
        dropped.record
    );
    Ok(dropped)
}
