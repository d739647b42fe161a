//! The federation endpoints of rooms: transactions, joins, leaves and
//! invites, and reading events and state. Reading is allowed to a server
//! that may see the room at that point (a member of it there, or the
//! room's history visibility lets it).

use axum::extract::{RawQuery, State};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use ruma::{EventId, OwnedEventId, RoomId, ServerName, UserId};
use serde_json::{json, Value};

use super::super::error::{ApiResult, MatrixError};
use super::super::extract::{Path, Signed};
use super::super::AppState;
use crate::services::federation::{inbound, membership};
use crate::services::rooms::StateIds;

pub fn routes() -> Router<AppState> {
    let v1 = |path: &str| format!("/_matrix/federation/v1{path}");
    let v2 = |path: &str| format!("/_matrix/federation/v2{path}");
    Router::new()
        .route(&v1("/send/{txn_id}"), put(send_transaction))
        .route(&v1("/make_join/{room_id}/{user_id}"), get(make_join))
        .route(&v1("/make_leave/{room_id}/{user_id}"), get(make_leave))
        .route(&v1("/make_knock/{room_id}/{user_id}"), get(make_knock))
        .route(&v1("/send_knock/{room_id}/{event_id}"), put(send_knock))
        .route(&v2("/send_join/{room_id}/{event_id}"), put(send_join))
        .route(&v2("/send_leave/{room_id}/{event_id}"), put(send_leave))
        .route(&v2("/invite/{room_id}/{event_id}"), put(invite))
        .route(&v1("/event/{event_id}"), get(event))
        .route(&v1("/state/{room_id}"), get(state))
        .route(&v1("/state_ids/{room_id}"), get(state_ids))
        .route(&v1("/event_auth/{room_id}/{event_id}"), get(event_auth))
        .route(&v1("/backfill/{room_id}"), get(backfill))
        .route(
            &v1("/get_missing_events/{room_id}"),
            post(get_missing_events),
        )
        .route(
            &v1("/timestamp_to_event/{room_id}"),
            get(timestamp_to_event),
        )
}

/// Refuses a server the room's `m.room.server_acl` denies.
fn check_acl(state: &AppState, room_id: &RoomId, origin: &ServerName) -> ApiResult<()> {
    Ok(inbound::require_acl(state, room_id, origin)?)
}

fn room(id: &str) -> ApiResult<ruma::OwnedRoomId> {
    RoomId::parse(id).map_err(|_| MatrixError::invalid_param(format!("{id:?} is not a room ID")))
}

fn event_id(id: &str) -> ApiResult<OwnedEventId> {
    EventId::parse(id).map_err(|_| MatrixError::invalid_param(format!("{id:?} is not an event ID")))
}

/// The values of a repeated query parameter.
fn query_values(query: &Option<String>, name: &str) -> Vec<String> {
    form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes())
        .filter(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
        .collect()
}

/// `PUT /_matrix/federation/v1/send/{txnId}`
async fn send_transaction(
    State(state): State<AppState>,
    Path(txn_id): Path<String>,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    let body: Value = signed.json()?;
    Ok(Json(
        inbound::receive_transaction(&state, &signed.origin, &txn_id, &body).await?,
    ))
}

async fn make(
    state: AppState,
    signed: Signed,
    room_id: String,
    user_id: String,
    query: Option<String>,
    membership: &str,
) -> ApiResult<Json<Value>> {
    let room_id = room(&room_id)?;
    let user = UserId::parse(&user_id)
        .map_err(|_| MatrixError::invalid_param(format!("{user_id:?} is not a user ID")))?;
    let mut versions = query_values(&query, "ver");
    if versions.is_empty() {
        versions.push("1".to_owned());
    }
    Ok(Json(membership::make_membership(
        &state,
        &signed.origin,
        &room_id,
        &user,
        membership,
        &versions,
    )?))
}

