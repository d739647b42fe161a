//! The server-server API: server keys (`/_matrix/key/v2`), the
//! federation endpoints (`/_matrix/federation`), and server discovery
//! (`/.well-known/matrix/server`).
//!
//! Handlers of `/_matrix/federation` take a [`Signed`] request, whose
//! `X-Matrix` signature was checked against the origin's keys; the key
//! endpoints are public, as the spec makes them.

mod keys;
mod media;
mod rooms;

use std::collections::BTreeMap;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use ruma::OwnedServerName;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiResult, MatrixError};
use super::extract::{JsonBody, Path, Query, Signed};
use super::shared::{list, local_profile, PublicRoomsBody};
use super::AppState;

/// The federation API's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/key/v2/server", get(server_keys))
        .route("/_matrix/key/v2/server/{key_id}", get(server_keys_by_id))
        .route("/_matrix/key/v2/query", axum::routing::post(query_keys))
        .route(
            "/_matrix/key/v2/query/{server_name}",
            get(query_server_keys),
        )
        .route("/_matrix/federation/v1/version", get(version))
        .route("/_matrix/federation/v1/query/profile", get(query_profile))
        .route(
            "/_matrix/federation/v1/query/directory",
            get(query_directory),
        )
        .route(
            "/_matrix/federation/v1/publicRooms",
            get(public_rooms).post(search_public_rooms),
        )
        .route("/_matrix/federation/v1/hierarchy/{room_id}", get(hierarchy))
        .route(
            "/_matrix/federation/v1/openid/userinfo",
            get(openid_userinfo),
        )
        .route("/.well-known/matrix/server", get(well_known))
        .merge(rooms::routes())
        .merge(keys::routes())
        .merge(media::routes())
}

#[derive(Deserialize)]
struct UserinfoQuery {
    access_token: String,
}

/// `GET /_matrix/federation/v1/openid/userinfo`: the user an OpenID token
/// names. Not signed: other services (integration managers) call it.
async fn openid_userinfo(
    State(state): State<AppState>,
    Query(query): Query<UserinfoQuery>,
) -> ApiResult<Json<Value>> {
    let user = state
        .accounts
        .short_token_user(crate::storage::tables::OPENID_TOKENS, &query.access_token)?
        .ok_or_else(|| {
            MatrixError::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "M_UNKNOWN_TOKEN",
                "Access token unknown or expired",
            )
        })?;
    Ok(Json(json!({ "sub": user })))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HierarchyQuery {
    suggested_only: bool,
}

/// `GET /_matrix/federation/v1/hierarchy/{roomId}`
async fn hierarchy(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
    Query(query): Query<HierarchyQuery>,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    let room_id = ruma::RoomId::parse(&room_id)
        .map_err(|_| MatrixError::not_found("Room does not exist."))?;
    crate::services::federation::inbound::require_acl(&state, &room_id, &signed.origin)?;
    Ok(Json(crate::services::spaces::federation_hierarchy(
        &state,
        &signed.origin,
        &room_id,
        query.suggested_only,
    )?))
}

/// `GET /_matrix/key/v2/server`: this server's signed key document.
async fn server_keys(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!(state.federation.own_key_document()?)))
}

/// `GET /_matrix/key/v2/server/{keyId}`: deprecated; the key ID is ignored
/// and the whole document answered, as the spec says.
async fn server_keys_by_id(
    state: State<AppState>,
    Path(_key_id): Path<String>,
) -> ApiResult<Json<Value>> {
    server_keys(state).await
}

#[derive(Deserialize)]
struct KeyQuery {
    server_keys: BTreeMap<OwnedServerName, Value>,
}

/// `POST /_matrix/key/v2/query`: other servers' key documents, fetched
/// and checked by this server (acting as a notary) and countersigned.
async fn query_keys(
    State(state): State<AppState>,
    JsonBody(query): JsonBody<KeyQuery>,
) -> ApiResult<Json<Value>> {
    if query.server_keys.len() > MAX_NOTARY_SERVERS {
        return Err(MatrixError::invalid_param(format!(
            "at most {MAX_NOTARY_SERVERS} servers per query"
        )));
    }
    Ok(Json(
        state.federation.notary_query(&query.server_keys).await,
    ))
}

