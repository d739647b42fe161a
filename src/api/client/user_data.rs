//! Account data, tags, receipts, read markers, typing and presence.
//!
//! - `GET`/`PUT /_matrix/client/v3/user/{userId}/account_data/{type}`
//! - `GET`/`PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
//! - `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags`
//! - `PUT`/`DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
//! - `POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}`
//! - `POST /_matrix/client/v3/rooms/{roomId}/read_markers`
//! - `PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}`
//! - `GET`/`PUT /_matrix/client/v3/presence/{userId}/status`

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ruma::{OwnedRoomId, OwnedUserId};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::membership::{parse_room, parse_user};
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path};
use crate::api::AppState;
use crate::services::accounts::Authed;
use crate::services::delivery::DELIVERED_RECEIPT;
use crate::services::push_rules::PUSH_RULES;
use crate::storage::tables::PresenceRecord;

/// The requester, who must be the user named in the path.
fn own_user(authed: &Authed, user_id: &str) -> ApiResult<OwnedUserId> {
    let user = parse_user(user_id)?;
    if user.as_str() != authed.user_id.to_string() {
        return Err(MatrixError::forbidden("Cannot access another user's data"));
    }
    Ok(user)
}

/// Types that have their own endpoints and may not be set here.
fn check_settable(kind: &str) -> ApiResult<()> {
    match kind {
        "m.fully_read" => Err(MatrixError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "M_BAD_JSON",
            "Cannot set m.fully_read through this API; use read_markers",
        )),
        "m.push_rules" => Err(MatrixError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "M_BAD_JSON",
            "Cannot set m.push_rules through this API; use the push rules API",
        )),
        _ => Ok(()),
    }
}

/// `GET /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn get_global(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((user_id, kind)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&authed, &user_id)?;
    if kind == PUSH_RULES {
        // The rules in force, server defaults included, as `/pushrules/`.
        return Ok(Json(state.push_rules.content(&state.user_data, &user)?));
    }
    found(state.user_data.account_data(&user, None, &kind)?)
}

/// `PUT /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn put_global(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((user_id, kind)): Path<(String, String)>,
    JsonBody(content): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&authed, &user_id)?;
    check_settable(&kind)?;
    state
        .user_data
        .set_account_data(&user, None, &kind, Value::Object(content))
        .await?;
    Ok(Json(json!({})))
}

/// `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn get_room(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((user_id, room_id, kind)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&authed, &user_id)?;
    let room_id = parse_room(&room_id)?;
    found(state.user_data.account_data(&user, Some(&room_id), &kind)?)
}

/// `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn put_room(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((user_id, room_id, kind)): Path<(String, String, String)>,
    JsonBody(content): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&authed, &user_id)?;
    let room_id = parse_room(&room_id)?;
    check_settable(&kind)?;
    state
        .user_data
        .set_account_data(&user, Some(&room_id), &kind, Value::Object(content))
        .await?;
    Ok(Json(json!({})))
}

fn found(content: Option<Value>) -> ApiResult<Json<Value>> {
    content
        .map(Json)
        .ok_or_else(|| MatrixError::not_found("Account data not found"))
}

/// `POST /_matrix/client/v3/user/{userId}/filter`
pub async fn create_filter(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(user_id): Path<String>,
    JsonBody(filter): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&authed, &user_id)?;
    let id = state.filters.create(&user, Value::Object(filter)).await?;
    Ok(Json(json!({ "filter_id": id })))
}

