//! What users keep besides events: account data (global and per room, tags
//! included), read receipts, presence, and typing notices.
//!
//! Account data, receipts and presence are durable and take stream
//! positions from the shared counter, so sync can order them with events.
//! Typing notices are ephemeral: kept in memory until they time out, with
//! their own serial number (see [`TypingSerial`]) instead of a stream
//! position.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ruma::{RoomId, UserId};
use serde_json::Value;

use super::clock::Clock;
use super::error::{Error, Result};
use super::locks::StripedLocks;
use super::stream::{StreamCounter, Wakeups};
use crate::storage::tables::{self, PresenceRecord, Receipt, StreamEntry, StreamedValue};
use crate::storage::{Batch, Storage};

/// Longest a typing notice lasts, whatever the client asks.
const MAX_TYPING_MS: u64 = 120_000;
/// Most receipts one room lists at once.
const MAX_RECEIPTS: usize = 100_000;
/// Most presence records read at once.
const MAX_PRESENCE_USERS: usize = 100_000;
/// Most account data entries one scope (global or a room) lists at once.
const MAX_ACCOUNT_DATA: usize = 10_000;

pub struct UserData {
    storage: Storage,
    stream: Arc<StreamCounter>,
    clock: Arc<dyn Clock>,
    locks: StripedLocks,
    typing: Arc<Mutex<Typing>>,
    wakeups: Arc<Wakeups>,
}

/// A position in the typing stream. It starts at a thousand times the
/// boot time in milliseconds, so serials from before a restart compare as
/// older and a resumed sync is sent the typing notices that stand now.
pub type TypingSerial = u64;

struct Typing {
    serial: TypingSerial,
    rooms: HashMap<String, RoomTyping>,
}

/// The typing notices of one room, and when they last changed.
#[derive(Default)]
struct RoomTyping {
    /// User ID → when the notice ends (ms since the epoch).
    users: HashMap<String, u64>,
    changed: TypingSerial,
}

impl Typing {
    /// Drops the notices that ended; says whether any did.
    fn expire(&mut self, room: &str, now: u64) -> bool {
        let Some(entry) = self.rooms.get_mut(room) else {
            return false;
        };
        let before = entry.users.len();
        entry.users.retain(|_, until| *until > now);
        if entry.users.len() == before {
            return false;
        }
        self.serial += 1;
        entry.changed = self.serial;
        true
    }
}

impl UserData {
    pub fn new(
        storage: Storage,
        stream: Arc<StreamCounter>,
        clock: Arc<dyn Clock>,
        wakeups: Arc<Wakeups>,
    ) -> Self {
        let typing = Typing {
            serial: clock.now_ms().saturating_mul(1000),
            rooms: HashMap::new(),
        };
        UserData {
            storage,
            stream,
            clock,
            locks: StripedLocks::new(64),
            typing: Arc::new(Mutex::new(typing)),
            wakeups,
        }
    }

    /// Account data of a user; `room` `None` for global data.
    pub fn account_data(
        &self,
        user: &UserId,
        room: Option<&RoomId>,
        kind: &str,
    ) -> Result<Option<Value>> {
        let key = account_key(user, room, kind);
        Ok(self
            .storage
            .get(tables::ACCOUNT_DATA, &key)?
            .map(|v| v.content))
    }

