//! A draft: events appended to one room in memory, committed as one batch.
//!
//! Every event the server creates goes through [`Draft::append`]: it picks
//! the auth and prev events, builds and signs the PDU, checks it against the
//! authorization rules and the state before it, and records what it changes
//! (timeline, stream, state, memberships). Nothing reaches the database until
//! the caller commits the draft's batch, so a request that fails half-way
//! (say, the third event of a `createRoom`) writes nothing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use ruma::events::StateEventType;
use ruma::room_version_rules::RoomVersionRules;
use ruma::{EventId, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, UserId};
use serde_json::Value;

use super::power::PowerView;
use super::Rooms;
use crate::events::{self, BuildContext, EventError, NewEvent, Pdu};
use crate::services::error::{Error, Result};
use crate::services::stream::Reservation;
use crate::storage::tables::{
    self, Relation, RoomRecord, StateGroup, StoredPdu, StreamEntry, ThreadRecord, UserRoom,
};
use crate::storage::{Batch, StorageError};
use myelin_federation::pdu::{MAX_ID_BYTES, MAX_PDU_BYTES};

/// Deltas after which a state group is stored as a full snapshot again.
const MAX_STATE_CHAIN: u32 = 32;

/// The spec's size limits on an event's type and state key.
fn check_limits(new: &NewEvent) -> Result<()> {
    if new.kind.is_empty() || new.kind.len() > MAX_ID_BYTES {
        return Err(Error::BadJson(format!(
            "the event type must be 1 to {MAX_ID_BYTES} bytes"
        )));
    }
    if new
        .state_key
        .as_ref()
        .is_some_and(|key| key.len() > MAX_ID_BYTES)
    {
        return Err(Error::BadJson(format!(
            "the state key may be at most {MAX_ID_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Who sends an event, and the transaction that asked for it.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub device_id: Option<String>,
    /// (transaction key, transaction ID) of an idempotent send.
    pub txn: Option<(String, String)>,
}

pub struct Draft<'a> {
    rooms: &'a Rooms,
    pub room_id: Option<OwnedRoomId>,
    pub record: RoomRecord,
    pub version: RoomVersionId,
    pub rules: RoomVersionRules,
    /// Current-state changes made by this draft: (type, state key) → ID.
    state: HashMap<(String, String), String>,
    pdus: HashMap<OwnedEventId, Arc<Pdu>>,
    state_chain_length: u32,
    pub batch: Batch,
    pub appended: Vec<Arc<Pdu>>,
    /// The stream positions of this draft's events, held until the caller
    /// has committed the batch (see `services::stream`).
    reservations: Vec<Reservation>,
}

impl<'a> Draft<'a> {
    /// A draft for a room that does not exist yet; its first event must be
    /// its `m.room.create`.
    pub fn new_room(rooms: &'a Rooms, version: RoomVersionId, now: u64) -> Result<Self> {
        let rules = events::room_version_rules(&version)
            .ok_or_else(|| Error::UnsupportedRoomVersion(version.to_string()))?;
        let room_id = if rules.authorization.room_create_event_id_as_room_id {
            None
        } else {
            Some(RoomId::new_v1(
                rooms
                    .server_name
                    .as_str()
                    .try_into()
                    .map_err(|e: ruma::IdParseError| Error::Internal(e.to_string()))?,
            ))
        };
        let record = RoomRecord {
            version: version.to_string(),
            created_ts: now,
            forward_extremities: Vec::new(),
            depth: 0,
            state_group: 0,
            joined_members: 0,
            invited_members: 0,
        };
        Ok(Draft::with(rooms, room_id, record, version, rules))
    }

    /// A draft that appends to an existing room.
    pub fn existing(rooms: &'a Rooms, room_id: &RoomId, record: RoomRecord) -> Result<Self> {
        let version = RoomVersionId::try_from(record.version.as_str())
            .map_err(|e| Error::Internal(e.to_string()))?;
        let rules = events::room_version_rules(&version)
            .ok_or_else(|| Error::UnsupportedRoomVersion(version.to_string()))?;
        Ok(Draft::with(
            rooms,
            Some(room_id.to_owned()),
            record,
            version,
            rules,
        ))
    }

    fn with(
        rooms: &'a Rooms,
        room_id: Option<OwnedRoomId>,
        record: RoomRecord,
        version: RoomVersionId,
        rules: RoomVersionRules,
    ) -> Self {
        Draft {
            rooms,
            room_id,
            record,
            version,
            rules,
            state: HashMap::new(),
            pdus: HashMap::new(),
            state_chain_length: u32::MAX,
            batch: Batch::new(),
            appended: Vec::new(),
            reservations: Vec::new(),
        }
    }

    /// The event ID of a current state entry, seeing this draft's changes.
    pub fn state_id(&self, kind: &str, state_key: &str) -> Result<Option<String>> {
        if let Some(id) = self.state.get(&(kind.to_owned(), state_key.to_owned())) {
            return Ok(Some(id.clone()));
        }
        let Some(room_id) = &self.room_id else {
            return Ok(None);
        };
        let key = (room_id.to_string(), kind.to_owned(), state_key.to_owned());
        Ok(self.rooms.storage.get(tables::ROOM_STATE, &key)?)
    }

    /// A current state event, seeing this draft's changes.
    pub fn state_event(&self, kind: &str, state_key: &str) -> Result<Option<Arc<Pdu>>> {
        match self.state_id(kind, state_key)? {
            Some(id) => self.fetch(&id),
            None => Ok(None),
        }
    }

    /// An event of this draft or of the database.
    pub fn fetch(&self, event_id: &str) -> Result<Option<Arc<Pdu>>> {
        if let Ok(id) = EventId::parse(event_id) {
            if let Some(pdu) = self.pdus.get(&id) {
                return Ok(Some(pdu.clone()));
            }
        }
        Ok(self.rooms.pdu(event_id)?.map(|(pdu, _)| Arc::new(pdu)))
    }

    /// The membership of `user_id` in the current state ("leave" if none).
    pub fn membership(&self, user_id: &str) -> Result<String> {
        Ok(match self.state_event("m.room.member", user_id)? {
            Some(pdu) => membership_of(&pdu.content_value()),
            None => "leave".to_owned(),
        })
    }

    /// Refuses a join or invite that would take the room past its cap of
    /// joined plus invited members. Every membership change passes here,
    /// whichever endpoint (or createRoom's initial state) it came from.
    fn check_member_cap(&self, new: &NewEvent) -> Result<()> {
        let after = membership_of(&new.content);
        if after != "join" && after != "invite" {
            return Ok(());
        }
        let Some(target) = &new.state_key else {
            return Ok(());
        };
        let before = self.membership(target)?;
        if before == "join" || before == "invite" {
            return Ok(());
        }
        if self.record.joined_members + self.record.invited_members >= self.rooms.max_members {
            return Err(super::room_full(self.rooms.max_members));
        }
        Ok(())
    }

    /// A thread reply must answer an event of this room that is not itself
    /// part of a relation (the spec's rule for thread roots).
    fn check_thread(&self, new: &NewEvent) -> Result<()> {
        let relates_to = &new.content["m.relates_to"];
        if relates_to["rel_type"] != "m.thread" {
            return Ok(());
        }
        let Some(root_id) = relates_to["event_id"].as_str() else {
            return Err(Error::BadJson(
                "a thread reply needs m.relates_to.event_id".to_owned(),
            ));
        };
        let root = self.fetch(root_id)?;
        let in_room = root
            .as_ref()
            .is_some_and(|root| self.room_id.as_deref() == Some(&*root.room_id));
        if !in_room {
            return Err(Error::InvalidParam(format!(
                "{root_id} is not an event of this room"
            )));
        }
        let root = root.expect("checked above");
        if root.content_value()["m.relates_to"]["rel_type"].is_string() {
            return Err(Error::InvalidParam(
                "a thread cannot start from an event that is part of a relation".to_owned(),
            ));
        }
        Ok(())
    }

    /// Takes a redacted event out of the relation it was part of: out of
    /// its parent's relations and, for a thread reply, out of the thread.
    pub fn forget_relation(&mut self, event: &Pdu, stream: u64) -> Result<()> {
        let content = event.content_value();
        let (Some(rel_type), Some(parent)) = (
            content["m.relates_to"]["rel_type"].as_str(),
            content["m.relates_to"]["event_id"].as_str(),
        ) else {
            return Ok(());
        };
        self.batch
            .delete(tables::RELATIONS, &(parent.to_owned(), stream));
        if rel_type != "m.thread" {
            return Ok(());
        }
        let room_id = event.room_id.to_string();
        let key = (room_id.clone(), parent.to_owned());
        let Some(mut thread) = self.rooms.storage.get(tables::THREADS, &key)? else {
            return Ok(());
        };
        self.batch.delete(
            tables::THREAD_ACTIVITY,
            &(room_id.clone(), thread.latest_stream),
        );
        let replies: Vec<(u64, String)> = self
            .rooms
            .storage
            .scan_prefix(tables::RELATIONS, &tables::str_prefix(parent), 100_000)?
            .into_iter()
            .filter(|((_, s), relation)| *s != stream && relation.rel_type == "m.thread")
            .map(|((_, s), relation)| (s, relation.event_id))
            .collect();
        match replies.last() {
            Some((latest_stream, latest_id)) => {
                thread.count = replies.len() as u64;
                thread.latest_stream = *latest_stream;
                thread.latest_event_id = latest_id.clone();
                self.batch.put(tables::THREADS, &key, &thread);
                self.batch.put(
                    tables::THREAD_ACTIVITY,
                    &(room_id, *latest_stream),
                    &parent.to_owned(),
                );
            }
            None => self.batch.delete(tables::THREADS, &key),
        }
        Ok(())
    }

    /// The power levels and creators in the current state.
    pub fn power_view(&self) -> Result<PowerView> {
        let levels = self
            .state_event("m.room.power_levels", "")?
            .map(|pdu| pdu.content_value());
        let create = self
            .state_event("m.room.create", "")?
            .map(|pdu| (pdu.sender.to_string(), pdu.content_value()));
        let privileged = self.rules.authorization.explicitly_privilege_room_creators;
        Ok(PowerView::new(levels, create, privileged))
    }

    /// Builds, checks and records one event.
    pub fn append(&mut self, sender: &UserId, new: NewEvent, origin: Origin) -> Result<Arc<Pdu>> {
        check_limits(&new)?;
        if new.kind == "m.room.member" {
            self.check_member_cap(&new)?;
        }
        self.check_thread(&new)?;
        let auth_types =
            events::auth_types(&new, sender, &self.rules.authorization).map_err(Error::BadJson)?;
        let mut auth_events = Vec::new();
        for (kind, state_key) in auth_types {
            if let Some(id) = self.state_id(&kind.to_string(), &state_key)? {
                auth_events.push(parse_event_id(&id)?);
            }
        }
        let prev_events = self
            .record
            .forward_extremities
            .iter()
            .map(|id| parse_event_id(id))
            .collect::<Result<Vec<_>>>()?;
        // A room whose ID is its create event's hash: the create event
        // takes a timestamp no other create event here has.
        let now = if self.room_id.is_none() {
            self.rooms.create_timestamp()
        } else {
            self.rooms.clock.now_ms()
        };
        let ctx = BuildContext {
            room_id: self.room_id.as_deref(),
            version: &self.version,
            rules: &self.rules,
            sender,
            prev_events: &prev_events,
            auth_events: &auth_events,
            depth: self.record.depth + 1,
            origin_server_ts: now,
            server_name: &self.rooms.server_name,
            key: &self.rooms.key,
        };
        let pdu = Pdu::build(&new, &ctx).map_err(|e| match e {
            EventError::TooLarge => Error::TooLarge(e.to_string()),
            EventError::Invalid(message) => Error::BadJson(message),
        })?;
        if pdu.json_text().len() > MAX_PDU_BYTES {
            return Err(Error::TooLarge(format!(
                "the signed event is larger than {MAX_PDU_BYTES} bytes"
            )));
        }
        self.check_auth(&pdu)?;
        if self.room_id.is_none() {
            self.room_id = Some(pdu.room_id.clone());
        }
        let pdu = Arc::new(pdu);
        self.record(pdu.clone(), origin)?;
        Ok(pdu)
    }

    fn check_auth(&self, pdu: &Pdu) -> Result<()> {
        // The closures cannot fail, so a storage error is kept aside and
        // reported instead of the (then meaningless) auth result.
        let failure: RefCell<Option<StorageError>> = RefCell::new(None);
        let keep = |result: Result<Option<Arc<Pdu>>>| match result {
            Ok(found) => found,
            Err(Error::Storage(error)) => {
                failure.borrow_mut().get_or_insert(error);
                None
            }
            Err(_) => None,
        };
        let outcome = events::check_auth(
            pdu,
            &self.rules.authorization,
            |kind: &StateEventType, state_key: &str| {
                keep(self.state_event(&kind.to_string(), state_key))
            },
            |event_id: &EventId| keep(self.fetch(event_id.as_str())),
        );
        if let Some(error) = failure.into_inner() {
            return Err(error.into());
        }
        outcome.map_err(Error::Forbidden)
    }

    /// Adds the event's writes to the batch and its state to the overlay.
    fn record(&mut self, pdu: Arc<Pdu>, origin: Origin) -> Result<()> {
        let room_id = pdu.room_id.to_string();
        let event_id = pdu.event_id.to_string();
        let member = match pdu.kind.to_string().as_str() {
            "m.room.member" => pdu.state_key.clone(),
            _ => None,
        };
        let entry = StreamEntry::Event {
            room_id: room_id.clone(),
            event_id: event_id.clone(),
            member,
        };
        let (stream, mut reservation) = self.rooms.stream.next_into(&mut self.batch, &entry);
        if pdu.kind.to_string() == "m.room.member" {
            if let Some(target) = &pdu.state_key {
                reservation.also_wake(target);
            }
        }
        self.reservations.push(reservation);
        let replaces_state = match &pdu.state_key {
            Some(state_key) => {
                let previous = self.state_id(&pdu.kind.to_string(), state_key)?;
                self.record_state(&room_id, &pdu, state_key)?;
                previous
            }
            None => None,
        };
        let stored = StoredPdu {
            replaces_state,
            room_id: room_id.clone(),
            json: pdu.json_text(),
            stream,
            state_group: self.record.state_group,
            txn_id: origin.txn.as_ref().map(|(_, txn)| txn.clone()),
            sender_device: origin.device_id.clone(),
            redacted_because: None,
        };
        self.batch.put(tables::PDUS, &event_id, &stored);
        self.batch
            .put(tables::TIMELINE, &(room_id.clone(), stream), &event_id);
        if let (Some(device_id), Some((txn_key, _))) = (&origin.device_id, &origin.txn) {
            let key = (pdu.sender.to_string(), device_id.clone(), txn_key.clone());
            self.batch.put(tables::TRANSACTIONS, &key, &event_id);
        }
        if pdu.kind.to_string() == "m.room.member" {
            if let Some(target) = &pdu.state_key {
                let membership = UserRoom {
                    membership: membership_of(&pdu.content_value()),
                    event_id: event_id.clone(),
                    stream,
                    forgotten: false,
                };
                self.batch.put(
                    tables::USER_ROOMS,
                    &(target.clone(), room_id.clone()),
                    &membership,
                );
            }
        }
        self.record_relation(&pdu, stream)?;
        self.record.forward_extremities = vec![event_id];
        self.record.depth = pdu.depth;
        self.batch.put(tables::ROOMS, &room_id, &self.record);
        self.pdus.insert(pdu.event_id.clone(), pdu.clone());
        self.appended.push(pdu);
        Ok(())
    }

    /// An event with `m.relates_to`: indexed under its parent, and a thread
    /// reply also updates its thread's summary and activity order.
    fn record_relation(&mut self, pdu: &Pdu, stream: u64) -> Result<()> {
        let content = pdu.content_value();
        let Some(relates_to) = content.get("m.relates_to") else {
            return Ok(());
        };
        let (Some(rel_type), Some(parent)) = (
            relates_to.get("rel_type").and_then(Value::as_str),
            relates_to.get("event_id").and_then(Value::as_str),
        ) else {
            return Ok(());
        };
        let relation = Relation {
            event_id: pdu.event_id.to_string(),
            rel_type: rel_type.to_owned(),
            event_type: pdu.kind.to_string(),
            sender: pdu.sender.to_string(),
        };
        self.batch
            .put(tables::RELATIONS, &(parent.to_owned(), stream), &relation);
        if rel_type != "m.thread" {
            return Ok(());
        }
        let room_id = pdu.room_id.to_string();
        let key = (room_id.clone(), parent.to_owned());
        let thread = match self.rooms.storage.get(tables::THREADS, &key)? {
            Some(mut thread) => {
                self.batch.delete(
                    tables::THREAD_ACTIVITY,
                    &(room_id.clone(), thread.latest_stream),
                );
                thread.count += 1;
                thread.latest_event_id = pdu.event_id.to_string();
                thread.latest_stream = stream;
                if !thread.participants.contains(&relation.sender) {
                    thread.participants.push(relation.sender);
                }
                thread
            }
            None => {
                let mut participants = vec![relation.sender];
                if let Some(root) = self.fetch(parent)? {
                    if !participants.contains(&root.sender.to_string()) {
                        participants.push(root.sender.to_string());
                    }
                }
                ThreadRecord {
                    latest_event_id: pdu.event_id.to_string(),
                    latest_stream: stream,
                    count: 1,
                    participants,
                }
            }
        };
        self.batch.put(tables::THREADS, &key, &thread);
        self.batch.put(
            tables::THREAD_ACTIVITY,
            &(room_id, stream),
            &parent.to_owned(),
        );
        Ok(())
    }

    /// A state event: a new state group, the current state, member counts.
    fn record_state(&mut self, room_id: &str, pdu: &Pdu, state_key: &str) -> Result<()> {
        let kind = pdu.kind.to_string();
        if kind == "m.room.member" {
            let before = self.membership(state_key)?;
            let after = membership_of(&pdu.content_value());
            self.count_membership(&before, -1);
            self.count_membership(&after, 1);
        }
        let entry = (kind.clone(), state_key.to_owned(), pdu.event_id.to_string());
        let group_id = self.rooms.next_state_group();
        let group = if self.record.state_group == 0 || self.chain_length()? >= MAX_STATE_CHAIN {
            let mut entries = self.full_state()?;
            entries.retain(|(k, s, _)| !(k == &kind && s == state_key));
            entries.push(entry.clone());
            StateGroup {
                prev: None,
                chain_length: 0,
                entries,
            }
        } else {
            StateGroup {
                prev: Some(self.record.state_group),
                chain_length: self.state_chain_length + 1,
                entries: vec![entry.clone()],
            }
        };
        self.state_chain_length = group.chain_length;
        self.batch.put(tables::STATE_GROUPS, &group_id, &group);
        self.record.state_group = group_id;
        let key = (room_id.to_owned(), kind.clone(), state_key.to_owned());
        self.batch.put(tables::ROOM_STATE, &key, &entry.2);
        self.state.insert((kind, state_key.to_owned()), entry.2);
        Ok(())
    }

    fn chain_length(&mut self) -> Result<u32> {
        if self.state_chain_length == u32::MAX {
            let group = self
                .rooms
                .storage
                .get(tables::STATE_GROUPS, &self.record.state_group)?;
            self.state_chain_length = group.map_or(MAX_STATE_CHAIN, |g| g.chain_length);
        }
        Ok(self.state_chain_length)
    }

    /// The whole current state, seeing this draft's changes.
    fn full_state(&self) -> Result<Vec<(String, String, String)>> {
        let mut state: HashMap<(String, String), String> = match &self.room_id {
            Some(room_id) => self
                .rooms
                .current_state_ids(room_id)?
                .into_iter()
                .map(|(k, s, id)| ((k, s), id))
                .collect(),
            None => HashMap::new(),
        };
        state.extend(self.state.clone());
        Ok(state.into_iter().map(|((k, s), id)| (k, s, id)).collect())
    }

    fn count_membership(&mut self, membership: &str, change: i64) {
        let counter = match membership {
            "join" => &mut self.record.joined_members,
            "invite" => &mut self.record.invited_members,
            _ => return,
        };
        *counter = counter.saturating_add_signed(change);
    }
}

/// The `membership` of a member event's content.
pub fn membership_of(content: &Value) -> String {
    content
        .get("membership")
        .and_then(Value::as_str)
        .unwrap_or("leave")
        .to_owned()
}

fn parse_event_id(id: &str) -> Result<OwnedEventId> {
    EventId::parse(id).map_err(|e| Error::Internal(format!("stored event ID {id}: {e}")))
}
