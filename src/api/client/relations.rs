//! Relations, threads, context and jumping to a date.
//!
//! - `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]`
//! - `GET /_matrix/client/v1/rooms/{roomId}/threads`
//! - `GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}`
//! - `GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event`

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::membership::parse_user;
use super::room_events::{parse_token, readable_room, render_event, render_events};
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, Path, Query};
use crate::api::AppState;
use crate::services::accounts::Authed;
use crate::services::rooms::relations::{RelationsQuery, MAX_RECURSION_DEPTH};
use crate::services::rooms::Page;
use crate::storage::Direction;

/// Most events one page of relations or threads returns.
const MAX_LIMIT: usize = 100;

#[derive(Deserialize, Default)]
pub struct RelationsParams {
    from: Option<String>,
    to: Option<String>,
    limit: Option<usize>,
    dir: Option<String>,
    recurse: Option<bool>,
}

/// `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}`
pub async fn all(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, event_id)): Path<(String, String)>,
    Query(params): Query<RelationsParams>,
) -> ApiResult<Json<Value>> {
    relations(&state, &authed, &room_id, &event_id, None, None, params)
}

/// `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}`
pub async fn by_type(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, event_id, rel_type)): Path<(String, String, String)>,
    Query(params): Query<RelationsParams>,
) -> ApiResult<Json<Value>> {
    relations(
        &state,
        &authed,
        &room_id,
        &event_id,
        Some(&rel_type),
        None,
        params,
    )
}

/// `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}/{eventType}`
pub async fn by_type_and_event_type(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, event_id, rel_type, event_type)): Path<(String, String, String, String)>,
    Query(params): Query<RelationsParams>,
) -> ApiResult<Json<Value>> {
    relations(
        &state,
        &authed,
        &room_id,
        &event_id,
        Some(&rel_type),
        Some(&event_type),
        params,
    )
}

fn relations(
    state: &AppState,
    authed: &Authed,
    room_id: &str,
    event_id: &str,
    rel_type: Option<&str>,
    event_type: Option<&str>,
    params: RelationsParams,
) -> ApiResult<Json<Value>> {
    let access = readable_room(state, authed, room_id)?;
    let room_id = access.room_id.clone();
    access.event(state, event_id)?;
    let direction = parse_direction(params.dir.as_deref(), Direction::Backward)?;
    let from = params.from.as_deref().map(parse_token).transpose()?;
    let to = params.to.as_deref().map(parse_token).transpose()?;
    let recurse = params.recurse.unwrap_or(false);
    let query = RelationsQuery {
        rel_type,
        event_type,
        direction,
        from,
        to,
        limit: params.limit.unwrap_or(50).clamp(1, MAX_LIMIT),
        recurse,
    };
    let page = state.rooms.relations(&room_id, event_id, &query)?;
    let events: Vec<_> = page.events.into_iter().map(|(_, pdu)| pdu).collect();
    let events = access.visible(state, events)?;
    let mut answer = json!({ "chunk": render_events(state, &events, authed)? });
    if let Some(next) = page.next {
        answer["next_batch"] = json!(format!("t{next}"));
    }
    if recurse {
        answer["recursion_depth"] = json!(MAX_RECURSION_DEPTH);
    }
    Ok(Json(answer))
}

fn parse_direction(dir: Option<&str>, default: Direction) -> ApiResult<Direction> {
    match dir {
        None => Ok(default),
        Some("b") => Ok(Direction::Backward),
        Some("f") => Ok(Direction::Forward),
        Some(other) => Err(MatrixError::invalid_param(format!("dir {other:?}"))),
    }
}

#[derive(Deserialize, Default)]
pub struct ThreadsParams {
    include: Option<String>,
    from: Option<String>,
    limit: Option<usize>,
}

