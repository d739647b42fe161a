//! Rooms: the event graph, its state, memberships and the timeline.
//!
//! Every event enters through a [`draft::Draft`] under the room's lock, and
//! every draft commits as one atomic batch. Stream positions come from one
//! counter shared by all rooms.

pub mod admin;
pub mod create;
pub mod draft;
pub mod power;
pub mod relations;
pub mod remote;
pub mod upgrade;
pub mod visibility;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ruma::{EventId, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, UserId};
use serde_json::{json, Value};

use super::clock::Clock;
use super::error::{Error, Result};
use super::locks::StripedLocks;
use super::outbox::Outbox;
use super::stream::StreamCounter;
use crate::events::{self, NewEvent, Pdu, SigningKey};
use crate::storage::tables::{self, RoomRecord, StoredPdu, UserRoom};
use crate::storage::{Direction, Key, KeyRange, Storage};
use draft::{Draft, Origin};
use power::PowerView;

/// Most state entries read for one room at once.
const MAX_STATE_ENTRIES: usize = 1_000_000;
/// Most events one page of history returns.
pub const MAX_PAGE: usize = 1000;

/// A room state as event IDs by (event type, state key).
pub type StateIds = std::collections::BTreeMap<(String, String), String>;

pub struct Rooms {
    storage: Storage,
    server_name: String,
    key: Arc<SigningKey>,
    clock: Arc<dyn Clock>,
    locks: StripedLocks,
    stream: Arc<StreamCounter>,
    /// The last state group ID handed out.
    state_groups: AtomicU64,
    pub default_version: RoomVersionId,
    pub max_members: u64,
    /// (state group, user) → (history visibility, membership) there.
    visibility_memo: BoundedMemo<(u64, String), (String, String)>,
    /// Event ID → the event parsed from its stored JSON, for the events
    /// read again and again: auth events, current state, the timeline
    /// that unread counts walk.
    parsed_memo: BoundedMemo<String, Parsed>,
    /// Events found with nothing to bundle (no edit, no thread), with the
    /// writes to the relation tables counted before looking (see
    /// [`Rooms::bundled_relations`]).
    unbundled_memo: BoundedMemo<String, u64>,
    /// Current state entries, (room, type, state key) → event ID, with the
    /// writes to the current state table counted before reading them (see
    /// [`Rooms::current_state_id`]).
    state_memo: BoundedMemo<StateKey, (u64, Option<String>)>,
    /// The timestamp of the last room created here. In room version 12 a
    /// room's ID is the hash of its create event, so two rooms created with
    /// the same content in the same millisecond would get one ID; each new
    /// create event takes a later millisecond than the one before.
    last_create_ts: AtomicU64,
    /// Where events for other servers are queued.
    pub outbox: Arc<Outbox>,
    /// The application services, whose queues take the events they are
    /// interested in.
    pub appservices: Arc<super::appservices::Appservices>,
    /// Blocked rooms and erased users.
    marks: admin::AdminMarks,
}

/// A map that remembers facts that never go stale, up to a bound, and
/// keeps those in use (the "clock" policy): entries wait in a ring in the
/// order they came; when the memo is full, the hand goes round the ring
/// from the oldest, forgets the first entry not read since the hand last
/// passed it, and gives the others another round. Once full, it holds
/// exactly its bound, so its memory stays level instead of rising and
/// falling with generations. (The facts can always be read again.)
pub struct BoundedMemo<K, V> {
    clock: std::sync::Mutex<Ring<K, V>>,
    capacity: usize,
}

