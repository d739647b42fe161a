//! Profiles.
//!
//! - `GET /_matrix/client/v3/profile/{userId}`
//! - `GET /_matrix/client/v3/profile/{userId}/{keyName}`
//! - `PUT /_matrix/client/v3/profile/{userId}/{keyName}`
//! - `DELETE /_matrix/client/v3/profile/{userId}/{keyName}`

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path};
use crate::api::shared::{local_profile, remote_server};
use crate::api::AppState;
use crate::ids::UserId;
use crate::services::accounts::Authed;
use crate::services::profiles;

/// `GET /_matrix/client/v3/profile/{userId}`: a remote user's profile is
/// asked of their server.
pub async fn get_profile(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    if let Some(server) = user_server(&state, &user_id)? {
        let profile = state
            .federation
            .query_profile(&server, &user_id, None)
            .await?;
        return Ok(Json(profile));
    }
    let profile = local_profile(&state, &user_id)?;
    Ok(Json(Value::Object(profile)))
}

/// `GET /_matrix/client/v3/profile/{userId}/{keyName}`
pub async fn get_field(
    State(state): State<AppState>,
    Path((user_id, key)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    if let Some(server) = user_server(&state, &user_id)? {
        let answer = state
            .federation
            .query_profile(&server, &user_id, Some(&key))
            .await?;
        return match answer.get(&key) {
            Some(value) => Ok(Json(json!({ key: value }))),
            None => Err(MatrixError::not_found("Profile field not found")),
        };
    }
    let profile = local_profile(&state, &user_id)?;
    let value = profile
        .get(&key)
        .ok_or_else(|| MatrixError::not_found("Profile field not found"))?;
    Ok(Json(json!({ key: value })))
}

/// `PUT /_matrix/client/v3/profile/{userId}/{keyName}`
pub async fn set_field(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((user_id, key)): Path<(String, String)>,
    JsonBody(body): JsonBody<serde_json::Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let localpart = own_localpart(&authed, &user_id)?;
    profiles::check_key(&key)?;
    let value = body
        .get(&key)
        .cloned()
        .ok_or_else(|| MatrixError::missing_param(format!("Missing key {key:?} in the body")))?;
    state.set_profile_field(localpart, &key, value).await?;
    Ok(Json(json!({})))
}

/// `DELETE /_matrix/client/v3/profile/{userId}/{keyName}`
pub async fn delete_field(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((user_id, key)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let localpart = own_localpart(&authed, &user_id)?;
    state.delete_profile_field(localpart, &key).await?;
    Ok(Json(json!({})))
}

/// The profile of a local account. Profiles of other servers' users need
/// federation, which this server does not do yet: they are not found.
/// The server of a user of another server.
fn user_server(state: &AppState, user_id: &str) -> ApiResult<Option<ruma::OwnedServerName>> {
    let user = UserId::parse(user_id)
        .ok_or_else(|| MatrixError::invalid_param(format!("{user_id:?} is not a user ID")))?;
    remote_server(state, &user.server_name)
}

/// Users change only their own profile.
fn own_localpart<'a>(authed: &'a Authed, user_id: &str) -> ApiResult<&'a str> {
    if UserId::parse(user_id).as_ref() != Some(&authed.user_id) {
        return Err(MatrixError::forbidden(
            "Cannot change another user's profile",
        ));
    }
    Ok(authed.localpart())
}
