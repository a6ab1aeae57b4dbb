//! Read your writes: wait until a projection has applied an event, so that a service can show
//! a read model that includes what it just appended.
//!
//! A worker's commit that moves a checkpoint notifies the schema's `projector_applied_` channel
//! in the same statement, saying projection, partition and checkpoint (see
//! `PartitionStatements::save`). A waiter looks at the checkpoints; if the event is not applied
//! yet, it `LISTEN`s on that channel and looks again (a commit may have landed in between).
//! Then it waits: a commit of the partition that owns the event, at or past its position, ends
//! the wait (it has applied the event, or it had been before); commits of other projections,
//! of other partitions and short of the position are passed over; anything else, and a second
//! without news, makes it look at the checkpoints again, until the deadline.

use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use postgres::{Client, error::SqlState};

use crate::Error;
use crate::store::database::{Database, notify_channel};
use crate::store::registry;

mod target;

use target::{Layout, News, Standing, Target};

/// How long a waiter goes without looking at the checkpoints, notification or not: the safety
/// net for a commit whose notification did not arrive (a worker of an older version, say).
const LOOK_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// The positions below the head read first when looking for an aggregate's latest event.
const FIRST_RANGE_READ_BACK: i64 = 10_000;

/// Events counted at the most when saying how far behind a partition is.
const BEHIND_COUNTED_AT_MOST: i64 = 1_000_000;

/// What to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    /// The event at this global position, as [`append`](crate::append) returns it. When no
    /// event is stored there (not committed yet, or rolled back), every partition must pass
    /// the position.
    Position(i64),
    /// The latest event of the aggregate with this id (of any bounded context and type), as
    /// of the call; for an aggregate with no events, [`wait_for`] returns at once. The event is
    /// found by reading the store back from its head (no index leads with the aggregate id),
    /// which is immediate for an aggregate written recently, and reads the whole store for
    /// one never written.
    Aggregate(String),
}

/// What [`wait_for`] found: the event applied, and by which partition.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Applied {
    /// The projection.
    pub projection: String,
    /// The global position waited for: the aggregate's latest event for
    /// [`Until::Aggregate`], 0 when the aggregate has no events.
    pub position: i64,
    /// The aggregate of the event at that position; `None` when no event is stored there.
    pub aggregate_id: Option<String>,
    /// The partition that applied it, the one that owns its aggregate; `None` when no event is
    /// stored at that position (every partition has passed it).
    pub partition: Option<u32>,
    /// The projection's number of partitions (its current layout).
    pub total_partitions: u32,
    /// That partition's checkpoint when the wait ended, at least `position` (with no
    /// partition, the lowest checkpoint of all).
    pub checkpoint: i64,
    /// How long the call took.
    pub waited: Duration,
}

/// Waits until `projection` has applied `until`, for at most `timeout`, and says where.
///
/// Returns as soon as the partition that owns the event's aggregate, in the projection's
/// current layout (the partition count of its checkpoints), has a checkpoint at or past the
/// event's position, so that a read of the read model then sees the event (and every earlier
/// event of the same aggregate). It does not poll: it listens for the commits of the
/// projection's workers, and looks again at least once a second besides.
///
/// A projection named without a version is waited on in its live version (`tally` means
/// `tally@2` once version 2 is promoted); name a version by its stored name (`tally@3`) to
/// wait on a building one.
///
/// Opens a connection for the call, as [`Waiter::connect`] does; a service that waits after
/// many writes keeps a [`Waiter`] instead. Fails with:
/// - [`Error::NotAppliedInTime`] when `timeout` passes first, saying how far the partition is,
///   and whether a live process holds it;
/// - [`Error::EventParked`] when the projection parked the event instead of applying it
///   (under [`PoisonPolicy::Park`](crate::PoisonPolicy::Park)): its read model does not show
///   it, nor any later event of its aggregate, until a [`retry`](crate::retry) applies them;
/// - [`Error::NotStarted`] at once when the projection has no checkpoints (no process has run
///   it in this schema, or it was reset);
/// - [`Error::MissingTables`] when the schema has no projector tables;
/// - a connection error when the database is lost twice during the call (it reconnects once).
///
/// ```no_run
/// use std::time::Duration;
/// use projector::{Database, ExpectedVersion, NewEvent, Until};
///
/// # fn main() -> Result<(), projector::Error> {
/// let database = Database::new("postgres://app@localhost/app")?;
/// let mut client = database.connect()?;
/// let event = NewEvent::new("shop", "Cart", "cart-7", "ItemAdded", b"{}".to_vec());
/// let positions = projector::append(&mut client, ExpectedVersion::Any, &[event])?;
/// let applied = projector::wait_for(
///     &database,
///     "carts",
///     Until::Position(positions[0]),
///     Duration::from_secs(5),
/// )?;
/// // The read model of "carts" now shows the item.
/// # let _ = applied;
/// # Ok(())
/// # }
/// ```
pub fn wait_for(
    database: &Database,
    projection: &str,
    until: Until,
    timeout: Duration,
) -> Result<Applied, Error> {
    let started = Instant::now();
    // The connection closes with the call, which ends its LISTEN too.
    Waiter::connect(database)?.wait(projection, &until, started, timeout)
}