struct Ring<K, V> {
    /// Each entry, and whether it was read since the hand passed it.
    entries: std::collections::HashMap<K, (V, bool)>,
    /// Every key of `entries`, the hand's next one first.
    ring: std::collections::VecDeque<K>,
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> BoundedMemo<K, V> {
    pub fn new(capacity: usize) -> Self {
        BoundedMemo {
            clock: std::sync::Mutex::new(Ring {
                entries: std::collections::HashMap::new(),
                ring: std::collections::VecDeque::new(),
            }),
            capacity: capacity.max(1),
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let mut clock = self.clock.lock().unwrap_or_else(|e| e.into_inner());
        let (value, read) = clock.entries.get_mut(key)?;
        *read = true;
        Some(value.clone())
    }

    pub fn insert(&self, key: K, value: V) {
        let mut clock = self.clock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = clock.entries.get_mut(&key) {
            entry.0 = value;
            return;
        }
        while clock.entries.len() >= self.capacity {
            let Some(oldest) = clock.ring.pop_front() else {
                break;
            };
            match clock.entries.get_mut(&oldest) {
                Some((_, read)) if *read => {
                    *read = false;
                    clock.ring.push_back(oldest);
                }
                _ => {
                    clock.entries.remove(&oldest);
                }
            }
        }
        clock.ring.push_back(key.clone());
        clock.entries.insert(key, (value, false));
    }
}

#[cfg(test)]
mod memo_tests {
    use super::BoundedMemo;

    #[test]
    fn entries_in_use_outlive_a_full_memo() {
        let memo = BoundedMemo::new(3);
        memo.insert(1, "one");
        memo.insert(2, "two");
        memo.insert(3, "three");
        // 1 is read: the hand passes over it once.
        assert_eq!(memo.get(&1), Some("one"));
        // Full: 2, the oldest never read, is forgotten; 1 is kept.
        memo.insert(4, "four");
        assert_eq!(memo.get(&2), None);
        assert_eq!(memo.get(&1), Some("one"));
        assert_eq!(memo.get(&3), Some("three"));
        assert_eq!(memo.get(&4), Some("four"));
        // Every entry was read since the hand passed: a full round clears
        // the marks and forgets the oldest, 3.
        memo.insert(5, "five");
        assert_eq!(memo.get(&3), None);
        assert_eq!(memo.get(&1), Some("one"));
        assert_eq!(memo.get(&4), Some("four"));
        assert_eq!(memo.get(&5), Some("five"));
    }

    #[test]
    fn a_full_memo_holds_exactly_its_bound() {
        let memo = BoundedMemo::new(10);
        for n in 0..1000 {
            memo.insert(n, n);
            if n % 3 == 0 {
                memo.get(&(n / 2));
            }
            let clock = memo.clock.lock().unwrap();
            assert_eq!(clock.entries.len(), (n + 1).min(10));
            assert_eq!(clock.ring.len(), clock.entries.len());
        }
        assert_eq!(memo.get(&999), Some(999));
    }

    #[test]
    fn inserting_a_known_key_replaces_its_value() {
        let memo = BoundedMemo::new(2);
        memo.insert("a", 1);
        memo.insert("a", 2);
        memo.insert("b", 3);
        assert_eq!(memo.get("a"), Some(2));
        assert_eq!(memo.get("b"), Some(3));
        assert_eq!(memo.clock.lock().unwrap().ring.len(), 2);
    }
}

/// Most parsed events remembered.
const PARSED_MEMO_ENTRIES: usize = 16_384;

/// Most events remembered as having nothing to bundle.
const UNBUNDLED_MEMO_ENTRIES: usize = 4_096;

/// Most current state entries remembered: the auth events of the rooms
/// being written to.
const STATE_MEMO_ENTRIES: usize = 4_096;

/// (room, type, state key): a current state entry's key.
type StateKey = (String, String, String);

/// Most (state group, user) visibility facts remembered.
const VISIBILITY_MEMO_ENTRIES: usize = 200_000;

/// A page of a room's timeline.
#[derive(Default)]
pub struct Page {
    pub events: Vec<Pdu>,
    /// The stream position of each event.
    pub positions: Vec<u64>,
    /// How each event is stored.
    pub stored: Vec<StoredPdu>,
    /// Where the next page starts, if there may be one.
    pub next: Option<u64>,
}

/// An event remembered by [`Rooms::pdu_shared`].
#[derive(Clone)]
struct Parsed {
    pdu: Arc<Pdu>,
    /// The storage's rewrite generation when its JSON was read (`u64::MAX`
    /// when read during a rewrite: never trusted without a read).
    generation: u64,
    /// Whether it is stored redacted.
    redacted: bool,
}

/// A timeline event read shared (see [`Rooms::shared_page`]).
pub struct SharedEntry {
    pub pdu: Arc<Pdu>,
    /// Its stream position.
    pub stream: u64,
    /// Whether it is stored redacted.
    pub redacted: bool,
}

/// The configured rules of new rooms.
pub struct RoomSettings {
    /// The version of rooms created without asking for one.
    pub default_version: RoomVersionId,
    /// Most joined plus invited members a room may have.
    pub max_members: u64,
}

impl Rooms {
    pub fn new(
        storage: Storage,
        server_name: String,
        key: Arc<SigningKey>,
        clock: Arc<dyn Clock>,
        stream: Arc<StreamCounter>,
        settings: RoomSettings,
        appservices: Arc<super::appservices::Appservices>,
    ) -> Result<Self> {
        let RoomSettings {
            default_version,
            max_members,
        } = settings;
        let everything = KeyRange::prefix(b"");
        let groups = storage
            .scan(tables::STATE_GROUPS, &everything, Direction::Backward, 1)?
            .first()
            .map_or(0, |(id, _)| *id);
        Ok(Rooms {
            server_name,
            key,
            clock,
            locks: StripedLocks::new(256),
            stream,
            state_groups: AtomicU64::new(groups),
            default_version,
            max_members,
            visibility_memo: BoundedMemo::new(VISIBILITY_MEMO_ENTRIES),
            parsed_memo: BoundedMemo::new(PARSED_MEMO_ENTRIES),
            unbundled_memo: BoundedMemo::new(UNBUNDLED_MEMO_ENTRIES),
            state_memo: BoundedMemo::new(STATE_MEMO_ENTRIES),
            last_create_ts: AtomicU64::new(0),
            outbox: Outbox::new(),
            appservices,
            marks: admin::AdminMarks::load(&storage)?,
            storage,
        })
    }

    /// The application services a room interests through its joined
    /// members, aliases or ID (indices into the registrations),
    /// remembered until its members or aliases change.
    pub fn appservice_interest(&self, room_id: &RoomId) -> Result<Arc<[usize]>> {
        let appservices = &self.appservices;
        if appservices.is_empty() {
            return Ok(Arc::from([]));
        }
        if let Some(known) = appservices.remembered_interest(room_id.as_str()) {
            return Ok(known);
        }
        let epoch = appservices.interest_epoch();
        let members = self.member_event_ids(room_id.as_str())?;
        let interest = self.appservice_interest_of(room_id.as_str(), members, |id| {
            Ok(self.pdu(id)?.map(|(pdu, _)| Arc::new(pdu)))
        })?;
        appservices.remember_interest(room_id.as_str(), interest.clone(), epoch);
        Ok(interest)
    }

    /// The current member events of a room: (user, event ID).
    fn member_event_ids(&self, room_id: &str) -> Result<Vec<(String, String)>> {
        Ok(self
            .storage
            .scan_prefix(
                tables::ROOM_STATE,
                &tables::str2_prefix(room_id, "m.room.member"),
                usize::MAX,
            )?
            .into_iter()
            .map(|((_, _, user), event_id)| (user, event_id))
            .collect())
    }

    /// The interest of a room with these (user, member event ID) entries;
    /// only the member events of users some service could care about are
    /// read.
    fn appservice_interest_of(
        &self,
        room_id: &str,
        members: Vec<(String, String)>,
        fetch: impl Fn(&str) -> Result<Option<Arc<Pdu>>>,
    ) -> Result<Arc<[usize]>> {
        let mut joined = Vec::new();
        for (user, event_id) in members {
            if !self.appservices.concerns_user(&user) {
                continue;
            }
            let membership =
                fetch(&event_id)?.map(|pdu| draft::membership_of(&pdu.content_value()));
            if membership.as_deref() == Some("join") {
                joined.push(user);
            }
        }
        let aliases: Vec<String> = self
            .storage
            .scan_prefix(tables::ROOM_ALIASES, &tables::str_prefix(room_id), 1_000)?
            .into_iter()
            .map(|((_, alias), ())| alias)
            .collect();
        Ok(self.appservices.interest_of(room_id, &joined, &aliases))
    }

    /// A timestamp for a new create event: now, or just after the last
    /// one handed out, whichever is later.
    pub(crate) fn create_timestamp(&self) -> u64 {
        let now = self.clock.now_ms();
        let previous = self
            .last_create_ts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                Some(now.max(last + 1))
            })
            .unwrap_or(now);
        now.max(previous + 1)
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    fn next_state_group(&self) -> u64 {
        self.state_groups.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The latest stream position handed out.
    /// The stream counter, for writes about rooms' members made elsewhere.
    pub fn stream(&self) -> &Arc<StreamCounter> {
        &self.stream
    }

    pub fn current_stream_position(&self) -> u64 {
        self.stream.current()
    }

    pub fn room(&self, room_id: &RoomId) -> Result<Option<RoomRecord>> {
        Ok(self.storage.get(tables::ROOMS, &room_id.to_string())?)
    }

    /// An event and how it is stored.
    pub fn pdu(&self, event_id: &str) -> Result<Option<(Pdu, StoredPdu)>> {
        let Some(stored) = self
            .storage
            .get_tiered(tables::PDU_TIERS, &event_id.to_owned())?
        else {
            return Ok(None);
        };
        let pdu = parse_stored(event_id, &stored)?;
        Ok(Some((pdu, stored)))
    }

    /// An event, shared: parsed once while its stored JSON stays the same.
    /// While no commit has rewritten stored rows since it was read (a
    /// redaction, an expiry, a purge: see [`crate::storage::Rewrites`]),
    /// it comes from memory without a read; after one, it is read again
    /// and compared with the text remembered.
    pub fn pdu_shared(&self, event_id: &str) -> Result<Option<Arc<Pdu>>> {
        Ok(self.pdu_shared_marked(event_id)?.map(|(pdu, _)| pdu))
    }

    /// An event as [`Rooms::pdu_shared`] reads it, and whether it is
    /// stored redacted.
    pub fn pdu_shared_marked(&self, event_id: &str) -> Result<Option<(Arc<Pdu>, bool)>> {
        let key = event_id.to_owned();
        let generation = self.storage.rewrites();
        // Odd while a rewrite is being written: then nothing is trusted
        // or remembered by generation.
        let settled = generation.is_multiple_of(2);
        let remembered = self.parsed_memo.get(&key);
        if let Some(parsed) = &remembered {
            if settled && parsed.generation == generation {
                return Ok(Some((parsed.pdu.clone(), parsed.redacted)));
            }
        }
        let Some(stored) = self.storage.get_tiered(tables::PDU_TIERS, &key)? else {
            return Ok(None);
        };
        let pdu = match remembered {
            Some(parsed) if parsed.pdu.json_str() == stored.json => parsed.pdu,
            _ => Arc::new(parse_stored(event_id, &stored)?),
        };
        let parsed = Parsed {
            pdu: pdu.clone(),
            generation: if settled { generation } else { u64::MAX },
            redacted: stored.redacted_because.is_some(),
        };
        let redacted = parsed.redacted;
        self.parsed_memo.insert(key, parsed);
        Ok(Some((pdu, redacted)))
    }

    /// The event as other servers receive it: signed now if it is one of
    /// this server's events built while no other server was in its room.
    pub fn federation_text<'p>(&self, pdu: &'p Pdu) -> Result<Cow<'p, str>> {
        federation_text(&self.storage, &self.server_name, &self.key, pdu)
    }

