//! `GET /_matrix/client/v3/sync`: initial and incremental sync, long-polled.
//!
//! A sync token is `s{position}_{typing}`: every durable change up to the
//! stream position (events, receipts, account data, presence), and typing
//! notices up to the typing serial. The position is the stream's watermark,
//! below which no write is still in flight, so a device resuming from a
//! token is sent every later event exactly once. Tokens are plain numbers
//! in the database's order and stay valid across restarts.
//!
//! A waiting sync registers for its rooms and its user before it looks,
//! then sleeps until a write wakes it or its timeout ends: no polling.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::membership::parse_user;
use super::room_events::render_event;
use super::user_data::presence_content;
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, Query};
use crate::api::AppState;
use crate::events::Pdu;
use crate::services::accounts::Authed;
use crate::services::e2ee::MAX_TO_DEVICE_PER_SYNC;
use crate::services::filter::{EventFormat, Filter};
use crate::services::notifications::unread_counts;
use crate::services::push_rules::PUSH_RULES;
use crate::services::rooms::visibility::{Reader, Window};
use crate::services::rooms::StateIds;
use crate::services::stream::Registration;
use crate::services::sync::{Changes, UnreadCounts};
use crate::storage::tables::{StoredPdu, ToDeviceMessage, UserRoom};

/// Timeline events per room when the filter names no limit.
const DEFAULT_TIMELINE_LIMIT: usize = 10;
/// Most timeline events per room, whatever the filter asks.
const MAX_TIMELINE_LIMIT: usize = 500;
/// Longest a sync waits, whatever the client asks.
const MAX_TIMEOUT_MS: u64 = 300_000;
/// Members named in a room summary when the room has no name.
const MAX_HEROES: usize = 5;

#[derive(Deserialize, Default)]
pub struct SyncQuery {
    filter: Option<String>,
    since: Option<String>,
    #[serde(default)]
    full_state: bool,
    set_presence: Option<String>,
    timeout: Option<u64>,
}

/// A position in every stream sync reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncToken {
    pub stream: u64,
    pub typing: u64,
}

impl SyncToken {
    pub fn parse(text: &str) -> ApiResult<Self> {
        let bad = || MatrixError::invalid_param(format!("{text:?} is not a sync token"));
        let (stream, typing) = text
            .strip_prefix('s')
            .and_then(|rest| rest.split_once('_'))
            .ok_or_else(bad)?;
        Ok(SyncToken {
            stream: stream.parse().map_err(|_| bad())?,
            typing: typing.parse().map_err(|_| bad())?,
        })
    }

    pub fn render(&self) -> String {
        format!("s{}_{}", self.stream, self.typing)
    }

    /// Where every stream stands now.
    pub fn now(state: &AppState) -> Self {
        SyncToken {
            stream: state.sync.current(),
            typing: state.user_data.typing_serial(),
        }
    }
}

/// `GET /_matrix/client/v3/sync`
pub async fn sync(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(query): Query<SyncQuery>,
) -> ApiResult<Json<Value>> {
    // Readers already woken by a write go first: a client coming back for
    // more waits behind the deliveries under way.
    tokio::task::yield_now().await;
    let user = parse_user(&authed.user_id.to_string())?;
    let filter = state.filters.resolve(&user, query.filter.as_deref())?;
    let since = query.since.as_deref().map(SyncToken::parse).transpose()?;
    set_presence(&state, &user, query.set_presence.as_deref()).await?;
    let timeout_ms = query.timeout.unwrap_or(0).min(MAX_TIMEOUT_MS);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    // Registered before the first look: a write landing after it wakes us.
    let mut known = KnownRooms::read(&state, &user)?;
    let registration = register_known(&state, &user, &known);
    if let Some(since) = since {
        // The device has everything up to its token: its to-device
        // messages up to there are delivered.
        state
            .e2ee
            .acknowledge_to_device(&user, &authed.device_id, since.stream)
            .await?;
    }
    loop {
        let waited_enough = tokio::time::Instant::now() >= deadline;
        // A token at the current position of every stream finds nothing
        // new: a client coming straight back after an answer waits first,
        // and looks once, when woken.
        let at_now = since.is_some_and(|since| since == SyncToken::now(&state));
        if !at_now || query.full_state || waited_enough {
            let (answer, empty) = look(
                &state,
                &authed,
                &user,
                &filter,
                since,
                Shape::Sync {
                    full_state: query.full_state,
                },
                &mut known,
            )?;
            let waited_enough = tokio::time::Instant::now() >= deadline;
            if !empty || since.is_none() || query.full_state || waited_enough {
                return Ok(Json(answer));
            }
        }
        state.sync.wait(&registration, deadline).await;
    }
}

