//! A worker's side of [`crate::dead_letters`](mod@crate::dead_letters): inside each of its transactions, after the
//! checkpoint row is locked, it reads the projection's parked aggregates and records the
//! events to set aside (the poison event it gave up on, and every event of a parked
//! aggregate) instead of applying them, whatever the policy; and, with the park policy, the
//! projection's park storm breaker ([`StormBreaker`]).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use log::warn;
use postgres::types::Type;
use postgres::{Client, Statement, Transaction};

use crate::engine::settings::Settings;
use crate::engine::worker::Worker;
use crate::event::Event;
use crate::layout::checkpoint::to_i32;
use crate::projections::projection::PoisonPolicy;
use crate::projections::projection::Projection;
use crate::{BoxError, Error, error_chain, partition_of};

/// The parked aggregates of projection `$1`.
const PARKED_AGGREGATES: &str = include_str!("../../../sql/parked_aggregates.sql");

/// Prepares the parked-aggregates lookup on a worker's connection, once: planning its
/// recursive query took longer than running it (about 0.4 ms against 0.1 ms with nothing
/// parked), in every transaction.
pub(crate) fn prepare_parked_lookup(client: &mut Client) -> Result<Statement, Error> {
    client
        .prepare_typed(PARKED_AGGREGATES, &[Type::TEXT])
        .map_err(Error::database("preparing the parked-aggregates lookup"))
}

/// The event a parking worker gave up on: it is parked in the next commit.
#[derive(Debug)]
pub(crate) struct Poisoned {
    position: i64,
    error: String,
    attempts: u32,
    first_failed_at: SystemTime,
}

/// A parking worker's state.
#[derive(Debug)]
pub(crate) struct Parking {
    /// The park policy: an event that keeps failing is parked (else the projection stops).
    /// Whatever the policy, the events of aggregates already parked are set aside.
    parks_poison: bool,
    /// The events to park at the next commit: several when one transaction holds several
    /// poison events (each found after the one before was set aside).
    poisoned: Vec<Poisoned>,
    /// The parked aggregates the last transaction saw, with the events it set aside.
    seen: HashSet<String>,
    heads_now: Vec<(i64, String)>,
    /// Shared by the projection's workers in this process.
    breaker: Arc<StormBreaker>,
}

impl Parking {
    pub(crate) fn new(policy: PoisonPolicy, breaker: Arc<StormBreaker>) -> Parking {
        Parking {
            parks_poison: policy == PoisonPolicy::Park,
            poisoned: Vec::new(),
            seen: HashSet::new(),
            heads_now: Vec::new(),
            breaker,
        }
    }

    /// Before parking one more aggregate: counts it, unless the projection's park storm
    /// breaker trips: then `Err` with the limit, which the aggregates parked (or about to be)
    /// within the window have reached.
    pub(crate) fn admit_one_more(&self) -> Result<(), u32> {
        self.breaker.admit(Instant::now())
    }

    /// True with the park policy: an event that keeps failing is to be parked.
    pub(crate) fn parks_poison(&self) -> bool {
        self.parks_poison
    }

    /// Parks `event` at the next commit: it failed `attempts` times, first at `first_failed_at`.
    pub(crate) fn poison(
        &mut self,
        event: &Event,
        source: &BoxError,
        attempts: u32,
        first_failed_at: SystemTime,
    ) {
        self.poisoned.push(Poisoned {
            position: event.global_position,
            error: error_chain(source.as_ref()),
            attempts,
            first_failed_at,
        });
    }
}

/// A projection's park storm breaker: it trips when the projection's workers in this process
/// would park more than [`Settings::park_storm_limit`] aggregates within
/// [`Settings::park_storm_window`]; a bug that fails on every event then stops the projection
/// instead of parking every aggregate.
#[derive(Debug)]
pub(crate) struct StormBreaker {
    limit: u32,
    window: Duration,
    /// When each aggregate counted within the window was parked, oldest first.
    parked_at: Mutex<VecDeque<Instant>>,
}

impl StormBreaker {
    pub(crate) fn new(settings: &Settings) -> StormBreaker {
        StormBreaker {
            limit: settings.park_storm_limit,
            window: settings.park_storm_window,
            parked_at: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts an aggregate parked `now`; `Err` with the limit, and nothing counted, when that
    /// would make more than the limit within the window (never with a limit of 0).
    fn admit(&self, now: Instant) -> Result<(), u32> {
        if self.limit == 0 {
            return Ok(());
        }
        let mut parked_at = crate::lock(&self.parked_at);
        while parked_at
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) >= self.window)
        {
            parked_at.pop_front();
        }
        if parked_at.len() >= self.limit as usize {
            return Err(self.limit);
        }
        parked_at.push_back(now);
        Ok(())
    }
}

