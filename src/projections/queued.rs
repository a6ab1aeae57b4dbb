//! Queued writes: rows a projection's `apply` hands to its [`Context`](crate::Context) instead
//! of sending one statement per event, and that the worker sends together, one statement
//! execution per shape, in the transaction that moves the checkpoint.

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::{BufMut, BytesMut};
use postgres::Transaction;
use postgres::types::{IsNull, Kind, ToSql, Type, to_sql_checked};
use postgres_protocol::types::{ArrayDimension, array_to_sql};

use crate::error::BoxError;

/// A statement that writes the rows [`Context::queue`](crate::Context::queue) collects, all in
/// one execution: its parameters are arrays, one per column, each holding that column of every
/// row queued (`SELECT ... FROM unnest($1::text[], $2::int8[])`).
///
/// The worker sends each statement's rows after the projection has applied the transaction's
/// events, and before it writes the checkpoint, in the same transaction: the writes are
/// applied exactly once, like any other write of `apply`. Their effect is that of executing the
/// statement once per queued row, in the order queued, provided a row writes only what its key
/// names (the first [`keyed_by`](Self::keyed_by) columns): rows of different keys may be sent
/// in any order, and rows that repeat a key (of any queued statement) go into later
/// executions, after the rows queued before them, so a later write of a key wins and an
/// `ON CONFLICT ... DO UPDATE` never meets the same key twice.
///
/// ```
/// use projector::QueuedWrite;
/// use projector::postgres::types::Type;
///
/// /// Per event type, how many events: an increment per queued row, keyed by the type.
/// const COUNT: QueuedWrite = QueuedWrite::new(
///     "INSERT INTO event_counts AS c (event_type, n) \
///      SELECT t, 1 FROM unnest($1::text[]) AS r(t) \
///      ON CONFLICT (event_type) DO UPDATE SET n = c.n + 1",
///     &[Type::TEXT_ARRAY],
/// )
/// .keyed_by(1);
/// ```
#[derive(Debug, Clone)]
pub struct QueuedWrite {
    sql: Cow<'static, str>,
    columns: Cow<'static, [Type]>,
    key_columns: usize,
    unwritten: Option<&'static str>,
}

impl QueuedWrite {
    /// The statement `sql`, whose parameter `$n` takes column `n` of the queued rows as an
    /// array of type `columns[n - 1]` (`Type::TEXT_ARRAY`, `Type::INT8_ARRAY`, ...). Without
    /// [`keyed_by`](Self::keyed_by), all its rows go into one execution, in any order: for rows
    /// that never meet (inserts of distinct rows), or SQL that folds them (`GROUP BY`).
    pub const fn new(sql: &'static str, columns: &'static [Type]) -> QueuedWrite {
        QueuedWrite {
            sql: Cow::Borrowed(sql),
            columns: Cow::Borrowed(columns),
            key_columns: 0,
            unwritten: None,
        }
    }

    /// The first `columns` columns name what a row writes (the conflict target of an upsert,
    /// the `WHERE` of an update): rows with the same key are sent in the order queued, one per
    /// execution.
    pub const fn keyed_by(mut self, columns: usize) -> QueuedWrite {
        self.key_columns = columns;
        self
    }

    /// Every queued row must write a row (an upsert whose `DO UPDATE ... WHERE` refuses a row
    /// the read model does not take): an execution that writes fewer fails with `why`, and the
    /// event whose row it was is found as for any failure (it stops the projection or is
    /// parked, after the retries).
    pub const fn every_row_writes(mut self, why: &'static str) -> QueuedWrite {
        self.unwritten = Some(why);
        self
    }

    /// The statement's text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    fn same_as(&self, other: &QueuedWrite) -> bool {
        self.key_columns == other.key_columns
            && self.columns == other.columns
            && (std::ptr::eq(self.sql.as_ptr(), other.sql.as_ptr()) || self.sql == other.sql)
            && self.sql.len() == other.sql.len()
    }
}

/// Fewer rows written than queued, by a [`QueuedWrite::every_row_writes`] statement.
#[derive(Debug)]
pub(crate) struct Unwritten {
    why: &'static str,
    written: u64,
    queued: usize,
}

impl std::fmt::Display for Unwritten {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (its queued write wrote {} of {} rows)",
            self.why, self.written, self.queued
        )
    }
}

impl std::error::Error for Unwritten {}

/// One queued row: its statement and where its values are in [`Queue::values`].
#[derive(Debug, Clone, Copy)]
struct Row {
    statement: usize,
    start: usize,
    /// The end of the key columns' values (`start` when the statement has no key).
    key_end: usize,
    end: usize,
}

