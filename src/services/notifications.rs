//! Which events of a room notify one of its members: the user's push
//! rules (`push_rules`) evaluated (`push`) with what the room says of the
//! user (member count, display name, power levels).

use ruma::events::room::power_levels::{RoomPowerLevels, RoomPowerLevelsSource};
use ruma::push::Ruleset;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId};
use serde_json::{json, Value};

use super::error::Result;
use super::push::{evaluate, Decision, RoomContext};
use super::push_rules::PushRules;
use super::rooms::Rooms;
use super::user_data::UserData;
use crate::events::Pdu;

/// The rules of one user in one room, ready to judge its events.
pub struct Judge {
    user: OwnedUserId,
    ruleset: Ruleset,
    room: RoomContext,
}

impl Judge {
    pub fn new(
        rooms: &Rooms,
        push_rules: &PushRules,
        user_data: &UserData,
        room_id: &RoomId,
        user: &UserId,
    ) -> Result<Self> {
        Ok(Judge {
            user: user.to_owned(),
            ruleset: push_rules.ruleset(user_data, user)?,
            room: room_context(rooms, room_id, user)?,
        })
    }

    /// What the user's rules decide for `pdu`.
    pub fn decide(&self, pdu: &Pdu) -> Decision {
        evaluate(&self.ruleset, &self.user, &event_json(pdu), &self.room)
    }
}

/// The event as the rules see it (the client format's fields).
pub fn event_json(pdu: &Pdu) -> Value {
    let mut event = json!({
        "type": pdu.kind.to_string(),
        "sender": pdu.sender,
        "content": pdu.content_value(),
        "room_id": pdu.room_id,
        "event_id": pdu.event_id,
        "origin_server_ts": pdu.origin_server_ts,
    });
    if let Some(state_key) = &pdu.state_key {
        event["state_key"] = json!(state_key);
    }
    event
}

/// The thread an event is in (its root's ID), if it is in one.
pub fn thread_of(pdu: &Pdu) -> Option<String> {
    let content = pdu.content_value();
    let relation = content.get("m.relates_to")?;
    if relation.get("rel_type")?.as_str()? != "m.thread" {
        return None;
    }
    relation.get("event_id")?.as_str().map(str::to_owned)
}

/// What the push conditions need of the room, as it stands, for `user`.
pub fn room_context(rooms: &Rooms, room_id: &RoomId, user: &UserId) -> Result<RoomContext> {
    let mut member_count = 0;
    let mut display_name = None;
    for member in rooms.current_state(room_id, Some("m.room.member"))? {
        let content = member.content_value();
        if content["membership"] == "join" {
            member_count += 1;
        }
        if member.state_key.as_deref() == Some(user.as_str()) {
            display_name = content["displayname"].as_str().map(str::to_owned);
        }
    }
    Ok(RoomContext {
        room_id: OwnedRoomId::from(room_id),
        member_count,
        display_name: display_name.unwrap_or_else(|| user.localpart().to_owned()),
        power_levels: power_levels(rooms, room_id)?,
    })
}

/// The room's power levels as ruma's push conditions read them.
fn power_levels(
    rooms: &Rooms,
    room_id: &RoomId,
) -> Result<Option<ruma::push::PushConditionPowerLevelsCtx>> {
    let Some(record) = rooms.room(room_id)? else {
        return Ok(None);
    };
    let Some(rules) = RoomVersionId::try_from(record.version.as_str())
        .ok()
        .and_then(|version| version.rules())
    else {
        return Ok(None);
    };
    let source = match rooms.state_event(room_id, "m.room.power_levels", "")? {
        Some(event) => match serde_json::from_value(event.content_value()) {
            Ok(content) => RoomPowerLevelsSource::Original(content),
            Err(_) => return Ok(None),
        },
        None => RoomPowerLevelsSource::None,
    };
    let mut creators = Vec::new();
    if let Some(create) = rooms.state_event(room_id, "m.room.create", "")? {
        creators.push(create.sender.clone());
        if rules.authorization.explicitly_privilege_room_creators {
            let more = create.content_value()["additional_creators"].clone();
            let more: Vec<OwnedUserId> = serde_json::from_value(more).unwrap_or_default();
            creators.extend(more);
        }
    }
    if !rules.authorization.explicitly_privilege_room_creators {
        creators.clear();
    }
    let levels = RoomPowerLevels::new(source, &rules.authorization, creators);
    Ok(Some(levels.into()))
}
