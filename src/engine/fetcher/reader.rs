//! The fetcher's reads: one connection that reads the stream after a position, cut before
//! the first position that may still commit (the gap rule, [`crate::store::gap`]), whole
//! rows or only the rows of the partitions read for, and listens for appends.

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, Row, Statement};

use crate::engine::router::{Lane, Routes};
use crate::engine::settings::Settings;
use crate::engine::straggler::Stragglers;
use crate::engine::wanted::Wanted;
use crate::event::Scope;
use crate::store::gap::{Before, Gaps, Held, Writers, holes};
use crate::store::{EVENT_COLUMNS, ScopeFilter, scope_filter};
use crate::{Database, Error};

/// A connection that reads events, listens for appends, and knows the writers' relations.
pub(super) struct Reader {
    pub(super) client: Client,
    /// Whether one position has committed: looked at while a gap holds the fetcher back,
    /// instead of reading the batch above it again.
    filled: Statement,
    writers: Writers,
    shape: Shape,
}

/// How a read gets its rows. Each statement's first step reads after `$1`, `$2` events at
/// most; the complete prefix of the stream is known from it.
enum Shape {
    /// Per read, as [`Wanted`] finds best for the lanes read for: whole rows in one step
    /// (`whole`), or, when they hold few partitions, the position and aggregate of every event
    /// (`keys`, cheap for the server to send), then whole rows of theirs only (`at_positions`).
    Rows {
        whole: Statement,
        keys: Statement,
        at_positions: Statement,
    },
    /// When every projection has a scope: positions (to find gaps), then whole rows of the
    /// events in some projection's scope only, the filter applied by the server.
    Scoped {
        positions: Statement,
        in_scope: Statement,
        filter: ScopeFilter,
    },
}

/// One read of the stream, cut before the first position that may still commit.
pub(super) struct Read {
    /// The rows, in position order, up to `upto` (only the wanted ones, unless whole).
    pub(super) rows: Vec<Row>,
    /// Per lane, whether `rows` has its events; `None` when it has every lane's.
    pub(super) covered: Option<Vec<bool>>,
    /// Events read, of all partitions.
    pub(super) seen: usize,
    /// The stream is complete up to here (no position at or below may still appear).
    pub(super) upto: i64,
    /// The read filled its limit: more may be waiting.
    pub(super) full: bool,
    /// A missing position held the read back.
    pub(super) held: bool,
}

