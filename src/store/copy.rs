//! Reading a settled range of the stream by one streaming binary `COPY`, split into rows as it
//! comes (the router decodes them, in its own thread, as it does the rows of a query).
//!
//! Far from the head, the cost of a catch-up is the server's work per statement and the
//! client's per row; a `COPY ... TO STDOUT (FORMAT binary)` of a whole range sends the rows
//! back to back, as fast as the server can produce them. It takes no parameters and no
//! `LIMIT`, so it is used only for a range whose upper bound is *settled* (see
//! [`Settling`](crate::store::gap::Settling)): every event in it is committed and none can
//! still appear, so reading it whole is the read the gap rule would allow.

use postgres::binary_copy::{BinaryCopyOutIter, BinaryCopyOutRow};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use postgres::{Client, Error};

use crate::event::Event;
use crate::store::EVENT_COLUMNS;

/// The column types of [`EVENT_COLUMNS`] on this store, as a binary `COPY` needs them
/// (`created_at` may be a timestamp with or without time zone).
pub(crate) struct EventCopy {
    types: Vec<Type>,
}

impl EventCopy {
    /// Asks the server the types of the event columns.
    pub(crate) fn prepare(client: &mut Client) -> Result<EventCopy, Error> {
        let statement = client.prepare(&format!("SELECT {EVENT_COLUMNS} FROM events LIMIT 0"))?;
        let types = statement
            .columns()
            .iter()
            .map(|column| column.type_().clone())
            .collect();
        Ok(EventCopy { types })
    }

    /// Streams every event in `(after, through]`, in position order, handing `each` the rows
    /// `chunk` at a time (split, not yet decoded: see [`event_from_copy`]); stops early when
    /// `each` returns false. The last chunk may be smaller, or empty. `through` must be
    /// settled.
    pub(crate) fn stream(
        &self,
        client: &mut Client,
        (after, through): (i64, i64),
        chunk: usize,
        mut each: impl FnMut(Copied) -> bool,
    ) -> Result<(), Error> {
        // Integers formatted in: a COPY takes no parameters.
        let sql = format!(
            "COPY (SELECT {EVENT_COLUMNS} FROM events \
             WHERE global_position > {after} AND global_position <= {through} \
             ORDER BY global_position) TO STDOUT (FORMAT binary)"
        );
        let reader = client.copy_out(&sql)?;
        let mut rows = BinaryCopyOutIter::new(reader, &self.types);
        let chunk = chunk.max(1);
        let mut copied = Copied::with_capacity(chunk);
        while let Some(row) = rows.next()? {
            copied.rows.push(row);
            if copied.rows.len() == chunk {
                let full = std::mem::replace(&mut copied, Copied::with_capacity(chunk));
                if !each(full.positioned()?) {
                    return Ok(());
                }
            }
        }
        copied.last = true;
        each(copied.positioned()?);
        Ok(())
    }
}

/// One chunk of a `COPY`.
pub(crate) struct Copied {
    /// The rows, in position order.
    pub(crate) rows: Vec<BinaryCopyOutRow>,
    /// The position of the last row, if any.
    pub(crate) last_position: Option<i64>,
    /// The last chunk of the `COPY`.
    pub(crate) last: bool,
}

impl Copied {
    fn with_capacity(chunk: usize) -> Copied {
        Copied {
            rows: Vec::with_capacity(chunk),
            last_position: None,
            last: false,
        }
    }

    fn positioned(mut self) -> Result<Copied, Error> {
        self.last_position = self.rows.last().map(|row| row.try_get(0)).transpose()?;
        Ok(self)
    }
}

/// An [`Event`] from a row of [`EVENT_COLUMNS`] in a binary `COPY`. Panics, as
/// [`event_from_row`](crate::store::event_from_row) does, on a column of another type: the
/// types are the server's own, of columns the migration checked.
pub(crate) fn event_from_copy(row: &BinaryCopyOutRow) -> Event {
    Event {
        global_position: row.get(0),
        bounded_context: row.get(1),
        aggregate_type: row.get(2),
        aggregate_id: row.get(3),
        aggregate_version: row.get(4),
        event_id: row.get(5),
        event_type: row.get(6),
        event_version: row.get(7),
        payload: row.get(8),
        trace_id: row.get(9),
        correlation_id: row.get(10),
        causation_id: row.get(11),
        metadata: row.get(12),
        created_at: row.get(13),
    }
}
