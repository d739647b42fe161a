//! The reading side of the stream: what changed for a user between two
//! positions, from which `/sync` and sliding sync build their answers.
//!
//! A short window is read entry by entry from the `stream` table. A window
//! too long to read that way (a device back after weeks) is answered with
//! "anything may have changed", and the callers look at every room.

use std::collections::BTreeSet;
use std::sync::Arc;

use ruma::UserId;

use super::error::Result;
use super::notifications::EventDecisions;
use super::rooms::BoundedMemo;
use super::stream::{Registration, StreamCounter, Wakeups};
use crate::storage::tables::{self, StreamEntry};
use crate::storage::{Direction, Key, KeyRange, Storage};

/// Most stream entries read for one window before giving up on detail.
const MAX_WINDOW_ENTRIES: usize = 20_000;

/// What happened in a window of the stream, as far as one user may care.
/// `None` in a field means "too much to list: assume anything changed".
#[derive(Debug, Default)]
pub struct Changes {
    /// Rooms with new events.
    pub event_rooms: Option<BTreeSet<String>>,
    /// Rooms with new receipts.
    pub receipt_rooms: Option<BTreeSet<String>>,
    /// The user's account data scopes (room ID, or "" for global) written.
    pub account_data_scopes: Option<BTreeSet<String>>,
    /// Users whose presence changed.
    pub presence_users: Option<BTreeSet<String>>,
    /// Users whose devices changed.
    pub device_list_users: Option<BTreeSet<String>>,
    /// Memberships that changed: (room ID, user ID).
    pub members: Option<BTreeSet<(String, String)>>,
    /// The user's devices with new to-device messages.
    pub to_device_devices: Option<BTreeSet<String>>,
}

impl Changes {
    /// Adds what one stream entry changed for `user`.
    fn note(&mut self, user: &UserId, entry: &StreamEntry) {
        let insert = |set: &mut Option<BTreeSet<String>>, value: &str| {
            if let Some(set) = set {
                if !set.contains(value) {
                    set.insert(value.to_owned());
                }
            }
        };
        match entry {
            StreamEntry::Event {
                room_id, member, ..
            } => {
                if let (Some(members), Some(member)) = (&mut self.members, member) {
                    members.insert((room_id.clone(), member.clone()));
                }
                insert(&mut self.event_rooms, room_id)
            }
            StreamEntry::DeviceList { user_id } => insert(&mut self.device_list_users, user_id),
            StreamEntry::ToDevice { user_id, device_id } if user_id == user.as_str() => {
                insert(&mut self.to_device_devices, device_id)
            }
            StreamEntry::ToDevice { .. } => {}
            StreamEntry::Receipt { room_id, .. } => insert(&mut self.receipt_rooms, room_id),
            StreamEntry::AccountData {
                user_id, room_id, ..
            } if user_id == user.as_str() => insert(&mut self.account_data_scopes, room_id),
            StreamEntry::AccountData { .. } => {}
            StreamEntry::Presence { user_id } => insert(&mut self.presence_users, user_id),
        }
    }

    pub fn room_has_events(&self, room_id: &str) -> bool {
        self.event_rooms
            .as_ref()
            .is_none_or(|rooms| rooms.contains(room_id))
    }

    pub fn room_has_receipts(&self, room_id: &str) -> bool {
        self.receipt_rooms
            .as_ref()
            .is_none_or(|rooms| rooms.contains(room_id))
    }

    /// Whether the device may have to-device messages in the window.
    pub fn device_has_messages(&self, device_id: &str) -> bool {
        self.to_device_devices
            .as_ref()
            .is_none_or(|devices| devices.contains(device_id))
    }

    pub fn account_data_changed(&self, scope: &str) -> bool {
        self.account_data_scopes
            .as_ref()
            .is_none_or(|scopes| scopes.contains(scope))
    }
}

/// The stream as readers see it.
pub struct SyncStream {
    storage: Storage,
    counter: Arc<StreamCounter>,
    wakeups: Arc<Wakeups>,
    /// (room ID, user ID) → the unread counts last worked out, so the next
    /// sync counts only the events after them.
    pub unread: BoundedMemo<(String, String), UnreadMemo>,
    /// Event ID → what it decided for each local member, judged once for
    /// the notifier and every member's unread counts.
    pub decisions: BoundedMemo<String, Arc<EventDecisions>>,
    /// The stream position the notifier has judged every event up to
    /// (`u64::MAX` until it says): a reader judging a later event judges
    /// it for every member at once, since the notifier will need that.
    pub notified_upto: std::sync::atomic::AtomicU64,
    /// The position the notifier started from on this database
    /// (`u64::MAX`: unknown): it judged every event after it, up to
    /// `notified_upto`, and recorded those that notify.
    pub notified_since: std::sync::atomic::AtomicU64,
    /// Readers waiting for news now (see [`SyncStream::wait`]).
    waiting: std::sync::atomic::AtomicU64,
}

