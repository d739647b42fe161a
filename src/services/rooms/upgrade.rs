//! Room upgrades: a new room of a newer version, with the old room's state,
//! and a tombstone that points the old room at it.

use ruma::{OwnedRoomId, RoomId, RoomVersionId, UserId};
use serde_json::{json, Value};

use super::draft::{Draft, Origin};
use super::Rooms;
use crate::events::NewEvent;
use crate::services::directory::Directory;
use crate::services::error::{Error, Result};

/// The state the new room inherits, as Synapse copies it.
const COPIED_STATE: [&str; 9] = [
    "m.room.server_acl",
    "m.room.encryption",
    "m.room.name",
    "m.room.join_rules",
    "m.room.topic",
    "m.room.history_visibility",
    "m.room.guest_access",
    "m.room.avatar",
    "m.room.canonical_alias",
];

impl Rooms {
    /// `POST /rooms/{roomId}/upgrade`: returns the replacement room.
    pub async fn upgrade(
        &self,
        old_room: &RoomId,
        user: &UserId,
        new_version: &str,
        directory: &Directory,
    ) -> Result<OwnedRoomId> {
        let version = RoomVersionId::try_from(new_version)
            .map_err(|_| Error::UnsupportedRoomVersion(new_version.to_owned()))?;
        self.require_joined(old_room, user)?;
        let _guard = self.locks.lock(old_room.as_str()).await;
        let view = self.power_view(old_room)?;
        if !view.reaches(user.as_str(), view.event_level("m.room.tombstone", true)) {
            return Err(Error::Forbidden(
                "You may not upgrade this room: it needs the power to send m.room.tombstone"
                    .to_owned(),
            ));
        }
        if self
            .state_event(old_room, "m.room.tombstone", "")?
            .is_some()
        {
            return Err(Error::Unknown(
                "This room has already been replaced".to_owned(),
            ));
        }
        let old_create = self
            .state_event(old_room, "m.room.create", "")?
            .ok_or_else(|| Error::Internal(format!("{old_room} has no create event")))?;

        let mut draft = Draft::new_room(self, version.clone(), self.clock.now_ms())?;
        let v12 = draft.rules.authorization.explicitly_privilege_room_creators;
        let mut create = json!({
            "room_version": version.as_str(),
            "predecessor": { "room_id": old_room },
        });
        if !draft.rules.authorization.use_room_create_sender {
            create["creator"] = json!(user);
        }
        if let Some(room_type) = old_create.content_value().get("type") {
            create["type"] = room_type.clone();
        }
        let origin = Origin::default;
        draft.append(user, NewEvent::state("m.room.create", "", create), origin())?;
        let member = json!({ "membership": "join" });
        draft.append(
            user,
            NewEvent::state("m.room.member", user.as_str(), member),
            origin(),
        )?;
        let levels = self
            .state_event(old_room, "m.room.power_levels", "")?
            .map(|pdu| pdu.content_value())
            .unwrap_or_else(|| json!({}));
        let new_levels = inherited_levels(levels.clone(), user, v12);
        draft.append(
            user,
            NewEvent::state("m.room.power_levels", "", new_levels),
            origin(),
        )?;
        for kind in COPIED_STATE {
            if let Some(pdu) = self.state_event(old_room, kind, "")? {
                draft.append(
                    user,
                    NewEvent::state(kind, "", pdu.content_value()),
                    origin(),
                )?;
            }
        }
        for member in self.current_state(old_room, Some("m.room.member"))? {
            let content = member.content_value();
            if content["membership"] == "ban" {
                let target = member.state_key.clone().unwrap_or_default();
                let mut ban = json!({ "membership": "ban" });
                if let Some(reason) = content.get("reason").filter(|r| r.is_string()) {
                    ban["reason"] = reason.clone();
                }
                draft.append(
                    user,
                    NewEvent::state("m.room.member", &target, ban),
                    origin(),
                )?;
            }
        }
        let new_room = draft
            .room_id
            .clone()
            .ok_or_else(|| Error::Internal("an upgraded room has an ID".to_owned()))?;
        directory.move_aliases_into(&mut draft.batch, old_room, &new_room)?;

        let record = self
            .room(old_room)?
            .ok_or_else(|| Error::Internal(format!("{old_room} vanished")))?;
        let mut old = Draft::existing(self, old_room, record)?;
        let tombstone = json!({
            "body": "This room has been replaced",
            "replacement_room": new_room,
        });
        old.append(
            user,
            NewEvent::state("m.room.tombstone", "", tombstone),
            origin(),
        )?;
        let mut restricted = levels;
        let floor = restricted["users_default"].as_i64().unwrap_or(0) + 1;
        for key in ["events_default", "invite"] {
            let current = restricted[key].as_i64().unwrap_or(0);
            restricted[key] = json!(current.max(50).max(floor));
        }
        // Restricting the old room needs the power to change its power
        // levels; an upgrader without it leaves them as they are.
        if view.reaches(user.as_str(), view.event_level("m.room.power_levels", true)) {
            let restrict = NewEvent::state("m.room.power_levels", "", restricted);
            old.append(user, restrict, origin())?;
        }
        // Both rooms change in one batch: no new room without its tombstone.
        let mut batch = draft.batch;
        batch.append(old.batch);
        self.storage.commit(batch).await?;
        Ok(new_room)
    }
}

/// The old room's power levels for the new room: version 12 creators may
/// not be listed; before that, the upgrader needs the power to set state.
fn inherited_levels(mut levels: Value, user: &UserId, v12: bool) -> Value {
    if !levels["users"].is_object() {
        levels["users"] = json!({});
    }
    let users = levels["users"]
        .as_object_mut()
        .expect("made an object above");
    if v12 {
        users.remove(user.as_str());
    } else {
        let current = users
            .get(user.as_str())
            .and_then(Value::as_i64)
            .unwrap_or(0);
        users.insert(user.to_string(), json!(current.max(100)));
    }
    levels
}
