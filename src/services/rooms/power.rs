//! Power levels as the server reads them for its own decisions (who may
//! apply a redaction, delete an alias, publish a room). The authorization
//! rules of each event are ruma's; this only answers "may this user do X".

use serde_json::Value;

/// A room's power levels and creators, read from its current state.
pub struct PowerView {
    levels: Value,
    creators: Vec<String>,
    /// Version 12: creators hold infinite power.
    privileged_creators: bool,
    has_levels_event: bool,
}

impl PowerView {
    pub fn new(
        levels: Option<Value>,
        create: Option<(String, Value)>,
        privileged_creators: bool,
    ) -> Self {
        let mut creators = Vec::new();
        if let Some((sender, content)) = &create {
            creators.push(sender.clone());
            if privileged_creators {
                if let Some(more) = content.get("additional_creators").and_then(Value::as_array) {
                    creators.extend(more.iter().filter_map(|u| u.as_str().map(str::to_owned)));
                }
            }
        }
        PowerView {
            has_levels_event: levels.is_some(),
            levels: levels.unwrap_or(Value::Null),
            creators,
            privileged_creators,
        }
    }

    /// The user's level; `None` stands for the infinite power of a
    /// version 12 creator.
    pub fn user_level(&self, user_id: &str) -> Option<i64> {
        if self.privileged_creators && self.creators.iter().any(|c| c == user_id) {
            return None;
        }
        if !self.has_levels_event {
            // Without a power levels event the creator has 100, others 0.
            let creator = self.creators.first().is_some_and(|c| c == user_id);
            return Some(if creator { 100 } else { 0 });
        }
        let users_default = level(self.levels.get("users_default"), 0);
        Some(level(
            self.levels.get("users").and_then(|u| u.get(user_id)),
            users_default,
        ))
    }

    /// The level needed to send an event of `kind`.
    pub fn event_level(&self, kind: &str, is_state: bool) -> i64 {
        let default = if is_state {
            level(
                self.levels.get("state_default"),
                if self.has_levels_event { 50 } else { 0 },
            )
        } else {
            level(self.levels.get("events_default"), 0)
        };
        level(self.levels.get("events").and_then(|e| e.get(kind)), default)
    }

    /// The level of an action: `redact`, `kick`, `ban` or `invite`.
    pub fn action_level(&self, action: &str) -> i64 {
        let default = if action == "invite" { 0 } else { 50 };
        level(self.levels.get(action), default)
    }

    /// Whether the user reaches `needed`.
    pub fn reaches(&self, user_id: &str, needed: i64) -> bool {
        self.user_level(user_id).is_none_or(|l| l >= needed)
    }
}

/// A power level value: an integer, or (in old rooms) a string of one.
fn level(value: Option<&Value>, default: i64) -> i64 {
    value
        .and_then(|v| v.as_i64().or_else(|| v.as_str()?.trim().parse().ok()))
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn levels_follow_the_event_and_its_defaults() {
        let levels = json!({
            "users": { "@mod:x": 50, "@old:x": "75" },
            "users_default": 10,
            "events": { "m.room.name": 60 },
            "state_default": 40,
            "redact": 30,
        });
        let view = PowerView::new(Some(levels), Some(("@c:x".into(), json!({}))), false);
        assert_eq!(view.user_level("@mod:x"), Some(50));
        assert_eq!(view.user_level("@old:x"), Some(75));
        assert_eq!(view.user_level("@any:x"), Some(10));
        assert_eq!(view.event_level("m.room.name", true), 60);
        assert_eq!(view.event_level("m.room.topic", true), 40);
        assert_eq!(view.event_level("m.room.message", false), 0);
        assert_eq!(view.action_level("redact"), 30);
        assert_eq!(view.action_level("kick"), 50);
        assert!(view.reaches("@mod:x", 30) && !view.reaches("@any:x", 30));
    }

    #[test]
    fn version_12_creators_are_above_every_level() {
        let create = (
            "@c:x".to_owned(),
            json!({ "additional_creators": ["@d:x"] }),
        );
        let view = PowerView::new(Some(json!({ "users_default": 0 })), Some(create), true);
        assert_eq!(view.user_level("@c:x"), None);
        assert_eq!(view.user_level("@d:x"), None);
        assert!(view.reaches("@d:x", i64::MAX));
        let create = ("@c:x".to_owned(), json!({}));
        let old = PowerView::new(None, Some(create), false);
        assert_eq!(old.user_level("@c:x"), Some(100));
        assert_eq!(old.user_level("@e:x"), Some(0));
    }
}
