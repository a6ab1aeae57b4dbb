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
//! Transactions that never wrote to the events table (say, idle in transaction elsewhere) hold
//! no such lock and never hold the reader back.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use log::warn;
use postgres::Client;
use postgres::types::Oid;

/// The blockers of the lowest gap seen, and how far up they cover.
#[derive(Debug)]
pub(crate) struct Watch {
    /// Virtual transaction ids of the transactions that may still commit a missing position.
    blockers: HashSet<String>,
    /// Every missing position at or below this one is owned by one of `blockers`, or dead.
    through: i64,
    since: Instant,
    warned: Option<Instant>,
}

/// What the fetcher remembers about gaps between reads.
#[derive(Debug, Default)]
pub(crate) struct Gaps {
    watch: Option<Watch>,
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
    fn blockers(&self, client: &mut Client) -> Result<HashSet<String>, postgres::Error> {
        let rows = client.query(
            "SELECT DISTINCT virtualtransaction FROM pg_locks \
             WHERE locktype = 'relation' AND granted AND mode <> 'AccessShareLock' \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND relation = ANY($1) AND pid IS DISTINCT FROM pg_backend_pid()",
            &[&self.relations],
        )?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

impl Gaps {
    /// Call before each read. Returns the position at or below which every position still
    /// missing in the coming read is dead, if the watched blockers have all ended.
    pub(crate) fn cleared_through(
        &mut self,
        client: &mut Client,
        writers: &Writers,
        warn_after: Duration,
    ) -> Result<Option<i64>, postgres::Error> {
        let Some(watch) = self.watch.as_mut() else {
            return Ok(None);
        };
        let live = writers.blockers(client)?;
        watch.blockers.retain(|blocker| live.contains(blocker));
        if watch.blockers.is_empty() {
            let through = watch.through;
            self.watch = None;
            return Ok(Some(through));
        }
        if watch.since.elapsed() >= warn_after
            && watch.warned.is_none_or(|at| at.elapsed() >= warn_after)
        {
            watch.warned = Some(Instant::now());
            let blockers: Vec<&String> = watch.blockers.iter().collect();
            warn_about(client, &blockers, watch.since.elapsed());
        }
        Ok(None)
    }

    /// After a read that shows `holes` (ascending runs) below its last row `last`: decides
    /// whether they may be passed. `fetch` reads the rows that filled runs since the read.
    pub(crate) fn hold<R>(
        &mut self,
        client: &mut Client,
        writers: &Writers,
        holes: &[(i64, i64)],
        last: i64,
        fetch: impl FnOnce(&mut Client, &[(i64, i64)]) -> Result<Vec<R>, postgres::Error>,
    ) -> Result<Held<R>, postgres::Error> {
        let Some(&(first, _)) = holes.first() else {
            return Ok(Held::Pass(Vec::new()));
        };
        if self.watch.as_ref().is_some_and(|w| first <= w.through) {
            return Ok(Held::Wait);
        }
        let blockers = writers.blockers(client)?;
        if blockers.is_empty() {
            // No transaction can commit a hole any more. Those that committed between the read
            // and now are read here; the others are dead.
            return Ok(Held::Pass(fetch(client, holes)?));
        }
        self.watch = Some(Watch {
            blockers,
            through: last,
            since: Instant::now(),
            warned: None,
        });
        Ok(Held::Wait)
    }

    /// Forgets everything (after a reconnect, the fetcher reads again from its position).
    pub(crate) fn reset(&mut self) {
        self.watch = None;
    }
}

/// What to do with the holes of a read.
pub(crate) enum Held<R> {
    /// Every hole is decided: these are the rows that filled some of them; the rest are dead.
    Pass(Vec<R>),
    /// Some hole may still be filled: stop before the first hole and read again later.
    Wait,
}

fn warn_about(client: &mut Client, blockers: &[&String], waited: Duration) {
    let rows = client.query(
        "SELECT l.pid, a.state, EXTRACT(EPOCH FROM NOW() - a.xact_start)::float8 \
         FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'virtualxid' AND l.virtualtransaction = ANY($1)",
        &[&blockers],
    );
    let described: Vec<String> = match rows {
        Ok(rows) => rows
            .iter()
            .map(|row| {
                let pid: Option<i32> = row.get(0);
                let state: Option<String> = row.get(1);
                let age: Option<f64> = row.get(2);
                match pid {
                    Some(pid) => format!(
                        "pid {pid} ({}, transaction open for {:.0} s)",
                        state.as_deref().unwrap_or("unknown state"),
                        age.unwrap_or_default()
                    ),
                    None => "a prepared transaction (see pg_prepared_xacts)".to_owned(),
                }
            })
            .collect(),
        Err(_) => blockers
            .iter()
            .map(|b| format!("transaction {b}"))
            .collect(),
    };
    warn!(
        "fetcher: waiting {:.0} s for a missing global position: {} wrote to the events table \
         and may still commit it. Nothing is skipped meanwhile; to go on, commit or roll back \
         that transaction, or end it with SELECT pg_terminate_backend(<pid>)",
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