/// The user's memberships as a look reads them, kept between the looks of
/// one request: they are read again only when some membership, anyone's,
/// was written since (a waiting request woken by a message or a typing
/// notice finds them unchanged).
pub struct KnownRooms {
    writes: u64,
    rooms: Vec<(OwnedRoomId, UserRoom)>,
}

impl KnownRooms {
    /// The user's memberships now.
    pub fn read(state: &AppState, user: &UserId) -> ApiResult<Self> {
        let (writes, rooms) = state.rooms.counted_memberships_of_user(user)?;
        Ok(KnownRooms { writes, rooms })
    }

    /// The memberships now: those kept, or read again if any changed.
    fn current(
        &mut self,
        state: &AppState,
        user: &UserId,
    ) -> ApiResult<&[(OwnedRoomId, UserRoom)]> {
        if state.rooms.memberships_written_since(self.writes) {
            *self = KnownRooms::read(state, user)?;
        }
        Ok(&self.rooms)
    }
}

/// What a look works out beside the events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// A `/sync` answer, with each room's whole state when `full_state`.
    Sync { full_state: bool },
    /// A WebSocket push: only what its frames carry, so no unread counts,
    /// room summaries or counts of one-time and fallback keys.
    Push,
}

/// One look at what a device should be sent after `since`, up to where
/// every stream stands now: the `/sync` answer, and whether it has nothing
/// new in it. Reads only; the caller acknowledges to-device messages.
/// `known` holds the user's memberships from an earlier read, brought up
/// to date here.
pub fn look(
    state: &AppState,
    authed: &Authed,
    user: &OwnedUserId,
    filter: &Filter,
    since: Option<SyncToken>,
    shape: Shape,
    known: &mut KnownRooms,
) -> ApiResult<(Value, bool)> {
    let mut upto = SyncToken::now(state);
    let changes_upto = |upto: u64| match since {
        Some(since) => state.sync.changes(user, since.stream, upto),
        None => Ok(Changes::default()),
    };
    let mut changes = changes_upto(upto.stream)?;
    // The device's inbox is read only when the stream says something came
    // for it in the window (or cannot say).
    let to_device = if changes.device_has_messages(&authed.device_id) {
        state.e2ee.to_device(
            user,
            &authed.device_id,
            since.map_or(0, |s| s.stream),
            upto.stream,
        )?
    } else {
        Vec::new()
    };
    if to_device.len() == MAX_TO_DEVICE_PER_SYNC {
        // More are waiting: this answer goes only as far as the last one
        // it carries, and the next sync brings the rest.
        upto.stream = to_device.last().map_or(upto.stream, |(p, _)| *p);
        changes = changes_upto(upto.stream)?;
    }
    let rooms = known.current(state, user)?;
    let request = SyncRequest {
        state,
        authed,
        user: user.clone(),
        rooms,
        filter,
        since,
        full_state: shape == Shape::Sync { full_state: true },
        counts: shape != Shape::Push,
        upto,
        changes,
        to_device: to_device.into_iter().map(|(_, m)| m).collect(),
    };
    request.answer()
}

/// Registers a waiting reader for the user's rooms (any membership) and
/// the user; done before the first look, so no write after it is missed.
pub fn register_reader(state: &AppState, user: &OwnedUserId) -> ApiResult<Registration> {
    Ok(register_known(state, user, &KnownRooms::read(state, user)?))
}

/// [`register_reader`] for the memberships `known`, read before.
pub fn register_known(state: &AppState, user: &OwnedUserId, known: &KnownRooms) -> Registration {
    let rooms: Vec<String> = known
        .rooms
        .iter()
        .map(|(room_id, _)| room_id.to_string())
        .collect();
    state.sync.register(user, &rooms)
}

/// `set_presence`: `online` (the default) or `unavailable` marks the user
/// so when they were not already; `offline` leaves presence alone.
pub async fn set_presence(
    state: &AppState,
    user: &OwnedUserId,
    wanted: Option<&str>,
) -> ApiResult<()> {
    let wanted = wanted.unwrap_or("online");
    match wanted {
        "offline" => Ok(()),
        "online" | "unavailable" => {
            let current = state.user_data.presence(user)?;
            if current.as_ref().map(|r| r.presence.as_str()) != Some(wanted) {
                let status = current.and_then(|r| r.status_msg);
                state.user_data.set_presence(user, wanted, status).await?;
            }
            Ok(())
        }
        other => Err(MatrixError::invalid_param(format!(
            "unknown set_presence {other:?}"
        ))),
    }
}

