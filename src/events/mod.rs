//! Matrix events as the server stores and exchanges them: PDUs.
//!
//! Pure logic only, no I/O: building a PDU (canonical JSON, content hash,
//! signature, reference-hash event ID), reading a stored one, the client
//! format, redaction, and the authorization rules (ruma's state-res).

mod auth;
mod keys;
mod pdu;

pub use auth::{auth_types, check_auth};
pub use keys::SigningKey;
pub use pdu::{BuildContext, EventError, NewEvent, Pdu};

use ruma::room_version_rules::RoomVersionRules;
use ruma::RoomVersionId;

/// The room versions this server creates and joins.
pub const SUPPORTED_ROOM_VERSIONS: [RoomVersionId; 3] =
    [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12];

/// The rules of a supported room version, or `None` for any other.
pub fn room_version_rules(version: &RoomVersionId) -> Option<RoomVersionRules> {
    if SUPPORTED_ROOM_VERSIONS.contains(version) {
        version.rules()
    } else {
        None
    }
}