/// `GET /_matrix/client/v1/rooms/{roomId}/threads`
pub async fn threads(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
    Query(params): Query<ThreadsParams>,
) -> ApiResult<Json<Value>> {
    let access = readable_room(&state, &authed, &room_id)?;
    let room_id = access.room_id.clone();
    let viewer = parse_user(&authed.user_id.to_string())?;
    let participant = match params.include.as_deref() {
        None | Some("all") => None,
        Some("participated") => Some(&viewer),
        Some(other) => return Err(MatrixError::invalid_param(format!("include {other:?}"))),
    };
    let from = params.from.as_deref().map(parse_token).transpose()?;
    let limit = params.limit.unwrap_or(50).clamp(1, MAX_LIMIT);
    let (roots, next) = state
        .rooms
        .threads(&room_id, from, limit, participant.map(|u| &**u))?;
    let roots = access.visible(&state, roots)?;
    let mut answer = json!({ "chunk": render_events(&state, &roots, &authed)? });
    if let Some(next) = next {
        answer["next_batch"] = json!(format!("t{next}"));
    }
    Ok(Json(answer))
}

#[derive(Deserialize, Default)]
pub struct ContextParams {
    limit: Option<usize>,
}

/// `GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}`
pub async fn context(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, event_id)): Path<(String, String)>,
    Query(params): Query<ContextParams>,
) -> ApiResult<Json<Value>> {
    let access = readable_room(&state, &authed, &room_id)?;
    let room_id = access.room_id.clone();
    let (pdu, stored) = access.event(&state, &event_id)?;
    let limit = params
        .limit
        .unwrap_or(10)
        .min(crate::services::rooms::MAX_PAGE);
    let before_count = limit / 2;
    let after_count = limit - before_count;
    let position = stored.stream;
    let before = if before_count == 0 {
        Page::default()
    } else {
        let from = position.saturating_sub(1);
        state
            .rooms
            .page(&room_id, from, None, Direction::Backward, before_count)?
    };
    let after = if after_count == 0 {
        Page::default()
    } else {
        state
            .rooms
            .page(&room_id, position, None, Direction::Forward, after_count)?
    };
    // Tokens for paginating on: backward from before the oldest event,
    // forward from the newest.
    let start = before
        .positions
        .last()
        .unwrap_or(&position)
        .saturating_sub(1);
    let end = *after.positions.last().unwrap_or(&position);
    let before_events = access.visible(&state, before.events)?;
    let after_events = access.visible(&state, after.events)?;
    // The state after the last event returned, which the reader could see.
    let last_group = match after_events.last() {
        Some(last) => state
            .rooms
            .pdu(last.event_id.as_str())?
            .map_or(stored.state_group, |(_, s)| s.state_group),
        None => stored.state_group,
    };
    let state_events = state.rooms.state_at_group(last_group)?;
    Ok(Json(json!({
        "event": render_event(&state, &pdu, Some(&stored), &authed)?,
        "events_before": render_events(&state, &before_events, &authed)?,
        "events_after": render_events(&state, &after_events, &authed)?,
        "start": format!("t{start}"),
        "end": format!("t{end}"),
        "state": state_events.iter().map(crate::events::Pdu::client_event).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
pub struct TimestampParams {
    ts: u64,
    dir: String,
}

/// `GET /_matrix/client/v1/rooms/{roomId}/timestamp_to_event`
pub async fn timestamp_to_event(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
    Query(params): Query<TimestampParams>,
) -> ApiResult<Json<Value>> {
    let access = readable_room(&state, &authed, &room_id)?;
    let room_id = access.room_id.clone();
    let direction = parse_direction(Some(&params.dir), Direction::Forward)?;
    let found = state
        .rooms
        .event_near_timestamp(&room_id, params.ts, direction)?;
    // An event the requester may not see is as good as none.
    let found = found.filter(|pdu| {
        access
            .visible(&state, vec![pdu.clone()])
            .is_ok_and(|kept| !kept.is_empty())
    });
    let pdu = found.ok_or_else(|| {
        MatrixError::not_found(format!(
            "No event found {} {}",
            match direction {
                Direction::Forward => "after",
                Direction::Backward => "before",
            },
            params.ts
        ))
    })?;
    Ok(Json(json!({
        "event_id": pdu.event_id,
        "origin_server_ts": pdu.origin_server_ts,
    })))
}
