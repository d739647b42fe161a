//! Simplified sliding sync (MSC4186), the sync Element X and
//! matrix-rust-sdk use:
//! `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`.
//!
//! The client asks for windows (`ranges`) of sorted, filtered room lists
//! and for explicit room subscriptions, each with the state it needs
//! (`required_state`) and a timeline length. The connection remembers what
//! each room was last sent at (see `services::sliding`), so an answer
//! carries only rooms with something new, each with only what is new.
//! Rooms are sorted by their latest event, newest first.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use ruma::{OwnedRoomId, OwnedUserId, RoomId};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::membership::parse_user;
use super::room_events::render_event;
use super::sync::{
    device_lists, receipts_event, register_reader, room_is_named, room_members, stripped_state,
    SyncToken,
};
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Query};
use crate::api::AppState;
use crate::events::Pdu;
use crate::services::accounts::Authed;
use crate::services::e2ee::MAX_TO_DEVICE_PER_SYNC;
use crate::services::notifications::unread_counts;
use crate::services::push_rules::PUSH_RULES;
use crate::services::rooms::visibility::{Reader, Window};
use crate::services::sliding::{ConnectionKey, RoomConfigKey, RoomSent, Snapshot};
use crate::storage::tables::{StoredPdu, UserRoom};
use crate::storage::Direction;

/// Longest a sliding sync waits, whatever the client asks.
const MAX_TIMEOUT_MS: u64 = 300_000;
/// Most timeline events per room, whatever the client asks.
const MAX_TIMELINE_LIMIT: u64 = 500;
/// Most lists and room subscriptions in one request.
const MAX_LISTS: usize = 100;
const MAX_SUBSCRIPTIONS: usize = 1000;

