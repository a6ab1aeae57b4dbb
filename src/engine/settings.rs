//! The runtime's settings, and the stop signal every thread of a runner watches.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded};

/// The runtime's settings. [`Settings::default`] holds every default in one place.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Settings {
    /// Events read from the store per query. Default 5,000.
    pub batch_size: u32,
    /// How long the fetcher waits before reading again once it has caught up, when no append
    /// notifies it sooner; also how often a gap is looked at again. Default 100 ms.
    pub poll_interval: Duration,
    /// The longest wait between polls: while nothing arrives, the wait doubles from
    /// `poll_interval` up to this. Default 1 s.
    pub max_poll_interval: Duration,
    /// How long a missing position may hold the fetcher back before it logs a warning naming
    /// the transactions that may still commit it (repeated at this interval). Default 10 s.
    pub gap_warn_after: Duration,
    /// While catching up, events of a partition are gathered until it has this many before
    /// they are sent to its worker, so that owning many partitions still makes large
    /// transactions. Once caught up, events go out at once. Default 1,000.
    pub min_events_per_batch: usize,
    /// While catching up, the longest a partition's events are held for
    /// `min_events_per_batch` before they go out anyway, so that a quiet partition's events
    /// are applied during another's long catch-up. Default 200 ms.
    pub max_batch_delay: Duration,
    /// Batches queued per worker before the fetcher waits (back-pressure). Default 2.
    pub queue_depth: usize,
    /// Most events a worker applies in one transaction: batches queued behind the one it takes
    /// are applied with it, up to this many. Default 5,000.
    pub max_events_per_transaction: usize,
    /// How often a worker that receives no events still moves its checkpoint forward.
    /// Default 1 s.
    pub idle_checkpoint_interval: Duration,
    /// How often a progress line is logged while there is work. Default 5 s.
    pub progress_interval: Duration,
    /// Attempts at an event its projection fails on before the projection stops (or, with the
    /// park policy, parks it), counted per event: failures of other events of the same batch
    /// spend none of them. Default 3.
    pub max_attempts: u32,
    /// First delay before a retry; it doubles with each failure of the same event. Default
    /// 100 ms.
    pub retry_delay: Duration,
    /// Longest delay between retries. Default 5 s.
    pub max_retry_delay: Duration,
    /// The park storm breaker: a projection whose policy is
    /// [`PoisonPolicy::Park`](crate::PoisonPolicy::Park) and that would park more than this
    /// many aggregates within [`park_storm_window`](Self::park_storm_window) (in this process)
    /// stops instead, just before the next poison event, with
    /// [`Error::ParkStorm`](crate::Error::ParkStorm): so many poison events at once point to a
    /// bug in the projection rather than to bad events. 0 turns the breaker off. Default 20.
    pub park_storm_limit: u32,
    /// The window of [`park_storm_limit`](Self::park_storm_limit). Default 60 s.
    pub park_storm_window: Duration,
    /// Stop once every owned partition has caught up with the head of the stream as it was at
    /// start. Default off: run until shut down.
    pub exit_when_caught_up: bool,
    /// How long the router waits for a worker to take a batch before it leaves that partition
    /// out of the shared read, so that one slow partition does not hold the others back; the
    /// partition then reads its own events until it catches up. Default 5 s.
    pub straggler_after: Duration,
    /// While a worker waits to retry an event that failed, it takes the batches that arrive
    /// off its queue and holds them, so that the other partitions go on; once the runner's
    /// workers hold this many events together, a worker that waits leaves the shared read
    /// instead and later reads what it missed from the store, as a straggler. Default 100,000
    /// (tens of MB at most, only while retrying).
    pub max_events_held_while_retrying: usize,
    /// At start, a partition whose checkpoint is more than this many positions behind the
    /// furthest one (of any projection of the runner) reads its own events until it has caught
    /// up, instead of making the shared read start back at its position. This is how a new
    /// projection rebuilds from the first event while the others stay live. Default 100,000.
    pub catch_up_alone_beyond: i64,
    /// How long a thread keeps trying to reach the database before the runner gives up with
    /// [`Error::Unavailable`](crate::Error::Unavailable); shorter outages are ridden out.
    /// Default 10 minutes.
    pub give_up_after: Duration,
    /// How often a standby tries to take its partition over, a worker that receives nothing
    /// checks that its layout has not been replaced, and a new layout looks again for live
    /// processes of the old one; also the longest a worker waits at a time for its checkpoint
    /// row while another session holds it, so that a stop is seen meanwhile. Default 1 s.
    pub liveness_interval: Duration,
    /// Sharing partitions ([`Builder::share_partitions`](crate::Builder::share_partitions)):
    /// how often a process compares what it holds with its share. Default 200 ms.
    pub balance_interval: Duration,
    /// Sharing partitions: how long the set of live processes must stay the same before the
    /// shares move, so that a process that comes and goes moves nothing. Default 500 ms.
    pub settle_after: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            batch_size: 5_000,
            poll_interval: Duration::from_millis(100),
            max_poll_interval: Duration::from_secs(1),
            gap_warn_after: Duration::from_secs(10),
            min_events_per_batch: 1_000,
            max_batch_delay: Duration::from_millis(200),
            queue_depth: 2,
            max_events_per_transaction: 5_000,
            idle_checkpoint_interval: Duration::from_secs(1),
            progress_interval: Duration::from_secs(5),
            max_attempts: 3,
            retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_secs(5),
            park_storm_limit: 20,
            park_storm_window: Duration::from_secs(60),
            exit_when_caught_up: false,
            liveness_interval: Duration::from_secs(1),
            give_up_after: Duration::from_secs(600),
            straggler_after: Duration::from_secs(5),
            max_events_held_while_retrying: 100_000,
            catch_up_alone_beyond: 100_000,
            balance_interval: Duration::from_millis(200),
            settle_after: Duration::from_millis(500),
        }
    }
}

/// Stops a [`Runner`](crate::Runner) from anywhere (a signal handler, another thread). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Stopper {
    sender: Arc<Mutex<Option<Sender<()>>>>,
    /// Stopped with this one: the stoppers of a runner's projections.
    members: Arc<Vec<Stopper>>,
}

/// True once the stopper whose signal `stop` is has been told to stop (the channel never
/// carries a message: it disconnects).
pub(crate) fn stop_asked(stop: &Receiver<()>) -> bool {
    !matches!(stop.try_recv(), Err(TryRecvError::Empty))
}

impl Stopper {
    /// A stopper and the signal it gives: the receiver disconnects when [`stop`](Self::stop)
    /// is called (or every clone is dropped).
    pub(crate) fn new() -> (Stopper, Receiver<()>) {
        Stopper::over(Vec::new())
    }

    /// A stopper that also stops each of `members` (stopping one of them stops only it).
    pub(crate) fn over(members: Vec<Stopper>) -> (Stopper, Receiver<()>) {
        let (sender, stop) = bounded::<()>(0);
        (
            Stopper {
                sender: Arc::new(Mutex::new(Some(sender))),
                members: Arc::new(members),
            },
            stop,
        )
    }

    /// Asks the runner to stop: the fetcher stops reading, workers finish the transaction they
    /// are in (it commits or rolls back whole) and exit. Returns at once.
    pub fn stop(&self) {
        // Dropping the only sender disconnects the stop channel, which every thread watches.
        let mut sender = crate::lock(&self.sender);
        sender.take();
        drop(sender);
        for member in self.members.iter() {
            member.stop();
        }
    }
}
