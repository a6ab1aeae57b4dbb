//! Configuring a runner and starting it: checks, each projection's layout, setup and
//! checkpoints ([`preparation`]), then the threads.

mod preparation;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use log::info;

use crate::engine::balancer::take_first_shares;
use crate::engine::plan::Plan;
use crate::engine::runner::{Runner, Threads};
use crate::engine::settings::Settings;
use crate::engine::version::check_version;
use crate::partition::MAX_PARTITIONS;
use crate::projections::projection::PoisonPolicy;
use crate::projections::projection::{AnyProjection, Projection};
use crate::store::database::Pool;
use crate::{Database, Error, store};
use preparation::{
    connect_to_checked_store, log_start, prepare, shared_start, warn_of_missing_scope_indexes,
};

/// The most events one read of the stream may hold, so that memory stays bounded.
pub const MAX_BATCH_SIZE: u32 = 100_000;

/// Configures and starts a [`Runner`] of one or more projections.
///
/// ```no_run
/// # use projector::{Builder, Database, projections::{AggregateStats, Users}};
/// # fn main() -> Result<(), projector::Error> {
/// let database = Database::new("postgres://app@localhost/app")?;
/// let runner = Builder::new(database, AggregateStats)
///     .projection(Users)
///     .partitions([0, 1, 2, 3])
///     .total_partitions(4)
///     .start()?;
/// // ... later, from anywhere:
/// runner.shutdown();
/// let summary = runner.join()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Builder {
    database: Database,
    members: Vec<Member>,
    partitions: Vec<u32>,
    total_partitions: u32,
    pool: Option<Pool>,
    settings: Settings,
    on_poison: Option<PoisonPolicy>,
    /// Policies given per projection name, which win over `on_poison`.
    on_poison_of: Vec<(String, PoisonPolicy)>,
    /// Share the partitions with the other live processes instead of owning `partitions`.
    share: bool,
    /// A streaming replica of `database` that catch-up reads may be served from.
    read_replica: Option<Database>,
    /// A new version of a projection with side effects starts at the first event too.
    replay_side_effects: bool,
}

/// A projection of the runner, with its own partitions when it has them.
#[derive(Debug)]
struct Member {
    projection: AnyProjection,
    /// `(keys, total)`, or the builder's.
    own_layout: Option<(Vec<u32>, u32)>,
}

impl Builder {
    /// A runner of `projection` over `database`, owning partition 0 of 1 until told otherwise.
    pub fn new<P: Projection>(database: Database, projection: P) -> Builder {
        Builder {
            database,
            members: vec![Member {
                projection: AnyProjection::new(projection),
                own_layout: None,
            }],
            partitions: vec![0],
            total_partitions: 1,
            pool: None,
            settings: Settings::default(),
            on_poison: None,
            on_poison_of: Vec::new(),
            share: false,
            read_replica: None,
            replay_side_effects: false,
        }
    }

    /// Adds another projection, on the partitions given to [`partitions`](Self::partitions)
    /// and [`total_partitions`](Self::total_partitions). Every projection of a runner shares
    /// one read of the stream, and has its own checkpoints and transactions: one that fails
    /// stops alone (see [`Runner::join`]).
    pub fn projection<P: Projection>(mut self, projection: P) -> Self {
        self.members.push(Member {
            projection: AnyProjection::new(projection),
            own_layout: None,
        });
        self
    }

    /// Adds another projection with its own partitions: `keys` of `total`.
    pub fn projection_on<P: Projection>(
        mut self,
        projection: P,
        keys: impl IntoIterator<Item = u32>,
        total: u32,
    ) -> Self {
        self.members.push(Member {
            projection: AnyProjection::new(projection),
            own_layout: Some((keys.into_iter().collect(), total)),
        });
        self
    }

    /// The partition keys this process owns, each below [`total_partitions`](Self::total_partitions).
    pub fn partitions(mut self, keys: impl IntoIterator<Item = u32>) -> Self {
        self.partitions = keys.into_iter().collect();
        self
    }

    /// Shares the partitions with the other live processes of each projection instead of
    /// owning [`partitions`](Self::partitions): with `P` such processes, each holds
    /// `floor(N/P)` or `ceil(N/P)` of the `N` partitions, and the shares move when a process
    /// starts, stops or dies (see the crate docs' *Sharing partitions*). Projections added
    /// with [`projection_on`](Self::projection_on) keep their own partitions.
    pub fn share_partitions(mut self, share: bool) -> Self {
        self.share = share;
        self
    }

