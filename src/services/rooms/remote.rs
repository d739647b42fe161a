//! Rooms shared with other servers: the state before an event from its
//! prev events, state resolution (version 2, by ruma), events other
//! servers made entering the graph, and a room joined on another server
//! entering this one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use ruma::events::StateEventType;
use ruma::room_version_rules::{RoomVersionRules, StateResolutionVersion};
use ruma::state_res::{self, utils::event_id_set::EventIdSet, StateMap};
use ruma::{EventId, OwnedEventId, RoomId, RoomVersionId, UserId};
use serde_json::{json, Value};

use super::draft::{Accepted, Draft};
use super::{Rooms, StateIds};
use crate::events::{self, NewEvent, Pdu};
use crate::services::error::{Error, Result};
use crate::storage::tables::{self, RoomRecord, StoredPdu};

/// The state events an invited or knocking user is shown.
pub const STRIPPED_STATE_TYPES: [&str; 7] = [
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.topic",
];

/// Most events an auth chain walk visits.
const MAX_AUTH_CHAIN: usize = 100_000;

/// What became of an event offered to a room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offered {
    Accepted(Accepted),
    /// Some of its prev events are not here yet.
    MissingPrevEvents(Vec<OwnedEventId>),
}

impl Rooms {
    /// The version and rules of a room this server knows.
    pub fn version_of(&self, room_id: &RoomId) -> Result<(RoomVersionId, RoomVersionRules)> {
        let record = self
            .room(room_id)?
            .ok_or_else(|| Error::NotFound(format!("unknown room {room_id}")))?;
        let version = RoomVersionId::try_from(record.version.as_str())
            .map_err(|e| Error::Internal(e.to_string()))?;
        let rules = events::room_version_rules(&version)
            .ok_or_else(|| Error::UnsupportedRoomVersion(version.to_string()))?;
        Ok((version, rules))
    }

    /// The state after an event that has state here (not an outlier).
    pub fn state_after_event(&self, event_id: &str) -> Result<Option<StateIds>> {
        match self
            .storage
            .get_tiered(tables::PDU_TIERS, &event_id.to_owned())?
        {
            Some(stored) if !stored.outlier => {
                Ok(Some(self.state_ids_at_group(stored.state_group)?))
            }
            _ => Ok(None),
        }
    }

    /// The state before `pdu`: the state after its prev events, resolved
    /// when there are several; `Err` with the prev events that are not
    /// here (or have no state here).
    pub fn state_before(
        &self,
        pdu: &Pdu,
        rules: &RoomVersionRules,
    ) -> Result<std::result::Result<StateIds, Vec<OwnedEventId>>> {
        let mut maps = Vec::new();
        let mut missing = Vec::new();
        for prev in &pdu.prev_events {
            match self.state_after_event(prev.as_str())? {
                Some(state) => maps.push(state),
                None => missing.push(prev.clone()),
            }
        }
        if !missing.is_empty() {
            return Ok(Err(missing));
        }
        match maps.len() {
            0 => Ok(Ok(StateIds::new())),
            1 => Ok(Ok(maps.pop().expect("one map"))),
            _ => Ok(Ok(self.resolve_state(rules, &maps, &|_| None)?)),
        }
    }

    /// State resolution (version 2) of several states of one room.
    /// `extra` finds events not yet stored.
    pub fn resolve_state(
        &self,
        rules: &RoomVersionRules,
        maps: &[StateIds],
        extra: &dyn Fn(&EventId) -> Option<Pdu>,
    ) -> Result<StateIds> {
        let StateResolutionVersion::V2(v2_rules) = &rules.state_res else {
            return Err(Error::UnsupportedRoomVersion(
                "rooms with state resolution version 1".to_owned(),
            ));
        };
        let fetch = |id: &EventId| -> Option<Pdu> {
            extra(id).or_else(|| self.pdu(id.as_str()).ok().flatten().map(|(pdu, _)| pdu))
        };
        let state_maps: Vec<StateMap<OwnedEventId>> = maps
            .iter()
            .map(|map| {
                map.iter()
                    .filter_map(|((kind, key), id)| {
                        let id = EventId::parse(id).ok()?;
                        Some(((StateEventType::from(kind.as_str()), key.clone()), id))
                    })
                    .collect()
            })
            .collect();
        let auth_chains: Vec<EventIdSet<OwnedEventId>> = state_maps
            .iter()
            .map(|map| {
                auth_chain_of(map.values().cloned(), &fetch)
                    .into_iter()
                    .collect()
            })
            .collect();
        let resolved = state_res::resolve(
            &rules.authorization,
            v2_rules,
            &state_maps,
            auth_chains,
            fetch,
            |conflicted| Some(conflicted_subgraph(conflicted, &fetch)),
        )
        .map_err(|e| Error::Internal(format!("state resolution failed: {e}")))?;
        Ok(resolved
            .into_iter()
            .map(|((kind, key), id)| ((kind.to_string(), key), id.to_string()))
            .collect())
    }

