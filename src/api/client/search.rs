//! `POST /search`: full-text search of the rooms' messages, names and
//! topics the user may read, with the spec's filter, ordering, context,
//! state, groupings, paging and highlights.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::State;
use axum::Json;
use ruma::OwnedRoomId;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::room_events::{readable_room, render_event, render_events, Access};
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Query};
use crate::api::AppState;
use crate::services::accounts::Authed;
use crate::services::filter::RoomEventFilter;
use crate::services::search::{SearchQuery, KEYS};
use crate::storage::Direction;

/// Results in a page unless the filter asks for fewer, and at most.
const DEFAULT_LIMIT: usize = 10;
const MAX_LIMIT: usize = 100;
/// Events around a result unless the request says otherwise, and at most.
const DEFAULT_CONTEXT: usize = 5;
const MAX_CONTEXT: usize = 20;
/// Hits read from the index at a time while some are hidden.
const BATCH: usize = 50;

#[derive(Deserialize)]
pub struct SearchParams {
    next_batch: Option<String>,
}

#[derive(Deserialize)]
pub struct SearchBody {
    search_categories: Categories,
}

#[derive(Deserialize)]
pub struct Categories {
    room_events: Option<RoomEvents>,
}

#[derive(Deserialize)]
pub struct RoomEvents {
    search_term: String,
    keys: Option<Vec<String>>,
    #[serde(default)]
    filter: Option<RoomEventFilter>,
    order_by: Option<String>,
    event_context: Option<EventContext>,
    #[serde(default)]
    include_state: bool,
    groupings: Option<Groupings>,
}

#[derive(Deserialize)]
pub struct EventContext {
    before_limit: Option<usize>,
    after_limit: Option<usize>,
    #[serde(default)]
    include_profile: bool,
}

#[derive(Deserialize)]
pub struct Groupings {
    #[serde(default)]
    group_by: Vec<Group>,
}

#[derive(Deserialize)]
pub struct Group {
    key: String,
}

/// `POST /search`
pub async fn search(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(params): Query<SearchParams>,
    JsonBody(body): JsonBody<SearchBody>,
) -> ApiResult<Json<Value>> {
    let Some(request) = body.search_categories.room_events else {
        return Ok(Json(json!({ "search_categories": {} })));
    };
    let keys = request
        .keys
        .clone()
        .unwrap_or_else(|| KEYS.iter().map(|k| (*k).to_owned()).collect());
    if let Some(key) = keys.iter().find(|key| !KEYS.contains(&key.as_str())) {
        return Err(MatrixError::invalid_param(format!("unknown key {key:?}")));
    }
    let by_recency = match request.order_by.as_deref() {
        None | Some("rank") => false,
        Some("recent") => true,
        Some(other) => return Err(MatrixError::invalid_param(format!("order_by {other:?}"))),
    };
    for group in request.groupings.iter().flat_map(|g| &g.group_by) {
        if group.key != "room_id" && group.key != "sender" {
            return Err(MatrixError::invalid_param(format!(
                "group_by {:?}",
                group.key
            )));
        }
    }
    let offset = match &params.next_batch {
        None => 0,
        Some(token) => token
            .parse::<usize>()
            .map_err(|_| MatrixError::invalid_param("unknown next_batch"))?,
    };
    let filter = request.filter.clone().unwrap_or_default();
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);

    // The rooms the user has been in and may still read some of.
    let user = super::membership::parse_user(&authed.user_id.to_string())?;
    let mut rooms: BTreeMap<OwnedRoomId, Access> = BTreeMap::new();
    for (room_id, _) in state.rooms.memberships_of_user(&user)? {
        let wanted = filter
            .rooms
            .as_ref()
            .is_none_or(|rooms| rooms.iter().any(|r| r == room_id.as_str()))
            && !filter.not_rooms.iter().any(|r| r == room_id.as_str());
        if wanted {
            if let Ok(access) = readable_room(&state, &authed, room_id.as_str()) {
                rooms.insert(room_id, access);
            }
        }
    }
    let room_ids: Vec<OwnedRoomId> = rooms.keys().cloned().collect();
    state.search.catch_up(state.sync.current()).await;

    // Hits, a batch at a time, kept when the user may see them and the
    // filter lets them through.
    let mut results = Vec::new();
    let mut count = 0;
    let mut position = offset;
    let mut exhausted = false;
    while results.len() < limit && !exhausted {
        let query = SearchQuery {
            term: &request.search_term,
            keys: &keys,
            rooms: &room_ids,
            by_recency,
            offset: position,
            limit: BATCH,
        };
        let (hits, total) = state.search.search(&query)?;
        count = total;
        exhausted = hits.len() < BATCH;
        for hit in hits {
            position += 1;
            let Some(access) = ruma::RoomId::parse(&hit.room_id)
                .ok()
                .and_then(|room| rooms.get(&room))
            else {
                continue;
            };
            let Some((pdu, _)) = state.rooms.pdu(&hit.event_id)? else {
                continue;
            };
            let shown = filter.apply(access.visible(&state, vec![pdu])?);
            if let Some(pdu) = shown.into_iter().next() {
                results.push((hit.rank, access, pdu));
                if results.len() == limit {
                    break;
                }
            }
        }
    }
    let more = !exhausted || position < count;

    let mut rendered = Vec::new();
    let mut groups: BTreeMap<&str, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut result_rooms = BTreeSet::new();
    for (rank, access, pdu) in &results {
        let mut entry = json!({
            "rank": rank,
            "result": render_event(&state, pdu, None, &authed)?,
        });
        if let Some(context) = &request.event_context {
            entry["context"] = event_context(&state, &authed, access, pdu, context)?;
        }
        rendered.push(entry);
        result_rooms.insert(pdu.room_id.clone());
        for group in request.groupings.iter().flat_map(|g| &g.group_by) {
            let value = if group.key == "room_id" {
                pdu.room_id.to_string()
            } else {
                pdu.sender.to_string()
            };
            groups
                .entry(if group.key == "room_id" {
                    "room_id"
                } else {
                    "sender"
                })
                .or_default()
                .entry(value)
                .or_default()
                .push(pdu.event_id.to_string());
        }
    }
    let mut answer = json!({
        "count": count,
        "highlights": highlights(&request.search_term),
        "results": rendered,
    });
    if more {
        answer["next_batch"] = json!(position.to_string());
    }
    if !groups.is_empty() {
        let mut by_key = Map::new();
        for (key, values) in groups {
            let mut entries = Map::new();
            for (order, (value, ids)) in values.into_iter().enumerate() {
                entries.insert(value, json!({ "results": ids, "order": order + 1 }));
            }
            by_key.insert(key.to_owned(), Value::Object(entries));
        }
        answer["groups"] = Value::Object(by_key);
    }
    if request.include_state {
        let mut room_state = Map::new();
        for room_id in result_rooms {
            let access = &rooms[&room_id];
            let events: Vec<Value> = access
                .state(&state, None)?
                .into_iter()
                .map(|pdu| pdu.client_event())
                .collect();
            room_state.insert(room_id.to_string(), json!(events));
        }
        answer["state"] = Value::Object(room_state);
    }
    Ok(Json(
        json!({ "search_categories": { "room_events": answer } }),
    ))
}

