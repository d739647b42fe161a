//! Which events of a room notify one of its members: the user's push
//! rules (`push_rules`) evaluated (`push`) with what the room says of the
//! user (member count, display name, power levels).

use ruma::events::room::power_levels::{RoomPowerLevels, RoomPowerLevelsSource};
use ruma::push::Ruleset;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId};
use serde_json::{json, Value};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::error::{Error, Result};
use super::push::{evaluate, Decision, RoomContext};
use super::push_rules::{PushRules, RoomLevels, PUSH_RULES};
use super::rooms::{Rooms, SharedEntry};
use super::sync::{UnreadCounts, UnreadMemo};
use super::user_data::UserData;
use super::Services;
use crate::events::Pdu;
use crate::storage::tables::{self, RoomRecord};
use crate::storage::Direction;

/// The rules of one user in one room, ready to judge its events.
pub struct Judge {
    user: OwnedUserId,
    /// The stream position of the user's rules as read.
    rules_version: u64,
    ruleset: Arc<Ruleset>,
    room: RoomContext,
}

impl Judge {
    pub fn new(
        rooms: &Rooms,
        push_rules: &PushRules,
        user_data: &UserData,
        room_id: &RoomId,
        user: &UserId,
    ) -> Result<Self> {
        let (rules_version, ruleset) = push_rules.shared(user_data, user)?;
        Ok(Judge {
            user: user.to_owned(),
            rules_version,
            ruleset,
            room: room_context(rooms, push_rules, room_id, user)?,
        })
    }

    /// A judge from the room's context as worked out for another member
    /// (the member count and power levels are the room's), with this
    /// user's display name (`name`, when the caller has read it).
    pub fn for_member(
        rooms: &Rooms,
        push_rules: &PushRules,
        user_data: &UserData,
        shared: &RoomContext,
        user: &UserId,
        name: Option<String>,
    ) -> Result<Self> {
        let mut room = shared.clone();
        room.display_name = match name {
            Some(name) => name,
            None => display_name(rooms, &shared.room_id, user)?,
        };
        let (rules_version, ruleset) = push_rules.shared(user_data, user)?;
        Ok(Judge {
            user: user.to_owned(),
            rules_version,
            ruleset,
            room,
        })
    }

    /// The room's context this judge works with.
    pub fn room(&self) -> &RoomContext {
        &self.room
    }

    /// What the user's rules decide for `pdu`.
    pub fn decide(&self, pdu: &Pdu) -> Decision {
        evaluate(&self.ruleset, &self.user, &event_json(pdu), &self.room)
    }
}

/// Judges made for a run of events, kept from one event to the next.
#[derive(Default)]
pub struct Judges {
    by_member: HashMap<(OwnedRoomId, OwnedUserId), Judge>,
    /// Per room: the context worked out for its first member, shared by
    /// the others (the member count and the power levels).
    contexts: HashMap<OwnedRoomId, RoomContext>,
}

impl Judges {
    /// The judge of `user` in `room_id`, made on first use (`name`: the
    /// user's display name there, when the caller has read it).
    pub fn of(
        &mut self,
        services: &Services,
        room_id: &RoomId,
        user: &UserId,
        name: Option<String>,
    ) -> Result<&Judge> {
        let key = (room_id.to_owned(), user.to_owned());
        if !self.by_member.contains_key(&key) {
            let (rooms, push_rules, user_data) =
                (&services.rooms, &services.push_rules, &services.user_data);
            let judge = match self.contexts.get(room_id) {
                Some(shared) => {
                    Judge::for_member(rooms, push_rules, user_data, shared, user, name)?
                }
                None => {
                    let judge = Judge::new(rooms, push_rules, user_data, room_id, user)?;
                    self.contexts
                        .insert(room_id.to_owned(), judge.room().clone());
                    judge
                }
            };
            self.by_member.insert(key.clone(), judge);
        }
        Ok(&self.by_member[&key])
    }
}

/// What an event decided for one local member.
#[derive(Clone, Debug)]
pub struct Judged {
    /// The stream position of the member's push rules it was judged by.
    pub rules_version: u64,
    pub notify: bool,
    pub highlight: bool,
    /// The actions of the rule that applied, as a push gateway gets them
    /// (`null` when the event does not notify); members whose rules gave
    /// the same actions share them.
    pub actions: Arc<Value>,
}

/// What an event decided for each local member it may notify.
pub type EventDecisions = HashMap<OwnedUserId, Judged>;