#[derive(Deserialize, Default)]
pub struct SlidingQuery {
    pos: Option<String>,
    timeout: Option<u64>,
    set_presence: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SlidingRequest {
    conn_id: Option<String>,
    txn_id: Option<String>,
    lists: BTreeMap<String, ListRequest>,
    room_subscriptions: BTreeMap<String, RoomConfig>,
    extensions: Map<String, Value>,
}

#[derive(Deserialize, Default)]
pub struct ListRequest {
    #[serde(default)]
    ranges: Vec<(u64, u64)>,
    #[serde(flatten)]
    config: RoomConfig,
    #[serde(default)]
    filters: Option<ListFilters>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub struct RoomConfig {
    required_state: Vec<(String, String)>,
    timeline_limit: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ListFilters {
    is_dm: Option<bool>,
    is_encrypted: Option<bool>,
    is_invite: Option<bool>,
    /// Room types; `null` stands for rooms without a type.
    room_types: Vec<Option<String>>,
    not_room_types: Vec<Option<String>>,
}

impl RoomConfig {
    /// Two configurations for the same room combine: every state either
    /// asks for, and the longer timeline.
    fn merge(&mut self, other: &RoomConfig) {
        for entry in &other.required_state {
            if !self.required_state.contains(entry) {
                self.required_state.push(entry.clone());
            }
        }
        self.timeline_limit = self.timeline_limit.max(other.timeline_limit);
    }

    fn key(&self) -> RoomConfigKey {
        let mut required_state = self.required_state.clone();
        required_state.sort();
        RoomConfigKey {
            required_state,
            timeline_limit: self.timeline_limit,
        }
    }
}

/// `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`
pub async fn sliding_sync(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(query): Query<SlidingQuery>,
    JsonBody(body): JsonBody<SlidingRequest>,
) -> ApiResult<Json<Value>> {
    if body.lists.len() > MAX_LISTS || body.room_subscriptions.len() > MAX_SUBSCRIPTIONS {
        return Err(MatrixError::invalid_param(format!(
            "at most {MAX_LISTS} lists and {MAX_SUBSCRIPTIONS} room subscriptions"
        )));
    }
    let user = parse_user(&authed.user_id.to_string())?;
    let key: ConnectionKey = (
        user.to_string(),
        authed.device_id.clone(),
        body.conn_id.clone().unwrap_or_default(),
    );
    let base = state.sliding.snapshot(&key, query.pos.as_deref())?;
    let delivered = body
        .extensions
        .get("to_device")
        .and_then(|e| e["since"].as_str());
    if let Some(since) = delivered.and_then(|s| s.parse::<u64>().ok()) {
        // The device has its to-device messages up to `since`.
        state
            .e2ee
            .acknowledge_to_device(&user, &authed.device_id, since)
            .await?;
    }
    super::sync::set_presence(&state, &user, query.set_presence.as_deref()).await?;
    let timeout_ms = query.timeout.unwrap_or(0).min(MAX_TIMEOUT_MS);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    let registration = register_reader(&state, &user)?;
    loop {
        let look = Look {
            state: &state,
            authed: &authed,
            user: user.clone(),
            request: &body,
            base: &base,
            first: query.pos.is_none(),
            upto: SyncToken::now(&state),
        };
        let (mut answer, snapshot, has_news) = look.answer()?;
        let waited_enough = tokio::time::Instant::now() >= deadline;
        if has_news || query.pos.is_none() || waited_enough {
            answer["pos"] = json!(state.sliding.record(&key, query.pos.as_deref(), snapshot));
            if let Some(txn_id) = &body.txn_id {
                answer["txn_id"] = json!(txn_id);
            }
            return Ok(Json(answer));
        }
        state.sync.wait(&registration, deadline).await;
    }
}

/// One look at what a connection should be sent.
struct Look<'a> {
    state: &'a AppState,
    authed: &'a Authed,
    user: OwnedUserId,
    request: &'a SlidingRequest,
    base: &'a Snapshot,
    first: bool,
    upto: SyncToken,
}

/// What the lists need to know of one of the user's rooms.
struct Candidate {
    room_id: OwnedRoomId,
    membership: String,
    member_event_id: String,
    membership_stream: u64,
    bump_stamp: u64,
}

impl Look<'_> {
    /// The answer (without `pos`), what it sent, and whether it has news.
    fn answer(&self) -> ApiResult<(Value, Snapshot, bool)> {
        let candidates = self.candidates()?;
        let mut selected: BTreeMap<OwnedRoomId, RoomConfig> = BTreeMap::new();
        let mut lists = Map::new();
        let mut list_counts = BTreeMap::new();
        let direct = self.direct_rooms()?;
        for (name, list) in &self.request.lists {
            let mut members: Vec<&Candidate> = Vec::new();
            for candidate in &candidates {
                if self.list_allows(candidate, list.filters.as_ref(), &direct)? {
                    members.push(candidate);
                }
            }
            let count = members.len() as u64;
            lists.insert(name.clone(), json!({ "count": count }));
            list_counts.insert(name.clone(), count);
            for (start, end) in &list.ranges {
                let (start, end) = (*start as usize, (*end as usize).min(members.len()));
                for candidate in members.iter().take(end.saturating_add(1)).skip(start) {
                    selected
                        .entry(candidate.room_id.clone())
                        .or_default()
                        .merge(&list.config);
                }
            }
        }
        for (room_id, config) in &self.request.room_subscriptions {
            let Ok(room_id) = RoomId::parse(room_id) else {
                return Err(MatrixError::invalid_param(format!(
                    "{room_id:?} is not a room ID"
                )));
            };
            if candidates.iter().any(|c| c.room_id == room_id) {
                selected.entry(room_id).or_default().merge(config);
            }
        }
        let mut snapshot = self.base.clone();
        snapshot.stream = self.upto.stream;
        snapshot.typing = self.upto.typing;
        let mut rooms = Map::new();
        for (room_id, config) in &selected {
            let Some(candidate) = candidates.iter().find(|c| c.room_id == *room_id) else {
                continue;
            };
            let sent = RoomSent {
                stream: self.upto.stream,
                membership: candidate.membership.clone(),
                config: config.key(),
            };
            if let Some(body) = self.room(candidate, config, &direct)? {
                rooms.insert(room_id.to_string(), body);
            }
            snapshot.rooms.insert(room_id.to_string(), sent);
        }
        let extensions = self.extensions(&selected)?;
        let counts_changed = list_counts != self.base.list_counts;
        snapshot.list_counts = list_counts;
        let has_news =
            !rooms.is_empty() || counts_changed || extensions.values().any(extension_has_news);
        let answer = json!({
            "lists": lists,
            "rooms": rooms,
            "extensions": extensions,
        });
        Ok((answer, snapshot, has_news))
    }

