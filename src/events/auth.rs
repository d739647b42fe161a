//! The authorization rules, applied to every event before it is stored.

use std::sync::Arc;

use ruma::events::{StateEventType, TimelineEventType};
use ruma::room_version_rules::AuthorizationRules;
use ruma::state_res;
use ruma::{EventId, UserId};
use serde_json::value::to_raw_value;

use super::pdu::{NewEvent, Pdu};

/// The state entries (type, state key) whose events authorize `new`.
pub fn auth_types(
    new: &NewEvent,
    sender: &UserId,
    rules: &AuthorizationRules,
) -> Result<Vec<(StateEventType, String)>, String> {
    let content = to_raw_value(&new.content).map_err(|e| e.to_string())?;
    state_res::auth_types_for_event(
        &TimelineEventType::from(new.kind.as_str()),
        sender,
        new.state_key.as_deref(),
        &content,
        rules,
    )
}

/// Checks `pdu` against the room version's rules, given the state before
/// it (`state`) and a way to load the events it names (`fetch`). The error
/// is the rule that failed, worded by ruma.
pub fn check_auth(
    pdu: &Pdu,
    rules: &AuthorizationRules,
    state: impl Fn(&StateEventType, &str) -> Option<Arc<Pdu>>,
    fetch: impl Fn(&EventId) -> Option<Arc<Pdu>>,
) -> Result<(), String> {
    state_res::check_state_independent_auth_rules(rules, pdu, fetch)?;
    state_res::check_state_dependent_auth_rules(rules, pdu, state)
}

#[cfg(test)]
mod tests {
    //! The authorization rules, as a table per room version: a small room
    //! (a creator, a member, an outsider) and the events each may send.

    use std::collections::HashMap;

    use ruma::room_version_rules::RoomVersionRules;
    use ruma::{OwnedEventId, OwnedRoomId, RoomVersionId, UserId};
    use serde_json::{json, Value};

    use super::*;
    use crate::events::{BuildContext, SigningKey};

    const CREATOR: &str = "@creator:example.org";
    const MEMBER: &str = "@member:example.org";
    const OUTSIDER: &str = "@outsider:example.org";

    struct Room {
        version: RoomVersionId,
        rules: RoomVersionRules,
        key: SigningKey,
        room_id: Option<OwnedRoomId>,
        state: HashMap<(String, String), Arc<Pdu>>,
        events: HashMap<OwnedEventId, Arc<Pdu>>,
        last: Vec<OwnedEventId>,
        depth: u64,
    }

    impl Room {
        /// A private room: the creator, and a member who was invited and joined.
        fn new(version: RoomVersionId) -> Room {
            let rules = version.rules().unwrap();
            let room_id = (!rules.authorization.room_create_event_id_as_room_id)
                .then(|| ruma::RoomId::new_v1("example.org".try_into().unwrap()));
            let mut room = Room {
                version,
                rules,
                key: SigningKey::generate("test").unwrap(),
                room_id,
                state: HashMap::new(),
                events: HashMap::new(),
                last: Vec::new(),
                depth: 0,
            };
            let v12 = room.rules.authorization.explicitly_privilege_room_creators;
            let mut create = json!({ "room_version": room.version.as_str() });
            if !room.rules.authorization.use_room_create_sender {
                create["creator"] = json!(CREATOR);
            }
            let users = if v12 {
                json!({})
            } else {
                json!({ CREATOR: 100 })
            };
            let setup = [
                (CREATOR, "m.room.create", "", create),
                (
                    CREATOR,
                    "m.room.member",
                    CREATOR,
                    json!({ "membership": "join" }),
                ),
                (
                    CREATOR,
                    "m.room.power_levels",
                    "",
                    json!({ "users": users, "users_default": 0, "state_default": 50,
                            "events_default": 0, "ban": 50, "kick": 50, "invite": 0, "redact": 50 }),
                ),
                (
                    CREATOR,
                    "m.room.join_rules",
                    "",
                    json!({ "join_rule": "invite" }),
                ),
                (
                    CREATOR,
                    "m.room.member",
                    MEMBER,
                    json!({ "membership": "invite" }),
                ),
                (
                    MEMBER,
                    "m.room.member",
                    MEMBER,
                    json!({ "membership": "join" }),
                ),
            ];
            for (sender, kind, state_key, content) in setup {
                room.apply(sender, kind, Some(state_key), content)
                    .unwrap_or_else(|e| panic!("setup {kind}: {e}"));
            }
            room
        }

        fn build(
            &self,
            sender: &str,
            kind: &str,
            state_key: Option<&str>,
            content: Value,
        ) -> Result<Pdu, String> {
            let sender = UserId::parse(sender).unwrap();
            let new = NewEvent {
                kind: kind.to_owned(),
                content,
                state_key: state_key.map(str::to_owned),
                redacts: None,
            };
            let auth_events: Vec<OwnedEventId> =
                auth_types(&new, &sender, &self.rules.authorization)?
                    .into_iter()
                    .filter_map(|(t, k)| {
                        self.state
                            .get(&(t.to_string(), k))
                            .map(|p| p.event_id.clone())
                    })
                    .collect();
            let ctx = BuildContext {
                room_id: self.room_id.as_deref(),
                version: &self.version,
                rules: &self.rules,
                sender: &sender,
                prev_events: &self.last,
                auth_events: &auth_events,
                depth: self.depth + 1,
                origin_server_ts: 1_700_000_000_000 + self.depth,
                server_name: "example.org",
                key: Some(&self.key),
            };
            Pdu::build(&new, &ctx).map_err(|e| e.to_string())
        }

