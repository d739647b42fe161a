//! Device management.
//!
//! - `GET /_matrix/client/v3/devices`
//! - `GET /_matrix/client/v3/devices/{deviceId}`
//! - `PUT /_matrix/client/v3/devices/{deviceId}`
//! - `DELETE /_matrix/client/v3/devices/{deviceId}`
//! - `POST /_matrix/client/v3/delete_devices`

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path};
use crate::api::AppState;
use crate::services::accounts::{Authed, Device};
use crate::services::uia::{Flows, STAGE_PASSWORD};

/// Longest device display name, in characters (Synapse's limit).
const MAX_DISPLAY_NAME_CHARS: usize = 100;

fn device_json(device: &Device) -> Value {
    json!({
        "device_id": device.device_id,
        "display_name": device.record.display_name,
        "last_seen_ip": device.record.last_seen_ip,
        "last_seen_ts": device.record.last_seen_ts,
    })
}

/// `GET /_matrix/client/v3/devices`
pub async fn list(State(state): State<AppState>, Auth(authed): Auth) -> ApiResult<Json<Value>> {
    let devices: Vec<Value> = state
        .accounts
        .devices(authed.localpart())?
        .iter()
        .map(device_json)
        .collect();
    Ok(Json(json!({ "devices": devices })))
}

/// `GET /_matrix/client/v3/devices/{deviceId}`
pub async fn get(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(device_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let record = state
        .accounts
        .device(authed.localpart(), &device_id)?
        .ok_or_else(|| MatrixError::not_found("Device not found"))?;
    Ok(Json(device_json(&Device { device_id, record })))
}

#[derive(Deserialize)]
pub struct UpdateBody {
    display_name: Option<String>,
}

/// `PUT /_matrix/client/v3/devices/{deviceId}`
pub async fn update(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(device_id): Path<String>,
    JsonBody(body): JsonBody<UpdateBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if let Some(name) = &body.display_name {
        if name.chars().count() > MAX_DISPLAY_NAME_CHARS {
            return Err(MatrixError::invalid_param(format!(
                "Device display name is too long (at most {MAX_DISPLAY_NAME_CHARS} characters)"
            )));
        }
    }
    if manages_devices(&state, &authed) {
        let created = state
            .accounts
            .ensure_device(authed.localpart(), &device_id, body.display_name)
            .await?;
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        return Ok((status, Json(json!({}))));
    }
    state
        .accounts
        .rename_device(authed.localpart(), &device_id, body.display_name)
        .await?;
    Ok((StatusCode::OK, Json(json!({}))))
}

/// Whether the request is an application service's that manages its
/// users' devices itself (MSC4190): it creates them with `PUT` and
/// deletes them without user-interactive authentication.
fn manages_devices(state: &AppState, authed: &Authed) -> bool {
    state
        .appservices
        .acting(authed)
        .is_some_and(|service| service.device_management)
}

#[derive(Deserialize)]
pub struct DeleteBody {
    auth: Option<Value>,
}

/// `DELETE /_matrix/client/v3/devices/{deviceId}` (user-interactive auth)
pub async fn delete(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(device_id): Path<String>,
    JsonBody(body): JsonBody<DeleteBody>,
) -> ApiResult<Json<Value>> {
    let flows = Flows(vec![vec![STAGE_PASSWORD]]);
    let purpose = format!("delete_device {} {device_id}", authed.user_id);
    if !manages_devices(&state, &authed) {
        state
            .authorize_interactively(&purpose, &flows, body.auth.as_ref(), Some(&authed))
            .await?;
    }
    state
        .accounts
        .delete_devices(authed.localpart(), &[device_id])
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct DeleteManyBody {
    devices: Vec<String>,
    auth: Option<Value>,
}

/// `POST /_matrix/client/v3/delete_devices` (user-interactive auth)
pub async fn delete_many(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<DeleteManyBody>,
) -> ApiResult<Json<Value>> {
    let flows = Flows(vec![vec![STAGE_PASSWORD]]);
    let purpose = format!("delete_devices {}", authed.user_id);
    if !manages_devices(&state, &authed) {
        state
            .authorize_interactively(&purpose, &flows, body.auth.as_ref(), Some(&authed))
            .await?;
    }
    state
        .accounts
        .delete_devices(authed.localpart(), &body.devices)
        .await?;
    Ok(Json(json!({})))
}
