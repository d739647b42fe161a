//! Sending and reading a room's events and state.
//!
//! - `PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}`
//! - `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
//! - `PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}`
//! - `GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}`
//! - `GET /_matrix/client/v3/rooms/{roomId}/state`, `.../state/{eventType}/{stateKey}`
//! - `GET /_matrix/client/v3/rooms/{roomId}/members`, `.../joined_members`
//! - `GET /_matrix/client/v3/rooms/{roomId}/messages`

use axum::extract::State;
use axum::Json;
use ruma::{EventId, OwnedRoomId};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::membership::{parse_room, parse_user};
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path, Query};
use crate::api::AppState;
use crate::events::{NewEvent, Pdu};
use crate::services::accounts::Authed;
use crate::services::filter::RoomEventFilter;
use crate::services::rooms::draft::Origin;
use crate::services::rooms::visibility::Reader;
use crate::storage::tables::StoredPdu;
use crate::storage::Direction;

/// `PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}`
pub async fn send(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, kind, txn_id)): Path<(String, String, String)>,
    JsonBody(content): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let new = NewEvent::message(&kind, Value::Object(content));
    let txn_key = format!("send {room_id} {kind} {txn_id}");
    let event_id = send_event(&state, &authed, &room_id, new, Some((txn_key, txn_id))).await?;
    Ok(Json(json!({ "event_id": event_id })))
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn put_state(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, kind, state_key)): Path<(String, String, String)>,
    JsonBody(content): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    put_state_event(state, authed, room_id, kind, state_key, content).await
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}` (empty state key)
pub async fn put_state_empty_key(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, kind)): Path<(String, String)>,
    JsonBody(content): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    put_state_event(state, authed, room_id, kind, String::new(), content).await
}

async fn put_state_event(
    state: AppState,
    authed: Authed,
    room_id: String,
    kind: String,
    state_key: String,
    content: Map<String, Value>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let mut content = content;
    if kind == "m.room.canonical_alias" {
        check_canonical_aliases(&state, Some(&room_id), &content)?;
    }
    if kind == "m.room.member" {
        // Only the server vouches for a restricted join (see the join endpoint).
        content.remove("join_authorised_via_users_server");
    }
    let new = NewEvent::state(&kind, &state_key, Value::Object(content));
    let event_id = send_event(&state, &authed, &room_id, new, None).await?;
    Ok(Json(json!({ "event_id": event_id })))
}

/// A canonical alias event may only name local aliases that exist and
/// point to this room (aliases of other servers cannot be checked here).
/// `room_id` is `None` for a room being created, which no alias names yet.
pub fn check_canonical_aliases(
    state: &AppState,
    room_id: Option<&OwnedRoomId>,
    content: &Map<String, Value>,
) -> ApiResult<()> {
    let mut aliases: Vec<&Value> = content
        .get("alias")
        .filter(|a| !a.is_null())
        .into_iter()
        .collect();
    match content.get("alt_aliases") {
        None | Some(Value::Null) => {}
        Some(Value::Array(alternatives)) => aliases.extend(alternatives),
        Some(_) => return Err(MatrixError::bad_json("alt_aliases must be an array")),
    }
    for alias in aliases {
        let Some(text) = alias.as_str() else {
            return Err(MatrixError::bad_json("aliases must be strings"));
        };
        let parsed = ruma::RoomAliasId::parse(text)
            .map_err(|_| MatrixError::invalid_param(format!("{text:?} is not a room alias")))?;
        if parsed.server_name() != state.config.server_name.as_str() {
            continue;
        }
        let points_here = match (state.directory.resolve(&parsed)?, room_id) {
            (Some(found), Some(room_id)) => found == *room_id,
            _ => false,
        };
        if !points_here {
            return Err(crate::services::error::Error::BadAlias(format!(
                "{text} does not point to this room"
            ))
            .into());
        }
    }
    Ok(())
}

#[derive(Deserialize, Default)]
pub struct RedactBody {
    reason: Option<String>,
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}`
pub async fn redact(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, event_id, txn_id)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<RedactBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let redacts = EventId::parse(&event_id)
        .map_err(|_| MatrixError::invalid_param(format!("{event_id:?} is not an event ID")))?;
    let mut content = json!({});
    if let Some(reason) = body.reason {
        content["reason"] = json!(reason);
    }
    let mut new = NewEvent::message("m.room.redaction", content);
    new.redacts = Some(redacts);
    let txn_key = format!("redact {room_id} {event_id} {txn_id}");
    let event_id = send_event(&state, &authed, &room_id, new, Some((txn_key, txn_id))).await?;
    Ok(Json(json!({ "event_id": event_id })))
}

