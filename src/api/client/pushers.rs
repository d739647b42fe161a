//! Pushers and notifications.
//!
//! - `GET /pushers`, `POST /pushers/set`
//! - `GET /notifications` (`from`, `limit`, `only=highlight`)

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Query};
use crate::api::AppState;
use crate::services::notifications::{thread_of, ReadPositions};
use crate::services::pushers::SetPusher;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use super::room_events::render_event;

/// `GET /pushers`
pub async fn list(State(state): State<AppState>, Auth(authed): Auth) -> ApiResult<Json<Value>> {
    let pushers = state.pushers.list(authed.localpart())?;
    Ok(Json(json!({ "pushers": pushers })))
}

/// `POST /pushers/set`: `kind: null` deletes the pusher.
pub async fn set(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let text = |name: &str| -> ApiResult<Option<String>> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(_) => Err(MatrixError::bad_json(format!("{name} must be a string"))),
        }
    };
    let kind = match body.get("kind") {
        None => return Err(MatrixError::missing_param("Missing parameter: kind")),
        Some(Value::Null) => None,
        Some(Value::String(kind)) => Some(kind.clone()),
        Some(_) => return Err(MatrixError::bad_json("kind must be a string or null")),
    };
    let required = |name: &str| -> ApiResult<String> {
        text(name)?.ok_or_else(|| MatrixError::missing_param(format!("Missing parameter: {name}")))
    };
    let append = match body.get("append") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(append)) => *append,
        Some(_) => return Err(MatrixError::bad_json("append must be a boolean")),
    };
    let request = SetPusher {
        kind,
        app_id: required("app_id")?,
        pushkey: required("pushkey")?,
        app_display_name: text("app_display_name")?,
        device_display_name: text("device_display_name")?,
        profile_tag: text("profile_tag")?,
        lang: text("lang")?,
        data: body.get("data").cloned(),
        append,
    };
    state
        .pushers
        .set(authed.localpart(), &authed.device_id, request)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct NotificationsQuery {
    from: Option<String>,
    limit: Option<String>,
    only: Option<String>,
}

/// `GET /notifications`: the events that notified the user, newest first.
pub async fn notifications(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(query): Query<NotificationsQuery>,
) -> ApiResult<Json<Value>> {
    let before = match query.from.as_deref() {
        None => None,
        Some(token) => Some(
            token
                .parse::<u64>()
                .map_err(|_| MatrixError::invalid_param("from is not a token of this server"))?,
        ),
    };
    let limit = match query.limit.as_deref() {
        None => 30,
        Some(limit) => limit
            .parse::<usize>()
            .map_err(|_| MatrixError::invalid_param("limit must be a number"))?
            .clamp(1, 100),
    };
    let highlights_only = match query.only.as_deref() {
        None => false,
        Some("highlight") => true,
        Some(other) => {
            return Err(MatrixError::invalid_param(format!(
                "only must be \"highlight\", not {other:?}"
            )))
        }
    };
    let localpart = authed.localpart().to_owned();
    let user = super::membership::parse_user(&authed.user_id.to_string())?;
    // Per room, how far the user has read it.
    let mut read_by_room: BTreeMap<String, ReadPositions> = BTreeMap::new();
    let mut notifications = Vec::new();
    let mut next = None;
    let mut scanned_to = before;
    'pages: loop {
        let page = state.pushers.notifications(&localpart, scanned_to, 200)?;
        if page.is_empty() {
            break;
        }
        for (position, record) in page {
            scanned_to = Some(position);
            if notifications.len() == limit {
                next = Some(position + 1);
                break 'pages;
            }
            if highlights_only && !record.highlight {
                continue;
            }
            let Some((pdu, stored)) = state.rooms.pdu(&record.event_id)? else {
                continue;
            };
            let read = match read_by_room.entry(record.room_id.clone()) {
                Entry::Occupied(found) => found.into_mut(),
                Entry::Vacant(slot) => {
                    slot.insert(ReadPositions::in_room(&state, &user, &pdu.room_id)?)
                }
            };
            let receipt = read.of_thread(thread_of(&pdu).as_deref());
            let event = render_event(&state, &pdu, Some(&stored), &authed)?;
            notifications.push(json!({
                "actions": record.actions,
                "event": event,
                "read": stored.stream <= receipt,
                "room_id": record.room_id,
                "ts": record.ts,
            }));
        }
    }
    let mut answer = json!({ "notifications": notifications });
    if let Some(next) = next {
        answer["next_token"] = json!(next.to_string());
    }
    Ok(Json(answer))
}