impl Reader {
    pub(super) fn open(
        mut client: Client,
        database: &Database,
        routes: &Routes,
    ) -> Result<Reader, Error> {
        let prepare = |client: &mut Client, sql: &str| {
            client
                .prepare(sql)
                .map_err(Error::database("preparing the event query"))
        };
        let scopes: Option<Vec<&Scope>> = routes.scopes().into_iter().collect();
        let filter = scopes.and_then(|scopes| scope_filter(&scopes, 3));
        let shape = if let Some(filter) = filter {
            let positions = prepare(
                &mut client,
                "SELECT global_position FROM events WHERE global_position > $1 \
                 ORDER BY global_position LIMIT $2",
            )?;
            let in_scope = prepare(
                &mut client,
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events \
                     WHERE global_position > $1 AND global_position <= $2 AND {} \
                     ORDER BY global_position",
                    filter.condition
                ),
            )?;
            Shape::Scoped {
                positions,
                in_scope,
                filter,
            }
        } else {
            Shape::Rows {
                whole: prepare(
                    &mut client,
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE global_position > $1 \
                         ORDER BY global_position LIMIT $2"
                    ),
                )?,
                keys: prepare(
                    &mut client,
                    "SELECT global_position, aggregate_id FROM events \
                     WHERE global_position > $1 ORDER BY global_position LIMIT $2",
                )?,
                at_positions: prepare(
                    &mut client,
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE global_position = ANY($1) \
                         ORDER BY global_position"
                    ),
                )?,
            }
        };
        let filled = prepare(
            &mut client,
            "SELECT EXISTS (SELECT 1 FROM events WHERE global_position = $1)",
        )?;
        let writers = Writers::find(&mut client)?;
        client
            .batch_execute(database.listen_statement())
            .map_err(Error::database("listening for appends"))?;
        Ok(Reader {
            client,
            filled,
            writers,
            shape,
        })
    }

    /// Reads up to `limit` events after `position`, keeping only the complete prefix, with
    /// whole rows of the events of the `lanes` that `stragglers` says to read for.
    pub(super) fn read(
        &mut self,
        position: i64,
        limit: i64,
        gaps: &mut Gaps,
        settings: &Settings,
        (lanes, stragglers): (&[Lane], &Stragglers),
    ) -> Result<Read, postgres::Error> {
        // Before the first statement: a straggler that asked is read for from this read on.
        let to_read = stragglers.lanes_to_read(position);
        let dead_through =
            match gaps.before_read(&mut self.client, &self.writers, settings.gap_warn_after)? {
                Before::Read { dead_through } => dead_through.unwrap_or(position),
                Before::Held => {
                    // The fetcher waits at `position + 1`: read again only once it has committed.
                    let filled: bool = self
                        .client
                        .query_one(&self.filled, &[&(position + 1)])?
                        .get(0);
                    if !filled {
                        return Ok(Read::nothing_at(position, true));
                    }
                    position
                }
            };
        let (first, wanted) = match &self.shape {
            Shape::Scoped { positions, .. } => (positions, None),
            Shape::Rows { whole, keys, .. } => {
                let wanted = Wanted::new(lanes, &to_read);
                if wanted.is_at_most_half() {
                    (keys, Some(wanted))
                } else {
                    (whole, None)
                }
            }
        };
        let mut rows = self.client.query(first, &[&position, &limit])?;
        let mut full = rows.len() as i64 == limit;
        let Some(last) = rows.last().map(|row| row.get::<_, i64>(0)) else {
            return Ok(Read::nothing_at(position, false));
        };
        let positions: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
        let holes = holes(position, &positions, dead_through);
        let first_hole = holes.first().map_or(last + 1, |&(first, _)| first);
        let (upto, held) = match gaps.hold(&mut self.client, &self.writers, &holes, last)? {
            Held::Pass => (last, false),
            Held::ReadAgain => {
                // Read again at once: rows may have filled the holes since this read.
                full = true;
                (first_hole - 1, false)
            }
            Held::Wait => (first_hole - 1, true),
        };
        rows.retain(|row| row.get::<_, i64>(0) <= upto);
        let seen = rows.len();
        let (rows, covered) = match (&self.shape, wanted) {
            (Shape::Rows { .. }, None) => (rows, None),
            (Shape::Rows { at_positions, .. }, Some(wanted)) => {
                let rows = rows_of(&mut self.client, at_positions, &rows, &wanted)?;
                (rows, Some(wanted.covered_lanes()))
            }
            (Shape::Scoped { .. }, _) if rows.is_empty() => (rows, None),
            (
                Shape::Scoped {
                    in_scope, filter, ..
                },
                _,
            ) => {
                let mut params: Vec<&(dyn ToSql + Sync)> = vec![&position, &upto];
                params.extend(filter.params());
                (self.client.query(in_scope, &params)?, None)
            }
        };
        Ok(Read {
            rows,
            covered,
            seen,
            upto,
            full,
            held,
        })
    }
}

/// Whole rows of the events among `keys` (positions and aggregate ids) that `wanted` takes.
fn rows_of(
    client: &mut Client,
    at_positions: &Statement,
    keys: &[Row],
    wanted: &Wanted,
) -> Result<Vec<Row>, postgres::Error> {
    let positions: Vec<i64> = keys
        .iter()
        .filter(|row| wanted.takes(row.get(1)))
        .map(|row| row.get(0))
        .collect();
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    client.query(at_positions, &[&positions])
}

impl Reader {
    /// Drops the notifications of appends that came with the replies of the last read: while
    /// more rows are waiting the fetcher reads again at once, so they wake nothing, and the
    /// driver would otherwise keep one per append for the whole catch-up. Only those already
    /// received: none is waited for.
    pub(super) fn forget_notifications(&mut self) {
        let mut notifications = self.client.notifications();
        let held = notifications.len();
        let mut iter = notifications.iter();
        for _ in 0..held {
            if !matches!(iter.next(), Ok(Some(_))) {
                break;
            }
        }
    }
}

impl Read {
    /// A read that found nothing new after `position`.
    fn nothing_at(position: i64, held: bool) -> Read {
        Read {
            rows: Vec::new(),
            covered: None,
            seen: 0,
            upto: position,
            full: false,
            held,
        }
    }
}
