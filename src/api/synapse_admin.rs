//! The Synapse admin API subset (`/_synapse/admin`), so that the admin
//! tools people already use (synapse-admin, scripts, Complement) work.
//! Every endpoint but `server_version` and shared-secret registration is
//! for server admins only; each request is logged with the admin's ID.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{json, Value};

use super::client::membership::{enter_room, parse_room, parse_user, resolve_target};
use super::error::{ApiResult, MatrixError};
use super::extract::{Auth, JsonBody, Path, Query};
use super::AppState;
use crate::services::accounts::Authed;
use crate::services::admin::{DeleteRoom, RoomDeletion, SecretRegistration};
use crate::storage::tables::UserRecord;

/// Most entries in one page of a list, whatever `limit` asks.
const MAX_PAGE: usize = 1_000;

/// The admin API's routes.
pub fn routes() -> Router<AppState> {
    let v1 = |path: &str| format!("/_synapse/admin/v1{path}");
    let v2 = |path: &str| format!("/_synapse/admin/v2{path}");
    Router::new()
        .route(&v1("/server_version"), get(server_version))
        .route(&v1("/register"), get(register_nonce).post(register))
        .route(&v2("/users"), get(list_users))
        .route(&v2("/users/{user_id}"), get(query_user).put(put_user))
        .route(&v1("/deactivate/{user_id}"), post(deactivate))
        .route(&v1("/reset_password/{user_id}"), post(reset_password))
        .route(&v2("/users/{user_id}/devices"), get(list_devices))
        .route(&v2("/users/{user_id}/delete_devices"), post(delete_devices))
        .route(
            &v2("/users/{user_id}/devices/{device_id}"),
            get(query_device).delete(delete_device),
        )
        .route(&v1("/whois/{user_id}"), get(super::client::admin::whois))
        .route(&v1("/users/{user_id}/media"), get(user_media))
        .route(
            &v1("/media/{server_name}/{media_id}"),
            axum::routing::delete(delete_media),
        )
        .route(
            &v1("/media/quarantine/{server_name}/{media_id}"),
            post(quarantine_media),
        )
        .route(
            &v1("/media/unquarantine/{server_name}/{media_id}"),
            post(unquarantine_media),
        )
        .route(&v1("/rooms"), get(list_rooms))
        .route(
            &v1("/rooms/{room_id}"),
            get(room_details).delete(delete_room_v1),
        )
        .route(&v1("/rooms/{room_id}/members"), get(room_members))
        .route(&v1("/rooms/{room_id}/state"), get(room_state))
        .route(
            &v2("/rooms/{room_id}"),
            axum::routing::delete(delete_room_v2),
        )
        .route(
            &v2("/rooms/{room_id}/delete_status"),
            get(room_delete_status),
        )
        .route(&v2("/rooms/delete_status/{delete_id}"), get(delete_status))
        .route(&v1("/join/{room}"), post(join))
        .route(&v1("/send_server_notice"), post(server_notice))
        .route(&v1("/send_server_notice/{txn_id}"), put(server_notice_txn))
}

/// A request by a server admin; anyone else gets 403 `M_FORBIDDEN`.
/// The request is logged with the admin's ID.
pub struct Admin(pub Authed);

impl FromRequestParts<AppState> for Admin {
    type Rejection = MatrixError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Auth(authed) = Auth::from_request_parts(parts, state).await?;
        if !super::client::admin::is_admin(state, &authed)? {
            return Err(MatrixError::forbidden("You are not a server admin"));
        }
        tracing::info!(
            admin = %authed.user_id,
            method = %parts.method,
            path = parts.uri.path(),
            "admin request"
        );
        Ok(Admin(authed))
    }
}

/// `GET /_synapse/admin/v1/server_version`
async fn server_version() -> Json<Value> {
    Json(json!({ "server_version": env!("CARGO_PKG_VERSION") }))
}

/// `GET /_synapse/admin/v1/register`: a nonce for one registration.
async fn register_nonce(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    if state.config.registration_shared_secret.is_none() {
        return Err(MatrixError::invalid_param(
            "Shared secret registration is not enabled",
        ));
    }
    Ok(Json(json!({ "nonce": state.registration_nonce() })))
}

