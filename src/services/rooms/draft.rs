//! A draft: events appended to one room in memory, committed as one batch.
//!
//! Every event the server creates goes through [`Draft::append`]: it picks
//! the auth and prev events, builds and signs the PDU, checks it against the
//! authorization rules and the state before it, and records what it changes
//! (timeline, stream, state, memberships). Nothing reaches the database until
//! the caller commits the draft's batch, so a request that fails half-way
//! (say, the third event of a `createRoom`) writes nothing.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ruma::events::StateEventType;
use ruma::room_version_rules::RoomVersionRules;
use ruma::{EventId, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, UserId};
use serde_json::Value;

use super::power::PowerView;
use super::{Rooms, StateIds};
use crate::events::{self, BuildContext, EventError, NewEvent, Pdu};
use crate::services::error::{Error, Result};
use crate::services::outbox::PendingWakeups;
use crate::services::stream::Reservation;
use crate::storage::tables::{
    self, OutboxItem, Relation, RoomRecord, StateGroup, StoredPdu, StreamEntry, ThreadRecord,
    UserRoom,
};
use crate::storage::{Batch, Storage, StorageError};
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
    /// The `origin_server_ts` an application service asked for (`ts`),
    /// for a message it bridges from elsewhere.
    pub ts: Option<u64>,
}

pub struct Draft<'a> {
    rooms: &'a Rooms,
    pub room_id: Option<OwnedRoomId>,
    pub record: RoomRecord,
    pub version: RoomVersionId,
    pub rules: RoomVersionRules,
    /// Current-state changes made by this draft: (type, state key) → ID,
    /// `None` for an entry that state resolution took out.
    state: HashMap<(String, String), Option<String>>,
    pdus: HashMap<OwnedEventId, Arc<Pdu>>,
    state_chain_length: u32,
    pub batch: Batch,
    pub appended: Vec<Arc<Pdu>>,
    /// The stream positions of this draft's events, held until the caller
    /// has committed the batch (see `services::stream`).
    reservations: Vec<Reservation>,
    /// Other servers this draft queued events for.
    pub wakeups: PendingWakeups,
    /// Application services this draft queued events for.
    appservice_wakeups: PendingWakeups,
    /// Rooms whose members this draft changed.
    interest_reset: crate::services::appservices::InterestReset,
    /// (service ID, event ID) pairs queued by this draft.
    appservice_queued: std::collections::HashSet<(String, String)>,
    /// (destination, event ID) pairs queued by this draft.
    queued_now: std::collections::HashSet<(String, String)>,
}

