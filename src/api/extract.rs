//! Request extractors that parse once and fail with Matrix errors.

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};

use crate::front::ClientAddr;
use axum::http::request::Parts;
use axum::http::{header, Method};
use serde::de::DeserializeOwned;

use super::error::MatrixError;
use super::AppState;
use crate::services::accounts::Authed;

/// A JSON request body of type `T`.
///
/// A body over `max_request_body_bytes` is 413 `M_TOO_LARGE`, a body that is
/// not JSON is 400 `M_NOT_JSON`, and JSON of the wrong shape is 400
/// `M_BAD_JSON`. An empty body on a `DELETE` reads as `{}`, since clients
/// send none when the spec makes the body optional.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = MatrixError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.config.max_request_body_bytes;
        let is_delete = request.method() == Method::DELETE;
        let bytes = read_body(request.into_body(), limit).await?;
        let value: serde_json::Value = if bytes.is_empty() && is_delete {
            serde_json::json!({})
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| MatrixError::not_json(format!("Content not JSON: {e}")))?
        };
        if !value.is_object() {
            return Err(MatrixError::bad_json("Content must be a JSON object"));
        }
        let parsed = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                MatrixError::bad_json(e.inner().to_string())
            } else {
                MatrixError::bad_json(format!("{path}: {}", e.inner()))
            }
        })?;
        Ok(JsonBody(parsed))
    }
}

/// A federation request whose `X-Matrix` signature checked out: the server
/// that sent it and the body it signed. A missing or wrong signature is 401
/// `M_UNAUTHORIZED`.
pub struct Signed {
    pub origin: ruma::OwnedServerName,
    pub body: bytes::Bytes,
}

impl FromRequest<AppState> for Signed {
    type Rejection = MatrixError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        let body = read_body(body, state.config.max_request_body_bytes).await?;
        let uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path(), |p| p.as_str());
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        let origin = state
            .federation
            .authenticate(authorization, &parts.method, uri, &body)
            .await?;
        tracing::Span::current().record("origin", tracing::field::display(&origin));
        Ok(Signed { origin, body })
    }
}

impl Signed {
    /// The body as JSON of type `T` (400 `M_NOT_JSON` or `M_BAD_JSON`).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, MatrixError> {
        let value: serde_json::Value = serde_json::from_slice(&self.body)
            .map_err(|e| MatrixError::not_json(format!("Content not JSON: {e}")))?;
        serde_json::from_value(value).map_err(|e| MatrixError::bad_json(e.to_string()))
    }
}

/// Reads a whole body, refusing one larger than `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, MatrixError> {
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        if is_length_limit(&error) {
            MatrixError::too_large(limit)
        } else {
            MatrixError::bad_json(format!("Could not read the request body: {error}"))
        }
    })
}

/// Whether a body error, or any error it wraps, is the length limit's.
fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        current = error.source();
    }
    false
}

/// The user and device of a request's access token, given in the
/// `Authorization: Bearer` header or the deprecated `access_token` query
/// parameter.
pub struct Auth(pub Authed);

impl FromRequestParts<AppState> for Auth {
    type Rejection = MatrixError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = access_token(parts).ok_or_else(MatrixError::missing_token)?;
        let authed = match state.appservices.by_token(&token) {
            Some(service) => {
                let param = |name: &str| query_param(parts, name);
                let device_id = if service.device_extensions {
                    param("org.matrix.msc3202.device_id").or_else(|| param("device_id"))
                } else {
                    None
                };
                let user_id = param("user_id");
                let mut authed = state.accounts.authenticate_appservice(
                    service,
                    user_id.as_deref(),
                    device_id.as_deref(),
                )?;
                authed.origin_ts = param("ts").and_then(|ts| ts.parse().ok());
                authed
            }
            None => state.accounts.authenticate_request(&token)?,
        };
        let path = parts.uri.path();
        if authed.locked && !path.ends_with("/logout") && !path.ends_with("/logout/all") {
            return Err(crate::services::error::Error::UserLocked.into());
        }
        if authed.suspended && !suspended_may(&parts.method, path) {
            return Err(crate::services::error::Error::UserSuspended.into());
        }
        let span = tracing::Span::current();
        span.record("user_id", tracing::field::display(&authed.user_id));
        span.record("device_id", authed.device_id.as_str());
        Ok(Auth(authed))
    }
}

/// The authenticated user when the request carries an access token (which
/// must then be valid); `None` without one.
pub struct OptionalAuth(pub Option<Authed>);

impl FromRequestParts<AppState> for OptionalAuth {
    type Rejection = MatrixError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if access_token(parts).is_none() {
            return Ok(OptionalAuth(None));
        }
        Auth::from_request_parts(parts, state)
            .await
            .map(|Auth(authed)| OptionalAuth(Some(authed)))
    }
}

/// Whether a suspended account may make this request: it may read, leave
/// rooms and reject invites, redact, log out, manage its devices, keys
/// and account data; it may not send events, change state, create, join,
/// knock on or invite to rooms, change its profile or upload media.
fn suspended_may(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    if *method == Method::GET || *method == Method::HEAD || *method == Method::OPTIONS {
        return true;
    }
    let segments: Vec<&str> = path.split('/').collect();
    let has = |name: &str| segments.contains(&name);
    let refused = has("createRoom")
        || has("join")
        || has("knock")
        || has("invite")
        || (has("rooms") && (has("send") || has("state")))
        || has("profile")
        || (has("media") && (has("upload") || has("create")));
    !refused
}

/// The access token a request carries, if any, unchecked: for the
/// endpoints that take an application service's token without an
/// account (`m.login.application_service`).
pub struct BearerToken(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for BearerToken {
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(BearerToken(access_token(parts)))
    }
}

/// One query parameter of the request, decoded.
fn query_param(parts: &Parts, name: &str) -> Option<String> {
    let query = parts.uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

fn access_token(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    let query = parts.uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "access_token")
        .map(|(_, value)| value.into_owned())
}

/// The client's address, for rate limits and device "last seen" records.
pub struct ClientIp(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<ClientAddr>>()
            .map(|ConnectInfo(ClientAddr(addr))| addr.ip().to_string())
            .unwrap_or_else(|| "unknown".to_owned());
        Ok(ClientIp(ip))
    }
}

/// Query parameters of type `T`; a bad one is 400 `M_INVALID_PARAM`.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| Query(value))
            .map_err(|e| MatrixError::invalid_param(e.body_text()))
    }
}

/// Path parameters of type `T`; a bad one is 400 `M_INVALID_PARAM`.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = MatrixError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|e| MatrixError::invalid_param(e.body_text()))
    }
}