    /// The events of the auth chains of `ids` (not `ids` themselves unless
    /// one is in another's chain), stored ones only.
    pub fn auth_chain(&self, ids: impl IntoIterator<Item = OwnedEventId>) -> Result<Vec<Pdu>> {
        let fetch = |id: &EventId| self.pdu(id.as_str()).ok().flatten().map(|(pdu, _)| pdu);
        let starts: Vec<OwnedEventId> = ids.into_iter().collect();
        let mut chain = Vec::new();
        for id in auth_chain_of(
            starts
                .iter()
                .filter_map(|id| fetch(id))
                .flat_map(|pdu| pdu.auth_events),
            &fetch,
        ) {
            if let Some(pdu) = fetch(&id) {
                chain.push(pdu);
            }
        }
        chain.sort_by_key(|pdu| pdu.depth);
        Ok(chain)
    }

    /// Offers an event another server made (its signatures and hash already
    /// checked) to its room, under the room's lock. With `broadcast`, it is
    /// queued for the room's other servers but `from` (a join a server made
    /// through this one is for everyone to see).
    pub async fn offer_remote(
        &self,
        pdu: Pdu,
        from: Option<&str>,
        broadcast: bool,
    ) -> Result<Offered> {
        let room_id = pdu.room_id.clone();
        let _guard = self.locks.lock(room_id.as_str()).await;
        if let Some((_, stored)) = self.pdu(pdu.event_id.as_str())? {
            if !stored.outlier {
                return Ok(Offered::Accepted(Accepted::AlreadyKnown));
            }
        }
        let record = self
            .room(&room_id)?
            .ok_or_else(|| Error::NotFound(format!("unknown room {room_id}")))?;
        let mut draft = Draft::existing(self, &room_id, record)?;
        let state_before = match self.state_before(&pdu, &draft.rules)? {
            Ok(state) => state,
            Err(missing) => return Ok(Offered::MissingPrevEvents(missing)),
        };
        let pdu = Arc::new(pdu);
        let outcome = draft.append_remote(pdu.clone(), &state_before)?;
        if outcome == Accepted::Timeline && pdu.kind.to_string() == "m.room.redaction" {
            self.apply_remote_redaction(&mut draft, &pdu)?;
        }
        if broadcast && outcome == Accepted::Timeline {
            let servers = draft.record.remote_servers.clone();
            draft.queue_out(&pdu, &servers, from);
        }
        self.storage.commit(draft.batch).await?;
        Ok(Offered::Accepted(outcome))
    }

    /// Applies a redaction from another server when its sender may redact
    /// the target: its own event, or one of its server's, or with the
    /// redact power level.
    fn apply_remote_redaction(&self, draft: &mut Draft<'_>, redaction: &Pdu) -> Result<()> {
        let top_level = redaction.redacts.as_ref().map(|id| id.as_str());
        let Some(target_id) = Self::redaction_target(draft, top_level, &redaction.content_value())
        else {
            return Ok(());
        };
        let Some((target, _)) = self.pdu(&target_id)? else {
            return Ok(());
        };
        let same_server = target.sender.server_name() == redaction.sender.server_name();
        if !same_server && !self.has_redact_power(draft, &redaction.sender)? {
            return Ok(());
        }
        self.apply_redaction(draft, redaction)
    }