/// The rows queued since the last flush, in order, with their values encoded for the server
/// as array elements (a length, or -1 for NULL, then the bytes).
#[derive(Debug, Default)]
pub(crate) struct Queue {
    statements: Vec<QueuedWrite>,
    rows: Vec<Row>,
    values: BytesMut,
}

impl Queue {
    /// Queues one row of `write`, encoding its values now: a value of the wrong type or count
    /// fails here, in the `apply` of its event.
    pub(crate) fn push(
        &mut self,
        write: &QueuedWrite,
        row: &[&(dyn ToSql + Sync)],
    ) -> Result<(), BoxError> {
        if write.key_columns > write.columns.len() {
            return Err(format!(
                "a queued write keyed by {} of its {} columns ({})",
                write.key_columns,
                write.columns.len(),
                write.sql
            )
            .into());
        }
        if row.len() != write.columns.len() {
            return Err(format!(
                "a row of {} values queued for a write of {} columns ({})",
                row.len(),
                write.columns.len(),
                write.sql
            )
            .into());
        }
        let statement = match self.statements.iter().position(|s| s.same_as(write)) {
            Some(index) => index,
            None => {
                self.statements.push(write.clone());
                self.statements.len() - 1
            }
        };
        let start = self.values.len();
        let mut key_end = start;
        for (column, (value, array)) in row.iter().zip(write.columns.iter()).enumerate() {
            let element = match array.kind() {
                Kind::Array(element) => element,
                _ => {
                    self.values.truncate(start);
                    return Err(format!(
                        "column {} of a queued write is of type {array}, not an array type ({})",
                        column + 1,
                        write.sql
                    )
                    .into());
                }
            };
            if let Err(error) = self.encode(*value, element) {
                self.values.truncate(start);
                return Err(error);
            }
            if column + 1 == write.key_columns {
                key_end = self.values.len();
            }
        }
        self.rows.push(Row {
            statement,
            start,
            key_end,
            end: self.values.len(),
        });
        Ok(())
    }

    /// Appends `value` as an array element of type `element`.
    fn encode(&mut self, value: &(dyn ToSql + Sync), element: &Type) -> Result<(), BoxError> {
        let at = self.values.len();
        self.values.put_i32(0);
        match value.to_sql_checked(element, &mut self.values)? {
            IsNull::Yes => {
                self.values.truncate(at);
                self.values.put_i32(-1);
            }
            IsNull::No => {
                let length = i32::try_from(self.values.len() - at - 4)
                    .map_err(|_| "a queued value of 2 GiB or more")?;
                self.values[at..at + 4].copy_from_slice(&length.to_be_bytes());
            }
        }
        Ok(())
    }

    /// Forgets every queued row.
    pub(crate) fn clear(&mut self) {
        self.rows.clear();
        self.values.clear();
    }

    /// Sends the queued rows through `tx` and forgets them (sent or not).
    pub(crate) fn flush(&mut self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        let result = self.send(tx);
        self.clear();
        result
    }

    fn send(&self, tx: &mut Transaction<'_>) -> Result<(), BoxError> {
        for ((_, statement), rows) in self.executions() {
            let write = &self.statements[statement];
            let arrays = self.arrays(write, &rows)?;
            let params: Vec<(&(dyn ToSql + Sync), Type)> = arrays
                .iter()
                .zip(write.columns.iter())
                .map(|(array, ty)| (array as &(dyn ToSql + Sync), ty.clone()))
                .collect();
            let written = tx.execute_typed(&write.sql, &params)?;
            if let Some(why) = write.unwritten {
                if written < rows.len() as u64 {
                    return Err(Box::new(Unwritten {
                        why,
                        written,
                        queued: rows.len(),
                    }));
                }
            }
        }
        Ok(())
    }

    /// The executions to send, in order: per round, per statement (in the order first
    /// queued), its rows. A row goes into the round after the last one holding a row of its
    /// key (the first round for rows without a key).
    fn executions(&self) -> Vec<((usize, usize), Vec<Row>)> {
        let mut last_round: HashMap<&[u8], usize> = HashMap::new();
        let mut executions: Vec<((usize, usize), Vec<Row>)> = Vec::new();
        let mut index: HashMap<(usize, usize), usize> = HashMap::new();
        for row in &self.rows {
            let round = if row.key_end == row.start {
                0
            } else {
                let key = &self.values[row.start..row.key_end];
                let round = last_round.get(key).map_or(0, |last| last + 1);
                last_round.insert(key, round);
                round
            };
            let at = *index.entry((round, row.statement)).or_insert_with(|| {
                executions.push(((round, row.statement), Vec::new()));
                executions.len() - 1
            });
            executions[at].1.push(*row);
        }
        executions.sort_by_key(|(order, _)| *order);
        executions
    }