    /// Every current state entry: (type, state key, event ID).
    pub fn current_state_ids(&self, room_id: &RoomId) -> Result<Vec<(String, String, String)>> {
        let prefix = tables::str_prefix(room_id.as_str());
        Ok(self
            .storage
            .scan_prefix(tables::ROOM_STATE, &prefix, MAX_STATE_ENTRIES)?
            .into_iter()
            .map(|((_, kind, state_key), id)| (kind, state_key, id))
            .collect())
    }

    /// Current state events, optionally of one type only (shared: parsed
    /// once while they stay current, see [`Rooms::pdu_shared`]).
    pub fn current_state(&self, room_id: &RoomId, kind: Option<&str>) -> Result<Vec<Arc<Pdu>>> {
        let prefix = match kind {
            Some(kind) => tables::str2_prefix(room_id.as_str(), kind),
            None => tables::str_prefix(room_id.as_str()),
        };
        let entries = self
            .storage
            .scan_prefix(tables::ROOM_STATE, &prefix, MAX_STATE_ENTRIES)?;
        let mut events = Vec::with_capacity(entries.len());
        for (_, event_id) in entries {
            if let Some(pdu) = self.pdu_shared(&event_id)? {
                events.push(pdu);
            }
        }
        Ok(events)
    }

    /// One current state event.
    pub fn state_event(
        &self,
        room_id: &RoomId,
        kind: &str,
        state_key: &str,
    ) -> Result<Option<Arc<Pdu>>> {
        match self.current_state_id(room_id, kind, state_key)? {
            Some(event_id) => self.pdu_shared(&event_id),
            None => Ok(None),
        }
    }

