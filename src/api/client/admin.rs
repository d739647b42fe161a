//! The admin parts of the client API: `GET /admin/whois/{userId}`, account
//! suspension and locking (`/_matrix/client/v1/admin/suspend|lock/{userId}`),
//! and `GET /_matrix/client/v1/mutual_rooms`.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::membership::parse_user;
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path, Query};
use crate::api::AppState;
use crate::services::accounts::{Authed, Restriction};

/// Whether the caller is a server admin.
pub(crate) fn is_admin(state: &AppState, authed: &Authed) -> ApiResult<bool> {
    Ok(state
        .accounts
        .user(authed.localpart())?
        .is_some_and(|record| record.admin))
}

/// `GET /admin/whois/{userId}`: a user's devices with where and when each
/// was last seen; for the user themselves or an admin.
pub async fn whois(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&user_id)?;
    if user_id != authed.user_id.to_string() && !is_admin(&state, &authed)? {
        return Err(MatrixError::forbidden("You are not a server admin"));
    }
    if user.server_name().as_str() != state.config.server_name
        || state.accounts.user(user.localpart())?.is_none()
    {
        return Err(MatrixError::not_found("No such user"));
    }
    let mut devices = Map::new();
    for device in state.accounts.devices(user.localpart())? {
        let mut connection = json!({});
        if let Some(ip) = &device.record.last_seen_ip {
            connection["ip"] = json!(ip);
        }
        if let Some(ts) = device.record.last_seen_ts {
            connection["last_seen"] = json!(ts);
        }
        devices.insert(
            device.device_id.clone(),
            json!({ "sessions": [{ "connections": [connection] }] }),
        );
    }
    Ok(Json(json!({ "user_id": user, "devices": devices })))
}

/// The local account an admin acts on: the caller must be an admin (checked
/// first, so that others learn nothing of who exists), the user local.
fn admin_target(state: &AppState, authed: &Authed, user_id: &str) -> ApiResult<String> {
    if !is_admin(state, authed)? {
        return Err(MatrixError::forbidden("You are not a server admin"));
    }
    let user = parse_user(user_id)?;
    if user.server_name().as_str() != state.config.server_name {
        return Err(MatrixError::invalid_param(
            "The user is not a user of this server",
        ));
    }
    let exists = state
        .accounts
        .user(user.localpart())?
        .is_some_and(|record| !record.deactivated);
    if !exists {
        return Err(MatrixError::not_found("No such user"));
    }
    Ok(user.localpart().to_owned())
}

/// `GET /_matrix/client/v1/admin/suspend/{userId}`
pub async fn get_suspended(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    get_restriction(&state, &authed, &user_id, Restriction::Suspended)
}

/// `GET /_matrix/client/v1/admin/lock/{userId}`
pub async fn get_locked(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    get_restriction(&state, &authed, &user_id, Restriction::Locked)
}

/// `PUT /_matrix/client/v1/admin/suspend/{userId}` (`{"suspended": bool}`)
pub async fn set_suspended(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    set_restriction(&state, &authed, &user_id, Restriction::Suspended, &body).await
}

/// `PUT /_matrix/client/v1/admin/lock/{userId}` (`{"locked": bool}`)
pub async fn set_locked(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    set_restriction(&state, &authed, &user_id, Restriction::Locked, &body).await
}

/// The field of a restriction in the requests and answers.
fn field_of(restriction: Restriction) -> &'static str {
    match restriction {
        Restriction::Suspended => "suspended",
        Restriction::Locked => "locked",
    }
}

fn get_restriction(
    state: &AppState,
    authed: &Authed,
    user_id: &str,
    restriction: Restriction,
) -> ApiResult<Json<Value>> {
    let localpart = admin_target(state, authed, user_id)?;
    let record = state.accounts.user(&localpart)?;
    let on = record.is_some_and(|r| match restriction {
        Restriction::Suspended => r.suspended,
        Restriction::Locked => r.locked,
    });
    Ok(Json(json!({ field_of(restriction): on })))
}

async fn set_restriction(
    state: &AppState,
    authed: &Authed,
    user_id: &str,
    restriction: Restriction,
    body: &Value,
) -> ApiResult<Json<Value>> {
    let localpart = admin_target(state, authed, user_id)?;
    let field = field_of(restriction);
    let on = body[field]
        .as_bool()
        .ok_or_else(|| MatrixError::bad_json(format!("{field} must be a boolean")))?;
    state
        .accounts
        .set_restriction(&localpart, restriction, on)
        .await?;
    tracing::info!(admin = %authed.user_id, user = %user_id, field, on, "account restriction set");
    Ok(Json(json!({ field: on })))
}

#[derive(Deserialize)]
pub struct MutualRoomsQuery {
    user_id: Option<String>,
    from: Option<String>,
}

/// Rooms in one page of `mutual_rooms`.
const MUTUAL_ROOMS_PAGE: usize = 100;

/// `GET /_matrix/client/v1/mutual_rooms?user_id=`: the rooms both the
/// caller and the user are joined to, a page at a time (`from` is the
/// number of rooms already given).
pub async fn mutual_rooms(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(query): Query<MutualRoomsQuery>,
) -> ApiResult<Json<Value>> {
    let other = query
        .user_id
        .as_deref()
        .ok_or_else(|| MatrixError::invalid_param("user_id is required"))?;
    let other = parse_user(other)?;
    let me = parse_user(&authed.user_id.to_string())?;
    if other == me {
        return Err(MatrixError::invalid_param("user_id cannot be your own"));
    }
    let skip = match &query.from {
        None => 0,
        Some(from) => from
            .parse::<usize>()
            .map_err(|_| MatrixError::invalid_param("unknown from token"))?,
    };
    let theirs: std::collections::BTreeSet<_> = state
        .rooms
        .rooms_of_user(&other, "join")?
        .into_iter()
        .collect();
    let mut mine = state.rooms.rooms_of_user(&me, "join")?;
    mine.sort();
    let shared: Vec<String> = mine
        .into_iter()
        .filter(|room| theirs.contains(room))
        .map(|room| room.to_string())
        .collect();
    let page: Vec<&String> = shared.iter().skip(skip).take(MUTUAL_ROOMS_PAGE).collect();
    let mut answer = json!({ "joined": page });
    if skip + MUTUAL_ROOMS_PAGE < shared.len() {
        answer["next_batch"] = json!((skip + MUTUAL_ROOMS_PAGE).to_string());
    }
    Ok(Json(answer))
}
