//! Push rules.
//!
//! - `GET /pushrules/`, `GET /pushrules/global/`
//! - `GET`/`PUT`/`DELETE /pushrules/global/{kind}/{ruleId}` (`before`,
//!   `after`)
//! - `GET`/`PUT /pushrules/global/{kind}/{ruleId}/enabled`
//! - `GET`/`PUT /pushrules/global/{kind}/{ruleId}/actions`

use axum::extract::State;
use axum::Json;
use ruma::push::{
    Action, NewConditionalPushRule, NewPatternedPushRule, NewPushRule, NewSimplePushRule,
    PushCondition, RuleKind,
};
use ruma::{OwnedRoomId, OwnedUserId};
use serde::Deserialize;
use serde_json::{json, Value};

use super::membership::parse_user;
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path, Query};
use crate::api::AppState;
use crate::services::accounts::Authed;
use crate::services::push_rules::rule_json;

fn user(authed: &Authed) -> ApiResult<OwnedUserId> {
    parse_user(&authed.user_id.to_string())
}

/// `GET /pushrules/`: every rule, under `global`.
pub async fn all(State(state): State<AppState>, Auth(authed): Auth) -> ApiResult<Json<Value>> {
    let user = user(&authed)?;
    Ok(Json(state.push_rules.content(&state.user_data, &user)?))
}

/// `GET /pushrules/global/`: every rule of the global scope.
pub async fn global(State(state): State<AppState>, Auth(authed): Auth) -> ApiResult<Json<Value>> {
    let user = user(&authed)?;
    let content = state.push_rules.content(&state.user_data, &user)?;
    Ok(Json(content["global"].clone()))
}

/// The scope (only `global` exists) and kind of a rule's path.
fn kind(scope: &str, kind: &str) -> ApiResult<RuleKind> {
    if scope != "global" {
        return Err(MatrixError::invalid_param(format!(
            "Unknown push rule scope {scope:?}; only \"global\" exists"
        )));
    }
    match kind {
        "override" => Ok(RuleKind::Override),
        "underride" => Ok(RuleKind::Underride),
        "sender" => Ok(RuleKind::Sender),
        "room" => Ok(RuleKind::Room),
        "content" => Ok(RuleKind::Content),
        other => Err(MatrixError::invalid_param(format!(
            "Unknown push rule kind {other:?}"
        ))),
    }
}

/// `GET /pushrules/global/{kind}/{ruleId}`
pub async fn get_rule(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((scope, kind_name, rule_id)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let kind = kind(&scope, &kind_name)?;
    let ruleset = state
        .push_rules
        .ruleset(&state.user_data, &user(&authed)?)?;
    Ok(Json(rule_json(&ruleset, &kind, &rule_id)?))
}

#[derive(Deserialize, Default)]
pub struct Placement {
    before: Option<String>,
    after: Option<String>,
}

/// `PUT /pushrules/global/{kind}/{ruleId}`: adds or replaces one of the
/// user's rules.
pub async fn put_rule(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((scope, kind_name, rule_id)): Path<(String, String, String)>,
    Query(placement): Query<Placement>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let kind = kind(&scope, &kind_name)?;
    let actions = actions(body.get("actions"))?;
    let rule = match kind {
        RuleKind::Override | RuleKind::Underride => {
            let conditions = conditions(body.get("conditions"))?;
            let rule = NewConditionalPushRule::new(rule_id, conditions, actions);
            if kind == RuleKind::Override {
                NewPushRule::Override(rule)
            } else {
                NewPushRule::Underride(rule)
            }
        }
        RuleKind::Content => {
            let pattern = body
                .get("pattern")
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    MatrixError::invalid_param("A content rule needs a \"pattern\" string")
                })?;
            NewPushRule::Content(NewPatternedPushRule::new(
                rule_id,
                pattern.to_owned(),
                actions,
            ))
        }
        RuleKind::Room => {
            let room = OwnedRoomId::try_from(rule_id.as_str()).map_err(|_| {
                MatrixError::invalid_param("The ID of a room rule must be a room ID")
            })?;
            NewPushRule::Room(NewSimplePushRule::new(room, actions))
        }
        RuleKind::Sender => {
            let sender = OwnedUserId::try_from(rule_id.as_str()).map_err(|_| {
                MatrixError::invalid_param("The ID of a sender rule must be a user ID")
            })?;
            NewPushRule::Sender(NewSimplePushRule::new(sender, actions))
        }
        _ => return Err(MatrixError::invalid_param("Unknown push rule kind")),
    };
    state
        .push_rules
        .insert(
            &state.user_data,
            &user(&authed)?,
            rule,
            placement.after.as_deref(),
            placement.before.as_deref(),
        )
        .await?;
    Ok(Json(json!({})))
}

