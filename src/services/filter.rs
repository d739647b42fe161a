//! Room event filters (the spec's `RoomEventFilter`), as pure functions.

use serde::Deserialize;
use serde_json::Value;

use ruma::UserId;

use super::error::{Error, Result};
use crate::events::Pdu;
use crate::storage::{tables, Batch, Storage};

/// Most filters one user may store.
const MAX_FILTERS_PER_USER: usize = 1000;

/// A filter as `POST /user/{userId}/filter` takes it; parsed to check its
/// shape, stored as the user sent it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Filter {
    pub event_fields: Option<Vec<String>>,
    pub event_format: Option<EventFormat>,
    pub presence: Option<EventFilter>,
    pub account_data: Option<EventFilter>,
    pub room: Option<RoomFilter>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventFormat {
    Client,
    Federation,
}

/// The spec's `EventFilter` (presence, account data).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct EventFilter {
    pub limit: Option<u64>,
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
}

/// The spec's `RoomFilter`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RoomFilter {
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub include_leave: bool,
    pub timeline: Option<RoomEventFilter>,
    pub state: Option<RoomEventFilter>,
    pub ephemeral: Option<RoomEventFilter>,
    pub account_data: Option<RoomEventFilter>,
}

/// Stored filters: the one writer of the `filters` table.
pub struct Filters {
    storage: Storage,
}

impl Filters {
    pub fn new(storage: Storage) -> Self {
        Filters { storage }
    }

    /// Checks and stores a filter; returns its ID.
    pub async fn create(&self, user: &UserId, filter: Value) -> Result<String> {
        serde_json::from_value::<Filter>(filter.clone())
            .map_err(|e| Error::BadJson(format!("filter: {e}")))?;
        let prefix = tables::str_prefix(user.as_str());
        let stored = self
            .storage
            .scan_prefix(tables::FILTERS, &prefix, MAX_FILTERS_PER_USER)?
            .len();
        if stored >= MAX_FILTERS_PER_USER {
            return Err(Error::Forbidden(format!(
                "a user may store at most {MAX_FILTERS_PER_USER} filters"
            )));
        }
        let id = crate::ids::new_secret("", &mut rand::thread_rng())[..12].to_owned();
        let mut batch = Batch::new();
        batch.put(tables::FILTERS, &(user.to_string(), id.clone()), &filter);
        self.storage.commit(batch).await?;
        Ok(id)
    }

    pub fn get(&self, user: &UserId, id: &str) -> Result<Option<Value>> {
        Ok(self
            .storage
            .get(tables::FILTERS, &(user.to_string(), id.to_owned()))?)
    }

    /// The filter a sync names: inline JSON, or the ID of a stored one.
    pub fn resolve(&self, user: &UserId, param: Option<&str>) -> Result<Filter> {
        let Some(param) = param else {
            return Ok(Filter::default());
        };
        let value = if param.trim_start().starts_with('{') {
            serde_json::from_str(param).map_err(|e| Error::BadJson(format!("filter: {e}")))?
        } else {
            self.get(user, param)?
                .ok_or_else(|| Error::NotFound(format!("no filter {param:?}")))?
        };
        serde_json::from_value(value).map_err(|e| Error::BadJson(format!("filter: {e}")))
    }
}

impl EventFilter {
    /// Whether an event of `kind` from `sender` passes.
    pub fn allows(&self, kind: &str, sender: &str) -> bool {
        allows(
            (&self.types, &self.not_types),
            (&self.senders, &self.not_senders),
            kind,
            sender,
        )
    }
}

impl RoomFilter {
    /// Whether the room is one the filter lets through.
    pub fn allows_room(&self, room_id: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room_id)
            && self
                .rooms
                .as_ref()
                .is_none_or(|rooms| rooms.iter().any(|r| r == room_id))
    }
}

/// Which events a client wants, and whether members are lazy-loaded.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RoomEventFilter {
    pub limit: Option<usize>,
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub contains_url: Option<bool>,
    pub lazy_load_members: bool,
    pub include_redundant_members: bool,
    /// Counts by thread in `/sync` (`unread_thread_notifications`).
    pub unread_thread_notifications: bool,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
}

impl RoomEventFilter {
    /// A filter given inline as JSON in a query parameter.
    pub fn parse(text: Option<&str>) -> Result<Self> {
        let Some(text) = text else {
            return Ok(Self::default());
        };
        if !text.trim_start().starts_with('{') {
            return Err(Error::InvalidParam(
                "only inline JSON filters are supported here".to_owned(),
            ));
        }
        serde_json::from_str(text).map_err(|e| Error::BadJson(format!("filter: {e}")))
    }

    /// Whether an event of `kind` from `sender` in `room_id` passes, by
    /// type, sender and room only.
    pub fn allows(&self, room_id: &str, kind: &str, sender: &str) -> bool {
        let room_allowed = !self.not_rooms.iter().any(|r| r == room_id)
            && self
                .rooms
                .as_ref()
                .is_none_or(|rooms| rooms.iter().any(|r| r == room_id));
        room_allowed
            && allows(
                (&self.types, &self.not_types),
                (&self.senders, &self.not_senders),
                kind,
                sender,
            )
    }

    /// Whether the filter lets `pdu` through.
    pub fn matches(&self, pdu: &Pdu) -> bool {
        if !self.allows(
            pdu.room_id.as_str(),
            &pdu.kind.to_string(),
            pdu.sender.as_str(),
        ) {
            return false;
        }
        if let Some(wanted) = self.contains_url {
            let has_url = pdu.content_value().get("url").is_some_and(Value::is_string);
            if has_url != wanted {
                return false;
            }
        }
        true
    }

    pub fn apply(&self, events: Vec<Pdu>) -> Vec<Pdu> {
        events.into_iter().filter(|pdu| self.matches(pdu)).collect()
    }
}

/// The type and sender parts every kind of filter shares.
fn allows(
    (types, not_types): (&Option<Vec<String>>, &Vec<String>),
    (senders, not_senders): (&Option<Vec<String>>, &Vec<String>),
    kind: &str,
    sender: &str,
) -> bool {
    !not_types.iter().any(|t| type_matches(t, kind))
        && types
            .as_ref()
            .is_none_or(|types| types.iter().any(|t| type_matches(t, kind)))
        && !not_senders.iter().any(|s| s == sender)
        && senders
            .as_ref()
            .is_none_or(|senders| senders.iter().any(|s| s == sender))
}

/// An event type pattern: exact, or a prefix ending in `*`.
fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_patterns() {
        assert!(type_matches("m.room.*", "m.room.message"));
        assert!(type_matches("*", "anything"));
        assert!(!type_matches("m.room.message", "m.room.member"));
    }

    #[test]
    fn parsing_refuses_ids_and_bad_json() {
        assert!(RoomEventFilter::parse(None).unwrap().types.is_none());
        let filter = RoomEventFilter::parse(Some(
            r#"{"types":["m.room.message"],"lazy_load_members":true}"#,
        ))
        .unwrap();
        assert!(filter.lazy_load_members);
        assert!(matches!(
            RoomEventFilter::parse(Some("12")),
            Err(Error::InvalidParam(_))
        ));
        assert!(matches!(
            RoomEventFilter::parse(Some("{nope")),
            Err(Error::BadJson(_))
        ));
    }
}
