//! Sharing partitions among live processes ([`Builder::share_partitions`](crate::Builder::share_partitions), `--partition-key
//! auto`): each process of a projection takes a fair share of its `N` partitions, and the
//! shares move when a process comes or goes. PostgreSQL is the only coordinator.
//!
//! # Membership
//! A sharing process is a *member* of each projection it runs while its balancer's connection
//! holds the projection's member lock: a session advisory lock taken in shared mode, on the
//! projection's lock class with key 0 (a partition's key is `total * 65536 + partition`, never
//! 0). The live members are the sessions `pg_locks` shows holding it; a member that stops, is
//! killed or is cut off loses it with its session, as its workers lose their partitions (within
//! [`Database::session_timeout_secs`](crate::Database::session_timeout_secs) for a frozen or
//! silently cut-off process).
//!
//! # Shares
//! With `P` live members ranked by server pid, the member of rank `r` is to hold
//! `N / P + (r < N % P)` partitions: each holds `floor(N/P)` or `ceil(N/P)` and together they
//! hold `N`. Every [`Settings::balance_interval`](crate::Settings::balance_interval) each
//! balancer compares what its process holds with its share: above it, it gives the partitions
//! it has not taken yet back first, then its highest ones; below it, it asks for partitions no
//! live process holds. Nothing else moves, so a process joining or leaving moves only the
//! partitions it must.
//!
//! # Settling
//! A change in membership is acted on only once the membership has stayed the same for
//! [`Settings::settle_after`](crate::Settings::settle_after): a member that comes and goes
//! within that time moves nothing. At start a process waits for 200 ms of the same membership
//! only, so that processes started together split the partitions at once without holding the
//! start back. (A member that leaves frees its partitions at once; the
//! others take them at the first round after settling.)
//!
//! # Why no partition is worked twice
//! The balancer decides which partitions its workers *want*; a worker still takes its
//! partition's session lock before it applies anything, and gives it back only between
//! transactions. A worker asked to give its partition up releases the lock, leaves the shared
//! read and drops what it had queued; when its partition is handed back it takes the lock,
//! reads the checkpoint and reads the partition's events from there itself before it rejoins
//! the shared read (as a straggler does). The lock and the checkpoint row (locked `FOR UPDATE`
//! in every transaction, events applied only above it) keep every event applied once, whoever
//! holds the partition and whenever it moves.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select, tick};
use log::{info, warn};
use postgres::Client;

use crate::engine::lane::LaneProgress;
use crate::engine::plan::{Plan, Prepared};
use crate::engine::settings::Settings;
use crate::layout;
use crate::layout::checkpoint::{held_partitions, lock_class};
use crate::projections::projection::Projection;
use crate::{Database, Error, error_chain};

/// The balancer of one process: its membership of each sharing projection, and the share of
/// partitions it asks its workers to hold.
pub(crate) struct Balancer {
    database: Database,
    settings: Arc<Settings>,
    /// The connection holding the member locks; `None` after it was lost.
    client: Option<Client>,
    /// Its server pid: this process's rank among the members.
    pid: i32,
    projections: Vec<Share>,
    /// Changes of the partitions this process wants, all projections together.
    pub(crate) rebalances: Arc<AtomicU64>,
    /// Still starting: the membership need stay the same for [`SETTLE_AT_START`] only.
    starting: bool,
}

/// At start, how long the membership must stay the same before the first share is taken
/// (at most [`Settings::settle_after`](crate::Settings::settle_after)): processes started
/// together have all joined by then, and a start is not held back longer than that.
const SETTLE_AT_START: Duration = Duration::from_millis(200);

/// At start, how often the balancer looks at the members until the first share is taken.
const LOOK_AT_START: Duration = Duration::from_millis(25);

/// One sharing projection as the balancer sees it.
struct Share {
    name: String,
    total: u32,
    /// Per partition key: whether this process wants to hold it.
    wanted: Vec<bool>,
    /// The projection's lanes in this process, by partition key (empty before they start).
    lanes: Vec<LaneProgress>,
    /// The members last seen, and since when they have been the same.
    members: Vec<i32>,
    members_since: Instant,
    /// Per partition key: rounds in a row it was wanted while another process held it.
    held_elsewhere: Vec<u8>,
    /// The wants were worked out since the membership last changed.
    settled: bool,
    /// Every lane of the projection has stopped: no longer a member.
    left: bool,
}

/// The partitions of one projection a process wants to hold at start.
pub(crate) type Wanted = Vec<bool>;

