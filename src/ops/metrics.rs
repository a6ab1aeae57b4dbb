//! Metrics of a running group of projections, in the Prometheus text format (their health is
//! [`crate::ops::health`]).
//!
//! Workers and the fetcher keep their figures in atomics (and a commit-duration histogram);
//! [`Metrics::render`] reads them, asks the database for the head of the stream, each
//! partition's lag and the parked events, and encodes everything. Nothing here is on the
//! events' path.
//!
//! One scrape at a time asks the database, each query within [`SCRAPE_TIMEOUT`]; a scrape that
//! comes meanwhile, or whose queries time out, shows the figures the database last gave, and
//! `projector_database_figures_age_seconds` says how old they are.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use postgres::Client;
use prometheus::{Encoder, IntCounter, TextEncoder};

use crate::Runner;
use crate::engine::lane::{LaneProgress, STATES};
use crate::engine::runner::Figures;
use crate::lock;
use crate::ops::metric_families::Families;
use crate::store::registry::version_label;

/// Up to this many positions behind the head, a partition's lag is counted exactly.
const COUNTED_LAG: i64 = 10_000;

/// The longest a scrape's query may take (its statement timeout): past it, the scrape answers
/// with the figures the database last gave.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The metrics and health of a [`Runner`]: render them into an embedding
/// service's own endpoint, or let `projector --metrics-addr` serve them. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    pub(crate) figures: Figures,
    families: Families,
    /// What the counters were last set from.
    counted: Mutex<Counted>,
    /// The connection of the head, lag and parked queries, opened again when lost: held by
    /// the one scrape that asks the database.
    asking: Mutex<Option<Client>>,
    /// What the database last said.
    last: Mutex<DatabaseFigures>,
}

#[derive(Default)]
struct Counted {
    applied: Vec<u64>,
    retries: Vec<u64>,
    failures: Vec<u64>,
    rows_read: u64,
    replica_read: u64,
    gap_wait: f64,
    rebalances: u64,
}

/// What the last scrape that asked the database found.
#[derive(Debug, Default, Clone)]
pub(crate) struct DatabaseFigures {
    /// The head of the stream; `None` when that scrape got no answer.
    pub(crate) head: Option<i64>,
    /// Per lane, as the database last gave them.
    pub(crate) lags: Vec<Lag>,
    /// When the database last answered.
    answered_at: Option<Instant>,
}

impl Runner {
    /// The runner's metrics and health, to render into a service's own endpoint. Every call
    /// returns a handle on the same figures.
    pub fn metrics(&self) -> Metrics {
        let made = self
            .metrics
            .get_or_init(|| Box::new(Metrics::new(self.figures.clone())));
        made.downcast_ref::<Metrics>()
            .cloned()
            .unwrap_or_else(|| Metrics::new(self.figures.clone()))
    }
}

impl Metrics {
    fn new(figures: Figures) -> Metrics {
        let families = Families::new(figures.commit_seconds.clone(), figures.replica.is_some())
            .expect("the metric families have fixed, valid and distinct names");
        let n = figures.lanes.len();
        Metrics {
            shared: Arc::new(Shared {
                figures,
                families,
                counted: Mutex::new(Counted {
                    applied: vec![0; n],
                    retries: vec![0; n],
                    failures: vec![0; n],
                    ..Counted::default()
                }),
                asking: Mutex::new(None),
                last: Mutex::new(DatabaseFigures::default()),
            }),
        }
    }

    /// Every metric in the Prometheus text format (version 0.0.4), after asking the database
    /// for the head of the stream and each partition's lag. When the database cannot be
    /// reached, does not answer within [`SCRAPE_TIMEOUT`], or another scrape is asking it,
    /// the figures it last gave are rendered, with their age.
    pub fn render(&self) -> String {
        self.refresh();
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        let _ = encoder.encode(&self.shared.families.registry.gather(), &mut buffer);
        String::from_utf8_lossy(&buffer).into_owned()
    }

