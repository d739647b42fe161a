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
//! Waiting readers (a long-polling `/sync`) are woken through [`Wakeups`]
//! by topic: a room (its events, receipts, typing) or a user (their
//! account data, a membership that names them). A write's topics are woken
//! when the current position passes it, not when its own batch commits, so
//! a reader woken for position 7 never finds it hidden behind a 6 still in
//! flight; the write that completes 6 wakes 7's topics too. A reader
//! registers its topics before it looks, and a wake-up that comes between
//! its look and its wait is kept for it, so none is lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use crate::storage::tables::{self, StreamEntry};
use crate::storage::{Batch, Direction, KeyRange, Storage, StorageError};

/// The topic that wakes every reader (presence, which any room may show).
pub const EVERYONE: &str = "*";
/// The topic of readers woken by every write (the push notifier).
pub const EVERY_WRITE: &str = "**";

/// The first stream position of a new database. The positions below it
/// are left to history backfilled from other servers, which sits in a
/// room's timeline before everything this server saw live.
pub const FIRST_POSITION: u64 = 1 << 32;

pub struct StreamCounter {
    last: AtomicU64,
    positions: Mutex<Positions>,
    wakeups: Arc<Wakeups>,
    storage: Storage,
}

struct Positions {
    in_flight: BTreeSet<u64>,
    /// The highest position whose batch committed. A reader is never told
    /// of a position above it: a position whose batch failed has no row,
    /// so after a restart the counter would hand it out again.
    recorded: u64,
    /// Committed positions above the current one, with their topics.
    waiting: BTreeMap<u64, Vec<String>>,
}

/// Wakes the readers waiting on a topic.
#[derive(Default)]
pub struct Wakeups {
    readers: Mutex<HashMap<String, Vec<Weak<Notify>>>>,
}

/// A reader's interest in some topics; it deregisters when dropped.
pub struct Registration {
    wakeups: Arc<Wakeups>,
    topics: Vec<String>,
    notify: Arc<Notify>,
}

impl Wakeups {
    /// Registers a reader for `topics` (and for [`EVERYONE`]).
    pub fn register(self: &Arc<Self>, mut topics: Vec<String>) -> Registration {
        topics.push(EVERYONE.to_owned());
        topics.sort();
        topics.dedup();
        let notify = Arc::new(Notify::new());
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        for topic in &topics {
            readers
                .entry(topic.clone())
                .or_default()
                .push(Arc::downgrade(&notify));
        }
        Registration {
            wakeups: self.clone(),
            topics,
            notify,
        }
    }

    /// Wakes the readers of each topic; [`EVERYONE`] wakes every reader.
    pub fn wake<'a>(&self, topics: impl IntoIterator<Item = &'a str>) {
        let readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        let mut woken = std::collections::HashSet::new();
        for topic in topics.into_iter().chain([EVERY_WRITE]) {
            let targets: Vec<&Weak<Notify>> = if topic == EVERYONE {
                readers.values().flatten().collect()
            } else {
                readers.get(topic).into_iter().flatten().collect()
            };
            for reader in targets {
                if let Some(notify) = reader.upgrade() {
                    if woken.insert(Arc::as_ptr(&notify)) {
                        // A permit is kept if the reader is not waiting yet.
                        notify.notify_one();
                    }
                }
            }
        }
    }
}

impl Registration {
    /// Resolves at the first wake-up of one of the topics since the
    /// registration (or since the previous wake-up it returned for).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut readers = self
            .wakeups
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let me = Arc::downgrade(&self.notify);
        for topic in &self.topics {
            if let Some(list) = readers.get_mut(topic) {
                list.retain(|reader| !reader.ptr_eq(&me) && reader.strong_count() > 0);
                if list.is_empty() {
                    readers.remove(topic);
                }
            }
        }
    }
}

/// A position whose batch has not finished committing; dropping it (after
/// the commit, whatever its outcome) releases the position.
#[must_use = "keep the reservation until the batch has been committed"]
pub struct Reservation {
    counter: Arc<StreamCounter>,
    position: u64,
    topics: Vec<String>,
}

impl Reservation {
    /// The stream position held.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Wakes readers of `topic` too once the write is visible (a member
    /// event wakes the user it names, who may not be in the room yet).
    pub fn also_wake(&mut self, topic: &str) {
        self.topics.push(topic.to_owned());
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Whether the batch committed: its stream row is there or not.
        let committed = self
            .counter
            .storage
            .get(tables::STREAM, &self.position)
            .is_ok_and(|row| row.is_some());
        let mut positions = self
            .counter
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        positions.in_flight.remove(&self.position);
        if committed {
            positions.recorded = positions.recorded.max(self.position);
            positions
                .waiting
                .insert(self.position, std::mem::take(&mut self.topics));
        }
        let current = current_of(&positions);
        let visible: Vec<String> = match current.checked_add(1) {
            Some(above) => {
                let still_waiting = positions.waiting.split_off(&above);
                let visible = std::mem::replace(&mut positions.waiting, still_waiting);
                visible.into_values().flatten().collect()
            }
            None => std::mem::take(&mut positions.waiting)
                .into_values()
                .flatten()
                .collect(),
        };
        drop(positions);
        if !visible.is_empty() {
            self.counter
                .wakeups
                .wake(visible.iter().map(String::as_str));
        }
    }
}