    /// The event ID of one current state entry. Entries are remembered
    /// while the current state table is not written: every send reads
    /// its room's create event, power levels and sender's membership.
    pub fn current_state_id(
        &self,
        room_id: &RoomId,
        kind: &str,
        state_key: &str,
    ) -> Result<Option<String>> {
        let key = (room_id.to_string(), kind.to_owned(), state_key.to_owned());
        let writes = self.storage.table_writes(tables::ROOM_STATE);
        if let Some((seen, event_id)) = self.state_memo.get(&key) {
            if seen == writes {
                return Ok(event_id);
            }
        }
        let event_id = self.storage.get(tables::ROOM_STATE, &key)?;
        self.state_memo.insert(key, (writes, event_id.clone()));
        Ok(event_id)
    }

    /// `user_id`'s current membership in the room ("leave" if none).
    pub fn membership(&self, room_id: &RoomId, user_id: &UserId) -> Result<String> {
        let key = (user_id.to_string(), room_id.to_string());
        Ok(self
            .storage
            .get(tables::USER_ROOMS, &key)?
            .map_or_else(|| "leave".to_owned(), |m| m.membership))
    }

    /// The rooms in which the user's membership is `membership`.
    pub fn rooms_of_user(&self, user_id: &UserId, membership: &str) -> Result<Vec<OwnedRoomId>> {
        let prefix = tables::str_prefix(user_id.as_str());
        let entries = self
            .storage
            .scan_prefix(tables::USER_ROOMS, &prefix, MAX_STATE_ENTRIES)?;
        Ok(entries
            .into_iter()
            .filter(|(_, m)| m.membership == membership)
            .filter_map(|((_, room_id), _)| RoomId::parse(room_id).ok())
            .collect())
    }

