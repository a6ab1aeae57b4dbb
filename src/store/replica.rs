//! Catch-up reads from a physical streaming replica of the database (`--read-replica-url`).
//!
//! A replica shows what the primary committed, some time later: reading it is safe below a
//! position `p` once (1) `p` is *settled* on the primary: every transaction that could still
//! commit a position at or below `p` has ended, which the gap rule proves ([`Settling`]); and
//! (2) the replica has replayed the primary's WAL up to `L`, the primary's WAL insert position
//! taken once `p` was settled. Every transaction that committed a position at or below `p`
//! wrote its commit record before it ended, so below `L`; and a read on the replica that
//! starts after its replay passed `L` sees them all. A position that never committed is
//! missing on the replica as on the primary, and can no longer appear. So a read of `(after,
//! p]` on the replica is the read the primary would give.
//!
//! The fetcher asks [`Replica::read`] first: it answers only far from the head (a whole read
//! below the bound), and otherwise, or when the replica lags, stops replaying, cannot be
//! reached or fails, says to read from the primary, with one warning per episode.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::{info, warn};
use postgres::{Client, Row, Statement};

use crate::store::EVENT_COLUMNS;
use crate::store::gap::{Settling, Writers};
use crate::{Database, Error, backoff, error_chain};

/// How long after a look that found no whole read to serve the next one is made: soon while
/// only the replica's replay is waited for (which asks the replica alone), later while the
/// primary is asked (for writers that may still commit, or the head).
const LOOK_AGAIN_AFTER: Duration = Duration::from_millis(200);
const REPLAY_LOOK_AGAIN_AFTER: Duration = Duration::from_millis(20);

/// How long the replica may leave a settled position unreplayed, while the fetcher would read
/// it there, before a warning says so.
const LAG_WARN_AFTER: Duration = Duration::from_secs(10);

/// The first and the longest wait before trying a replica that failed again.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the replica has served, for metrics.
#[derive(Debug, Default)]
pub(crate) struct ReplicaFigures {
    /// Events read from the replica.
    pub(crate) events_read: AtomicU64,
    /// Bytes of WAL the replica had still to replay, at the last look, up to the position
    /// waited for; 0 once replayed.
    pub(crate) lag_bytes: AtomicI64,
    /// The last read came from the replica.
    pub(crate) in_use: AtomicBool,
}

/// Events read from the replica: every event in `(after, upto]`, in position order.
pub(crate) struct ReplicaRead {
    pub(crate) rows: Vec<Row>,
    pub(crate) upto: i64,
}

/// A position settled on the primary, waiting for the replica to replay `lsn`.
#[derive(Debug, Clone, Copy)]
struct Settled {
    through: i64,
    lsn: i64,
    since: Instant,
}

/// The primary's side: a connection of its own, to prove positions settled.
struct Primary {
    client: Client,
    writers: Writers,
}

/// The replica's side.
struct Standby {
    client: Client,
    /// Every event after `$1`, up to `$2`, `$3` at most.
    events: Statement,
}

/// Reads from a replica below a bound proven settled and replayed.
pub(crate) struct Replica {
    primary_database: Database,
    database: Database,
    figures: Arc<ReplicaFigures>,
    primary: Option<Primary>,
    standby: Option<Standby>,
    settling: Option<Settling>,
    settled: Option<Settled>,
    /// Positions up to here may be read from the replica.
    readable: i64,
    next_look: Instant,
    failures: u32,
    /// A warning about the replica is out, and not yet answered by an all-clear.
    warned: bool,
    lag_warned: bool,
}

impl Replica {
    /// Reads from `database`, a streaming replica of `primary_database`.
    pub(crate) fn new(
        primary_database: Database,
        database: Database,
        figures: Arc<ReplicaFigures>,
    ) -> Replica {
        Replica {
            primary_database,
            database,
            figures,
            primary: None,
            standby: None,
            settling: None,
            settled: None,
            readable: i64::MIN,
            next_look: Instant::now(),
            failures: 0,
            warned: false,
            lag_warned: false,
        }
    }