impl Balancer {
    /// Joins each of `projections` (name and partition count) as a member, waits until the
    /// membership has settled (at most a few settle periods), and works out this process's
    /// first share of each.
    pub(crate) fn join(
        database: &Database,
        settings: Arc<Settings>,
        projections: &[(String, u32)],
    ) -> Result<(Balancer, Vec<Wanted>), Error> {
        let mut balancer = Balancer {
            database: database.clone(),
            settings,
            client: None,
            pid: 0,
            projections: projections
                .iter()
                .map(|(name, total)| Share {
                    name: name.clone(),
                    total: *total,
                    wanted: vec![false; *total as usize],
                    lanes: Vec::new(),
                    members: Vec::new(),
                    members_since: Instant::now(),
                    held_elsewhere: vec![0; *total as usize],
                    settled: false,
                    left: false,
                })
                .collect(),
            rebalances: Arc::new(AtomicU64::new(0)),
            starting: true,
        };
        balancer.register()?;
        balancer.settle_at_start()?;
        balancer.starting = false;
        let wanted = balancer
            .projections
            .iter()
            .map(|share| share.wanted.clone())
            .collect();
        Ok((balancer, wanted))
    }

    /// From now on, reads and sets the wants of these lanes (each of a sharing projection).
    pub(crate) fn watch(&mut self, lanes: &[LaneProgress]) {
        for share in &mut self.projections {
            let mut mine: Vec<LaneProgress> = lanes
                .iter()
                .filter(|lane| lane.projection == share.name && lane.total == share.total)
                .cloned()
                .collect();
            mine.sort_by_key(|lane| lane.partition);
            share.lanes = mine;
        }
    }

    /// Rebalances every [`Settings::balance_interval`] until `stop` is disconnected.
    pub(crate) fn run(mut self, stop: &Receiver<()>) {
        let ticks = tick(self.settings.balance_interval);
        loop {
            select! {
                recv(stop) -> _ => return,
                recv(ticks) -> _ => {
                    if let Err(error) = self.round() {
                        warn!(
                            "sharing partitions: {} (tried again in {} ms; the partitions held \
                             stay held)",
                            error_chain(&error),
                            self.settings.balance_interval.as_millis()
                        );
                        // Joined again (under a new pid, so a new rank) only when the
                        // connection is gone: a query that failed on a live one is just retried.
                        if self.client.as_ref().is_none_or(Client::is_closed) {
                            self.client = None;
                        }
                    }
                }
            }
        }
    }

    /// Connects and takes the member lock of every projection.
    fn register(&mut self) -> Result<(), Error> {
        // Ended by the server like a worker's session when the process freezes, so that a
        // frozen process stops counting as a member when it stops holding partitions.
        let mut client = self.database.connect_watched()?;
        self.pid = client
            .query_one("SELECT pg_backend_pid()", &[])
            .map_err(Error::database("reading the balancer's server pid"))?
            .get(0);
        let sql = format!("SELECT pg_advisory_lock_shared({}, 0)", lock_class("$1"));
        for share in self.projections.iter_mut().filter(|share| !share.left) {
            client
                .execute(&sql, &[&share.name])
                .map_err(Error::database(
                    "joining the processes that share the partitions",
                ))?;
            share.members.clear();
        }
        self.client = Some(client);
        Ok(())
    }

    /// At start: rounds until every projection's membership has settled and a first share is
    /// worked out (members starting together all count), at most four settle periods.
    fn settle_at_start(&mut self) -> Result<(), Error> {
        let limit = Instant::now() + self.settings.settle_after * 4;
        loop {
            if let Err(error) = self.round() {
                // A server restart while the processes settle is ridden out like any outage
                // of a running process, up to the limit.
                if Instant::now() >= limit {
                    return Err(error);
                }
                self.client = None;
            }
            let settled = self.projections.iter().all(|share| share.settled);
            if settled || Instant::now() >= limit {
                return Ok(());
            }
            std::thread::sleep(self.settings.balance_interval.min(LOOK_AT_START));
        }
    }

