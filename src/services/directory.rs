//! Room aliases and the public room directory.

use ruma::{OwnedRoomAliasId, OwnedRoomId, RoomAliasId, RoomId, UserId};
use serde_json::{json, Value};

use std::sync::Arc;

use super::appservices::Appservices;
use super::error::{Error, Result};
use super::locks::StripedLocks;
use super::rooms::Rooms;
use crate::storage::tables::{self, AliasRecord};
use crate::storage::{Batch, Storage};

/// Most aliases one room lists, and most rooms the directory lists.
const MAX_LISTED: usize = 10_000;

/// One published room, as `publicRooms` shows it.
pub struct PublicRoom {
    pub joined_members: u64,
    pub summary: Value,
}

/// What `publicRooms` may filter on.
#[derive(Default)]
pub struct RoomFilter {
    pub search_term: Option<String>,
    /// `Some` restricts to these room types (`None` inside: no type).
    pub room_types: Option<Vec<Option<String>>>,
}

pub struct Directory {
    storage: Storage,
    server_name: String,
    locks: StripedLocks,
    /// Told when a room's aliases change, as aliases make rooms
    /// interesting to application services.
    appservices: Arc<Appservices>,
}

impl Directory {
    pub fn new(storage: Storage, server_name: String, appservices: Arc<Appservices>) -> Self {
        Directory {
            storage,
            server_name,
            locks: StripedLocks::new(64),
            appservices,
        }
    }

    /// Parses an alias this server may hold: `#name:our.server`.
    pub fn local_alias(&self, alias: &str) -> Result<OwnedRoomAliasId> {
        let alias = RoomAliasId::parse(alias)
            .map_err(|_| Error::InvalidParam(format!("{alias:?} is not a room alias")))?;
        if alias.server_name() != self.server_name.as_str() {
            return Err(Error::InvalidParam(format!(
                "{alias} does not belong to this server"
            )));
        }
        Ok(alias)
    }

