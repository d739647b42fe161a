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
//!
//! The newest entries made visible are also kept in memory, in order
//! ([`StreamCounter::recent`]): a reader a little behind reads its window
//! there, without a database scan or a decode per entry. A reader's look
//! then costs what its window holds, not a walk of the database.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

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

/// Visible entries kept in memory, newest last.
const RECENT_ENTRIES: usize = 32_768;

pub struct StreamCounter {
    last: AtomicU64,
    positions: Mutex<Positions>,
    wakeups: Arc<Wakeups>,
    storage: Storage,
    recent: RwLock<Recent>,
}

/// The newest visible entries, in position order.
struct Recent {
    entries: VecDeque<(u64, StreamEntry)>,
    /// Every visible entry above this position is in `entries`.
    complete_after: u64,
}

struct Positions {
    in_flight: BTreeSet<u64>,
    /// The highest position whose batch committed. A reader is never told
    /// of a position above it: a position whose batch failed has no row,
    /// so after a restart the counter would hand it out again.
    recorded: u64,
    /// Committed positions above the current one, with their topics and
    /// entries.
    waiting: BTreeMap<u64, (Vec<String>, StreamEntry)>,
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

    /// Whether a write to `topic` (a room, a user) wakes this reader.
    pub fn covers(&self, topic: &str) -> bool {
        self.topics
            .binary_search_by(|mine| mine.as_str().cmp(topic))
            .is_ok()
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
    entry: Option<StreamEntry>,
    /// Set by the batch's commit.
    committed: Arc<std::sync::atomic::AtomicBool>,
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
        let committed = self.committed.load(Ordering::Acquire);
        let mut positions = self
            .counter
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        positions.in_flight.remove(&self.position);
        if let (true, Some(entry)) = (committed, self.entry.take()) {
            positions.recorded = positions.recorded.max(self.position);
            let topics = std::mem::take(&mut self.topics);
            positions.waiting.insert(self.position, (topics, entry));
        }
        let current = current_of(&positions);
        let visible = match current.checked_add(1) {
            Some(above) => {
                let still_waiting = positions.waiting.split_off(&above);
                std::mem::replace(&mut positions.waiting, still_waiting)
            }
            None => std::mem::take(&mut positions.waiting),
        };
        let mut topics = Vec::new();
        if !visible.is_empty() {
            // Under the positions' lock, so that entries join the recent
            // ones in position order, before a reader can see them current.
            let mut recent = self
                .counter
                .recent
                .write()
                .unwrap_or_else(|e| e.into_inner());
            for (position, (entry_topics, entry)) in visible {
                topics.extend(entry_topics);
                recent.entries.push_back((position, entry));
            }
            while recent.entries.len() > RECENT_ENTRIES {
                if let Some((position, _)) = recent.entries.pop_front() {
                    recent.complete_after = position;
                }
            }
        }
        drop(positions);
        if !topics.is_empty() {
            self.counter.wakeups.wake(topics.iter().map(String::as_str));
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
            recent: RwLock::new(Recent {
                entries: VecDeque::new(),
                complete_after: last,
            }),
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
        let topics = match entry {
            StreamEntry::Event { room_id, .. } | StreamEntry::Receipt { room_id, .. } => {
                vec![room_id.clone()]
            }
            StreamEntry::AccountData { user_id, .. } | StreamEntry::ToDevice { user_id, .. } => {
                vec![user_id.clone()]
            }
            // The user's own devices and everyone who shares a room with
            // them: the readers of the user and of each of their rooms.
            StreamEntry::Presence { user_id } | StreamEntry::DeviceList { user_id } => {
                let mut topics = self.joined_rooms(user_id);
                topics.push(user_id.clone());
                topics
            }
        };
        let reservation = Reservation {
            counter: self.clone(),
            position,
            topics,
            entry: Some(entry.clone()),
            committed: batch.committed_flag(),
        };
        (position, reservation)
    }

    /// The rooms `user_id` is joined to, as topics. Should the read fail,
    /// every reader is woken instead: better an empty look than a missed one.
    fn joined_rooms(&self, user_id: &str) -> Vec<String> {
        match self
            .storage
            .scan_prefix(tables::USER_ROOMS, &tables::str_prefix(user_id), usize::MAX)
        {
            Ok(rows) => rows
                .into_iter()
                .filter(|(_, row)| row.membership == "join")
                .map(|((_, room_id), _)| room_id)
                .collect(),
            Err(_) => vec![EVERYONE.to_owned()],
        }
    }

    /// Calls `each` with every entry in (`after`, `upto`], in order, when
    /// the window is among the recent entries kept in memory; `false`
    /// (having called nothing) when it is not.
    pub fn recent(&self, after: u64, upto: u64, mut each: impl FnMut(u64, &StreamEntry)) -> bool {
        let recent = self.recent.read().unwrap_or_else(|e| e.into_inner());
        if after < recent.complete_after {
            return false;
        }
        let start = recent.entries.partition_point(|(p, _)| *p <= after);
        for (position, entry) in recent.entries.range(start..) {
            if *position > upto {
                break;
            }
            each(*position, entry);
        }
        true
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
    use crate::storage::tables::UserRoom;

    /// A counter over `storage` and the wake-ups it signals.
    fn counter_on(storage: &Storage) -> (Arc<Wakeups>, Arc<StreamCounter>) {
        let wakeups = Arc::new(Wakeups::default());
        let counter = Arc::new(StreamCounter::load(storage, wakeups.clone()).unwrap());
        (wakeups, counter)
    }

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
        let (wakeups, counter) = counter_on(&storage);
        let room_reader = wakeups.register(vec!["!a:x".to_owned()]);
        let other_reader = wakeups.register(vec!["!b:x".to_owned()]);
        let user_reader = wakeups.register(vec!["@a:x".to_owned()]);
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
            woken(&user_reader) && !woken(&room_reader) && !woken(&other_reader),
            "presence wakes the user's readers and those of the user's rooms (none here)"
        );
        drop(other_reader);
        assert_eq!(wakeups.readers.lock().unwrap().len(), 3, "!a:x, @a:x and *");
        let mut seen = Vec::new();
        let base = FIRST_POSITION - 1;
        assert!(counter.recent(base + 1, base + 3, |p, e| seen.push((p, e.clone()))));
        assert_eq!(
            seen.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            vec![base + 2, base + 3],
            "the window's entries, in order, from memory"
        );
        assert_eq!(seen[0].1, event("!a:x"));
    }