#[derive(Deserialize)]
struct RegisterBody {
    nonce: String,
    username: String,
    password: String,
    #[serde(default)]
    admin: bool,
    user_type: Option<String>,
    displayname: Option<String>,
    mac: String,
}

/// `POST /_synapse/admin/v1/register`: an account made by whoever knows
/// the shared secret.
async fn register(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<RegisterBody>,
) -> ApiResult<Json<Value>> {
    let login = state
        .register_with_secret(SecretRegistration {
            nonce: &body.nonce,
            username: &body.username,
            password: &body.password,
            admin: body.admin,
            user_type: body.user_type.as_deref(),
            displayname: body.displayname.as_deref(),
            mac: &body.mac,
        })
        .await?;
    tracing::info!(user_id = %login.user_id, admin = body.admin, "registered with the shared secret");
    Ok(Json(json!({
        "user_id": login.user_id.to_string(),
        "access_token": login.access_token,
        "device_id": login.device_id,
        "home_server": state.config.server_name,
    })))
}

/// Paging and filters of the admin lists.
#[derive(Deserialize, Default)]
struct ListQuery {
    from: Option<String>,
    limit: Option<String>,
    dir: Option<String>,
    order_by: Option<String>,
    /// Users: a part of the user ID.
    user_id: Option<String>,
    /// Users: a part of the user ID or display name.
    name: Option<String>,
    guests: Option<String>,
    deactivated: Option<String>,
    admins: Option<String>,
    /// Rooms: a part of the name, canonical alias or room ID.
    search_term: Option<String>,
}

impl ListQuery {
    /// (offset, page size), checked.
    fn page(&self) -> ApiResult<(usize, usize)> {
        let number = |name: &str, value: &Option<String>, default: usize| match value {
            None => Ok(default),
            Some(text) => text.parse::<usize>().map_err(|_| {
                MatrixError::invalid_param(format!("{name} must be a non-negative integer"))
            }),
        };
        let from = number("from", &self.from, 0)?;
        let limit = number("limit", &self.limit, 100)?.min(MAX_PAGE);
        Ok((from, limit))
    }

    fn backwards(&self) -> ApiResult<bool> {
        match self.dir.as_deref() {
            None | Some("f") => Ok(false),
            Some("b") => Ok(true),
            Some(_) => Err(MatrixError::invalid_param("dir must be f or b")),
        }
    }
}

/// A query flag: `true` or `false`.
fn flag(name: &str, value: &Option<String>) -> ApiResult<Option<bool>> {
    match value.as_deref() {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(MatrixError::invalid_param(format!(
            "{name} must be true or false"
        ))),
    }
}

/// The page `from..from+limit` of `items` (in the order asked), with the
/// next page's `from` when there is one.
fn page_of<T>(
    mut items: Vec<T>,
    from: usize,
    limit: usize,
    backwards: bool,
) -> (Vec<T>, Option<usize>) {
    if backwards {
        items.reverse();
    }
    let total = items.len();
    let page: Vec<T> = items.into_iter().skip(from).take(limit).collect();
    let next = (from + page.len() < total && !page.is_empty()).then_some(from + page.len());
    (page, next)
}

/// A local user of a path: 400 for another server's user.
fn local_user(state: &AppState, user_id: &str) -> ApiResult<OwnedUserId> {
    let user = parse_user(user_id)?;
    if user.server_name().as_str() != state.config.server_name {
        return Err(MatrixError::invalid_param(
            "Only local users can be administered",
        ));
    }
    Ok(user)
}

/// A user as the admin API shows it.
fn user_json(state: &AppState, localpart: &str, record: &UserRecord) -> ApiResult<Value> {
    let user_id = state.accounts.user_id(localpart).to_string();
    let profile = state.profiles.profile(localpart)?.unwrap_or_default();
    let last_seen = state
        .accounts
        .devices(localpart)?
        .iter()
        .filter_map(|d| d.record.last_seen_ts)
        .max();
    Ok(json!({
        "name": user_id,
        "displayname": profile.get("displayname").cloned().unwrap_or(Value::Null),
        "avatar_url": profile.get("avatar_url").cloned().unwrap_or(Value::Null),
        "threepids": state.threepids.of_user(localpart)?,
        "external_ids": [],
        "is_guest": false,
        "admin": record.admin,
        "deactivated": record.deactivated,
        "erased": state.rooms.is_erased(&user_id),
        "shadow_banned": false,
        "locked": record.locked,
        "suspended": record.suspended,
        "creation_ts": record.created_ts,
        "appservice_id": Value::Null,
        "user_type": Value::Null,
        "approved": true,
        "last_seen_ts": last_seen,
    }))
}