/// The words of the search term, lower-cased, for clients to highlight.
fn highlights(term: &str) -> Vec<String> {
    let words: BTreeSet<String> = term
        .split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .collect();
    words.into_iter().collect()
}

/// The events before and after a result that the user may see, and the
/// profiles of their senders when asked.
fn event_context(
    state: &AppState,
    authed: &Authed,
    access: &Access,
    pdu: &crate::events::Pdu,
    context: &EventContext,
) -> ApiResult<Value> {
    let before_limit = context
        .before_limit
        .unwrap_or(DEFAULT_CONTEXT)
        .min(MAX_CONTEXT);
    let after_limit = context
        .after_limit
        .unwrap_or(DEFAULT_CONTEXT)
        .min(MAX_CONTEXT);
    let position = state
        .rooms
        .pdu(pdu.event_id.as_str())?
        .map_or(0, |(_, stored)| stored.stream);
    let room = &access.room_id;
    let around =
        |from: u64, direction: Direction, limit: usize| -> ApiResult<Vec<crate::events::Pdu>> {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let page = state.rooms.page(room, from, None, direction, limit)?;
            access.visible(state, page.events)
        };
    let before = around(
        position.saturating_sub(1),
        Direction::Backward,
        before_limit,
    )?;
    let after = around(position, Direction::Forward, after_limit)?;
    let mut answer = json!({
        "events_before": render_events(state, &before, authed)?,
        "events_after": render_events(state, &after, authed)?,
        "start": format!("t{}", position.saturating_sub(1)),
        "end": format!("t{position}"),
    });
    if context.include_profile {
        let mut profiles = Map::new();
        for event in before
            .iter()
            .chain(after.iter())
            .chain(std::iter::once(pdu))
        {
            let sender = event.sender.to_string();
            if profiles.contains_key(&sender) {
                continue;
            }
            let member = state
                .rooms
                .state_event(room, "m.room.member", &sender)?
                .map(|m| m.content_value())
                .unwrap_or(Value::Null);
            let mut profile = Map::new();
            for (field, key) in [("displayname", "displayname"), ("avatar_url", "avatar_url")] {
                if let Some(value) = member[key].as_str() {
                    profile.insert(field.to_owned(), json!(value));
                }
            }
            profiles.insert(sender, Value::Object(profile));
        }
        answer["profile_info"] = Value::Object(profiles);
    }
    Ok(answer)
}