/// A connection kept for [`Waiter::wait_for`], for a service that waits after many writes:
/// it saves a connection per wait. It listens only while it waits, so an idle waiter holds
/// up nothing on the server.
pub struct Waiter {
    database: Database,
    client: Client,
    /// Whether the connection is listening for commits now.
    listening: bool,
}

impl Waiter {
    /// Opens the waiter's connection.
    pub fn connect(database: &Database) -> Result<Waiter, Error> {
        Ok(Waiter {
            client: database.connect()?,
            database: database.clone(),
            listening: false,
        })
    }

    /// As [`wait_for`], on this waiter's connection (opened again if it was lost).
    pub fn wait_for(
        &mut self,
        projection: &str,
        until: Until,
        timeout: Duration,
    ) -> Result<Applied, Error> {
        let outcome = self.wait(projection, &until, Instant::now(), timeout);
        if self.listening {
            // If this fails, the connection is gone, and the next call opens a new one.
            if self.client.batch_execute("UNLISTEN *").is_ok() {
                self.listening = false;
                // Notifications that arrived before the UNLISTEN.
                let mut notifications = self.client.notifications();
                while let Ok(Some(_)) = notifications.iter().next() {}
            }
        }
        outcome
    }

    /// Waits until `deadline`, opening the connection again once if it is lost on the way.
    fn wait(
        &mut self,
        projection: &str,
        until: &Until,
        started: Instant,
        timeout: Duration,
    ) -> Result<Applied, Error> {
        let deadline = started
            .checked_add(timeout)
            .unwrap_or_else(|| started + Duration::from_secs(365 * 86_400));
        // Kept across a reconnection: the aggregate's latest event as of the call.
        let mut target = None;
        let mut reconnected = false;
        let live = registry::live_stored_name(&mut self.client, projection)?;
        let projection = live.as_str();
        loop {
            match self.wait_on_this_connection(projection, until, &mut target, started, deadline) {
                Err(error) if error.is_connection_loss() && !reconnected => {
                    reconnected = true;
                    self.listening = false;
                    self.client = self.database.connect()?;
                }
                outcome => return outcome,
            }
        }
    }

    fn wait_on_this_connection(
        &mut self,
        projection: &str,
        until: &Until,
        target: &mut Option<Target>,
        started: Instant,
        deadline: Instant,
    ) -> Result<Applied, Error> {
        // First, so that a projection that never ran fails at once.
        let mut layout = self.layout(projection)?;
        let target = match target {
            Some(target) => target,
            None => target.insert(self.target(projection, until)?),
        };
        loop {
            let standing = layout.standing(target);
            if standing.checkpoint >= target.position {
                let (total, checkpoint) = (layout.total, standing.checkpoint);
                let passed = target.applied(projection, total, standing.owner, checkpoint, started);
                return self.applied_unless_parked(passed);
            }
            if self.listening {
                let now = Instant::now();
                if now >= deadline {
                    return Err(self.not_applied_in_time(
                        projection,
                        target,
                        &layout,
                        standing,
                        started.elapsed(),
                    ));
                }
                let until = deadline.min(now + LOOK_AGAIN_AFTER);
                if let Some(News::Applied {
                    total,
                    partition,
                    checkpoint,
                }) = self.wait_for_news(target, until)?
                {
                    let owner = Some(partition);
                    let passed = target.applied(projection, total, owner, checkpoint, started);
                    return self.applied_unless_parked(passed);
                }
            } else {
                // The name is the prefix and letters, digits and underscores (or an MD5).
                let listen = format!("LISTEN \"{}\"", target.channel.replace('"', "\"\""));
                self.client
                    .batch_execute(&listen)
                    .map_err(Error::database("listening for the projection's commits"))?;
                self.listening = true;
                // A commit may have landed before the LISTEN: look again before waiting.
            }
            layout = self.layout(projection)?;
        }
    }