    /// Sets account data; the content must be a JSON object.
    pub async fn set_account_data(
        &self,
        user: &UserId,
        room: Option<&RoomId>,
        kind: &str,
        content: Value,
    ) -> Result<()> {
        if !content.is_object() {
            return Err(Error::BadJson(
                "account data must be a JSON object".to_owned(),
            ));
        }
        let mut batch = Batch::new();
        let entry = StreamEntry::AccountData {
            user_id: user.to_string(),
            room_id: room.map(|r| r.to_string()).unwrap_or_default(),
            data_type: kind.to_owned(),
        };
        let (stream, _reservation) = self.stream.next_into(&mut batch, &entry);
        let value = StreamedValue { content, stream };
        batch.put(tables::ACCOUNT_DATA, &account_key(user, room, kind), &value);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Changes a room's `m.tag` account data under the user's lock.
    pub async fn update_tags(
        &self,
        user: &UserId,
        room: &RoomId,
        change: impl FnOnce(&mut serde_json::Map<String, Value>),
    ) -> Result<()> {
        let _guard = self.locks.lock(user.as_str()).await;
        let mut tags = self.tags(user, room)?;
        change(&mut tags);
        let content = serde_json::json!({ "tags": tags });
        self.set_account_data(user, Some(room), "m.tag", content)
            .await
    }

    /// The user's tags on a room.
    pub fn tags(&self, user: &UserId, room: &RoomId) -> Result<serde_json::Map<String, Value>> {
        Ok(self
            .account_data(user, Some(room), "m.tag")?
            .and_then(|content| content.get("tags")?.as_object().cloned())
            .unwrap_or_default())
    }

    /// Records a receipt; `thread` is `""` for an unthreaded receipt.
    pub async fn set_receipt(
        &self,
        room: &RoomId,
        user: &UserId,
        receipt_type: &str,
        thread: &str,
        event_id: &str,
    ) -> Result<()> {
        let mut batch = Batch::new();
        let entry = StreamEntry::Receipt {
            room_id: room.to_string(),
            user_id: user.to_string(),
            receipt_type: receipt_type.to_owned(),
        };
        let (stream, _reservation) = self.stream.next_into(&mut batch, &entry);
        let receipt = Receipt {
            event_id: event_id.to_owned(),
            ts: self.clock.now_ms(),
            stream,
        };
        let key = (
            room.to_string(),
            receipt_type.to_owned(),
            user.to_string(),
            thread.to_owned(),
        );
        batch.put(tables::RECEIPTS, &key, &receipt);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Every receipt of a type in a room: (user, thread, receipt).
    pub fn receipts(
        &self,
        room: &RoomId,
        receipt_type: &str,
    ) -> Result<Vec<(String, String, Receipt)>> {
        let prefix = tables::str2_prefix(room.as_str(), receipt_type);
        Ok(self
            .storage
            .scan_prefix(tables::RECEIPTS, &prefix, MAX_RECEIPTS)?
            .into_iter()
            .map(|((_, _, user, thread), receipt)| (user, thread, receipt))
            .collect())
    }

    /// A user's receipt of one type in one thread ("" for unthreaded).
    pub fn receipt(
        &self,
        room: &RoomId,
        receipt_type: &str,
        user: &UserId,
        thread: &str,
    ) -> Result<Option<Receipt>> {
        let key = (
            room.to_string(),
            receipt_type.to_owned(),
            user.to_string(),
            thread.to_owned(),
        );
        Ok(self.storage.get(tables::RECEIPTS, &key)?)
    }

    /// A user's receipts of one type in a room, in every thread, as
    /// (thread, receipt): `""` unthreaded, `"main"`, or a thread root.
    pub fn receipts_of(
        &self,
        room: &RoomId,
        receipt_type: &str,
        user: &UserId,
    ) -> Result<Vec<(String, Receipt)>> {
        use crate::storage::tables::KeyPart;
        let mut prefix = tables::str2_prefix(room.as_str(), receipt_type);
        user.to_string().put(&mut prefix);
        Ok(self
            .storage
            .scan_prefix(tables::RECEIPTS, &prefix, MAX_RECEIPTS)?
            .into_iter()
            .map(|((_, _, _, thread), receipt)| (thread, receipt))
            .collect())
    }

    /// The stream position account data was last written at, if it was.
    pub fn account_data_version(
        &self,
        user: &UserId,
        room: Option<&RoomId>,
        kind: &str,
    ) -> Result<Option<u64>> {
        let key = account_key(user, room, kind);
        Ok(self
            .storage
            .get(tables::ACCOUNT_DATA, &key)?
            .map(|v| v.stream))
    }

    /// Every user with a presence record.
    pub fn presence_users(&self) -> Result<Vec<String>> {
        Ok(self
            .storage
            .scan_prefix(tables::PRESENCE, b"", MAX_PRESENCE_USERS)?
            .into_iter()
            .map(|(user, _)| user)
            .collect())
    }

    pub fn presence(&self, user: &UserId) -> Result<Option<PresenceRecord>> {
        Ok(self.storage.get(tables::PRESENCE, &user.to_string())?)
    }

    pub async fn set_presence(
        &self,
        user: &UserId,
        presence: &str,
        status_msg: Option<String>,
    ) -> Result<()> {
        let now = self.clock.now_ms();
        self.set_presence_at(user, presence, status_msg, now).await
    }

    /// Sets a presence last active at `last_active_ts` (another server's
    /// user, as their server reported it).
    pub async fn set_presence_at(
        &self,
        user: &UserId,
        presence: &str,
        status_msg: Option<String>,
        last_active_ts: u64,
    ) -> Result<()> {
        if !matches!(presence, "online" | "offline" | "unavailable") {
            return Err(Error::InvalidParam(format!(
                "unknown presence {presence:?}"
            )));
        }
        let mut batch = Batch::new();
        let entry = StreamEntry::Presence {
            user_id: user.to_string(),
        };
        let (stream, _reservation) = self.stream.next_into(&mut batch, &entry);
        let record = PresenceRecord {
            presence: presence.to_owned(),
            status_msg,
            last_active_ts,
            stream,
        };
        batch.put(tables::PRESENCE, &user.to_string(), &record);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Starts (for `timeout_ms`) or stops a user's typing notice. Waiting
    /// syncs are woken now, and again when the notice runs out.
    pub fn set_typing(&self, room: &RoomId, user: &UserId, typing: bool, timeout_ms: u64) {
        let now = self.clock.now_ms();
        let timeout_ms = timeout_ms.min(MAX_TYPING_MS);
        {
            let mut state = self.typing.lock().unwrap_or_else(|e| e.into_inner());
            state.serial += 1;
            let serial = state.serial;
            let entry = state.rooms.entry(room.to_string()).or_default();
            if typing {
                entry.users.insert(user.to_string(), now + timeout_ms);
            } else {
                entry.users.remove(user.as_str());
            }
            entry.users.retain(|_, until| *until > now);
            entry.changed = serial;
        }
        self.wakeups.wake([room.as_str()]);
        if typing {
            self.expire_later(room.to_string(), timeout_ms);
        }
    }

    /// A timer that drops the room's ended notices and wakes syncs, so that
    /// clients learn a notice ended without anyone sending anything.
    fn expire_later(&self, room: String, timeout_ms: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (typing, clock, wakeups) = (
            self.typing.clone(),
            self.clock.clone(),
            self.wakeups.clone(),
        );
        runtime.spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(timeout_ms + 1)).await;
            let now = clock.now_ms();
            let expired = typing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .expire(&room, now);
            if expired {
                wakeups.wake([room.as_str()]);
            }
        });
    }

