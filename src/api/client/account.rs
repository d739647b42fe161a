//! Registration and account management.
//!
//! - `POST /_matrix/client/v3/register`
//! - `GET /_matrix/client/v3/register/available`
//! - `GET /_matrix/client/v1/register/m.login.registration_token/validity`
//! - `GET /_matrix/client/v3/account/whoami`
//! - `POST /_matrix/client/v3/account/password`
//! - `POST /_matrix/client/v3/account/deactivate`

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::session::{appservice_login_unsupported, appservice_of, login_answer};
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, BearerToken, ClientIp, JsonBody, OptionalAuth, Query};
use crate::api::AppState;
use crate::config::RegistrationMode;
use crate::services::accounts::NewDevice;
use crate::services::error::Error;
use crate::services::rate_limit::Kind;
use crate::services::threepids::Purpose;
use crate::services::uia::{Flows, STAGE_EMAIL, STAGE_PASSWORD};
use crate::services::PASSWORD_RESET;

/// Longest password accepted, in bytes (Synapse's limit).
const MAX_PASSWORD_BYTES: usize = 512;

#[derive(Deserialize)]
pub struct RegisterQuery {
    #[serde(default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
pub struct RegisterBody {
    /// `m.login.application_service` for an application service's user.
    #[serde(rename = "type")]
    kind: Option<String>,
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
    #[serde(default)]
    refresh_token: bool,
    auth: Option<Value>,
}

/// `POST /_matrix/client/v3/register`
pub async fn register(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    BearerToken(token): BearerToken,
    Query(query): Query<RegisterQuery>,
    JsonBody(mut body): JsonBody<RegisterBody>,
) -> ApiResult<Json<Value>> {
    match query.kind.as_deref() {
        None | Some("user") => {}
        Some("guest") => return Err(Error::GuestAccessForbidden.into()),
        Some(other) => {
            return Err(MatrixError::invalid_param(format!(
                "unknown kind {other:?}"
            )))
        }
    }
    if body.kind.as_deref() == Some("m.login.application_service") {
        let service = appservice_of(&state, token.as_deref())?;
        return register_for_appservice(&state, service, ip, body).await;
    }
    if token.is_some_and(|token| state.appservices.by_token(&token).is_some()) {
        return Err(MatrixError::invalid_param(
            "An application service registers with type m.login.application_service",
        ));
    }
    let Some(flows) = state.registration_flows() else {
        return Err(MatrixError::forbidden("Registration has been disabled"));
    };
    state.rate_limiter.peek(Kind::Registration, &ip)?;
    let username = body.username.as_deref().map(str::to_lowercase);
    if let Some(username) = &username {
        state.accounts.check_available(username)?;
        let user_id = state.accounts.user_id(username).to_string();
        state.appservices.check_user_free(&user_id, None)?;
    }
    if let Some(password) = &body.password {
        check_password_length(password)?;
    }
    let authorized = state
        .authorize_interactively("register", &flows, body.auth.as_ref(), None)
        .await?;
    if let Some(email) = &authorized.email {
        // Checked before the account is made, so that a taken address
        // leaves no account behind.
        let threepid = &email.threepid;
        if state
            .threepids
            .owner(&threepid.medium, &threepid.address)?
            .is_some()
        {
            return Err(Error::ThreepidInUse("Email is already in use".to_owned()).into());
        }
    }
    let password = body
        .password
        .take()
        .ok_or_else(|| MatrixError::missing_param("Missing params: password"))?;
    let localpart = match username {
        Some(username) => username,
        None => crate::ids::new_localpart(&mut rand::thread_rng()),
    };
    state.rate_limiter.check(Kind::Registration, &ip)?;
    let device = body.device(ip);
    let (user_id, login) = state
        .accounts
        .register(&localpart, Some(&password), false, device)
        .await?;
    tracing::info!(%user_id, "registered");
    if let Some(email) = authorized.email {
        state
            .threepids
            .add(
                &user_id.localpart,
                &email.sid,
                &email.client_secret,
                Purpose::Register,
            )
            .await?;
    }
    Ok(Json(registered(&user_id, login.as_ref())))
}

/// Registration by an application service (`m.login.application_service`,
/// authenticated by its `as_token`): a user in its namespaces, no
/// password and no user-interactive authentication, even when
/// registration is closed to everyone else.
async fn register_for_appservice(
    state: &AppState,
    service: &myelin_appservices::Registration,
    ip: String,
    mut body: RegisterBody,
) -> ApiResult<Json<Value>> {
    if service.rate_limited {
        state.rate_limiter.check(Kind::Registration, &ip)?;
    }
    let localpart = body
        .username
        .as_deref()
        .map(str::to_lowercase)
        .ok_or_else(|| MatrixError::missing_param("Missing params: username"))?;
    let user_id = state.accounts.user_id(&localpart).to_string();
    if !service.may_masquerade_as(&user_id) {
        return Err(Error::Exclusive(format!(
            "{user_id} is not in the application service's namespaces"
        ))
        .into());
    }
    state.appservices.check_user_free(&user_id, Some(service))?;
    if service.device_management && !body.inhibit_login {
        return Err(appservice_login_unsupported());
    }
    let device = body.device(ip);
    let (user_id, login) = state
        .accounts
        .register_for_appservice(&localpart, device)
        .await?;
    tracing::info!(%user_id, appservice = %service.id, "registered for an application service");
    Ok(Json(registered(&user_id, login.as_ref())))
}

impl RegisterBody {
    /// The first device asked for, unless `inhibit_login`.
    fn device(&mut self, ip: String) -> Option<NewDevice> {
        (!self.inhibit_login).then(|| NewDevice {
            device_id: self.device_id.take(),
            display_name: self.initial_device_display_name.take(),
            wants_refresh_token: self.refresh_token,
            ip: Some(ip),
        })
    }
}

/// The answer to a registration: the new device's credentials, or the
/// user ID alone without a login.
fn registered(
    user_id: &crate::ids::UserId,
    login: Option<&crate::services::accounts::Login>,
) -> Value {
    match login {
        Some(login) => login_answer(login),
        None => json!({ "user_id": user_id.to_string() }),
    }
}

fn check_password_length(password: &str) -> ApiResult<()> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(MatrixError::invalid_param(format!(
            "Password is longer than {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct AvailableQuery {
    username: Option<String>,
}

/// `GET /_matrix/client/v3/register/available`
pub async fn available(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(query): Query<AvailableQuery>,
) -> ApiResult<Json<Value>> {
    if state.config.registration == RegistrationMode::Disabled {
        return Err(MatrixError::forbidden("Registration has been disabled"));
    }
    state.rate_limiter.peek(Kind::Registration, &ip)?;
    let username = query
        .username
        .ok_or_else(|| MatrixError::missing_param("Missing params: username"))?;
    state.accounts.check_available(&username)?;
    let user_id = state.accounts.user_id(&username).to_string();
    state.appservices.check_user_free(&user_id, None)?;
    Ok(Json(json!({ "available": true })))
}

#[derive(Deserialize)]
pub struct TokenValidityQuery {
    token: Option<String>,
}

/// `GET /_matrix/client/v1/register/m.login.registration_token/validity`
pub async fn registration_token_validity(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(query): Query<TokenValidityQuery>,
) -> ApiResult<Json<Value>> {
    if state.config.registration != RegistrationMode::Token {
        return Err(MatrixError::forbidden(
            "Registration by token is not enabled",
        ));
    }
    state
        .rate_limiter
        .check(Kind::RegistrationTokenValidity, &ip)?;
    let token = query
        .token
        .ok_or_else(|| MatrixError::missing_param("Missing params: token"))?;
    Ok(Json(
        json!({ "valid": state.registration_token_valid(&token) }),
    ))
}

/// `GET /_matrix/client/v3/account/whoami`
pub async fn whoami(Auth(authed): Auth) -> Json<Value> {
    let mut answer = json!({
        "user_id": authed.user_id.to_string(),
        "is_guest": false,
    });
    // An application service acting without a device has none to name.
    if !authed.device_id.is_empty() {
        answer["device_id"] = json!(authed.device_id);
    }
    Json(answer)
}

#[derive(Deserialize)]
pub struct PasswordBody {
    new_password: Option<String>,
    #[serde(default = "yes")]
    logout_devices: bool,
    auth: Option<Value>,
}

fn yes() -> bool {
    true
}

/// A forgotten password, reset through a validated email address.
async fn reset_password(state: AppState, body: PasswordBody) -> ApiResult<Json<Value>> {
    if !state.threepids.email_enabled() {
        return Err(MatrixError::missing_token());
    }
    let flows = Flows(vec![vec![STAGE_EMAIL]]);
    let authorized = state
        .authorize_interactively(PASSWORD_RESET, &flows, body.auth.as_ref(), None)
        .await?;
    let email = authorized
        .email
        .ok_or_else(|| Error::Internal("the email stage established no address".to_owned()))?;
    let password = body
        .new_password
        .ok_or_else(|| MatrixError::missing_param("Missing params: new_password"))?;
    let localpart = state
        .threepids
        .take_password_reset(&email.sid, &email.client_secret)
        .await?;
    state
        .accounts
        .set_password(&localpart, &password, body.logout_devices, None)
        .await?;
    tracing::info!(%localpart, "password reset by email");
    Ok(Json(json!({})))
}

/// `POST /_matrix/client/v3/account/password`: with an access token, the
/// account's password stage; without one, a password reset by an email
/// address validated through `/account/password/email/requestToken`.
pub async fn change_password(
    State(state): State<AppState>,
    OptionalAuth(authed): OptionalAuth,
    JsonBody(body): JsonBody<PasswordBody>,
) -> ApiResult<Json<Value>> {
    if let Some(password) = &body.new_password {
        check_password_length(password)?;
    }
    let Some(authed) = authed else {
        return reset_password(state, body).await;
    };
    let flows = Flows(vec![vec![STAGE_PASSWORD]]);
    let purpose = format!("password {}", authed.user_id);
    state
        .authorize_interactively(&purpose, &flows, body.auth.as_ref(), Some(&authed))
        .await?;
    let password = body
        .new_password
        .ok_or_else(|| MatrixError::missing_param("Missing params: new_password"))?;
    state
        .accounts
        .set_password(
            authed.localpart(),
            &password,
            body.logout_devices,
            Some(&authed.device_id),
        )
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct DeactivateBody {
    auth: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    erase: bool,
    id_server: Option<String>,
}

/// `POST /_matrix/client/v3/account/deactivate`
///
/// Deactivation always removes the profile, so `erase` asks for nothing
/// more. The account's email addresses are removed and unbound from the
/// identity servers they were bound on (or `id_server`).
pub async fn deactivate(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<DeactivateBody>,
) -> ApiResult<Json<Value>> {
    let flows = Flows(vec![vec![STAGE_PASSWORD]]);
    let purpose = format!("deactivate {}", authed.user_id);
    state
        .authorize_interactively(&purpose, &flows, body.auth.as_ref(), Some(&authed))
        .await?;
    let unbound = state
        .deactivate_account(authed.localpart(), body.id_server.as_deref(), None)
        .await?;
    tracing::info!(user_id = %authed.user_id, "deactivated");
    Ok(Json(json!({ "id_server_unbind_result": unbound })))
}
