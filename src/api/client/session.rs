//! Logging in and out.
//!
//! - `GET /_matrix/client/v3/login`
//! - `POST /_matrix/client/v3/login`
//! - `POST /_matrix/client/v3/refresh`
//! - `POST /_matrix/client/v3/logout`
//! - `POST /_matrix/client/v3/logout/all`

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, BearerToken, ClientIp, JsonBody};
use crate::api::AppState;
use crate::services::accounts::{Login, NewDevice};
use crate::services::error::Error;
use crate::services::rate_limit::Kind;

/// `GET /_matrix/client/v3/login`: passwords, application services' logins
/// when some are configured, and login tokens when signing in from an
/// existing session is on (`POST /login/get_token` gives them).
pub async fn login_flows(State(state): State<AppState>) -> Json<Value> {
    let mut flows = vec![json!({ "type": "m.login.password" })];
    if !state.appservices.is_empty() {
        flows.push(json!({ "type": "m.login.application_service" }));
    }
    if state.config.login_via_existing_session.enabled {
        flows.push(json!({ "type": "m.login.token", "get_login_token": true }));
    }
    Json(json!({ "flows": flows }))
}

#[derive(Deserialize)]
pub struct LoginBody {
    #[serde(rename = "type")]
    login_type: String,
    identifier: Option<Identifier>,
    /// The identifier's predecessors, still sent by old clients.
    user: Option<String>,
    medium: Option<String>,
    address: Option<String>,
    password: Option<String>,
    /// For `m.login.token`.
    token: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    refresh_token: bool,
}

#[derive(Deserialize)]
pub struct Identifier {
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
    /// For `m.id.thirdparty`.
    medium: Option<String>,
    address: Option<String>,
}

/// `POST /_matrix/client/v3/login`
pub async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    BearerToken(token): BearerToken,
    JsonBody(body): JsonBody<LoginBody>,
) -> ApiResult<Json<Value>> {
    let service = match body.login_type.as_str() {
        "m.login.application_service" => Some(appservice_of(&state, token.as_deref())?),
        _ => None,
    };
    if service.is_none() {
        state.rate_limiter.check(Kind::Login, &ip)?;
    }
    let device = NewDevice {
        device_id: body.device_id.clone(),
        display_name: body.initial_device_display_name.clone(),
        wants_refresh_token: body.refresh_token,
        ip: Some(ip.clone()),
    };
    if let Some(service) = service {
        if service.device_management {
            return Err(appservice_login_unsupported());
        }
        let user = match (&body.identifier, &body.user) {
            (Some(identifier), _) if identifier.kind == "m.id.user" => identifier.user.clone(),
            (None, user) => user.clone(),
            _ => None,
        }
        .ok_or_else(|| MatrixError::missing_param("identifier.user is required"))?;
        let localpart = state
            .accounts
            .resolve_local_user(&user)
            .ok_or_else(|| MatrixError::forbidden("Invalid username"))?;
        let user_id = state.accounts.user_id(&localpart).to_string();
        // The spec exempts the service's sender from its rate limits.
        if service.rate_limited && user_id != service.sender {
            state.rate_limiter.check(Kind::Login, &ip)?;
        }
        if !service.may_masquerade_as(&user_id) {
            return Err(Error::Exclusive(format!(
                "{user_id} is not in the application service's namespaces"
            ))
            .into());
        }
        let login = state
            .accounts
            .login_for_appservice(&localpart, device)
            .await?;
        tracing::info!(user_id = %login.user_id, appservice = %service.id, "logged in for an application service");
        return Ok(Json(logged_in(&state, &login)));
    }
    if body.login_type == "m.login.token" {
        let token = body
            .token
            .as_deref()
            .ok_or_else(|| MatrixError::missing_param("Missing parameter: token"))?;
        let login = state.accounts.login_with_token(token, device).await?;
        tracing::info!(user_id = %login.user_id, device_id = %login.device_id, "logged in with a token");
        return Ok(Json(logged_in(&state, &login)));
    }
    if body.login_type != "m.login.password" {
        return Err(Error::Unknown(format!("Unknown login type {}", body.login_type)).into());
    }
    let user = match body.identifier {
        Some(identifier) if identifier.kind == "m.id.user" => identifier
            .user
            .ok_or_else(|| MatrixError::missing_param("identifier.user is required"))?,
        Some(identifier) if identifier.kind == "m.id.thirdparty" => {
            let (Some(medium), Some(address)) = (identifier.medium, identifier.address) else {
                return Err(MatrixError::missing_param(
                    "identifier.medium and identifier.address are required",
                ));
            };
            threepid_owner(&state, &medium, &address)?
        }
        Some(identifier) if identifier.kind.starts_with("m.id.") => {
            // Phone numbers (`m.id.phone`) are never added to accounts here.
            return Err(MatrixError::forbidden("Invalid username or password"));
        }
        Some(identifier) => {
            return Err(Error::Unknown(format!(
                "Unknown login identifier type {}",
                identifier.kind
            ))
            .into())
        }
        None => match (body.user, body.medium, body.address) {
            (Some(user), _, _) => user,
            (None, Some(medium), Some(address)) => threepid_owner(&state, &medium, &address)?,
            _ => return Err(MatrixError::invalid_param("Invalid login submission")),
        },
    };
    let password = body
        .password
        .ok_or_else(|| MatrixError::missing_param("Missing parameter: password"))?;
    let login = state
        .accounts
        .login_with_password(&user, &password, device)
        .await?;
    tracing::info!(user_id = %login.user_id, device_id = %login.device_id, "logged in");
    Ok(Json(logged_in(&state, &login)))
}