    /// The alias for a `room_alias_name` of `createRoom`.
    pub fn alias_for_name(&self, name: &str) -> Result<OwnedRoomAliasId> {
        if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
            return Err(Error::InvalidParam(format!(
                "{name:?} is not a valid alias name"
            )));
        }
        self.local_alias(&format!("#{name}:{}", self.server_name))
    }

    /// The room an alias points to, if it is a local alias that exists.
    pub fn resolve(&self, alias: &RoomAliasId) -> Result<Option<OwnedRoomId>> {
        let record = self.storage.get(tables::ALIASES, &alias.to_string())?;
        Ok(record.and_then(|r| RoomId::parse(r.room_id).ok()))
    }

    /// Adds an alias to `batch`, failing if the alias is taken. Hold
    /// [`Directory::lock_alias`] until the batch is committed.
    pub fn add_alias_into(
        &self,
        batch: &mut Batch,
        alias: &RoomAliasId,
        room_id: &RoomId,
        creator: &UserId,
    ) -> Result<()> {
        if self.resolve(alias)?.is_some() {
            return Err(Error::AliasInUse(format!(
                "Room alias {alias} already exists"
            )));
        }
        let record = AliasRecord {
            room_id: room_id.to_string(),
            creator: creator.to_string(),
        };
        batch.put(tables::ALIASES, &alias.to_string(), &record);
        batch.put(
            tables::ROOM_ALIASES,
            &(room_id.to_string(), alias.to_string()),
            &(),
        );
        self.appservices.forget_room(room_id.as_str());
        Ok(())
    }

    /// Serializes changes to one alias.
    pub async fn lock_alias(&self, alias: &RoomAliasId) -> tokio::sync::MutexGuard<'_, ()> {
        self.locks.lock(alias.as_str()).await
    }

    /// `PUT /directory/room/{alias}`.
    pub async fn create_alias(
        &self,
        alias: &RoomAliasId,
        room_id: &RoomId,
        creator: &UserId,
    ) -> Result<()> {
        let _guard = self.lock_alias(alias).await;
        let mut batch = Batch::new();
        self.add_alias_into(&mut batch, alias, room_id, creator)?;
        self.storage.commit(batch).await?;
        self.appservices.forget_room(room_id.as_str());
        Ok(())
    }

    /// `DELETE /directory/room/{alias}`: by the alias's creator, a server
    /// admin (`requester` `None`), or a member who may change the room's
    /// canonical alias.
    pub async fn delete_alias(
        &self,
        alias: &RoomAliasId,
        requester: Option<&UserId>,
        rooms: &Rooms,
    ) -> Result<()> {
        let _guard = self.lock_alias(alias).await;
        let record = self
            .storage
            .get(tables::ALIASES, &alias.to_string())?
            .ok_or_else(|| Error::NotFound(format!("Room alias {alias} not found")))?;
        let room_id = RoomId::parse(&record.room_id).map_err(|e| Error::Internal(e.to_string()))?;
        let allowed = match requester {
            None => true,
            Some(requester) => {
                record.creator == requester.as_str()
                    || (rooms.membership(&room_id, requester)? == "join" && {
                        let view = rooms.power_view(&room_id)?;
                        view.reaches(
                            requester.as_str(),
                            view.event_level("m.room.canonical_alias", true),
                        )
                    })
            }
        };
        if !allowed {
            return Err(Error::Forbidden("You may not delete this alias".to_owned()));
        }
        let mut batch = Batch::new();
        batch.delete(tables::ALIASES, &alias.to_string());
        batch.delete(
            tables::ROOM_ALIASES,
            &(record.room_id.clone(), alias.to_string()),
        );
        self.storage.commit(batch).await?;
        self.appservices.forget_room(&record.room_id);
        Ok(())
    }

    /// The local aliases of a room.
    pub fn aliases(&self, room_id: &RoomId) -> Result<Vec<String>> {
        let prefix = tables::str_prefix(room_id.as_str());
        Ok(self
            .storage
            .scan_prefix(tables::ROOM_ALIASES, &prefix, MAX_LISTED)?
            .into_iter()
            .map(|((_, alias), ())| alias)
            .collect())
    }

    /// Adds to `batch` the move of every alias, and the directory listing,
    /// of `old` to `new` (a room upgrade).
    pub fn move_aliases_into(&self, batch: &mut Batch, old: &RoomId, new: &RoomId) -> Result<()> {
        for alias in self.aliases(old)? {
            if let Some(mut record) = self.storage.get(tables::ALIASES, &alias)? {
                record.room_id = new.to_string();
                batch.put(tables::ALIASES, &alias, &record);
            }
            batch.delete(tables::ROOM_ALIASES, &(old.to_string(), alias.clone()));
            batch.put(tables::ROOM_ALIASES, &(new.to_string(), alias), &());
        }
        self.appservices.forget_room(old.as_str());
        self.appservices.forget_room(new.as_str());
        if self.is_public(old)? {
            self.set_public_into(batch, old, false);
            self.set_public_into(batch, new, true);
        }
        Ok(())
    }

    pub fn is_public(&self, room_id: &RoomId) -> Result<bool> {
        Ok(self
            .storage
            .get(tables::PUBLIC_ROOMS, &room_id.to_string())?
            .is_some())
    }

    /// Adds to `batch` the publication (or withdrawal) of a room.
    pub fn set_public_into(&self, batch: &mut Batch, room_id: &RoomId, public: bool) {
        if public {
            batch.put(tables::PUBLIC_ROOMS, &room_id.to_string(), &());
        } else {
            batch.delete(tables::PUBLIC_ROOMS, &room_id.to_string());
        }
    }

    /// `PUT /directory/list/room/{roomId}`: by a member who may change the
    /// room's canonical alias, or a server admin (`requester` `None`).
    pub async fn set_visibility(
        &self,
        room_id: &RoomId,
        requester: Option<&UserId>,
        public: bool,
        rooms: &Rooms,
    ) -> Result<()> {
        if rooms.room(room_id)?.is_none() {
            return Err(Error::NotFound(format!("Unknown room {room_id}")));
        }
        if let Some(requester) = requester {
            rooms.require_joined(room_id, requester)?;
            let view = rooms.power_view(room_id)?;
            let needed = view.event_level("m.room.canonical_alias", true);
            if !view.reaches(requester.as_str(), needed) {
                return Err(Error::Forbidden(
                    "You may not change this room's visibility".to_owned(),
                ));
            }
        }
        let mut batch = Batch::new();
        self.set_public_into(&mut batch, room_id, public);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// The published rooms that match `filter`, most members first.
    pub fn public_rooms(&self, rooms: &Rooms, filter: &RoomFilter) -> Result<Vec<PublicRoom>> {
        let everything = self
            .storage
            .scan_prefix(tables::PUBLIC_ROOMS, b"", MAX_LISTED)?;
        let mut listed = Vec::new();
        for (room_id, ()) in everything {
            let Ok(room_id) = RoomId::parse(&room_id) else {
                continue;
            };
            let Some(room) = self.summary(rooms, &room_id)? else {
                continue;
            };
            if filter_matches(filter, &room.summary) {
                listed.push(room);
            }
        }
        listed.sort_by(|a, b| {
            b.joined_members.cmp(&a.joined_members).then_with(|| {
                a.summary["room_id"]
                    .as_str()
                    .cmp(&b.summary["room_id"].as_str())
            })
        });
        Ok(listed)
    }

    fn summary(&self, rooms: &Rooms, room_id: &RoomId) -> Result<Option<PublicRoom>> {
        let Some(record) = rooms.room(room_id)? else {
            return Ok(None);
        };
        let content = |kind: &str| -> Result<Value> {
            Ok(rooms
                .state_event(room_id, kind, "")?
                .map(|pdu| pdu.content_value())
                .unwrap_or(Value::Null))
        };
        let mut summary = json!({
            "room_id": room_id,
            "num_joined_members": record.joined_members,
            "world_readable": content("m.room.history_visibility")?["history_visibility"] == "world_readable",
            "guest_can_join": content("m.room.guest_access")?["guest_access"] == "can_join",
            "join_rule": content("m.room.join_rules")?["join_rule"].as_str().unwrap_or("invite"),
        });
        let optional = [
            ("name", content("m.room.name")?["name"].clone()),
            ("topic", content("m.room.topic")?["topic"].clone()),
            (
                "canonical_alias",
                content("m.room.canonical_alias")?["alias"].clone(),
            ),
            ("avatar_url", content("m.room.avatar")?["url"].clone()),
            ("room_type", content("m.room.create")?["type"].clone()),
        ];
        for (key, value) in optional {
            if value.is_string() {
                summary[key] = value;
            }
        }
        Ok(Some(PublicRoom {
            joined_members: record.joined_members,
            summary,
        }))
    }
}

fn filter_matches(filter: &RoomFilter, summary: &Value) -> bool {
    if let Some(term) = &filter.search_term {
        let term = term.to_lowercase();
        let found = ["name", "topic", "canonical_alias", "room_id"]
            .iter()
            .any(|key| {
                summary[*key]
                    .as_str()
                    .is_some_and(|text| text.to_lowercase().contains(&term))
            });
        if !found {
            return false;
        }
    }
    if let Some(types) = &filter.room_types {
        let room_type = summary["room_type"].as_str().map(str::to_owned);
        if !types.contains(&room_type) {
            return false;
        }
    }
    true
}
