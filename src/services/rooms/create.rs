//! `createRoom`: the events of a new room, in the spec's order, as one batch.

use ruma::{OwnedRoomAliasId, OwnedRoomId, RoomVersionId, UserId};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::draft::{Draft, Origin};
use super::{room_full, Rooms};
use crate::events::NewEvent;
use crate::services::directory::Directory;
use crate::services::error::{Error, Result};

/// What a client may ask of a new room (the request body of createRoom).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CreateRoom {
    pub preset: Option<Preset>,
    pub visibility: Option<Visibility>,
    pub name: Option<String>,
    pub topic: Option<String>,
    #[serde(default)]
    pub invite: Vec<String>,
    #[serde(default)]
    pub initial_state: Vec<InitialState>,
    pub power_level_content_override: Option<Map<String, Value>>,
    pub creation_content: Option<Map<String, Value>>,
    pub room_version: Option<String>,
    #[serde(default)]
    pub is_direct: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    PrivateChat,
    TrustedPrivateChat,
    PublicChat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    Public,
    Private,
}

#[derive(Clone, Debug, Deserialize)]
pub struct InitialState {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub state_key: String,
    pub content: Value,
}

impl Rooms {
    /// Creates a room with `creator` joined and the requested invites sent.
    ///
    /// With an `alias`, the alias is made in the same batch (and the room
    /// gets its canonical alias); with a public visibility, the room is
    /// published in the directory.
    pub async fn create_room(
        &self,
        creator: &UserId,
        request: CreateRoom,
        invitees: &[ruma::OwnedUserId],
        creator_profile: Value,
        directory: &Directory,
        alias: Option<OwnedRoomAliasId>,
    ) -> Result<OwnedRoomId> {
        if 1 + invitees.len() as u64 > self.max_members {
            return Err(room_full(self.max_members));
        }
        let _alias_guard = match &alias {
            Some(alias) => {
                let guard = directory.lock_alias(alias).await;
                if directory.resolve(alias)?.is_some() {
                    return Err(Error::RoomInUse(format!(
                        "Room alias {alias} already exists"
                    )));
                }
                Some(guard)
            }
            None => None,
        };
        let version = match &request.room_version {
            Some(version) => RoomVersionId::try_from(version.as_str())
                .map_err(|_| Error::UnsupportedRoomVersion(version.clone()))?,
            None => self.default_version.clone(),
        };
        let preset = request.preset.unwrap_or(match request.visibility {
            Some(Visibility::Public) => Preset::PublicChat,
            _ => Preset::PrivateChat,
        });
        let now = self.clock.now_ms();
        let mut draft = Draft::new_room(self, version.clone(), now)?;
        let trusted = preset == Preset::TrustedPrivateChat;
        let v12 = draft.rules.authorization.explicitly_privilege_room_creators;

        let mut create = request.creation_content.clone().unwrap_or_default();
        create.insert("room_version".into(), json!(version.as_str()));
        if !draft.rules.authorization.use_room_create_sender {
            create.insert("creator".into(), json!(creator));
        }
        if v12 && trusted && !invitees.is_empty() {
            create.insert("additional_creators".into(), json!(invitees));
        }
        let origin = Origin::default;
        // The initial events are checked like any other; one the rules refuse
        // makes the request's initial state invalid (400), not forbidden.
        let build = || -> Result<()> {
            draft.append(
                creator,
                NewEvent::state("m.room.create", "", Value::Object(create)),
                origin(),
            )?;

            let mut member = json!({ "membership": "join" });
            if let Value::Object(profile) = creator_profile {
                for key in ["displayname", "avatar_url"] {
                    if let Some(value) = profile.get(key) {
                        member[key] = value.clone();
                    }
                }
            }
            draft.append(
                creator,
                NewEvent::state("m.room.member", creator.as_str(), member),
                origin(),
            )?;

            let invite_level = if preset == Preset::PublicChat { 50 } else { 0 };
            let levels = power_levels(creator, invitees, (trusted, v12, invite_level), &request);
            draft.append(
                creator,
                NewEvent::state("m.room.power_levels", "", levels),
                origin(),
            )?;
            if let Some(alias) = &alias {
                let content = json!({ "alias": alias });
                let new = NewEvent::state("m.room.canonical_alias", "", content);
                draft.append(creator, new, origin())?;
            }

            let join_rule = if preset == Preset::PublicChat {
                "public"
            } else {
                "invite"
            };
            let guest_access = if preset == Preset::PublicChat {
                "forbidden"
            } else {
                "can_join"
            };
            let defaults = [
                ("m.room.join_rules", json!({ "join_rule": join_rule })),
                (
                    "m.room.history_visibility",
                    json!({ "history_visibility": "shared" }),
                ),
                (
                    "m.room.guest_access",
                    json!({ "guest_access": guest_access }),
                ),
            ];
            for (kind, content) in defaults {
                let overridden = request
                    .initial_state
                    .iter()
                    .any(|s| s.kind == kind && s.state_key.is_empty());
                if !overridden {
                    draft.append(creator, NewEvent::state(kind, "", content), origin())?;
                }
            }
            for state in &request.initial_state {
                let new = NewEvent::state(&state.kind, &state.state_key, state.content.clone());
                draft.append(creator, new, origin())?;
            }
            if let Some(name) = &request.name {
                draft.append(
                    creator,
                    NewEvent::state("m.room.name", "", json!({ "name": name })),
                    origin(),
                )?;
            }
            if let Some(topic) = &request.topic {
                let content = json!({
                    "topic": topic,
                    "m.topic": [{ "body": topic, "mimetype": "text/plain" }],
                });
                draft.append(
                    creator,
                    NewEvent::state("m.room.topic", "", content),
                    origin(),
                )?;
            }
            for invitee in invitees {
                let mut content = json!({ "membership": "invite" });
                if request.is_direct {
                    content["is_direct"] = json!(true);
                }
                draft.append(
                    creator,
                    NewEvent::state("m.room.member", invitee.as_str(), content),
                    origin(),
                )?;
            }
            Ok(())
        };
        build().map_err(|error| match error {
            Error::Forbidden(message) => Error::InvalidRoomState(message),
            other => other,
        })?;
        let room_id = draft
            .room_id
            .clone()
            .ok_or_else(|| Error::Internal("a created room has an ID".to_owned()))?;
        if let Some(alias) = &alias {
            directory.add_alias_into(&mut draft.batch, alias, &room_id, creator)?;
            draft.queue_appended_through_alias(alias.as_str());
        }
        if request.visibility == Some(Visibility::Public) {
            directory.set_public_into(&mut draft.batch, &room_id, true);
        }
        self.storage.commit(draft.batch).await?;
        Ok(room_id)
    }
}

/// The power levels Synapse gives a new room, with the request's override.
/// `(trusted, v12, invite_level)`: whether invitees get operator power,
/// whether creators are privileged by the room version, and the level
/// needed to invite (0 in private chats, as Synapse's presets have it).
fn power_levels(
    creator: &UserId,
    invitees: &[ruma::OwnedUserId],
    (trusted, v12, invite_level): (bool, bool, i64),
    request: &CreateRoom,
) -> Value {
    let mut users = Map::new();
    // Version 12 creators hold infinite power and must not be listed.
    if !v12 {
        users.insert(creator.to_string(), json!(100));
        if trusted {
            for invitee in invitees {
                users.insert(invitee.to_string(), json!(100));
            }
        }
    }
    let mut levels = json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100,
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": invite_level,
        "historical": 100,
        "notifications": { "room": 50 },
    });
    if let Some(overrides) = &request.power_level_content_override {
        for (key, value) in overrides {
            levels[key] = value.clone();
        }
    }
    levels
}
