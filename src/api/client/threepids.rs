//! Third-party identifiers (email addresses) of accounts.
//!
//! - `GET /account/3pid`, `POST /account/3pid` (deprecated),
//!   `POST /account/3pid/add`, `/delete`, `/bind`, `/unbind`
//! - `POST /account/3pid/email/requestToken`, `/register/email/requestToken`,
//!   `/account/password/email/requestToken`, and their `msisdn` twins,
//!   which are not supported (no SMS service)
//! - `GET`/`POST /_matrix/client/unstable/add_threepid/email/submit_token`:
//!   the link in the email, and the `submit_url` of `requestToken`

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, ClientIp, JsonBody, Query};
use crate::api::AppState;
use crate::config::RegistrationMode;
use crate::services::error::Error;
use crate::services::rate_limit::Kind;
use crate::services::threepids::{canonical_email, BindRequest, Purpose, Threepid, MEDIUM_EMAIL};
use crate::services::uia::{Flows, STAGE_PASSWORD};

/// `GET /account/3pid`
pub async fn list(State(state): State<AppState>, Auth(authed): Auth) -> ApiResult<Json<Value>> {
    let threepids = state.threepids.of_user(authed.localpart())?;
    Ok(Json(json!({ "threepids": threepids })))
}

#[derive(Deserialize)]
pub struct AddBody {
    auth: Option<Value>,
    client_secret: Option<String>,
    sid: Option<String>,
}