/// Most servers one notary query may name, so that one request cannot make
/// this server fetch from thousands of others.
const MAX_NOTARY_SERVERS: usize = 50;

/// `GET /_matrix/key/v2/query/{serverName}`
async fn query_server_keys(
    State(state): State<AppState>,
    Path(server_name): Path<String>,
) -> ApiResult<Json<Value>> {
    let server = ruma::ServerName::parse(&server_name)
        .map_err(|_| MatrixError::invalid_param(format!("{server_name:?} is not a server name")))?;
    let wanted = BTreeMap::from([(server, json!({}))]);
    Ok(Json(state.federation.notary_query(&wanted).await))
}

/// `GET /_matrix/federation/v1/version`
async fn version() -> Json<Value> {
    Json(json!({ "server": { "name": "Myelin", "version": env!("CARGO_PKG_VERSION") } }))
}

#[derive(Deserialize)]
struct ProfileQuery {
    user_id: String,
    field: Option<String>,
}

/// `GET /_matrix/federation/v1/query/profile`: a local user's profile, or
/// one field of it.
async fn query_profile(
    State(state): State<AppState>,
    Query(query): Query<ProfileQuery>,
    _signed: Signed,
) -> ApiResult<Json<Value>> {
    let profile = local_profile(&state, &query.user_id)?;
    match query.field {
        None => Ok(Json(Value::Object(profile))),
        Some(field) => {
            let value = profile
                .get(&field)
                .ok_or_else(|| MatrixError::not_found("Profile field not found"))?;
            Ok(Json(json!({ field: value })))
        }
    }
}

#[derive(Deserialize)]
struct DirectoryQuery {
    room_alias: String,
}

/// `GET /_matrix/federation/v1/query/directory`: the room a local alias
/// names, and the servers to join it through.
async fn query_directory(
    State(state): State<AppState>,
    Query(query): Query<DirectoryQuery>,
    _signed: Signed,
) -> ApiResult<Json<Value>> {
    let alias = ruma::RoomAliasId::parse(&query.room_alias).map_err(|_| {
        MatrixError::invalid_param(format!("{:?} is not a room alias", query.room_alias))
    })?;
    let not_found = || MatrixError::not_found(format!("Room alias {alias} not found"));
    if alias.server_name().as_str() != state.config.server_name {
        return Err(not_found());
    }
    let room_id = state
        .resolve_local_alias(&alias)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(
        json!({ "room_id": room_id, "servers": [state.config.server_name] }),
    ))
}

#[derive(Deserialize)]
struct PublicRoomsPage {
    limit: Option<usize>,
    since: Option<String>,
}

/// `GET /_matrix/federation/v1/publicRooms`: this server's public rooms.
async fn public_rooms(
    State(state): State<AppState>,
    Query(page): Query<PublicRoomsPage>,
    _signed: Signed,
) -> ApiResult<Json<Value>> {
    let filter = crate::services::directory::RoomFilter::default();
    list(&state, page.limit, page.since, filter)
}

/// `POST /_matrix/federation/v1/publicRooms`: a search of this server's
/// public rooms.
async fn search_public_rooms(
    State(state): State<AppState>,
    signed: Signed,
) -> ApiResult<Json<Value>> {
    let body: PublicRoomsBody = signed.json()?;
    let (limit, since, filter) = body.page();
    list(&state, limit, since, filter)
}

/// `GET /.well-known/matrix/server`, when `federation.well_known_server`
/// is set.
async fn well_known(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let server = state
        .config
        .federation
        .well_known_server
        .as_ref()
        .ok_or_else(|| MatrixError::not_found("No .well-known configured"))?;
    Ok(Json(json!({ "m.server": server })))
}
