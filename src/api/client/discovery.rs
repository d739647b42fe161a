//! What a client asks before anything else.
//!
//! - `GET /_matrix/client/versions`
//! - `GET /_matrix/client/v3/capabilities`
//! - `GET /.well-known/matrix/client`

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::Auth;
use crate::api::AppState;
use crate::config::Config;

/// The spec versions whose account, login, device and profile APIs Myelin
/// implements. README.md says which other parts of the API work today.
const SPEC_VERSIONS: &[&str] = &[
    "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11",
    "v1.12", "v1.13", "v1.14", "v1.15", "v1.16",
];

/// `GET /_matrix/client/versions`
pub async fn versions() -> Json<Value> {
    Json(json!({
        "versions": SPEC_VERSIONS,
        "unstable_features": { "org.matrix.simplified_msc3575": true },
    }))
}

/// `GET /_matrix/client/v3/capabilities`
pub async fn capabilities(State(state): State<AppState>, Auth(_): Auth) -> Json<Value> {
    let available: serde_json::Map<String, Value> = crate::events::SUPPORTED_ROOM_VERSIONS
        .iter()
        .map(|version| (version.to_string(), json!("stable")))
        .collect();
    Json(json!({
        "capabilities": {
            "m.room_versions": {
                "default": state.config.default_room_version,
                "available": available,
            },
            "m.change_password": { "enabled": true },
            "m.set_displayname": { "enabled": true },
            "m.set_avatar_url": { "enabled": true },
            "m.profile_fields": { "enabled": true },
            "m.3pid_changes": { "enabled": true },
            "m.get_login_token": {
                "enabled": state.config.login_via_existing_session.enabled,
            },
        }
    }))
}

/// `GET /.well-known/matrix/client`
pub async fn well_known(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    well_known_body(&state.config)
        .map(Json)
        .ok_or_else(|| MatrixError::not_found("No .well-known configured"))
}

/// `GET /.well-known/matrix/support`: the configured contacts and support
/// page; 404 when neither is configured.
pub async fn support(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let known = &state.config.well_known;
    if known.support_contacts.is_empty() && known.support_page.is_none() {
        return Err(MatrixError::not_found("No support contacts are configured"));
    }
    let contacts: Vec<Value> = known
        .support_contacts
        .iter()
        .map(|contact| {
            let mut entry = json!({ "role": contact.role });
            if let Some(id) = &contact.matrix_id {
                entry["matrix_id"] = json!(id);
            }
            if let Some(email) = &contact.email_address {
                entry["email_address"] = json!(email);
            }
            entry
        })
        .collect();
    let mut body = json!({ "contacts": contacts });
    if let Some(page) = &known.support_page {
        body["support_page"] = json!(page);
    }
    Ok(Json(body))
}

/// The client discovery document, when `well_known.client_base_url` is set.
pub fn well_known_body(config: &Config) -> Option<Value> {
    let base_url = config.well_known.client_base_url.as_ref()?;
    let mut body = json!({ "m.homeserver": { "base_url": base_url } });
    if let Some(identity) = &config.well_known.identity_server_base_url {
        body["m.identity_server"] = json!({ "base_url": identity });
    }
    Some(body)
}