/// A service that manages its devices itself (MSC4190) makes them with
/// `PUT /devices/{deviceId}`, not by logging in.
pub fn appservice_login_unsupported() -> MatrixError {
    MatrixError::new(
        axum::http::StatusCode::BAD_REQUEST,
        "M_APPSERVICE_LOGIN_UNSUPPORTED",
        "This application service manages its devices (MSC4190): it cannot log in".to_owned(),
    )
}

/// The application service whose `as_token` a request carries: 401 when
/// it carries none, or another token.
pub fn appservice_of<'a>(
    state: &'a AppState,
    token: Option<&str>,
) -> ApiResult<&'a myelin_appservices::Registration> {
    let token = token.ok_or_else(MatrixError::missing_token)?;
    state
        .appservices
        .by_token(token)
        .ok_or_else(|| Error::UnknownToken { soft_logout: false }.into())
}

/// The account a third-party identifier of a login belongs to; an unknown
/// one is refused as a wrong password would be, so that a login attempt
/// does not tell whether an address has an account.
fn threepid_owner(state: &AppState, medium: &str, address: &str) -> ApiResult<String> {
    state
        .threepids
        .login_owner(medium, address)?
        .ok_or_else(|| MatrixError::forbidden("Invalid username or password"))
}

/// The answer to a login: the credentials, the server name and discovery.
fn logged_in(state: &AppState, login: &Login) -> Value {
    let mut answer = login_answer(login);
    answer["home_server"] = json!(state.config.server_name);
    if let Some(well_known) = super::discovery::well_known_body(&state.config) {
        answer["well_known"] = well_known;
    }
    answer
}

/// The credentials part of a login or registration answer.
pub fn login_answer(login: &Login) -> Value {
    let mut answer = json!({
        "user_id": login.user_id.to_string(),
        "access_token": login.access_token,
        "device_id": login.device_id,
    });
    if let Some(refresh_token) = &login.refresh_token {
        answer["refresh_token"] = json!(refresh_token);
    }
    if let Some(expires_in_ms) = login.expires_in_ms {
        answer["expires_in_ms"] = json!(expires_in_ms);
    }
    answer
}

#[derive(Deserialize)]
pub struct RefreshBody {
    refresh_token: String,
}

/// `POST /_matrix/client/v3/refresh`
pub async fn refresh(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<RefreshBody>,
) -> ApiResult<Json<Value>> {
    let login = state.accounts.refresh(&body.refresh_token).await?;
    Ok(Json(json!({
        "access_token": login.access_token,
        "refresh_token": login.refresh_token,
        "expires_in_ms": login.expires_in_ms,
    })))
}

/// `POST /_matrix/client/v3/logout`: deletes the device and its token.
pub async fn logout(State(state): State<AppState>, Auth(authed): Auth) -> ApiResult<Json<Value>> {
    state
        .accounts
        .delete_devices(authed.localpart(), std::slice::from_ref(&authed.device_id))
        .await?;
    Ok(Json(json!({})))
}

/// `POST /_matrix/client/v3/logout/all`: deletes every device of the user.
pub async fn logout_all(
    State(state): State<AppState>,
    Auth(authed): Auth,
) -> ApiResult<Json<Value>> {
    state
        .accounts
        .delete_all_devices(authed.localpart(), None)
        .await?;
    Ok(Json(json!({})))
}