/// What `pdu` decides for each local member it may notify (never its
/// sender), judged once and remembered for the notifier and for every
/// member's unread counts. `judges` are reused for the caller's next
/// events.
pub fn event_decisions(
    services: &Services,
    pdu: &Pdu,
    judges: &mut Judges,
) -> Result<Arc<EventDecisions>> {
    if let Some(known) = services.sync.decisions.get(pdu.event_id.as_str()) {
        return Ok(known);
    }
    let silent = Arc::new(Value::Null);
    let mut distinct: Vec<Arc<Value>> = Vec::new();
    let mut decided = EventDecisions::new();
    for (user, name) in local_audience(services, &pdu.room_id, pdu)? {
        if user == pdu.sender {
            continue;
        }
        let judge = judges.of(services, &pdu.room_id, &user, name)?;
        let decision = judge.decide(pdu);
        let actions = if decision.notify {
            let actions = serde_json::to_value(&decision.actions)
                .map_err(|e| Error::Internal(e.to_string()))?;
            match distinct.iter().find(|known| ***known == actions) {
                Some(known) => known.clone(),
                None => {
                    let actions = Arc::new(actions);
                    distinct.push(actions.clone());
                    actions
                }
            }
        } else {
            silent.clone()
        };
        let judged = Judged {
            rules_version: judge.rules_version,
            notify: decision.notify,
            highlight: decision.highlight,
            actions,
        };
        decided.insert(user, judged);
    }
    let decided = Arc::new(decided);
    services
        .sync
        .decisions
        .insert(pdu.event_id.to_string(), decided.clone());
    Ok(decided)
}

/// The local users an event may notify, with their display names in the
/// room: the room's joined local members, and a local user it invites.
fn local_audience(
    services: &Services,
    room_id: &RoomId,
    pdu: &Pdu,
) -> Result<Vec<(OwnedUserId, Option<String>)>> {
    let own = services.rooms.server_name();
    let mut users = Vec::new();
    for member in services
        .rooms
        .current_state(room_id, Some("m.room.member"))?
    {
        let Some(user) = member.state_key.as_deref() else {
            continue;
        };
        let Ok(user) = UserId::parse(user) else {
            continue;
        };
        let content = member.content_value();
        if user.server_name() == own && content["membership"] == "join" {
            let name = content["displayname"].as_str().unwrap_or(user.localpart());
            let name = name.to_owned();
            users.push((user, Some(name)));
        }
    }
    if pdu.kind.to_string() == "m.room.member" && pdu.content_value()["membership"] == "invite" {
        if let Some(Ok(invited)) = pdu.state_key.as_deref().map(UserId::parse) {
            if invited.server_name() == own && users.iter().all(|(user, _)| *user != invited) {
                users.push((invited, None));
            }
        }
    }
    Ok(users)
}

/// The event as the rules see it (the client format's fields).
pub fn event_json(pdu: &Pdu) -> Value {
    let mut event = json!({
        "type": pdu.kind.to_string(),
        "sender": pdu.sender,
        "content": pdu.content_value(),
        "room_id": pdu.room_id,
        "event_id": pdu.event_id,
        "origin_server_ts": pdu.origin_server_ts,
    });
    if let Some(state_key) = &pdu.state_key {
        event["state_key"] = json!(state_key);
    }
    event
}

/// The thread an event is in (its root's ID), if it is in one.
pub fn thread_of(pdu: &Pdu) -> Option<String> {
    let content = pdu.content_value();
    let relation = content.get("m.relates_to")?;
    if relation.get("rel_type")?.as_str()? != "m.thread" {
        return None;
    }
    relation.get("event_id")?.as_str().map(str::to_owned)
}

/// What the push conditions need of the room, as it stands, for `user`:
/// two point reads (the room's record, the user's member event), and the
/// room's power levels as remembered for its current state, never a scan
/// of the members.
pub fn room_context(
    rooms: &Rooms,
    push_rules: &PushRules,
    room_id: &RoomId,
    user: &UserId,
) -> Result<RoomContext> {
    let (member_count, power_levels) = match rooms.room(room_id)? {
        Some(record) => (
            record.joined_members,
            push_rules.room_levels(room_id, record.state_group, || {
                power_levels(rooms, room_id, &record)
            })?,
        ),
        None => (0, Arc::new(None)),
    };
    Ok(RoomContext {
        room_id: OwnedRoomId::from(room_id),
        member_count,
        display_name: display_name(rooms, room_id, user)?,
        power_levels,
    })
}

/// The user's display name in the room, else their localpart.
fn display_name(rooms: &Rooms, room_id: &RoomId, user: &UserId) -> Result<String> {
    let name = rooms
        .state_event(room_id, "m.room.member", user.as_str())?
        .and_then(|member| {
            member.content_value()["displayname"]
                .as_str()
                .map(str::to_owned)
        });
    Ok(name.unwrap_or_else(|| user.localpart().to_owned()))
}