impl<P: Projection> Worker<P> {
    /// In `tx` (after the checkpoint row is locked), reads the parked aggregates, records the
    /// events of `pending_at` (indexes into `events`) that must be parked (a poisoned one, and
    /// those of parked aggregates), and returns the others. Whatever the policy: a projection
    /// run with `stop` after it parked (a restart with other flags, a standby without them)
    /// must not apply an aggregate's later events around its parked ones.
    pub(crate) fn set_parked_aside(
        &mut self,
        tx: &mut Transaction<'_>,
        parked_lookup: &Statement,
        events: &[Event],
        pending_at: Vec<usize>,
    ) -> Result<Vec<usize>, postgres::Error> {
        if pending_at.is_empty() {
            // Nothing to apply (a checkpoint moving over an idle range).
            return Ok(pending_at);
        }
        let name = self.projection.name().to_owned();
        let parking = &mut self.parking;
        parking.heads_now.clear();
        // Only this partition's parked aggregates can have events here: with none, the events
        // are not looked at one by one.
        let (partition, total) = (self.context.partition, self.context.total_partitions);
        parking.seen = tx
            .query(parked_lookup, &[&name])?
            .iter()
            .map(|row| row.get::<_, String>(0))
            .filter(|id| partition_of(id, total) == partition)
            .collect();
        if parking.seen.is_empty() && parking.poisoned.is_empty() {
            return Ok(pending_at);
        }
        let mut parked: Vec<(&Event, Option<&Poisoned>)> = Vec::new();
        let mut kept = Vec::with_capacity(pending_at.len());
        for index in pending_at {
            let event = &events[index];
            let poisoned = parking
                .poisoned
                .iter()
                .find(|p| p.position == event.global_position);
            if poisoned.is_some() {
                parking.seen.insert(event.aggregate_id.clone());
                parked.push((event, poisoned));
            } else if parking.seen.contains(&event.aggregate_id) {
                parked.push((event, None));
            } else {
                kept.push(index);
            }
        }
        if parked.is_empty() {
            return Ok(kept);
        }
        let mut positions = Vec::with_capacity(parked.len());
        let mut contexts = Vec::with_capacity(parked.len());
        let mut types = Vec::with_capacity(parked.len());
        let mut ids = Vec::with_capacity(parked.len());
        let mut event_types = Vec::with_capacity(parked.len());
        let mut errors = Vec::with_capacity(parked.len());
        let mut attempts = Vec::with_capacity(parked.len());
        let mut first_failed = Vec::with_capacity(parked.len());
        for (event, poisoned) in &parked {
            positions.push(event.global_position);
            contexts.push(event.bounded_context.as_str());
            types.push(event.aggregate_type.as_str());
            ids.push(event.aggregate_id.as_str());
            event_types.push(event.event_type.as_str());
            match poisoned {
                Some(poisoned) => {
                    errors.push(poisoned.error.clone());
                    attempts.push(to_i32(poisoned.attempts));
                    first_failed.push(Some(poisoned.first_failed_at));
                    parking
                        .heads_now
                        .push((event.global_position, event.aggregate_id.clone()));
                }
                None => {
                    errors.push(format!(
                        "parked behind an earlier event of aggregate '{}' that failed",
                        event.aggregate_id
                    ));
                    attempts.push(0);
                    first_failed.push(None);
                }
            }
        }
        tx.execute(
            "INSERT INTO projection_dead_letters (projection, global_position, bounded_context, \
                 aggregate_type, aggregate_id, event_type, error, attempts, first_failed_at, \
                 last_failed_at) \
             SELECT $1, p, c, t, a, e, r, n, COALESCE(f, NOW()), NOW() \
             FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], \
                 $7::text[], $8::int[], $9::timestamptz[]) AS x(p, c, t, a, e, r, n, f) \
             ON CONFLICT (projection, global_position) DO NOTHING",
            &[
                &name,
                &positions,
                &contexts,
                &types,
                &ids,
                &event_types,
                &errors,
                &attempts,
                &first_failed,
            ],
        )?;
        Ok(kept)
    }

    /// After a commit: the parked event, if there was one, is done with; says what was parked.
    /// (While parked events remain, the progress lines say so: see `progress`.)
    pub(crate) fn parking_committed(&mut self) {
        let name = self.projection.name().to_owned();
        let (partition, total) = (self.context.partition, self.context.total_partitions);
        let parking = &mut self.parking;
        let poisoned = std::mem::take(&mut parking.poisoned);
        for (position, aggregate) in parking.heads_now.drain(..) {
            let why = poisoned
                .iter()
                .find(|p| p.position == position)
                .map(|p| format!(" after {} attempt(s) ({})", p.attempts, p.error))
                .unwrap_or_default();
            warn!(
                "projection '{name}' parked aggregate '{}' at global position {position} on \
                 partition {partition}/{total}{why}; its later events are parked behind it and \
                 the other aggregates go on. Fix the cause, then run `projector dead-letters \
                 retry --projection {} --aggregate {}` (`--projection-file FILE` instead of \
                 `--projection` for a projection written in SQL), or `drop`",
                aggregate.escape_debug(),
                crate::shell_word(&name),
                crate::shell_word(&aggregate)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(limit: u32, window_secs: u64) -> StormBreaker {
        StormBreaker::new(&Settings {
            park_storm_limit: limit,
            park_storm_window: Duration::from_secs(window_secs),
            ..Settings::default()
        })
    }

    #[test]
    fn the_breaker_trips_past_the_limit_within_the_window_only() {
        let breaker = breaker(2, 60);
        let start = Instant::now();
        assert_eq!(breaker.admit(start), Ok(()));
        assert_eq!(breaker.admit(start + Duration::from_secs(30)), Ok(()));
        assert_eq!(breaker.admit(start + Duration::from_secs(59)), Err(2));
        // The first one has left the window.
        assert_eq!(breaker.admit(start + Duration::from_secs(60)), Ok(()));
        assert_eq!(breaker.admit(start + Duration::from_secs(61)), Err(2));
    }

    #[test]
    fn a_limit_of_zero_never_trips() {
        let breaker = breaker(0, 60);
        let now = Instant::now();
        assert!((0..1000).all(|_| breaker.admit(now).is_ok()));
    }
}
