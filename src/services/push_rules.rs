//! Push rules: which events notify a user, highlight, or make a sound.
//!
//! A user's rules are the spec's server-default rules (ruma's predefined
//! set for this server's room versions) with the user's own rules and
//! changes. They are kept as the global account data `m.push_rules`
//! (`{"global": ruleset}`), so clients see changes through `/sync`; what
//! is kept is merged with the current server defaults at every read, so a
//! server upgrade brings new default rules to every account.

use std::sync::Arc;

use ruma::push::{Action, NewPushRule, PushConditionPowerLevelsCtx, RuleKind, Ruleset};
use ruma::{RoomId, UserId};
use serde_json::{json, Value};

use super::error::{Error, Result};
use super::locks::StripedLocks;
use super::rooms::BoundedMemo;
use super::user_data::UserData;

/// The account data type the rules are kept under.
pub const PUSH_RULES: &str = "m.push_rules";

/// Most users whose parsed rules are remembered.
const CACHED_RULESETS: usize = 100_000;
/// Most rooms whose power levels, as the rules read them, are remembered.
const CACHED_ROOM_LEVELS: usize = 16_384;

/// A room's power levels as the push conditions read them (`None`: the
/// room has none the conditions can use).
pub type RoomLevels = Option<PushConditionPowerLevelsCtx>;

/// The rules of every user, read and written through their account data.
pub struct PushRules {
    /// Serialize each user's read-modify-write of their rules.
    locks: StripedLocks,
    /// User ID → the rules as parsed at the stream position of their
    /// account data (0: never changed), so that judging an event does not
    /// parse them again.
    cache: BoundedMemo<String, (u64, Arc<Ruleset>)>,
    /// Room ID → its power levels as read at the room's state group, so
    /// that judging an event for each member reads and parses them once.
    room_levels: BoundedMemo<String, (u64, Arc<RoomLevels>)>,
}

impl Default for PushRules {
    fn default() -> Self {
        PushRules {
            locks: StripedLocks::new(64),
            cache: BoundedMemo::new(CACHED_RULESETS),
            room_levels: BoundedMemo::new(CACHED_ROOM_LEVELS),
        }
    }
}

impl PushRules {
    /// The user's rules, shared: from the cache while their account data
    /// is unchanged.
    /// With the stream position of the account data they were read at.
    pub fn shared(&self, user_data: &UserData, user: &UserId) -> Result<(u64, Arc<Ruleset>)> {
        let version = user_data
            .account_data_version(user, None, PUSH_RULES)?
            .unwrap_or(0);
        if let Some((cached, ruleset)) = self.cache.get(&user.to_string()) {
            if cached == version {
                return Ok((version, ruleset));
            }
        }
        let ruleset = Arc::new(self.ruleset(user_data, user)?);
        self.cache
            .insert(user.to_string(), (version, ruleset.clone()));
        Ok((version, ruleset))
    }

    /// The room's power levels at `state_group` (its current state), from
    /// the memo while the room's state is unchanged, else from `read`.
    pub fn room_levels(
        &self,
        room_id: &RoomId,
        state_group: u64,
        read: impl FnOnce() -> Result<RoomLevels>,
    ) -> Result<Arc<RoomLevels>> {
        if let Some((cached, levels)) = self.room_levels.get(&room_id.to_string()) {
            if cached == state_group {
                return Ok(levels);
            }
        }
        let levels = Arc::new(read()?);
        self.room_levels
            .insert(room_id.to_string(), (state_group, levels.clone()));
        Ok(levels)
    }

    /// The user's rules: the server defaults with the user's changes.
    pub fn ruleset(&self, user_data: &UserData, user: &UserId) -> Result<Ruleset> {
        let stored = user_data.account_data(user, None, PUSH_RULES)?;
        let kept = stored
            .and_then(|content| content.get("global").cloned())
            .and_then(|global| serde_json::from_value::<Ruleset>(global).ok());
        Ok(match kept {
            Some(mut ruleset) => {
                ruleset.update_with_server_default(Ruleset::server_default(user));
                ruleset
            }
            None => Ruleset::server_default(user),
        })
    }

    /// The `m.push_rules` account data content: `{"global": ruleset}`.
    pub fn content(&self, user_data: &UserData, user: &UserId) -> Result<Value> {
        let ruleset = self.ruleset(user_data, user)?;
        Ok(json!({ "global": to_json(&ruleset)? }))
    }

