//! Matrix errors: the one place where failures become `errcode`s.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::services::error::Error;

/// An error answer in the Matrix form `{"errcode": ..., "error": ...}`.
#[derive(Debug)]
pub struct MatrixError {
    status: StatusCode,
    body: Value,
    retry_after_ms: Option<u64>,
}

pub type ApiResult<T> = Result<T, MatrixError>;

impl MatrixError {
    pub fn new(status: StatusCode, errcode: &str, error: impl Into<String>) -> Self {
        MatrixError {
            status,
            body: json!({ "errcode": errcode, "error": error.into() }),
            retry_after_ms: None,
        }
    }

    pub fn not_json(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", error)
    }

    pub fn bad_json(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", error)
    }

    pub fn invalid_param(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", error)
    }

    pub fn missing_param(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", error)
    }

    pub fn forbidden(error: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", error)
    }

    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", error)
    }

    pub fn missing_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "Missing access token",
        )
    }

    pub fn too_large(limit_bytes: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            format!("Request body is larger than the limit of {limit_bytes} bytes"),
        )
    }

    pub fn unrecognized(status: StatusCode) -> Self {
        Self::new(status, "M_UNRECOGNIZED", "Unrecognized request")
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn errcode(&self) -> Option<&str> {
        self.body.get("errcode").and_then(Value::as_str)
    }

    /// The `errcode` and `error`, for answers outside HTTP.
    pub fn parts(&self) -> (String, String) {
        let text = |name: &str| {
            self.body
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        (text("errcode"), text("error"))
    }
}

impl From<Error> for MatrixError {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        let plain = |status, errcode: &str| MatrixError::new(status, errcode, message.clone());
        match error {
            Error::Forbidden(_) => plain(StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            Error::Exclusive(_) => plain(StatusCode::BAD_REQUEST, "M_EXCLUSIVE"),
            Error::AppservicePing(failure) => {
                use crate::services::appservices::PingFailure;
                let (status, errcode) = match &failure {
                    PingFailure::UrlNotSet => (StatusCode::BAD_REQUEST, "M_URL_NOT_SET"),
                    PingFailure::TimedOut => (StatusCode::GATEWAY_TIMEOUT, "M_CONNECTION_TIMEOUT"),
                    PingFailure::Unreachable(_) => (StatusCode::BAD_GATEWAY, "M_CONNECTION_FAILED"),
                    PingFailure::BadStatus { .. } => (StatusCode::BAD_GATEWAY, "M_BAD_STATUS"),
                };
                let mut error = plain(status, errcode);
                if let PingFailure::BadStatus { status, body } = failure {
                    error.body["status"] = json!(status);
                    error.body["body"] = json!(body);
                }
                error
            }
            Error::NotFound(_) => plain(StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            Error::InvalidParam(_) => plain(StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
            Error::MissingParam(_) => plain(StatusCode::BAD_REQUEST, "M_MISSING_PARAM"),
            Error::BadJson(_) => plain(StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            Error::InvalidUsername(_) => plain(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME"),
            Error::UserInUse => plain(StatusCode::BAD_REQUEST, "M_USER_IN_USE"),
            Error::UserDeactivated => plain(StatusCode::FORBIDDEN, "M_USER_DEACTIVATED"),
            Error::UserLocked => {
                let mut error = plain(StatusCode::UNAUTHORIZED, "M_USER_LOCKED");
                error.body["soft_logout"] = json!(true);
                error
            }
            Error::UserSuspended => plain(StatusCode::FORBIDDEN, "M_USER_SUSPENDED"),
            Error::GuestAccessForbidden => plain(StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN"),
            Error::TooLarge(_) => plain(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            Error::KeyTooLarge(_) => plain(StatusCode::BAD_REQUEST, "M_KEY_TOO_LARGE"),
            Error::ProfileTooLarge(_) => plain(StatusCode::BAD_REQUEST, "M_PROFILE_TOO_LARGE"),
            Error::Unknown(_) => plain(StatusCode::BAD_REQUEST, "M_UNKNOWN"),
            Error::Unrecognized(_) => plain(StatusCode::BAD_REQUEST, "M_UNRECOGNIZED"),
            Error::AliasInUse(_) => plain(StatusCode::CONFLICT, "M_UNKNOWN"),
            Error::RoomInUse(_) => plain(StatusCode::BAD_REQUEST, "M_ROOM_IN_USE"),
            Error::RoomFull(_) => plain(StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            Error::InvalidRoomState(_) => plain(StatusCode::BAD_REQUEST, "M_INVALID_ROOM_STATE"),
            Error::BadAlias(_) => plain(StatusCode::BAD_REQUEST, "M_BAD_ALIAS"),
            Error::UnknownPos(_) => plain(StatusCode::BAD_REQUEST, "M_UNKNOWN_POS"),
            Error::Unauthorized(_) => plain(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED"),
            Error::RemoteUnavailable(_) => plain(StatusCode::BAD_GATEWAY, "M_UNKNOWN"),
            Error::ThreepidInUse(_) => plain(StatusCode::BAD_REQUEST, "M_THREEPID_IN_USE"),
            Error::ThreepidNotFound(_) => plain(StatusCode::BAD_REQUEST, "M_THREEPID_NOT_FOUND"),
            Error::ThreepidAuthFailed(_) => {
                plain(StatusCode::BAD_REQUEST, "M_THREEPID_AUTH_FAILED")
            }
            Error::ThreepidMediumNotSupported(_) => {
                plain(StatusCode::BAD_REQUEST, "M_THREEPID_MEDIUM_NOT_SUPPORTED")
            }
            Error::IdentityServer { status, body } => {
                let status = StatusCode::from_u16(status)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                let matrix_error = body.get("errcode").and_then(Value::as_str).is_some();
                if matrix_error {
                    MatrixError {
                        status,
                        body,
                        retry_after_ms: None,
                    }
                } else {
                    MatrixError::new(status, "M_UNKNOWN", message.clone())
                }
            }
            Error::CannotOverwriteMedia(_) => {
                plain(StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA")
            }
            Error::WrongRoomKeysVersion { current_version } => {
                let mut error = plain(StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION");
                error.body["current_version"] = json!(current_version);
                error
            }
            Error::UnsupportedRoomVersion(_) => {
                plain(StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION")
            }
            Error::UnableToAuthoriseJoin(_) => {
                plain(StatusCode::BAD_REQUEST, "M_UNABLE_TO_AUTHORISE_JOIN")
            }
            Error::IncompatibleRoomVersion(version) => {
                let mut error = plain(StatusCode::BAD_REQUEST, "M_INCOMPATIBLE_ROOM_VERSION");
                error.body["room_version"] = json!(version);
                error
            }
            Error::UnknownToken { soft_logout } => {
                let mut error = plain(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
                error.body["soft_logout"] = json!(soft_logout);
                error
            }
            Error::LimitExceeded { retry_after_ms } => {
                let mut error = plain(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
                error.body["retry_after_ms"] = json!(retry_after_ms);
                error.retry_after_ms = Some(retry_after_ms);
                error
            }
            Error::AuthRequired(body) => MatrixError {
                status: StatusCode::UNAUTHORIZED,
                body: *body,
                retry_after_ms: None,
            },
            Error::Storage(_) | Error::Internal(_) => {
                // Logged here, once; the client learns nothing of the cause.
                tracing::error!(error = %message, "request failed");
                MatrixError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "M_UNKNOWN",
                    "Internal server error",
                )
            }
        }
    }
}

impl IntoResponse for MatrixError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(ms) = self.retry_after_ms {
            let seconds = ms.div_ceil(1000).to_string();
            if let Ok(value) = HeaderValue::from_str(&seconds) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}