    /// Sets every gauge and counter from the workers' and fetcher's figures and from the
    /// database (unless another scrape is asking it); returns what the database last said.
    pub(crate) fn refresh(&self) -> DatabaseFigures {
        self.count_in_process();
        let asking = match self.shared.asking.try_lock() {
            Ok(client) => Some(client),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(mut client) = asking {
            self.ask_database(&mut client);
        }
        let last = lock(&self.shared.last).clone();
        self.shared.families.figures_age.set(
            last.answered_at
                .map_or(-1.0, |at| at.elapsed().as_secs_f64()),
        );
        last
    }

    /// Asks the database for the head, the lags and the parked events, and sets their gauges;
    /// records what it said (or that it did not answer).
    fn ask_database(&self, client: &mut Option<Client>) {
        let f = &self.shared.families;
        let lags = self.lags(client);
        let mut last = lock(&self.shared.last);
        let Some((head, lags)) = lags else {
            last.head = None;
            return;
        };
        drop(last);
        f.head.set(head);
        for (lane, lag) in self.shared.figures.lanes.iter().zip(&lags) {
            let labels = lane_labels(lane);
            let labels = labels.each_ref().map(String::as_str);
            f.lag_events.with_label_values(&labels).set(lag.events);
            f.lag_seconds.with_label_values(&labels).set(lag.seconds);
        }
        if let Some(client) = client.as_mut() {
            self.count_parked(client);
            if let Ok(states) = crate::store::state::projection_states(client, None) {
                f.projections.set(&self.shared.figures, &states);
            }
        }
        last = lock(&self.shared.last);
        *last = DatabaseFigures {
            head: Some(head),
            lags,
            answered_at: Some(Instant::now()),
        };
    }

    /// Sets the counters and gauges kept in the process: the workers' and the fetcher's.
    fn count_in_process(&self) {
        let mut counted = lock(&self.shared.counted);
        let scrape = &mut *counted;
        let f = &self.shared.families;
        // The label values of each lane, made once per scrape.
        let keys: Vec<[String; 4]> = self.shared.figures.lanes.iter().map(lane_labels).collect();
        for (index, (lane, key)) in self.shared.figures.lanes.iter().zip(&keys).enumerate() {
            let labels = key.each_ref().map(String::as_str);
            let p = &lane.progress;
            advance(
                &f.applied.with_label_values(&labels),
                &mut scrape.applied[index],
                p.applied.load(Ordering::Relaxed),
            );
            advance(
                &f.retries.with_label_values(&labels),
                &mut scrape.retries[index],
                p.retries.load(Ordering::Relaxed),
            );
            advance(
                &f.failures.with_label_values(&labels),
                &mut scrape.failures[index],
                p.failures.load(Ordering::Relaxed),
            );
            f.checkpoint
                .with_label_values(&labels)
                .set(lane.checkpoint());
            let current = lane.state();
            for (state, name) in STATES {
                f.state
                    .with_label_values(&[labels[0], labels[1], labels[2], labels[3], name])
                    .set(i64::from(state == current));
            }
        }
        let fetch = &self.shared.figures.fetch;
        f.read_position.set(fetch.position.load(Ordering::Relaxed));
        let read = fetch.read.load(Ordering::Relaxed);
        if read > scrape.rows_read {
            f.rows_read.inc_by(read - scrape.rows_read);
            scrape.rows_read = read;
        }
        let waited = fetch.gap_wait_seconds();
        if waited > scrape.gap_wait {
            f.gap_wait.inc_by(waited - scrape.gap_wait);
            scrape.gap_wait = waited;
        }
        f.gap_age
            .set(fetch.gap_held_for().map_or(0.0, |d| d.as_secs_f64()));
        f.gap_pid.set(if fetch.gap_held_for().is_some() {
            i64::from(fetch.gap_pid.load(Ordering::Relaxed))
        } else {
            0
        });
        f.notifications_held
            .set(fetch.notifications_held.load(Ordering::Relaxed) as i64);
        if let (Some(gauges), Some(figures)) = (&f.replica, &self.shared.figures.replica) {
            gauges.set(figures, &mut scrape.replica_read);
        }
        self.count_owned(scrape);
    }

    /// Sets how many partitions each projection holds here, and counts rebalances.
    fn count_owned(&self, scrape: &mut Counted) {
        let f = &self.shared.families;
        let mut owned: BTreeMap<(&str, u32), i64> = BTreeMap::new();
        for lane in &self.shared.figures.lanes {
            *owned
                .entry((lane.projection.as_str(), lane.total))
                .or_default() += i64::from(lane.progress.holds.load(Ordering::Relaxed));
        }
        for ((projection, total), count) in owned {
            let version = version_label(projection);
            f.owned
                .with_label_values(&[projection, &version, &total.to_string()])
                .set(count);
        }
        let rebalances = self.shared.figures.rebalances.load(Ordering::Relaxed);
        if rebalances > scrape.rebalances {
            f.rebalances.inc_by(rebalances - scrape.rebalances);
            scrape.rebalances = rebalances;
        }
    }

    /// Sets the parked gauges of every projection of the runner (0 when none is parked); left
    /// as they were when the database does not answer.
    fn count_parked(&self, client: &mut Client) {
        let mut names: Vec<&str> = self
            .shared
            .figures
            .lanes
            .iter()
            .map(|lane| lane.projection.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        let Ok(totals) = crate::dead_letters::parked_totals(client, &names) else {
            return;
        };
        let f = &self.shared.families;
        for name in names {
            let (aggregates, events) = totals
                .iter()
                .find(|(projection, _, _)| projection == name)
                .map_or((0, 0), |&(_, aggregates, events)| (aggregates, events));
            let version = version_label(name);
            f.parked_aggregates
                .with_label_values(&[name, &version])
                .set(aggregates);
            f.parked_events
                .with_label_values(&[name, &version])
                .set(events);
        }
    }

    /// The head of the stream and, per lane, the events stored after the position it has
    /// applied through (see [`LaneProgress::applied_through`]) and how long ago the first of
    /// them was stored; `None` when the database cannot be reached or does not answer within
    /// [`SCRAPE_TIMEOUT`]. Events are counted (as `projector status` does) when that position
    /// is within [`COUNTED_LAG`] positions of the head; further behind, the positions between
    /// stand for them, so that a scrape during a long catch-up costs no scan of the backlog.
    fn lags(&self, client: &mut Option<Client>) -> Option<(i64, Vec<Lag>)> {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            *client = self.connect_for_scrapes();
        }
        let client = client.as_mut()?;
        let checkpoints: Vec<i64> = self
            .shared
            .figures
            .lanes
            .iter()
            .map(LaneProgress::applied_through)
            .collect();
        // Each distinct checkpoint once: partitions usually stand at the same position.
        let rows = client
            .query(
                "WITH c AS (SELECT DISTINCT unnest($1::bigint[]) AS c), \
                     h AS (SELECT COALESCE(MAX(global_position), 0) AS head FROM events) \
                 SELECT c, CASE WHEN h.head - c <= $2 \
                         THEN (SELECT COUNT(*) FROM events WHERE global_position > c) \
                         ELSE h.head - c END, \
                     COALESCE(EXTRACT(EPOCH FROM now() - (SELECT created_at FROM events \
                         WHERE global_position > c ORDER BY global_position LIMIT 1)), 0)::float8, \
                     h.head \
                 FROM c, h",
                &[&checkpoints, &COUNTED_LAG],
            )
            .ok()?;
        let head = match rows.first() {
            Some(row) => row.get(3),
            None => return Some((0, Vec::new())),
        };
        let lags = checkpoints
            .iter()
            .map(|checkpoint| {
                rows.iter()
                    .find(|row| row.get::<_, i64>(0) == *checkpoint)
                    .map_or(Lag::default(), |row| Lag {
                        events: row.get(1),
                        seconds: row.get::<_, f64>(2).max(0.0),
                    })
            })
            .collect();
        Some((head, lags))
    }
}

impl Metrics {
    /// A connection whose statements give up after [`SCRAPE_TIMEOUT`].
    fn connect_for_scrapes(&self) -> Option<Client> {
        let mut client = self.shared.figures.database.connect().ok()?;
        client
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                SCRAPE_TIMEOUT.as_millis()
            ))
            .ok()?;
        Some(client)
    }
}

/// How far one partition is behind the head.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Lag {
    pub(crate) events: i64,
    seconds: f64,
}

/// A lane's `projection`, `version`, `partition` and `total_partitions` label values.
fn lane_labels(lane: &LaneProgress) -> [String; 4] {
    [
        lane.projection.clone(),
        version_label(&lane.projection),
        lane.partition.to_string(),
        lane.total.to_string(),
    ]
}

/// Moves `counter` up to `now`, from `last`.
fn advance(counter: &IntCounter, last: &mut u64, now: u64) {
    if now > *last {
        counter.inc_by(now - *last);
        *last = now;
    }
}