/// `GET /_matrix/federation/v1/make_join/{roomId}/{userId}`
async fn make_join(
    State(state): State<AppState>,
    Path((room_id, user_id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    make(state, signed, room_id, user_id, query, "join").await
}

/// `GET /_matrix/federation/v1/make_leave/{roomId}/{userId}`
async fn make_leave(
    State(state): State<AppState>,
    Path((room_id, user_id)): Path<(String, String)>,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    make(state, signed, room_id, user_id, None, "leave").await
}

/// `GET /_matrix/federation/v1/make_knock/{roomId}/{userId}`
async fn make_knock(
    State(state): State<AppState>,
    Path((room_id, user_id)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    make(state, signed, room_id, user_id, query, "knock").await
}

/// `PUT /send_join` (v2), `/send_leave` (v2) and `/send_knock` (v1):
/// another server's user's signed membership event.
async fn send_membership(
    state: AppState,
    room_id: String,
    event_id: String,
    signed: Signed,
    membership: &str,
) -> ApiResult<Json<Value>> {
    let room_id = room(&room_id)?;
    let body: Value = signed.json()?;
    Ok(Json(
        membership::send_membership(
            &state,
            &signed.origin,
            &room_id,
            &event_id,
            membership,
            &body,
        )
        .await?,
    ))
}

macro_rules! send_membership_handler {
    ($name:ident, $membership:literal, $doc:literal) => {
        #[doc = $doc]
        async fn $name(
            State(state): State<AppState>,
            Path((room_id, event_id)): Path<(String, String)>,
            signed: Signed,
        ) -> ApiResult<Json<Value>> {
            send_membership(state, room_id, event_id, signed, $membership).await
        }
    };
}

send_membership_handler!(
    send_join,
    "join",
    "`PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}`"
);
send_membership_handler!(
    send_leave,
    "leave",
    "`PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}`"
);
send_membership_handler!(
    send_knock,
    "knock",
    "`PUT /_matrix/federation/v1/send_knock/{roomId}/{eventId}`"
);

/// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`
async fn invite(
    State(state): State<AppState>,
    Path((room_id, event_id)): Path<(String, String)>,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    let room_id = room(&room_id)?;
    let body: Value = signed.json()?;
    Ok(Json(
        membership::receive_invite(&state, &signed.origin, &room_id, &event_id, &body).await?,
    ))
}

/// Whether `server` may see the room as it was with `state`: one of its
/// users is a member there, or the history visibility lets everyone (or,
/// for `shared`, any server in the room now) see it.
fn server_may_see(
    state: &AppState,
    room_id: &RoomId,
    server: &ServerName,
    at: &StateIds,
) -> ApiResult<bool> {
    let rooms = &state.rooms;
    let visibility = match at.get(&("m.room.history_visibility".to_owned(), String::new())) {
        Some(id) => rooms
            .pdu(id)?
            .and_then(|(pdu, _)| {
                pdu.content_value()["history_visibility"]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "shared".to_owned()),
        None => "shared".to_owned(),
    };
    if visibility == "world_readable" {
        return Ok(true);
    }
    let suffix = format!(":{server}");
    for ((kind, state_key), id) in at {
        if kind != "m.room.member" || !state_key.ends_with(&suffix) {
            continue;
        }
        if crate::services::rooms::draft::server_of(state_key) != Some(server.as_str()) {
            continue;
        }
        if let Some((pdu, _)) = rooms.pdu(id)? {
            let membership = pdu.content_value()["membership"]
                .as_str()
                .unwrap_or("leave")
                .to_owned();
            let allowed = match visibility.as_str() {
                "invited" => membership == "join" || membership == "invite",
                "joined" => membership == "join",
                _ => membership == "join" || membership == "invite",
            };
            if allowed {
                return Ok(true);
            }
        }
    }
    if visibility == "shared" {
        let now = rooms
            .room(room_id)?
            .map(|r| r.remote_servers)
            .unwrap_or_default();
        return Ok(now.iter().any(|s| s == server.as_str()));
    }
    Ok(false)
}

/// The state after `event_id`, if the origin may see it.
fn visible_state(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &str,
) -> ApiResult<StateIds> {
    check_acl(state, room_id, origin)?;
    let rooms = &state.rooms;
    let Some((pdu, _)) = rooms.pdu(event_id)? else {
        return Err(MatrixError::not_found(format!("unknown event {event_id}")));
    };
    if pdu.room_id != room_id {
        return Err(MatrixError::not_found(format!("unknown event {event_id}")));
    }
    let at = rooms
        .state_after_event(event_id)?
        .ok_or_else(|| MatrixError::not_found(format!("no state is known at {event_id}")))?;
    if !server_may_see(state, room_id, origin, &at)? {
        return Err(MatrixError::forbidden(format!(
            "{origin} may not see the room at this event"
        )));
    }
    Ok(at)
}

/// `GET /_matrix/federation/v1/event/{eventId}`
async fn event(
    State(state): State<AppState>,
    Path(event_id): Path<String>,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    let id = event_id.clone();
    let Some((pdu, stored)) = state.rooms.pdu(&id)? else {
        return Err(MatrixError::not_found(format!("unknown event {id}")));
    };
    if stored.outlier {
        // Known here without state of its own: the room as it is now says
        // whether the server may see it.
        check_acl(&state, &pdu.room_id, &signed.origin)?;
        let now: StateIds = state
            .rooms
            .current_state_ids(&pdu.room_id)?
            .into_iter()
            .map(|(kind, key, id)| ((kind, key), id))
            .collect();
        if !server_may_see(&state, &pdu.room_id, &signed.origin, &now)? {
            return Err(MatrixError::forbidden(format!(
                "{} may not see this event",
                signed.origin
            )));
        }
    } else {
        visible_state(&state, &signed.origin, &pdu.room_id, &id)?;
    }
    Ok(Json(json!({
        "origin": state.config.server_name,
        "origin_server_ts": state.now_ms(),
        "pdus": [membership::pdu_value(&state.rooms, &pdu)?],
    })))
}

/// The state (before an event, as the spec's `/state` answers) and the
/// auth chain of its events.
fn state_at(
    state: &AppState,
    origin: &ServerName,
    room_id: &str,
    query: &Option<String>,
) -> ApiResult<(Vec<crate::events::Pdu>, Vec<crate::events::Pdu>)> {
    let room_id = room(room_id)?;
    let event = query_values(query, "event_id")
        .pop()
        .ok_or_else(|| MatrixError::missing_param("event_id is required"))?;
    let event = event_id(&event)?;
    visible_state(state, origin, &room_id, event.as_str())?;
    let (pdu, _) = state
        .rooms
        .pdu(event.as_str())?
        .ok_or_else(|| MatrixError::not_found("unknown event"))?;
    let (_, rules) = state.rooms.version_of(&room_id)?;
    let before = state
        .rooms
        .state_before(&pdu, &rules)?
        .map_err(|_| MatrixError::not_found("the state before this event is not known"))?;
    let mut events = Vec::new();
    for id in before.values() {
        if let Some((pdu, _)) = state.rooms.pdu(id)? {
            events.push(pdu);
        }
    }
    let chain = state
        .rooms
        .auth_chain(events.iter().map(|pdu| pdu.event_id.clone()))?;
    Ok((events, chain))
}

/// `GET /_matrix/federation/v1/state/{roomId}?event_id=`
async fn state(
    State(app): State<AppState>,
    Path(room_id): Path<String>,
    RawQuery(query): RawQuery,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    let (pdus, chain) = state_at(&app, &signed.origin, &room_id, &query)?;
    let values = |list: &[crate::events::Pdu]| {
        list.iter()
            .map(|pdu| membership::pdu_value(&app.rooms, pdu))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Json(
        json!({ "pdus": values(&pdus)?, "auth_chain": values(&chain)? }),
    ))
}

/// `GET /_matrix/federation/v1/state_ids/{roomId}?event_id=`
async fn state_ids(
    State(app): State<AppState>,
    Path(room_id): Path<String>,
    RawQuery(query): RawQuery,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    let (pdus, chain) = state_at(&app, &signed.origin, &room_id, &query)?;
    let ids = |list: &[crate::events::Pdu]| {
        list.iter()
            .map(|pdu| pdu.event_id.to_string())
            .collect::<Vec<_>>()
    };
    Ok(Json(
        json!({ "pdu_ids": ids(&pdus), "auth_chain_ids": ids(&chain) }),
    ))
}

/// `GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}`
async fn event_auth(
    State(app): State<AppState>,
    Path((room_id, event)): Path<(String, String)>,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    let room_id = room(&room_id)?;
    let event = event_id(&event)?;
    visible_state(&app, &signed.origin, &room_id, event.as_str())?;
    let chain = app.rooms.auth_chain([event])?;
    let values = chain
        .iter()
        .map(|pdu| membership::pdu_value(&app.rooms, pdu))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "auth_chain": values })))
}