/// The room's power levels as ruma's push conditions read them.
fn power_levels(rooms: &Rooms, room_id: &RoomId, record: &RoomRecord) -> Result<RoomLevels> {
    let Some(rules) = RoomVersionId::try_from(record.version.as_str())
        .ok()
        .and_then(|version| version.rules())
    else {
        return Ok(None);
    };
    let source = match rooms.state_event(room_id, "m.room.power_levels", "")? {
        Some(event) => match serde_json::from_value(event.content_value()) {
            Ok(content) => RoomPowerLevelsSource::Original(content),
            Err(_) => return Ok(None),
        },
        None => RoomPowerLevelsSource::None,
    };
    let mut creators = Vec::new();
    if let Some(create) = rooms.state_event(room_id, "m.room.create", "")? {
        creators.push(create.sender.clone());
        if rules.authorization.explicitly_privilege_room_creators {
            let more = create.content_value()["additional_creators"].clone();
            let more: Vec<OwnedUserId> = serde_json::from_value(more).unwrap_or_default();
            creators.extend(more);
        }
    }
    if !rules.authorization.explicitly_privilege_room_creators {
        creators.clear();
    }
    let levels = RoomPowerLevels::new(source, &rules.authorization, creators);
    Ok(Some(levels.into()))
}

/// Events looked at, newest first, to count a room's unread messages from
/// scratch; the counts stop there. Later syncs add the new events to the
/// remembered counts.
const MAX_UNREAD_SCAN: usize = 1000;

/// The user's unread counts in a room: the events after their read
/// receipts that their push rules notify for (and, of those, highlight),
/// for the main timeline and each thread. A message of their own counts as
/// read up to it, in its thread. The counts of the last sync are
/// remembered, so a sync usually judges only the new events.
pub fn unread_counts(
    services: &Services,
    user: &OwnedUserId,
    room_id: &RoomId,
    upto: u64,
) -> Result<UnreadCounts> {
    let key = (room_id.to_string(), user.to_string());
    let remembered = services.sync.unread.get(&key);
    // The receipts are read again only when some receipt was written
    // since the remembered counts read them.
    let receipt_writes = services.storage.table_writes(tables::RECEIPTS);
    let receipts = match &remembered {
        Some(memo) if memo.receipt_writes == receipt_writes => memo.receipts.clone(),
        _ => read_receipts(services, user, room_id)?,
    };
    let rules_version = services
        .user_data
        .account_data_version(user, None, PUSH_RULES)?
        .unwrap_or(0);
    let remembered = remembered.filter(|memo| {
        memo.receipts == receipts
            && memo.rules_version == rules_version
            && memo.counted_upto <= upto
    });
    let mut judge = LazyJudge {
        services,
        user,
        room_id,
        rules_version,
        judges: Judges::default(),
    };
    let counts = match remembered {
        Some(memo) => count_after(services, &mut judge, room_id, &memo, upto)?,
        None => None,
    };
    let counts = match counts {
        Some(counts) => counts,
        None => count_from_receipts(services, &mut judge, room_id, &receipts, upto)?,
    };
    let memo = UnreadMemo {
        receipts,
        receipt_writes,
        rules_version,
        counted_upto: upto,
        counts: counts.clone(),
    };
    services.sync.unread.insert(key, memo);
    Ok(counts)
}

/// Judges events for one user in one room: by the decisions made for
/// every member while the notifier has yet to pass the event (or already
/// made), else by the user's own rules alone.
struct LazyJudge<'a> {
    services: &'a Services,
    user: &'a OwnedUserId,
    room_id: &'a RoomId,
    rules_version: u64,
    judges: Judges,
}

impl LazyJudge<'_> {
    /// (notifies, highlights) for an event of someone else.
    fn judge(&mut self, entry: &SharedEntry) -> Result<(bool, bool)> {
        let services = self.services;
        let (pdu, stream) = (&*entry.pdu, entry.stream);
        // A redaction after the judging changes what the rules see.
        if !entry.redacted {
            let remembered = services.sync.decisions.get(pdu.event_id.as_str());
            let news = stream > services.sync.notified_upto.load(Ordering::Acquire);
            let decided = match remembered {
                Some(decided) => Some(decided),
                None if news => Some(event_decisions(services, pdu, &mut self.judges)?),
                None => None,
            };
            if let Some(decided) = &decided {
                match decided.get(self.user) {
                    Some(judged) if judged.rules_version == self.rules_version => {
                        return Ok((judged.notify, judged.highlight));
                    }
                    // Judged by older rules: judged again below.
                    Some(_) => {}
                    // Not a member when it was judged: it is not theirs to count.
                    None => return Ok((false, false)),
                }
            }
            // The notifier judged it, by the rules the user has now (they
            // last changed before the event): what it recorded stands.
            let since = services.sync.notified_since.load(Ordering::Acquire);
            if !news && since < stream && self.rules_version < stream {
                let key = (self.user.localpart().to_owned(), stream);
                let recorded = services.storage.get(tables::NOTIFICATIONS, &key)?;
                return Ok(match recorded {
                    Some(record) if record.event_id == pdu.event_id.as_str() => {
                        (true, record.highlight)
                    }
                    _ => (false, false),
                });
            }
        }
        let decision = self
            .judges
            .of(services, self.room_id, self.user, None)?
            .decide(pdu);
        Ok((decision.notify, decision.highlight))
    }
}

