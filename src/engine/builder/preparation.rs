//! What a start does before its threads run: a checked connection to the store, then for
//! each projection its version, layout, read model and checkpoints; the position the shared
//! read starts from, and what the start logs.

use log::{info, warn};
use postgres::Client;

use crate::engine::balancer::claim_stored_layout;
use crate::engine::plan::{Plan, Prepared};
use crate::engine::settings::Settings;
use crate::engine::version::publish_live_version;
use crate::error::BoxError;
use crate::partition::describe_keys;
use crate::projections::projection::PoisonPolicy;
use crate::projections::projection::{Projection, lock_setup};
use crate::store::registry;
use crate::{Database, Error, layout, layout::checkpoint, store};

/// A connection to a store the projector can read: a recent server, the tables, the columns and
/// a sequence that hands out one position at a time.
pub(super) fn connect_to_checked_store(database: &Database) -> Result<Client, Error> {
    let mut client = database.connect()?;
    store::check_server_version(&mut client)?;
    store::check_tables(&mut client, database.schema_name())?;
    store::check_event_columns(&mut client, database.schema_name())?;
    store::check_sequence(&mut client)?;
    Ok(client)
}

/// Records the projection's version, claims its layout, sets its read model up and reads its
/// checkpoints.
pub(super) fn prepare(
    client: &mut Client,
    schema: &str,
    mut plan: Plan,
    replay_side_effects: bool,
) -> Result<Prepared, Error> {
    let name = plan.projection.name().to_owned();
    let given = plan.projection.given_name().to_owned();
    let (given, version) = (given.as_str(), plan.projection.version());
    registry::register_start(client, schema, given, version)?;
    let live = registry::live_version(&registry::states_of(client, given)?);
    if version != live && plan.projection.has_side_effects() && !replay_side_effects {
        plan.start_from = Some(registry::stored_name(given, live));
    }
    let layout = if plan.shared {
        claim_stored_layout(client, &mut plan)?
    } else {
        let start_from = plan.start_from.as_deref();
        layout::claim_layout(client, &name, plan.total, false, start_from)?
    };
    set_up_read_model(client, &mut plan)?;
    if version != live {
        publish_live_version(client, schema, given, live, version)?;
    }
    let checkpoints = checkpoint::load(client, &name, plan.total, &plan.keys)?;
    warn_of_parked_aggregates(client, &name, plan.policy)?;
    let wanted = vec![!plan.shared; plan.keys.len()];
    Ok(Prepared {
        plan,
        name,
        layout,
        checkpoints,
        wanted,
    })
}

/// Says at start when the projection has parked aggregates: their later events are parked
/// behind them whatever the policy (see [`crate::engine::worker::parking`]).
fn warn_of_parked_aggregates(
    client: &mut Client,
    name: &str,
    policy: PoisonPolicy,
) -> Result<(), Error> {
    let totals = crate::dead_letters::parked_totals(client, &[name])
        .map_err(Error::database("counting the parked events"))?;
    if let Some((_, aggregates, events)) = totals.first().filter(|t| t.1 > 0) {
        let stop = match policy {
            PoisonPolicy::Stop => " (the stop policy only decides what a new poison event does)",
            PoisonPolicy::Park => "",
        };
        warn!(
            "projection '{name}' has {aggregates} parked aggregate(s) ({events} event(s)): their \
             later events are parked behind them{stop}; `projector dead-letters list \
             --projection {}` shows them",
            crate::shell_word(name)
        );
    }
    Ok(())
}

/// Runs the projection's setup, one process at a time: processes starting together must not
/// race to create the same read-model tables.
fn set_up_read_model(client: &mut Client, plan: &mut Plan) -> Result<(), Error> {
    let name = plan.projection.name().to_owned();
    let mut tx = client
        .transaction()
        .map_err(Error::database("starting the projection's setup"))?;
    lock_setup(&mut tx, &name).map_err(Error::database("waiting for other processes' setup"))?;
    plan.projection
        .setup(&mut tx)
        .map_err(|source| match source.downcast::<Error>() {
            // A setup that refuses its configuration (a projection file the database refused)
            // says so itself.
            Ok(error) if error.is_configuration() => *error,
            other => Error::Projection {
                projection: name.clone(),
                partition: plan.keys[0],
                total: plan.total,
                position: 0,
                aggregate_id: String::new(),
                event_type: "(setup)".into(),
                attempts: 1,
                source: other.map_or_else(|source| source, |error| error as BoxError),
            },
        })?;
    tx.commit()
        .map_err(Error::database("committing the projection's setup"))
}

/// Says which index a scoped projection's read would need, when `events` has none that serves it.
pub(super) fn warn_of_missing_scope_indexes(
    client: &mut Client,
    prepared: &[Prepared],
) -> Result<(), Error> {
    let scopes: Vec<_> = prepared.iter().map(|p| p.plan.projection.scope()).collect();
    let scoped: Vec<_> = scopes.iter().filter(|scope| !scope.is_all()).collect();
    for statement in store::missing_scope_indexes(client, &scoped)? {
        warn!(
            "events has no index for a scoped read, which scans the table instead: an operator \
             can add one without blocking writers with `{statement}`"
        );
    }
    Ok(())
}

/// Where the shared read starts: the lowest checkpoint within `alone_beyond` positions of the
/// highest. Partitions further behind read their own events until they catch up.
pub(super) fn shared_start(prepared: &[Prepared], alone_beyond: i64) -> i64 {
    // Every lane counts, those this process is not to hold at start too: a checkpoint is a
    // position the stream was complete up to, and the read must start at one (a lane taken
    // over later reads its own events up to where the shared read has been, which must never
    // pass a position that may still commit).
    let checkpoints = || prepared.iter().flat_map(|p| p.checkpoints.iter().copied());
    let highest = checkpoints().max().unwrap_or(0);
    checkpoints()
        .filter(|&c| c >= highest.saturating_sub(alone_beyond.max(0)))
        .min()
        .unwrap_or(0)
}

pub(super) fn log_start(
    prepared: &[Prepared],
    start: i64,
    head: i64,
    settings: &Settings,
    db: &Database,
) {
    for p in prepared {
        let scope = p.plan.projection.scope();
        let scope = if scope.is_all() {
            String::new()
        } else {
            format!(", events where {scope}")
        };
        let policy = match p.plan.policy {
            PoisonPolicy::Stop => "stop",
            PoisonPolicy::Park => "park",
        };
        info!(
            "projection '{}': partitions {} of {}{scope}, on poison: {policy}",
            p.name,
            describe_keys(&p.plan.keys),
            p.plan.total
        );
        let earlier = &p.layout.earlier;
        if let Some(end) = earlier
            .iter()
            .map(layout::EarlierLayout::applied_at_most)
            .max()
        {
            let totals: Vec<String> = earlier
                .iter()
                .map(|l| l.total_partitions.to_string())
                .collect();
            info!(
                "projection '{}': re-partitioning in progress: events applied under the \
                 earlier layout(s) of {} partition(s) are skipped, up to global position {end}",
                p.name,
                totals.join(" and ")
            );
        }
    }
    info!(
        "batch size {}, database {db}, reading from global position {start}, head at {head}",
        settings.batch_size
    );
}