/// `GET /_synapse/admin/v2/users`: local users, a page at a time, by name
/// (or `order_by` `displayname`, `creation_ts`, `admin`, `deactivated`).
async fn list_users(
    State(state): State<AppState>,
    Admin(_): Admin,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let (from, limit) = query.page()?;
    let backwards = query.backwards()?;
    let deactivated = flag("deactivated", &query.deactivated)?.unwrap_or(false);
    let admins = flag("admins", &query.admins)?;
    let guests = flag("guests", &query.guests)?.unwrap_or(true);
    let _ = guests; // Myelin has no guest accounts: every user passes.
    let mut users = Vec::new();
    for (localpart, record) in state.accounts.all()? {
        if record.deactivated && !deactivated {
            continue;
        }
        if admins.is_some_and(|wanted| wanted != record.admin) {
            continue;
        }
        let user = user_json(&state, &localpart, &record)?;
        let user_id = user["name"].as_str().unwrap_or_default();
        let has = |text: &str, part: &str| text.to_lowercase().contains(&part.to_lowercase());
        if let Some(part) = &query.user_id {
            if !has(user_id, part) {
                continue;
            }
        }
        if let Some(part) = &query.name {
            let display = user["displayname"].as_str().unwrap_or_default();
            if !has(user_id, part) && !has(display, part) {
                continue;
            }
        }
        users.push(user);
    }
    let order = query.order_by.as_deref().unwrap_or("name");
    let sort_key = |user: &Value| -> (String, String) {
        let name = user["name"].as_str().unwrap_or_default().to_owned();
        let by = match order {
            "displayname" => user["displayname"].as_str().unwrap_or_default().to_owned(),
            "creation_ts" => format!("{:020}", user["creation_ts"].as_u64().unwrap_or(0)),
            "admin" => user["admin"].to_string(),
            "deactivated" => user["deactivated"].to_string(),
            _ => name.clone(),
        };
        (by, name)
    };
    if !matches!(
        order,
        "name" | "displayname" | "creation_ts" | "admin" | "deactivated"
    ) {
        return Err(MatrixError::invalid_param(format!(
            "Unknown value for order_by: {order}"
        )));
    }
    users.sort_by_cached_key(sort_key);
    let total = users.len();
    let (page, next) = page_of(users, from, limit, backwards);
    let mut answer = json!({ "users": page, "total": total });
    if let Some(next) = next {
        answer["next_token"] = json!(next.to_string());
    }
    Ok(Json(answer))
}

/// `GET /_synapse/admin/v2/users/{userId}`
async fn query_user(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let user = local_user(&state, &user_id)?;
    let record = state
        .accounts
        .user(user.localpart())?
        .ok_or_else(|| MatrixError::not_found("User not found"))?;
    Ok(Json(user_json(&state, user.localpart(), &record)?))
}

#[derive(Deserialize)]
struct PutUserBody {
    password: Option<String>,
    #[serde(default = "yes")]
    logout_devices: bool,
    displayname: Option<String>,
    avatar_url: Option<String>,
    admin: Option<bool>,
    deactivated: Option<bool>,
    locked: Option<bool>,
    user_type: Option<String>,
}

fn yes() -> bool {
    true
}