async fn send_event(
    state: &AppState,
    authed: &Authed,
    room_id: &OwnedRoomId,
    new: NewEvent,
    txn: Option<(String, String)>,
) -> ApiResult<ruma::OwnedEventId> {
    let sender = parse_user(&authed.user_id.to_string())?;
    let origin = Origin {
        device_id: Some(authed.device_id.clone()),
        txn,
        ts: authed.origin_ts,
    };
    Ok(state.rooms.send(room_id, &sender, new, origin).await?)
}

/// A room the requester may read, and how (see `services::rooms::visibility`).
pub struct Access {
    pub room_id: OwnedRoomId,
    pub user: ruma::OwnedUserId,
    pub reader: Reader,
}

impl Access {
    /// Keeps the events the requester may see.
    pub fn visible(&self, state: &AppState, events: Vec<Pdu>) -> ApiResult<Vec<Pdu>> {
        Ok(state
            .rooms
            .visible_events(events, &self.user, self.reader)?)
    }

    /// An event of this room that the requester may see: 400 for an
    /// invalid ID, 404 for any other event (missing, elsewhere, hidden).
    pub fn event(&self, state: &AppState, event_id: &str) -> ApiResult<(Pdu, StoredPdu)> {
        super::membership::check_event_id(event_id)?;
        let not_found = || MatrixError::not_found("Event not found");
        let (pdu, stored) = state.rooms.pdu(event_id)?.ok_or_else(not_found)?;
        if pdu.room_id != self.room_id || self.visible(state, vec![pdu.clone()])?.is_empty() {
            return Err(not_found());
        }
        Ok((pdu, stored))
    }

    /// The state the requester sees, optionally of one event type.
    pub fn state(&self, state: &AppState, kind: Option<&str>) -> ApiResult<Vec<Pdu>> {
        Ok(state.rooms.reader_state(&self.room_id, self.reader, kind)?)
    }
}

/// Checks that the requester may read the room: a member, a former member
/// (their part of the history), or anyone in a world-readable room.
pub fn readable_room(state: &AppState, authed: &Authed, room_id: &str) -> ApiResult<Access> {
    let room_id = parse_room(room_id)?;
    let user = parse_user(&authed.user_id.to_string())?;
    let reader = state.rooms.reader(&room_id, &user)?;
    Ok(Access {
        room_id,
        user,
        reader,
    })
}

/// An event as the requesting device sees it: with its own transaction ID,
/// what redacted it, and its bundled relations (edits, thread summary).
pub fn render_event(
    state: &AppState,
    pdu: &Pdu,
    stored: Option<&StoredPdu>,
    authed: &Authed,
) -> ApiResult<Value> {
    let mut event = pdu.client_event();
    let sent = u64::from(pdu.origin_server_ts.get());
    event["unsigned"]["age"] = json!(state.now_ms().saturating_sub(sent));
    let viewer = parse_user(&authed.user_id.to_string())?;
    // A redacted event carries no aggregations (its edits no longer apply).
    let redacted = stored.is_some_and(|s| s.redacted_because.is_some());
    if !redacted {
        if let Some(relations) = state.rooms.bundled_relations(pdu, &viewer)? {
            event["unsigned"]["m.relations"] = relations;
        }
    }
    if let Some(stored) = stored {
        if stored.sender_device.as_deref() == Some(authed.device_id.as_str())
            && pdu.sender == authed.user_id.to_string()
        {
            if let Some(txn_id) = &stored.txn_id {
                event["unsigned"]["transaction_id"] = json!(txn_id);
            }
        }
        if let Some(because) = &stored.redacted_because {
            if let Some((redaction, _)) = state.rooms.pdu(because)? {
                event["unsigned"]["redacted_because"] = redaction.client_event();
            }
        }
        if let Some(previous) = &stored.replaces_state {
            event["unsigned"]["replaces_state"] = json!(previous);
            if let Some((previous, _)) = state.rooms.pdu(previous)? {
                event["unsigned"]["prev_content"] = previous.content_value();
                event["unsigned"]["prev_sender"] = json!(previous.sender);
            }
        }
    }
    Ok(event)
}

