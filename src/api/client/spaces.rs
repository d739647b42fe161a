//! Spaces: `GET /_matrix/client/v1/rooms/{roomId}/hierarchy`.

use axum::extract::State;
use axum::Json;
use ruma::RoomId;
use serde::Deserialize;
use serde_json::{json, Value};

use super::membership::parse_user;
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, Path, Query};
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