        fn attempt(
            &self,
            sender: &str,
            kind: &str,
            state_key: Option<&str>,
            content: Value,
        ) -> Result<Pdu, String> {
            let pdu = self.build(sender, kind, state_key, content)?;
            check_auth(
                &pdu,
                &self.rules.authorization,
                |t: &StateEventType, k: &str| {
                    self.state.get(&(t.to_string(), k.to_owned())).cloned()
                },
                |id: &EventId| self.events.get(id).cloned(),
            )?;
            Ok(pdu)
        }

        fn apply(
            &mut self,
            sender: &str,
            kind: &str,
            state_key: Option<&str>,
            content: Value,
        ) -> Result<(), String> {
            let pdu = Arc::new(self.attempt(sender, kind, state_key, content)?);
            self.room_id.get_or_insert_with(|| pdu.room_id.clone());
            if let Some(key) = &pdu.state_key {
                self.state
                    .insert((pdu.kind.to_string(), key.clone()), pdu.clone());
            }
            self.events.insert(pdu.event_id.clone(), pdu.clone());
            self.last = vec![pdu.event_id.clone()];
            self.depth = pdu.depth;
            Ok(())
        }
    }

    /// (sender, type, state key, content, allowed in 10, in 11, in 12)
    type Case = (
        &'static str,
        &'static str,
        Option<&'static str>,
        Value,
        [bool; 3],
    );

    fn cases() -> Vec<Case> {
        let all = [true, true, true];
        let none = [false, false, false];
        vec![
            (MEMBER, "m.room.message", None, json!({ "body": "hi" }), all),
            (
                OUTSIDER,
                "m.room.message",
                None,
                json!({ "body": "hi" }),
                none,
            ),
            (
                MEMBER,
                "m.room.name",
                Some(""),
                json!({ "name": "mine" }),
                none,
            ),
            (
                CREATOR,
                "m.room.name",
                Some(""),
                json!({ "name": "ours" }),
                all,
            ),
            (
                OUTSIDER,
                "m.room.member",
                Some(OUTSIDER),
                json!({ "membership": "join" }),
                none,
            ),
            (
                MEMBER,
                "m.room.member",
                Some(OUTSIDER),
                json!({ "membership": "invite" }),
                all,
            ),
            (
                MEMBER,
                "m.room.member",
                Some(CREATOR),
                json!({ "membership": "leave" }),
                none,
            ),
            (
                CREATOR,
                "m.room.member",
                Some(MEMBER),
                json!({ "membership": "leave" }),
                all,
            ),
            (
                CREATOR,
                "m.room.member",
                Some(OUTSIDER),
                json!({ "membership": "ban" }),
                all,
            ),
            (
                MEMBER,
                "m.room.member",
                Some(MEMBER),
                json!({ "membership": "leave" }),
                all,
            ),
            (
                MEMBER,
                "m.room.member",
                Some(MEMBER),
                json!({ "membership": "ban" }),
                none,
            ),
            (
                OUTSIDER,
                "m.room.member",
                Some(OUTSIDER),
                json!({ "membership": "knock" }),
                none,
            ),
            (
                MEMBER,
                "m.room.power_levels",
                Some(""),
                json!({ "users": { MEMBER: 100 } }),
                none,
            ),
            (
                CREATOR,
                "m.room.create",
                Some(""),
                json!({ "room_version": "10" }),
                none,
            ),
            // Version 12 refuses power levels that list a creator.
            (
                CREATOR,
                "m.room.power_levels",
                Some(""),
                json!({ "users": { CREATOR: 100, MEMBER: 50 } }),
                [true, true, false],
            ),
            // Before 12 the creator may drop their own level; in 12 the
            // creator keeps infinite power without being listed.
            (
                CREATOR,
                "m.room.power_levels",
                Some(""),
                json!({ "users": { MEMBER: 50 } }),
                all,
            ),
            // Nobody but a creator or a 100 may raise someone to 100.
            (
                MEMBER,
                "m.room.power_levels",
                Some(""),
                json!({ "users": { OUTSIDER: 100 } }),
                none,
            ),
        ]
    }

    #[test]
    fn authorization_rules_per_room_version() {
        let versions = [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12];
        for (index, version) in versions.into_iter().enumerate() {
            let room = Room::new(version.clone());
            for (sender, kind, state_key, content, expected) in cases() {
                let outcome = room.attempt(sender, kind, state_key, content.clone());
                assert_eq!(
                    outcome.is_ok(),
                    expected[index],
                    "v{version}: {sender} sending {kind}/{state_key:?} {content}: {:?}",
                    outcome.err()
                );
            }
        }
    }

    #[test]
    fn a_public_room_lets_outsiders_join_but_not_the_banned() {
        for version in [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12] {
            let mut room = Room::new(version);
            let join = json!({ "membership": "join" });
            assert!(room
                .attempt(OUTSIDER, "m.room.member", Some(OUTSIDER), join.clone())
                .is_err());
            room.apply(
                CREATOR,
                "m.room.join_rules",
                Some(""),
                json!({ "join_rule": "public" }),
            )
            .unwrap();
            assert!(room
                .attempt(OUTSIDER, "m.room.member", Some(OUTSIDER), join.clone())
                .is_ok());
            room.apply(
                CREATOR,
                "m.room.member",
                Some(OUTSIDER),
                json!({ "membership": "ban" }),
            )
            .unwrap();
            assert!(room
                .attempt(OUTSIDER, "m.room.member", Some(OUTSIDER), join)
                .is_err());
        }
    }
}
