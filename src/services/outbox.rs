//! The federation outbox's shared parts: queue positions and the signal
//! that wakes a destination's sender once a batch with items for it has
//! committed. Rooms write the items (in the batch of the events they
//! carry); the federation sender reads and sends them.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

pub struct Outbox {
    last_position: AtomicU64,
    wake: mpsc::UnboundedSender<String>,
    woken: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
}

impl Outbox {
    pub fn new() -> Arc<Self> {
        Self::starting_after(0)
    }

    /// An outbox whose positions all come after `last`, the highest one
    /// already stored, even if the clock went back since it was handed out.
    pub fn starting_after(last: u64) -> Arc<Self> {
        let (wake, woken) = mpsc::unbounded_channel();
        Arc::new(Outbox {
            last_position: AtomicU64::new(last),
            wake,
            woken: Mutex::new(Some(woken)),
        })
    }

    /// A queue position later than every one handed out before, in this
    /// process or an earlier one: microseconds since the epoch, or one
    /// past the last position when the clock has not moved on.
    pub fn next_position(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let previous = self
            .last_position
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        now.max(previous + 1)
    }

    /// Tells the sender that `destination` has new items.
    pub fn wake(&self, destination: &str) {
        let _ = self.wake.send(destination.to_owned());
    }

    /// The receiving end of the wake-ups; only the sender takes it, once.
    pub fn take_wakeups(&self) -> Option<mpsc::UnboundedReceiver<String>> {
        self.woken.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Destinations a draft queued items for, woken when the draft is gone
/// (after its batch committed, or failed to: a wake-up with nothing new
/// costs the sender one read).
pub struct PendingWakeups {
    outbox: Arc<Outbox>,
    pub destinations: BTreeSet<String>,
}

impl PendingWakeups {
    pub fn new(outbox: Arc<Outbox>) -> Self {
        PendingWakeups {
            outbox,
            destinations: BTreeSet::new(),
        }
    }
}

impl Drop for PendingWakeups {
    fn drop(&mut self) {
        for destination in &self.destinations {
            self.outbox.wake(destination);
        }
    }
}