    /// Reads the `limit` events after `position` from the replica, when they are all settled
    /// and replayed there; `None` when they are to be read from the primary (near the head, or
    /// the replica is behind or failing).
    pub(crate) fn read(&mut self, position: i64, limit: i64) -> Option<ReplicaRead> {
        let wanted = position.saturating_add(limit);
        if self.readable < wanted && Instant::now() >= self.next_look {
            match self.look(wanted) {
                Ok(()) if self.readable >= wanted => {}
                Ok(()) => {
                    let after = match self.settled {
                        Some(_) => REPLAY_LOOK_AGAIN_AFTER,
                        None => LOOK_AGAIN_AFTER,
                    };
                    self.next_look = Instant::now() + after;
                }
                Err(error) => self.fail(error),
            }
        }
        let read = if self.readable >= wanted {
            match self.read_events(position, limit) {
                Ok(read) => Some(read),
                Err(error) => {
                    self.fail(error);
                    None
                }
            }
        } else {
            None
        };
        self.figures.in_use.store(read.is_some(), Ordering::Relaxed);
        read
    }

    /// Every event in `(position, readable]`, `limit` at most.
    fn read_events(&mut self, position: i64, limit: i64) -> Result<ReplicaRead, Error> {
        let readable = self.readable;
        let standby = self.standby()?;
        let rows = standby
            .client
            .query(&standby.events, &[&position, &readable, &limit])
            .map_err(Error::database("reading events from the read replica"))?;
        let upto = match rows.last() {
            Some(last) if rows.len() as i64 == limit => last.get(0),
            _ => readable,
        };
        self.figures
            .events_read
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        self.answered();
        Ok(ReplicaRead { rows, upto })
    }

    /// The replica answered: a failure, if any, is over.
    fn answered(&mut self) {
        self.failures = 0;
        if self.warned {
            self.warned = false;
            info!(
                "fetcher: the read replica {} answers again: far from the head, the stream is \
                 read from it",
                self.database.target()
            );
        }
    }

    /// Moves the readable bound as far as the primary and the replica prove: a bound settled
    /// on the primary becomes readable once the replica has replayed its LSN; a new bound is
    /// proven only when the head is at least at `wanted` (a whole read ahead of the fetcher).
    fn look(&mut self, wanted: i64) -> Result<(), Error> {
        // A bound below a whole read is of no use any more: the primary has served it.
        if self.settled.is_some_and(|s| s.through < wanted) {
            self.settled = None;
        }
        if self.settling.as_ref().is_some_and(|s| s.through() < wanted) {
            self.settling = None;
        }
        // Each turn moves one step: replayed, settled, or a new bound begun.
        for _ in 0..3 {
            if let Some(settled) = self.settled {
                if !self.replayed(settled)? {
                    return Ok(());
                }
                self.readable = settled.through;
                self.settled = None;
                if self.readable >= wanted {
                    return Ok(());
                }
            }
            if let Some(mut settling) = self.settling.take() {
                let primary = self.primary()?;
                if !settling
                    .settled(&mut primary.client, &primary.writers)
                    .map_err(Error::database("looking for writers on the primary"))?
                {
                    self.settling = Some(settling);
                    return Ok(());
                }
                self.settle(settling.through())?;
                continue;
            }
            let primary = self.primary()?;
            let head: i64 = primary
                .client
                .query_one("SELECT COALESCE(MAX(global_position), 0) FROM events", &[])
                .map_err(Error::database(
                    "reading the head of the stream on the primary",
                ))?
                .get(0);
            if head < wanted {
                // Near the head: the primary serves it.
                return Ok(());
            }
            match Settling::begin(&mut primary.client, &primary.writers, head)
                .map_err(Error::database("looking for writers on the primary"))?
            {
                Some(settling) => self.settling = Some(settling),
                None => self.settle(head)?,
            }
        }
        Ok(())
    }

    /// `through` is settled: notes the primary's WAL insert position, taken now.
    fn settle(&mut self, through: i64) -> Result<(), Error> {
        let primary = self.primary()?;
        let lsn: i64 = primary
            .client
            .query_one(
                "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
                &[],
            )
            .map_err(Error::database("reading the primary's WAL position"))?
            .get(0);
        self.settled = Some(Settled {
            through,
            lsn,
            since: Instant::now(),
        });
        Ok(())
    }