    /// Refuses (403, the room is full) a join of `user` that would take
    /// the room past its member cap: the check every local join passes.
    pub fn require_room_for(&self, room_id: &RoomId, user: &UserId) -> Result<()> {
        let record = self
            .room(room_id)?
            .ok_or_else(|| Error::NotFound(format!("unknown room {room_id}")))?;
        let join = NewEvent::state(
            "m.room.member",
            user.as_str(),
            json!({ "membership": "join" }),
        );
        Draft::existing(self, room_id, record)?.check_member_cap(&join)
    }

    /// The membership event another server's user would send to join (or
    /// leave, or knock): the fields that server signs, with this room's
    /// current auth events and forward extremities.
    pub fn membership_template(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        membership: &str,
    ) -> Result<(RoomVersionId, Value)> {
        let record = self
            .room(room_id)?
            .ok_or_else(|| Error::NotFound(format!("unknown room {room_id}")))?;
        let (version, rules) = self.version_of(room_id)?;
        let mut content = json!({ "membership": membership });
        if membership == "join" {
            if let Some(authoriser) = self.restricted_join_authoriser(room_id, user_id)? {
                content["join_authorised_via_users_server"] = json!(authoriser);
            } else if self.join_needs_authoriser(room_id, user_id)? {
                return Err(if self.knows_allowed_rooms(room_id)? {
                    Error::Forbidden(format!(
                        "{user_id} is in none of the rooms whose members may join"
                    ))
                } else {
                    Error::UnableToAuthoriseJoin(
                        "this server is in none of the rooms whose members may join".to_owned(),
                    )
                });
            }
        }
        let new = NewEvent::state("m.room.member", user_id.as_str(), content.clone());
        let auth_types =
            events::auth_types(&new, user_id, &rules.authorization).map_err(Error::BadJson)?;
        let mut auth_events = Vec::new();
        for (kind, state_key) in auth_types {
            if let Some(id) = self.current_state_id(room_id, &kind.to_string(), &state_key)? {
                auth_events.push(id);
            }
        }
        let template = json!({
            "room_id": room_id,
            "sender": user_id,
            "state_key": user_id,
            "type": "m.room.member",
            "content": content,
            "origin": user_id.server_name(),
            "origin_server_ts": self.clock.now_ms(),
            "depth": record.depth + 1,
            "prev_events": record.forward_extremities,
            "auth_events": auth_events,
        });
        Ok((version, template))
    }

    /// Enters a room joined through another server: its state and auth
    /// chain (signatures and hashes already checked) as outliers, each
    /// checked against its own auth events, the state as the room's
    /// current state, then the join event itself.
    pub async fn import_joined_room(
        &self,
        version: &RoomVersionId,
        join: Pdu,
        state: Vec<Pdu>,
        auth_chain: Vec<Pdu>,
    ) -> Result<Accepted> {
        let room_id = join.room_id.clone();
        let _guard = self.locks.lock(room_id.as_str()).await;
        let record = match self.room(&room_id)? {
            Some(record) => record,
            None => RoomRecord {
                version: version.to_string(),
                created_ts: self.clock.now_ms(),
                forward_extremities: join.prev_events.iter().map(|id| id.to_string()).collect(),
                depth: join.depth.saturating_sub(1),
                state_group: 0,
                joined_members: 0,
                invited_members: 0,
                remote_servers: Vec::new(),
            },
        };
        let mut draft = Draft::existing(self, &room_id, record)?;
        let mut events: Vec<Pdu> = auth_chain
            .into_iter()
            .chain(state.iter().cloned())
            .collect();
        events.sort_by_key(|pdu| pdu.depth);
        let mut refused = HashSet::new();
        for pdu in events {
            if pdu.room_id != room_id || refused.contains(&pdu.event_id) {
                continue;
            }
            let pdu = Arc::new(pdu);
            match draft.check_by_auth_events(&pdu) {
                Ok(()) => draft.add_outlier(pdu)?,
                Err(Error::Forbidden(why)) => {
                    tracing::warn!(event = %pdu.event_id, %why, "state from a join refused");
                    refused.insert(pdu.event_id.clone());
                }
                Err(other) => return Err(other),
            }
        }
        let state: StateIds = state
            .iter()
            .filter(|pdu| !refused.contains(&pdu.event_id))
            .filter_map(|pdu| {
                let key = pdu.state_key.clone()?;
                Some(((pdu.kind.to_string(), key), pdu.event_id.to_string()))
            })
            .collect();
        // This server is not in the room (a first join, or one after its
        // users left): the state the resident server gave is the room's
        // state now, and the join follows its prev events.
        if !self.server_in_room(&room_id)? {
            draft.record.forward_extremities =
                join.prev_events.iter().map(|id| id.to_string()).collect();
            draft.record.depth = draft.record.depth.max(join.depth.saturating_sub(1));
            draft.set_current_state(room_id.as_str(), state.clone())?;
        }
        let outcome = draft.append_remote(Arc::new(join), &state)?;
        if outcome != Accepted::Timeline {
            return Err(Error::Forbidden(
                "the room's state does not allow this join".to_owned(),
            ));
        }
        self.storage.commit(draft.batch).await?;
        Ok(outcome)
    }