    /// One look at the members and holders of every projection, and the wants that follow.
    fn round(&mut self) -> Result<(), Error> {
        if self.client.is_none() {
            self.register()?;
        }
        let Some(client) = self.client.as_mut() else {
            return Ok(());
        };
        let members_sql = format!(
            "SELECT l.pid FROM pg_locks l \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.objid = 0 \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND l.classid = {}::oid \
             ORDER BY l.pid",
            lock_class("$1")
        );
        let leave_sql = format!("SELECT pg_advisory_unlock_shared({}, 0)", lock_class("$1"));
        for share in &mut self.projections {
            if share.left {
                continue;
            }
            if !share.lanes.is_empty() && share.lanes.iter().all(|lane| lane.state().is_done()) {
                // The projection stopped here (failed, fenced) while the process goes on with
                // others: it stops counting as a member, so the others take its share.
                client
                    .execute(&leave_sql, &[&share.name])
                    .map_err(Error::database(
                        "leaving the processes that share the partitions",
                    ))?;
                share.left = true;
                continue;
            }
            let members: Vec<i32> = client
                .query(&members_sql, &[&share.name])
                .map_err(Error::database(
                    "listing the processes that share the partitions",
                ))?
                .iter()
                .map(|row| row.get(0))
                .collect();
            if members != share.members {
                share.members = members;
                share.members_since = Instant::now();
                share.settled = false;
            }
            let settle = if self.starting {
                SETTLE_AT_START.min(self.settings.settle_after)
            } else {
                self.settings.settle_after
            };
            if share.members_since.elapsed() < settle {
                continue;
            }
            let holders: BTreeMap<u32, i32> = held_partitions(client, &share.name)
                .map_err(Error::database(
                    "reading which process holds which partition",
                ))?
                .into_iter()
                .filter(|holder| holder.total == share.total)
                .map(|holder| (holder.key, holder.pid))
                .collect();
            share.settled = true;
            if share.rebalance(self.pid, &holders) {
                self.rebalances.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

impl Share {
    /// This process's share among the members, `me` being its balancer's pid.
    fn target(&self, me: i32) -> usize {
        let total = self.total as usize;
        let count = self.members.len().max(1);
        let rank = self
            .members
            .iter()
            .position(|&pid| pid == me)
            .unwrap_or(count);
        total / count + usize::from(rank < total % count)
    }

    /// Where this process's block of partitions starts when the members split them in rank
    /// order (`rank * floor(N/P) + min(rank, N % P)`): members that ask at once, holding
    /// nothing yet, ask for disjoint partitions.
    fn first_of_block(&self, me: i32) -> usize {
        let total = self.total as usize;
        let count = self.members.len().max(1);
        let rank = self.members.iter().position(|&pid| pid == me).unwrap_or(0);
        (rank * (total / count) + rank.min(total % count)) % total.max(1)
    }

    /// Whether this process's lane of partition `key` holds it.
    fn holds(&self, key: usize) -> bool {
        self.lanes
            .get(key)
            .is_some_and(|lane| lane.progress.holds.load(Ordering::Acquire))
    }

    /// Moves this process's wants toward its share; true when they changed.
    fn rebalance(&mut self, me: i32, holders: &BTreeMap<u32, i32>) -> bool {
        let before = self.wanted.clone();
        // A partition wanted while another process holds it for two rounds is let go: that
        // process took it first (its share will move it if it must).
        for key in 0..self.wanted.len() {
            let elsewhere =
                self.wanted[key] && !self.holds(key) && holders.contains_key(&(key as u32));
            self.held_elsewhere[key] = if elsewhere {
                self.held_elsewhere[key].saturating_add(1)
            } else {
                0
            };
            if self.held_elsewhere[key] >= 2 {
                self.wanted[key] = false;
            }
        }
        let target = self.target(me);
        let mut count = self.wanted.iter().filter(|&&w| w).count();
        // Above the share: partitions not taken yet go first, then the highest.
        let mut giving: Vec<usize> = (0..self.wanted.len()).filter(|&k| self.wanted[k]).collect();
        giving.sort_by_key(|&k| (self.holds(k), std::cmp::Reverse(k)));
        for key in giving {
            if count <= target {
                break;
            }
            self.wanted[key] = false;
            count -= 1;
        }
        // Below it: partitions no live process holds, from a place that depends on the rank
        // so that members asking at once mostly ask for different ones.
        let total = self.wanted.len();
        let offset = self.first_of_block(me);
        for step in 0..total {
            if count >= target {
                break;
            }
            let key = (offset + step) % total;
            if !self.wanted[key] && !holders.contains_key(&(key as u32)) {
                self.wanted[key] = true;
                count += 1;
            }
        }
        for (key, lane) in self.lanes.iter().enumerate() {
            lane.progress
                .wanted
                .store(self.wanted[key], Ordering::Release);
        }
        let changed = before != self.wanted;
        if changed {
            let keys: Vec<String> = (0..total)
                .filter(|&k| self.wanted[k])
                .map(|k| k.to_string())
                .collect();
            info!(
                "'{}': {} live process(es) share {} partitions; this one's share is {}: \
                 partition(s) {}",
                self.name,
                self.members.len(),
                total,
                target,
                if keys.is_empty() {
                    "none".to_owned()
                } else {
                    keys.join(",")
                }
            );
        }
        changed
    }
}

/// For the projections that share their partitions: joins the other live processes and takes
/// this process's first share (the partitions of the others' shares start out of the shared
/// read, as stragglers do, and are read from their checkpoints if they come to this process).
pub(crate) fn take_first_shares(
    database: &Database,
    settings: &Arc<Settings>,
    mut prepared: Vec<Prepared>,
) -> Result<(Vec<Prepared>, Option<Balancer>), Error> {
    let sharing: Vec<(String, u32)> = prepared
        .iter()
        .filter(|p| p.plan.shared)
        .map(|p| (p.name.clone(), p.plan.total))
        .collect();
    if sharing.is_empty() {
        return Ok((prepared, None));
    }
    let (balancer, wants) = Balancer::join(database, Arc::clone(settings), &sharing)?;
    let mut wants = wants.into_iter();
    for p in prepared.iter_mut().filter(|p| p.plan.shared) {
        if let Some(wanted) = wants.next() {
            p.wanted = wanted;
        }
    }
    Ok((prepared, Some(balancer)))
}

/// Sharing partitions: the stored layout, followed (a re-partitioning that lands between
/// reading it and claiming it is followed too: one more try).
pub(crate) fn claim_stored_layout(
    client: &mut Client,
    plan: &mut Plan,
) -> Result<layout::Layout, Error> {
    let name = plan.projection.name().to_owned();
    follow_stored_layout(client, plan)?;
    let start_from = plan.start_from.clone();
    match layout::claim_layout(client, &name, plan.total, false, start_from.as_deref()) {
        Err(Error::LayoutMismatch { .. }) => {
            follow_stored_layout(client, plan)?;
            layout::claim_layout(client, &name, plan.total, false, start_from.as_deref())
        }
        claimed => claimed,
    }
}

/// Sharing partitions: a projection that already has a layout runs on its partition count
/// (the one a re-partitioning set), whatever count this process was given for a new one.
fn follow_stored_layout(client: &mut Client, plan: &mut Plan) -> Result<(), Error> {
    let name = plan.projection.name();
    let stored = layout::stored_totals(client, name)?;
    if let [total] = stored[..] {
        if total != plan.total {
            info!(
                "'{name}' is kept in {total} partitions: sharing them (not the {} given for a \
                 new projection)",
                plan.total
            );
            plan.total = total;
            plan.keys = (0..total).collect();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(total: u32, members: &[i32]) -> Share {
        Share {
            name: "p".into(),
            total,
            wanted: vec![false; total as usize],
            lanes: Vec::new(),
            members: members.to_vec(),
            members_since: Instant::now(),
            held_elsewhere: vec![0; total as usize],
            settled: true,
            left: false,
        }
    }

    fn wanted(share: &Share) -> Vec<usize> {
        (0..share.wanted.len())
            .filter(|&k| share.wanted[k])
            .collect()
    }

    #[test]
    fn shares_are_floor_or_ceil_and_add_up_to_every_partition() {
        let members = [10, 20, 30, 40, 50];
        let shares: Vec<usize> = members
            .iter()
            .map(|&me| share(12, &members).target(me))
            .collect();
        assert_eq!(shares, [3, 3, 2, 2, 2]);
        assert_eq!(share(3, &members).target(50), 0);
        assert_eq!(share(12, &[7]).target(7), 12);
    }

    #[test]
    fn members_starting_together_ask_for_disjoint_partitions_covering_all() {
        let members = [10, 20, 30, 40, 50];
        let mut seen = Vec::new();
        for &me in &members {
            let mut mine = share(12, &members);
            mine.rebalance(me, &BTreeMap::new());
            seen.extend(wanted(&mine));
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn a_member_above_its_share_gives_up_the_highest_and_asks_for_nothing_held() {
        let mut mine = share(12, &[10, 20]);
        mine.wanted = vec![true; 12];
        assert!(mine.rebalance(10, &BTreeMap::new()));
        assert_eq!(wanted(&mine), [0, 1, 2, 3, 4, 5]);
        // Below its share, it asks only for partitions nobody holds.
        let mut other = share(12, &[10, 20]);
        let holders: BTreeMap<u32, i32> = (0..6).map(|k| (k, 99)).collect();
        other.rebalance(20, &holders);
        assert_eq!(wanted(&other), [6, 7, 8, 9, 10, 11]);
    }

    #[test]
    fn a_partition_another_process_took_first_is_let_go_after_two_rounds() {
        let mut mine = share(4, &[10, 20]);
        mine.wanted = vec![true, true, false, false];
        let holders: BTreeMap<u32, i32> = [(1, 99), (2, 98), (3, 97)].into_iter().collect();
        mine.rebalance(10, &holders);
        assert_eq!(wanted(&mine), [0, 1], "one round is not enough");
        mine.rebalance(10, &holders);
        assert_eq!(wanted(&mine), [0], "let go, and nothing free to ask for");
    }
}
