//! Spaces: the summaries of rooms as a space's hierarchy shows them, who
//! may see them, and the walk of a space's tree (`GET /hierarchy`),
//! through other servers for the rooms this server is not in
//! (`/_matrix/federation/v1/hierarchy`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use axum::http::Method;
use ruma::{OwnedRoomId, RoomId, ServerName, UserId};
use serde_json::{json, Value};

use super::error::{Error, Result};
use super::federation::inbound::urlencode;
use super::Services;

/// Most rooms one walk visits.
const MAX_ROOMS: usize = 1000;
/// Most children of one space followed.
const MAX_CHILDREN: usize = 100;
/// Most servers asked about one room this server is not in.
const MAX_VIA: usize = 3;

/// Who asks: a local user, or another server (for its users).
#[derive(Clone, Copy)]
pub enum Requester<'a> {
    User(&'a UserId),
    Server(&'a ServerName),
}

/// A room as a space's hierarchy shows it: its summary and its valid
/// `m.space.child` events (with a non-empty `via`) as stripped state with
/// `origin_server_ts`.
pub fn summary(services: &Services, room_id: &RoomId) -> Result<Option<Value>> {
    let Some(record) = services.rooms.room(room_id)? else {
        return Ok(None);
    };
    let content = |kind: &str| -> Result<Value> {
        Ok(services
            .rooms
            .state_event(room_id, kind, "")?
            .map(|pdu| pdu.content_value())
            .unwrap_or(Value::Null))
    };
    let create = content("m.room.create")?;
    let join_rules = content("m.room.join_rules")?;
    let join_rule = join_rules["join_rule"]
        .as_str()
        .unwrap_or("invite")
        .to_owned();
    let mut summary = json!({
        "room_id": room_id,
        "num_joined_members": record.joined_members,
        "world_readable": content("m.room.history_visibility")?["history_visibility"] == "world_readable",
        "guest_can_join": content("m.room.guest_access")?["guest_access"] == "can_join",
        "join_rule": join_rule,
        "room_version": record.version,
        "children_state": children_state(services, room_id)?,
    });
    let fields = [
        ("name", content("m.room.name")?["name"].clone()),
        ("topic", content("m.room.topic")?["topic"].clone()),
        ("avatar_url", content("m.room.avatar")?["url"].clone()),
        (
            "canonical_alias",
            content("m.room.canonical_alias")?["alias"].clone(),
        ),
        ("room_type", create["type"].clone()),
        (
            "encryption",
            content("m.room.encryption")?["algorithm"].clone(),
        ),
    ];
    for (field, value) in fields {
        if value.is_string() {
            summary[field] = value;
        }
    }
    if matches!(join_rule.as_str(), "restricted" | "knock_restricted") {
        summary["allowed_room_ids"] = json!(super::rooms::allowed_rooms(&join_rules));
    }
    Ok(Some(summary))
}

/// A room's valid `m.space.child` events, in the spec's order.
fn children_state(services: &Services, room_id: &RoomId) -> Result<Vec<Value>> {
    let mut children: Vec<Value> = services
        .rooms
        .current_state(room_id, Some("m.space.child"))?
        .into_iter()
        .filter(|pdu| {
            pdu.content_value()["via"]
                .as_array()
                .is_some_and(|via| via.iter().any(Value::is_string))
        })
        .map(|pdu| {
            json!({
                "type": "m.space.child",
                "state_key": pdu.state_key,
                "content": pdu.content_value(),
                "sender": pdu.sender,
                "origin_server_ts": pdu.origin_server_ts,
            })
        })
        .collect();
    sort_children(&mut children);
    Ok(children)
}

/// The spec's order of a space's children: by `order` (a string of
/// printable ASCII of at most 50 characters) where given, those without
/// after; then by `origin_server_ts`; then by room ID.
fn sort_children(children: &mut [Value]) {
    let order_of = |child: &Value| -> Option<String> {
        child["content"]["order"]
            .as_str()
            .filter(|order| order.len() <= 50 && order.bytes().all(|b| (0x20..=0x7e).contains(&b)))
            .map(str::to_owned)
    };
    children.sort_by(|a, b| {
        let key = |child: &Value| {
            let order = order_of(child);
            (
                order.is_none(),
                order,
                child["origin_server_ts"].as_u64().unwrap_or(0),
                child["state_key"].as_str().unwrap_or_default().to_owned(),
            )
        };
        key(a).cmp(&key(b))
    });
}

/// Whether `requester` may see a room from its summary: a public, knock or
/// world-readable room; one they are in or invited to (for a server: one
/// of its users is); a restricted room whose allowed rooms they are in
/// (for a server: it is asked to filter itself).
pub fn may_see(services: &Services, summary: &Value, requester: Requester<'_>) -> Result<bool> {
    if is_open(summary) {
        return Ok(true);
    }
    let Some(room_id) = summary["room_id"]
        .as_str()
        .and_then(|id| RoomId::parse(id).ok())
    else {
        return Ok(false);
    };
    match requester {
        Requester::User(user) => {
            if matches!(
                services.rooms.membership(&room_id, user)?.as_str(),
                "join" | "invite"
            ) {
                return Ok(true);
            }
            for allowed in summary["allowed_room_ids"].as_array().into_iter().flatten() {
                if let Some(allowed) = allowed.as_str().and_then(|id| RoomId::parse(id).ok()) {
                    if services.rooms.membership(&allowed, user)? == "join" {
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        }
        Requester::Server(server) => {
            if summary["join_rule"] == "restricted" {
                return Ok(true);
            }
            let suffix = format!(":{server}");
            Ok(services
                .rooms
                .current_state(&room_id, Some("m.room.member"))?
                .iter()
                .any(|member| {
                    member
                        .state_key
                        .as_deref()
                        .is_some_and(|user| user.ends_with(&suffix))
                        && matches!(
                            member.content_value()["membership"].as_str(),
                            Some("join" | "invite")
                        )
                }))
        }
    }
}

/// Whether anyone may see a room: its join rule is public, knock or
/// knock_restricted, or its history is world-readable.
pub fn is_open(summary: &Value) -> bool {
    matches!(
        summary["join_rule"].as_str(),
        Some("public" | "knock" | "knock_restricted")
    ) || summary["world_readable"] == true
}

/// A room's summary: from here when this server is in it, else from the
/// first of `via` that answers (`/_matrix/federation/v1/hierarchy`).
pub async fn room_summary(
    services: &Services,
    room_id: &RoomId,
    via: &[String],
) -> Result<Option<Value>> {
    if services.rooms.server_in_room(room_id)? {
        return summary(services, room_id);
    }
    let mut ignored = BTreeMap::new();
    Ok(ask_servers(services, room_id, via, false, &mut ignored).await)
}

/// `GET /_matrix/federation/v1/hierarchy/{roomId}`: the space and those of
/// its children this server is in and `origin` may see.
pub fn federation_hierarchy(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    suggested_only: bool,
) -> Result<Value> {
    let not_found = || Error::NotFound("Room does not exist.".to_owned());
    if !services.rooms.server_in_room(room_id)? {
        return Err(not_found());
    }
    let room = summary(services, room_id)?.ok_or_else(not_found)?;
    if !may_see(services, &room, Requester::Server(origin))? {
        return Err(not_found());
    }
    let mut children = Vec::new();
    let mut inaccessible = Vec::new();
    for child in child_rooms(&room, suggested_only) {
        if !services.rooms.server_in_room(&child.room_id)? {
            continue;
        }
        let Some(summary) = summary(services, &child.room_id)? else {
            continue;
        };
        if may_see(services, &summary, Requester::Server(origin))? {
            children.push(summary);
        } else {
            inaccessible.push(child.room_id.to_string());
        }
    }
    Ok(json!({ "room": room, "children": children, "inaccessible_children": inaccessible }))
}

/// A child a space names, and the servers to ask about it.
struct Child {
    room_id: OwnedRoomId,
    via: Vec<String>,
}

fn child_rooms(summary: &Value, suggested_only: bool) -> Vec<Child> {
    summary["children_state"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|child| !suggested_only || child["content"]["suggested"] == true)
        .filter_map(|child| {
            let room_id = RoomId::parse(child["state_key"].as_str()?).ok()?;
            let via = child["content"]["via"]
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            Some(Child { room_id, via })
        })
        .take(MAX_CHILDREN)
        .collect()
}

/// What a walk asks for.
#[derive(Clone, Copy)]
pub struct Walk {
    pub suggested_only: bool,
    pub max_depth: Option<usize>,
}

/// The rooms of a space's tree that `user` may see, breadth first from
/// the space (which they must be able to see), each once, up to
/// `max_depth` levels of children. Rooms this server is not in are asked
/// of the servers the parent names (`via`).
pub async fn walk(
    services: &Services,
    user: &UserId,
    root: &RoomId,
    walk: Walk,
) -> Result<Vec<Value>> {
    let mut remote: BTreeMap<OwnedRoomId, Value> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([(root.to_owned(), Vec::new(), 0usize)]);
    let mut rooms = Vec::new();
    while let Some((room_id, via, depth)) = queue.pop_front() {
        if rooms.len() >= MAX_ROOMS || !seen.insert(room_id.clone()) {
            continue;
        }
        let found = if services.rooms.server_in_room(&room_id)? {
            summary(services, &room_id)?
        } else if let Some(known) = remote
            .remove(&room_id)
            .filter(|known| known["children_state"].is_array())
        {
            Some(known)
        } else {
            ask_servers(services, &room_id, &via, walk.suggested_only, &mut remote).await
        };
        let Some(summary) = found else {
            if room_id == root {
                return Err(Error::Forbidden("You may not see this space".to_owned()));
            }
            continue;
        };
        if !may_see(services, &summary, Requester::User(user))? {
            if room_id == root {
                return Err(Error::Forbidden("You may not see this space".to_owned()));
            }
            continue;
        }
        if walk.max_depth.is_none_or(|max| depth < max) {
            for child in child_rooms(&summary, walk.suggested_only) {
                queue.push_back((child.room_id, child.via, depth + 1));
            }
        }
        rooms.push(summary);
    }
    Ok(rooms)
}

/// Asks the servers a parent names about a room this server is not in:
/// the room's summary; the summaries of its children that came along are
/// kept in `remote` for later in the walk.
async fn ask_servers(
    services: &Services,
    room_id: &RoomId,
    via: &[String],
    suggested_only: bool,
    remote: &mut BTreeMap<OwnedRoomId, Value>,
) -> Option<Value> {
    let path = format!(
        "/_matrix/federation/v1/hierarchy/{}?suggested_only={suggested_only}",
        urlencode(room_id.as_str())
    );
    for server in via.iter().take(MAX_VIA) {
        let Ok(server) = ServerName::parse(server) else {
            continue;
        };
        if server == services.federation.server_name() {
            continue;
        }
        let answer = match services
            .federation
            .client
            .send(&server, Method::GET, &path, None)
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                let error: Error = error.into();
                tracing::info!(%server, %room_id, %error, "no hierarchy from the server");
                continue;
            }
        };
        if answer["room"]["room_id"] != room_id.as_str() {
            continue;
        }
        for child in answer["children"].as_array().into_iter().flatten() {
            if let Some(id) = child["room_id"]
                .as_str()
                .and_then(|id| RoomId::parse(id).ok())
            {
                remote.entry(id).or_insert_with(|| child.clone());
            }
        }
        return Some(answer["room"].clone());
    }
    None
}
