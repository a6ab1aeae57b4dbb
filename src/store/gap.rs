//! Gaps in the stream: positions taken by transactions that have not committed yet.
//!
//! A position is drawn from the sequence when a row is inserted, but the row becomes visible
//! when its transaction commits, and transactions commit in any order. So a reader can see
//! position `p + 1` while `p` is still in flight; moving past `p` then would lose it for good.
//! The fetcher therefore never moves past a missing position until it knows that position is
//! dead (its transaction rolled back, or it was never used).
//!
//! How it knows: every transaction that draws a position holds a lock on the events table
//! (the INSERT) or on its sequence (`nextval`), taken before the position is drawn and kept
//! until the transaction ends. With the sequence's CACHE at 1, a hole below a visible row was
//! drawn before that row was read. So the transactions holding such a lock after that read
//! (the *blockers*) include the owner of every hole below it, if it is still running. Once all
//! of them have ended, a fresh read shows every hole that committed; any still missing is dead.
//! Transactions that never wrote to the events table (say, idle in transaction elsewhere, or
//! vacuuming, indexing or reading it with `FOR SHARE`) hold no such lock and never hold the
//! reader back. A transaction that is prepared (`PREPARE TRANSACTION`) is followed by its
//! transaction id until it is committed or rolled back.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use log::warn;
use postgres::Client;
use postgres::types::Oid;

/// A transaction that may still commit a missing position.
#[derive(Debug, Clone)]
struct Blocker {
    /// Its virtual transaction id, as `pg_locks` shows it.
    vxid: String,
    /// The server process running it (none for a prepared transaction).
    pid: Option<i32>,
    /// Its transaction ids (with subtransactions), as text; empty before it has one.
    xids: Vec<String>,
}

/// The blockers of the lowest gap seen, and how far up they cover.
#[derive(Debug)]
struct Watch {
    blockers: Vec<Blocker>,
    /// Every missing position at or below this one is owned by one of `blockers`, or dead.
    through: i64,
    /// When the blockers were read, by the server's clock: a transaction prepared since then
    /// may be one of them under another name.
    read_at: SystemTime,
    since: Instant,
    warned: Option<Instant>,
}

/// What the fetcher remembers about gaps between reads.
#[derive(Debug, Default)]
pub(crate) struct Gaps {
    watch: Option<Watch>,
    /// Every position at or below this one missing from the next read is dead: no transaction
    /// that could commit it was left when the last read's holes were looked at.
    decided: Option<i64>,
}

/// Before a read: whether to read, and what is known dead.
pub(crate) enum Before {
    /// Read; positions missing at or below `dead_through` (if any) are dead.
    Read { dead_through: Option<i64> },
    /// The gap the fetcher waits at is still held: read again only if it has filled.
    Held,
}

/// The relations whose write locks mark a transaction that may draw a position.
#[derive(Debug, Clone)]
pub(crate) struct Writers {
    relations: Vec<Oid>,
}

impl Writers {
    /// The events table and the sequence its positions are drawn from, in the current schema.
    pub(crate) fn find(client: &mut Client) -> Result<Writers, crate::Error> {
        let events: Oid = client
            .query_one("SELECT 'events'::regclass::oid", &[])
            .map_err(crate::Error::database("finding the events table"))?
            .get(0);
        let (sequence, _) = crate::store::position_sequence(client)?;
        Ok(Writers {
            relations: vec![events, sequence],
        })
    }

    /// The transactions that hold a write lock on the events table or its sequence now
    /// (prepared transactions included), other than this connection's.
    ///
    /// Drawing a position takes `ROW EXCLUSIVE` on the sequence (`nextval`) and inserting a
    /// row takes it on the table, both kept to the end of the transaction. Nothing else can
    /// commit a position: vacuum, `CREATE INDEX CONCURRENTLY` (`SHARE UPDATE EXCLUSIVE`),
    /// `SELECT … FOR SHARE` and foreign-key checks (`ROW SHARE`) are not waited for.
    fn holders(&self, client: &mut Client) -> Result<Vec<Blocker>, postgres::Error> {
        let rows = client.query(
            "SELECT l.virtualtransaction, MIN(NULLIF(l.pid, 0)), \
                 ARRAY(SELECT x.transactionid::text FROM pg_locks x \
                       WHERE x.locktype = 'transactionid' AND x.granted \
                           AND x.mode = 'ExclusiveLock' \
                           AND x.virtualtransaction = l.virtualtransaction) \
             FROM pg_locks l \
             WHERE l.locktype = 'relation' AND l.granted AND l.mode = 'RowExclusiveLock' \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND l.relation = ANY($1) AND l.pid IS DISTINCT FROM pg_backend_pid() \
             GROUP BY l.virtualtransaction",
            &[&self.relations],
        )?;
        Ok(rows
            .iter()
            .map(|row| Blocker {
                vxid: row.get(0),
                pid: row.get(1),
                xids: row.get(2),
            })
            .collect())
    }
}

