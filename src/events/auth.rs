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