/// Most events one backfill or missing-events answer carries.
const MAX_EVENTS: usize = 100;

/// Walks the graph back from `start` through prev events, breadth first
/// by depth, and returns what `origin` may see, at most `limit` events.
fn walk_back(
    app: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    start: Vec<OwnedEventId>,
    stop: &std::collections::HashSet<String>,
    limit: usize,
    min_depth: u64,
) -> ApiResult<Vec<crate::events::Pdu>> {
    check_acl(app, room_id, origin)?;
    let mut seen = std::collections::HashSet::new();
    let mut frontier = start;
    let mut found = Vec::new();
    while let Some(id) = frontier.pop() {
        if found.len() >= limit || !seen.insert(id.clone()) || stop.contains(id.as_str()) {
            continue;
        }
        let Some((pdu, stored)) = app.rooms.pdu(id.as_str())? else {
            continue;
        };
        if pdu.room_id != room_id || stored.outlier || pdu.depth < min_depth {
            continue;
        }
        let Some(at) = app.rooms.state_after_event(id.as_str())? else {
            continue;
        };
        if !server_may_see(app, room_id, origin, &at)? {
            continue;
        }
        frontier.extend(pdu.prev_events.iter().cloned());
        frontier.sort_by_key(|id| {
            app.rooms
                .pdu(id.as_str())
                .ok()
                .flatten()
                .map_or(0, |(pdu, _)| pdu.depth)
        });
        found.push(pdu);
    }
    Ok(found)
}

