//! What users keep besides events: account data (global and per room, tags
//! included), read receipts, presence, and typing notices.
//!
//! Account data, receipts and presence are durable and take stream
//! positions from the shared counter, so sync can order them with events.
//! Typing notices are ephemeral: kept in memory until they time out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ruma::{RoomId, UserId};
use serde_json::Value;

use super::clock::Clock;
use super::error::{Error, Result};
use super::locks::StripedLocks;
use super::stream::StreamCounter;
use crate::storage::tables::{self, PresenceRecord, Receipt, StreamEntry, StreamedValue};
use crate::storage::{Batch, Storage};

/// Longest a typing notice lasts, whatever the client asks.
const MAX_TYPING_MS: u64 = 120_000;
/// Most receipts one room lists at once.
const MAX_RECEIPTS: usize = 100_000;

pub struct UserData {
    storage: Storage,
    stream: Arc<StreamCounter>,
    clock: Arc<dyn Clock>,
    locks: StripedLocks,
    /// Room ID → user ID → when the notice ends (ms since the epoch).
    typing: Mutex<HashMap<String, HashMap<String, u64>>>,
}

impl UserData {
    pub fn new(storage: Storage, stream: Arc<StreamCounter>, clock: Arc<dyn Clock>) -> Self {
        UserData {
            storage,
            stream,
            clock,
            locks: StripedLocks::new(64),
            typing: Mutex::new(HashMap::new()),
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

    pub fn presence(&self, user: &UserId) -> Result<Option<PresenceRecord>> {
        Ok(self.storage.get(tables::PRESENCE, &user.to_string())?)
    }

    pub async fn set_presence(
        &self,
        user: &UserId,
        presence: &str,
        status_msg: Option<String>,
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
            last_active_ts: self.clock.now_ms(),
            stream,
        };
        batch.put(tables::PRESENCE, &user.to_string(), &record);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Starts (for `timeout_ms`) or stops a user's typing notice.
    pub fn set_typing(&self, room: &RoomId, user: &UserId, typing: bool, timeout_ms: u64) {
        let now = self.clock.now_ms();
        let mut rooms = self.typing.lock().unwrap_or_else(|e| e.into_inner());
        let users = rooms.entry(room.to_string()).or_default();
        if typing {
            users.insert(user.to_string(), now + timeout_ms.min(MAX_TYPING_MS));
        } else {
            users.remove(user.as_str());
        }
        users.retain(|_, until| *until > now);
        if users.is_empty() {
            rooms.remove(room.as_str());
        }
    }

    /// The users typing in a room now, in order.
    pub fn typing(&self, room: &RoomId) -> Vec<String> {
        let now = self.clock.now_ms();
        let rooms = self.typing.lock().unwrap_or_else(|e| e.into_inner());
        let mut users: Vec<String> = rooms
            .get(room.as_str())
            .map(|users| {
                users
                    .iter()
                    .filter(|(_, until)| **until > now)
                    .map(|(user, _)| user.clone())
                    .collect()
            })
            .unwrap_or_default();
        users.sort();
        users
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
        let stream = Arc::new(StreamCounter::load(&storage).unwrap());
        let data = UserData::new(storage, stream, clock.clone());
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