    /// Reads the stream far from its head from `replica`, a physical streaming replica of the
    /// database (`--read-replica-url`), to take that load off the primary: only positions
    /// settled on the primary (no transaction that could still commit at or below them is
    /// left) and replayed on the replica are read there. Near the head, and while the replica
    /// lags, stops replaying or cannot be reached, the stream is read from the primary, so
    /// nothing is skipped or repeated; checkpoints and read models are always written on the
    /// primary. The replica's tables are looked for in the database's schema.
    pub fn read_replica(mut self, replica: Database) -> Self {
        self.read_replica = Some(replica);
        self
    }

    /// Builds a new version of a projection that [has side effects](Projection::has_side_effects)
    /// from the first event, like any other, instead of from where the live version's
    /// checkpoints are at its first start (`--replay-side-effects`): its effects are then done
    /// again for every event. Default: false.
    pub fn replay_side_effects(mut self, replay: bool) -> Self {
        self.replay_side_effects = replay;
        self
    }

    /// How many partitions the stream is split into, across all processes.
    pub fn total_partitions(mut self, total: u32) -> Self {
        self.total_partitions = total;
        self
    }

    /// The pool workers take their connections from (one per owned partition of each
    /// projection). Default: a pool made from the database, sized to that plus one.
    pub fn pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Events read per query.
    pub fn batch_size(mut self, batch_size: u32) -> Self {
        self.settings.batch_size = batch_size;
        self
    }

