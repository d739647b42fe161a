//! The evaluation of push rules: for one event and one user, which rule
//! applies and what it asks for (notify, highlight, a sound). Pure: the
//! caller gives the user's rules, the event and what the conditions need
//! to know of the room.
//!
//! Every condition of the spec is evaluated (by ruma's implementation):
//! `event_match`, `event_property_is`, `event_property_contains`,
//! `contains_display_name`, `room_member_count` and
//! `sender_notification_permission`; mentions are `event_property_contains`
//! over `content.m\.mentions`.

use futures_util::FutureExt;
use ruma::push::{
    Action, HighlightTweakValue, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset, Tweak,
};
use ruma::serde::Raw;
use ruma::{OwnedRoomId, OwnedUserId, UInt};
use serde_json::Value;
use std::sync::Arc;

/// What the conditions need to know of the room and the user.
#[derive(Clone, Debug)]
pub struct RoomContext {
    pub room_id: OwnedRoomId,
    /// Joined members.
    pub member_count: u64,
    /// The user's display name in the room (their localpart without one).
    pub display_name: String,
    /// The room's power levels, for `sender_notification_permission`
    /// (shared by every member's context).
    pub power_levels: Arc<Option<PushConditionPowerLevelsCtx>>,
}

/// What the rules decided.
#[derive(Clone, Debug, Default)]
pub struct Decision {
    /// The rule that applied, if one did.
    pub rule_id: Option<String>,
    pub notify: bool,
    pub highlight: bool,
    /// The `sound` tweak.
    pub sound: Option<String>,
    /// The rule's actions, for the push gateway's `tweaks`.
    pub actions: Vec<Action>,
}

