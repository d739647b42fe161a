//! Server-side room key backup.
//!
//! - `POST /_matrix/client/v3/room_keys/version`
//! - `GET /_matrix/client/v3/room_keys/version[/{version}]`
//! - `PUT`/`DELETE /_matrix/client/v3/room_keys/version/{version}`
//! - `PUT`/`GET`/`DELETE /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]?version=`

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::membership::parse_user;
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path, Query};
use crate::api::AppState;
use crate::services::accounts::Authed;
use crate::services::key_backup::{Scope, SessionKey, VersionInfo};

#[derive(Deserialize)]
pub struct VersionBody {
    algorithm: String,
    auth_data: Value,
    version: Option<String>,
}

#[derive(Deserialize)]
pub struct VersionQuery {
    version: String,
}

fn parse_version(version: &str) -> ApiResult<u64> {
    version
        .parse()
        .map_err(|_| MatrixError::not_found(format!("unknown backup version {version:?}")))
}

fn render(info: VersionInfo) -> Value {
    json!({
        "algorithm": info.record.algorithm,
        "auth_data": info.record.auth_data,
        "count": info.count,
        "etag": info.record.etag.to_string(),
        "version": info.version.to_string(),
    })
}

/// `POST /_matrix/client/v3/room_keys/version`
pub async fn create_version(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<VersionBody>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&authed.user_id.to_string())?;
    let version = state
        .key_backup
        .create_version(&user, &body.algorithm, body.auth_data)
        .await?;
    Ok(Json(json!({ "version": version.to_string() })))
}

/// `GET /_matrix/client/v3/room_keys/version`: the current version.
pub async fn current_version(
    State(state): State<AppState>,
    Auth(authed): Auth,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&authed.user_id.to_string())?;
    let info = state
        .key_backup
        .version(&user, None)?
        .ok_or_else(|| MatrixError::not_found("No current backup version"))?;
    Ok(Json(render(info)))
}

/// `GET /_matrix/client/v3/room_keys/version/{version}`
pub async fn get_version(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(version): Path<String>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&authed.user_id.to_string())?;
    let info = state
        .key_backup
        .version(&user, Some(parse_version(&version)?))?
        .ok_or_else(|| MatrixError::not_found(format!("unknown backup version {version}")))?;
    Ok(Json(render(info)))
}

/// `PUT /_matrix/client/v3/room_keys/version/{version}`
pub async fn update_version(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(version): Path<String>,
    JsonBody(body): JsonBody<VersionBody>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&authed.user_id.to_string())?;
    if body.version.as_ref().is_some_and(|v| *v != version) {
        return Err(MatrixError::invalid_param(
            "the version in the body differs from the path",
        ));
    }
    state
        .key_backup
        .update_version(
            &user,
            parse_version(&version)?,
            &body.algorithm,
            body.auth_data,
        )
        .await?;
    Ok(Json(json!({})))
}

/// `DELETE /_matrix/client/v3/room_keys/version/{version}`
pub async fn delete_version(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(version): Path<String>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&authed.user_id.to_string())?;
    state
        .key_backup
        .delete_version(&user, parse_version(&version)?)
        .await?;
    Ok(Json(json!({})))
}

/// `PUT /_matrix/client/v3/room_keys/keys`
pub async fn put_all(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(query): Query<VersionQuery>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let mut keys = Vec::new();
    for (room, room_keys) in object(&body["rooms"], "rooms")? {
        collect_sessions(room, &room_keys["sessions"], &mut keys)?;
    }
    put(&state, &authed, &query.version, keys).await
}

/// `PUT /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn put_room(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room): Path<String>,
    Query(query): Query<VersionQuery>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let mut keys = Vec::new();
    collect_sessions(&room, &body["sessions"], &mut keys)?;
    put(&state, &authed, &query.version, keys).await
}

/// `PUT /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn put_session(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room, session)): Path<(String, String)>,
    Query(query): Query<VersionQuery>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    put(&state, &authed, &query.version, vec![(room, session, body)]).await
}

fn object<'a>(value: &'a Value, name: &str) -> ApiResult<&'a Map<String, Value>> {
    value
        .as_object()
        .ok_or_else(|| MatrixError::bad_json(format!("{name} must be an object")))
}

fn collect_sessions(room: &str, sessions: &Value, keys: &mut Vec<SessionKey>) -> ApiResult<()> {
    for (session, data) in object(sessions, "sessions")? {
        keys.push((room.to_owned(), session.clone(), data.clone()));
    }
    Ok(())
}

async fn put(
    state: &AppState,
    authed: &Authed,
    version: &str,
    keys: Vec<SessionKey>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&authed.user_id.to_string())?;
    let version = parse_version(version)?;
    let (etag, count) = state.key_backup.put_keys(&user, version, keys).await?;
    Ok(Json(json!({ "etag": etag.to_string(), "count": count })))
}

/// `GET /_matrix/client/v3/room_keys/keys`
pub async fn get_all(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(query): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    let keys = read(&state, &authed, &query.version, Scope::All)?;
    let mut rooms = json!({});
    for (room, session, data) in keys {
        rooms[&room]["sessions"][&session] = data;
    }
    Ok(Json(json!({ "rooms": rooms })))
}

/// `GET /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn get_room(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room): Path<String>,
    Query(query): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    let keys = read(&state, &authed, &query.version, Scope::Room(&room))?;
    let sessions: Map<String, Value> = keys.into_iter().map(|(_, s, d)| (s, d)).collect();
    Ok(Json(json!({ "sessions": sessions })))
}

/// `GET /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn get_session(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room, session)): Path<(String, String)>,
    Query(query): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    let keys = read(
        &state,
        &authed,
        &query.version,
        Scope::Session(&room, &session),
    )?;
    let (_, _, data) = keys
        .into_iter()
        .next()
        .ok_or_else(|| MatrixError::not_found("No backed-up key for this session"))?;
    Ok(Json(data))
}

fn read(
    state: &AppState,
    authed: &Authed,
    version: &str,
    scope: Scope<'_>,
) -> ApiResult<Vec<SessionKey>> {
    let user = parse_user(&authed.user_id.to_string())?;
    let version = parse_version(version)?;
    if state.key_backup.version(&user, Some(version))?.is_none() {
        return Err(MatrixError::not_found(format!(
            "unknown backup version {version}"
        )));
    }
    Ok(state.key_backup.keys(&user, version, scope)?)
}

/// `DELETE /_matrix/client/v3/room_keys/keys`
pub async fn delete_all(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(query): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    delete(&state, &authed, &query.version, Scope::All).await
}

/// `DELETE /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn delete_room(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room): Path<String>,
    Query(query): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    delete(&state, &authed, &query.version, Scope::Room(&room)).await
}

/// `DELETE /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn delete_session(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room, session)): Path<(String, String)>,
    Query(query): Query<VersionQuery>,
) -> ApiResult<Json<Value>> {
    delete(
        &state,
        &authed,
        &query.version,
        Scope::Session(&room, &session),
    )
    .await
}

async fn delete(
    state: &AppState,
    authed: &Authed,
    version: &str,
    scope: Scope<'_>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&authed.user_id.to_string())?;
    let version = parse_version(version)?;
    let (etag, count) = state.key_backup.delete_keys(&user, version, scope).await?;
    Ok(Json(json!({ "etag": etag.to_string(), "count": count })))
}