/// Renders events with [`render_event`].
pub fn render_events(state: &AppState, events: &[Pdu], authed: &Authed) -> ApiResult<Vec<Value>> {
    events
        .iter()
        .map(|pdu| {
            let stored = state.rooms.pdu(pdu.event_id.as_str())?;
            render_event(state, pdu, stored.as_ref().map(|(_, s)| s), authed)
        })
        .collect()
}

/// `GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}`
pub async fn get_event(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, event_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let access = readable_room(&state, &authed, &room_id)?;
    let (pdu, stored) = access.event(&state, &event_id)?;
    Ok(Json(render_event(&state, &pdu, Some(&stored), &authed)?))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state`
pub async fn get_state(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let access = readable_room(&state, &authed, &room_id)?;
    let events = render_events(&state, &access.state(&state, None)?, &authed)?;
    Ok(Json(Value::Array(events)))
}

#[derive(Deserialize, Default)]
pub struct FormatQuery {
    format: Option<String>,
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub async fn get_state_event(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, kind, state_key)): Path<(String, String, String)>,
    Query(query): Query<FormatQuery>,
) -> ApiResult<Json<Value>> {
    state_event(state, authed, room_id, kind, state_key, query).await
}

/// `GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}` (empty state key)
pub async fn get_state_event_empty_key(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, kind)): Path<(String, String)>,
    Query(query): Query<FormatQuery>,
) -> ApiResult<Json<Value>> {
    state_event(state, authed, room_id, kind, String::new(), query).await
}

async fn state_event(
    state: AppState,
    authed: Authed,
    room_id: String,
    kind: String,
    state_key: String,
    query: FormatQuery,
) -> ApiResult<Json<Value>> {
    let access = readable_room(&state, &authed, &room_id)?;
    let pdu = access
        .state(&state, Some(&kind))?
        .into_iter()
        .find(|pdu| pdu.state_key.as_deref() == Some(state_key.as_str()))
        .ok_or_else(|| MatrixError::not_found("Event not found"))?;
    Ok(Json(match query.format.as_deref() {
        Some("event") => pdu.client_event(),
        None | Some("content") => pdu.content_value(),
        Some(other) => {
            return Err(MatrixError::invalid_param(format!(
                "unknown format {other:?}"
            )));
        }
    }))
}

#[derive(Deserialize, Default)]
pub struct MembersQuery {
    at: Option<String>,
    membership: Option<String>,
    not_membership: Option<String>,
}

/// The member events as of the `at` token (a stream position), or as the
/// requester sees them now.
fn members_at(state: &AppState, access: &Access, at: Option<&str>) -> ApiResult<Vec<Pdu>> {
    let Some(at) = at else {
        return access.state(state, Some("m.room.member"));
    };
    let position = parse_token(at)?;
    let page = state
        .rooms
        .page(&access.room_id, position, None, Direction::Backward, 1)?;
    let Some(last) = page.events.first() else {
        return Ok(Vec::new());
    };
    if access.visible(state, vec![last.clone()])?.is_empty() {
        return Err(MatrixError::forbidden(
            "You may not see the room at that point",
        ));
    }
    let group = state
        .rooms
        .pdu(last.event_id.as_str())?
        .map_or(0, |(_, stored)| stored.state_group);
    let mut members = state.rooms.state_at_group(group)?;
    members.retain(|pdu| pdu.kind.to_string() == "m.room.member");
    Ok(members)
}

/// `GET /_matrix/client/v3/rooms/{roomId}/members`
pub async fn members(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
    Query(query): Query<MembersQuery>,
) -> ApiResult<Json<Value>> {
    let access = readable_room(&state, &authed, &room_id)?;
    let members: Vec<Pdu> = members_at(&state, &access, query.at.as_deref())?
        .into_iter()
        .filter(|pdu| {
            let membership = pdu.content_value()["membership"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            query.membership.as_ref().is_none_or(|m| *m == membership)
                && query.not_membership.as_ref() != Some(&membership)
        })
        .collect();
    Ok(Json(
        json!({ "chunk": render_events(&state, &members, &authed)? }),
    ))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/joined_members`