    /// Changes the user's rules with `change` and keeps the result.
    async fn change<T>(
        &self,
        user_data: &UserData,
        user: &UserId,
        change: impl FnOnce(&mut Ruleset) -> Result<T>,
    ) -> Result<T> {
        let _guard = self.locks.lock(user.as_str()).await;
        let mut ruleset = self.ruleset(user_data, user)?;
        let answer = change(&mut ruleset)?;
        let content = json!({ "global": to_json(&ruleset)? });
        user_data
            .set_account_data(user, None, PUSH_RULES, content)
            .await?;
        Ok(answer)
    }

    /// Adds or replaces a rule of the user's, placed `after` or `before`
    /// another of the user's rules of its kind.
    pub async fn insert(
        &self,
        user_data: &UserData,
        user: &UserId,
        rule: NewPushRule,
        after: Option<&str>,
        before: Option<&str>,
    ) -> Result<()> {
        use ruma::push::InsertPushRuleError as Refused;
        self.change(user_data, user, |ruleset| {
            ruleset
                .insert(rule, after, before)
                .map_err(|error| match error {
                    Refused::UnknownRuleId => {
                        Error::NotFound("The before or after rule could not be found".to_owned())
                    }
                    other => Error::InvalidParam(other.to_string()),
                })
        })
        .await
    }

    /// Removes one of the user's rules; server-default rules stay.
    pub async fn remove(
        &self,
        user_data: &UserData,
        user: &UserId,
        kind: RuleKind,
        rule_id: &str,
    ) -> Result<()> {
        use ruma::push::RemovePushRuleError as Refused;
        self.change(user_data, user, |ruleset| {
            ruleset.remove(kind, rule_id).map_err(|error| match error {
                Refused::ServerDefault => {
                    Error::InvalidParam("Server-default rules cannot be deleted".to_owned())
                }
                Refused::NotFound => not_found(),
                _ => Error::NotFound(error.to_string()),
            })
        })
        .await
    }

    pub async fn set_enabled(
        &self,
        user_data: &UserData,
        user: &UserId,
        kind: RuleKind,
        rule_id: &str,
        enabled: bool,
    ) -> Result<()> {
        self.change(user_data, user, |ruleset| {
            ruleset
                .set_enabled(kind, rule_id, enabled)
                .map_err(|_| not_found())
        })
        .await
    }

    pub async fn set_actions(
        &self,
        user_data: &UserData,
        user: &UserId,
        kind: RuleKind,
        rule_id: &str,
        actions: Vec<Action>,
    ) -> Result<()> {
        self.change(user_data, user, |ruleset| {
            ruleset
                .set_actions(kind, rule_id, actions)
                .map_err(|_| not_found())
        })
        .await
    }
}

/// One rule of a ruleset as the API shows it (`rule_id`, `default`,
/// `enabled`, `actions` and `conditions` or `pattern`).
pub fn rule_json(ruleset: &Ruleset, kind: &RuleKind, rule_id: &str) -> Result<Value> {
    let all = to_json(ruleset)?;
    all.get(kind.as_str())
        .and_then(Value::as_array)
        .and_then(|rules| rules.iter().find(|rule| rule["rule_id"] == rule_id))
        .cloned()
        .ok_or_else(not_found)
}

fn to_json(ruleset: &Ruleset) -> Result<Value> {
    serde_json::to_value(ruleset).map_err(|e| Error::Internal(e.to_string()))
}

fn not_found() -> Error {
    Error::NotFound("Push rule not found".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::push::NewSimplePushRule;
    use ruma::{owned_room_id, user_id};

    #[test]
    fn a_rule_shows_as_the_api_shows_it() {
        let user = user_id!("@alice:example.org");
        let mut ruleset = Ruleset::server_default(user);
        let master = rule_json(&ruleset, &RuleKind::Override, ".m.rule.master").unwrap();
        assert_eq!(master["default"], true);
        assert_eq!(master["enabled"], false);
        assert_eq!(master["conditions"], json!([]));
        let room = owned_room_id!("!quiet:example.org");
        let rule = NewPushRule::Room(NewSimplePushRule::new(room.clone(), vec![]));
        ruleset.insert(rule, None, None).unwrap();
        let shown = rule_json(&ruleset, &RuleKind::Room, room.as_str()).unwrap();
        assert_eq!(shown["default"], false);
        assert_eq!(shown["actions"], json!([]));
        assert!(rule_json(&ruleset, &RuleKind::Content, "missing").is_err());
    }
}