/// `POST /account/3pid/add`: the address of a session validated through
/// `/account/3pid/email/requestToken`, after the account's password.
pub async fn add(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<AddBody>,
) -> ApiResult<Json<Value>> {
    let flows = Flows(vec![vec![STAGE_PASSWORD]]);
    let purpose = format!("add_threepid {}", authed.user_id);
    state
        .authorize_interactively(&purpose, &flows, body.auth.as_ref(), Some(&authed))
        .await?;
    let (Some(client_secret), Some(sid)) = (body.client_secret, body.sid) else {
        return Err(MatrixError::missing_param(
            "Missing params: client_secret, sid",
        ));
    };
    let threepid = state
        .threepids
        .add(authed.localpart(), &sid, &client_secret, Purpose::Add)
        .await?;
    tracing::info!(user_id = %authed.user_id, medium = %threepid.medium, "third-party identifier added");
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct LegacyAddBody {
    three_pid_creds: Option<Creds>,
    #[serde(rename = "threePidCreds")]
    three_pid_creds_old: Option<Creds>,
    #[serde(default)]
    bind: bool,
}

#[derive(Deserialize)]
pub struct Creds {
    client_secret: String,
    sid: String,
    id_server: Option<String>,
    id_access_token: Option<String>,
}

/// `POST /account/3pid` (deprecated): adds the address of a validated
/// session, and binds it on the identity server too when `bind` asks.
pub async fn legacy_add(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<LegacyAddBody>,
) -> ApiResult<Json<Value>> {
    let creds = body
        .three_pid_creds
        .or(body.three_pid_creds_old)
        .ok_or_else(|| MatrixError::missing_param("Missing param: three_pid_creds"))?;
    state
        .threepids
        .add(
            authed.localpart(),
            &creds.sid,
            &creds.client_secret,
            Purpose::Add,
        )
        .await?;
    if body.bind {
        let (Some(id_server), Some(id_access_token)) = (creds.id_server, creds.id_access_token)
        else {
            return Err(MatrixError::missing_param(
                "bind needs id_server and id_access_token",
            ));
        };
        state
            .threepids
            .bind(
                &state.federation.client,
                authed.localpart(),
                &authed.user_id.to_string(),
                &BindRequest {
                    id_server: &id_server,
                    id_access_token: &id_access_token,
                    sid: &creds.sid,
                    client_secret: &creds.client_secret,
                },
            )
            .await?;
    }
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct BindBody {
    client_secret: Option<String>,
    id_server: Option<String>,
    id_access_token: Option<String>,
    sid: Option<String>,
}

/// `POST /account/3pid/bind`: through the identity server, which validated
/// the address; its errors are passed on.
pub async fn bind(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<BindBody>,
) -> ApiResult<Json<Value>> {
    let (Some(client_secret), Some(id_server), Some(id_access_token), Some(sid)) = (
        body.client_secret,
        body.id_server,
        body.id_access_token,
        body.sid,
    ) else {
        return Err(MatrixError::missing_param(
            "Missing params: client_secret, id_server, id_access_token, sid",
        ));
    };
    state
        .threepids
        .bind(
            &state.federation.client,
            authed.localpart(),
            &authed.user_id.to_string(),
            &BindRequest {
                id_server: &id_server,
                id_access_token: &id_access_token,
                sid: &sid,
                client_secret: &client_secret,
            },
        )
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct RemoveBody {
    medium: Option<String>,
    address: Option<String>,
    id_server: Option<String>,
}

impl RemoveBody {
    fn threepid(&self) -> ApiResult<Threepid> {
        let (Some(medium), Some(address)) = (&self.medium, &self.address) else {
            return Err(MatrixError::missing_param(
                "Missing params: medium, address",
            ));
        };
        let address = match medium.as_str() {
            MEDIUM_EMAIL => canonical_email(address)?,
            "msisdn" => address.clone(),
            other => {
                return Err(MatrixError::invalid_param(format!(
                    "unknown medium {other:?}"
                )))
            }
        };
        Ok(Threepid {
            medium: medium.clone(),
            address,
        })
    }
}

/// `POST /account/3pid/delete`: removes the address from the account and
/// unbinds it.
pub async fn delete(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<RemoveBody>,
) -> ApiResult<Json<Value>> {
    let threepid = body.threepid()?;
    let unbound = state
        .threepids
        .delete(
            &state.federation.client,
            authed.localpart(),
            &authed.user_id.to_string(),
            &threepid,
            body.id_server.as_deref(),
        )
        .await?;
    Ok(Json(json!({ "id_server_unbind_result": unbound })))
}

/// `POST /account/3pid/unbind`: from the identity server only; the
/// account keeps the address.
pub async fn unbind(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<RemoveBody>,
) -> ApiResult<Json<Value>> {
    let threepid = body.threepid()?;
    let unbound = state
        .threepids
        .unbind(
            &state.federation.client,
            authed.localpart(),
            &authed.user_id.to_string(),
            &threepid,
            body.id_server.as_deref(),
        )
        .await?;
    Ok(Json(json!({ "id_server_unbind_result": unbound })))
}

#[derive(Deserialize)]
pub struct EmailTokenBody {
    client_secret: Option<String>,
    email: Option<String>,
    send_attempt: Option<u64>,
}

/// `POST /account/3pid/email/requestToken`
pub async fn add_email_token(
    state: State<AppState>,
    ip: ClientIp,
    body: JsonBody<EmailTokenBody>,
) -> ApiResult<Json<Value>> {
    request_email_token(state, ip, body, Purpose::Add).await
}

/// `POST /register/email/requestToken`
pub async fn register_email_token(
    state: State<AppState>,
    ip: ClientIp,
    body: JsonBody<EmailTokenBody>,
) -> ApiResult<Json<Value>> {
    if state.config.registration == RegistrationMode::Disabled {
        return Err(MatrixError::forbidden("Registration has been disabled"));
    }
    request_email_token(state, ip, body, Purpose::Register).await
}

/// `POST /account/password/email/requestToken`
pub async fn password_email_token(
    state: State<AppState>,
    ip: ClientIp,
    body: JsonBody<EmailTokenBody>,
) -> ApiResult<Json<Value>> {
    request_email_token(state, ip, body, Purpose::Password).await
}

async fn request_email_token(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    JsonBody(body): JsonBody<EmailTokenBody>,
    purpose: Purpose,
) -> ApiResult<Json<Value>> {
    if !state.threepids.email_enabled() {
        return Err(Error::ThreepidMediumNotSupported(
            "Email is not configured on this server".to_owned(),
        )
        .into());
    }
    let (Some(client_secret), Some(email), Some(send_attempt)) =
        (body.client_secret, body.email, body.send_attempt)
    else {
        return Err(MatrixError::missing_param(
            "Missing params: client_secret, email, send_attempt",
        ));
    };
    state.rate_limiter.check(Kind::ThreepidValidation, &ip)?;
    let sid = state
        .threepids
        .request_email_token(purpose, &client_secret, &email, send_attempt)
        .await?;
    Ok(Json(json!({
        "sid": sid,
        "submit_url": state.threepids.submit_url(),
    })))
}

/// The `msisdn` `requestToken` endpoints: this server cannot send SMS.
pub async fn msisdn_token() -> MatrixError {
    Error::ThreepidMediumNotSupported("This server cannot validate phone numbers".to_owned()).into()
}

#[derive(Deserialize)]
pub struct SubmitToken {
    sid: Option<String>,
    client_secret: Option<String>,
    token: Option<String>,
}

impl SubmitToken {
    async fn submit(self, state: &AppState) -> ApiResult<()> {
        let (Some(sid), Some(client_secret), Some(token)) =
            (self.sid, self.client_secret, self.token)
        else {
            return Err(MatrixError::missing_param(
                "Missing params: sid, client_secret, token",
            ));
        };
        state
            .threepids
            .submit_token(&sid, &client_secret, &token)
            .await?;
        Ok(())
    }
}

/// `POST .../add_threepid/email/submit_token`: the client gives the code.
pub async fn submit_token(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<SubmitToken>,
) -> ApiResult<Json<Value>> {
    body.submit(&state).await?;
    Ok(Json(json!({ "success": true })))
}

/// `GET .../add_threepid/email/submit_token`: the link in the email, opened
/// in a browser; a page says whether it worked.
pub async fn submit_token_link(
    State(state): State<AppState>,
    Query(query): Query<SubmitToken>,
) -> Response {
    let (status, message) = match query.submit(&state).await {
        Ok(()) => (
            StatusCode::OK,
            "Your email address is confirmed. You may now return to your Matrix client.".to_owned(),
        ),
        Err(error) => {
            let (_, why) = error.parts();
            (error.status(), format!("This link did not work: {why}"))
        }
    };
    let page = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{}</title></head>\
         <body><p>{}</p></body></html>",
        escape_html(&state.config.server_name),
        escape_html(&message)
    );
    (status, [(header::CACHE_CONTROL, "no-store")], Html(page)).into_response()
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