/// One look at what a device should be sent.
struct SyncRequest<'a> {
    state: &'a AppState,
    authed: &'a Authed,
    user: OwnedUserId,
    /// The user's memberships, as of this look.
    rooms: &'a [(OwnedRoomId, UserRoom)],
    filter: &'a Filter,
    since: Option<SyncToken>,
    full_state: bool,
    /// Whether the answer carries the counts: of unread events, of a
    /// room's members (its summary) and of the device's keys.
    counts: bool,
    upto: SyncToken,
    /// What changed for the user in the window (everything may have, for
    /// an initial sync).
    changes: Changes,
    to_device: Vec<ToDeviceMessage>,
}

/// A room's timeline and state for one sync.
struct RoomSlice {
    timeline: Value,
    state: Vec<Value>,
    has_events: bool,
    members_changed: bool,
}

impl SyncRequest<'_> {
    /// The answer, and whether it has nothing new in it.
    fn answer(&self) -> ApiResult<(Value, bool)> {
        let changes = &self.changes;
        let mut sections: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
        // Every joined room, whatever the room filter: presence and device
        // lists are about the users the user shares rooms with, and the
        // room filter limits the `rooms` section alone.
        let mut joined_rooms = BTreeSet::new();
        for (room_id, record) in self.rooms {
            let Some(now) = self.membership_now(room_id, record.clone())? else {
                continue;
            };
            if now.membership == "join" {
                joined_rooms.insert(room_id.clone());
            }
            if !self.room_filter_allows(room_id) {
                continue;
            }
            if let Some((section, body)) = self.room_entry(room_id, &now, changes)? {
                sections
                    .entry(section)
                    .or_default()
                    .insert(room_id.to_string(), body);
            }
        }
        let presence = self.presence(changes, &joined_rooms)?;
        let account_data = self.account_data(None, changes)?;
        let (changed, left) = match self.since {
            Some(_) => device_lists(self.state, &self.user, changes, &joined_rooms)?,
            None => (Vec::new(), Vec::new()),
        };
        let empty = sections.values().all(Map::is_empty)
            && presence.is_empty()
            && account_data.is_empty()
            && changed.is_empty()
            && left.is_empty()
            && self.to_device.is_empty();
        let rooms: Map<String, Value> = ["join", "invite", "leave", "knock"]
            .into_iter()
            .map(|name| {
                let body = sections.remove(name).unwrap_or_default();
                (name.to_owned(), Value::Object(body))
            })
            .collect();
        let mut answer = json!({
            "next_batch": self.upto.render(),
            "rooms": rooms,
            "presence": { "events": presence },
            "account_data": { "events": account_data },
            "to_device": { "events": self.to_device },
            "device_lists": { "changed": changed, "left": left },
        });
        if self.counts {
            let device = &self.authed.device_id;
            answer["device_one_time_keys_count"] =
                json!(self.state.e2ee.one_time_key_counts(&self.user, device)?);
            answer["device_unused_fallback_key_types"] = json!(self
                .state
                .e2ee
                .unused_fallback_key_types(&self.user, device)?);
        }
        Ok((answer, empty))
    }

    fn room_filter_allows(&self, room_id: &RoomId) -> bool {
        self.filter
            .room
            .as_ref()
            .is_none_or(|f| f.allows_room(room_id.as_str()))
    }

    /// The membership as of `upto`; the index may already hold a later
    /// change whose position is not yet complete.
    fn membership_now(&self, room_id: &RoomId, record: UserRoom) -> ApiResult<Option<UserRoom>> {
        Ok(self
            .state
            .rooms
            .membership_as_of(room_id, &self.user, record, self.upto.stream)?)
    }

    /// Whether the membership changed inside this sync's window.
    fn changed_in_window(&self, now: &UserRoom) -> bool {
        self.since.is_none_or(|since| now.stream > since.stream)
    }

    /// The section and body of one room, or `None` when nothing is new.
    fn room_entry(
        &self,
        room_id: &RoomId,
        now: &UserRoom,
        changes: &Changes,
    ) -> ApiResult<Option<(&'static str, Value)>> {
        match now.membership.as_str() {
            "join" => Ok(self
                .joined_room(room_id, now, changes)?
                .map(|body| ("join", body))),
            "invite" | "knock" if self.changed_in_window(now) => {
                let (section, field) = if now.membership == "invite" {
                    ("invite", "invite_state")
                } else {
                    ("knock", "knock_state")
                };
                let events = self.stripped_state(&now.event_id)?;
                Ok(Some((section, json!({ field: { "events": events } }))))
            }
            "leave" | "ban" if !now.forgotten => {
                Ok(self.left_room(room_id, now)?.map(|body| ("leave", body)))
            }
            _ => Ok(None),
        }
    }

    fn joined_room(
        &self,
        room_id: &RoomId,
        now: &UserRoom,
        changes: &Changes,
    ) -> ApiResult<Option<Value>> {
        let newly_joined = match self.since {
            None => true,
            Some(since) if now.stream > since.stream => {
                let before = self
                    .state
                    .rooms
                    .membership_at(room_id, &self.user, since.stream)?;
                before.is_none_or(|(membership, _)| membership != "join")
            }
            Some(_) => false,
        };
        let window_start = if newly_joined {
            None
        } else {
            self.since.map(|s| s.stream)
        };
        let room = room_id.as_str();
        let maybe_changed = newly_joined
            || self.full_state
            || changes.room_has_events(room)
            || changes.room_has_receipts(room)
            || changes.account_data_changed(room)
            || self
                .since
                .is_some_and(|s| self.state.user_data.typing_changed(room_id, s.typing));
        if !maybe_changed {
            return Ok(None);
        }
        let slice = self.room_slice(room_id, window_start, self.upto.stream, Reader::Joined)?;
        let ephemeral = self.ephemeral(room_id, changes)?;
        let account_data = self.account_data(Some(room_id), changes)?;
        let worth_sending = newly_joined
            || self.full_state
            || slice.has_events
            || slice.timeline["limited"] == true
            || !slice.state.is_empty()
            || !ephemeral.is_empty()
            || !account_data.is_empty();
        if !worth_sending {
            return Ok(None);
        }
        let mut body = json!({
            "timeline": slice.timeline,
            "state": { "events": slice.state },
            "ephemeral": { "events": ephemeral },
            "account_data": { "events": account_data },
        });
        if !self.counts {
            return Ok(Some(body));
        }
        let counts = self.unread_counts(room_id)?;
        let by_thread = self
            .filter
            .room
            .as_ref()
            .and_then(|f| f.timeline.as_ref())
            .is_some_and(|f| f.unread_thread_notifications);
        let (notifications, highlights) = if by_thread {
            counts.main
        } else {
            counts.total()
        };
        body["unread_notifications"] = json!({
            "notification_count": notifications,
            "highlight_count": highlights,
        });
        if by_thread {
            let threads: Map<String, Value> = counts
                .threads
                .iter()
                .filter(|(_, (n, h))| *n > 0 || *h > 0)
                .map(|(root, (n, h))| {
                    let count = json!({ "notification_count": n, "highlight_count": h });
                    (root.clone(), count)
                })
                .collect();
            if !threads.is_empty() {
                body["unread_thread_notifications"] = Value::Object(threads);
            }
        }
        if newly_joined || self.full_state || slice.members_changed {
            body["summary"] = self.summary(room_id)?;
        }
        Ok(Some(body))
    }

    /// A room the user left (or was kicked or banned from) in the window,
    /// or any they left, for an initial sync that asks with `include_leave`.
    fn left_room(&self, room_id: &RoomId, now: &UserRoom) -> ApiResult<Option<Value>> {
        if self.since.is_none() {
            let include_leave = self.filter.room.as_ref().is_some_and(|f| f.include_leave);
            if !include_leave {
                return Ok(None);
            }
        } else if !self.changed_in_window(now) {
            return Ok(None);
        }
        let state_group = self
            .state
            .rooms
            .pdu(&now.event_id)?
            .map_or(0, |(_, stored)| stored.state_group);
        let reader = Reader::Former { state_group };
        let window_start = self.since.map(|s| s.stream);
        let slice = self.room_slice(room_id, window_start, now.stream, reader)?;
        let changes = Changes::default();
        let account_data = if self.since.is_none() {
            self.account_data(Some(room_id), &changes)?
        } else {
            Vec::new()
        };
        Ok(Some(json!({
            "timeline": slice.timeline,
            "state": { "events": slice.state },
            "account_data": { "events": account_data },
        })))
    }

    /// The timeline after `since` up to `end`, and the state the client
    /// needs to read it: all of it at the timeline's start for a room new
    /// to the device, else what changed in a gap the timeline skipped.
    fn room_slice(
        &self,
        room_id: &RoomId,
        since: Option<u64>,
        end: u64,
        reader: Reader,
    ) -> ApiResult<RoomSlice> {
        let room_filter = self.filter.room.as_ref();
        let timeline_filter = room_filter.and_then(|f| f.timeline.clone());
        let limit = timeline_filter
            .as_ref()
            .and_then(|f| f.limit)
            .unwrap_or(DEFAULT_TIMELINE_LIMIT)
            .min(MAX_TIMELINE_LIMIT);
        let Window {
            events,
            limited,
            prev_batch,
        } = self.state.rooms.visible_window(
            room_id,
            &self.user,
            reader,
            (since, end),
            limit,
            |pdu| timeline_filter.as_ref().is_none_or(|f| f.matches(pdu)),
        )?;
        let state_ids = self.state_section(room_id, since, limited, prev_batch, &events)?;
        let members_changed = events
            .iter()
            .any(|(pdu, _)| pdu.kind.to_string() == "m.room.member")
            || !state_ids.is_empty() && since.is_some();
        let state = self.render_state(state_ids)?;
        let timeline_events = events
            .iter()
            .map(|(pdu, stored)| self.render(pdu, stored))
            .collect::<ApiResult<Vec<_>>>()?;
        Ok(RoomSlice {
            timeline: json!({
                "events": timeline_events,
                "limited": limited,
                "prev_batch": format!("t{prev_batch}"),
            }),
            state,
            has_events: !timeline_events.is_empty(),
            members_changed,
        })
    }

    /// The state events to send beside a timeline that starts after
    /// `start` (the last position before it), as event IDs.
    fn state_section(
        &self,
        room_id: &RoomId,
        since: Option<u64>,
        limited: bool,
        start: u64,
        timeline: &[(Pdu, StoredPdu)],
    ) -> ApiResult<Vec<String>> {
        let room_filter = self.filter.room.as_ref();
        let state_filter = room_filter
            .and_then(|f| f.state.clone())
            .unwrap_or_default();
        let lazy = state_filter.lazy_load_members;
        let full = since.is_none() || self.full_state;
        if !full && !limited && !lazy {
            return Ok(Vec::new());
        }
        let rooms = &self.state.rooms;
        let at_start = rooms.state_ids_at_group(rooms.state_group_at(room_id, start)?)?;
        let known: StateIds = match since {
            Some(since) if !full && limited => {
                rooms.state_ids_at_group(rooms.state_group_at(room_id, since)?)?
            }
            _ if full => StateIds::new(),
            // Not limited: the timeline holds every change since the token.
            _ => at_start.clone(),
        };
        let mut senders: BTreeSet<&str> = timeline.iter().map(|(p, _)| p.sender.as_str()).collect();
        if full {
            senders.insert(self.user.as_str());
        }
        let in_timeline: BTreeSet<String> = timeline
            .iter()
            .map(|(p, _)| p.event_id.to_string())
            .collect();
        Ok(at_start
            .into_iter()
            .filter(|((kind, state_key), event_id)| {
                let is_member = kind == "m.room.member";
                let changed = known.get(&(kind.clone(), state_key.clone())) != Some(event_id);
                let needed = if is_member && lazy {
                    senders.contains(state_key.as_str()) && (changed || !full)
                } else {
                    changed
                };
                needed
                    && !in_timeline.contains(event_id)
                    && state_filter.allows(room_id.as_str(), kind, "")
            })
            .map(|(_, event_id)| event_id)
            .collect())
    }

    fn render_state(&self, event_ids: Vec<String>) -> ApiResult<Vec<Value>> {
        let state_filter = self
            .filter
            .room
            .as_ref()
            .and_then(|f| f.state.clone())
            .unwrap_or_default();
        let mut events = Vec::with_capacity(event_ids.len());
        for event_id in event_ids {
            if let Some((pdu, stored)) = self.state.rooms.pdu(&event_id)? {
                if state_filter.matches(&pdu) {
                    events.push(self.render(&pdu, &stored)?);
                }
            }
        }
        Ok(events)
    }

    /// An event in the format and with the fields the filter asks for.
    fn render(&self, pdu: &Pdu, stored: &StoredPdu) -> ApiResult<Value> {
        let event = match self.filter.event_format {
            Some(EventFormat::Federation) => {
                serde_json::from_str(&self.state.rooms.federation_text(pdu)?)
                    .map_err(|e| crate::services::error::Error::Internal(e.to_string()))?
            }
            _ => render_event(self.state, pdu, Some(stored), self.authed)?,
        };
        Ok(match &self.filter.event_fields {
            Some(fields) => project_fields(&event, fields),
            None => event,
        })
    }

    /// Typing notices and receipts new to the device.
    fn ephemeral(&self, room_id: &RoomId, changes: &Changes) -> ApiResult<Vec<Value>> {
        let filter = self
            .filter
            .room
            .as_ref()
            .and_then(|f| f.ephemeral.clone())
            .unwrap_or_default();
        let room = room_id.as_str();
        let mut events = Vec::new();
        let typing_new = match self.since {
            None => true,
            Some(since) => self.state.user_data.typing_changed(room_id, since.typing),
        };
        if typing_new && filter.allows(room, "m.typing", "") {
            let users = self.state.user_data.typing(room_id);
            if self.since.is_some() || !users.is_empty() {
                events.push(json!({ "type": "m.typing", "content": { "user_ids": users } }));
            }
        }
        let receipts_new = self.since.is_none() || changes.room_has_receipts(room);
        if receipts_new && filter.allows(room, "m.receipt", "") {
            if let Some(receipt) = self.receipts(room_id)? {
                events.push(receipt);
            }
        }
        Ok(events)
    }

    fn receipts(&self, room_id: &RoomId) -> ApiResult<Option<Value>> {
        let after = self.since.map_or(0, |s| s.stream);
        receipts_event(self.state, &self.user, room_id, after, self.upto.stream)
    }

    /// Account data written in the window (all of it for an initial sync),
    /// global when `room_id` is `None`.
    fn account_data(&self, room_id: Option<&RoomId>, changes: &Changes) -> ApiResult<Vec<Value>> {
        let scope = room_id.map(|r| r.as_str()).unwrap_or("");
        if self.since.is_some() && !changes.account_data_changed(scope) {
            return Ok(Vec::new());
        }
        let after = self.since.map_or(0, |s| s.stream);
        let entries = self.state.user_data.account_data_in(&self.user, room_id)?;
        entries
            .into_iter()
            .filter(|(_, value)| value.stream > after && value.stream <= self.upto.stream)
            .filter(|(kind, _)| match room_id {
                None => self
                    .filter
                    .account_data
                    .as_ref()
                    .is_none_or(|f| f.allows(kind, self.user.as_str())),
                Some(room) => self
                    .filter
                    .room
                    .as_ref()
                    .and_then(|f| f.account_data.as_ref())
                    .is_none_or(|f| f.allows(room.as_str(), kind, self.user.as_str())),
            })
            .map(|(kind, value)| {
                let content = if kind == PUSH_RULES {
                    // Merged with the server defaults of this version.
                    self.state
                        .push_rules
                        .content(&self.state.user_data, &self.user)?
                } else {
                    value.content
                };
                Ok(json!({ "type": kind, "content": content }))
            })
            .collect::<ApiResult<Vec<Value>>>()
            .and_then(|mut events| {
                // An initial sync always has the rules, set or not.
                let wanted = room_id.is_none()
                    && self.since.is_none()
                    && self
                        .filter
                        .account_data
                        .as_ref()
                        .is_none_or(|f| f.allows(PUSH_RULES, self.user.as_str()));
                if wanted && !events.iter().any(|e| e["type"] == PUSH_RULES) {
                    let content = self
                        .state
                        .push_rules
                        .content(&self.state.user_data, &self.user)?;
                    events.push(json!({ "type": PUSH_RULES, "content": content }));
                }
                Ok(events)
            })
    }

    /// Presence of the user and of everyone who shares a room with them.
    fn presence(
        &self,
        changes: &Changes,
        joined_rooms: &BTreeSet<OwnedRoomId>,
    ) -> ApiResult<Vec<Value>> {
        let after = self.since.map_or(0, |s| s.stream);
        let candidates: Vec<String> = match &changes.presence_users {
            Some(users) if self.since.is_some() => users.iter().cloned().collect(),
            _ => self.state.user_data.presence_users()?,
        };
        let now = self.state.now_ms();
        // Many changes (everyone connecting at once): the members of the
        // user's few rooms, read once, answer who shares a room.
        let sharing = if candidates.len() > PRESENCE_MEMBER_LISTS_FROM
            && joined_rooms.len() <= SHARED_ROOM_POINT_READS
        {
            let mut members = HashSet::new();
            for room_id in joined_rooms {
                members.extend(joined_members(self.state, room_id)?);
            }
            Some(members)
        } else {
            None
        };
        let mut events = Vec::new();
        for user_id in candidates {
            let Ok(user) = ruma::UserId::parse(&user_id) else {
                continue;
            };
            let allowed = self
                .filter
                .presence
                .as_ref()
                .is_none_or(|f| f.allows("m.presence", user.as_str()));
            let shares = match &sharing {
                Some(members) => user == self.user || members.contains(user.as_str()),
                None => self.shares_room(&user, joined_rooms)?,
            };
            if !allowed || !shares {
                continue;
            }
            let Some(record) = self.state.user_data.presence(&user)? else {
                continue;
            };
            if record.stream > after && record.stream <= self.upto.stream {
                events.push(json!({
                    "type": "m.presence",
                    "sender": user_id,
                    "content": presence_content(&record, now),
                }));
            }
        }
        Ok(events)
    }

    fn shares_room(
        &self,
        other: &ruma::UserId,
        joined_rooms: &BTreeSet<OwnedRoomId>,
    ) -> ApiResult<bool> {
        shares_room(self.state, &self.user, other, joined_rooms)
    }

    fn unread_counts(&self, room_id: &RoomId) -> ApiResult<UnreadCounts> {
        Ok(unread_counts(
            self.state,
            &self.user,
            room_id,
            self.upto.stream,
        )?)
    }

    fn summary(&self, room_id: &RoomId) -> ApiResult<Value> {
        let members = room_members(self.state, &self.user, room_id)?;
        let mut summary = json!({
            "m.joined_member_count": members.joined,
            "m.invited_member_count": members.invited,
        });
        if !room_is_named(self.state, room_id)? {
            summary["m.heroes"] = json!(members.heroes);
        }
        Ok(summary)
    }

    fn stripped_state(&self, member_event_id: &str) -> ApiResult<Vec<Value>> {
        stripped_state(self.state, member_event_id)
    }
}

