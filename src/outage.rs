//! Losing the database: what a runner's threads say about it, once, and when they give up.
//!
//! Every thread that talks to the database (the fetcher and each worker) retries a lost
//! connection with capped back-off. An outage is logged once for the whole runner when the
//! first thread meets it, and once when a thread gets through again, however many threads
//! and retries there are in between (each retry is logged at debug level). A thread that has
//! not got through for longer than the give-up limit stops the runner with
//! [`Error::Unavailable`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::Error;
use crate::settings::Settings;

/// The runner's view of the database's availability, shared by its threads.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    /// When the current outage began, if one is under way.
    since: Mutex<Option<Instant>>,
}

/// One thread's failed attempts in a row.
#[derive(Debug, Default)]
pub(crate) struct Attempts {
    /// How many in a row, 0 while connected.
    pub(crate) failed: u32,
    /// When the first of them failed.
    first: Option<Instant>,
}

impl Outage {
    /// `thread` could not reach the database (`error`) and retries in `delay`. Logs the first
    /// failure of an outage; fails with [`Error::Unavailable`] once `thread` has not got
    /// through for [`Settings::give_up_after`].
    pub(crate) fn lost(
        &self,
        thread: &str,
        attempts: &mut Attempts,
        error: Error,
        delay: Duration,
        settings: &Settings,
    ) -> Result<(), Error> {
        let give_up_after = settings.give_up_after;
        attempts.failed += 1;
        let first = *attempts.first.get_or_insert_with(Instant::now);
        let chain = crate::error_chain(&error);
        if first.elapsed() >= give_up_after {
            return Err(Error::Unavailable {
                waited: first.elapsed(),
                source: Box::new(error),
            });
        }
        let mut since = self.lock();
        if since.is_none() {
            *since = Some(Instant::now());
            warn!(
                "lost the database ({thread}: {chain}); retrying with back-off up to {} s, \
                 giving up after {} s without it",
                settings.max_retry_delay.as_secs().max(1),
                give_up_after.as_secs()
            );
        } else {
            debug!(
                "{thread}: {chain}; attempt {} failed, retrying in {} ms",
                attempts.failed,
                delay.as_millis()
            );
        }
        Ok(())
    }

    /// `thread` got through to the database. Logs the end of an outage, once.
    pub(crate) fn back(&self, thread: &str, attempts: &mut Attempts) {
        if attempts.failed == 0 {
            return;
        }
        *attempts = Attempts::default();
        if let Some(since) = self.lock().take() {
            info!(
                "the database is back ({thread} reconnected after {:.1} s)",
                since.elapsed().as_secs_f64()
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        match self.since.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}