/// What became of an event another server sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// In the timeline and (a state event) the state.
    Timeline,
    /// Stored, but the room's current state does not allow it.
    SoftFailed,
    /// Known before.
    AlreadyKnown,
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
            remote_servers: Vec::new(),
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
            wakeups: PendingWakeups::new(rooms.outbox.clone()),
            appservice_wakeups: PendingWakeups::new(rooms.appservices.outbox.clone()),
            interest_reset: crate::services::appservices::InterestReset::new(
                rooms.appservices.clone(),
            ),
            appservice_queued: Default::default(),
            queued_now: Default::default(),
        }
    }

    /// The event ID of a current state entry, seeing this draft's changes.
    pub fn state_id(&self, kind: &str, state_key: &str) -> Result<Option<String>> {
        if let Some(id) = self.state.get(&(kind.to_owned(), state_key.to_owned())) {
            return Ok(id.clone());
        }
        let Some(room_id) = &self.room_id else {
            return Ok(None);
        };
        self.rooms.current_state_id(room_id, kind, state_key)
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
        self.rooms.pdu_shared(event_id)
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
    pub(super) fn check_member_cap(&self, new: &NewEvent) -> Result<()> {
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

    /// Whether another server's member event would take a room this
    /// server created past its member cap: such an event is soft-failed
    /// (kept in the graph, out of the state), as the cap is this server's
    /// rule, not the room version's.
    fn over_member_cap(&self, pdu: &Pdu) -> Result<bool> {
        if pdu.kind.to_string() != "m.room.member" {
            return Ok(false);
        }
        let created_here = self
            .state_event("m.room.create", "")?
            .is_some_and(|create| create.sender.server_name().as_str() == self.rooms.server_name);
        if !created_here {
            return Ok(false);
        }
        let new = NewEvent::state(
            "m.room.member",
            pdu.state_key.as_deref().unwrap_or_default(),
            pdu.content_value(),
        );
        match self.check_member_cap(&new) {
            Ok(()) => Ok(false),
            Err(Error::RoomFull(_)) => Ok(true),
            Err(other) => Err(other),
        }
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

    /// Marks `event_id` as used by `by` (an edit, a reaction, a reply, a
    /// redaction), so the archive mover leaves it hot for a while.
    pub fn touch(&mut self, event_id: &str, by: &Pdu) {
        let when = u64::from(by.origin_server_ts.get());
        self.batch.put(tables::TOUCHED, &event_id.to_owned(), &when);
    }

    /// Takes a redacted event out of the relation it was part of: out of
    /// its parent's relations and, for a thread reply, out of the thread.
    pub fn forget_relation(&mut self, event: &Pdu, stream: u64) -> Result<()> {
        forget_relations(&self.rooms.storage, &mut self.batch, &[(event, stream)])
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
        let pdu = self.build_at(sender, &new, origin.ts)?;
        self.append_built_with(Arc::new(pdu), origin)
    }

    /// Builds and checks one event without recording it.
    pub fn build(&mut self, sender: &UserId, new: &NewEvent) -> Result<Pdu> {
        self.build_at(sender, new, None)
    }

    /// Builds and checks one event, with `origin_server_ts` set to `ts`
    /// when given (rather than now).
    fn build_at(&mut self, sender: &UserId, new: &NewEvent, ts: Option<u64>) -> Result<Pdu> {
        check_limits(new)?;
        if new.kind == "m.room.member" {
            self.check_member_cap(new)?;
        }
        self.check_thread(new)?;
        let auth_types =
            events::auth_types(new, sender, &self.rules.authorization).map_err(Error::BadJson)?;
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
            ts.unwrap_or_else(|| self.rooms.clock.now_ms())
        };
        // An event that no other server will receive now is left unsigned:
        // it is signed if it ever leaves (`Pdu::signed_text`). An event is
        // queued for the servers joined before it and after it, and only a
        // membership of another server's user changes which those are.
        let about_remote_user = new.kind == "m.room.member"
            && new
                .state_key
                .as_deref()
                .is_some_and(|user| server_of(user) != Some(self.rooms.server_name.as_str()));
        let sign_now = !self.record.remote_servers.is_empty() || about_remote_user;
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
            key: sign_now.then_some(&*self.rooms.key),
        };
        let pdu = Pdu::build(new, &ctx).map_err(|e| match e {
            EventError::TooLarge => Error::TooLarge(e.to_string()),
            EventError::Invalid(message) => Error::BadJson(message),
        })?;
        if pdu.signed_len(&self.rooms.server_name, &self.rooms.key) > MAX_PDU_BYTES {
            return Err(Error::TooLarge(format!(
                "the signed event is larger than {MAX_PDU_BYTES} bytes"
            )));
        }
        self.check_auth(&pdu)?;
        Ok(pdu)
    }

    /// Records an event built by [`Draft::build`] (and perhaps signed by
    /// another server too) and queues it for the room's other servers.
    pub fn append_built(&mut self, pdu: Arc<Pdu>) -> Result<Arc<Pdu>> {
        self.append_built_with(pdu, Origin::default())
    }

    fn append_built_with(&mut self, pdu: Arc<Pdu>, origin: Origin) -> Result<Arc<Pdu>> {
        if self.room_id.is_none() {
            self.room_id = Some(pdu.room_id.clone());
        }
        // A member event goes to the servers in the room before it too: a
        // kicked user's server learns of the kick.
        let mut destinations = self.record.remote_servers.clone();
        self.record(pdu.clone(), origin)?;
        destinations.extend(self.record.remote_servers.iter().cloned());
        self.queue_out(&pdu, &destinations, None);
        Ok(pdu)
    }

    /// Checks `pdu` against the authorization rules with the current state
    /// (this draft's changes included) as the state before it.
    fn check_auth(&self, pdu: &Pdu) -> Result<()> {
        self.check_auth_with(pdu, |kind, state_key| self.state_event(kind, state_key))
    }

    /// Adds the event's writes to the batch and its state to the overlay,
    /// for an event that follows all of the room's forward extremities.
    pub(super) fn record(&mut self, pdu: Arc<Pdu>, origin: Origin) -> Result<()> {
        let room_id = pdu.room_id.to_string();
        let event_id = pdu.event_id.to_string();
        // Visible to this draft before its state is recorded: the state
        // bookkeeping reads the event through the draft.
        self.pdus.insert(pdu.event_id.clone(), pdu.clone());
        let replaces_state = match &pdu.state_key {
            Some(state_key) => {
                let previous = self.state_id(&pdu.kind.to_string(), state_key)?;
                self.record_state(&room_id, &pdu, state_key)?;
                previous
            }
            None => None,
        };
        let group = self.record.state_group;
        self.record_event(pdu.clone(), origin, replaces_state, group, false)?;
        self.record.forward_extremities = vec![event_id];
        self.record.depth = self.record.depth.max(pdu.depth);
        self.batch.put(tables::ROOMS, &room_id, &self.record);
        Ok(())
    }

    /// Writes one event: the PDU, and unless soft-failed its stream
    /// position, timeline entry, membership index and relation.
    pub(super) fn record_event(
        &mut self,
        pdu: Arc<Pdu>,
        origin: Origin,
        replaces_state: Option<String>,
        state_group: u64,
        soft_failed: bool,
    ) -> Result<()> {
        let room_id = pdu.room_id.to_string();
        let event_id = pdu.event_id.to_string();
        if server_of(pdu.sender.as_str()) != Some(self.rooms.server_name.as_str()) {
            // Another server's event may have been stored before, as an
            // outlier, in another form (redacted by its sender's server):
            // what readers remember of it must be read again.
            self.batch.mark_rewrite();
        }
        if soft_failed {
            let stored = StoredPdu {
                replaces_state,
                room_id,
                json: pdu.json_text(),
                stream: 0,
                state_group,
                txn_id: None,
                sender_device: None,
                redacted_because: None,
                outlier: false,
                soft_failed: true,
            };
            self.batch.put(tables::PDUS, &event_id, &stored);
            self.pdus.insert(pdu.event_id.clone(), pdu);
            return Ok(());
        }
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
        let stored = StoredPdu {
            replaces_state,
            room_id: room_id.clone(),
            json: pdu.json_text(),
            stream,
            state_group,
            txn_id: origin.txn.as_ref().map(|(_, txn)| txn.clone()),
            sender_device: origin.device_id.clone(),
            redacted_because: None,
            outlier: false,
            soft_failed: false,
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
        self.pdus.insert(pdu.event_id.clone(), pdu.clone());
        self.queue_for_appservices(&pdu)?;
        self.appended.push(pdu);
        Ok(())
    }

    /// Queues an event for every application service interested in it,
    /// in this draft's batch: through the room (its joined members,
    /// aliases or ID, as they are with this draft's changes), its sender,
    /// or the user a member event is about.
    fn queue_for_appservices(&mut self, pdu: &Pdu) -> Result<()> {
        let appservices = self.rooms.appservices.clone();
        if appservices.is_empty() {
            return Ok(());
        }
        let room_id = pdu.room_id.as_str();
        // Only the memberships of users a service could care about change
        // which services a room interests.
        let is_member = pdu.kind.to_string() == "m.room.member";
        let concerns = |user: &str| appservices.concerns_user(user);
        let members_changed = self
            .state
            .keys()
            .any(|(kind, user)| kind == "m.room.member" && concerns(user));
        let through_room = if members_changed {
            // Members this draft changed are not in the database yet.
            let members = self
                .member_state()?
                .into_iter()
                .map(|(_, user, event_id)| (user, event_id))
                .collect();
            self.rooms
                .appservice_interest_of(room_id, members, |id| self.fetch(id))?
        } else {
            self.rooms.appservice_interest(&pdu.room_id)?
        };
        if is_member && pdu.state_key.as_deref().is_some_and(concerns) {
            // The next event's interest is computed with this member.
            appservices.forget_room(room_id);
            self.interest_reset.rooms.insert(room_id.to_owned());
        }
        let member = if is_member {
            pdu.state_key.as_deref()
        } else {
            None
        };
        let sender = pdu.sender.as_str();
        let queued =
            appservices.queue_event_into(&mut self.batch, pdu.event_id.as_str(), |i, s| {
                crate::services::appservices::interested_in_event(
                    i,
                    s,
                    sender,
                    member,
                    &through_room,
                )
            });
        for id in queued {
            self.appservice_queued
                .insert((id.clone(), pdu.event_id.to_string()));
            self.appservice_wakeups.destinations.insert(id);
        }
        Ok(())
    }

    /// A new room gets `alias` in this draft's batch, after its events:
    /// they are queued for the services the alias interests too.
    pub fn queue_appended_through_alias(&mut self, alias: &str) {
        let appservices = self.rooms.appservices.clone();
        let through_alias: Vec<usize> = appservices
            .registrations
            .iter()
            .enumerate()
            .filter(|(_, service)| service.namespaces.has_alias(alias))
            .map(|(index, _)| index)
            .collect();
        if through_alias.is_empty() {
            return;
        }
        for pdu in self.appended.clone() {
            let event_id = pdu.event_id.to_string();
            let done = &self.appservice_queued;
            let queued = appservices.queue_event_into(&mut self.batch, &event_id, |i, s| {
                through_alias.contains(&i) && !done.contains(&(s.id.clone(), event_id.clone()))
            });
            for id in queued {
                self.appservice_queued
                    .insert((id.clone(), event_id.clone()));
                self.appservice_wakeups.destinations.insert(id);
            }
        }
    }

    /// An event with `m.relates_to`: indexed under its parent, and a thread
    /// reply also updates its thread's summary and activity order.
    fn record_relation(&mut self, pdu: &Pdu, stream: u64) -> Result<()> {
        let content = pdu.content_value();
        let Some(relates_to) = content.get("m.relates_to") else {
            return Ok(());
        };
        // Edited, reacted or replied to: the parent stays hot a while.
        for parent in [
            relates_to.get("event_id"),
            relates_to.pointer("/m.in_reply_to/event_id"),
        ]
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        {
            self.touch(parent, pdu);
        }
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
        self.state
            .insert((kind.clone(), state_key.to_owned()), Some(entry.2));
        if kind == "m.room.member" {
            if let Some(server) = server_of(state_key) {
                self.refresh_remote_server(server)?;
            }
        }
        Ok(())
    }

    fn chain_length(&mut self) -> Result<u32> {
        if self.state_chain_length == u32::MAX {
            let group = self
                .rooms
                .storage
                .get_tiered(tables::STATE_GROUP_TIERS, &self.record.state_group)?;
            self.state_chain_length = group.map_or(MAX_STATE_CHAIN, |g| g.chain_length);
        }
        Ok(self.state_chain_length)
    }

    /// The current `m.room.member` entries, seeing this draft's changes.
    fn member_state(&self) -> Result<Vec<(String, String, String)>> {
        let mut members: HashMap<String, String> = match &self.room_id {
            Some(room_id) => self
                .rooms
                .member_event_ids(room_id.as_str())?
                .into_iter()
                .collect(),
            None => HashMap::new(),
        };
        for ((kind, state_key), id) in &self.state {
            if kind != "m.room.member" {
                continue;
            }
            match id {
                Some(id) => members.insert(state_key.clone(), id.clone()),
                None => members.remove(state_key),
            };
        }
        Ok(members
            .into_iter()
            .map(|(key, id)| ("m.room.member".to_owned(), key, id))
            .collect())
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
        for (key, id) in &self.state {
            match id {
                Some(id) => state.insert(key.clone(), id.clone()),
                None => state.remove(key),
            };
        }
        Ok(state.into_iter().map(|((k, s), id)| (k, s, id)).collect())
    }

    /// Queues `pdu` for each of `destinations` but this server and
    /// `except` (the server it came from), in this draft's batch.
    pub fn queue_out(&mut self, pdu: &Pdu, destinations: &[String], except: Option<&str>) {
        let own = self.rooms.server_name.as_str();
        for destination in destinations {
            if destination == own
                || Some(destination.as_str()) == except
                || self
                    .queued_now
                    .contains(&(destination.clone(), pdu.event_id.to_string()))
            {
                continue;
            }
            let position = self.rooms.outbox.next_position();
            self.batch.put(
                tables::FEDERATION_OUTBOX,
                &(destination.clone(), position),
                &OutboxItem::Pdu(pdu.event_id.to_string()),
            );
            self.queued_now
                .insert((destination.clone(), pdu.event_id.to_string()));
            self.wakeups.destinations.insert(destination.clone());
        }
    }

    /// Whether `server` still has a joined member, kept in the room record.
    fn refresh_remote_server(&mut self, server: &str) -> Result<()> {
        if server == self.rooms.server_name {
            return Ok(());
        }
        let suffix = format!(":{server}");
        let mut joined = false;
        for (kind, state_key, event_id) in self.member_state()? {
            if kind != "m.room.member" || !state_key.ends_with(&suffix) {
                continue;
            }
            if server_of(&state_key) != Some(server) {
                continue;
            }
            if let Some(pdu) = self.fetch(&event_id)? {
                if membership_of(&pdu.content_value()) == "join" {
                    joined = true;
                    break;
                }
            }
        }
        let servers = &mut self.record.remote_servers;
        let known = servers.iter().position(|s| s == server);
        match (joined, known) {
            (true, None) => servers.push(server.to_owned()),
            (false, Some(index)) => {
                servers.remove(index);
            }
            _ => {}
        }
        Ok(())
    }

    /// Accepts an event another server made, after its signatures and hash
    /// were checked: authorized by its own auth events and by the state
    /// before it (`state_before`, resolved from its prev events), it joins
    /// the room's graph; if the room's current state would not allow it,
    /// it is soft-failed (stored, but kept out of the timeline and state).
    pub fn append_remote(&mut self, pdu: Arc<Pdu>, state_before: &StateIds) -> Result<Accepted> {
        self.check_by_auth_events(&pdu)?;
        self.check_auth_with(&pdu, |kind, state_key| {
            match state_before.get(&(kind.to_owned(), state_key.to_owned())) {
                Some(id) => self.fetch(id),
                None => Ok(None),
            }
        })
        .map_err(|e| match e {
            Error::Forbidden(why) => Error::Forbidden(format!("by the state before it: {why}")),
            other => other,
        })?;
        let soft_failed = match self.check_auth(&pdu) {
            Ok(()) => self.over_member_cap(&pdu)?,
            Err(Error::Forbidden(_)) => true,
            Err(other) => return Err(other),
        };
        let prevs: std::collections::BTreeSet<String> =
            pdu.prev_events.iter().map(|id| id.to_string()).collect();
        let extremities: std::collections::BTreeSet<String> =
            self.record.forward_extremities.iter().cloned().collect();
        if !soft_failed && prevs == extremities {
            self.record(pdu, Origin::default())?;
            return Ok(Accepted::Timeline);
        }
        self.record_forked(pdu, state_before, soft_failed)?;
        Ok(if soft_failed {
            Accepted::SoftFailed
        } else {
            Accepted::Timeline
        })
    }

    /// Checks `pdu` against the authorization rules with its own auth
    /// events as the state before it (all of which must be here).
    pub fn check_by_auth_events(&self, pdu: &Pdu) -> Result<()> {
        let mut by_auth: HashMap<(String, String), Arc<Pdu>> = HashMap::new();
        for id in &pdu.auth_events {
            let event = self
                .fetch(id.as_str())?
                .ok_or_else(|| Error::Forbidden(format!("auth event {id} is unknown")))?;
            if event.room_id != pdu.room_id {
                return Err(Error::Forbidden(format!(
                    "auth event {id} belongs to another room"
                )));
            }
            let key = (
                event.kind.to_string(),
                event.state_key.clone().unwrap_or_default(),
            );
            by_auth.insert(key, event);
        }
        // From version 12 the create event is no auth event: the room ID
        // names it.
        if self.rules.authorization.room_create_event_id_as_room_id
            && pdu.kind.to_string() != "m.room.create"
        {
            let create_id = format!("${}", &pdu.room_id.as_str()[1..]);
            if let Some(create) = self.fetch(&create_id)? {
                by_auth.insert(("m.room.create".to_owned(), String::new()), create);
            }
        }
        self.check_auth_with(pdu, |kind, state_key| {
            Ok(by_auth
                .get(&(kind.to_owned(), state_key.to_owned()))
                .cloned())
        })
        .map_err(|e| match e {
            Error::Forbidden(why) => Error::Forbidden(format!("by its auth events: {why}")),
            other => other,
        })
    }

    /// Checks `pdu` against the authorization rules with `state` as the
    /// state before it.
    pub fn check_against(&self, pdu: &Pdu, state: &StateIds) -> Result<()> {
        self.check_auth_with(pdu, |kind, state_key| {
            match state.get(&(kind.to_owned(), state_key.to_owned())) {
                Some(id) => self.fetch(id),
                None => Ok(None),
            }
        })
    }

    /// Makes an event visible to this draft's checks without writing it.
    pub fn add_outlier_visible(&mut self, pdu: Arc<Pdu>) {
        self.pdus.insert(pdu.event_id.clone(), pdu);
    }

    /// Stores an event as an outlier (unless it is stored already) and
    /// makes it visible to this draft.
    pub fn add_outlier(&mut self, pdu: Arc<Pdu>) -> Result<()> {
        if self.fetch(pdu.event_id.as_str())?.is_none() {
            self.batch.put(
                tables::PDUS,
                &pdu.event_id.to_string(),
                &Rooms::outlier_record(&pdu),
            );
        }
        self.pdus.insert(pdu.event_id.clone(), pdu);
        Ok(())
    }

    /// Checks `pdu` against the authorization rules with `state` as the
    /// state before it.
    fn check_auth_with(
        &self,
        pdu: &Pdu,
        state: impl Fn(&str, &str) -> Result<Option<Arc<Pdu>>>,
    ) -> Result<()> {
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
            |kind: &StateEventType, state_key: &str| keep(state(&kind.to_string(), state_key)),
            |event_id: &EventId| keep(self.fetch(event_id.as_str())),
        );
        if let Some(error) = failure.into_inner() {
            return Err(error.into());
        }
        outcome.map_err(Error::Forbidden)
    }

    /// Records an event that does not simply follow the room's forward
    /// extremities: its own state is a snapshot of the state before it
    /// plus itself, and (unless soft-failed) the room's current state
    /// becomes the resolution of the current state and that.
    fn record_forked(
        &mut self,
        pdu: Arc<Pdu>,
        state_before: &StateIds,
        soft_failed: bool,
    ) -> Result<()> {
        let room_id = pdu.room_id.to_string();
        let mut after = state_before.clone();
        let replaces_state = match &pdu.state_key {
            Some(state_key) => after.insert(
                (pdu.kind.to_string(), state_key.clone()),
                pdu.event_id.to_string(),
            ),
            None => None,
        };
        let group = self.write_snapshot(&after);
        if soft_failed {
            return self.record_event(pdu, Origin::default(), replaces_state, group, true);
        }
        let prevs: std::collections::BTreeSet<String> =
            pdu.prev_events.iter().map(|id| id.to_string()).collect();
        let mut extremities: Vec<String> = self
            .record
            .forward_extremities
            .iter()
            .filter(|id| !prevs.contains(*id))
            .cloned()
            .collect();
        self.pdus.insert(pdu.event_id.clone(), pdu.clone());
        let current = if extremities.is_empty() {
            after
        } else {
            let now: StateIds = self
                .full_state()?
                .into_iter()
                .map(|(k, s, id)| ((k, s), id))
                .collect();
            let pdus = self.pdus.clone();
            self.rooms
                .resolve_state(&self.rules, &[now, after], &|id: &EventId| {
                    pdus.get(id).map(|pdu| (**pdu).clone())
                })?
        };
        self.record_event(pdu.clone(), Origin::default(), replaces_state, group, false)?;
        let own_key = pdu
            .state_key
            .as_ref()
            .map(|key| (pdu.kind.to_string(), key.clone()));
        let winner = own_key.as_ref().and_then(|key| current.get(key).cloned());
        self.set_current_state(&room_id, current)?;
        // A member event that lost the resolution does not set the
        // membership: the winner of its key does.
        if let (Some((kind, target)), Some(winner)) = (own_key, winner) {
            if kind == "m.room.member" && winner != pdu.event_id.as_str() {
                if let Some(event) = self.fetch(&winner)? {
                    let entry = UserRoom {
                        membership: membership_of(&event.content_value()),
                        event_id: winner,
                        stream: self.stream_of(pdu.event_id.as_str()),
                        forgotten: false,
                    };
                    self.batch
                        .put(tables::USER_ROOMS, &(target, room_id.clone()), &entry);
                }
            }
        }
        extremities.push(pdu.event_id.to_string());
        self.record.forward_extremities = extremities;
        self.record.depth = self.record.depth.max(pdu.depth);
        self.batch.put(tables::ROOMS, &room_id, &self.record);
        Ok(())
    }

    /// A state group holding all of `state`.
    pub(super) fn write_snapshot(&mut self, state: &StateIds) -> u64 {
        let group_id = self.rooms.next_state_group();
        let group = StateGroup {
            prev: None,
            chain_length: 0,
            entries: state
                .iter()
                .map(|((kind, key), id)| (kind.clone(), key.clone(), id.clone()))
                .collect(),
        };
        self.batch.put(tables::STATE_GROUPS, &group_id, &group);
        group_id
    }

    /// Makes `state` the room's current state: the state index, member
    /// counts, memberships and servers of every entry that changed, and a
    /// snapshot state group.
    pub(super) fn set_current_state(&mut self, room_id: &str, state: StateIds) -> Result<()> {
        let before: StateIds = self
            .full_state()?
            .into_iter()
            .map(|(k, s, id)| ((k, s), id))
            .collect();
        let mut changed: Vec<(String, String)> = Vec::new();
        for (key, id) in &state {
            if before.get(key) != Some(id) {
                changed.push(key.clone());
            }
        }
        for key in before.keys() {
            if !state.contains_key(key) {
                changed.push(key.clone());
            }
        }
        let stream = self
            .appended
            .last()
            .map_or(0, |pdu| self.stream_of(pdu.event_id.as_str()));
        let mut servers = std::collections::BTreeSet::new();
        for (kind, state_key) in changed {
            let old = match before.get(&(kind.clone(), state_key.clone())) {
                Some(id) => self.fetch(id)?,
                None => None,
            };
            let new_id = state.get(&(kind.clone(), state_key.clone())).cloned();
            let new = match &new_id {
                Some(id) => self.fetch(id)?,
                None => None,
            };
            let index_key = (room_id.to_owned(), kind.clone(), state_key.clone());
            match &new_id {
                Some(id) => self.batch.put(tables::ROOM_STATE, &index_key, id),
                None => self.batch.delete(tables::ROOM_STATE, &index_key),
            }
            self.state
                .insert((kind.clone(), state_key.clone()), new_id.clone());
            if kind != "m.room.member" {
                continue;
            }
            if self.rooms.appservices.concerns_user(&state_key) {
                // State resolution changed a membership services count.
                self.rooms.appservices.forget_room(room_id);
                self.interest_reset.rooms.insert(room_id.to_owned());
            }
            let membership = |pdu: &Option<Arc<Pdu>>| {
                pdu.as_ref()
                    .map_or("leave".to_owned(), |p| membership_of(&p.content_value()))
            };
            let (was, is) = (membership(&old), membership(&new));
            self.count_membership(&was, -1);
            self.count_membership(&is, 1);
            if let Some(id) = new_id {
                let entry = UserRoom {
                    membership: is,
                    event_id: id,
                    stream,
                    forgotten: false,
                };
                self.batch.put(
                    tables::USER_ROOMS,
                    &(state_key.clone(), room_id.to_owned()),
                    &entry,
                );
            }
            if let Some(server) = server_of(&state_key) {
                servers.insert(server.to_owned());
            }
        }
        for server in servers {
            self.refresh_remote_server(&server)?;
        }
        self.record.state_group = self.write_snapshot(&state);
        self.state_chain_length = 0;
        Ok(())
    }

    /// The stream position this draft gave an event (0 if none).
    fn stream_of(&self, event_id: &str) -> u64 {
        self.reservations
            .iter()
            .zip(&self.appended)
            .find(|(_, pdu)| pdu.event_id.as_str() == event_id)
            .map_or(0, |(reservation, _)| reservation.position())
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

/// The server part of a user ID (`@local:server`, the server possibly with
/// a port), `None` for anything else.
pub fn server_of(user_id: &str) -> Option<&str> {
    user_id
        .strip_prefix('@')?
        .split_once(':')
        .map(|(_, server)| server)
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

/// Takes events (with their stream positions) out of the relations they
/// were part of (a redaction, an expiry): out of their parents' relations
/// and, for thread replies, out of their threads, whose summaries are made
/// again from the replies left.
pub fn forget_relations(
    storage: &Storage,
    batch: &mut Batch,
    events: &[(&Pdu, u64)],
) -> Result<()> {
    // Per thread (room ID, root): the positions of the replies taken out.
    let mut threads: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for (event, stream) in events {
        let content = event.content_value();
        let (Some(rel_type), Some(parent)) = (
            content["m.relates_to"]["rel_type"].as_str(),
            content["m.relates_to"]["event_id"].as_str(),
        ) else {
            continue;
        };
        batch.delete_tiered(tables::RELATION_TIERS, &(parent.to_owned(), *stream));
        if rel_type == "m.thread" {
            threads
                .entry((event.room_id.to_string(), parent.to_owned()))
                .or_default()
                .push(*stream);
        }
    }
    for ((room_id, root), removed) in threads {
        let key = (room_id.clone(), root.clone());
        let Some(mut thread) = storage.get(tables::THREADS, &key)? else {
            continue;
        };
        batch.delete(
            tables::THREAD_ACTIVITY,
            &(room_id.clone(), thread.latest_stream),
        );
        let replies: Vec<(u64, String)> = storage
            .scan_prefix_tiered(tables::RELATION_TIERS, &tables::str_prefix(&root), 100_000)?
            .into_iter()
            .filter(|((_, s), relation)| !removed.contains(s) && relation.rel_type == "m.thread")
            .map(|((_, s), relation)| (s, relation.event_id))
            .collect();
        match replies.last() {
            Some((latest_stream, latest_id)) => {
                thread.count = replies.len() as u64;
                thread.latest_stream = *latest_stream;
                thread.latest_event_id = latest_id.clone();
                batch.put(tables::THREADS, &key, &thread);
                batch.put(tables::THREAD_ACTIVITY, &(room_id, *latest_stream), &root);
            }
            None => batch.delete(tables::THREADS, &key),
        }
    }
    Ok(())
}
