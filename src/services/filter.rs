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

    /// Whether the filter lets `pdu` through.
    pub fn matches(&self, pdu: &Pdu) -> bool {
        let kind = pdu.kind.to_string();
        let sender = pdu.sender.as_str();
        if self.not_types.iter().any(|t| type_matches(t, &kind)) {
            return false;
        }
        if let Some(types) = &self.types {
            if !types.iter().any(|t| type_matches(t, &kind)) {
                return false;
            }
        }
        if self.not_senders.iter().any(|s| s == sender) {
            return false;
        }
        if let Some(senders) = &self.senders {
            if !senders.iter().any(|s| s == sender) {
                return false;
            }
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