/// `GET /_matrix/federation/v1/backfill/{roomId}?v=&limit=`
async fn backfill(
    State(app): State<AppState>,
    Path(room_id): Path<String>,
    RawQuery(query): RawQuery,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    let room_id = room(&room_id)?;
    let start = query_values(&query, "v")
        .iter()
        .map(|id| event_id(id))
        .collect::<ApiResult<Vec<_>>>()?;
    if start.is_empty() {
        return Err(MatrixError::missing_param("v is required"));
    }
    let limit = query_values(&query, "limit")
        .pop()
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(10)
        .min(MAX_EVENTS);
    let events = walk_back(
        &app,
        &signed.origin,
        &room_id,
        start,
        &Default::default(),
        limit,
        0,
    )?;
    let pdus = events
        .iter()
        .map(|pdu| membership::pdu_value(&app.rooms, pdu))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({
        "origin": app.config.server_name,
        "origin_server_ts": app.now_ms(),
        "pdus": pdus,
    })))
}

/// `POST /_matrix/federation/v1/get_missing_events/{roomId}`
async fn get_missing_events(
    State(app): State<AppState>,
    Path(room_id): Path<String>,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    let room_id = room(&room_id)?;
    let body: Value = signed.json()?;
    let ids = |field: &str| -> ApiResult<Vec<OwnedEventId>> {
        body[field]
            .as_array()
            .ok_or_else(|| MatrixError::bad_json(format!("{field} must be an array")))?
            .iter()
            .map(|v| event_id(v.as_str().unwrap_or_default()))
            .collect()
    };
    let latest = ids("latest_events")?;
    let earliest: std::collections::HashSet<String> = ids("earliest_events")?
        .iter()
        .map(|id| id.to_string())
        .collect();
    let limit = body["limit"].as_u64().unwrap_or(10).min(MAX_EVENTS as u64) as usize;
    let min_depth = body["min_depth"].as_u64().unwrap_or(0);
    // The latest events themselves are what the asker has; their ancestors
    // are what it lacks.
    let mut start = Vec::new();
    for id in &latest {
        if let Some((pdu, _)) = app.rooms.pdu(id.as_str())? {
            start.extend(pdu.prev_events.iter().cloned());
        }
    }
    let mut events = walk_back(
        &app,
        &signed.origin,
        &room_id,
        start,
        &earliest,
        limit,
        min_depth,
    )?;
    events.sort_by_key(|pdu| pdu.depth);
    let values = events
        .iter()
        .map(|pdu| membership::pdu_value(&app.rooms, pdu))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "events": values })))
}

/// `GET /_matrix/federation/v1/timestamp_to_event/{roomId}?ts=&dir=`: the
/// event closest to a time, in one direction, that the server may see.
async fn timestamp_to_event(
    State(app): State<AppState>,
    Path(room_id): Path<String>,
    RawQuery(query): RawQuery,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    let room_id = room(&room_id)?;
    check_acl(&app, &room_id, &signed.origin)?;
    let ts = query_values(&query, "ts")
        .pop()
        .and_then(|ts| ts.parse::<u64>().ok())
        .ok_or_else(|| MatrixError::missing_param("ts is required"))?;
    let direction = match query_values(&query, "dir").pop().as_deref() {
        Some("f") => crate::storage::Direction::Forward,
        Some("b") => crate::storage::Direction::Backward,
        _ => return Err(MatrixError::invalid_param("dir must be f or b")),
    };
    let found = app.rooms.event_near_timestamp(&room_id, ts, direction)?;
    let visible = match &found {
        Some(pdu) => match app.rooms.state_after_event(pdu.event_id.as_str())? {
            Some(at) => server_may_see(&app, &room_id, &signed.origin, &at)?,
            None => false,
        },
        None => false,
    };
    match found {
        Some(pdu) if visible => Ok(Json(json!({
            "event_id": pdu.event_id,
            "origin_server_ts": pdu.origin_server_ts,
        }))),
        _ => Err(MatrixError::not_found(format!(
            "No event found near {ts} in {room_id}"
        ))),
    }
}