/// The transaction ids of the prepared transactions of this database, and whether one was
/// prepared at or after `since`.
fn prepared(
    client: &mut Client,
    since: SystemTime,
) -> Result<(HashSet<String>, bool), postgres::Error> {
    let rows = client.query(
        "SELECT transaction::text, prepared >= $1 FROM pg_prepared_xacts \
         WHERE database = current_database()",
        &[&since],
    )?;
    let recent = rows.iter().any(|row| row.get::<_, bool>(1));
    Ok((rows.iter().map(|row| row.get(0)).collect(), recent))
}

impl Watch {
    /// Forgets the blockers that have ended. A blocker that prepared its transaction
    /// (`PREPARE TRANSACTION`) is still live: found by its transaction id, or, when it had none
    /// when the watch began, by any transaction prepared since.
    fn forget_ended(
        &mut self,
        client: &mut Client,
        writers: &Writers,
    ) -> Result<(), postgres::Error> {
        let live: HashSet<String> = writers
            .holders(client)?
            .into_iter()
            .map(|holder| holder.vxid)
            .collect();
        if self.blockers.iter().all(|b| live.contains(&b.vxid)) {
            return Ok(());
        }
        let (prepared_xids, prepared_since) = prepared(client, self.read_at)?;
        self.blockers.retain(|blocker| {
            live.contains(&blocker.vxid)
                || blocker.xids.iter().any(|xid| prepared_xids.contains(xid))
                || (blocker.xids.is_empty() && prepared_since)
        });
        Ok(())
    }
}

impl Gaps {
    /// While a gap holds the fetcher back: a server process holding it (0 when only prepared
    /// transactions do).
    pub(crate) fn held_by(&self) -> Option<i32> {
        self.watch
            .as_ref()
            .map(|watch| watch.blockers.iter().find_map(|b| b.pid).unwrap_or(0))
    }

    /// Call before each read: says whether the gap waited at is still held and what is known
    /// to be dead. Warns (every `warn_after`) while a gap holds the fetcher back.
    pub(crate) fn before_read(
        &mut self,
        client: &mut Client,
        writers: &Writers,
        warn_after: Duration,
    ) -> Result<Before, postgres::Error> {
        if let Some(decided) = self.decided.take() {
            return Ok(Before::Read {
                dead_through: Some(decided),
            });
        }
        let Some(watch) = self.watch.as_mut() else {
            return Ok(Before::Read { dead_through: None });
        };
        watch.forget_ended(client, writers)?;
        if watch.blockers.is_empty() {
            let through = watch.through;
            self.watch = None;
            return Ok(Before::Read {
                dead_through: Some(through),
            });
        }
        if watch.since.elapsed() >= warn_after
            && watch.warned.is_none_or(|at| at.elapsed() >= warn_after)
        {
            watch.warned = Some(Instant::now());
            warn_about(client, &watch.blockers, watch.since.elapsed());
        }
        Ok(Before::Held)
    }

    /// After a read that shows `holes` (ascending runs) below its last row `last`: decides
    /// whether they may be passed.
    pub(crate) fn hold(
        &mut self,
        client: &mut Client,
        writers: &Writers,
        holes: &[(i64, i64)],
        last: i64,
    ) -> Result<Held, postgres::Error> {
        let Some(&(first, _)) = holes.first() else {
            return Ok(Held::Pass);
        };
        if self.watch.as_ref().is_some_and(|w| first <= w.through) {
            return Ok(Held::Wait);
        }
        let read_at: SystemTime = client
            .query_one("SELECT statement_timestamp()", &[])?
            .get(0);
        let holders = writers.holders(client)?;
        if holders.is_empty() {
            // No transaction can commit a hole any more. A fresh read shows those that
            // committed since; the others are dead.
            self.decided = Some(last);
            return Ok(Held::ReadAgain);
        }
        self.watch = Some(Watch {
            blockers: holders,
            through: last,
            read_at,
            since: Instant::now(),
            warned: None,
        });
        Ok(Held::Wait)
    }

    /// Forgets everything (after a reconnect, the fetcher reads again from its position).
    pub(crate) fn reset(&mut self) {
        self.watch = None;
        self.decided = None;
    }
}

/// A position being proven settled for reads elsewhere (a replica): every transaction that
/// could still commit at or below it has ended. The same argument as a gap's: the writers live
/// once `through` is known to be a committed row include the owner of every position drawn
/// at or below it that has not ended yet.
#[derive(Debug)]
pub(crate) struct Settling {
    watch: Watch,
}

impl Settling {
    /// Starts proving `through` settled, `through` being a position read as committed before
    /// this call; `None` when no writer is live, so that it is settled already.
    pub(crate) fn begin(
        client: &mut Client,
        writers: &Writers,
        through: i64,
    ) -> Result<Option<Settling>, postgres::Error> {
        let read_at: SystemTime = client
            .query_one("SELECT statement_timestamp()", &[])?
            .get(0);
        let blockers = writers.holders(client)?;
        if blockers.is_empty() {
            return Ok(None);
        }
        Ok(Some(Settling {
            watch: Watch {
                blockers,
                through,
                read_at,
                since: Instant::now(),
                warned: None,
            },
        }))
    }

    /// The position being proven settled.
    pub(crate) fn through(&self) -> i64 {
        self.watch.through
    }