/// `DELETE /pushrules/global/{kind}/{ruleId}`
pub async fn delete_rule(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((scope, kind_name, rule_id)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let kind = kind(&scope, &kind_name)?;
    state
        .push_rules
        .remove(&state.user_data, &user(&authed)?, kind, &rule_id)
        .await?;
    Ok(Json(json!({})))
}

/// `GET /pushrules/global/{kind}/{ruleId}/enabled`
pub async fn get_enabled(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((scope, kind_name, rule_id)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let kind = kind(&scope, &kind_name)?;
    let ruleset = state
        .push_rules
        .ruleset(&state.user_data, &user(&authed)?)?;
    let rule = rule_json(&ruleset, &kind, &rule_id)?;
    Ok(Json(json!({ "enabled": rule["enabled"] })))
}

/// `PUT /pushrules/global/{kind}/{ruleId}/enabled`
pub async fn put_enabled(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((scope, kind_name, rule_id)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let kind = kind(&scope, &kind_name)?;
    let enabled = body
        .get("enabled")
        .and_then(Value::as_bool)
        .ok_or_else(|| MatrixError::invalid_param("\"enabled\" must be true or false"))?;
    state
        .push_rules
        .set_enabled(&state.user_data, &user(&authed)?, kind, &rule_id, enabled)
        .await?;
    Ok(Json(json!({})))
}

/// `GET /pushrules/global/{kind}/{ruleId}/actions`
pub async fn get_actions(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((scope, kind_name, rule_id)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let kind = kind(&scope, &kind_name)?;
    let ruleset = state
        .push_rules
        .ruleset(&state.user_data, &user(&authed)?)?;
    let rule = rule_json(&ruleset, &kind, &rule_id)?;
    Ok(Json(json!({ "actions": rule["actions"] })))
}

/// `PUT /pushrules/global/{kind}/{ruleId}/actions`
pub async fn put_actions(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((scope, kind_name, rule_id)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let kind = kind(&scope, &kind_name)?;
    let actions = actions(body.get("actions"))?;
    state
        .push_rules
        .set_actions(&state.user_data, &user(&authed)?, kind, &rule_id, actions)
        .await?;
    Ok(Json(json!({})))
}

/// The spec's actions: `notify`, `set_tweak` objects, and the legacy
/// `dont_notify` and `coalesce`, which mean nothing now.
fn actions(value: Option<&Value>) -> ApiResult<Vec<Action>> {
    let list = value
        .and_then(Value::as_array)
        .ok_or_else(|| MatrixError::invalid_param("\"actions\" must be a list"))?;
    for action in list {
        let known = match action {
            Value::String(name) => ["notify", "dont_notify", "coalesce"].contains(&name.as_str()),
            Value::Object(tweak) => tweak.get("set_tweak").is_some_and(Value::is_string),
            _ => false,
        };
        if !known {
            return Err(MatrixError::invalid_param(format!(
                "Unknown push rule action {action}"
            )));
        }
    }
    // The legacy actions do nothing; they are dropped as Synapse does.
    let meaningful: Vec<Value> = list
        .iter()
        .filter(|action| {
            action.as_str() != Some("dont_notify") && action.as_str() != Some("coalesce")
        })
        .cloned()
        .collect();
    serde_json::from_value(Value::Array(meaningful))
        .map_err(|e| MatrixError::invalid_param(format!("Invalid actions: {e}")))
}

/// The conditions of an override or underride rule.
fn conditions(value: Option<&Value>) -> ApiResult<Vec<PushCondition>> {
    let list = value.and_then(Value::as_array).ok_or_else(|| {
        MatrixError::invalid_param("An override or underride rule needs a \"conditions\" list")
    })?;
    for condition in list {
        if !condition.get("kind").is_some_and(Value::is_string) {
            return Err(MatrixError::invalid_param(format!(
                "A push rule condition needs a \"kind\": {condition}"
            )));
        }
    }
    serde_json::from_value(Value::Array(list.clone()))
        .map_err(|e| MatrixError::invalid_param(format!("Invalid conditions: {e}")))
}