/// The remembered counts plus the events after them, or `None` when there
/// are too many new events to count this way.
fn count_after(
    services: &Services,
    judge: &mut LazyJudge<'_>,
    room_id: &RoomId,
    memo: &UnreadMemo,
    upto: u64,
) -> Result<Option<UnreadCounts>> {
    let (events, full) = services.rooms.shared_page(
        room_id,
        memo.counted_upto,
        Some(upto),
        Direction::Forward,
        MAX_UNREAD_SCAN,
    )?;
    if full {
        return Ok(None);
    }
    let mut counts = memo.counts.clone();
    for entry in &events {
        let thread = thread_of(&entry.pdu);
        if entry.pdu.sender == *judge.user {
            *counts.of(thread) = (0, 0);
            continue;
        }
        let (notifies, highlights) = judge.judge(entry)?;
        if notifies {
            let count = counts.of(thread);
            count.0 += 1;
            count.1 += u64::from(highlights);
        }
    }
    Ok(Some(counts))
}

/// Counts back from `upto` to the read receipts, over at most
/// [`MAX_UNREAD_SCAN`] events.
fn count_from_receipts(
    services: &Services,
    judge: &mut LazyJudge<'_>,
    room_id: &RoomId,
    receipts: &[(String, String)],
    upto: u64,
) -> Result<UnreadCounts> {
    let read = ReadPositions::of(services, receipts)?;
    let everywhere = read.everywhere();
    let (events, _) = services.rooms.shared_page(
        room_id,
        upto,
        Some(everywhere),
        Direction::Backward,
        MAX_UNREAD_SCAN,
    )?;
    let mut counts = UnreadCounts::default();
    // Threads (None: the main timeline) with a message of the user's
    // after the receipts: what came before it is read.
    let mut spoke: BTreeSet<Option<String>> = BTreeSet::new();
    for entry in &events {
        let thread = thread_of(&entry.pdu);
        if entry.stream <= read.of_thread(thread.as_deref()) || spoke.contains(&thread) {
            continue;
        }
        if entry.pdu.sender == *judge.user {
            spoke.insert(thread);
            continue;
        }
        let (notifies, highlights) = judge.judge(entry)?;
        if notifies {
            let count = counts.of(thread);
            count.0 += 1;
            count.1 += u64::from(highlights);
        }
    }
    Ok(counts)
}

/// How far a user has read a room by their receipts: per thread (`""`
/// for the unthreaded receipt, `"main"`, a thread root), the stream
/// position of the receipt's event.
pub struct ReadPositions(BTreeMap<String, u64>);

impl ReadPositions {
    /// From receipts as (thread, event ID).
    pub fn of(services: &Services, receipts: &[(String, String)]) -> Result<Self> {
        let mut positions: BTreeMap<String, u64> = BTreeMap::new();
        for (thread, event_id) in receipts {
            if let Some((_, stored)) = services.rooms.pdu(event_id)? {
                let position = positions.entry(thread.clone()).or_default();
                *position = (*position).max(stored.stream);
            }
        }
        Ok(ReadPositions(positions))
    }

    /// The user's, in a room.
    pub fn in_room(services: &Services, user: &OwnedUserId, room_id: &RoomId) -> Result<Self> {
        Self::of(services, &read_receipts(services, user, room_id)?)
    }

    /// Read everywhere up to here (the unthreaded receipt).
    pub fn everywhere(&self) -> u64 {
        self.0.get("").copied().unwrap_or(0)
    }

    /// Read up to here in a thread (`None`: the main timeline).
    pub fn of_thread(&self, thread: Option<&str>) -> u64 {
        let own = self.0.get(thread.unwrap_or("main")).copied().unwrap_or(0);
        own.max(self.everywhere())
    }
}

/// The user's read receipts in the room (public and private) as
/// (thread, event ID): `""` unthreaded, `"main"`, or a thread root.
fn read_receipts(
    services: &Services,
    user: &OwnedUserId,
    room_id: &RoomId,
) -> Result<Vec<(String, String)>> {
    let mut receipts = Vec::new();
    for kind in ["m.read", "m.read.private"] {
        for (thread, receipt) in services.user_data.receipts_of(room_id, kind, user)? {
            receipts.push((thread, receipt.event_id));
        }
    }
    Ok(receipts)
}