    /// How long to wait before reading again once caught up.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.settings.poll_interval = interval;
        self
    }

    /// How long to keep trying to reach a lost database before stopping with
    /// [`Error::Unavailable`]; see [`Settings::give_up_after`].
    pub fn give_up_after(mut self, limit: Duration) -> Self {
        self.settings.give_up_after = limit;
        self
    }

    /// Stop once caught up with the head of the stream as it is at start.
    pub fn exit_when_caught_up(mut self, exit: bool) -> Self {
        self.settings.exit_when_caught_up = exit;
        self
    }

    /// What every projection of the runner does with an event that still fails after the last
    /// attempt, whatever its [`Projection::poison_policy`] says: stop just before it, or park
    /// it and the later events of its aggregate and go on (`--on-poison`).
    pub fn on_poison(mut self, policy: PoisonPolicy) -> Self {
        self.on_poison = Some(policy);
        self
    }

    /// What the projection named `name` does with an event that still fails after the last
    /// attempt, whatever its [`Projection::poison_policy`] or [`on_poison`](Self::on_poison)
    /// say (`--on-poison NAME=park`). [`start`](Self::start) refuses a name the runner does not
    /// run.
    pub fn on_poison_of(mut self, name: &str, policy: PoisonPolicy) -> Self {
        self.on_poison_of.retain(|(given, _)| given != name);
        self.on_poison_of.push((name.to_owned(), policy));
        self
    }

    /// With the park policy: a projection that would park more than `limit` aggregates within
    /// [`Settings::park_storm_window`] (a minute by default) stops just before the next poison
    /// event instead, with [`Error::ParkStorm`]; 0 turns the breaker off. See
    /// [`Settings::park_storm_limit`].
    pub fn park_storm_limit(mut self, limit: u32) -> Self {
        self.settings.park_storm_limit = limit;
        self
    }

    /// Replaces every setting at once.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Checks the settings and the database, prepares each projection, then starts the
    /// fetcher and one worker per owned partition of each projection.
    ///
    /// Fails before starting any thread when a setting is out of range, the database cannot be
    /// reached, the tables are missing, or a projection's checkpoints were written under
    /// another partition count (change it with [`repartition`](crate::repartition) first).
    pub fn start(self) -> Result<Runner, Error> {
        let planned = self.plan()?;
        let lanes: usize = planned.iter().map(|p| p.keys.len()).sum();
        let mut pool = self.pool_for(lanes)?;
        let mut reader = connect_to_checked_store(&self.database)?;
        let schema = self.database.schema_name();
        let replay = self.replay_side_effects;
        let prepared = planned
            .into_iter()
            .map(|plan| prepare(&mut reader, schema, plan, replay))
            .collect::<Result<Vec<_>, _>>()?;
        let shared_lanes: usize = prepared.iter().map(|p| p.plan.keys.len()).sum();
        if shared_lanes != lanes {
            // Sharing the partitions of a projection kept in another count than given.
            pool = self.pool_for(shared_lanes)?;
        }
        warn_of_missing_scope_indexes(&mut reader, &prepared)?;
        let settings = Arc::new(self.settings);
        let (prepared, balancer) = take_first_shares(&self.database, &settings, prepared)?;
        let head = store::head_position(&mut reader)?;
        let start = shared_start(&prepared, settings.catch_up_alone_beyond);
        log_start(&prepared, start, head, &settings, &self.database);
        if let Some(replica) = &self.read_replica {
            info!(
                "reading the stream far from its head from the read replica {}",
                replica.target()
            );
        }
        Threads::start(self.database, pool, settings, prepared, start, head)
            .and_then(|threads| threads.read_replica(self.read_replica))
            .and_then(|threads| threads.spawn(reader, balancer))
    }

    /// Checks the settings, and each projection's name and partitions.
    fn plan(&self) -> Result<Vec<Plan>, Error> {
        let batch_size = self.settings.batch_size;
        if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
            return Err(Error::invalid_setting(
                "Builder::batch_size",
                batch_size,
                format!(
                    "from 1 to {MAX_BATCH_SIZE} events per read: a read is held in memory whole"
                ),
            ));
        }
        let mut names = HashSet::new();
        self.members
            .iter()
            .map(|member| {
                let name = member.projection.name().to_owned();
                if name.is_empty() {
                    return Err(Error::invalid_setting(
                        "Builder::projection",
                        "",
                        "a projection needs a name",
                    ));
                }
                if !names.insert(name.clone()) {
                    return Err(Error::invalid_setting(
                        "Builder::projection",
                        &name,
                        "each projection may be given once: it is named twice",
                    ));
                }
                check_version(&member.projection, self.database.schema_name())?;
                let shared = self.share && member.own_layout.is_none();
                let (keys, total) = match &member.own_layout {
                    Some(layout) => layout.clone(),
                    None if shared => ((0..self.total_partitions).collect(), self.total_partitions),
                    None => (self.partitions.clone(), self.total_partitions),
                };
                Ok(Plan {
                    projection: member
                        .projection
                        .clone()
                        .over_schema(self.database.schema_name()),
                    keys: checked_keys(keys, total)?,
                    total,
                    policy: self.poison_policy_of(&member.projection),
                    shared,
                    start_from: None,
                })
            })
            .collect::<Result<Vec<Plan>, Error>>()
            .and_then(|plans| self.check_poison_names(plans))
    }

    /// A projection's poison policy: given for its name, else for every projection, else its own.
    fn poison_policy_of(&self, projection: &AnyProjection) -> PoisonPolicy {
        self.on_poison_of
            .iter()
            .find(|(name, _)| name == projection.name())
            .map(|&(_, policy)| policy)
            .or(self.on_poison)
            .unwrap_or_else(|| projection.poison_policy())
    }

    /// `plans`, unless a policy was given for a projection the runner does not run.
    fn check_poison_names(&self, plans: Vec<Plan>) -> Result<Vec<Plan>, Error> {
        let runs = |name: &str| plans.iter().any(|plan| plan.projection.name() == name);
        match self.on_poison_of.iter().find(|(name, _)| !runs(name)) {
            Some((name, _)) => Err(Error::invalid_setting(
                "Builder::on_poison_of",
                name,
                format!(
                    "no projection of that name runs here (it runs {}): name one of them",
                    plans
                        .iter()
                        .map(|plan| format!("'{}'", plan.projection.name()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            None => Ok(plans),
        }
    }

    /// The given pool, or one of `lanes + 1` connections; each worker keeps its connection (it
    /// holds the partition's lock), so a smaller pool would leave workers waiting for ever.
    fn pool_for(&self, lanes: usize) -> Result<Pool, Error> {
        let pool = self
            .pool
            .clone()
            .unwrap_or_else(|| self.database.pool(lanes as u32 + 1));
        if (pool.max_size() as usize) < lanes {
            return Err(Error::invalid_setting(
                "the connection pool's size",
                pool.max_size(),
                format!(
                    "each owned partition's worker keeps one connection: give a pool of at least \
                     {lanes} connection(s), or own fewer partitions in this process"
                ),
            ));
        }
        Ok(pool)
    }
}

/// `keys` sorted and without repeats, once each is checked against `total`.
fn checked_keys(mut keys: Vec<u32>, total: u32) -> Result<Vec<u32>, Error> {
    if total == 0 || total > MAX_PARTITIONS {
        return Err(Error::invalid_setting(
            "Builder::total_partitions",
            total,
            format!("the number of partitions must be from 1 to {MAX_PARTITIONS}"),
        ));
    }
    if keys.is_empty() {
        return Err(Error::invalid_setting(
            "Builder::partitions",
            "",
            "at least one partition key is needed",
        ));
    }
    if let Some(&key) = keys.iter().find(|&&key| key >= total) {
        return Err(Error::invalid_setting(
            "Builder::partitions",
            key,
            format!(
                "partition keys go from 0 to {} with {total} partitions",
                total - 1
            ),
        ));
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(keys)
}
