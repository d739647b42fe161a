//! Device keys over federation: `/user/keys/query`, `/user/keys/claim` and
//! `/user/devices/{userId}`, answered for this server's users only.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use ruma::UserId;
use serde_json::{json, Map, Value};

use super::super::error::{ApiResult, MatrixError};
use super::super::extract::{Path, Signed};
use super::super::shared::{local_claim, local_device_keys};
use super::super::AppState;
use crate::services::federation::announce;

/// Most users one request may name.
const MAX_USERS: usize = 1000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/federation/v1/user/keys/query", post(query))
        .route("/_matrix/federation/v1/user/keys/claim", post(claim))
        .route(
            "/_matrix/federation/v1/user/devices/{user_id}",
            get(devices),
        )
}

/// This server's user named by `user_id`, `None` for anyone else's.
fn local_user(state: &AppState, user_id: &str) -> Option<ruma::OwnedUserId> {
    UserId::parse(user_id)
        .ok()
        .filter(|user| user.server_name().as_str() == state.config.server_name)
}

fn users_of<'a>(body: &'a Value, field: &str) -> ApiResult<&'a Map<String, Value>> {
    let users = body[field]
        .as_object()
        .ok_or_else(|| MatrixError::bad_json(format!("{field} must be an object")))?;
    if users.len() > MAX_USERS {
        return Err(MatrixError::invalid_param(format!(
            "at most {MAX_USERS} users"
        )));
    }
    Ok(users)
}

/// `POST /_matrix/federation/v1/user/keys/query`
async fn query(State(state): State<AppState>, signed: Signed) -> ApiResult<Json<Value>> {
    let body: Value = signed.json()?;
    let mut device_keys = Map::new();
    let mut master_keys = Map::new();
    let mut self_signing_keys = Map::new();
    for (user_id, wanted) in users_of(&body, "device_keys")? {
        let Some(user) = local_user(&state, user_id) else {
            continue;
        };
        let wanted: Vec<String> = serde_json::from_value(wanted.clone()).unwrap_or_default();
        device_keys.insert(
            user_id.clone(),
            Value::Object(local_device_keys(&state, &user, &wanted)?),
        );
        if let Some(key) = state.e2ee.cross_signing_key(&user, "master")? {
            master_keys.insert(user_id.clone(), key);
        }
        if let Some(key) = state.e2ee.cross_signing_key(&user, "self_signing")? {
            self_signing_keys.insert(user_id.clone(), key);
        }
    }
    Ok(Json(json!({
        "device_keys": device_keys,
        "master_keys": master_keys,
        "self_signing_keys": self_signing_keys,
    })))
}

/// `POST /_matrix/federation/v1/user/keys/claim`
async fn claim(State(state): State<AppState>, signed: Signed) -> ApiResult<Json<Value>> {
    let body: Value = signed.json()?;
    let mut claimed = Map::new();
    for (user_id, devices) in users_of(&body, "one_time_keys")? {
        let Some(user) = local_user(&state, user_id) else {
            continue;
        };
        let Some(devices) = devices.as_object() else {
            return Err(MatrixError::bad_json(
                "one_time_keys values must be objects",
            ));
        };
        let keys = local_claim(&state, &user, devices).await?;
        if !keys.is_empty() {
            claimed.insert(user_id.clone(), Value::Object(keys));
        }
    }
    Ok(Json(json!({ "one_time_keys": claimed })))
}

/// `GET /_matrix/federation/v1/user/devices/{userId}`
async fn devices(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    _signed: Signed,
) -> ApiResult<Json<Value>> {
    let user = local_user(&state, &user_id)
        .ok_or_else(|| MatrixError::not_found(format!("{user_id} is not a user of this server")))?;
    let keys = local_device_keys(&state, &user, &[])?;
    let mut devices = Vec::new();
    for device in state.accounts.devices(user.localpart())? {
        let mut entry = json!({ "device_id": device.device_id });
        if let Some(keys) = keys.get(&device.device_id) {
            entry["keys"] = keys.clone();
        }
        if let Some(name) = &device.record.display_name {
            entry["device_display_name"] = json!(name);
        }
        devices.push(entry);
    }
    let mut answer = json!({
        "user_id": user,
        "stream_id": announce::announced_stream_id(&state, &user)?,
        "devices": devices,
    });
    if let Some(key) = state.e2ee.cross_signing_key(&user, "master")? {
        answer["master_key"] = key;
    }
    if let Some(key) = state.e2ee.cross_signing_key(&user, "self_signing")? {
        answer["self_signing_key"] = key;
    }
    Ok(Json(answer))
}
