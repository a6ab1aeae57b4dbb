//! The fetcher: reads the stream in global position order and hands each event to the worker
//! of its partition.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, info, warn};
use postgres::{Client, Statement};

use crate::partition::partition_of;
use crate::runner::Settings;
use crate::store::{EVENT_COLUMNS, event_from_row};
use crate::worker::Batch;
use crate::{Database, Error, backoff};

/// Figures the fetcher shares while it runs, for progress lines.
#[derive(Debug, Default)]
pub(crate) struct FetchProgress {
    pub(crate) read: AtomicU64,
    pub(crate) position: AtomicI64,
}

pub(crate) struct Fetcher {
    pub(crate) database: Database,
    pub(crate) settings: Arc<Settings>,
    pub(crate) total: u32,
    /// The worker of each owned partition.
    pub(crate) workers: HashMap<u32, Sender<Batch>>,
    /// Read from after this position.
    pub(crate) start: i64,
    /// With `exit_when_caught_up`: stop once the stream is read up to here.
    pub(crate) target: i64,
    pub(crate) stop: Receiver<()>,
    pub(crate) faults: Receiver<u32>,
    pub(crate) progress: Arc<FetchProgress>,
}

struct Reader {
    client: Client,
    next_batch: Statement,
}

impl Fetcher {
    /// Reads until stopped; dropping `self.workers` on return tells the workers to finish.
    pub(crate) fn run(self, reader: Client) -> Result<u64, Error> {
        let mut reader = Some(prepare(reader)?);
        let mut position = self.start;
        let mut read = 0;
        let mut lost = 0;
        let limit = i64::from(self.settings.batch_size);
        loop {
            if self.stopped() {
                break;
            }
            let reader_now = match reader.as_mut() {
                Some(reader) => reader,
                None => match self.database.connect().and_then(prepare) {
                    Ok(fresh) => {
                        info!("fetcher: reconnected to the database");
                        lost = 0;
                        reader.insert(fresh)
                    }
                    Err(error) if error.is_connection_loss() => {
                        lost += 1;
                        if self.wait_before_retry(lost, &error) {
                            break;
                        }
                        continue;
                    }
                    Err(error) => return Err(error),
                },
            };
            let rows = match reader_now
                .client
                .query(&reader_now.next_batch, &[&position, &limit])
            {
                Ok(rows) => rows,
                Err(source) => {
                    let error = Error::Database {
                        action: format!("reading events after global position {position}"),
                        source,
                    };
                    if !error.is_connection_loss() {
                        return Err(error);
                    }
                    reader = None;
                    lost += 1;
                    if self.wait_before_retry(lost, &error) {
                        break;
                    }
                    continue;
                }
            };
            let Some(last) = rows.last().map(|row| row.get::<_, i64>(0)) else {
                if self.settings.exit_when_caught_up && position >= self.target {
                    break;
                }
                if self.idle() {
                    break;
                }
                continue;
            };
            let full = rows.len() as i64 == limit;
            let mut routed: HashMap<u32, Vec<_>> = HashMap::with_capacity(self.workers.len());
            for row in &rows {
                let aggregate_id: &str = row.get(3);
                let partition = partition_of(aggregate_id, self.total);
                if self.workers.contains_key(&partition) {
                    routed
                        .entry(partition)
                        .or_default()
                        .push(event_from_row(row));
                }
            }
            read += rows.len() as u64;
            drop(rows);
            if self.hand_out(routed, last) {
                break;
            }
            position = last;
            self.progress.read.store(read, Ordering::Relaxed);
            self.progress.position.store(position, Ordering::Relaxed);
            if !full && self.settings.exit_when_caught_up && position >= self.target {
                break;
            }
        }
        debug!("fetcher: stopped at global position {position} after reading {read} events");
        Ok(read)
    }

    /// Sends every owned partition its events of this read (possibly none) and `upto`; true
    /// when asked to stop meanwhile, or a worker has gone.
    fn hand_out(&self, mut routed: HashMap<u32, Vec<crate::Event>>, upto: i64) -> bool {
        for (partition, worker) in &self.workers {
            let batch = Batch {
                events: routed.remove(partition).unwrap_or_default(),
                upto,
            };
            select! {
                send(worker, batch) -> sent => if sent.is_err() { return true },
                recv(self.stop) -> _ => return true,
                recv(self.faults) -> _ => return true,
            }
        }
        false
    }

    /// Waits for the poll interval; true when asked to stop meanwhile.
    fn idle(&self) -> bool {
        select! {
            recv(self.stop) -> _ => true,
            recv(self.faults) -> _ => true,
            default(self.settings.poll_interval) => false,
        }
    }

    fn wait_before_retry(&self, attempt: u32, error: &Error) -> bool {
        let delay = backoff(
            attempt,
            self.settings.retry_delay,
            self.settings.max_retry_delay,
        );
        warn!(
            "fetcher: {}; retrying in {} ms",
            crate::error_chain(error),
            delay.as_millis()
        );
        select! {
            recv(self.stop) -> _ => true,
            recv(self.faults) -> _ => true,
            default(delay) => false,
        }
    }

    fn stopped(&self) -> bool {
        use crossbeam_channel::TryRecvError::Disconnected;
        matches!(self.stop.try_recv(), Err(Disconnected) | Ok(())) || self.faults.try_recv().is_ok()
    }
}

fn prepare(mut client: Client) -> Result<Reader, Error> {
    let next_batch = client
        .prepare(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE global_position > $1 \
             ORDER BY global_position LIMIT $2"
        ))
        .map_err(Error::database("preparing the event query"))?;
    Ok(Reader { client, next_batch })
}