/// Evaluates `ruleset` (of `user`) for `event`, in the client format
/// (`type`, `sender`, `content`, `state_key`, `room_id`...). Events the user
/// sent never notify them.
pub fn evaluate(
    ruleset: &Ruleset,
    user: &OwnedUserId,
    event: &Value,
    room: &RoomContext,
) -> Decision {
    let Ok(raw) = serde_json::value::to_raw_value(event) else {
        return Decision::default();
    };
    let raw: Raw<Value> = Raw::from_json(raw);
    let mut context = PushConditionRoomCtx::new(
        room.room_id.clone(),
        UInt::new_saturating(room.member_count),
        user.clone(),
        room.display_name.clone(),
    );
    context.power_levels = Option::clone(&room.power_levels);
    // Nothing in the evaluation waits (thread subscriptions, the only
    // asynchronous condition, are not used), so it completes at once.
    let Some(rule) = ruleset.get_match(&raw, &context).now_or_never().flatten() else {
        return Decision::default();
    };
    let actions = rule.actions().to_vec();
    let mut decision = Decision {
        rule_id: Some(rule.rule_id().to_owned()),
        ..Decision::default()
    };
    for action in &actions {
        match action {
            Action::Notify => decision.notify = true,
            Action::SetTweak(Tweak::Highlight(highlight)) => {
                decision.highlight = *highlight == HighlightTweakValue::Yes;
            }
            Action::SetTweak(Tweak::Sound(sound)) => {
                decision.sound = Some(sound.as_str().to_owned())
            }
            _ => {}
        }
    }
    // A highlight without a notification is no highlight (as Synapse counts).
    decision.highlight &= decision.notify;
    decision.actions = actions;
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::events::room::power_levels::{RoomPowerLevels, RoomPowerLevelsSource};
    use ruma::{owned_room_id, owned_user_id, RoomVersionId};
    use serde_json::json;

    fn room(member_count: u64) -> RoomContext {
        let rules = RoomVersionId::V11.rules().unwrap().authorization;
        let levels = RoomPowerLevels::new(
            RoomPowerLevelsSource::Original(
                serde_json::from_value(json!({ "users": { "@mod:x": 50 } })).unwrap(),
            ),
            &rules,
            Vec::<OwnedUserId>::new(),
        );
        RoomContext {
            room_id: owned_room_id!("!room:x"),
            member_count,
            display_name: "Alice Liddell".to_owned(),
            power_levels: Arc::new(Some(levels.into())),
        }
    }

    fn event(kind: &str, sender: &str, content: Value) -> Value {
        json!({
            "type": kind, "sender": sender, "content": content,
            "room_id": "!room:x", "event_id": "$e", "origin_server_ts": 1,
        })
    }

    fn state(kind: &str, sender: &str, key: &str, content: Value) -> Value {
        let mut event = event(kind, sender, content);
        event["state_key"] = json!(key);
        event
    }

    /// A rule, an event it applies to, the room's member count, and what
    /// the rule decides: notify, highlight, sound.
    type Case<'a> = (&'a str, Value, u64, bool, bool, Option<&'a str>);

    /// Every server-default rule, with an event it applies to, and what
    /// it decides: (rule, event, members, notify, highlight, sound).
    #[test]
    fn every_default_rule_decides_as_the_spec_says() {
        let alice = owned_user_id!("@alice:x");
        let text = |body: &str| json!({ "msgtype": "m.text", "body": body });
        let cases: Vec<Case> = vec![
            (
                ".m.rule.suppress_notices",
                event(
                    "m.room.message",
                    "@bot:x",
                    json!({ "msgtype": "m.notice", "body": "beep" }),
                ),
                5,
                false,
                false,
                None,
            ),
            (
                ".m.rule.invite_for_me",
                state(
                    "m.room.member",
                    "@bob:x",
                    "@alice:x",
                    json!({ "membership": "invite" }),
                ),
                5,
                true,
                false,
                Some("default"),
            ),
            (
                ".m.rule.member_event",
                state(
                    "m.room.member",
                    "@bob:x",
                    "@bob:x",
                    json!({ "membership": "join" }),
                ),
                5,
                false,
                false,
                None,
            ),
            (
                ".m.rule.is_user_mention",
                event(
                    "m.room.message",
                    "@bob:x",
                    json!({ "msgtype": "m.text", "body": "hi", "m.mentions": { "user_ids": ["@alice:x"] } }),
                ),
                5,
                true,
                true,
                Some("default"),
            ),
            (
                ".m.rule.is_room_mention",
                event(
                    "m.room.message",
                    "@mod:x",
                    json!({ "msgtype": "m.text", "body": "all", "m.mentions": { "room": true } }),
                ),
                5,
                true,
                true,
                None,
            ),
            (
                ".m.rule.tombstone",
                state(
                    "m.room.tombstone",
                    "@mod:x",
                    "",
                    json!({ "body": "moved", "replacement_room": "!new:x" }),
                ),
                5,
                true,
                true,
                None,
            ),
            (
                ".m.rule.reaction",
                event(
                    "m.reaction",
                    "@bob:x",
                    json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": "$a", "key": "👍" } }),
                ),
                5,
                false,
                false,
                None,
            ),
            (
                ".m.rule.room.server_acl",
                state("m.room.server_acl", "@mod:x", "", json!({ "allow": ["*"] })),
                5,
                false,
                false,
                None,
            ),
            (
                ".m.rule.suppress_edits",
                event(
                    "m.room.message",
                    "@bob:x",
                    json!({ "msgtype": "m.text", "body": "* fixed", "m.relates_to": { "rel_type": "m.replace", "event_id": "$a" } }),
                ),
                5,
                false,
                false,
                None,
            ),
            (
                ".m.rule.call",
                event(
                    "m.call.invite",
                    "@bob:x",
                    json!({ "call_id": "c", "version": "1" }),
                ),
                5,
                true,
                false,
                Some("ring"),
            ),
            (
                ".m.rule.encrypted_room_one_to_one",
                event(
                    "m.room.encrypted",
                    "@bob:x",
                    json!({ "algorithm": "m.megolm.v1.aes-sha2" }),
                ),
                2,
                true,
                false,
                Some("default"),
            ),
            (
                ".m.rule.room_one_to_one",
                event("m.room.message", "@bob:x", text("hello")),
                2,
                true,
                false,
                Some("default"),
            ),
            (
                ".m.rule.message",
                event("m.room.message", "@bob:x", text("hello")),
                5,
                true,
                false,
                None,
            ),
            (
                ".m.rule.encrypted",
                event(
                    "m.room.encrypted",
                    "@bob:x",
                    json!({ "algorithm": "m.megolm.v1.aes-sha2" }),
                ),
                5,
                true,
                false,
                None,
            ),
        ];
        let ruleset = Ruleset::server_default(&alice);
        for (rule, event, members, notify, highlight, sound) in cases {
            let decision = evaluate(&ruleset, &alice, &event, &room(members));
            assert_eq!(decision.rule_id.as_deref(), Some(rule), "{event}");
            assert_eq!(
                (
                    decision.notify,
                    decision.highlight,
                    decision.sound.as_deref()
                ),
                (notify, highlight, sound),
                "{rule}"
            );
        }
    }

    #[test]
    #[allow(deprecated)] // contains_display_name, still a condition of the spec
    fn conditions_depend_on_the_user_the_room_and_the_sender() {
        let alice = owned_user_id!("@alice:x");
        let mut ruleset = Ruleset::server_default(&alice);
        let everyone = event(
            "m.room.message",
            "@bob:x",
            json!({ "msgtype": "m.text", "body": "all", "m.mentions": { "room": true } }),
        );
        // @room needs the sender to have the `room` notification level (50).
        let decision = evaluate(&ruleset, &alice, &everyone, &room(5));
        assert_eq!(decision.rule_id.as_deref(), Some(".m.rule.message"));
        assert!(!decision.highlight);
        // One's own events never notify.
        let own = event(
            "m.room.message",
            "@alice:x",
            json!({ "msgtype": "m.text", "body": "me" }),
        );
        let decision = evaluate(&ruleset, &alice, &own, &room(2));
        assert!(decision.rule_id.is_none() && !decision.notify);
        // The master rule, once enabled, silences everything.
        ruleset
            .set_enabled(ruma::push::RuleKind::Override, ".m.rule.master", true)
            .unwrap();
        let hello = event(
            "m.room.message",
            "@bob:x",
            json!({ "msgtype": "m.text", "body": "hello" }),
        );
        let muted = evaluate(&ruleset, &alice, &hello, &room(2));
        assert_eq!(muted.rule_id.as_deref(), Some(".m.rule.master"));
        assert!(!muted.notify);
        // A user's content rule, and the display name condition.
        let mut ruleset = Ruleset::server_default(&alice);
        let cake = ruma::push::NewPatternedPushRule::new(
            "cake".to_owned(),
            "cake*".to_owned(),
            vec![
                Action::Notify,
                Action::SetTweak(Tweak::Highlight(HighlightTweakValue::Yes)),
            ],
        );
        ruleset
            .insert(ruma::push::NewPushRule::Content(cake), None, None)
            .unwrap();
        let cakes = event(
            "m.room.message",
            "@bob:x",
            json!({ "msgtype": "m.text", "body": "Cakes are ready" }),
        );
        let decision = evaluate(&ruleset, &alice, &cakes, &room(5));
        assert_eq!(decision.rule_id.as_deref(), Some("cake"));
        assert!(decision.notify && decision.highlight);
        let named = ruma::push::NewConditionalPushRule::new(
            "name".to_owned(),
            vec![ruma::push::PushCondition::ContainsDisplayName],
            vec![
                Action::Notify,
                Action::SetTweak(Tweak::Highlight(HighlightTweakValue::Yes)),
            ],
        );
        ruleset
            .insert(ruma::push::NewPushRule::Override(named), None, None)
            .unwrap();
        let called = event(
            "m.room.message",
            "@bob:x",
            json!({ "msgtype": "m.text", "body": "ask Alice Liddell" }),
        );
        assert_eq!(
            evaluate(&ruleset, &alice, &called, &room(5))
                .rule_id
                .as_deref(),
            Some("name")
        );
    }
}
