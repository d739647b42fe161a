//! The errors services report; the API layer maps each to a Matrix errcode.

use crate::storage::StorageError;

/// Why a service refused or failed a request.
///
/// Each variant names a situation, not a status code: `api::error` is the
/// one place that turns them into HTTP statuses and `errcode`s.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Forbidden(String),
    /// A user ID or alias an application service claims exclusively, or
    /// outside the namespaces of the service asking.
    #[error("{0}")]
    Exclusive(String),
    /// An application service ping that failed.
    #[error("{0}")]
    AppservicePing(super::appservices::PingFailure),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidParam(String),
    #[error("{0}")]
    MissingParam(String),
    #[error("{0}")]
    BadJson(String),
    #[error("{0}")]
    InvalidUsername(String),
    #[error("the desired user ID is already taken")]
    UserInUse,
    #[error("this account has been deactivated")]
    UserDeactivated,
    /// The account is locked by an admin (401, soft logout).
    #[error("This account has been locked")]
    UserLocked,
    /// The account is suspended by an admin and may not do this.
    #[error("This account has been suspended and may not do this")]
    UserSuspended,
    #[error("guest access is not enabled on this server")]
    GuestAccessForbidden,
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    KeyTooLarge(String),
    #[error("{0}")]
    ProfileTooLarge(String),
    #[error("unrecognised access token")]
    UnknownToken { soft_logout: bool },
    #[error("too many requests")]
    LimitExceeded { retry_after_ms: u64 },
    #[error("{0}")]
    Unknown(String),
    #[error("{0}")]
    Unrecognized(String),
    /// An alias that exists already (409, or M_ROOM_IN_USE in createRoom).
    #[error("{0}")]
    AliasInUse(String),
    #[error("{0}")]
    RoomInUse(String),
    /// A join or invite past `max_room_members`.
    #[error("{0}")]
    RoomFull(String),
    #[error("{0}")]
    InvalidRoomState(String),
    #[error("{0}")]
    BadAlias(String),
    /// A room key backup request for a version that is not the current one.
    #[error("the current backup version is {current_version}")]
    WrongRoomKeysVersion { current_version: String },
    /// A media ID that already has its content.
    #[error("{0}")]
    CannotOverwriteMedia(String),
    /// A sliding sync position this server does not know (or no longer).
    #[error("{0}")]
    UnknownPos(String),
    #[error("room version {0} is not supported by this server")]
    UnsupportedRoomVersion(String),
    /// A server asked to take part in a room of a version it does not
    /// list as supported (federation).
    #[error("the room's version {0} is not among the versions offered")]
    IncompatibleRoomVersion(String),
    /// A restricted join this server cannot vouch for: it is in none of
    /// the rooms the join rule allows (federation).
    #[error("{0}")]
    UnableToAuthoriseJoin(String),
    /// User-interactive authentication must continue: the body to answer.
    #[error("additional authentication is required")]
    AuthRequired(Box<serde_json::Value>),
    /// A federation request whose `X-Matrix` signature is missing or
    /// wrong.
    #[error("{0}")]
    Unauthorized(String),
    /// Another server could not be reached, or gave no usable answer.
    #[error("{0}")]
    RemoteUnavailable(String),
    /// A third-party identifier belongs to another account already.
    #[error("{0}")]
    ThreepidInUse(String),
    /// No account has this third-party identifier.
    #[error("{0}")]
    ThreepidNotFound(String),
    /// A validation session that is unknown, unvalidated or expired.
    #[error("{0}")]
    ThreepidAuthFailed(String),
    /// A medium this server cannot validate (no SMTP server, no SMS).
    #[error("{0}")]
    ThreepidMediumNotSupported(String),
    /// An identity server answered with an error, passed on as it was.
    #[error("the identity server answered {status}")]
    IdentityServer {
        status: u16,
        body: serde_json::Value,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
