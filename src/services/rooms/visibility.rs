//! History visibility: who may read which events of a room.
//!
//! A joined member reads the room as it is. Anyone may read a
//! `world_readable` room. A former member reads the history they were
//! allowed to see while in the room, and the state as it was when they
//! left. Each event is checked against the history visibility and the
//! reader's membership in the state after it (a user always sees their own
//! membership events).

use std::collections::HashMap;

use ruma::{RoomId, UserId};

use super::Rooms;
use crate::events::Pdu;
use crate::services::error::{Error, Result};
use crate::storage::tables::{self, StoredPdu};

/// How a user may read a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    Joined,
    /// Once a member; `state_group` is the state after their last membership.
    Former {
        state_group: u64,
    },
    /// Never a member, but the room is world-readable.
    Public,
}

/// A window of a room's timeline, as [`Rooms::visible_window`] gives it.
pub struct Window {
    pub events: Vec<(Pdu, StoredPdu)>,
    pub limited: bool,
    pub prev_batch: u64,
}

/// Per-request memo of (history visibility, membership) by state group.
pub type VisibilityCache = HashMap<u64, (String, String)>;

impl Rooms {
    /// How `user` may read the room, or `Forbidden`.
    pub fn reader(&self, room_id: &RoomId, user: &UserId) -> Result<Reader> {
        let key = (user.to_string(), room_id.to_string());
        let membership = self.storage.get(tables::USER_ROOMS, &key)?;
        if let Some(membership) = &membership {
            if membership.membership == "join" {
                return Ok(Reader::Joined);
            }
        }
        let world_readable = self
            .state_event(room_id, "m.room.history_visibility", "")?
            .is_some_and(|pdu| pdu.content_value()["history_visibility"] == "world_readable");
        if world_readable {
            return Ok(Reader::Public);
        }
        match membership {
            // Invited and knocking users see the stripped state of sync
            // instead; departed ones read what they saw while in the room.
            Some(membership)
                if !membership.forgotten
                    && matches!(membership.membership.as_str(), "leave" | "ban") =>
            {
                let stored = self.pdu(&membership.event_id)?;
                let state_group = stored.map_or(0, |(_, stored)| stored.state_group);
                Ok(Reader::Former { state_group })
            }
            _ => Err(Error::Forbidden(format!(
                "{user} may not read room {room_id}"
            ))),
        }
    }

    /// The room state a reader sees: current, or as it was when they left.
    pub fn reader_state(
        &self,
        room_id: &RoomId,
        reader: Reader,
        kind: Option<&str>,
    ) -> Result<Vec<Pdu>> {
        match reader {
            Reader::Joined | Reader::Public => Ok(self
                .current_state(room_id, kind)?
                .into_iter()
                .map(std::sync::Arc::unwrap_or_clone)
                .collect()),
            Reader::Former { state_group } => {
                let mut state = self.state_at_group(state_group)?;
                if let Some(kind) = kind {
                    state.retain(|pdu| pdu.kind.to_string() == kind);
                }
                Ok(state)
            }
        }
    }

    /// Whether `user`, reading as `reader`, may see `pdu`.
    pub fn may_see(
        &self,
        pdu: &Pdu,
        user: &UserId,
        reader: Reader,
        cache: &mut VisibilityCache,
    ) -> Result<bool> {
        if pdu.kind.to_string() == "m.room.member"
            && pdu.state_key.as_deref() == Some(user.as_str())
        {
            return Ok(true);
        }
        let Some((_, stored)) = self.pdu(pdu.event_id.as_str())? else {
            return Ok(false);
        };
        self.may_see_stored(pdu, &stored, user, reader, cache)
    }

    /// [`Rooms::may_see`] for an event whose stored record is at hand.
    pub fn may_see_stored(
        &self,
        pdu: &Pdu,
        stored: &StoredPdu,
        user: &UserId,
        reader: Reader,
        cache: &mut VisibilityCache,
    ) -> Result<bool> {
        if pdu.kind.to_string() == "m.room.member"
            && pdu.state_key.as_deref() == Some(user.as_str())
        {
            return Ok(true);
        }
        let (visibility, membership) = match cache.get(&stored.state_group) {
            Some(facts) => facts.clone(),
            None => {
                let facts = self.visibility_facts(stored.state_group, user)?;
                cache.insert(stored.state_group, facts.clone());
                facts
            }
        };
        if membership != "join" && self.is_erased(pdu.sender.as_str()) {
            return Ok(false);
        }
        Ok(match visibility.as_str() {
            "world_readable" => true,
            _ if membership == "join" => true,
            "shared" => reader == Reader::Joined,
            "invited" => membership == "invite",
            _ => false,
        })
    }