    /// The user's rooms that lists can show, newest activity first: joined,
    /// invited and knocked rooms, and rooms left since this connection last
    /// showed them (so the client learns they are gone).
    fn candidates(&self) -> ApiResult<Vec<Candidate>> {
        let rooms = &self.state.rooms;
        let mut candidates = Vec::new();
        for (room_id, record) in rooms.memberships_of_user(&self.user)? {
            let Some(UserRoom {
                membership,
                event_id,
                stream,
                ..
            }) = rooms.membership_as_of(&room_id, &self.user, record, self.upto.stream)?
            else {
                continue;
            };
            let current = matches!(membership.as_str(), "join" | "invite" | "knock");
            let newly_left = !current
                && self
                    .base
                    .rooms
                    .get(room_id.as_str())
                    .is_some_and(|sent| sent.membership != membership);
            if !current && !newly_left {
                continue;
            }
            let bump_stamp = self.bump_stamp(&room_id, stream)?;
            candidates.push(Candidate {
                room_id,
                membership,
                member_event_id: event_id,
                membership_stream: stream,
                bump_stamp,
            });
        }
        candidates.sort_by(|a, b| {
            b.bump_stamp
                .cmp(&a.bump_stamp)
                .then_with(|| a.room_id.cmp(&b.room_id))
        });
        Ok(candidates)
    }

    /// The position of the room's latest event the user can see; for an
    /// invite or a room left, the membership itself.
    fn bump_stamp(&self, room_id: &RoomId, membership_stream: u64) -> ApiResult<u64> {
        let page =
            self.state
                .rooms
                .page(room_id, self.upto.stream, None, Direction::Backward, 1)?;
        let latest = page.positions.first().copied().unwrap_or(0);
        let membership = self.state.rooms.membership(room_id, &self.user)?;
        Ok(if membership == "join" {
            latest
        } else {
            membership_stream
        })
    }

    /// Rooms the user marked as direct chats (`m.direct`).
    fn direct_rooms(&self) -> ApiResult<BTreeSet<String>> {
        let content = self
            .state
            .user_data
            .account_data(&self.user, None, "m.direct")?
            .unwrap_or_default();
        Ok(content
            .as_object()
            .into_iter()
            .flat_map(|users| users.values())
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect())
    }