/// `GET /_matrix/client/v3/user/{userId}/filter/{filterId}`
pub async fn get_filter(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((user_id, filter_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&authed, &user_id)?;
    state
        .filters
        .get(&user, &filter_id)?
        .map(Json)
        .ok_or_else(|| MatrixError::not_found("No such filter"))
}

/// `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags`
pub async fn get_tags(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((user_id, room_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&authed, &user_id)?;
    let room_id = parse_room(&room_id)?;
    Ok(Json(
        json!({ "tags": state.user_data.tags(&user, &room_id)? }),
    ))
}

/// `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
pub async fn put_tag(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((user_id, room_id, tag)): Path<(String, String, String)>,
    JsonBody(content): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let (user, room_id) = tag_target(&authed, &user_id, &room_id)?;
    if let Some(order) = content.get("order") {
        if !order.is_number() {
            return Err(MatrixError::bad_json("order must be a number"));
        }
    }
    state
        .user_data
        .update_tags(&user, &room_id, |tags| {
            tags.insert(tag, Value::Object(content));
        })
        .await?;
    Ok(Json(json!({})))
}

/// `DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
pub async fn delete_tag(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((user_id, room_id, tag)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (user, room_id) = tag_target(&authed, &user_id, &room_id)?;
    state
        .user_data
        .update_tags(&user, &room_id, |tags| {
            tags.remove(&tag);
        })
        .await?;
    Ok(Json(json!({})))
}

fn tag_target(
    authed: &Authed,
    user_id: &str,
    room_id: &str,
) -> ApiResult<(OwnedUserId, OwnedRoomId)> {
    Ok((own_user(authed, user_id)?, parse_room(room_id)?))
}

#[derive(Deserialize, Default)]
pub struct ReceiptBody {
    thread_id: Option<String>,
}

/// `POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}`
pub async fn receipt(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, receipt_type, event_id)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<ReceiptBody>,
) -> ApiResult<Json<Value>> {
    let room_id = joined_room(&state, &authed, &room_id)?;
    check_event_in_room(&state, &room_id, &event_id)?;
    let thread = body.thread_id.unwrap_or_default();
    match receipt_type.as_str() {
        "m.read" | "m.read.private" | DELIVERED_RECEIPT => {}
        "m.fully_read" if thread.is_empty() => {
            set_fully_read(&state, &authed, &room_id, &event_id).await?;
            return Ok(Json(json!({})));
        }
        "m.fully_read" => {
            return Err(MatrixError::invalid_param(
                "m.fully_read receipts cannot have a thread_id",
            ));
        }
        other => {
            return Err(MatrixError::invalid_param(format!(
                "unknown receipt type {other:?}"
            )));
        }
    }
    if !(thread.is_empty() || thread == "main" || thread.starts_with('$')) {
        return Err(MatrixError::invalid_param(
            "thread_id must be \"main\" or an event ID",
        ));
    }
    let user = parse_user(&authed.user_id.to_string())?;
    state
        .user_data
        .set_receipt(&room_id, &user, &receipt_type, &thread, &event_id)
        .await?;
    share_receipt(&state, &room_id, &user, &receipt_type, &thread, &event_id).await?;
    Ok(Json(json!({})))
}

/// Sends a public read receipt to the room's other servers (`m.receipt`);
/// private receipts never leave this server.
async fn share_receipt(
    state: &AppState,
    room_id: &OwnedRoomId,
    user: &ruma::UserId,
    receipt_type: &str,
    thread: &str,
    event_id: &str,
) -> ApiResult<()> {
    if receipt_type != "m.read" {
        return Ok(());
    }
    let mut data = json!({ "ts": state.now_ms() });
    if !thread.is_empty() {
        data["thread_id"] = json!(thread);
    }
    let edu = json!({
        "edu_type": "m.receipt",
        "content": { room_id.as_str(): { "m.read": { user.as_str(): {
            "event_ids": [event_id],
            "data": data,
        } } } },
    });
    state.rooms.queue_edu(room_id, edu).await?;
    Ok(())
}

#[derive(Deserialize)]
pub struct ReadMarkersBody {
    #[serde(rename = "m.fully_read")]
    fully_read: Option<String>,
    #[serde(rename = "m.read")]
    read: Option<String>,
    #[serde(rename = "m.read.private")]
    read_private: Option<String>,
}

/// `POST /_matrix/client/v3/rooms/{roomId}/read_markers`
pub async fn read_markers(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<ReadMarkersBody>,
) -> ApiResult<Json<Value>> {
    let room_id = joined_room(&state, &authed, &room_id)?;
    let user = parse_user(&authed.user_id.to_string())?;
    for event_id in [&body.fully_read, &body.read, &body.read_private]
        .into_iter()
        .flatten()
    {
        check_event_in_room(&state, &room_id, event_id)?;
    }
    if let Some(event_id) = &body.fully_read {
        set_fully_read(&state, &authed, &room_id, event_id).await?;
    }
    for (receipt_type, event_id) in [
        ("m.read", &body.read),
        ("m.read.private", &body.read_private),
    ] {
        if let Some(event_id) = event_id {
            state
                .user_data
                .set_receipt(&room_id, &user, receipt_type, "", event_id)
                .await?;
            share_receipt(&state, &room_id, &user, receipt_type, "", event_id).await?;
        }
    }
    Ok(Json(json!({})))
}

async fn set_fully_read(
    state: &AppState,
    authed: &Authed,
    room_id: &OwnedRoomId,
    event_id: &str,
) -> ApiResult<()> {
    let user = parse_user(&authed.user_id.to_string())?;
    let content = json!({ "event_id": event_id });
    state
        .user_data
        .set_account_data(&user, Some(room_id), "m.fully_read", content)
        .await?;
    Ok(())
}

fn joined_room(state: &AppState, authed: &Authed, room_id: &str) -> ApiResult<OwnedRoomId> {
    let room_id = parse_room(room_id)?;
    let user = parse_user(&authed.user_id.to_string())?;
    state.rooms.require_joined(&room_id, &user)?;
    Ok(room_id)
}

fn check_event_in_room(state: &AppState, room_id: &OwnedRoomId, event_id: &str) -> ApiResult<()> {
    super::membership::check_event_id(event_id)?;
    match state.rooms.pdu(event_id)? {
        Some((pdu, _)) if pdu.room_id == *room_id => Ok(()),
        _ => Err(MatrixError::not_found(format!(
            "Event {event_id} not found in this room"
        ))),
    }
}

#[derive(Deserialize)]
pub struct TypingBody {
    typing: bool,
    timeout: Option<u64>,
}

/// `PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}`
pub async fn typing(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, user_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<TypingBody>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&authed, &user_id)?;
    let room_id = joined_room(&state, &authed, &room_id)?;
    let timeout = body.timeout.unwrap_or(30_000);
    state
        .user_data
        .set_typing(&room_id, &user, body.typing, timeout);
    let edu = json!({
        "edu_type": "m.typing",
        "content": { "room_id": room_id, "user_id": user, "typing": body.typing },
    });
    state.rooms.queue_edu(&room_id, edu).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct PresenceBody {
    presence: String,
    status_msg: Option<String>,
}

/// `PUT /_matrix/client/v3/presence/{userId}/status`
pub async fn set_presence(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<PresenceBody>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&authed, &user_id)?;
    state
        .user_data
        .set_presence(&user, &body.presence, body.status_msg)
        .await?;
    Ok(Json(json!({})))
}

/// `GET /_matrix/client/v3/presence/{userId}/status`: for oneself and for
/// users who share a room with the requester.
pub async fn get_presence(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&user_id)?;
    let me = parse_user(&authed.user_id.to_string())?;
    if user != me {
        let mine = state.rooms.rooms_of_user(&me, "join")?;
        let theirs = state.rooms.rooms_of_user(&user, "join")?;
        if !mine.iter().any(|room| theirs.contains(room)) {
            return Err(MatrixError::forbidden(
                "You do not share a room with this user",
            ));
        }
    }
    Ok(Json(match state.user_data.presence(&user)? {
        Some(record) => presence_content(&record, state.now_ms()),
        None => json!({ "presence": "offline" }),
    }))
}

/// A presence record as clients read it, here and in sync's `m.presence`.
pub fn presence_content(record: &PresenceRecord, now_ms: u64) -> Value {
    let mut content = json!({
        "presence": record.presence,
        "last_active_ago": now_ms.saturating_sub(record.last_active_ts),
        "currently_active": record.presence == "online",
    });
    if let Some(message) = &record.status_msg {
        content["status_msg"] = json!(message);
    }
    content
}