    /// The latest `limit` events of the room after `since` up to `end`,
    /// oldest first, that `user` may see (reading as `reader`) and `keep`
    /// lets through; whether older events were left out; and the position
    /// just before the window, from which `/messages` fills the gap.
    pub fn visible_window(
        &self,
        room_id: &RoomId,
        user: &UserId,
        reader: Reader,
        (since, end): (Option<u64>, u64),
        limit: usize,
        keep: impl Fn(&Pdu) -> bool,
    ) -> Result<Window> {
        let page = self.newest_page(room_id, end, since, limit + 1)?;
        let limited = page.events.len() > limit;
        let mut window: Vec<(Pdu, StoredPdu)> = page
            .events
            .into_iter()
            .zip(page.stored)
            .take(limit)
            .collect();
        window.reverse();
        let prev_batch = window
            .first()
            .map_or(end, |(_, stored)| stored.stream.saturating_sub(1));
        let mut cache = VisibilityCache::new();
        let mut events = Vec::with_capacity(window.len());
        for (pdu, stored) in window {
            if self.may_see_stored(&pdu, &stored, user, reader, &mut cache)? && keep(&pdu) {
                events.push((pdu, stored));
            }
        }
        Ok(Window {
            events,
            limited,
            prev_batch,
        })
    }

    /// Keeps the events `user` may see.
    pub fn visible_events(
        &self,
        events: Vec<Pdu>,
        user: &UserId,
        reader: Reader,
    ) -> Result<Vec<Pdu>> {
        let mut cache = VisibilityCache::new();
        let mut kept = Vec::new();
        for pdu in events {
            if self.may_see(&pdu, user, reader, &mut cache)? {
                kept.push(pdu);
            }
        }
        Ok(kept)
    }

    /// The history visibility and `user`'s membership in a state group,
    /// read by walking the group's deltas back only as far as needed.
    fn visibility_facts(&self, group_id: u64, user: &UserId) -> Result<(String, String)> {
        // State groups never change, so what was learnt of one holds for good.
        let memo_key = (group_id, user.to_string());
        if let Some(facts) = self.visibility_memo.get(&memo_key) {
            return Ok(facts);
        }
        let facts = self.read_visibility_facts(group_id, user)?;
        self.visibility_memo.insert(memo_key, facts.clone());
        Ok(facts)
    }

    fn read_visibility_facts(&self, group_id: u64, user: &UserId) -> Result<(String, String)> {
        let mut visibility_event = None;
        let mut member_event = None;
        let mut next = Some(group_id);
        while let Some(id) = next {
            if id == 0 || (visibility_event.is_some() && member_event.is_some()) {
                break;
            }
            let Some(group) = self.storage.get_tiered(tables::STATE_GROUP_TIERS, &id)? else {
                break;
            };
            for (kind, state_key, event_id) in group.entries.iter().rev() {
                if visibility_event.is_none()
                    && kind == "m.room.history_visibility"
                    && state_key.is_empty()
                {
                    visibility_event = Some(event_id.clone());
                }
                if member_event.is_none() && kind == "m.room.member" && state_key == user.as_str() {
                    member_event = Some(event_id.clone());
                }
            }
            next = group.prev;
        }
        let content_field =
            |event_id: Option<String>, field: &str, default: &str| -> Result<String> {
                Ok(match event_id {
                    Some(id) => self
                        .pdu(&id)?
                        .and_then(|(pdu, _)| pdu.content_value()[field].as_str().map(str::to_owned))
                        .unwrap_or_else(|| default.to_owned()),
                    None => default.to_owned(),
                })
            };
        Ok((
            content_field(visibility_event, "history_visibility", "shared")?,
            content_field(member_event, "membership", "leave")?,
        ))
    }
}
