//! Endpoints the spec keeps for older clients:
//! - `GET /events`: the event stream of the user's rooms after a token,
//!   waiting up to `timeout` for one
//! - `GET /rooms/{roomId}/initialSync`: a room's state, latest messages,
//!   the user's membership and the room's account data

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::membership::parse_user;
use super::room_events::{parse_token, readable_room, render_events};
use crate::api::error::ApiResult;
use crate::api::extract::{Auth, Path, Query};
use crate::api::AppState;
use crate::storage::Direction;

/// Longest wait of `GET /events`, and the wait when none is given.
const MAX_EVENTS_TIMEOUT_MS: u64 = 60_000;
const DEFAULT_EVENTS_TIMEOUT_MS: u64 = 30_000;
/// Most events of one room in one answer.
const EVENTS_PER_ROOM: usize = 100;
/// Messages in an initial sync of a room.
const INITIAL_MESSAGES: usize = 20;

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct EventsQuery {
    from: Option<String>,
    timeout: Option<u64>,
    room_id: Option<String>,
}

/// `GET /events`: the events of the user's joined rooms (or of the one
/// `room_id` they may read) after `from`, oldest first, waiting for some
/// up to `timeout` milliseconds.
pub async fn events(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(query): Query<EventsQuery>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&authed.user_id.to_string())?;
    let from = match &query.from {
        Some(token) => parse_token(token)?,
        None => state.rooms.current_stream_position(),
    };
    let accesses = match &query.room_id {
        Some(room_id) => vec![readable_room(&state, &authed, room_id)?],
        None => state
            .rooms
            .rooms_of_user(&user, "join")?
            .iter()
            .map(|room_id| readable_room(&state, &authed, room_id.as_str()))
            .collect::<ApiResult<Vec<_>>>()?,
    };
    let topics: Vec<String> = accesses.iter().map(|a| a.room_id.to_string()).collect();
    let registration = state.sync.register(&user, &topics);
    let timeout = query
        .timeout
        .unwrap_or(DEFAULT_EVENTS_TIMEOUT_MS)
        .min(MAX_EVENTS_TIMEOUT_MS);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout);
    loop {
        let upto = state.sync.current();
        let mut events = Vec::new();
        for access in &accesses {
            let page = state.rooms.page(
                &access.room_id,
                from,
                Some(upto),
                Direction::Forward,
                EVENTS_PER_ROOM,
            )?;
            events.extend(access.visible(&state, page.events)?);
        }
        if !events.is_empty() || tokio::time::Instant::now() >= deadline {
            events.sort_by_key(|event| event.origin_server_ts);
            let chunk = render_events(&state, &events, &authed)?;
            return Ok(Json(json!({
                "chunk": chunk,
                "start": format!("t{from}"),
                "end": format!("t{}", upto.max(from)),
            })));
        }
        let _ = tokio::time::timeout_at(deadline, registration.notified()).await;
    }
}

/// `GET /rooms/{roomId}/initialSync`
pub async fn room_initial_sync(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let access = readable_room(&state, &authed, &room_id)?;
    let room = access.room_id.clone();
    let from = state.rooms.current_stream_position();
    let page = state
        .rooms
        .page(&room, from, None, Direction::Backward, INITIAL_MESSAGES)?;
    let mut events = access.visible(&state, page.events)?;
    events.reverse();
    let chunk = render_events(&state, &events, &authed)?;
    let mut messages = json!({ "chunk": chunk, "end": format!("t{from}") });
    if let Some(next) = page.next {
        messages["start"] = json!(format!("t{next}"));
    }
    let room_state: Vec<Value> = access
        .state(&state, None)?
        .into_iter()
        .map(|pdu| pdu.client_event())
        .collect();
    let account_data: Vec<Value> = state
        .user_data
        .account_data_in(&access.user, Some(&room))?
        .into_iter()
        .map(|(kind, value)| json!({ "type": kind, "content": value.content }))
        .collect();
    let visibility = if state.directory.is_public(&room)? {
        "public"
    } else {
        "private"
    };
    Ok(Json(json!({
        "room_id": room,
        "membership": state.rooms.membership(&room, &access.user)?,
        "messages": messages,
        "state": room_state,
        "visibility": visibility,
        "account_data": account_data,
    })))
}