    /// True once every writer that was live at the start has ended: no transaction can commit
    /// a position at or below [`through`](Self::through) any more.
    pub(crate) fn settled(
        &mut self,
        client: &mut Client,
        writers: &Writers,
    ) -> Result<bool, postgres::Error> {
        self.watch.forget_ended(client, writers)?;
        Ok(self.watch.blockers.is_empty())
    }
}

/// What to do with the holes of a read.
pub(crate) enum Held {
    /// There are none.
    Pass,
    /// Every hole is decided, but rows may have filled some since the read: keep what is below
    /// the first hole and read again at once (a fresh read, within the batch size).
    ReadAgain,
    /// Some hole may still be filled: stop before the first hole and read again later.
    Wait,
}

/// Logs who holds the gap, in the words this role can see, and what to run to end it.
fn warn_about(client: &mut Client, blockers: &[Blocker], waited: Duration) {
    let vxids: Vec<&str> = blockers.iter().map(|b| b.vxid.as_str()).collect();
    let xids: Vec<&str> = blockers
        .iter()
        .flat_map(|b| b.xids.iter().map(String::as_str))
        .collect();
    let rows = client.query(
        "SELECT NULL::int, p.gid, EXTRACT(EPOCH FROM NOW() - p.prepared)::float8, p.owner::text, \
             NULL::text, NULL::text \
         FROM pg_prepared_xacts p \
         WHERE p.database = current_database() AND p.transaction::text = ANY($2) \
         UNION ALL \
         SELECT DISTINCT l.pid, NULL, EXTRACT(EPOCH FROM NOW() - a.xact_start)::float8, \
             a.usename::text, a.state, a.application_name \
         FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.virtualtransaction = ANY($1) AND l.pid IS NOT NULL",
        &[&vxids, &xids],
    );
    let mut advice = Vec::new();
    let described: Vec<String> = match rows {
        Ok(rows) if !rows.is_empty() => rows
            .iter()
            .map(|row| {
                let pid: Option<i32> = row.get(0);
                let gid: Option<String> = row.get(1);
                let age: Option<f64> = row.get(2);
                let role: Option<String> = row.get(3);
                let state: Option<String> = row.get(4);
                let application: Option<String> = row.get(5);
                match (pid, gid) {
                    (_, Some(gid)) => {
                        advice.push(format!(
                            "COMMIT PREPARED '{gid}' or ROLLBACK PREPARED '{gid}'"
                        ));
                        format!(
                            "prepared transaction '{gid}' (prepared {:.0} s ago by {})",
                            age.unwrap_or_default(),
                            role.as_deref().unwrap_or("an unknown role")
                        )
                    }
                    (Some(pid), None) => {
                        advice.push(format!("SELECT pg_terminate_backend({pid})"));
                        match state {
                            Some(state) => format!(
                                "pid {pid} ({state}, transaction open for {:.0} s, role {}, \
                                 application '{}')",
                                age.unwrap_or_default(),
                                role.as_deref().unwrap_or("?"),
                                application.as_deref().unwrap_or("")
                            ),
                            None => format!(
                                "pid {pid} (a session of another role: its state is hidden \
                                 from this one; pg_read_all_stats shows it)"
                            ),
                        }
                    }
                    (None, None) => "a transaction this role cannot see".to_owned(),
                }
            })
            .collect(),
        _ => vxids
            .iter()
            .map(|vxid| format!("transaction {vxid} (see pg_locks)"))
            .collect(),
    };
    let advice = if advice.is_empty() {
        "commit or roll back that transaction".to_owned()
    } else {
        format!(
            "commit or roll back that transaction, or end it: {}",
            advice.join("; ")
        )
    };
    warn!(
        "fetcher: waiting {:.0} s for a missing global position: {} wrote to the events table \
         and may still commit it. Nothing is skipped meanwhile; to go on, {advice}",
        waited.as_secs_f64(),
        described.join(", ")
    );
}

/// The runs of positions in `(after, last]` missing from `positions` (ascending) and above
/// `dead_through`, as inclusive `(first, last)` pairs.
pub(crate) fn holes(after: i64, positions: &[i64], dead_through: i64) -> Vec<(i64, i64)> {
    let mut holes = Vec::new();
    let mut expected = after + 1;
    for &position in positions {
        let from = expected.max(dead_through + 1);
        if from < position {
            holes.push((from, position - 1));
        }
        expected = position + 1;
    }
    holes
}

#[cfg(test)]
mod tests {
    use super::holes;

    #[test]
    fn holes_are_the_missing_runs_between_rows() {
        assert_eq!(holes(10, &[11, 12, 13], 0), []);
        assert_eq!(holes(10, &[12, 15], 0), [(11, 11), (13, 14)]);
        assert_eq!(holes(0, &[1_000_000], 0), [(1, 999_999)]);
        assert_eq!(holes(10, &[], 0), []);
    }

    #[test]
    fn holes_known_dead_are_left_out() {
        assert_eq!(holes(10, &[12, 15, 18], 13), [(14, 14), (16, 17)]);
        assert_eq!(holes(10, &[12, 15], 20), []);
    }
}