    #[tokio::test]
    async fn a_writers_presence_wakes_the_readers_of_its_joined_rooms() {
        let storage = Storage::in_memory();
        let mut batch = Batch::new();
        let joined = UserRoom {
            membership: "join".to_owned(),
            event_id: "$j".to_owned(),
            stream: 1,
            forgotten: false,
        };
        let left = UserRoom {
            membership: "leave".to_owned(),
            ..joined.clone()
        };
        batch.put(
            tables::USER_ROOMS,
            &("@a:x".to_owned(), "!in:x".to_owned()),
            &joined,
        );
        batch.put(
            tables::USER_ROOMS,
            &("@a:x".to_owned(), "!out:x".to_owned()),
            &left,
        );
        storage.commit(batch).await.unwrap();
        let (wakeups, counter) = counter_on(&storage);
        let member = wakeups.register(vec!["!in:x".to_owned()]);
        let former = wakeups.register(vec!["!out:x".to_owned()]);
        let mut batch = Batch::new();
        let entry = StreamEntry::DeviceList {
            user_id: "@a:x".to_owned(),
        };
        let (_, reservation) = counter.next_into(&mut batch, &entry);
        storage.commit(batch).await.unwrap();
        drop(reservation);
        assert!(futures_now(member.notified()));
        assert!(!futures_now(former.notified()));
    }

    #[tokio::test]
    async fn a_write_that_fails_wakes_nobody_and_is_not_kept() {
        let storage = Storage::in_memory();
        let (wakeups, counter) = counter_on(&storage);
        let reader = wakeups.register(vec!["@a:x".to_owned()]);
        let entry = StreamEntry::AccountData {
            user_id: "@a:x".to_owned(),
            room_id: String::new(),
            data_type: "t".to_owned(),
        };
        let (position, reservation) = counter.next_into(&mut Batch::new(), &entry);
        drop(reservation);
        assert!(!futures_now(reader.notified()));
        let mut seen = 0;
        assert!(counter.recent(position - 1, position, |_, _| seen += 1));
        assert_eq!(seen, 0);
    }

    /// Whether a future is ready at once.
    fn futures_now(future: impl std::future::Future<Output = ()>) -> bool {
        let mut future = std::pin::pin!(future);
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        future.as_mut().poll(&mut context).is_ready()
    }
}
