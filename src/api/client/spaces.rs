//! Spaces and room summaries: `GET /_matrix/client/v1/rooms/{roomId}/hierarchy`
//! and `GET /_matrix/client/v1/room_summary/{roomIdOrAlias}`.

use axum::extract::State;
use axum::Json;
use ruma::RoomId;
use serde::Deserialize;
use serde_json::{json, Value};

use super::membership::parse_user;
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, OptionalAuth, Path, Query};
use crate::api::AppState;
use crate::services::spaces::{self, Walk};

/// Rooms in one page unless the client asks for fewer.
const DEFAULT_LIMIT: usize = 50;
/// Most rooms in one page.
const MAX_LIMIT: usize = 100;

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct HierarchyQuery {
    from: Option<String>,
    limit: Option<usize>,
    max_depth: Option<usize>,
    suggested_only: Option<bool>,
}

/// `GET /_matrix/client/v1/rooms/{roomId}/hierarchy`: the rooms of the
/// space's tree the user may see, breadth first, a page at a time. The
/// `from` token carries the position in the walk and the walk's
/// parameters, which must not change between pages.
pub async fn hierarchy(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
    Query(query): Query<HierarchyQuery>,
) -> ApiResult<Json<Value>> {
    let room_id =
        RoomId::parse(&room_id).map_err(|_| MatrixError::invalid_param("not a room ID"))?;
    let limit = match query.limit {
        Some(0) => return Err(MatrixError::invalid_param("limit must be above 0")),
        Some(limit) => limit.min(MAX_LIMIT),
        None => DEFAULT_LIMIT,
    };
    let walk = Walk {
        suggested_only: query.suggested_only.unwrap_or(false),
        max_depth: query.max_depth,
    };
    let shape = format!(
        "{}:{}",
        u8::from(walk.suggested_only),
        walk.max_depth
            .map_or("-".to_owned(), |depth| depth.to_string())
    );
    let offset = match &query.from {
        None => 0,
        Some(token) => {
            let (offset, token_shape) = token
                .split_once(':')
                .ok_or_else(|| MatrixError::invalid_param("unknown from token"))?;
            if token_shape != shape {
                return Err(MatrixError::invalid_param(
                    "suggested_only and max_depth must stay as they were for the first page",
                ));
            }
            offset
                .parse::<usize>()
                .map_err(|_| MatrixError::invalid_param("unknown from token"))?
        }
    };
    let user = parse_user(&authed.user_id.to_string())?;
    let rooms = spaces::walk(&state, &user, &room_id, walk).await?;
    let page: Vec<Value> = rooms.iter().skip(offset).take(limit).cloned().collect();
    let mut answer = json!({ "rooms": page });
    if offset + limit < rooms.len() {
        answer["next_batch"] = json!(format!("{}:{shape}", offset + limit));
    }
    Ok(Json(answer))
}

/// `GET /_matrix/client/v1/room_summary/{roomIdOrAlias}` (`via` servers
/// for a room this server is not in): the room's summary, with the user's
/// membership. Without an access token, only for public, knock and
/// world-readable rooms; a room the requester may not see is not found.
pub async fn room_summary(
    State(state): State<AppState>,
    OptionalAuth(authed): OptionalAuth,
    Path(target): Path<String>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let (room_id, mut via) = super::membership::resolve_target(&state, &target).await?;
    for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if name == "via" {
            if let Ok(server) = ruma::ServerName::parse(value.as_ref()) {
                via.push(server);
            }
        }
    }
    via.extend(room_id.server_name().map(ToOwned::to_owned));
    let via: Vec<String> = via.iter().map(ToString::to_string).collect();
    let user = match &authed {
        Some(authed) => Some(parse_user(&authed.user_id.to_string())?),
        None => None,
    };
    let not_found = || MatrixError::not_found("Room not found.");
    let mut summary = spaces::room_summary(&state, &room_id, &via)
        .await?
        .ok_or_else(not_found)?;
    let visible = match &user {
        Some(user) => spaces::may_see(&state, &summary, spaces::Requester::User(user))?,
        None => spaces::is_open(&summary),
    };
    if !visible {
        return Err(not_found());
    }
    if let Some(fields) = summary.as_object_mut() {
        fields.remove("children_state");
        fields.remove("allowed_room_ids");
    }
    if let Some(user) = &user {
        summary["membership"] = json!(state.rooms.membership(&room_id, user)?);
    }
    Ok(Json(summary))
}