    /// The position to wait for and its aggregate, with the MD5 of the projection's name (in
    /// the payload of its commits' notifications) and the schema's applied channel, in one
    /// query.
    fn target(&mut self, projection: &str, until: &Until) -> Result<Target, Error> {
        let action = "reading the event to wait for";
        let position = match until {
            Until::Position(position) => *position,
            Until::Aggregate(_) => 0,
        };
        let row = self
            .client
            .query_typed_one(
                concat!(
                    "SELECT md5($1), ",
                    notify_channel!("projector_applied_"),
                    ", (SELECT aggregate_id FROM events WHERE global_position = $2), \
                     (SELECT COALESCE(MAX(global_position), 0) FROM events)"
                ),
                &[(&projection, Type::TEXT), (&position, Type::INT8)],
            )
            .map_err(|source| self.failed(action, source))?;
        let (projection_md5, channel) = (row.get(0), row.get(1));
        Ok(match until {
            Until::Position(position) => {
                let aggregate_id: Option<String> = row.get(2);
                Target {
                    position: *position,
                    owner_id: aggregate_id.clone(),
                    aggregate_id,
                    projection_md5,
                    channel,
                }
            }
            Until::Aggregate(aggregate_id) => {
                let position = self
                    .latest_position_of(aggregate_id, row.get(3))
                    .map_err(|source| self.failed(action, source))?;
                Target {
                    position,
                    aggregate_id: (position > 0).then(|| aggregate_id.clone()),
                    // The owner of an aggregate with no events is known all the same.
                    owner_id: Some(aggregate_id.clone()),
                    projection_md5,
                    channel,
                }
            }
        })
    }

    /// The position of the aggregate's latest event at or below `head`, 0 if it has none:
    /// read back from the head in ranges ten times longer each time (no index leads with the
    /// aggregate id alone), so that an aggregate written recently is found at once.
    fn latest_position_of(
        &mut self,
        aggregate_id: &str,
        head: i64,
    ) -> Result<i64, postgres::Error> {
        let (mut high, mut length) = (head, FIRST_RANGE_READ_BACK);
        while high > 0 {
            let low = high.saturating_sub(length).max(0);
            let found = self.client.query_typed_opt(
                "SELECT global_position FROM events \
                 WHERE global_position > $1 AND global_position <= $2 AND aggregate_id = $3 \
                 ORDER BY global_position DESC LIMIT 1",
                &[
                    (&low, Type::INT8),
                    (&high, Type::INT8),
                    (&aggregate_id, Type::TEXT),
                ],
            )?;
            if let Some(row) = found {
                return Ok(row.get(0));
            }
            high = low;
            length = length.saturating_mul(10);
        }
        Ok(0)
    }

    /// `passed`, once the partition that owns the event has passed it, unless the projection
    /// parked the event instead of applying it: then [`Error::EventParked`]. A parked event's
    /// row is written in the transaction that moves the checkpoint past it, so it is there to
    /// be read once the checkpoint is; a retry that has applied it since deletes the row.
    fn applied_unless_parked(&mut self, passed: Applied) -> Result<Applied, Error> {
        let (Some(aggregate_id), Some(partition)) = (&passed.aggregate_id, passed.partition) else {
            return Ok(passed);
        };
        let parked = self
            .client
            .query_typed_opt(
                "SELECT d.error, (SELECT MIN(f.global_position) FROM projection_dead_letters f \
                     WHERE f.projection = d.projection AND f.aggregate_id = d.aggregate_id) \
                 FROM projection_dead_letters d \
                 WHERE d.projection = $1 AND d.global_position = $2",
                &[
                    (&passed.projection, Type::TEXT),
                    (&passed.position, Type::INT8),
                ],
            )
            .map_err(|source| self.failed("reading whether the event was parked", source))?;
        match parked {
            None => Ok(passed),
            Some(row) => Err(Error::EventParked {
                projection: passed.projection.clone(),
                position: passed.position,
                aggregate_id: aggregate_id.clone(),
                partition,
                total: passed.total_partitions,
                first_parked: row.get::<_, Option<i64>>(1).unwrap_or(passed.position),
                reason: row.get(0),
            }),
        }
    }