/// `PUT /_synapse/admin/v2/users/{userId}`: makes the account (201) or
/// changes it (200): password, display name, avatar, admin, deactivated,
/// locked.
async fn put_user(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<PutUserBody>,
) -> ApiResult<impl IntoResponse> {
    let user = local_user(&state, &user_id)?;
    let localpart = user.localpart();
    if body.user_type.is_some() {
        return Err(MatrixError::invalid_param("Myelin has no user types"));
    }
    let existing = state.accounts.user(localpart)?;
    let created = existing.is_none();
    if created {
        state
            .accounts
            .register(
                localpart,
                body.password.as_deref(),
                body.admin.unwrap_or(false),
                None,
            )
            .await?;
    } else if let Some(record) = &existing {
        if body.deactivated == Some(false) && record.deactivated {
            let password = body.password.as_deref().ok_or_else(|| {
                MatrixError::invalid_param("Reactivating a user needs a password")
            })?;
            state.accounts.reactivate(localpart, password).await?;
            state.rooms.unerase_user(&user).await?;
        } else if let Some(password) = &body.password {
            state
                .accounts
                .set_password(localpart, password, body.logout_devices, None)
                .await?;
        }
        if let Some(wanted) = body.admin {
            if user == admin.user_id.to_string().as_str() && !wanted {
                return Err(MatrixError::invalid_param("You may not demote yourself"));
            }
            state.accounts.set_admin(localpart, wanted).await?;
        }
    }
    if body.deactivated == Some(true)
        && !state
            .accounts
            .user(localpart)?
            .is_some_and(|r| r.deactivated)
    {
        state.deactivate_account(localpart, None, None).await?;
    }
    if let Some(name) = &body.displayname {
        state
            .set_profile_field(localpart, "displayname", json!(name))
            .await?;
    }
    if let Some(url) = &body.avatar_url {
        state
            .set_profile_field(localpart, "avatar_url", json!(url))
            .await?;
    }
    if let Some(locked) = body.locked {
        state
            .accounts
            .set_restriction(
                localpart,
                crate::services::accounts::Restriction::Locked,
                locked,
            )
            .await?;
    }
    let record = state
        .accounts
        .user(localpart)?
        .ok_or_else(|| MatrixError::not_found("User not found"))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(user_json(&state, localpart, &record)?)))
}

#[derive(Deserialize, Default)]
struct DeactivateBody {
    #[serde(default)]
    erase: bool,
}

