//! What admins impose on rooms and their events: blocked rooms, erased
//! users, and the purge of a room's every row.

use std::collections::{BTreeSet, HashSet};
use std::sync::RwLock;

use ruma::{RoomId, UserId};
use serde_json::Value;

use super::Rooms;
use crate::services::error::{Error, Result};
use crate::storage::tables::{self, AdminMark};
use crate::storage::{Batch, Storage};

/// The blocked rooms and erased users, kept in memory as well (every
/// membership change and every visibility check asks).
#[derive(Default)]
pub struct AdminMarks {
    blocked: RwLock<HashSet<String>>,
    erased: RwLock<HashSet<String>>,
}

impl AdminMarks {
    pub fn load(storage: &Storage) -> Result<Self> {
        let keys = |rows: Vec<(String, AdminMark)>| -> HashSet<String> {
            rows.into_iter().map(|(key, _)| key).collect()
        };
        Ok(AdminMarks {
            blocked: RwLock::new(keys(storage.scan_prefix(
                tables::BLOCKED_ROOMS,
                &[],
                usize::MAX,
            )?)),
            erased: RwLock::new(keys(storage.scan_prefix(
                tables::ERASED_USERS,
                &[],
                usize::MAX,
            )?)),
        })
    }
}

/// What a purge deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    pub events: usize,
    pub state_groups: usize,
}

/// Adds to `batch` the deletion of every row of `table` under `prefix`.
fn delete_prefix<K: crate::storage::Key, V: serde::de::DeserializeOwned>(
    storage: &Storage,
    batch: &mut Batch,
    table: crate::storage::Table<K, V>,
    prefix: &[u8],
) -> Result<()> {
    for (key, _) in storage.scan_prefix(table, prefix, usize::MAX)? {
        batch.delete(table, &key);
    }
    Ok(())
}

impl Rooms {
    /// Whether an admin blocked the room: no local user may join, knock or
    /// be invited.
    pub fn is_blocked(&self, room_id: &RoomId) -> bool {
        let blocked = self.marks.blocked.read().expect("marks lock");
        !blocked.is_empty() && blocked.contains(room_id.as_str())
    }

    /// Refuses a membership change into a blocked room.
    pub(crate) fn check_not_blocked(&self, room_id: &RoomId, membership: &str) -> Result<()> {
        if matches!(membership, "join" | "invite" | "knock") && self.is_blocked(room_id) {
            return Err(Error::Forbidden(
                "This room has been blocked on this server".to_owned(),
            ));
        }
        Ok(())
    }

    /// Blocks or unblocks a room, recording which admin did.
    pub async fn set_blocked(&self, room_id: &RoomId, by: &str, blocked: bool) -> Result<()> {
        let mut batch = Batch::new();
        let key = room_id.to_string();
        if blocked {
            let mark = AdminMark {
                by: by.to_owned(),
                ts: self.clock.now_ms(),
            };
            batch.put(tables::BLOCKED_ROOMS, &key, &mark);
        } else {
            batch.delete(tables::BLOCKED_ROOMS, &key);
        }
        self.storage.commit(batch).await?;
        let mut set = self.marks.blocked.write().expect("marks lock");
        if blocked {
            set.insert(key);
        } else {
            set.remove(&key);
        }
        Ok(())
    }

    /// Every room this server has a record of.
    pub fn room_ids(&self) -> Result<Vec<ruma::OwnedRoomId>> {
        Ok(self
            .storage
            .scan_prefix(tables::ROOMS, &[], usize::MAX)?
            .into_iter()
            .filter_map(|(room_id, _)| RoomId::parse(room_id).ok())
            .collect())
    }

    /// The local users whose current membership in a room is one of
    /// `memberships`.
    pub fn local_members(
        &self,
        room_id: &RoomId,
        memberships: &[&str],
    ) -> Result<Vec<ruma::OwnedUserId>> {
        let suffix = format!(":{}", self.server_name);
        Ok(self
            .current_state(room_id, Some("m.room.member"))?
            .iter()
            .filter(|event| {
                let membership = event.content_value()["membership"].clone();
                memberships.iter().any(|wanted| membership == *wanted)
            })
            .filter_map(|event| event.state_key.as_deref())
            .filter(|key| key.ends_with(&suffix))
            .filter_map(|key| UserId::parse(key).ok())
            .collect())
    }

    /// Whether a user was erased by an admin.
    pub fn is_erased(&self, user_id: &str) -> bool {
        let erased = self.marks.erased.read().expect("marks lock");
        !erased.is_empty() && erased.contains(user_id)
    }

    /// Marks a local user erased: from now on their events are hidden from
    /// every reader who was not joined to the room when they were sent.
    pub async fn erase_user(&self, user: &UserId, by: &str) -> Result<()> {
        let mark = AdminMark {
            by: by.to_owned(),
            ts: self.clock.now_ms(),
        };
        let mut batch = Batch::new();
        batch.put(tables::ERASED_USERS, &user.to_string(), &mark);
        self.storage.commit(batch).await?;
        self.marks
            .erased
            .write()
            .expect("marks lock")
            .insert(user.to_string());
        Ok(())
    }

    /// Lifts an erasure (a reactivated account's new events are seen).
    pub async fn unerase_user(&self, user: &UserId) -> Result<()> {
        let mut batch = Batch::new();
        batch.delete(tables::ERASED_USERS, &user.to_string());
        self.storage.commit(batch).await?;
        self.marks
            .erased
            .write()
            .expect("marks lock")
            .remove(user.as_str());
        Ok(())
    }

