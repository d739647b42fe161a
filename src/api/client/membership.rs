//! Creating rooms and changing memberships.
//!
//! - `POST /_matrix/client/v3/createRoom`
//! - `POST /_matrix/client/v3/rooms/{roomId}/join`, `POST /_matrix/client/v3/join/{roomIdOrAlias}`
//! - `POST /_matrix/client/v3/rooms/{roomId}/{invite,leave,kick,ban,unban,forget}`
//! - `GET /_matrix/client/v3/joined_rooms`

use axum::extract::{RawQuery, State};
use axum::Json;
use ruma::{OwnedRoomId, OwnedServerName, OwnedUserId, RoomId, ServerName, UserId};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path};
use crate::api::AppState;
use crate::services::federation::membership as federated;
use crate::services::rooms::create::CreateRoom;

#[derive(Deserialize)]
pub struct CreateRoomBody {
    #[serde(flatten)]
    request: CreateRoom,
    room_alias_name: Option<String>,
}

/// `POST /_matrix/client/v3/createRoom`
pub async fn create_room(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<CreateRoomBody>,
) -> ApiResult<Json<Value>> {
    let alias = match &body.room_alias_name {
        Some(name) => Some(state.directory.alias_for_name(name)?),
        None => None,
    };
    if let Some(alias) = &alias {
        let acting = state.appservices.acting(&authed);
        state.appservices.check_alias_free(alias.as_str(), acting)?;
    }
    // A new room has no aliases yet, but the one createRoom itself makes.
    for initial in &body.request.initial_state {
        if initial.kind == "m.room.canonical_alias" {
            let mut content = initial.content.as_object().cloned().unwrap_or_default();
            let named_new = |value: &Value| alias.as_ref().is_some_and(|a| value == a.as_str());
            if content.get("alias").is_some_and(named_new) {
                content.remove("alias");
            }
            super::room_events::check_canonical_aliases(&state, None, &content)?;
        }
    }
    let creator = parse_user(&authed.user_id.to_string())?;
    let mut invitees = Vec::new();
    for invitee in &body.request.invite {
        let user = parse_user(invitee)?;
        if user != creator && !invitees.contains(&user) {
            invitees.push(user);
        }
    }
    let profile = state.profiles.profile(authed.localpart())?;
    let profile = profile.map(Value::Object).unwrap_or(Value::Null);
    let room_id = state
        .rooms
        .create_room(
            &creator,
            body.request,
            &invitees,
            profile,
            &state.directory,
            alias,
        )
        .await?;
    tracing::info!(%room_id, "room created");
    Ok(Json(json!({ "room_id": room_id })))
}

/// A path's room ID; 400 `M_INVALID_PARAM` when it is not one.
pub fn parse_room(room_id: &str) -> ApiResult<OwnedRoomId> {
    RoomId::parse(room_id)
        .map_err(|_| MatrixError::invalid_param(format!("{room_id:?} is not a room ID")))
}

/// An event ID from a request; 400 `M_INVALID_PARAM` when it is not one.
pub fn check_event_id(event_id: &str) -> ApiResult<()> {
    ruma::EventId::parse(event_id)
        .map(|_| ())
        .map_err(|_| MatrixError::invalid_param(format!("{event_id:?} is not an event ID")))
}

/// A user ID from a request; 400 `M_INVALID_PARAM` when it is not one.
pub fn parse_user(user_id: &str) -> ApiResult<OwnedUserId> {
    UserId::parse(user_id)
        .map_err(|_| MatrixError::invalid_param(format!("{user_id:?} is not a user ID")))
}

#[derive(Deserialize, Default)]
pub struct ReasonBody {
    reason: Option<String>,
}

#[derive(Deserialize)]
pub struct TargetBody {
    user_id: String,
    reason: Option<String>,
}

fn reason_content(reason: Option<String>) -> Value {
    match reason {
        Some(reason) => json!({ "reason": reason }),
        None => json!({}),
    }
}

/// `POST /_matrix/client/v3/rooms/{roomId}/join`
pub async fn join(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let user = parse_user(&authed.user_id.to_string())?;
    enter_room(&state, &user, &room_id, Vec::new(), "join", body.reason).await
}

/// `POST /_matrix/client/v3/join/{roomIdOrAlias}`
pub async fn join_by_id_or_alias(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(target): Path<String>,
    RawQuery(query): RawQuery,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let (room_id, mut servers) = resolve_target(&state, &target).await?;
    servers.extend(via_servers(&query));
    let user = parse_user(&authed.user_id.to_string())?;
    enter_room(&state, &user, &room_id, servers, "join", body.reason).await
}

