//! Relations between events: edits, threads, references, and the
//! aggregations bundled into events (`unsigned.m.relations`).

use ruma::{RoomId, UserId};
use serde_json::{json, Value};

use super::Rooms;
use crate::events::Pdu;
use crate::services::error::Result;
use crate::storage::tables::{self, Relation};
use crate::storage::{prefix_successor, Direction, Key, KeyRange};

/// Most relations read for one event at once.
const MAX_RELATIONS: usize = 10_000;
/// How deep `recurse=true` follows relations of relations (Synapse's limit).
pub const MAX_RECURSION_DEPTH: usize = 3;

/// What `/relations` asks for.
pub struct RelationsQuery<'a> {
    pub rel_type: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub direction: Direction,
    /// Exclusive stream bound to continue from.
    pub from: Option<u64>,
    /// Stream bound to stop at: older than it going backward is not
    /// returned, newer than it going forward is not.
    pub to: Option<u64>,
    pub limit: usize,
    pub recurse: bool,
}

/// A page of relations: events and their stream positions.
pub struct RelationsPage {
    pub events: Vec<(u64, Pdu)>,
    pub next: Option<u64>,
}

impl Rooms {
    /// Events relating to `parent`, filtered and paged as asked.
    pub fn relations(
        &self,
        room_id: &RoomId,
        parent: &str,
        query: &RelationsQuery<'_>,
    ) -> Result<RelationsPage> {
        let mut found = Vec::new();
        let mut frontier = vec![parent.to_owned()];
        let depth = if query.recurse {
            MAX_RECURSION_DEPTH
        } else {
            1
        };
        for _ in 0..depth {
            let mut next_frontier = Vec::new();
            for event_id in &frontier {
                for (stream, relation) in self.children(event_id)? {
                    next_frontier.push(relation.event_id.clone());
                    let wanted = query.rel_type.is_none_or(|t| t == relation.rel_type)
                        && query.event_type.is_none_or(|t| t == relation.event_type);
                    if wanted {
                        found.push((stream, relation.event_id));
                    }
                }
            }
            frontier = next_frontier;
        }
        found.sort();
        if query.direction == Direction::Backward {
            found.reverse();
        }
        let after_from = |stream: u64| {
            let from_ok = match (query.from, query.direction) {
                (None, _) => true,
                // As in `/messages`: a token is a position, included going
                // backward and excluded going forward.
                (Some(from), Direction::Backward) => stream <= from,
                (Some(from), Direction::Forward) => stream > from,
            };
            let to_ok = match (query.to, query.direction) {
                (None, _) => true,
                (Some(to), Direction::Backward) => stream > to,
                (Some(to), Direction::Forward) => stream <= to,
            };
            from_ok && to_ok
        };
        let mut events = Vec::new();
        let mut more = false;
        for (stream, event_id) in found.into_iter().filter(|(s, _)| after_from(*s)) {
            if events.len() == query.limit {
                more = true;
                break;
            }
            if let Some((pdu, _)) = self.pdu(&event_id)? {
                if pdu.room_id == room_id {
                    events.push((stream, pdu));
                }
            }
        }
        let next = match (more, events.last(), query.direction) {
            (true, Some((s, _)), Direction::Backward) => Some(s.saturating_sub(1)),
            (true, Some((s, _)), Direction::Forward) => Some(*s),
            _ => None,
        };
        Ok(RelationsPage { events, next })
    }

    /// The direct relations of one event, in stream order.
    fn children(&self, parent: &str) -> Result<Vec<(u64, Relation)>> {
        let prefix = tables::str_prefix(parent);
        Ok(self
            .storage
            .scan_prefix_tiered(tables::RELATION_TIERS, &prefix, MAX_RELATIONS)?
            .into_iter()
            .map(|((_, stream), relation)| (stream, relation))
            .collect())
    }

    /// The writes so far to the tables an event's bundle is read from
    /// (each count only grows, so their sum moves when any of them does).
    fn relation_writes(&self) -> u64 {
        self.storage.table_writes(tables::RELATIONS)
            + self.storage.table_writes(tables::ARCHIVED_RELATIONS)
            + self.storage.table_writes(tables::THREADS)
    }

    /// The aggregations a client sees under `unsigned.m.relations`: the
    /// latest edit by the original sender, and the thread summary.
    ///
    /// An event found with neither is remembered as such, for every
    /// viewer, until the relation tables are written again: each of a
    /// room's readers renders a new message, and most have no relations.
    pub fn bundled_relations(&self, pdu: &Pdu, viewer: &UserId) -> Result<Option<Value>> {
        let writes = self.relation_writes();
        if self.unbundled_memo.get(pdu.event_id.as_str()) == Some(writes) {
            return Ok(None);
        }
        let mut bundle = serde_json::Map::new();
        let latest_edit = self
            .children(pdu.event_id.as_str())?
            .into_iter()
            .rev()
            .find(|(_, r)| {
                r.rel_type == "m.replace"
                    && r.sender == pdu.sender.as_str()
                    && r.event_type == pdu.kind.to_string()
            });
        let thread_key = (pdu.room_id.to_string(), pdu.event_id.to_string());
        let thread = self.storage.get(tables::THREADS, &thread_key)?;
        if latest_edit.is_none() && thread.is_none() {
            self.unbundled_memo.insert(pdu.event_id.to_string(), writes);
            return Ok(None);
        }
        if let Some((_, edit)) = latest_edit {
            if let Some((edit, _)) = self.pdu(&edit.event_id)? {
                bundle.insert("m.replace".to_owned(), edit.client_event());
            }
        }
        if let Some(thread) = thread {
            if let Some((latest, _)) = self.pdu(&thread.latest_event_id)? {
                bundle.insert(
                    "m.thread".to_owned(),
                    json!({
                        "latest_event": latest.client_event(),
                        "count": thread.count,
                        "current_user_participated":
                            thread.participants.iter().any(|p| p == viewer.as_str()),
                    }),
                );
            }
        }
        Ok((!bundle.is_empty()).then_some(Value::Object(bundle)))
    }

    /// Thread roots of a room, most recently active first, starting before
    /// the stream position `from`; `participant` keeps only threads the
    /// user took part in.
    pub fn threads(
        &self,
        room_id: &RoomId,
        from: Option<u64>,
        limit: usize,
        participant: Option<&UserId>,
    ) -> Result<(Vec<Pdu>, Option<u64>)> {
        let room = room_id.to_string();
        let upper = match from {
            Some(from) => (room.clone(), from).encode(),
            None => prefix_successor(&tables::str_prefix(&room)).unwrap_or_default(),
        };
        let range = KeyRange {
            lower: tables::str_prefix(&room),
            upper: Some(upper),
        };
        let mut roots = Vec::new();
        let mut next = None;
        for ((_, stream), root) in self.storage.scan(
            tables::THREAD_ACTIVITY,
            &range,
            Direction::Backward,
            MAX_RELATIONS,
        )? {
            if roots.len() == limit {
                next = Some(stream + 1);
                break;
            }
            if let Some(user) = participant {
                let thread = self
                    .storage
                    .get(tables::THREADS, &(room.clone(), root.clone()))?;
                if !thread.is_some_and(|t| t.participants.iter().any(|p| p == user.as_str())) {
                    continue;
                }
            }
            if let Some((pdu, _)) = self.pdu(&root)? {
                if pdu.room_id == room_id {
                    roots.push(pdu);
                }
            }
        }
        Ok((roots, next))
    }
}
