//! Losing the database: what a runner's threads say about it, once, and when they give up.
//!
//! Every thread that talks to the database (the fetcher and each worker) retries a lost
//! connection with capped back-off. An outage is logged once for the whole runner when the
//! first thread meets it, and once when a thread gets through again, however many threads
//! and retries there are in between (each retry is logged at debug level). Threads notice a
//! restart one after the other: a failure within 10 s of the database coming back counts as
//! the same outage, and is logged at debug level only. A thread that has
//! not got through for longer than the give-up limit stops the runner with
//! [`Error::Unavailable`].

use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::Error;
use crate::engine::settings::Settings;

/// A failure this soon after the database came back belongs to the same outage: threads
/// notice a restart one after the other, and some only after another one got through.
const SAME_OUTAGE_WITHIN: Duration = Duration::from_secs(10);

/// The runner's view of the database's availability, shared by its threads.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the current outage began, if one is under way.
    since: Option<Instant>,
    /// The current outage continues one already said to be over: say nothing more about it.
    quiet: bool,
    /// When a thread last got through after an outage.
    back_at: Option<Instant>,
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
        let mut state = self.lock();
        let begins = state.since.is_none();
        if begins {
            state.since = Some(Instant::now());
            state.quiet = state
                .back_at
                .is_some_and(|at| at.elapsed() < SAME_OUTAGE_WITHIN);
        }
        if begins && !state.quiet {
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

    /// As [`lost`](Self::lost), waiting the back-off the failed attempts so far call for
    /// (from [`Settings::retry_delay`], doubling up to [`Settings::max_retry_delay`]), which it
    /// returns for the caller to wait.
    pub(crate) fn lost_with_backoff(
        &self,
        thread: &str,
        attempts: &mut Attempts,
        error: Error,
        settings: &Settings,
    ) -> Result<Duration, Error> {
        let delay = crate::backoff(
            attempts.failed + 1,
            settings.retry_delay,
            settings.max_retry_delay,
        );
        self.lost(thread, attempts, error, delay, settings)?;
        Ok(delay)
    }

    /// `thread` got through to the database. Logs the end of an outage, once.
    pub(crate) fn back(&self, thread: &str, attempts: &mut Attempts) {
        if attempts.failed == 0 {
            return;
        }
        *attempts = Attempts::default();
        let mut state = self.lock();
        if let Some(since) = state.since.take() {
            state.back_at = Some(Instant::now());
            if state.quiet {
                debug!("{thread} reconnected");
            } else {
                info!(
                    "the database is back ({thread} reconnected after {:.1} s)",
                    since.elapsed().as_secs_f64()
                );
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::lock(&self.state)
    }
}