/// The `via` (and the older `server_name`) query parameters.
fn via_servers(query: &Option<String>) -> Vec<OwnedServerName> {
    form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes())
        .filter(|(key, _)| key == "via" || key == "server_name")
        .filter_map(|(_, value)| ServerName::parse(value.as_ref()).ok())
        .collect()
}

/// Joins or knocks on a room this server knows, with the user's profile in
/// the member event; answers the room ID.
pub(crate) async fn enter_room(
    state: &AppState,
    user: &UserId,
    room_id: &RoomId,
    mut servers: Vec<OwnedServerName>,
    membership: &str,
    reason: Option<String>,
) -> ApiResult<Json<Value>> {
    state.rooms.check_not_blocked(room_id, membership)?;
    if !state.rooms.server_in_room(room_id)? {
        if let Some(server) = federated::inviting_server(state, room_id, user)? {
            servers.push(server);
        }
        if let Some(server) = room_id.server_name() {
            servers.push(server.to_owned());
        }
        let own = state.federation.server_name();
        servers.retain(|server| server != own);
        let mut unique = Vec::new();
        for server in servers {
            if !unique.contains(&server) {
                unique.push(server);
            }
        }
        if !unique.is_empty() && state.federation.enabled() {
            let mut content = reason_content(reason);
            if let Some(profile) = state.profiles.profile(user.localpart())? {
                for key in ["displayname", "avatar_url"] {
                    if let Some(value) = profile.get(key) {
                        content[key] = value.clone();
                    }
                }
            }
            if membership == "knock" {
                federated::knock_remote(state, room_id, user, &unique, content).await?;
            } else {
                federated::join_remote(state, room_id, user, &unique, content).await?;
            }
            return Ok(Json(json!({ "room_id": room_id })));
        }
    }
    if state.rooms.room(room_id)?.is_none() {
        let action = if membership == "knock" {
            "knock on"
        } else {
            membership
        };
        return Err(MatrixError::not_found(format!(
            "No known servers to {action} this room through"
        )));
    }
    let profile = state.profiles.profile(user.localpart())?.map(Value::Object);
    let content = reason_content(reason);
    state
        .rooms
        .set_membership(room_id, user, user, membership, content, profile)
        .await?;
    Ok(Json(json!({ "room_id": room_id })))
}

/// `POST /_matrix/client/v3/rooms/{roomId}/leave`
pub async fn leave(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let user = parse_user(&authed.user_id.to_string())?;
    let content = reason_content(body.reason);
    let pending = matches!(
        state.rooms.membership(&room_id, &user)?.as_str(),
        "invite" | "knock"
    );
    if pending && !state.rooms.server_in_room(&room_id)? {
        if let Some(server) = federated::inviting_server(&state, &room_id, &user)? {
            if server != state.federation.server_name() {
                match federated::leave_remote(&state, &room_id, &user, &server, content.clone())
                    .await
                {
                    Ok(_) => return Ok(Json(json!({}))),
                    Err(error) => tracing::info!(
                        %room_id, %server, %error,
                        "the room's server did not take the leave; leaving here only"
                    ),
                }
            }
        }
        // The inviting server cannot be reached (or a knock is withdrawn):
        // the invite or knock is set aside here with a leave of our own.
        federated::leave_locally(&state, &room_id, &user, content).await?;
        return Ok(Json(json!({})));
    }
    state
        .rooms
        .set_membership(&room_id, &user, &user, "leave", content, None)
        .await?;
    Ok(Json(json!({})))
}

/// The membership a moderation endpoint sets on its target.
#[derive(Clone, Copy)]
pub enum Action {
    Invite,
    Kick,
    Ban,
    Unban,
}

/// `POST /_matrix/client/v3/rooms/{roomId}/{invite,kick,ban,unban}`
pub async fn moderate(
    state: AppState,
    authed: crate::services::accounts::Authed,
    room_id: String,
    body: TargetBody,
    action: Action,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let sender = parse_user(&authed.user_id.to_string())?;
    let target = parse_user(&body.user_id)?;
    if let Action::Invite = action {
        state.ensure_appservice_user(target.as_str()).await?;
    }
    let current = state.rooms.membership(&room_id, &target)?;
    let membership = match action {
        Action::Invite => "invite",
        Action::Kick if !matches!(current.as_str(), "join" | "invite" | "knock") => {
            return Err(MatrixError::forbidden(format!(
                "{target} is not in the room"
            )));
        }
        Action::Kick | Action::Unban => "leave",
        Action::Ban => "ban",
    };
    if let Action::Unban = action {
        if current != "ban" {
            return Err(MatrixError::forbidden("The user is not banned"));
        }
    }
    if let Action::Invite = action {
        if current == "join" {
            return Err(MatrixError::forbidden(format!(
                "{target} is already in the room"
            )));
        }
    }
    let remote = target.server_name() != state.federation.server_name();
    if membership == "invite" && remote {
        federated::invite_remote(
            &state,
            &room_id,
            &sender,
            &target,
            reason_content(body.reason),
        )
        .await?;
        return Ok(Json(json!({})));
    }
    state
        .rooms
        .set_membership(
            &room_id,
            &sender,
            &target,
            membership,
            reason_content(body.reason),
            None,
        )
        .await?;
    Ok(Json(json!({})))
}