/// `POST /_synapse/admin/v1/deactivate/{userId}` (`erase`: the user's
/// events are hidden from those who were not in the room then).
async fn deactivate(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(user_id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let user = local_user(&state, &user_id)?;
    // An empty body is no erase, as Synapse takes it.
    let erase = if body.is_empty() {
        false
    } else {
        serde_json::from_slice::<DeactivateBody>(&body)
            .map_err(|e| MatrixError::bad_json(e.to_string()))?
            .erase
    };
    if state.accounts.user(user.localpart())?.is_none() {
        return Err(MatrixError::not_found("User not found"));
    }
    let by = admin.user_id.to_string();
    let unbind = state
        .deactivate_account(user.localpart(), None, erase.then_some(by.as_str()))
        .await?;
    Ok(Json(json!({ "id_server_unbind_result": unbind })))
}

#[derive(Deserialize)]
struct ResetPasswordBody {
    new_password: String,
    #[serde(default = "yes")]
    logout_devices: bool,
}

/// `POST /_synapse/admin/v1/reset_password/{userId}`
async fn reset_password(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<ResetPasswordBody>,
) -> ApiResult<Json<Value>> {
    let user = local_user(&state, &user_id)?;
    state
        .accounts
        .set_password(
            user.localpart(),
            &body.new_password,
            body.logout_devices,
            None,
        )
        .await?;
    Ok(Json(json!({})))
}

fn device_json(
    user: &UserId,
    device_id: &str,
    record: &crate::storage::tables::DeviceRecord,
) -> Value {
    json!({
        "device_id": device_id,
        "display_name": record.display_name,
        "last_seen_ip": record.last_seen_ip,
        "last_seen_ts": record.last_seen_ts,
        "last_seen_user_agent": Value::Null,
        "user_id": user,
    })
}

/// The local, existing user of a path.
fn existing_user(state: &AppState, user_id: &str) -> ApiResult<OwnedUserId> {
    let user = local_user(state, user_id)?;
    if state.accounts.user(user.localpart())?.is_none() {
        return Err(MatrixError::not_found("User not found"));
    }
    Ok(user)
}

/// `GET /_synapse/admin/v2/users/{userId}/devices`
async fn list_devices(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let user = existing_user(&state, &user_id)?;
    let devices: Vec<Value> = state
        .accounts
        .devices(user.localpart())?
        .iter()
        .map(|d| device_json(&user, &d.device_id, &d.record))
        .collect();
    Ok(Json(json!({ "total": devices.len(), "devices": devices })))
}

/// `GET /_synapse/admin/v2/users/{userId}/devices/{deviceId}`
async fn query_device(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path((user_id, device_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = existing_user(&state, &user_id)?;
    let record = state
        .accounts
        .device(user.localpart(), &device_id)?
        .ok_or_else(|| MatrixError::not_found("Device not found"))?;
    Ok(Json(device_json(&user, &device_id, &record)))
}

/// `DELETE /_synapse/admin/v2/users/{userId}/devices/{deviceId}`; an
/// unknown device is no error.
async fn delete_device(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path((user_id, device_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = existing_user(&state, &user_id)?;
    state
        .accounts
        .delete_devices(user.localpart(), &[device_id])
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct DeleteDevicesBody {
    devices: Vec<String>,
}

/// `POST /_synapse/admin/v2/users/{userId}/delete_devices`
async fn delete_devices(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<DeleteDevicesBody>,
) -> ApiResult<Json<Value>> {
    let user = existing_user(&state, &user_id)?;
    state
        .accounts
        .delete_devices(user.localpart(), &body.devices)
        .await?;
    Ok(Json(json!({})))
}

/// `GET /_synapse/admin/v1/users/{userId}/media`: what the user uploaded,
/// newest first by default (`order_by` `created_ts`, `media_length`,
/// `upload_name`).
async fn user_media(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(user_id): Path<String>,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let user = existing_user(&state, &user_id)?;
    let (from, limit) = query.page()?;
    let mut media = state.media.of_uploader(user.as_str())?;
    match query.order_by.as_deref().unwrap_or("created_ts") {
        "created_ts" => media.sort_by_key(|(_, r)| r.created_ts),
        "media_length" => media.sort_by_key(|(_, r)| r.size),
        "upload_name" => media.sort_by(|a, b| a.1.filename.cmp(&b.1.filename)),
        "media_id" => media.sort_by(|a, b| a.0.cmp(&b.0)),
        other => {
            return Err(MatrixError::invalid_param(format!(
                "Unknown value for order_by: {other}"
            )))
        }
    }
    // With neither order nor direction asked, newest first (as Synapse).
    let backwards = if query.order_by.is_none() && query.dir.is_none() {
        true
    } else {
        query.backwards()?
    };
    let total = media.len();
    let (page, next) = page_of(media, from, limit, backwards);
    let page: Vec<Value> = page
        .into_iter()
        .map(|(media_id, record)| {
            json!({
                "media_id": media_id,
                "media_type": record.content_type,
                "media_length": record.size,
                "upload_name": record.filename,
                "created_ts": record.created_ts,
                "last_access_ts": Value::Null,
                "quarantined_by": record.quarantined_by,
                "safe_from_quarantine": false,
            })
        })
        .collect();
    let mut answer = json!({ "media": page, "total": total });
    if let Some(next) = next {
        answer["next_token"] = json!(next);
    }
    Ok(Json(answer))
}

/// `DELETE /_synapse/admin/v1/media/{serverName}/{mediaId}` (local media).
async fn delete_media(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path((server_name, media_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    if server_name != state.config.server_name {
        return Err(MatrixError::invalid_param("Can only delete local media"));
    }
    if !state.media.delete(&server_name, &media_id).await? {
        return Err(MatrixError::not_found("Unknown media"));
    }
    Ok(Json(json!({ "deleted_media": [media_id], "total": 1 })))
}

/// `POST /_synapse/admin/v1/media/quarantine/{serverName}/{mediaId}`
async fn quarantine_media(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path((server_name, media_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let by = admin.user_id.to_string();
    if !state
        .media
        .set_quarantine(&server_name, &media_id, Some(&by))
        .await?
    {
        return Err(MatrixError::not_found("Unknown media"));
    }
    Ok(Json(json!({})))
}

/// `POST /_synapse/admin/v1/media/unquarantine/{serverName}/{mediaId}`
async fn unquarantine_media(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path((server_name, media_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    if !state
        .media
        .set_quarantine(&server_name, &media_id, None)
        .await?
    {
        return Err(MatrixError::not_found("Unknown media"));
    }
    Ok(Json(json!({})))
}

/// A room as the admin room list shows it.
fn room_json(state: &AppState, room_id: &RoomId) -> ApiResult<Option<Value>> {
    let Some(record) = state.rooms.room(room_id)? else {
        return Ok(None);
    };
    let mut answer = json!({
        "room_id": room_id,
        "name": null,
        "canonical_alias": null,
        "topic": null,
        "avatar": null,
        "joined_members": record.joined_members,
        "version": record.version,
        "creator": null,
        "encryption": null,
        "federatable": true,
        "public": state.directory.is_public(room_id)?,
        "join_rules": null,
        "guest_access": null,
        "history_visibility": null,
        "room_type": null,
    });
    let suffix = format!(":{}", state.config.server_name);
    let mut local_members = 0;
    let mut state_events = 0;
    for event in state.rooms.current_state(room_id, None)? {
        state_events += 1;
        let content = event.content_value();
        match event.kind.to_string().as_str() {
            "m.room.create" => {
                answer["creator"] = json!(content
                    .get("creator")
                    .cloned()
                    .unwrap_or_else(|| json!(event.sender)));
                answer["federatable"] = json!(content["m.federate"].as_bool().unwrap_or(true));
                answer["room_type"] = content.get("type").cloned().unwrap_or(Value::Null);
            }
            "m.room.name" => answer["name"] = content["name"].clone(),
            "m.room.topic" => answer["topic"] = content["topic"].clone(),
            "m.room.avatar" => answer["avatar"] = content["url"].clone(),
            "m.room.canonical_alias" => answer["canonical_alias"] = content["alias"].clone(),
            "m.room.encryption" => answer["encryption"] = content["algorithm"].clone(),
            "m.room.join_rules" => answer["join_rules"] = content["join_rule"].clone(),
            "m.room.guest_access" => answer["guest_access"] = content["guest_access"].clone(),
            "m.room.history_visibility" => {
                answer["history_visibility"] = content["history_visibility"].clone()
            }
            "m.room.member" => {
                let local = event
                    .state_key
                    .as_deref()
                    .is_some_and(|k| k.ends_with(&suffix));
                if local && content["membership"] == "join" {
                    local_members += 1;
                }
            }
            _ => {}
        }
    }
    answer["joined_local_members"] = json!(local_members);
    answer["state_events"] = json!(state_events);
    Ok(Some(answer))
}

/// `GET /_synapse/admin/v1/rooms`: the rooms this server knows, a page at
/// a time, by name (or `order_by` `joined_members`, `joined_local_members`,
/// `state_events`, `version`, `canonical_alias`, `creator`).
async fn list_rooms(
    State(state): State<AppState>,
    Admin(_): Admin,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let (from, limit) = query.page()?;
    let backwards = query.backwards()?;
    let order = query.order_by.as_deref().unwrap_or("name").to_owned();
    let numeric = matches!(
        order.as_str(),
        "joined_members" | "joined_local_members" | "state_events"
    );
    let textual = matches!(
        order.as_str(),
        "name" | "canonical_alias" | "creator" | "version" | "join_rules" | "history_visibility"
    );
    if !numeric && !textual {
        return Err(MatrixError::invalid_param(format!(
            "Unknown value for order_by: {order}"
        )));
    }
    let mut rooms = Vec::new();
    for room_id in state.rooms.room_ids()? {
        let Some(room) = room_json(&state, &room_id)? else {
            continue;
        };
        if let Some(term) = &query.search_term {
            let term = term.to_lowercase();
            let hit = ["name", "canonical_alias", "room_id"].iter().any(|field| {
                room[*field]
                    .as_str()
                    .is_some_and(|text| text.to_lowercase().contains(&term))
            });
            if !hit {
                continue;
            }
        }
        rooms.push(room);
    }
    // Numbers go largest first, as Synapse lists them.
    rooms.sort_by(|a, b| {
        let by = if numeric {
            b[&order].as_u64().cmp(&a[&order].as_u64())
        } else {
            a[&order]
                .as_str()
                .unwrap_or("")
                .cmp(b[&order].as_str().unwrap_or(""))
        };
        by.then_with(|| a["room_id"].as_str().cmp(&b["room_id"].as_str()))
    });
    let total = rooms.len();
    let (page, next) = page_of(rooms, from, limit, backwards);
    let mut answer = json!({ "rooms": page, "offset": from, "total_rooms": total });
    if let Some(next) = next {
        answer["next_batch"] = json!(next);
    }
    if from > 0 {
        answer["prev_batch"] = json!(from.saturating_sub(limit));
    }
    Ok(Json(answer))
}

/// A room this server knows, from a path.
fn known_room(state: &AppState, room_id: &str) -> ApiResult<OwnedRoomId> {
    let room_id = parse_room(room_id)?;
    if state.rooms.room(&room_id)?.is_none() {
        return Err(MatrixError::not_found("Room not found"));
    }
    Ok(room_id)
}

/// `GET /_synapse/admin/v1/rooms/{roomId}`
async fn room_details(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room_id = known_room(&state, &room_id)?;
    let mut room =
        room_json(&state, &room_id)?.ok_or_else(|| MatrixError::not_found("Room not found"))?;
    let mut devices = 0;
    for user in state.rooms.local_members(&room_id, &["join"])? {
        devices += state.accounts.devices(user.localpart())?.len();
    }
    room["joined_local_devices"] = json!(devices);
    room["forgotten"] = json!(false);
    Ok(Json(room))
}

/// `GET /_synapse/admin/v1/rooms/{roomId}/members`: joined members.
async fn room_members(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room_id = known_room(&state, &room_id)?;
    let members: Vec<String> = state
        .rooms
        .current_state(&room_id, Some("m.room.member"))?
        .iter()
        .filter(|event| event.content_value()["membership"] == "join")
        .filter_map(|event| event.state_key.clone())
        .collect();
    Ok(Json(json!({ "total": members.len(), "members": members })))
}

/// `GET /_synapse/admin/v1/rooms/{roomId}/state`: the current state.
async fn room_state(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room_id = known_room(&state, &room_id)?;
    let events: Vec<Value> = state
        .rooms
        .current_state(&room_id, None)?
        .iter()
        .map(|event| event.client_event())
        .collect();
    Ok(Json(json!({ "state": events })))
}

#[derive(Deserialize)]
struct DeleteRoomBody {
    #[serde(default)]
    block: bool,
    #[serde(default = "yes")]
    purge: bool,
    #[serde(default)]
    force_purge: bool,
    new_room_user_id: Option<String>,
}

impl DeleteRoomBody {
    fn how(&self) -> ApiResult<DeleteRoom> {
        if self.new_room_user_id.is_some() {
            return Err(MatrixError::invalid_param(
                "new_room_user_id is not supported: members are taken out of the room without a new one",
            ));
        }
        Ok(DeleteRoom {
            block: self.block,
            purge: self.purge,
            force_purge: self.force_purge,
        })
    }
}

/// A deletion's room: known, or unknown but to be blocked.
fn room_to_delete(state: &AppState, room_id: &str, how: &DeleteRoom) -> ApiResult<OwnedRoomId> {
    let room_id = parse_room(room_id)?;
    if state.rooms.room(&room_id)?.is_none() && !how.block {
        return Err(MatrixError::not_found("Room not found"));
    }
    Ok(room_id)
}

/// `DELETE /_synapse/admin/v2/rooms/{roomId}`: starts the deletion in the
/// background; its status is at `delete_status`.
async fn delete_room_v2(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<DeleteRoomBody>,
) -> ApiResult<Json<Value>> {
    let how = body.how()?;
    let room_id = room_to_delete(&state, &room_id, &how)?;
    let delete_id = state
        .delete_room(room_id, admin.user_id.to_string(), how)
        .ok_or_else(|| MatrixError::invalid_param("The room is being deleted already"))?;
    Ok(Json(json!({ "delete_id": delete_id })))
}

/// `DELETE /_synapse/admin/v1/rooms/{roomId}`: the same, answered when
/// done.
async fn delete_room_v1(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<DeleteRoomBody>,
) -> ApiResult<Json<Value>> {
    let how = body.how()?;
    let room_id = room_to_delete(&state, &room_id, &how)?;
    let shutdown = state
        .delete_room_now(&room_id, &admin.user_id.to_string(), &how, None)
        .await?;
    Ok(Json(serde_json::to_value(shutdown).map_err(|e| {
        MatrixError::from(crate::services::error::Error::Internal(e.to_string()))
    })?))
}

fn deletion_json(deletion: &RoomDeletion) -> Value {
    serde_json::to_value(deletion).unwrap_or(Value::Null)
}

/// `GET /_synapse/admin/v2/rooms/{roomId}/delete_status`
async fn room_delete_status(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let results: Vec<Value> = state
        .deletions_of_room(&room_id)
        .iter()
        .map(deletion_json)
        .collect();
    if results.is_empty() {
        return Err(MatrixError::not_found("No delete task for room_id"));
    }
    Ok(Json(json!({ "results": results })))
}

/// `GET /_synapse/admin/v2/rooms/delete_status/{deleteId}`
async fn delete_status(
    State(state): State<AppState>,
    Admin(_): Admin,
    Path(delete_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let deletion = state
        .deletion(&delete_id)
        .ok_or_else(|| MatrixError::not_found("delete id not found"))?;
    let mut answer = deletion_json(&deletion);
    if let Value::Object(map) = &mut answer {
        map.remove("delete_id");
    }
    Ok(Json(answer))
}

#[derive(Deserialize)]
struct JoinBody {
    user_id: String,
}

/// `POST /_synapse/admin/v1/join/{roomIdOrAlias}`: makes a local user join
/// a room. A room that is not public needs the admin in it, able to
/// invite: the admin invites the user first.
async fn join(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(room): Path<String>,
    JsonBody(body): JsonBody<JoinBody>,
) -> ApiResult<Json<Value>> {
    let user = existing_user(&state, &body.user_id)?;
    let (room_id, servers) = resolve_target(&state, &room).await?;
    if state.rooms.server_in_room(&room_id)? {
        let public = state
            .rooms
            .state_event(&room_id, "m.room.join_rules", "")?
            .is_some_and(|rules| rules.content_value()["join_rule"] == "public");
        let membership = state.rooms.membership(&room_id, &user)?;
        if !public && membership != "invite" && membership != "join" {
            let admin_id = parse_user(&admin.user_id.to_string())?;
            state
                .rooms
                .set_membership(&room_id, &admin_id, &user, "invite", json!({}), None)
                .await?;
        }
    }
    enter_room(&state, &user, &room_id, servers, "join", None).await
}

#[derive(Deserialize)]
struct NoticeBody {
    user_id: String,
    content: Value,
    #[serde(rename = "type", default = "message_type")]
    kind: String,
    state_key: Option<String>,
}

fn message_type() -> String {
    "m.room.message".to_owned()
}

/// `POST /_synapse/admin/v1/send_server_notice`
async fn server_notice(
    State(state): State<AppState>,
    Admin(_): Admin,
    JsonBody(body): JsonBody<NoticeBody>,
) -> ApiResult<Json<Value>> {
    send_notice(&state, body, None).await
}

/// `PUT /_synapse/admin/v1/send_server_notice/{txnId}`: a repeat of the
/// same admin's transaction sends nothing new.
async fn server_notice_txn(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(txn_id): Path<String>,
    JsonBody(body): JsonBody<NoticeBody>,
) -> ApiResult<Json<Value>> {
    let txn = format!("{} {txn_id}", admin.user_id);
    send_notice(&state, body, Some(txn)).await
}

async fn send_notice(
    state: &AppState,
    body: NoticeBody,
    txn: Option<String>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&body.user_id)?;
    if !body.content.is_object() {
        return Err(MatrixError::bad_json("content must be a JSON object"));
    }
    let event_id = state
        .send_server_notice(&user, &body.kind, body.state_key, body.content, txn)
        .await?;
    Ok(Json(json!({ "event_id": event_id })))
}