    /// The checkpoints of the projection's current layout; [`Error::NotStarted`] when it has
    /// none.
    fn layout(&mut self, projection: &str) -> Result<Layout, Error> {
        let rows = self
            .client
            .query_typed(
                "SELECT total_partitions, partition_key, last_position, generation \
                 FROM projector_checkpoints WHERE projection = $1 \
                 ORDER BY generation DESC, total_partitions DESC, partition_key",
                &[(&projection, Type::TEXT)],
            )
            .map_err(|source| self.failed("reading the checkpoints", source))?;
        let Some(first) = rows.first() else {
            return Err(Error::NotStarted {
                projection: projection.to_owned(),
                schema: self.database.schema_name().to_owned(),
            });
        };
        // Only one layout is stored but for a moment of a hand-made mess; the newest wins.
        let (total, generation): (i32, i64) = (first.get(0), first.get(3));
        let checkpoints = rows
            .iter()
            .filter(|row| row.get::<_, i32>(0) == total && row.get::<_, i64>(3) == generation)
            .map(|row| (row.get::<_, i32>(1).unsigned_abs(), row.get(2)))
            .collect();
        Ok(Layout {
            total: total.unsigned_abs().max(1),
            checkpoints,
        })
    }

    /// Waits for a commit that may have applied the event, until `until` at the latest:
    /// `None` when none came, else what the commits that have arrived say, the best of them.
    fn wait_for_news(&mut self, target: &Target, until: Instant) -> Result<Option<News>, Error> {
        let mut notifications = self.client.notifications();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let arrived = notifications.timeout_iter(left).next();
            let notification = match arrived {
                Ok(Some(notification)) => notification,
                Ok(None) => return Ok(None),
                Err(source) => {
                    return Err(Error::Database {
                        action: "waiting for the projection's commits".into(),
                        source,
                    });
                }
            };
            let mut best = target.news(notification.payload());
            if best == News::Nothing {
                continue;
            }
            // One look serves every commit that has arrived.
            while let Ok(Some(notification)) = notifications.iter().next() {
                let news = target.news(notification.payload());
                if matches!(news, News::Applied { .. }) {
                    best = news;
                }
            }
            return Ok(Some(best));
        }
    }

    /// The error for a wait that ran out of time, saying how far the partition is and whether
    /// a live process holds it.
    fn not_applied_in_time(
        &mut self,
        projection: &str,
        target: &Target,
        layout: &Layout,
        standing: Standing,
        waited: Duration,
    ) -> Error {
        // Best effort: the error says what it can if these fail.
        let behind = self
            .client
            .query_typed_one(
                "SELECT COUNT(*) FROM (SELECT 1 FROM events \
                 WHERE global_position > $1 AND global_position <= $2 LIMIT $3) behind",
                &[
                    (&standing.checkpoint, Type::INT8),
                    (&target.position, Type::INT8),
                    (&BEHIND_COUNTED_AT_MOST, Type::INT8),
                ],
            )
            .map(|row| row.get(0))
            .ok();
        let held_by_pid = crate::layout::checkpoint::held_partitions(&mut self.client, projection)
            .ok()
            .and_then(|holders| {
                holders
                    .into_iter()
                    .find(|h| h.total == layout.total && h.key == standing.partition)
                    .map(|h| h.pid)
            });
        Error::NotAppliedInTime {
            projection: projection.to_owned(),
            position: target.position,
            aggregate_id: target.aggregate_id.clone(),
            partition: standing.partition,
            total: layout.total,
            checkpoint: standing.checkpoint,
            behind,
            behind_counted_at_most: BEHIND_COUNTED_AT_MOST,
            held_by_pid,
            waited,
        }
    }

    /// The error for a failed statement: [`Error::MissingTables`] when the schema lacks the
    /// projector's tables, else what it was doing.
    fn failed(&mut self, action: &str, source: postgres::Error) -> Error {
        if source.code() == Some(&SqlState::UNDEFINED_TABLE) {
            if let Err(missing) =
                crate::store::check_tables(&mut self.client, self.database.schema_name())
            {
                return missing;
            }
        }
        Error::Database {
            action: action.to_owned(),
            source,
        }
    }
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter")
            .field("database", &self.database)
            .field("listening", &self.listening)
            .finish()
    }
}
