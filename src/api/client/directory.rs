//! Room aliases and the room directory.
//!
//! - `PUT`/`GET`/`DELETE /_matrix/client/v3/directory/room/{roomAlias}`
//! - `GET /_matrix/client/v3/rooms/{roomId}/aliases`
//! - `GET`/`PUT /_matrix/client/v3/directory/list/room/{roomId}`
//! - `GET`/`POST /_matrix/client/v3/publicRooms`

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::membership::{parse_room, parse_user};
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path, Query};
use crate::api::shared::{list, remote_server, PublicRoomsBody};
use crate::api::AppState;
use crate::services::rooms::visibility::Reader;

#[derive(Deserialize)]
pub struct AliasBody {
    room_id: String,
}

/// `PUT /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn create_alias(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(alias): Path<String>,
    JsonBody(body): JsonBody<AliasBody>,
) -> ApiResult<Json<Value>> {
    let alias = state.directory.local_alias(&alias)?;
    let room_id = parse_room(&body.room_id)?;
    if state.rooms.room(&room_id)?.is_none() {
        return Err(MatrixError::not_found(format!("Unknown room {room_id}")));
    }
    let user = parse_user(authed.user_id.to_string().as_str())?;
    let acting = state.appservices.acting(&authed);
    state.appservices.check_alias_free(alias.as_str(), acting)?;
    // An application service may name rooms it is not in (as in Synapse).
    if acting.is_none() {
        state.rooms.require_joined(&room_id, &user)?;
    }
    state
        .directory
        .create_alias(&alias, &room_id, &user)
        .await?;
    Ok(Json(json!({})))
}

/// `GET /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn resolve_alias(
    State(state): State<AppState>,
    Path(alias): Path<String>,
) -> ApiResult<Json<Value>> {
    let alias = ruma::RoomAliasId::parse(&alias)
        .map_err(|_| MatrixError::invalid_param(format!("{alias:?} is not a room alias")))?;
    if remote_server(&state, alias.server_name().as_str())?.is_some() {
        return Ok(Json(state.federation.query_directory(&alias).await?));
    }
    let room_id = state
        .resolve_local_alias(&alias)
        .await?
        .ok_or_else(|| MatrixError::not_found(format!("Room alias {alias} not found")))?;
    Ok(Json(
        json!({ "room_id": room_id, "servers": [state.config.server_name] }),
    ))
}

/// `DELETE /_matrix/client/v3/directory/room/{roomAlias}`
pub async fn delete_alias(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(alias): Path<String>,
) -> ApiResult<Json<Value>> {
    let alias = state.directory.local_alias(&alias)?;
    let user = parse_user(authed.user_id.to_string().as_str())?;
    let is_admin = state
        .accounts
        .user(authed.localpart())?
        .is_some_and(|u| u.admin);
    state
        .directory
        .delete_alias(&alias, (!is_admin).then_some(&*user), &state.rooms)
        .await?;
    Ok(Json(json!({})))
}

/// `GET /_matrix/client/v3/rooms/{roomId}/aliases`
pub async fn room_aliases(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let user = parse_user(authed.user_id.to_string().as_str())?;
    // Members, and anyone in a world-readable room.
    if let Reader::Former { .. } = state.rooms.reader(&room_id, &user)? {
        state.rooms.require_joined(&room_id, &user)?;
    }
    Ok(Json(
        json!({ "aliases": state.directory.aliases(&room_id)? }),
    ))
}

/// `GET /_matrix/client/v3/directory/list/room/{roomId}`
pub async fn visibility(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    if state.rooms.room(&room_id)?.is_none() {
        return Err(MatrixError::not_found(format!("Unknown room {room_id}")));
    }
    let visibility = if state.directory.is_public(&room_id)? {
        "public"
    } else {
        "private"
    };
    Ok(Json(json!({ "visibility": visibility })))
}

#[derive(Deserialize)]
pub struct VisibilityBody {
    visibility: Option<String>,
}

/// `PUT /_matrix/client/v3/directory/list/room/{roomId}`
pub async fn set_visibility(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<VisibilityBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let public = match body.visibility.as_deref() {
        Some("public") => true,
        Some("private") | None => false,
        Some(other) => {
            return Err(MatrixError::invalid_param(format!(
                "unknown visibility {other:?}"
            )));
        }
    };
    let user = parse_user(authed.user_id.to_string().as_str())?;
    let is_admin = state
        .accounts
        .user(authed.localpart())?
        .is_some_and(|u| u.admin);
    state
        .directory
        .set_visibility(
            &room_id,
            (!is_admin).then_some(&*user),
            public,
            &state.rooms,
        )
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize, Default)]
pub struct PublicRoomsQuery {
    limit: Option<usize>,
    since: Option<String>,
    server: Option<String>,
}

/// `GET /_matrix/client/v3/publicRooms`: another server's directory is
/// asked of that server.
pub async fn public_rooms(
    State(state): State<AppState>,
    Query(query): Query<PublicRoomsQuery>,
) -> ApiResult<Json<Value>> {
    let page = PublicRoomsBody {
        limit: query.limit,
        since: query.since,
        filter: None,
    };
    if let Some(server) = asked_server(&state, query.server.as_deref())? {
        return Ok(Json(
            state
                .federation
                .public_rooms(&server, &json!(page), false)
                .await?,
        ));
    }
    let (limit, since, filter) = page.page();
    list(&state, limit, since, filter)
}

/// `POST /_matrix/client/v3/publicRooms`
pub async fn search_public_rooms(
    State(state): State<AppState>,
    Auth(_): Auth,
    Query(query): Query<PublicRoomsQuery>,
    JsonBody(body): JsonBody<PublicRoomsBody>,
) -> ApiResult<Json<Value>> {
    if let Some(server) = asked_server(&state, query.server.as_deref())? {
        return Ok(Json(
            state
                .federation
                .public_rooms(&server, &json!(body), true)
                .await?,
        ));
    }
    let (limit, since, filter) = body.page();
    list(&state, limit, since, filter)
}

/// The other server whose directory `?server=` asks for, if any.
fn asked_server(
    state: &AppState,
    server: Option<&str>,
) -> ApiResult<Option<ruma::OwnedServerName>> {
    Ok(server
        .map(|name| remote_server(state, name))
        .transpose()?
        .flatten())
}

#[derive(Deserialize)]
pub struct UserSearchBody {
    search_term: String,
    limit: Option<u64>,
}

/// Results unless the client asks for another number, and at most.
const DEFAULT_USER_RESULTS: u64 = 10;
const MAX_USER_RESULTS: u64 = 50;

/// `POST /_matrix/client/v3/user_directory/search`
pub async fn search_users(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<UserSearchBody>,
) -> ApiResult<Json<Value>> {
    let searcher = parse_user(&authed.user_id.to_string())?;
    let limit = body
        .limit
        .unwrap_or(DEFAULT_USER_RESULTS)
        .min(MAX_USER_RESULTS);
    let (results, limited) = crate::services::user_directory::search(
        &state,
        &searcher,
        &body.search_term,
        limit as usize,
    )?;
    Ok(Json(json!({ "results": results, "limited": limited })))
}
