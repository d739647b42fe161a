//! Calls and other services, and signing in from a device already signed
//! in:
//! - `GET /voip/turnServer`: TURN credentials, time-limited ones made from
//!   the secret shared with the TURN server as coturn expects
//!   (`username = "{expiry}:{user}"`, `password = base64(HMAC-SHA1(secret,
//!   username))`), or fixed ones
//! - `POST /user/{userId}/openid/request_token`: a token another service
//!   checks with `/_matrix/federation/v1/openid/userinfo`
//! - `POST /_matrix/client/v1/login/get_token`: a one-time `m.login.token`

use axum::extract::State;
use axum::Json;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{json, Value};

use super::membership::parse_user;
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path};
use crate::api::AppState;
use crate::services::uia::{Flows, STAGE_PASSWORD};
use crate::storage::tables;

/// How long an OpenID token lasts.
const OPENID_LIFETIME_MS: u64 = 60 * 60 * 1000;

/// `GET /voip/turnServer`
pub async fn turn_server(
    State(state): State<AppState>,
    Auth(authed): Auth,
) -> ApiResult<Json<Value>> {
    let turn = &state.config.turn;
    if turn.uris.is_empty() {
        return Ok(Json(json!({})));
    }
    let ttl_seconds = turn.user_lifetime_ms / 1000;
    let (username, password) = match &turn.shared_secret {
        Some(secret) => {
            let expiry = state.now_ms() / 1000 + ttl_seconds;
            let username = format!("{expiry}:{}", authed.user_id);
            let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
                .map_err(|e| crate::services::error::Error::Internal(e.to_string()))?;
            mac.update(username.as_bytes());
            let digest = mac.finalize().into_bytes();
            let password =
                ruma::serde::Base64::<ruma::serde::base64::Standard>::new(digest.to_vec()).encode();
            (username, password)
        }
        None => (
            turn.username.clone().unwrap_or_default(),
            turn.password.clone().unwrap_or_default(),
        ),
    };
    Ok(Json(json!({
        "username": username,
        "password": password,
        "uris": turn.uris,
        "ttl": ttl_seconds,
    })))
}

/// `POST /user/{userId}/openid/request_token`: for the user themselves.
pub async fn openid_request_token(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path(user_id): Path<String>,
    JsonBody(_body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    if user_id != authed.user_id.to_string() {
        return Err(MatrixError::forbidden(
            "You may only ask for OpenID tokens for yourself",
        ));
    }
    let token = state
        .accounts
        .issue_short_token(tables::OPENID_TOKENS, &user_id, OPENID_LIFETIME_MS)
        .await?;
    Ok(Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "matrix_server_name": state.config.server_name,
        "expires_in": OPENID_LIFETIME_MS / 1000,
    })))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct GetTokenBody {
    auth: Option<Value>,
}

/// `POST /_matrix/client/v1/login/get_token`: a token that logs the user
/// in once more (`m.login.token`), after the password when configured.
pub async fn get_login_token(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<GetTokenBody>,
) -> ApiResult<Json<Value>> {
    let settings = &state.config.login_via_existing_session;
    if !settings.enabled {
        return Err(MatrixError::unrecognized(axum::http::StatusCode::NOT_FOUND));
    }
    let user = parse_user(&authed.user_id.to_string())?;
    if settings.require_auth {
        let flows = Flows(vec![vec![STAGE_PASSWORD]]);
        let purpose = format!("login_get_token {user}");
        state
            .authorize_interactively(&purpose, &flows, body.auth.as_ref(), Some(&authed))
            .await?;
    }
    let token = state
        .accounts
        .issue_short_token(
            tables::LOGIN_TOKENS,
            user.as_str(),
            settings.token_lifetime_ms,
        )
        .await?;
    Ok(Json(json!({
        "login_token": token,
        "expires_in_ms": settings.token_lifetime_ms,
    })))
}
