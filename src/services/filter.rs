//! Room event filters (the spec's `RoomEventFilter`), as pure functions.

use serde::Deserialize;
use serde_json::Value;

use super::error::{Error, Result};
use crate::events::Pdu;

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