/// Rooms of the syncing user up to which `shares_room` reads the other
/// user's membership in each (point reads); above, it reads the list of
/// the other user's rooms (one scan) instead.
const SHARED_ROOM_POINT_READS: usize = 16;

/// Presence changes in one window above which a sync reads the member
/// lists of the user's rooms (when they are few) instead of each changed
/// user's memberships.
const PRESENCE_MEMBER_LISTS_FROM: usize = 64;

/// Whether `other` is the user or is joined to one of `joined_rooms`.
fn shares_room(
    state: &AppState,
    user: &OwnedUserId,
    other: &ruma::UserId,
    joined_rooms: &BTreeSet<OwnedRoomId>,
) -> ApiResult<bool> {
    if other == user {
        return Ok(true);
    }
    if joined_rooms.len() <= SHARED_ROOM_POINT_READS {
        for room_id in joined_rooms {
            if state.rooms.membership(room_id, other)? == "join" {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    let theirs = state.rooms.rooms_of_user(other, "join")?;
    Ok(theirs.iter().any(|room| joined_rooms.contains(room)))
}

/// `device_lists` for a window of the stream: `changed` names the users
/// (the syncing one included) whose devices changed, and those who came
/// to share a room with the user, whose devices the client must fetch;
/// `left` names those who no longer share any room with the user.
pub fn device_lists(
    state: &AppState,
    user: &OwnedUserId,
    changes: &Changes,
    joined_rooms: &BTreeSet<OwnedRoomId>,
) -> ApiResult<(Vec<String>, Vec<String>)> {
    let mut changed = BTreeSet::new();
    let mut maybe_left = BTreeSet::new();
    match &changes.device_list_users {
        Some(users) => changed.extend(users.iter().cloned()),
        // A window too long to list: everyone who shares a room may have
        // changed.
        None => {
            for room_id in joined_rooms {
                changed.extend(joined_members(state, room_id)?);
            }
        }
    }
    for (room, target) in changes.members.iter().flatten() {
        let Ok(room_id) = RoomId::parse(room) else {
            continue;
        };
        if target == user.as_str() {
            let members = joined_members(state, &room_id)?;
            if joined_rooms.contains(&room_id) {
                changed.extend(members);
            } else {
                maybe_left.extend(members);
            }
        } else if joined_rooms.contains(&room_id) {
            let Ok(target_id) = ruma::UserId::parse(target) else {
                continue;
            };
            if state.rooms.membership(&room_id, &target_id)? == "join" {
                changed.insert(target.clone());
            } else {
                maybe_left.insert(target.clone());
            }
        }
    }
    let mut kept = Vec::new();
    for other in changed {
        let Ok(other_id) = ruma::UserId::parse(&other) else {
            continue;
        };
        if shares_room(state, user, &other_id, joined_rooms)? {
            kept.push(other);
        }
    }
    let mut left = Vec::new();
    for other in maybe_left {
        let Ok(other_id) = ruma::UserId::parse(&other) else {
            continue;
        };
        if !kept.contains(&other) && !shares_room(state, user, &other_id, joined_rooms)? {
            left.push(other);
        }
    }
    Ok((kept, left))
}

/// The users whose membership in the room is `join`.
fn joined_members(state: &AppState, room_id: &RoomId) -> ApiResult<Vec<String>> {
    Ok(state
        .rooms
        .current_state(room_id, Some("m.room.member"))?
        .into_iter()
        .filter(|pdu| pdu.content_value()["membership"] == "join")
        .filter_map(|pdu| pdu.state_key.clone())
        .collect())
}

/// The room's receipts written after `after` up to `upto`, as one
/// `m.receipt` event; others' private receipts are left out.
pub fn receipts_event(
    state: &AppState,
    user: &OwnedUserId,
    room_id: &RoomId,
    after: u64,
    upto: u64,
) -> ApiResult<Option<Value>> {
    let mut content = json!({});
    let mut any = false;
    for (kind, reader, thread, receipt) in state.user_data.room_receipts(room_id)? {
        let in_window = receipt.stream > after && receipt.stream <= upto;
        let private = kind == "m.read.private" && reader != user.as_str();
        if !in_window || private || kind == "m.fully_read" {
            continue;
        }
        let mut entry = json!({ "ts": receipt.ts });
        if !thread.is_empty() {
            entry["thread_id"] = json!(thread);
        }
        content[&receipt.event_id][&kind][&reader] = entry;
        any = true;
    }
    Ok(any.then(|| json!({ "type": "m.receipt", "content": content })))
}

/// A room's joined and invited counts, and up to five other members (by
/// user ID) to name it by.
pub struct Members {
    pub joined: u64,
    pub invited: u64,
    pub heroes: Vec<String>,
}

pub fn room_members(state: &AppState, user: &OwnedUserId, room_id: &RoomId) -> ApiResult<Members> {
    let mut members = Members {
        joined: 0,
        invited: 0,
        heroes: Vec::new(),
    };
    for member in state.rooms.current_state(room_id, Some("m.room.member"))? {
        let Some(member_id) = member.state_key.as_deref() else {
            continue;
        };
        match member.content_value()["membership"].as_str() {
            Some("join") => members.joined += 1,
            Some("invite") => members.invited += 1,
            _ => continue,
        }
        if member_id != user.as_str() {
            members.heroes.push(member_id.to_owned());
        }
    }
    members.heroes.sort();
    members.heroes.truncate(MAX_HEROES);
    Ok(members)
}

/// Whether the room has a name or a canonical alias (else clients name it
/// after its heroes).
pub fn room_is_named(state: &AppState, room_id: &RoomId) -> ApiResult<bool> {
    let rooms = &state.rooms;
    Ok(rooms.state_event(room_id, "m.room.name", "")?.is_some()
        || rooms
            .state_event(room_id, "m.room.canonical_alias", "")?
            .is_some_and(|pdu| pdu.content_value()["alias"].is_string()))
}

/// What an invited or knocking user sees of a room: a few state events as
/// they were at the membership, stripped to type, key, sender and content,
/// and the membership event itself.
pub fn stripped_state(state: &AppState, member_event_id: &str) -> ApiResult<Vec<Value>> {
    Ok(state.rooms.stripped_state(member_event_id)?)
}

/// Keeps only the listed fields of an event. A field is a dotted path;
/// `\.` stands for a dot inside a key and `\\` for a backslash.
fn project_fields(event: &Value, fields: &[String]) -> Value {
    let mut out = json!({});
    for field in fields {
        let path = split_field(field);
        let mut source = event;
        let mut found = true;
        for key in &path {
            match source.get(key) {
                Some(next) => source = next,
                None => {
                    found = false;
                    break;
                }
            }
        }
        if !found || path.is_empty() {
            continue;
        }
        let mut target = &mut out;
        for key in &path[..path.len() - 1] {
            if !target.get(key).is_some_and(Value::is_object) {
                target[key] = json!({});
            }
            target = &mut target[key];
        }
        target[&path[path.len() - 1]] = source.clone();
    }
    out
}

fn split_field(field: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(escaped) = chars.next() {
                    parts.last_mut().expect("never empty").push(escaped);
                }
            }
            '.' => parts.push(String::new()),
            other => parts.last_mut().expect("never empty").push(other),
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let token = SyncToken {
            stream: 42,
            typing: 7,
        };
        assert_eq!(SyncToken::parse(&token.render()).unwrap(), token);
        for bad in ["", "s", "s1", "t1_2", "s1_x", "sx_1", "s-1_2"] {
            assert!(SyncToken::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn event_fields_keep_only_the_listed_paths() {
        let event = json!({
            "type": "m.room.message",
            "content": { "body": "hi", "msgtype": "m.text", "m.key": 1 },
            "sender": "@a:x",
        });
        let fields = ["type", "content.body", "content.m\\.key", "missing.path"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(
            project_fields(&event, &fields),
            json!({ "type": "m.room.message", "content": { "body": "hi", "m.key": 1 } })
        );
    }
}