    /// What an invited or knocking user sees of a room: a few state events
    /// as they were at the membership (or as the inviting server sent them),
    /// stripped to type, key, sender and content, and the membership event.
    pub fn stripped_state(&self, member_event_id: &str) -> Result<Vec<Value>> {
        let Some((member, stored)) = self.pdu(member_event_id)? else {
            return Ok(Vec::new());
        };
        let mut events = Vec::new();
        if let Some(sent) = self
            .storage
            .get(tables::INVITE_STATE, &member_event_id.to_owned())?
        {
            let own = member.state_key.clone().unwrap_or_default();
            events.extend(sent.into_iter().filter(|event| {
                !(event["type"] == "m.room.member" && event["state_key"] == own.as_str())
            }));
        } else {
            let ids = self.state_ids_at_group(stored.state_group)?;
            for kind in STRIPPED_STATE_TYPES {
                let Some(event_id) = ids.get(&(kind.to_owned(), String::new())) else {
                    continue;
                };
                if let Some((pdu, _)) = self.pdu(event_id)? {
                    events.push(stripped(&pdu));
                }
            }
        }
        events.push(stripped(&member));
        Ok(events)
    }

    /// The stripped current state sent with an invite to another server:
    /// the usual types and the inviting user's membership.
    pub fn invite_room_state(&self, room_id: &RoomId, sender: &UserId) -> Result<Vec<Value>> {
        let mut events = Vec::new();
        for kind in STRIPPED_STATE_TYPES {
            if let Some(pdu) = self.state_event(room_id, kind, "")? {
                events.push(stripped(&pdu));
            }
        }
        if let Some(pdu) = self.state_event(room_id, "m.room.member", sender.as_str())? {
            events.push(stripped(&pdu));
        }
        Ok(events)
    }