/// A user's unread counts in a room as of a stream position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadMemo {
    /// The read receipts the counts start from: (thread, event ID).
    pub receipts: Vec<(String, String)>,
    /// The receipts table's count of writes, read before the receipts:
    /// while it stays the same, so do they.
    pub receipt_writes: u64,
    /// The stream position of the push rules the events were judged by.
    pub rules_version: u64,
    pub counted_upto: u64,
    pub counts: UnreadCounts,
}

/// Unread counts of a room: (notifications, highlights) of the main
/// timeline and of each thread.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnreadCounts {
    pub main: (u64, u64),
    /// By the thread root's event ID.
    pub threads: std::collections::BTreeMap<String, (u64, u64)>,
}

impl UnreadCounts {
    /// The counts of a thread (`None`: the main timeline).
    pub fn of(&mut self, thread: Option<String>) -> &mut (u64, u64) {
        match thread {
            Some(root) => self.threads.entry(root).or_default(),
            None => &mut self.main,
        }
    }

    /// Everything together, for clients that do not count by thread.
    pub fn total(&self) -> (u64, u64) {
        self.threads
            .values()
            .fold(self.main, |(n, h), (tn, th)| (n + tn, h + th))
    }
}

/// Most (room, user) unread counts remembered.
const UNREAD_MEMO_ENTRIES: usize = 200_000;
/// Most events whose decisions are remembered: the newest, which the
/// notifier and the members' next syncs judge at about the same time.
const DECISIONS_REMEMBERED: usize = 1024;

impl SyncStream {
    pub fn new(storage: Storage, counter: Arc<StreamCounter>, wakeups: Arc<Wakeups>) -> Self {
        SyncStream {
            storage,
            counter,
            wakeups,
            unread: BoundedMemo::new(UNREAD_MEMO_ENTRIES),
            decisions: BoundedMemo::new(DECISIONS_REMEMBERED),
            notified_upto: std::sync::atomic::AtomicU64::new(u64::MAX),
            notified_since: std::sync::atomic::AtomicU64::new(u64::MAX),
            waiting: Default::default(),
        }
    }

    /// Waits for a wake-up of `registration` or the deadline, whichever
    /// comes first, counted among the waiting readers meanwhile.
    pub async fn wait(&self, registration: &Registration, deadline: tokio::time::Instant) {
        use std::sync::atomic::Ordering;
        struct Counted<'a>(&'a std::sync::atomic::AtomicU64);
        impl Drop for Counted<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _counted = Counted(&self.waiting);
        tokio::select! {
            () = registration.notified() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }

    /// Readers waiting in [`SyncStream::wait`] now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The position up to which every write is complete.
    pub fn current(&self) -> u64 {
        self.counter.current()
    }

    /// Registers a reader for the user's own writes and those of the
    /// rooms given; register before reading, so no wake-up is lost.
    /// A registration woken only by changes that concern everyone
    /// (presence, device lists).
    pub fn register_everyone(&self) -> Registration {
        self.wakeups.register(Vec::new())
    }

    /// A registration woken by every write.
    pub fn register_every_write(&self) -> Registration {
        self.wakeups
            .register(vec![super::stream::EVERY_WRITE.to_owned()])
    }

    pub fn register(&self, user: &UserId, rooms: &[String]) -> Registration {
        let mut topics = rooms.to_vec();
        topics.push(user.to_string());
        self.wakeups.register(topics)
    }

    /// What changed for `user` in the positions after `since`, up to and
    /// including `upto`.
    pub fn changes(&self, user: &UserId, since: u64, upto: u64) -> Result<Changes> {
        let mut changes = Changes {
            event_rooms: Some(BTreeSet::new()),
            receipt_rooms: Some(BTreeSet::new()),
            account_data_scopes: Some(BTreeSet::new()),
            presence_users: Some(BTreeSet::new()),
            device_list_users: Some(BTreeSet::new()),
            members: Some(BTreeSet::new()),
            to_device_devices: Some(BTreeSet::new()),
        };
        if upto <= since {
            return Ok(changes);
        }
        let in_memory = self
            .counter
            .recent(since, upto, |_, entry| changes.note(user, entry));
        if in_memory {
            return Ok(changes);
        }
        let range = KeyRange {
            lower: since.saturating_add(1).encode(),
            upper: Some(upto.saturating_add(1).encode()),
        };
        let entries = self.storage.scan(
            tables::STREAM,
            &range,
            Direction::Forward,
            MAX_WINDOW_ENTRIES,
        )?;
        if entries.len() == MAX_WINDOW_ENTRIES {
            return Ok(Changes::default());
        }
        for (_, entry) in &entries {
            changes.note(user, entry);
        }
        Ok(changes)
    }
}