impl StreamCounter {
    /// Continues after the last position recorded in the `stream` table.
    /// Loads the last position written; a new database starts at
    /// [`FIRST_POSITION`].
    pub fn load(storage: &Storage, wakeups: Arc<Wakeups>) -> Result<Self, StorageError> {
        let everything = KeyRange::prefix(b"");
        let last = storage
            .scan(tables::STREAM, &everything, Direction::Backward, 1)?
            .first()
            .map_or(FIRST_POSITION - 1, |(position, _)| *position);
        Ok(StreamCounter {
            last: AtomicU64::new(last),
            positions: Mutex::new(Positions {
                in_flight: BTreeSet::new(),
                recorded: last,
                waiting: BTreeMap::new(),
            }),
            wakeups,
            storage: storage.clone(),
        })
    }

    /// A new position, recorded in `batch` with what it stands for, and
    /// reserved until the returned reservation is dropped.
    pub fn next_into(
        self: &Arc<Self>,
        batch: &mut Batch,
        entry: &StreamEntry,
    ) -> (u64, Reservation) {
        let mut positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        let position = self.last.fetch_add(1, Ordering::SeqCst) + 1;
        positions.in_flight.insert(position);
        drop(positions);
        batch.put(tables::STREAM, &position, entry);
        let topic = match entry {
            StreamEntry::Event { room_id, .. } | StreamEntry::Receipt { room_id, .. } => {
                room_id.clone()
            }
            StreamEntry::AccountData { user_id, .. } | StreamEntry::ToDevice { user_id, .. } => {
                user_id.clone()
            }
            // Everyone who shares a room may care: rare enough to wake all.
            StreamEntry::Presence { .. } | StreamEntry::DeviceList { .. } => EVERYONE.to_owned(),
        };
        let reservation = Reservation {
            counter: self.clone(),
            position,
            topics: vec![topic],
        };
        (position, reservation)
    }

    /// The highest position up to which every write has finished.
    pub fn current(&self) -> u64 {
        let positions = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        current_of(&positions)
    }
}

/// Below the oldest write in flight, and no higher than the last write
/// that committed.
fn current_of(positions: &Positions) -> u64 {
    match positions.in_flight.first() {
        Some(oldest) => (oldest - 1).min(positions.recorded),
        None => positions.recorded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_current_position_waits_for_the_oldest_write_in_flight() {
        let storage = Storage::in_memory();
        let counter = Arc::new(StreamCounter::load(&storage, Arc::default()).unwrap());
        let entry = StreamEntry::Presence {
            user_id: "@a:x".to_owned(),
        };
        let mut batch = Batch::new();
        let (first, first_reservation) = counter.next_into(&mut batch, &entry);
        let (second, second_reservation) = counter.next_into(&mut batch, &entry);
        let base = FIRST_POSITION - 1;
        assert_eq!((first, second), (base + 1, base + 2));
        storage.commit(batch).await.unwrap();
        assert_eq!(counter.current(), base);
        drop(second_reservation);
        assert_eq!(counter.current(), base, "the first is still in flight");
        drop(first_reservation);
        assert_eq!(counter.current(), base + 2);
        // A write that never commits moves nothing: readers are not told of
        // a position that a restart would hand out again.
        let (_, failed) = counter.next_into(&mut Batch::new(), &entry);
        drop(failed);
        assert_eq!(counter.current(), base + 2);
        let restarted = StreamCounter::load(&storage, Arc::default()).unwrap();
        assert_eq!(restarted.current(), base + 2);
    }

    #[tokio::test]
    async fn readers_are_woken_by_their_topics_once_the_write_is_current() {
        let storage = Storage::in_memory();
        let wakeups = Arc::new(Wakeups::default());
        let counter = Arc::new(StreamCounter::load(&storage, wakeups.clone()).unwrap());
        let room_reader = wakeups.register(vec!["!a:x".to_owned()]);
        let other_reader = wakeups.register(vec!["!b:x".to_owned()]);
        let event = |room: &str| StreamEntry::Event {
            room_id: room.to_owned(),
            event_id: "$e".to_owned(),
            member: None,
        };
        let mut batch = Batch::new();
        let (_, earlier) = counter.next_into(&mut batch, &event("!b:x"));
        let (_, later) = counter.next_into(&mut batch, &event("!a:x"));
        storage.commit(batch).await.unwrap();
        drop(later);
        let woken = |registration: &Registration| {
            let notified = registration.notified();
            futures_now(notified)
        };
        assert!(!woken(&room_reader), "its write is behind one in flight");
        drop(earlier);
        assert!(woken(&room_reader), "woken once the position is current");
        assert!(woken(&other_reader));
        assert!(!woken(&room_reader), "one wake-up per write");
        let mut batch = Batch::new();
        let (_, presence) = counter.next_into(
            &mut batch,
            &StreamEntry::Presence {
                user_id: "@a:x".to_owned(),
            },
        );
        storage.commit(batch).await.unwrap();
        drop(presence);
        assert!(
            woken(&room_reader) && woken(&other_reader),
            "presence wakes all"
        );
        drop(other_reader);
        assert_eq!(wakeups.readers.lock().unwrap().len(), 2, "!a:x and *");
    }

    /// Whether a future is ready at once.
    fn futures_now(future: impl std::future::Future<Output = ()>) -> bool {
        let mut future = std::pin::pin!(future);
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        future.as_mut().poll(&mut context).is_ready()
    }
}