    /// Whether a local user is joined to the room: this server is in it
    /// and makes its own events there.
    pub fn server_in_room(&self, room_id: &RoomId) -> Result<bool> {
        let suffix = format!(":{}", self.server_name);
        let prefix = tables::str2_prefix(room_id.as_str(), "m.room.member");
        for ((_, _, state_key), event_id) in
            self.storage
                .scan_prefix(tables::ROOM_STATE, &prefix, super::MAX_STATE_ENTRIES)?
        {
            if !state_key.ends_with(&suffix)
                || super::draft::server_of(&state_key) != Some(&self.server_name)
            {
                continue;
            }
            if let Some((pdu, _)) = self.pdu(&event_id)? {
                if pdu.content_value()["membership"] == "join" {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Records a local user's membership in a room this server is not in
    /// (an invite from another server, or the leave that rejects it): the
    /// event as an outlier, the user's membership and a stream position
    /// that wakes their syncs. `stripped` is the room state the inviting
    /// server sent.
    pub async fn record_outside_membership(
        &self,
        pdu: &Pdu,
        stripped: Option<Vec<Value>>,
    ) -> Result<()> {
        let target = pdu
            .state_key
            .clone()
            .ok_or_else(|| Error::BadJson("a member event needs a state key".to_owned()))?;
        let _guard = self.locks.lock(pdu.room_id.as_str()).await;
        let room_id = pdu.room_id.to_string();
        let event_id = pdu.event_id.to_string();
        let mut batch = crate::storage::Batch::new();
        let entry = tables::StreamEntry::Event {
            room_id: room_id.clone(),
            event_id: event_id.clone(),
            member: Some(target.clone()),
        };
        let (stream, mut reservation) = self.stream.next_into(&mut batch, &entry);
        reservation.also_wake(&target);
        let mut stored = Self::outlier_record(pdu);
        stored.stream = stream;
        batch.put_hot(tables::PDU_TIERS, &event_id, &stored);
        if let Some(stripped) = stripped {
            batch.put(tables::INVITE_STATE, &event_id, &stripped);
        }
        let membership = tables::UserRoom {
            membership: super::draft::membership_of(&pdu.content_value()),
            event_id,
            stream,
            forgotten: false,
        };
        // A bridge learns of an invite of one of its users here.
        let sender = pdu.sender.as_str();
        let queued =
            self.appservices
                .queue_event_into(&mut batch, pdu.event_id.as_str(), |i, s| {
                    crate::services::appservices::interested_in_event(
                        i,
                        s,
                        sender,
                        Some(&target),
                        &[],
                    )
                });
        batch.put(tables::USER_ROOMS, &(target, room_id), &membership);
        self.storage.commit(batch).await?;
        drop(reservation);
        for id in queued {
            self.appservices.outbox.wake(&id);
        }
        Ok(())
    }

    /// Builds a local user's event, checks it against the room's rules and
    /// lets `countersign` have another server sign it (an invite of that
    /// server's user) before it is recorded and sent to the room.
    pub async fn append_countersigned<F, Fut>(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        new: NewEvent,
        countersign: F,
    ) -> Result<OwnedEventId>
    where
        F: FnOnce(Pdu, RoomVersionId) -> Fut,
        Fut: std::future::Future<Output = Result<Pdu>>,
    {
        // The room is not held while the other server answers: the event
        // is built under the lock, then recorded under it again, as a
        // fork if the room moved on meanwhile.
        let (built, version) = {
            let _guard = self.locks.lock(room_id.as_str()).await;
            let record = self
                .room(room_id)?
                .ok_or_else(|| Error::Forbidden(format!("{sender} is not in room {room_id}")))?;
            let mut draft = Draft::existing(self, room_id, record)?;
            let built = draft.build(sender, &new)?;
            (built, draft.version.clone())
        };
        let signed = countersign(built.clone(), version).await?;
        if signed.event_id != built.event_id {
            return Err(Error::RemoteUnavailable(
                "the other server changed the event it was asked to sign".to_owned(),
            ));
        }
        let _guard = self.locks.lock(room_id.as_str()).await;
        let record = self
            .room(room_id)?
            .ok_or_else(|| Error::Forbidden(format!("{sender} is not in room {room_id}")))?;
        let mut draft = Draft::existing(self, room_id, record)?;
        let state_before = self
            .state_before(&signed, &draft.rules)?
            .map_err(|_| Error::Internal("the invite's prev events are gone".to_owned()))?;
        let mut destinations = draft.record.remote_servers.clone();
        let pdu = Arc::new(signed);
        if draft.append_remote(pdu.clone(), &state_before)? != Accepted::Timeline {
            return Err(Error::Forbidden(
                "the room changed while the invite was signed; it no longer allows it".to_owned(),
            ));
        }
        destinations.extend(draft.record.remote_servers.iter().cloned());
        draft.queue_out(&pdu, &destinations, None);
        self.storage.commit(draft.batch).await?;
        Ok(pdu.event_id.clone())
    }

    /// Whether a join to the room needs a member to vouch for it: the room
    /// is restricted (and not open to knocks) and the user is neither
    /// invited nor joined.
    fn join_needs_authoriser(&self, room_id: &RoomId, user_id: &UserId) -> Result<bool> {
        let Some(rules) = self.state_event(room_id, "m.room.join_rules", "")? else {
            return Ok(false);
        };
        let restricted = rules.content_value()["join_rule"] == "restricted";
        Ok(restricted
            && !matches!(
                self.membership(room_id, user_id)?.as_str(),
                "join" | "invite"
            ))
    }

    /// Vouches for another server's user's join to a restricted room: when
    /// the join names a local user as its authoriser, and the user is in a
    /// room the join rule allows, the event (as received) gets this
    /// server's signature. Other events come back unchanged.
    pub fn vouch_for_join(
        &self,
        room_id: &RoomId,
        value: &Value,
        rules: &RoomVersionRules,
    ) -> Result<Value> {
        let Some(authoriser) = value["content"]["join_authorised_via_users_server"].as_str() else {
            return Ok(value.clone());
        };
        let local = UserId::parse(authoriser)
            .is_ok_and(|user| user.server_name().as_str() == self.server_name);
        if !local {
            return Ok(value.clone());
        }
        let user = value["state_key"]
            .as_str()
            .and_then(|user| UserId::parse(user).ok())
            .ok_or_else(|| Error::BadJson("the join has no valid state_key".to_owned()))?;
        if self.restricted_join_authoriser(room_id, &user)?.is_none() {
            return Err(Error::Forbidden(format!(
                "{user} may not join: not in a room whose members may"
            )));
        }
        let mut json: ruma::CanonicalJsonObject =
            match ruma::CanonicalJsonValue::try_from(value.clone()) {
                Ok(ruma::CanonicalJsonValue::Object(object)) => object,
                _ => {
                    return Err(Error::BadJson(
                        "a PDU must be a canonical JSON object".to_owned(),
                    ))
                }
            };
        json.remove("unsigned");
        let hashes = json.get("hashes").cloned();
        ruma::signatures::hash_and_sign_event(
            &self.server_name,
            &*self.key,
            &mut json,
            &rules.redaction,
        )
        .map_err(|e| Error::BadJson(e.to_string()))?;
        // Signing computes the content hash anew: a join whose hash did
        // not match is not vouched for.
        if json.get("hashes") != hashes.as_ref() {
            return Err(Error::BadJson(
                "the join's content hash does not match".to_owned(),
            ));
        }
        serde_json::to_value(&json).map_err(|e| Error::Internal(e.to_string()))
    }

    /// Adds this server's signature to another server's event (an invite
    /// of a local user).
    pub fn countersign(&self, pdu: &Pdu, rules: &RoomVersionRules) -> Result<Pdu> {
        let mut json = pdu.json().clone();
        ruma::signatures::hash_and_sign_event(
            &self.server_name,
            &*self.key,
            &mut json,
            &rules.redaction,
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        Pdu::from_canonical(pdu.event_id.clone(), pdu.room_id.clone(), json)
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// Signs another server's membership template for a local user.
    pub fn sign_template(&self, template: Value, rules: &RoomVersionRules) -> Result<Pdu> {
        let Value::Object(map) = template else {
            return Err(Error::BadJson(
                "the event template is not an object".to_owned(),
            ));
        };
        let room_id = map
            .get("room_id")
            .and_then(Value::as_str)
            .and_then(|id| RoomId::parse(id).ok())
            .ok_or_else(|| Error::BadJson("the event template has no room ID".to_owned()))?;
        Pdu::sign_object(map, Some(&room_id), rules, &self.server_name, &self.key)
            .map_err(|e| Error::BadJson(e.to_string()))
    }

    /// Stores an event this server lacked with the state before it as
    /// another server gave it: the events of that state and its auth chain
    /// (`events`) as outliers, each checked against its own auth events,
    /// then the event itself, checked against them and that state, with a
    /// snapshot state group but no timeline entry.
    pub async fn store_with_state(
        &self,
        pdu: Pdu,
        state_before: StateIds,
        mut events: Vec<Pdu>,
    ) -> Result<()> {
        let room_id = pdu.room_id.clone();
        let _guard = self.locks.lock(room_id.as_str()).await;
        let record = self
            .room(&room_id)?
            .ok_or_else(|| Error::NotFound(format!("unknown room {room_id}")))?;
        if let Some((_, stored)) = self.pdu(pdu.event_id.as_str())? {
            if !stored.outlier {
                return Ok(());
            }
        }
        let mut draft = Draft::existing(self, &room_id, record)?;
        events.sort_by_key(|event| event.depth);
        let mut state_before = state_before;
        for event in events {
            if self.pdu(event.event_id.as_str())?.is_some() {
                continue;
            }
            let event = Arc::new(event);
            match draft.check_by_auth_events(&event) {
                Ok(()) => draft.add_outlier(event)?,
                Err(Error::Forbidden(why)) => {
                    tracing::info!(event = %event.event_id, %why, "an event of a fetched state refused");
                    state_before.retain(|_, id| id != event.event_id.as_str());
                }
                Err(other) => return Err(other),
            }
        }
        let pdu = Arc::new(pdu);
        draft.check_by_auth_events(&pdu)?;
        draft.check_against(&pdu, &state_before)?;
        let mut after = state_before;
        if let Some(key) = &pdu.state_key {
            after.insert(
                (pdu.kind.to_string(), key.clone()),
                pdu.event_id.to_string(),
            );
        }
        let group = draft.write_snapshot(&after);
        let stored = StoredPdu {
            state_group: group,
            outlier: false,
            ..Self::outlier_record(&pdu)
        };
        draft
            .batch
            .put_hot(tables::PDU_TIERS, &pdu.event_id.to_string(), &stored);
        self.storage.commit(draft.batch).await?;
        Ok(())
    }

    /// Adds an EDU for `destination` to `batch`; the caller wakes the
    /// destination (`outbox.wake`) once the batch committed.
    pub fn queue_edu_into(&self, batch: &mut crate::storage::Batch, destination: &str, edu: Value) {
        let position = self.outbox.next_position();
        batch.put(
            tables::FEDERATION_OUTBOX,
            &(destination.to_owned(), position),
            &tables::OutboxItem::Edu(edu),
        );
    }

    /// Queues an EDU about a room (typing, a receipt) for every other
    /// server with a joined member.
    pub async fn queue_edu(&self, room_id: &RoomId, edu: Value) -> Result<()> {
        let Some(record) = self.room(room_id)? else {
            return Ok(());
        };
        if record.remote_servers.is_empty() {
            return Ok(());
        }
        let mut batch = crate::storage::Batch::new();
        for destination in &record.remote_servers {
            self.queue_edu_into(&mut batch, destination, edu.clone());
        }
        self.storage.commit(batch).await?;
        for destination in &record.remote_servers {
            self.outbox.wake(destination);
        }
        Ok(())
    }

    /// The room's first timeline entry: its position and event.
    pub fn oldest_timeline_event(&self, room_id: &RoomId) -> Result<Option<(u64, Pdu)>> {
        let first = self.storage.scan(
            tables::TIMELINE,
            &crate::storage::KeyRange::prefix(&tables::str_prefix(room_id.as_str())),
            crate::storage::Direction::Forward,
            1,
        )?;
        let Some(((_, position), event_id)) = first.into_iter().next() else {
            return Ok(None);
        };
        Ok(self.pdu(&event_id)?.map(|(pdu, _)| (position, pdu)))
    }

    /// Stores events of the room's history fetched from another server:
    /// newest first, below the room's oldest timeline entry, each checked
    /// against its own auth events, with the state before that entry as
    /// their state. Events known already, or with no position left below,
    /// are skipped. Returns how many were stored.
    pub async fn store_backfilled(
        &self,
        room_id: &RoomId,
        mut events: Vec<Arc<Pdu>>,
    ) -> Result<usize> {
        let _guard = self.locks.lock(room_id.as_str()).await;
        let Some(record) = self.room(room_id)? else {
            return Ok(0);
        };
        let Some((mut position, oldest)) = self.oldest_timeline_event(room_id)? else {
            return Ok(0);
        };
        let Some(oldest_stored) = self
            .storage
            .get_tiered(tables::PDU_TIERS, &oldest.event_id.to_string())?
        else {
            return Ok(0);
        };
        // The state before the oldest event: its group's base when the
        // event itself set state (a delta on the state before it).
        let group = match (
            &oldest.state_key,
            self.storage
                .get_tiered(tables::STATE_GROUP_TIERS, &oldest_stored.state_group)?,
        ) {
            (Some(_), Some(group)) => group.prev.unwrap_or(oldest_stored.state_group),
            _ => oldest_stored.state_group,
        };
        let mut draft = Draft::existing(self, room_id, record)?;
        // Only ancestors of the oldest event, each once.
        let by_id: HashMap<OwnedEventId, Arc<Pdu>> = events
            .drain(..)
            .map(|pdu| (pdu.event_id.clone(), pdu))
            .collect();
        let mut reachable: Vec<Arc<Pdu>> = Vec::new();
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        let mut queue: VecDeque<OwnedEventId> = oldest.prev_events.iter().cloned().collect();
        while let Some(id) = queue.pop_front() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(pdu) = by_id.get(&id) {
                queue.extend(pdu.prev_events.iter().cloned());
                reachable.push(pdu.clone());
            }
        }
        let mut events = reachable;
        events.sort_by_key(|pdu| std::cmp::Reverse(pdu.depth));
        let mut stored = 0;
        for pdu in events {
            if pdu.depth >= oldest.depth {
                continue;
            }
            if let Some((_, known)) = self.pdu(pdu.event_id.as_str())? {
                if !known.outlier {
                    continue;
                }
            }
            if position <= 1 {
                break;
            }
            if let Err(error) = draft.check_by_auth_events(&pdu) {
                tracing::info!(event = %pdu.event_id, %error, "a backfilled event failed authorization");
                continue;
            }
            position -= 1;
            let record = StoredPdu {
                room_id: room_id.to_string(),
                json: pdu.json_text(),
                stream: position,
                state_group: group,
                txn_id: None,
                sender_device: None,
                redacted_because: None,
                replaces_state: None,
                outlier: false,
                soft_failed: false,
            };
            draft
                .batch
                .put_hot(tables::PDU_TIERS, &pdu.event_id.to_string(), &record);
            draft.batch.put(
                tables::TIMELINE,
                &(room_id.to_string(), position),
                &pdu.event_id.to_string(),
            );
            draft.add_outlier_visible(pdu);
            stored += 1;
        }
        self.storage.commit(draft.batch).await?;
        Ok(stored)
    }

    /// An event stored as an outlier (known, but without state here).
    pub(super) fn outlier_record(pdu: &Pdu) -> StoredPdu {
        StoredPdu {
            room_id: pdu.room_id.to_string(),
            json: pdu.json_text(),
            stream: 0,
            state_group: 0,
            txn_id: None,
            sender_device: None,
            redacted_because: None,
            replaces_state: None,
            outlier: true,
            soft_failed: false,
        }
    }
}

fn stripped(pdu: &Pdu) -> Value {
    json!({
        "type": pdu.kind.to_string(),
        "state_key": pdu.state_key,
        "sender": pdu.sender,
        "content": pdu.content_value(),
    })
}

/// The IDs of every event reachable from `start` through auth events
/// (`start` included), as far as `fetch` finds them.
fn auth_chain_of(
    start: impl IntoIterator<Item = OwnedEventId>,
    fetch: &dyn Fn(&EventId) -> Option<Pdu>,
) -> HashSet<OwnedEventId> {
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut queue: VecDeque<OwnedEventId> = start.into_iter().collect();
    while let Some(id) = queue.pop_front() {
        if seen.len() >= MAX_AUTH_CHAIN || !seen.insert(id.clone()) {
            continue;
        }
        if let Some(pdu) = fetch(&id) {
            queue.extend(pdu.auth_events.iter().cloned());
        }
    }
    seen
}

/// The conflicted state subgraph (room version 12's state resolution):
/// the events on auth-event paths from one conflicted event to another.
fn conflicted_subgraph(
    conflicted: &StateMap<Vec<OwnedEventId>>,
    fetch: &dyn Fn(&EventId) -> Option<Pdu>,
) -> EventIdSet<OwnedEventId> {
    let targets: HashSet<OwnedEventId> = conflicted.values().flatten().cloned().collect();
    let reachable = auth_chain_of(targets.iter().cloned(), fetch);
    // Reverse edges inside the reachable part: auth event → events citing it.
    let mut cited_by: HashMap<OwnedEventId, Vec<OwnedEventId>> = HashMap::new();
    for id in &reachable {
        if let Some(pdu) = fetch(id) {
            for auth in pdu.auth_events {
                cited_by.entry(auth).or_default().push(id.clone());
            }
        }
    }
    // Events from which a conflicted event can be reached.
    let mut reaching: HashSet<OwnedEventId> = HashSet::new();
    let mut queue: VecDeque<OwnedEventId> = targets.iter().cloned().collect();
    while let Some(id) = queue.pop_front() {
        if !reaching.insert(id.clone()) {
            continue;
        }
        if let Some(citing) = cited_by.get(&id) {
            queue.extend(citing.iter().cloned());
        }
    }
    reachable
        .into_iter()
        .filter(|id| reaching.contains(id))
        .collect()
}