    fn list_allows(
        &self,
        candidate: &Candidate,
        filters: Option<&ListFilters>,
        direct: &BTreeSet<String>,
    ) -> ApiResult<bool> {
        let Some(filters) = filters else {
            return Ok(true);
        };
        let room_id = &candidate.room_id;
        if let Some(is_dm) = filters.is_dm {
            if direct.contains(room_id.as_str()) != is_dm {
                return Ok(false);
            }
        }
        if let Some(is_invite) = filters.is_invite {
            if (candidate.membership == "invite") != is_invite {
                return Ok(false);
            }
        }
        let rooms = &self.state.rooms;
        if let Some(is_encrypted) = filters.is_encrypted {
            let encrypted = rooms
                .state_event(room_id, "m.room.encryption", "")?
                .is_some();
            if encrypted != is_encrypted {
                return Ok(false);
            }
        }
        if !filters.room_types.is_empty() || !filters.not_room_types.is_empty() {
            let room_type = rooms
                .state_event(room_id, "m.room.create", "")?
                .and_then(|pdu| pdu.content_value()["type"].as_str().map(str::to_owned));
            if !filters.room_types.is_empty() && !filters.room_types.contains(&room_type) {
                return Ok(false);
            }
            if filters.not_room_types.contains(&room_type) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One room's entry, or `None` when the client has it all already.
    fn room(
        &self,
        candidate: &Candidate,
        config: &RoomConfig,
        direct: &BTreeSet<String>,
    ) -> ApiResult<Option<Value>> {
        let room_id = &candidate.room_id;
        let previous = self.base.rooms.get(room_id.as_str());
        let initial = previous.is_none_or(|sent| sent.config != config.key());
        let since = if initial {
            None
        } else {
            previous.map(|sent| sent.stream)
        };
        let membership_news = since.is_none_or(|s| candidate.membership_stream > s);
        if matches!(candidate.membership.as_str(), "invite" | "knock") {
            if !membership_news {
                return Ok(None);
            }
            let stripped = stripped_state(self.state, &candidate.member_event_id)?;
            let name = stripped
                .iter()
                .find(|e| e["type"] == "m.room.name")
                .and_then(|e| e["content"]["name"].as_str().map(str::to_owned));
            let mut body = json!({
                "initial": true,
                "invite_state": stripped,
                "bump_stamp": candidate.bump_stamp,
            });
            if let Some(name) = name {
                body["name"] = json!(name);
            }
            if direct.contains(room_id.as_str()) {
                body["is_dm"] = json!(true);
            }
            return Ok(Some(body));
        }
        let end = if candidate.membership == "join" {
            self.upto.stream
        } else {
            candidate.membership_stream
        };
        let timeline = self.timeline(candidate, config, since, end)?;
        if since.is_some() && timeline.events.is_empty() && !timeline.limited && !membership_news {
            return Ok(None);
        }
        let mut body = json!({
            "timeline": timeline.rendered,
            "required_state": self.required_state(room_id, config, since, end, &timeline.events)?,
            "prev_batch": format!("t{}", timeline.prev_batch),
            "limited": timeline.limited,
            "num_live": if initial { 0 } else { timeline.events.len() },
            "bump_stamp": candidate.bump_stamp,
        });
        if initial {
            body["initial"] = json!(true);
        }
        self.describe_room(room_id, &mut body, direct)?;
        // Sliding sync counts every thread together.
        let (notifications, highlights) =
            unread_counts(self.state, &self.user, room_id, end)?.total();
        body["notification_count"] = json!(notifications);
        body["highlight_count"] = json!(highlights);
        Ok(Some(body))
    }

    /// Name, avatar, heroes, counts and whether the room is a direct chat.
    fn describe_room(
        &self,
        room_id: &RoomId,
        body: &mut Value,
        direct: &BTreeSet<String>,
    ) -> ApiResult<()> {
        let rooms = &self.state.rooms;
        if let Some(name) = rooms.state_event(room_id, "m.room.name", "")? {
            if let Some(name) = name.content_value()["name"].as_str() {
                body["name"] = json!(name);
            }
        }
        if let Some(avatar) = rooms.state_event(room_id, "m.room.avatar", "")? {
            body["avatar"] = avatar.content_value()["url"].clone();
        }
        let members = room_members(self.state, &self.user, room_id)?;
        body["joined_count"] = json!(members.joined);
        body["invited_count"] = json!(members.invited);
        if !room_is_named(self.state, room_id)? {
            let mut heroes = Vec::new();
            for hero in &members.heroes {
                let mut entry = json!({ "user_id": hero });
                if let Some(member) = rooms.state_event(room_id, "m.room.member", hero)? {
                    let content = member.content_value();
                    for field in ["displayname", "avatar_url"] {
                        if content[field].is_string() {
                            entry[field] = content[field].clone();
                        }
                    }
                }
                heroes.push(entry);
            }
            body["heroes"] = json!(heroes);
        }
        if direct.contains(room_id.as_str()) {
            body["is_dm"] = json!(true);
        }
        Ok(())
    }

    /// The room's events after `since` (the latest `timeline_limit` of
    /// them), as the user may see them.
    fn timeline(
        &self,
        candidate: &Candidate,
        config: &RoomConfig,
        since: Option<u64>,
        end: u64,
    ) -> ApiResult<Timeline> {
        let limit = config.timeline_limit.min(MAX_TIMELINE_LIMIT) as usize;
        let reader = if candidate.membership == "join" {
            Reader::Joined
        } else {
            let state_group = self
                .state
                .rooms
                .pdu(&candidate.member_event_id)?
                .map_or(0, |(_, stored)| stored.state_group);
            Reader::Former { state_group }
        };
        let Window {
            events,
            limited,
            prev_batch,
        } = self.state.rooms.visible_window(
            &candidate.room_id,
            &self.user,
            reader,
            (since, end),
            limit,
            |_| true,
        )?;
        let rendered = events
            .iter()
            .map(|(pdu, stored)| render_event(self.state, pdu, Some(stored), self.authed))
            .collect::<ApiResult<Vec<_>>>()?;
        Ok(Timeline {
            events,
            rendered,
            limited,
            prev_batch,
        })
    }

    /// The state the room configuration asks for: all of it that matches
    /// for a room new to the client, else what changed after `since`.
    /// `$LAZY` members are those of the timeline's senders; `$ME` is the
    /// user.
    fn required_state(
        &self,
        room_id: &RoomId,
        config: &RoomConfig,
        since: Option<u64>,
        end: u64,
        timeline: &[(Pdu, StoredPdu)],
    ) -> ApiResult<Vec<Value>> {
        if config.required_state.is_empty() {
            return Ok(Vec::new());
        }
        let rooms = &self.state.rooms;
        // A room left is shown as it was at the leave.
        let group = rooms.state_group_at(room_id, end)?;
        let senders: BTreeSet<&str> = timeline.iter().map(|(p, _)| p.sender.as_str()).collect();
        let mut events = Vec::new();
        for ((kind, state_key), event_id) in rooms.state_ids_at_group(group)? {
            let wanted = config.required_state.iter().any(|(want_kind, want_key)| {
                let kind_matches = want_kind == "*" || *want_kind == kind;
                let key_matches = match want_key.as_str() {
                    "*" => true,
                    "$ME" => state_key == self.user.as_str(),
                    "$LAZY" => kind == "m.room.member" && senders.contains(state_key.as_str()),
                    exact => exact == state_key,
                };
                kind_matches && key_matches
            });
            if !wanted {
                continue;
            }
            let Some((pdu, stored)) = rooms.pdu(&event_id)? else {
                continue;
            };
            let lazy_member = kind == "m.room.member" && senders.contains(state_key.as_str());
            let changed = since.is_none_or(|s| stored.stream > s);
            if changed || lazy_member {
                events.push(render_event(self.state, &pdu, Some(&stored), self.authed)?);
            }
        }
        Ok(events)
    }

    /// The extensions the client enabled, with what is new in them.
    fn extensions(
        &self,
        selected: &BTreeMap<OwnedRoomId, RoomConfig>,
    ) -> ApiResult<Map<String, Value>> {
        let asked = &self.request.extensions;
        let enabled = |name: &str| asked.get(name).is_some_and(|e| e["enabled"] == true);
        let mut out = Map::new();
        if enabled("to_device") {
            let device = &self.authed.device_id;
            let waiting = self
                .state
                .e2ee
                .to_device(&self.user, device, 0, self.upto.stream)?;
            let next_batch = match waiting.last() {
                // More are waiting: the token goes only as far as these.
                Some((position, _)) if waiting.len() == MAX_TO_DEVICE_PER_SYNC => *position,
                _ => self.upto.stream,
            };
            let events: Vec<_> = waiting.into_iter().map(|(_, message)| message).collect();
            out.insert(
                "to_device".to_owned(),
                json!({ "next_batch": next_batch.to_string(), "events": events }),
            );
        }
        if enabled("e2ee") {
            let (changed, left) = if self.first {
                (Vec::new(), Vec::new())
            } else {
                let changes =
                    self.state
                        .sync
                        .changes(&self.user, self.base.stream, self.upto.stream)?;
                let joined: BTreeSet<OwnedRoomId> = self
                    .state
                    .rooms
                    .rooms_of_user(&self.user, "join")?
                    .into_iter()
                    .collect();
                device_lists(self.state, &self.user, &changes, &joined)?
            };
            out.insert(
                "e2ee".to_owned(),
                json!({
                    "device_lists": { "changed": changed, "left": left },
                    "device_one_time_keys_count": self
                        .state
                        .e2ee
                        .one_time_key_counts(&self.user, &self.authed.device_id)?,
                    "device_unused_fallback_key_types": self
                        .state
                        .e2ee
                        .unused_fallback_key_types(&self.user, &self.authed.device_id)?,
                }),
            );
        }
        let scoped = |name: &str| self.extension_rooms(asked.get(name), selected);
        if enabled("account_data") {
            out.insert(
                "account_data".to_owned(),
                self.account_data(&scoped("account_data"))?,
            );
        }
        if enabled("receipts") {
            let mut rooms = Map::new();
            for room_id in scoped("receipts") {
                let after = self.room_known_since(&room_id);
                if let Some(event) =
                    receipts_event(self.state, &self.user, &room_id, after, self.upto.stream)?
                {
                    rooms.insert(room_id.to_string(), event);
                }
            }
            out.insert("receipts".to_owned(), json!({ "rooms": rooms }));
        }
        if enabled("typing") {
            let mut rooms = Map::new();
            for room_id in scoped("typing") {
                let known = self.base.rooms.contains_key(room_id.as_str());
                let changed = self
                    .state
                    .user_data
                    .typing_changed(&room_id, self.base.typing);
                let users = self.state.user_data.typing(&room_id);
                if (known && changed) || (!known && !users.is_empty()) {
                    rooms.insert(
                        room_id.to_string(),
                        json!({ "type": "m.typing", "content": { "user_ids": users } }),
                    );
                }
            }
            out.insert("typing".to_owned(), json!({ "rooms": rooms }));
        }
        Ok(out)
    }

    /// The position after which a room's data is new to the client: 0 for
    /// a room it has not been sent on this connection.
    fn room_known_since(&self, room_id: &RoomId) -> u64 {
        match self.base.rooms.get(room_id.as_str()) {
            Some(sent) => sent.stream,
            None => 0,
        }
    }

    /// The joined rooms an extension covers: those its `lists` and `rooms`
    /// name, every room of this answer when it names neither (`*` for
    /// rooms means every subscribed room).
    fn extension_rooms(
        &self,
        config: Option<&Value>,
        selected: &BTreeMap<OwnedRoomId, RoomConfig>,
    ) -> Vec<OwnedRoomId> {
        let config = config.cloned().unwrap_or_default();
        let (lists, rooms) = (config.get("lists"), config.get("rooms"));
        let all = lists.is_none() && rooms.is_none()
            || rooms
                .and_then(Value::as_array)
                .is_some_and(|r| r.iter().any(|r| r == "*"))
            || lists
                .and_then(Value::as_array)
                .is_some_and(|l| l.iter().any(|l| l == "*"));
        let named: BTreeSet<&str> = rooms
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let listed = lists
            .and_then(Value::as_array)
            .is_some_and(|l| !l.is_empty());
        selected
            .keys()
            .filter(|room_id| all || listed || named.contains(room_id.as_str()))
            .filter(|room_id| {
                self.state
                    .rooms
                    .membership(room_id, &self.user)
                    .is_ok_and(|m| m == "join")
            })
            .cloned()
            .collect()
    }

    /// Global account data, and that of the covered rooms, new to the client.
    fn account_data(&self, rooms: &[OwnedRoomId]) -> ApiResult<Value> {
        let after = if self.first { 0 } else { self.base.stream };
        let fresh = |entries: Vec<(String, crate::storage::tables::StreamedValue)>, after: u64| {
            entries
                .into_iter()
                .filter(|(_, value)| value.stream > after && value.stream <= self.upto.stream)
                .map(|(kind, value)| json!({ "type": kind, "content": value.content }))
                .collect::<Vec<_>>()
        };
        let mut global = fresh(
            self.state.user_data.account_data_in(&self.user, None)?,
            after,
        );
        // The push rules as in force (server defaults merged), and always
        // in a connection's first answer.
        let has_rules = global.iter().any(|e| e["type"] == PUSH_RULES);
        if has_rules || self.first {
            global.retain(|e| e["type"] != PUSH_RULES);
            let content = self
                .state
                .push_rules
                .content(&self.state.user_data, &self.user)?;
            global.push(json!({ "type": PUSH_RULES, "content": content }));
        }
        let mut by_room = Map::new();
        for room_id in rooms {
            let after = self.room_known_since(room_id);
            let entries = self
                .state
                .user_data
                .account_data_in(&self.user, Some(room_id))?;
            let events = fresh(entries, after);
            if !events.is_empty() {
                by_room.insert(room_id.to_string(), json!(events));
            }
        }
        Ok(json!({ "global": global, "rooms": by_room }))
    }
}

struct Timeline {
    events: Vec<(Pdu, StoredPdu)>,
    rendered: Vec<Value>,
    limited: bool,
    prev_batch: u64,
}

/// Whether an extension's answer carries anything beyond its empty shape.
fn extension_has_news(value: &Value) -> bool {
    match value {
        Value::Array(items) => !items.is_empty(),
        Value::Object(fields) => fields.iter().any(|(name, value)| match name.as_str() {
            "next_batch" => false,
            // Per-room maps: any room in them is news.
            "rooms" => value.as_object().is_some_and(|rooms| !rooms.is_empty()),
            _ => extension_has_news(value),
        }),
        _ => false,
    }
}