    /// The users typing in a room now, in order.
    pub fn typing(&self, room: &RoomId) -> Vec<String> {
        let now = self.clock.now_ms();
        let state = self.typing.lock().unwrap_or_else(|e| e.into_inner());
        let mut users: Vec<String> = state
            .rooms
            .get(room.as_str())
            .map(|entry| {
                entry
                    .users
                    .iter()
                    .filter(|(_, until)| **until > now)
                    .map(|(user, _)| user.clone())
                    .collect()
            })
            .unwrap_or_default();
        users.sort();
        users
    }

    /// The latest typing serial.
    pub fn typing_serial(&self) -> TypingSerial {
        self.typing.lock().unwrap_or_else(|e| e.into_inner()).serial
    }

    /// The rooms whose typing notices changed after `since`, with who
    /// types there now (sorted), and the serial they are current at.
    pub fn typing_changed_since(
        &self,
        since: TypingSerial,
    ) -> (TypingSerial, Vec<(String, Vec<String>)>) {
        let now = self.clock.now_ms();
        let state = self.typing.lock().unwrap_or_else(|e| e.into_inner());
        let rooms = state
            .rooms
            .iter()
            .filter(|(_, entry)| entry.changed > since)
            .map(|(room, entry)| {
                let mut users: Vec<String> = entry
                    .users
                    .iter()
                    .filter(|(_, until)| **until > now)
                    .map(|(user, _)| user.clone())
                    .collect();
                users.sort();
                (room.clone(), users)
            })
            .collect();
        (state.serial, rooms)
    }

    /// Whether the room's typing notices changed after `since`.
    pub fn typing_changed(&self, room: &RoomId, since: TypingSerial) -> bool {
        let state = self.typing.lock().unwrap_or_else(|e| e.into_inner());
        state
            .rooms
            .get(room.as_str())
            .is_some_and(|entry| entry.changed > since)
    }

    /// Every receipt in a room: (receipt type, user, thread, receipt).
    pub fn room_receipts(&self, room: &RoomId) -> Result<Vec<(String, String, String, Receipt)>> {
        let prefix = tables::str_prefix(room.as_str());
        Ok(self
            .storage
            .scan_prefix(tables::RECEIPTS, &prefix, MAX_RECEIPTS)?
            .into_iter()
            .map(|((_, kind, user, thread), receipt)| (kind, user, thread, receipt))
            .collect())
    }

    /// A user's account data in one scope (`room` `None` for global):
    /// (type, value and the position it was written at).
    pub fn account_data_in(
        &self,
        user: &UserId,
        room: Option<&RoomId>,
    ) -> Result<Vec<(String, StreamedValue)>> {
        let scope = room.map(|r| r.to_string()).unwrap_or_default();
        let prefix = tables::str2_prefix(user.as_str(), &scope);
        Ok(self
            .storage
            .scan_prefix(tables::ACCOUNT_DATA, &prefix, MAX_ACCOUNT_DATA)?
            .into_iter()
            .map(|((_, _, kind), value)| (kind, value))
            .collect())
    }
}

fn account_key(user: &UserId, room: Option<&RoomId>, kind: &str) -> (String, String, String) {
    (
        user.to_string(),
        room.map(|r| r.to_string()).unwrap_or_default(),
        kind.to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::clock::ManualClock;

    #[test]
    fn typing_notices_time_out() {
        let clock = Arc::new(ManualClock::new(0));
        let storage = Storage::in_memory();
        let wakeups = Arc::new(Wakeups::default());
        let stream = Arc::new(StreamCounter::load(&storage, wakeups.clone()).unwrap());
        let data = UserData::new(storage, stream, clock.clone(), wakeups);
        let room = RoomId::parse("!r:x").unwrap();
        let a = UserId::parse("@a:x").unwrap();
        let b = UserId::parse("@b:x").unwrap();
        data.set_typing(&room, &b, true, 1000);
        data.set_typing(&room, &a, true, 10_000_000);
        assert_eq!(data.typing(&room), ["@a:x", "@b:x"]);
        clock.advance_ms(1000);
        assert_eq!(data.typing(&room), ["@a:x"]);
        clock.advance_ms(MAX_TYPING_MS);
        assert!(data.typing(&room).is_empty(), "capped at two minutes");
        data.set_typing(&room, &a, true, 5000);
        data.set_typing(&room, &a, false, 0);
        assert!(data.typing(&room).is_empty());
    }
}