    /// Whether the replica has replayed the primary's WAL up to `settled.lsn`; warns once when
    /// it has not for a while.
    fn replayed(&mut self, settled: Settled) -> Result<bool, Error> {
        let standby = self.standby()?;
        let row = standby
            .client
            .query_one(
                "SELECT pg_is_in_recovery(), \
                     (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint",
                &[],
            )
            .map_err(Error::database(
                "reading the read replica's replay position",
            ))?;
        let (recovering, replayed): (bool, Option<i64>) = (row.get(0), row.get(1));
        if recovering {
            self.answered();
        }
        let Some(replayed) = replayed.filter(|_| recovering) else {
            return Err(Error::invalid_setting(
                "the read replica",
                self.database.target(),
                "it is not a standby replaying the primary's WAL (pg_is_in_recovery() is false): \
                 give a physical streaming replica of the database",
            ));
        };
        let behind = (settled.lsn - replayed).max(0);
        self.figures.lag_bytes.store(behind, Ordering::Relaxed);
        if behind == 0 {
            if self.lag_warned {
                self.lag_warned = false;
                info!(
                    "fetcher: the read replica {} has replayed the primary's WAL again",
                    self.database.target()
                );
            }
            return Ok(true);
        }
        let waited = settled.since.elapsed();
        if waited >= LAG_WARN_AFTER && !self.lag_warned {
            self.lag_warned = true;
            warn!(
                "fetcher: the read replica {} has not replayed the primary's WAL up to where the \
                 stream is settled for {:.0} s ({behind} bytes behind: is its replay paused, or \
                 its streaming broken?); reading from the primary meanwhile",
                self.database.target(),
                waited.as_secs_f64()
            );
        }
        Ok(false)
    }

    /// After a failure on either side: forgets both connections and every bound, warns once,
    /// and leaves the replica alone for a while (longer after each failure).
    fn fail(&mut self, error: Error) {
        if !self.warned {
            self.warned = true;
            warn!(
                "fetcher: the read replica {} cannot be used: {}; reading the stream from the \
                 primary until it can",
                self.database.target(),
                error_chain(&error)
            );
        }
        self.failures = self.failures.saturating_add(1);
        self.next_look = Instant::now() + backoff(self.failures, RETRY_FIRST, RETRY_MAX);
        self.primary = None;
        self.standby = None;
        self.settling = None;
        self.settled = None;
        self.readable = i64::MIN;
        self.figures.in_use.store(false, Ordering::Relaxed);
    }

    fn primary(&mut self) -> Result<&mut Primary, Error> {
        let primary = match self.primary.take() {
            Some(primary) => primary,
            None => {
                let mut client = self.primary_database.connect()?;
                let writers = Writers::find(&mut client)?;
                Primary { client, writers }
            }
        };
        Ok(self.primary.insert(primary))
    }

    fn standby(&mut self) -> Result<&mut Standby, Error> {
        let standby = match self.standby.take() {
            Some(standby) => standby,
            None => self.open_standby()?,
        };
        Ok(self.standby.insert(standby))
    }

    /// Connects to the replica and checks that it is a copy of the primary (the same system
    /// identifier), so that its replay position means what the primary's WAL position does.
    fn open_standby(&mut self) -> Result<Standby, Error> {
        let system_of = |client: &mut Client| -> Result<i64, Error> {
            client
                .query_one("SELECT system_identifier FROM pg_control_system()", &[])
                .map(|row| row.get(0))
                .map_err(Error::database("reading the server's system identifier"))
        };
        let mut client = self.database.connect()?;
        let replica_system = system_of(&mut client)?;
        let primary_system = system_of(&mut self.primary()?.client)?;
        if replica_system != primary_system {
            return Err(Error::invalid_setting(
                "the read replica",
                self.database.target(),
                "it is not a copy of the primary (another system identifier): give a physical \
                 streaming replica of the database",
            ));
        }
        let events = client
            .prepare(&format!(
                "SELECT {EVENT_COLUMNS} FROM events \
                 WHERE global_position > $1 AND global_position <= $2 \
                 ORDER BY global_position LIMIT $3"
            ))
            .map_err(Error::database(
                "preparing the event query on the read replica",
            ))?;
        Ok(Standby { client, events })
    }
}