    /// One array per column of `write`, of the values of `rows`.
    fn arrays(&self, write: &QueuedWrite, rows: &[Row]) -> Result<Vec<Encoded>, BoxError> {
        // Where each row's next value starts.
        let mut at: Vec<usize> = rows.iter().map(|row| row.start).collect();
        let mut arrays = Vec::with_capacity(write.columns.len());
        for array in write.columns.iter() {
            let element = match array.kind() {
                Kind::Array(element) => element.oid(),
                _ => 0,
            };
            let values = &self.values;
            let elements = at.iter_mut().map(|at| {
                let length = i32::from_be_bytes([
                    values[*at],
                    values[*at + 1],
                    values[*at + 2],
                    values[*at + 3],
                ]);
                let data = usize::try_from(length)
                    .ok()
                    .map(|length| &values[*at + 4..*at + 4 + length]);
                *at += 4 + data.map_or(0, <[u8]>::len);
                data
            });
            let mut bytes = BytesMut::new();
            let dimension = ArrayDimension {
                len: i32::try_from(rows.len()).map_err(|_| "more than 2^31 queued rows")?,
                lower_bound: 1,
            };
            array_to_sql(
                Some(dimension),
                element,
                elements,
                |element, out| match element {
                    Some(data) => {
                        out.put_slice(data);
                        Ok(postgres_protocol::IsNull::No)
                    }
                    None => Ok(postgres_protocol::IsNull::Yes),
                },
                &mut bytes,
            )?;
            arrays.push(Encoded(bytes));
        }
        debug_assert!(at.iter().zip(rows).all(|(at, row)| *at == row.end));
        Ok(arrays)
    }
}

/// A parameter already encoded (an array of queued values).
#[derive(Debug)]
struct Encoded(BytesMut);

impl ToSql for Encoded {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        out.put_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(ty.kind(), Kind::Array(_))
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYED: QueuedWrite =
        QueuedWrite::new("keyed", &[Type::TEXT_ARRAY, Type::INT8_ARRAY]).keyed_by(1);
    const OTHER: QueuedWrite = QueuedWrite::new("other", &[Type::TEXT_ARRAY]).keyed_by(1);
    const UNKEYED: QueuedWrite = QueuedWrite::new("unkeyed", &[Type::INT4_ARRAY]);

    /// The executions as (round, statement, first column of each row as text or number).
    fn plan(queue: &Queue) -> Vec<(usize, &str, usize)> {
        queue
            .executions()
            .into_iter()
            .map(|((round, statement), rows)| {
                (round, queue.statements[statement].sql(), rows.len())
            })
            .collect()
    }

    #[test]
    fn rows_repeating_a_key_go_into_later_executions_in_order() {
        let mut queue = Queue::default();
        queue.push(&KEYED, &[&"a", &1i64]).expect("a1");
        queue.push(&KEYED, &[&"b", &1i64]).expect("b1");
        queue.push(&OTHER, &[&"a"]).expect("a in other");
        queue.push(&UNKEYED, &[&7i32]).expect("unkeyed");
        queue.push(&KEYED, &[&"a", &2i64]).expect("a2");
        queue.push(&UNKEYED, &[&8i32]).expect("unkeyed");
        assert_eq!(
            plan(&queue),
            [
                (0, "keyed", 2),
                (0, "unkeyed", 2),
                (1, "other", 1),
                (2, "keyed", 1)
            ]
        );
    }

    #[test]
    fn values_of_the_wrong_type_or_count_are_refused_when_queued() {
        let mut queue = Queue::default();
        assert!(queue.push(&KEYED, &[&"a", &1i32]).is_err());
        assert!(queue.push(&KEYED, &[&"a"]).is_err());
        let not_array = QueuedWrite::new("x", &[Type::TEXT]);
        assert!(queue.push(&not_array, &[&"a"]).is_err());
        let keyed_too_far = QueuedWrite::new("y", &[Type::TEXT_ARRAY]).keyed_by(2);
        assert!(queue.push(&keyed_too_far, &[&"a"]).is_err());
        assert!(queue.rows.is_empty() && queue.values.is_empty());
    }

    #[test]
    fn columns_become_arrays_with_nulls() {
        let mut queue = Queue::default();
        let none: Option<&str> = None;
        queue.push(&OTHER, &[&"xy"]).expect("xy");
        queue.push(&OTHER, &[&none]).expect("null");
        let rows = queue.rows.clone();
        let arrays = queue.arrays(&OTHER, &rows).expect("arrays");
        let mut expected = BytesMut::new();
        for word in [1, 1, Type::TEXT.oid() as i32, 2, 1, 2] {
            expected.put_i32(word);
        }
        expected.put_slice(b"xy");
        expected.put_i32(-1);
        assert_eq!(arrays[0].0, expected);
    }
}