    /// Deletes everything stored about a room: its events (both tiers)
    /// with their relations, its state groups and current state, its
    /// timeline, threads and receipts, its remote members' membership rows,
    /// the room account data of its members, and its record. Its stream
    /// rows stay (readers skip positions whose event is gone). The events
    /// found are those of its timeline, of every state group reached from
    /// them and from the current state, and of their auth chains.
    ///
    /// The local members' current membership events (their leaves, once
    /// the room was shut down) stay, with their timeline rows, membership
    /// rows and the state groups under them: so that their clients' next
    /// sync shows the room left, and the federation and application
    /// service queues still find the leave events they carry.
    pub async fn purge(&self, room_id: &RoomId) -> Result<Purged> {
        let _guard = self.locks.lock(room_id.as_str()).await;
        let room = room_id.to_string();
        let room_prefix = tables::str_prefix(&room);
        let local = format!(":{}", self.server_name);
        let mut batch = Batch::new();

        let mut kept_events = BTreeSet::new();
        let mut kept_groups = BTreeSet::new();
        let member_prefix = tables::str2_prefix(&room, "m.room.member");
        for ((_, _, member), event_id) in
            self.storage
                .scan_prefix(tables::ROOM_STATE, &member_prefix, usize::MAX)?
        {
            if !member.ends_with(&local) {
                continue;
            }
            if let Some(stored) = self.storage.get_tiered(tables::PDU_TIERS, &event_id)? {
                let mut next = Some(stored.state_group);
                while let Some(group_id) = next.filter(|id| *id != 0) {
                    if !kept_groups.insert(group_id) {
                        break;
                    }
                    next = self
                        .storage
                        .get_tiered(tables::STATE_GROUP_TIERS, &group_id)?
                        .and_then(|group| group.prev);
                }
            }
            kept_events.insert(event_id);
        }

        let mut events: BTreeSet<String> = BTreeSet::new();
        let mut groups: BTreeSet<u64> = BTreeSet::new();
        let mut pending_events: Vec<String> = Vec::new();
        let mut pending_groups: Vec<u64> = Vec::new();
        for (key, event_id) in
            self.storage
                .scan_prefix(tables::TIMELINE, &room_prefix, usize::MAX)?
        {
            if !kept_events.contains(&event_id) {
                batch.delete(tables::TIMELINE, &key);
            }
            pending_events.push(event_id);
        }
        if let Some(record) = self.room(room_id)? {
            pending_groups.push(record.state_group);
            pending_events.extend(record.forward_extremities);
        }
        while !pending_events.is_empty() || !pending_groups.is_empty() {
            while let Some(group_id) = pending_groups.pop() {
                if group_id == 0 || !groups.insert(group_id) {
                    continue;
                }
                let Some(group) = self
                    .storage
                    .get_tiered(tables::STATE_GROUP_TIERS, &group_id)?
                else {
                    continue;
                };
                pending_events.extend(group.entries.into_iter().map(|(_, _, id)| id));
                pending_groups.extend(group.prev);
            }
            while let Some(event_id) = pending_events.pop() {
                if events.contains(&event_id) {
                    continue;
                }
                let Some(stored) = self.storage.get_tiered(tables::PDU_TIERS, &event_id)? else {
                    continue;
                };
                if stored.room_id != room {
                    continue;
                }
                pending_groups.push(stored.state_group);
                let value: Value = serde_json::from_str(&stored.json)
                    .map_err(|e| Error::Internal(format!("stored event {event_id}: {e}")))?;
                if let Some(auth) = value["auth_events"].as_array() {
                    pending_events
                        .extend(auth.iter().filter_map(|id| id.as_str()).map(str::to_owned));
                }
                events.insert(event_id);
            }
        }

        events.retain(|event_id| !kept_events.contains(event_id));
        groups.retain(|group_id| !kept_groups.contains(group_id));
        for event_id in &events {
            batch.delete_tiered(tables::PDU_TIERS, event_id);
            batch.delete(tables::TOUCHED, event_id);
            let prefix = tables::str_prefix(event_id);
            for table in [tables::RELATIONS, tables::ARCHIVED_RELATIONS] {
                delete_prefix(&self.storage, &mut batch, table, &prefix)?;
            }
        }
        for group_id in &groups {
            batch.delete_tiered(tables::STATE_GROUP_TIERS, group_id);
        }
        let mut members = BTreeSet::new();
        for (key, _) in self
            .storage
            .scan_prefix(tables::ROOM_STATE, &room_prefix, usize::MAX)?
        {
            if key.1 == "m.room.member" {
                members.insert(key.2.clone());
            }
            batch.delete(tables::ROOM_STATE, &key);
        }
        for member in &members {
            if !member.ends_with(&local) {
                batch.delete(tables::USER_ROOMS, &(member.clone(), room.clone()));
            }
            let data = tables::str2_prefix(member, &room);
            delete_prefix(&self.storage, &mut batch, tables::ACCOUNT_DATA, &data)?;
        }
        delete_prefix(&self.storage, &mut batch, tables::THREADS, &room_prefix)?;
        delete_prefix(
            &self.storage,
            &mut batch,
            tables::THREAD_ACTIVITY,
            &room_prefix,
        )?;
        delete_prefix(&self.storage, &mut batch, tables::RECEIPTS, &room_prefix)?;
        batch.delete(tables::ROOMS, &room);
        self.storage.commit(batch).await?;
        Ok(Purged {
            events: events.len(),
            state_groups: groups.len(),
        })
    }
}
