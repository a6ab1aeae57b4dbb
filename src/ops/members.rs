//! The processes that share a projection's partitions (`--partition-key auto`,
//! [`Builder::share_partitions`](crate::Builder::share_partitions)), as `projector status`
//! lists them: read from the member locks their balancers hold (see
//! [`crate::engine::balancer`]).

use std::time::Duration;

use postgres::GenericClient;

use crate::Error;
use crate::layout::checkpoint::lock_class;

/// A live process sharing a projection's partitions.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Member {
    /// The projection.
    pub projection: String,
    /// The server process id of the member's balancer connection (its rank among the members
    /// follows it).
    pub pid: i32,
    /// That connection's `application_name` (`projector pid P`, P the projector's own pid),
    /// when the server shows it.
    pub application: Option<String>,
    /// That connection's client end (`ADDRESS:PORT`, or `local socket`), when the server shows
    /// it.
    pub client: Option<String>,
    /// How long ago the member joined (its connection started), when the server shows it.
    pub joined: Option<Duration>,
    /// How long ago the member last looked at its share (it does every
    /// [`Settings::balance_interval`](crate::Settings::balance_interval)), when the server
    /// shows it.
    pub last_seen: Option<Duration>,
}

/// The live members of every projection that has checkpoints here (or of `projection` alone),
/// by projection and pid.
pub fn members(
    client: &mut impl GenericClient,
    projection: Option<&str>,
) -> Result<Vec<Member>, Error> {
    let sql = format!(
        "SELECT p.projection, l.pid, NULLIF(a.application_name, ''), \
             CASE WHEN a.client_port = -1 THEN 'local socket' \
                  WHEN a.client_addr IS NOT NULL \
                  THEN host(a.client_addr) || ':' || a.client_port END, \
             EXTRACT(EPOCH FROM now() - a.backend_start)::float8, \
             EXTRACT(EPOCH FROM now() - a.state_change)::float8 \
         FROM (SELECT DISTINCT projection FROM projector_checkpoints \
               WHERE $1::text IS NULL OR projection = $1) p \
         JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
             AND l.objid = 0 AND l.classid = {}::oid \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         ORDER BY 1, 2",
        lock_class("p.projection")
    );
    let seconds = |value: Option<f64>| value.map(|s| Duration::from_secs_f64(s.max(0.0)));
    Ok(client
        .query(&sql, &[&projection])
        .map_err(Error::database(
            "reading which processes share the partitions",
        ))?
        .iter()
        .map(|row| Member {
            projection: row.get(0),
            pid: row.get(1),
            application: row.get(2),
            client: row.get(3),
            joined: seconds(row.get(4)),
            last_seen: seconds(row.get(5)),
        })
        .collect())
}