pub async fn joined_members(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let access = readable_room(&state, &authed, &room_id)?;
    let mut joined = Map::new();
    for pdu in access.state(&state, Some("m.room.member"))? {
        let content = pdu.content_value();
        if content["membership"] == "join" {
            let mut profile = json!({});
            for (from, to) in [
                ("displayname", "display_name"),
                ("avatar_url", "avatar_url"),
            ] {
                if let Some(value) = content.get(from).filter(|v| v.is_string()) {
                    profile[to] = value.clone();
                }
            }
            joined.insert(pdu.state_key.clone().unwrap_or_default(), profile);
        }
    }
    Ok(Json(json!({ "joined": joined })))
}

#[derive(Deserialize, Default)]
pub struct MessagesQuery {
    filter: Option<String>,
    from: Option<String>,
    to: Option<String>,
    dir: Option<String>,
    limit: Option<usize>,
}

/// The member events of the senders of `events`, for lazy-loading clients.
fn lazy_members(state: &AppState, access: &Access, events: &[Pdu]) -> ApiResult<Vec<Value>> {
    let senders: std::collections::BTreeSet<&str> =
        events.iter().map(|e| e.sender.as_str()).collect();
    Ok(access
        .state(state, Some("m.room.member"))?
        .iter()
        .filter(|pdu| {
            pdu.state_key
                .as_deref()
                .is_some_and(|key| senders.contains(key))
        })
        .map(Pdu::client_event)
        .collect())
}

/// Pagination tokens are stream positions with a prefix: `t42`. A sync
/// token (`s42_7`) is accepted too, as the spec allows, for its position.
pub fn parse_token(token: &str) -> ApiResult<u64> {
    if token.starts_with('s') {
        return super::sync::SyncToken::parse(token).map(|t| t.stream);
    }
    token
        .strip_prefix('t')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| MatrixError::invalid_param(format!("{token:?} is not a pagination token")))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/messages`
pub async fn messages(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
    Query(query): Query<MessagesQuery>,
) -> ApiResult<Json<Value>> {
    let access = readable_room(&state, &authed, &room_id)?;
    let room_id = access.room_id.clone();
    let direction = match query.dir.as_deref() {
        Some("b") | None => Direction::Backward,
        Some("f") => Direction::Forward,
        Some(other) => return Err(MatrixError::invalid_param(format!("dir {other:?}"))),
    };
    let from = match (&query.from, direction) {
        (Some(token), _) => parse_token(token)?,
        (None, Direction::Backward) => state.rooms.current_stream_position(),
        (None, Direction::Forward) => 0,
    };
    let to = query.to.as_deref().map(parse_token).transpose()?;
    let limit = query.limit.unwrap_or(10);
    let mut page = state.rooms.page(&room_id, from, to, direction, limit)?;
    // Past the oldest event here: the rest of the history may be on the
    // servers that were in the room before this one.
    if direction == Direction::Backward && page.next.is_none() && to.is_none() {
        let wanted = limit.saturating_sub(page.events.len()).max(1);
        match crate::services::federation::backfill::backfill(&state, &room_id, wanted).await {
            Ok(0) => {}
            Ok(_) => page = state.rooms.page(&room_id, from, to, direction, limit)?,
            Err(error) => tracing::info!(%room_id, %error, "no history from other servers"),
        }
    }
    let events = access.visible(&state, page.events)?;
    let filter = RoomEventFilter::parse(query.filter.as_deref())?;
    let events = filter.apply(events);
    let chunk = render_events(&state, &events, &authed)?;
    let members = if filter.lazy_load_members {
        lazy_members(&state, &access, &events)?
    } else {
        Vec::new()
    };
    let mut answer = json!({ "chunk": chunk, "start": format!("t{from}") });
    if !members.is_empty() {
        answer["state"] = json!(members);
    }
    if let Some(next) = page.next {
        answer["end"] = json!(format!("t{next}"));
    }
    Ok(Json(answer))
}