    /// `POST /rooms/{roomId}/forget`: the user, who has left, stops seeing
    /// the room. Refused while the user is joined or invited.
    pub async fn forget(&self, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        let _guard = self.locks.lock(room_id.as_str()).await;
        let key = (user_id.to_string(), room_id.to_string());
        let Some(mut membership) = self.storage.get(tables::USER_ROOMS, &key)? else {
            return Ok(());
        };
        if matches!(membership.membership.as_str(), "join" | "invite" | "knock") {
            return Err(Error::Unknown(format!(
                "{user_id} is still in room {room_id}; leave it first"
            )));
        }
        membership.forgotten = true;
        let mut batch = crate::storage::Batch::new();
        batch.put(tables::USER_ROOMS, &key, &membership);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Refuses unless the user is joined to the room. An unknown room and a
    /// room the user is not in look the same, so that room IDs do not leak.
    pub fn require_joined(&self, room_id: &RoomId, user_id: &UserId) -> Result<()> {
        if self.membership(room_id, user_id)? == "join" {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "{user_id} is not in room {room_id}"
            )))
        }
    }

    /// Sends one event. With a transaction key (device, txn), a repeated
    /// request returns the first event's ID and stores nothing new.
    pub async fn send(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        new: NewEvent,
        origin: Origin,
    ) -> Result<OwnedEventId> {
        if new.kind == "m.room.member" {
            let membership = new.content["membership"].as_str().unwrap_or_default();
            self.check_not_blocked(room_id, membership)?;
        }
        let _guard = self.locks.lock(room_id.as_str()).await;
        if let (Some(device_id), Some((txn_key, _))) = (&origin.device_id, &origin.txn) {
            let key = (sender.to_string(), device_id.clone(), txn_key.clone());
            if let Some(event_id) = self.storage.get(tables::TRANSACTIONS, &key)? {
                return EventId::parse(event_id).map_err(|e| Error::Internal(e.to_string()));
            }
        }
        let record = self
            .room(room_id)?
            .ok_or_else(|| Error::Forbidden(format!("{sender} is not in room {room_id}")))?;
        let mut draft = Draft::existing(self, room_id, record)?;
        let redaction = new.kind == "m.room.redaction";
        if redaction {
            self.check_redaction_allowed(&draft, sender, &new)?;
        }
        let pdu = draft.append(sender, new, origin)?;
        if redaction {
            self.apply_redaction(&mut draft, &pdu)?;
        }
        let generation = self.storage.rewrites();
        self.storage.commit(draft.batch).await?;
        self.remember_written(&pdu, generation);
        Ok(pdu.event_id.clone())
    }

    /// Remembers an event this server just stored, as [`Rooms::pdu_shared`]
    /// would after reading it (without the parsed object building kept):
    /// the notifier, the search index and the members' next looks then
    /// take it from memory. `generation` is the rewrite generation read
    /// before the commit, so that a rewrite landing after the event was
    /// written leaves it untrusted.
    fn remember_written(&self, pdu: &Pdu, generation: u64) {
        if !generation.is_multiple_of(2) {
            return;
        }
        self.parsed_memo.insert(
            pdu.event_id.to_string(),
            Parsed {
                pdu: Arc::new(pdu.lean()),
                generation,
                redacted: false,
            },
        );
    }

    /// Changes a membership: join, invite, leave, kick (leave by another),
    /// ban, unban (leave after ban), knock.
    pub async fn set_membership(
        &self,
        room_id: &RoomId,
        sender: &UserId,
        target: &UserId,
        membership: &str,
        mut extra: Value,
        profile: Option<Value>,
    ) -> Result<OwnedEventId> {
        extra["membership"] = json!(membership);
        if let (Some(Value::Object(profile)), "join" | "knock") = (profile, membership) {
            for key in ["displayname", "avatar_url"] {
                if let Some(value) = profile.get(key) {
                    extra[key] = value.clone();
                }
            }
        }
        if membership == "join" && sender == target {
            if let Some(authoriser) = self.restricted_join_authoriser(room_id, target)? {
                extra["join_authorised_via_users_server"] = json!(authoriser);
            }
        }
        let new = NewEvent::state("m.room.member", target.as_str(), extra);
        self.send(room_id, sender, new, Origin::default()).await
    }

    /// For a join to a `restricted` (or `knock_restricted`) room by a user
    /// who is not invited: a local member who may invite, to vouch for the
    /// join, when the user is in one of the rooms the join rule allows.
    /// `None` when the room is not restricted or the user does not qualify
    /// (the authorization rules then decide).
    pub(crate) fn restricted_join_authoriser(
        &self,
        room_id: &RoomId,
        user: &UserId,
    ) -> Result<Option<String>> {
        let Some(rules) = self.state_event(room_id, "m.room.join_rules", "")? else {
            return Ok(None);
        };
        let content = rules.content_value();
        let restricted = matches!(
            content["join_rule"].as_str(),
            Some("restricted" | "knock_restricted")
        );
        if !restricted || matches!(self.membership(room_id, user)?.as_str(), "join" | "invite") {
            return Ok(None);
        }
        let allowed = allowed_rooms(&content)
            .iter()
            .any(|other| self.membership(other, user).is_ok_and(|m| m == "join"));
        if !allowed {
            return Ok(None);
        }
        let view = self.power_view(room_id)?;
        let needed = view.action_level("invite");
        for member in self.current_state(room_id, Some("m.room.member"))? {
            let Some(candidate) = member.state_key.as_deref() else {
                continue;
            };
            let local = candidate.ends_with(&format!(":{}", self.server_name));
            if local
                && member.content_value()["membership"] == "join"
                && view.reaches(candidate, needed)
            {
                return Ok(Some(candidate.to_owned()));
            }
        }
        Ok(None)
    }

    /// Whether this server can tell who is in the rooms a restricted room's
    /// join rule allows: it is joined to one of them.
    pub fn knows_allowed_rooms(&self, room_id: &RoomId) -> Result<bool> {
        let Some(rules) = self.state_event(room_id, "m.room.join_rules", "")? else {
            return Ok(false);
        };
        for other in allowed_rooms(&rules.content_value()) {
            if self.server_in_room(&other)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The event a redaction redacts, by the room version's rules: the
    /// top-level `redacts` before version 11, the content's from then on.
    fn redaction_target(
        draft: &Draft<'_>,
        redacts: Option<&str>,
        content: &Value,
    ) -> Option<String> {
        if draft.rules.redaction.content_field_redacts {
            content
                .get("redacts")
                .and_then(Value::as_str)
                .or(redacts)
                .map(str::to_owned)
        } else {
            redacts.map(str::to_owned)
        }
    }

    /// Refuses a redaction of someone else's event by a sender without the
    /// redact level, before anything is stored.
    fn check_redaction_allowed(
        &self,
        draft: &Draft<'_>,
        sender: &UserId,
        new: &NewEvent,
    ) -> Result<()> {
        let redacts = new.redacts.as_ref().map(|id| id.as_str());
        let Some(target_id) = Self::redaction_target(draft, redacts, &new.content) else {
            return Ok(());
        };
        let Some((target, _)) = self.pdu(&target_id)? else {
            return Ok(());
        };
        if draft.room_id.as_deref() == Some(&*target.room_id)
            && target.sender != sender
            && !self.has_redact_power(draft, sender)?
        {
            return Err(Error::Forbidden(
                "You may not redact other users' events".to_owned(),
            ));
        }
        Ok(())
    }

    /// Redacts the target of a redaction in storage (the sender's right was
    /// checked before), and takes it out of the relations it was part of.
    fn apply_redaction(&self, draft: &mut Draft<'_>, redaction: &Pdu) -> Result<()> {
        let top_level = redaction.json().get("redacts").and_then(|v| match v {
            ruma::CanonicalJsonValue::String(id) => Some(id.as_str()),
            _ => None,
        });
        let Some(target_id) = Self::redaction_target(draft, top_level, &redaction.content_value())
        else {
            return Ok(());
        };
        let Some((target, mut stored)) = self.pdu(&target_id)? else {
            return Ok(());
        };
        if target.room_id != redaction.room_id || stored.redacted_because.is_some() {
            return Ok(());
        }
        let redacted = target
            .redacted(&draft.rules)
            .map_err(|e| Error::Internal(e.to_string()))?;
        draft.forget_relation(&target, stored.stream)?;
        stored.json = redacted.json_text();
        stored.redacted_because = Some(redaction.event_id.to_string());
        // Back to the hot tier if it was archived, and kept there a while.
        draft.batch.put_hot(tables::PDU_TIERS, &target_id, &stored);
        draft.touch(&target_id, redaction);
        Ok(())
    }

    fn has_redact_power(&self, draft: &Draft<'_>, user: &UserId) -> Result<bool> {
        let view = draft.power_view()?;
        Ok(view.reaches(user.as_str(), view.action_level("redact")))
    }

    /// The room's power levels and creators as they stand now.
    pub fn power_view(&self, room_id: &RoomId) -> Result<PowerView> {
        let record = self
            .room(room_id)?
            .ok_or_else(|| Error::NotFound(format!("unknown room {room_id}")))?;
        Draft::existing(self, room_id, record)?.power_view()
    }

    /// Timeline entries ((room, stream position), event ID) of a page
    /// (see [`Rooms::page`]), `limit` at most.
    fn timeline_entries(
        &self,
        room_id: &RoomId,
        from: u64,
        to: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<((String, u64), String)>> {
        let room = room_id.to_string();
        let range = match direction {
            Direction::Backward => KeyRange {
                lower: (room.clone(), to.map_or(0, |t| t.saturating_add(1))).encode(),
                upper: Some((room.clone(), from.saturating_add(1)).encode()),
            },
            Direction::Forward => KeyRange {
                lower: (room.clone(), from.saturating_add(1)).encode(),
                upper: Some(match to {
                    Some(to) => (room.clone(), to.saturating_add(1)).encode(),
                    None => crate::storage::prefix_successor(&tables::str_prefix(&room))
                        .unwrap_or_default(),
                }),
            },
        };
        Ok(self
            .storage
            .scan(tables::TIMELINE, &range, direction, limit)?)
    }

    /// A page of the timeline as [`Rooms::page`] reads it, with the events
    /// shared (see [`Rooms::pdu_shared`]), for readers that need only the
    /// event, its position and whether it is redacted; also whether the
    /// page is full (there may be more).
    pub fn shared_page(
        &self,
        room_id: &RoomId,
        from: u64,
        to: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<(Vec<SharedEntry>, bool)> {
        let limit = limit.clamp(1, MAX_PAGE);
        let entries = self.timeline_entries(room_id, from, to, direction, limit)?;
        let full = entries.len() == limit;
        let mut events = Vec::with_capacity(entries.len());
        for ((_, stream), event_id) in entries {
            if let Some((pdu, redacted)) = self.pdu_shared_marked(&event_id)? {
                events.push(SharedEntry {
                    pdu,
                    stream,
                    redacted,
                });
            }
        }
        Ok((events, full))
    }

    /// A page of the room's timeline from `from` (a stream position,
    /// exclusive going forward, inclusive going backward), up to `to`.
    pub fn page(
        &self,
        room_id: &RoomId,
        from: u64,
        to: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Page> {
        let limit = limit.clamp(1, MAX_PAGE);
        let entries = self.timeline_entries(room_id, from, to, direction, limit)?;
        self.page_of(entries, limit, direction)
    }

    /// [`Rooms::page`] backward from `from` down to `to` (exclusive), the
    /// newest `limit` events of that range, read forward when a bounded
    /// range holds fewer: a look after a recent token reads one or two
    /// events, and RocksDB steps forward through its tables more cheaply
    /// than backward.
    pub fn newest_page(
        &self,
        room_id: &RoomId,
        from: u64,
        to: Option<u64>,
        limit: usize,
    ) -> Result<Page> {
        let limit = limit.clamp(1, MAX_PAGE);
        let Some(to) = to else {
            return self.page(room_id, from, None, Direction::Backward, limit);
        };
        let mut entries =
            self.timeline_entries(room_id, to, Some(from), Direction::Forward, limit)?;
        if entries.len() == limit {
            return self.page(room_id, from, Some(to), Direction::Backward, limit);
        }
        entries.reverse();
        self.page_of(entries, limit, Direction::Backward)
    }

    /// The events of a page's timeline entries, read in `direction` with
    /// `limit` at most.
    fn page_of(
        &self,
        entries: Vec<((String, u64), String)>,
        limit: usize,
        direction: Direction,
    ) -> Result<Page> {
        let full = entries.len() == limit;
        let mut events = Vec::with_capacity(entries.len());
        let mut positions = Vec::with_capacity(entries.len());
        let mut stored_records = Vec::with_capacity(entries.len());
        let mut last = None;
        for ((_, position), event_id) in entries {
            last = Some(position);
            if let Some((pdu, stored)) = self.pdu(&event_id)? {
                events.push(pdu);
                positions.push(position);
                stored_records.push(stored);
            }
        }
        let next = match (full, last, direction) {
            (true, Some(position), Direction::Backward) => Some(position.saturating_sub(1)),
            (true, Some(position), Direction::Forward) => Some(position),
            _ => None,
        };
        Ok(Page {
            events,
            positions,
            stored: stored_records,
            next,
        })
    }

    /// The state after the events of a state group: a walk back to the
    /// group's snapshot, then its deltas applied in order.
    pub fn state_at_group(&self, group_id: u64) -> Result<Vec<Pdu>> {
        let state = self.state_ids_at_group(group_id)?;
        let mut events = Vec::with_capacity(state.len());
        for event_id in state.values() {
            if let Some((pdu, _)) = self.pdu(event_id)? {
                events.push(pdu);
            }
        }
        Ok(events)
    }

    /// The state after the events of a state group, as event IDs by
    /// (type, state key), without reading the events.
    pub fn state_ids_at_group(&self, group_id: u64) -> Result<StateIds> {
        let mut chain = Vec::new();
        let mut next = Some(group_id);
        while let Some(id) = next {
            if id == 0 {
                break;
            }
            let group = self
                .storage
                .get_tiered(tables::STATE_GROUP_TIERS, &id)?
                .ok_or_else(|| Error::Internal(format!("state group {id} is missing")))?;
            next = group.prev;
            chain.push(group);
        }
        let mut state = StateIds::new();
        for group in chain.into_iter().rev() {
            for (kind, state_key, event_id) in group.entries {
                state.insert((kind, state_key), event_id);
            }
        }
        Ok(state)
    }

    /// The state group after the room's last event at or before stream
    /// position `position` (0, the empty state, when there is none).
    pub fn state_group_at(&self, room_id: &RoomId, position: u64) -> Result<u64> {
        let room = room_id.to_string();
        let range = KeyRange {
            lower: (room.clone(), 0).encode(),
            upper: Some((room, position.saturating_add(1)).encode()),
        };
        let last = self
            .storage
            .scan(tables::TIMELINE, &range, Direction::Backward, 1)?;
        let Some((_, event_id)) = last.into_iter().next() else {
            return Ok(0);
        };
        Ok(self
            .pdu(&event_id)?
            .map_or(0, |(_, stored)| stored.state_group))
    }

    /// A user's membership in a room as of stream position `position`:
    /// (membership, member event ID), `None` when the user had none.
    pub fn membership_at(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        position: u64,
    ) -> Result<Option<(String, String)>> {
        let key = (user_id.to_string(), room_id.to_string());
        if let Some(record) = self.storage.get(tables::USER_ROOMS, &key)? {
            // The index holds the latest change; an older position needs the
            // room's state at that point.
            if record.stream <= position {
                return Ok(Some((record.membership, record.event_id)));
            }
        }
        let group = self.state_group_at(room_id, position)?;
        let state = self.state_ids_at_group(group)?;
        let member_key = ("m.room.member".to_owned(), user_id.to_string());
        let Some(event_id) = state.get(&member_key) else {
            return Ok(None);
        };
        Ok(self.pdu(event_id)?.map(|(pdu, _)| {
            let membership = pdu.content_value()["membership"]
                .as_str()
                .unwrap_or("leave")
                .to_owned();
            (membership, event_id.clone())
        }))
    }

    /// The user's membership as of stream position `position`, given the
    /// latest one from the index (which may be later than `position`).
    pub fn membership_as_of(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
        latest: UserRoom,
        position: u64,
    ) -> Result<Option<UserRoom>> {
        if latest.stream <= position {
            return Ok(Some(latest));
        }
        let Some((membership, event_id)) = self.membership_at(room_id, user_id, position)? else {
            return Ok(None);
        };
        let stream = self.pdu(&event_id)?.map_or(0, |(_, stored)| stored.stream);
        Ok(Some(UserRoom {
            membership,
            event_id,
            stream,
            forgotten: false,
        }))
    }

    /// [`Rooms::memberships_of_user`], with the count of writes to the
    /// membership index read before it: the list still holds while
    /// [`Rooms::memberships_written_since`] says no.
    pub fn counted_memberships_of_user(
        &self,
        user_id: &UserId,
    ) -> Result<(u64, Vec<(OwnedRoomId, UserRoom)>)> {
        let writes = self.storage.table_writes(tables::USER_ROOMS);
        Ok((writes, self.memberships_of_user(user_id)?))
    }

    /// Whether any membership of any user has been written since the
    /// count `writes` was read.
    pub fn memberships_written_since(&self, writes: u64) -> bool {
        self.storage.table_writes(tables::USER_ROOMS) != writes
    }

    /// Every room the user has or had a membership in, with the latest.
    pub fn memberships_of_user(&self, user_id: &UserId) -> Result<Vec<(OwnedRoomId, UserRoom)>> {
        let prefix = tables::str_prefix(user_id.as_str());
        let entries = self
            .storage
            .scan_prefix(tables::USER_ROOMS, &prefix, MAX_STATE_ENTRIES)?;
        Ok(entries
            .into_iter()
            .filter_map(|((_, room_id), record)| Some((RoomId::parse(room_id).ok()?, record)))
            .collect())
    }

    /// The first event at or after `ts` (forward), or the last at or before
    /// it (backward). A binary search over stream positions: local events'
    /// timestamps grow with their positions.
    pub fn event_near_timestamp(
        &self,
        room_id: &RoomId,
        ts: u64,
        direction: Direction,
    ) -> Result<Option<Pdu>> {
        let (mut low, mut high) = (0u64, self.current_stream_position() + 1);
        let mut best = None;
        while low < high {
            let middle = low + (high - low) / 2;
            let probe = match direction {
                Direction::Forward => {
                    self.page(room_id, middle.saturating_sub(1), None, direction, 1)?
                }
                Direction::Backward => self.page(room_id, middle, None, direction, 1)?,
            };
            let (Some(pdu), Some(&position)) =
                (probe.events.into_iter().next(), probe.positions.first())
            else {
                match direction {
                    Direction::Forward => high = middle,
                    Direction::Backward => low = middle + 1,
                }
                continue;
            };
            let event_ts = u64::from(pdu.origin_server_ts.get());
            match direction {
                // Each step shrinks [low, high): the probe found the first
                // event at or after `middle` (forward) or the last at or
                // before it (backward); positions between have no event of
                // this room, since the stream is shared by every room.
                Direction::Forward if event_ts >= ts => {
                    high = middle;
                    best = Some(pdu);
                }
                Direction::Forward => low = position + 1,
                Direction::Backward if event_ts <= ts => {
                    low = middle + 1;
                    best = Some(pdu);
                }
                Direction::Backward => high = position,
            }
        }
        Ok(best)
    }
}

/// The refusal for a join or invite past the member cap.
pub fn room_full(limit: u64) -> Error {
    Error::RoomFull(format!(
        "The room is full: it may have at most {limit} joined and invited members"
    ))
}

/// The rooms whose members a restricted join rule admits.
pub fn allowed_rooms(join_rules: &Value) -> Vec<OwnedRoomId> {
    join_rules["allow"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["type"] == "m.room_membership")
        .filter_map(|entry| entry["room_id"].as_str())
        .filter_map(|id| RoomId::parse(id).ok())
        .collect()
}

/// An event from its stored record, its fields read (see [`Pdu::from_text`]).
/// [`Rooms::federation_text`] for a reader with the storage, the server's
/// name and its key (the federation sender).
pub fn federation_text<'p>(
    storage: &Storage,
    server_name: &str,
    key: &SigningKey,
    pdu: &'p Pdu,
) -> Result<Cow<'p, str>> {
    if !pdu.needs_signature(server_name) {
        return Ok(Cow::Borrowed(pdu.json_str()));
    }
    let record: RoomRecord = storage
        .get(tables::ROOMS, &pdu.room_id.to_string())?
        .ok_or_else(|| Error::Internal(format!("no room {} for an event", pdu.room_id)))?;
    let version = RoomVersionId::try_from(record.version.as_str())
        .map_err(|e| Error::Internal(e.to_string()))?;
    let rules = events::room_version_rules(&version)
        .ok_or_else(|| Error::UnsupportedRoomVersion(version.to_string()))?;
    pdu.signed_text(&rules, server_name, key)
        .map_err(|e| Error::Internal(e.to_string()))
}

pub fn parse_stored(event_id: &str, stored: &StoredPdu) -> Result<Pdu> {
    let corrupt = |detail: String| crate::storage::StorageError::Corrupt {
        table: "pdus",
        detail,
    };
    let event_id = EventId::parse(event_id).map_err(|e| corrupt(e.to_string()))?;
    let room_id = RoomId::parse(&stored.room_id).map_err(|e| corrupt(e.to_string()))?;
    Ok(Pdu::from_text(event_id, room_id, stored.json.clone())
        .map_err(|e| corrupt(e.to_string()))?)
}
