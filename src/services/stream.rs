//! The one counter of stream positions, shared by every kind of write that
//! sync will order: events, account data, receipts, presence.
//!
//! Positions are handed out before their batch commits, and batches commit
//! concurrently, so position 7 may be durable before position 6. A reader
//! must never be told "everything up to 7" while 6 is still in flight: it
//! would miss 6 for good. So every position is reserved until its batch has
//! committed (or failed), and [`StreamCounter::current`] is the highest
//! position below which nothing is in flight.
//!
//! Waiting readers (a long-polling `/sync`) are woken through [`Wakeups`]:
//! a generation number bumped whenever the current position may have moved
//! or an in-memory stream (typing) changed. A reader takes the generation
//! before it looks, so a write that lands between its look and its wait
//! still wakes it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::storage::tables::{self, StreamEntry};
use crate::storage::{Batch, Direction, KeyRange, Storage, StorageError};

pub struct StreamCounter {
    last: AtomicU64,
    in_flight: Mutex<BTreeSet<u64>>,
    wakeups: Arc<Wakeups>,
}

/// Wakes every waiting reader when something they may include was written.
pub struct Wakeups {
    generation: tokio::sync::watch::Sender<u64>,
}

impl Default for Wakeups {
    fn default() -> Self {
        Wakeups {
            generation: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Wakeups {
    /// Wakes every reader waiting now.
    pub fn wake(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// A receiver marked as having seen the current generation: its
    /// `changed()` resolves at the next [`Wakeups::wake`] after this call.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// A position whose batch has not finished committing; dropping it (after
/// the commit, whatever its outcome) releases the position.
#[must_use = "keep the reservation until the batch has been committed"]
pub struct Reservation {
    counter: Arc<StreamCounter>,
    position: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut in_flight = self
            .counter
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        in_flight.remove(&self.position);
        drop(in_flight);
        self.counter.wakeups.wake();
    }
}

impl StreamCounter {
    /// Continues after the last position recorded in the `stream` table.
    pub fn load(storage: &Storage, wakeups: Arc<Wakeups>) -> Result<Self, StorageError> {
        let everything = KeyRange::prefix(b"");
        let last = storage
            .scan(tables::STREAM, &everything, Direction::Backward, 1)?
            .first()
            .map_or(0, |(position, _)| *position);
        Ok(StreamCounter {
            last: AtomicU64::new(last),
            in_flight: Mutex::new(BTreeSet::new()),
            wakeups,
        })
    }

    /// A new position, recorded in `batch` with what it stands for, and
    /// reserved until the returned reservation is dropped.
    pub fn next_into(
        self: &Arc<Self>,
        batch: &mut Batch,
        entry: &StreamEntry,
    ) -> (u64, Reservation) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let position = self.last.fetch_add(1, Ordering::SeqCst) + 1;
        in_flight.insert(position);
        drop(in_flight);
        batch.put(tables::STREAM, &position, entry);
        let reservation = Reservation {
            counter: self.clone(),
            position,
        };
        (position, reservation)
    }

    /// The highest position up to which every write has finished.
    pub fn current(&self) -> u64 {
        let in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        match in_flight.first() {
            Some(oldest) => oldest - 1,
            None => self.last.load(Ordering::SeqCst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_position_waits_for_the_oldest_write_in_flight() {
        let storage = Storage::in_memory();
        let counter = Arc::new(StreamCounter::load(&storage, Arc::default()).unwrap());
        let entry = StreamEntry::Presence {
            user_id: "@a:x".to_owned(),
        };
        let mut batch = Batch::new();
        let (first, first_reservation) = counter.next_into(&mut batch, &entry);
        let (second, second_reservation) = counter.next_into(&mut batch, &entry);
        assert_eq!((first, second), (1, 2));
        assert_eq!(counter.current(), 0);
        drop(second_reservation);
        assert_eq!(counter.current(), 0, "1 is still in flight");
        drop(first_reservation);
        assert_eq!(counter.current(), 2);
    }

    #[test]
    fn a_receiver_taken_before_a_commit_sees_the_wake_up() {
        let storage = Storage::in_memory();
        let wakeups = Arc::new(Wakeups::default());
        let counter = Arc::new(StreamCounter::load(&storage, wakeups.clone()).unwrap());
        let receiver = wakeups.subscribe();
        assert!(!receiver.has_changed().unwrap(), "nothing written yet");
        let entry = StreamEntry::Presence {
            user_id: "@a:x".to_owned(),
        };
        let (_, reservation) = counter.next_into(&mut Batch::new(), &entry);
        assert!(!receiver.has_changed().unwrap(), "still in flight");
        drop(reservation);
        assert!(receiver.has_changed().unwrap(), "woken when it completes");
    }
}