macro_rules! moderation_handler {
    ($name:ident, $action:expr, $doc:literal) => {
        #[doc = $doc]
        pub async fn $name(
            State(state): State<AppState>,
            Auth(authed): Auth,
            Path(room_id): Path<String>,
            JsonBody(body): JsonBody<TargetBody>,
        ) -> ApiResult<Json<Value>> {
            moderate(state, authed, room_id, body, $action).await
        }
    };
}

moderation_handler!(
    invite,
    Action::Invite,
    "`POST /_matrix/client/v3/rooms/{roomId}/invite`"
);
moderation_handler!(
    kick,
    Action::Kick,
    "`POST /_matrix/client/v3/rooms/{roomId}/kick`"
);
moderation_handler!(
    ban,
    Action::Ban,
    "`POST /_matrix/client/v3/rooms/{roomId}/ban`"
);
moderation_handler!(
    unban,
    Action::Unban,
    "`POST /_matrix/client/v3/rooms/{roomId}/unban`"
);

/// `POST /_matrix/client/v3/rooms/{roomId}/forget`
pub async fn forget(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let user = parse_user(&authed.user_id.to_string())?;
    state.rooms.forget(&room_id, &user).await?;
    Ok(Json(json!({})))
}

/// `POST /_matrix/client/v3/knock/{roomIdOrAlias}`
pub async fn knock(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(target): Path<String>,
    RawQuery(query): RawQuery,
    JsonBody(body): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let (room_id, mut servers) = resolve_target(&state, &target).await?;
    servers.extend(via_servers(&query));
    let user = parse_user(&authed.user_id.to_string())?;
    enter_room(&state, &user, &room_id, servers, "knock", body.reason).await
}

/// A room ID, or the room an alias points to (asked of the alias's
/// server when it is another), with the servers to join it through.
pub(crate) async fn resolve_target(
    state: &AppState,
    target: &str,
) -> ApiResult<(OwnedRoomId, Vec<OwnedServerName>)> {
    if !target.starts_with('#') {
        return Ok((parse_room(target)?, Vec::new()));
    }
    let alias = ruma::RoomAliasId::parse(target)
        .map_err(|_| MatrixError::invalid_param(format!("{target:?} is not a room alias")))?;
    if alias.server_name() == state.federation.server_name() {
        let room_id = state
            .resolve_local_alias(&alias)
            .await?
            .ok_or_else(|| MatrixError::not_found(format!("Room alias {target} not found")))?;
        return Ok((room_id, Vec::new()));
    }
    let answer = state.federation.query_directory(&alias).await?;
    let room_id = answer["room_id"]
        .as_str()
        .and_then(|id| RoomId::parse(id).ok())
        .ok_or_else(|| MatrixError::not_found(format!("Room alias {target} not found")))?;
    let servers = answer["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().and_then(|s| ServerName::parse(s).ok()))
        .collect();
    Ok((room_id, servers))
}

#[derive(Deserialize)]
pub struct UpgradeBody {
    new_version: String,
}

/// `POST /_matrix/client/v3/rooms/{roomId}/upgrade`
pub async fn upgrade(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<UpgradeBody>,
) -> ApiResult<Json<Value>> {
    let room_id = parse_room(&room_id)?;
    let user = parse_user(&authed.user_id.to_string())?;
    let replacement = state
        .rooms
        .upgrade(&room_id, &user, &body.new_version, &state.directory)
        .await?;
    tracing::info!(%room_id, %replacement, "room upgraded");
    Ok(Json(json!({ "replacement_room": replacement })))
}

/// `GET /_matrix/client/v3/joined_rooms`
pub async fn joined_rooms(
    State(state): State<AppState>,
    Auth(authed): Auth,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&authed.user_id.to_string())?;
    let rooms = state.rooms.rooms_of_user(&user, "join")?;
    Ok(Json(json!({ "joined_rooms": rooms })))
}
