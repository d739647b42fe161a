//! Reporting content to the server's admins:
//! `POST /rooms/{roomId}/report/{eventId}`, `POST /rooms/{roomId}/report`
//! and `POST /users/{userId}/report`.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::membership::{parse_room, parse_user};
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path};
use crate::api::AppState;
use crate::services::reports::Reported;

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ReportBody {
    reason: Option<String>,
}

/// `POST /rooms/{roomId}/report/{eventId}`: the reporter must be joined to
/// the room, and the event must be there and not redacted.
pub async fn report_event(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((room_id, event_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<ReportBody>,
) -> ApiResult<Json<Value>> {
    let room = parse_room(&room_id)?;
    let user = parse_user(&authed.user_id.to_string())?;
    let not_found =
        || MatrixError::not_found("The event was not found, or you are not joined to its room");
    if state.rooms.membership(&room, &user)? != "join" {
        return Err(not_found());
    }
    let present = state
        .rooms
        .pdu(&event_id)?
        .is_some_and(|(pdu, stored)| pdu.room_id == room && stored.redacted_because.is_none());
    if !present {
        return Err(not_found());
    }
    let reported = Reported::Event {
        room_id: room.as_str(),
        event_id: &event_id,
    };
    keep(&state, &user, reported, body.reason.as_deref()).await
}

/// `POST /rooms/{roomId}/report`: a room this server knows.
pub async fn report_room(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(room_id): Path<String>,
    JsonBody(body): JsonBody<ReportBody>,
) -> ApiResult<Json<Value>> {
    let room = parse_room(&room_id)?;
    let user = parse_user(&authed.user_id.to_string())?;
    if state.rooms.room(&room)?.is_none() {
        return Err(MatrixError::not_found("The room was not found"));
    }
    let reported = Reported::Room {
        room_id: room.as_str(),
    };
    keep(&state, &user, reported, body.reason.as_deref()).await
}

/// `POST /users/{userId}/report`: a local user must exist; another
/// server's user is taken as named.
pub async fn report_user(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(user_id): Path<String>,
    JsonBody(body): JsonBody<ReportBody>,
) -> ApiResult<Json<Value>> {
    let reported_user = parse_user(&user_id)?;
    let user = parse_user(&authed.user_id.to_string())?;
    let local = reported_user.server_name().as_str() == state.config.server_name;
    if local && state.accounts.user(reported_user.localpart())?.is_none() {
        return Err(MatrixError::not_found("The user was not found"));
    }
    let reported = Reported::User {
        user_id: reported_user.as_str(),
    };
    keep(&state, &user, reported, body.reason.as_deref()).await
}

async fn keep(
    state: &AppState,
    reporter: &ruma::UserId,
    reported: Reported<'_>,
    reason: Option<&str>,
) -> ApiResult<Json<Value>> {
    let id = state
        .reports
        .add(reporter.as_str(), reported, reason, state.now_ms())
        .await?;
    tracing::info!(report = id, %reporter, "content reported");
    Ok(Json(json!({})))
}
