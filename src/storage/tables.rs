//! Every table's key type, value type and column family, in one place.
//!
//! Keys are encoded so that byte order matches the order the services scan
//! in. Composite keys join their parts with a `0x00` byte; the parts are
//! validated never to contain one (localparts by the user ID grammar,
//! device IDs by the API layer).

use serde::{Deserialize, Serialize};

use super::{Cf, Key, Table, Tiered};

/// Database facts by name; see `docs/storage.md` for the names in use.
pub const META: Table<String, u32> = Table::new(Cf::Meta);
/// Accounts by localpart.
pub const USERS: Table<String, UserRecord> = Table::new(Cf::Users);
/// Profile fields by localpart, as one JSON object.
pub const PROFILES: Table<String, serde_json::Map<String, serde_json::Value>> =
    Table::new(Cf::Profiles);
/// Devices by (localpart, device ID).
pub const DEVICES: Table<DeviceKey, DeviceRecord> = Table::new(Cf::Devices);
/// Access tokens by the SHA-256 of the token.
pub const ACCESS_TOKENS: Table<TokenHash, AccessTokenRecord> = Table::new(Cf::AccessTokens);
/// Refresh tokens by the SHA-256 of the token.
pub const REFRESH_TOKENS: Table<TokenHash, RefreshTokenRecord> = Table::new(Cf::RefreshTokens);

/// The server's signing keys by name (`current`).
pub const SERVER_KEYS: Table<String, ServerKeyRecord> = Table::new(Cf::ServerKeys);
/// Other servers' signing keys by server name, as last fetched and checked.
pub const REMOTE_SERVER_KEYS: Table<String, RemoteKeysRecord> = Table::new(Cf::RemoteServerKeys);
/// (destination server, queue position) → what goes there next.
pub const FEDERATION_OUTBOX: Table<(String, u64), OutboxItem> = Table::new(Cf::FederationOutbox);
/// Destination server → the transaction in flight to it.
pub const FEDERATION_TXNS: Table<String, OutboundTxn> = Table::new(Cf::FederationTxns);
/// (origin server, transaction ID) → the answer given to it.
pub const FEDERATION_INBOUND: Table<(String, String), serde_json::Value> =
    Table::new(Cf::FederationInbound);
/// Invite event ID → the stripped state its (remote) room sent with it.
pub const INVITE_STATE: Table<String, Vec<serde_json::Value>> = Table::new(Cf::InviteState);
/// Another server's user → their device list as last heard of.
pub const REMOTE_DEVICES: Table<String, RemoteDeviceList> = Table::new(Cf::RemoteDevices);
/// Local user → what other servers were last told of their devices.
pub const DEVICE_ANNOUNCEMENTS: Table<String, Announced> = Table::new(Cf::DeviceAnnouncements);
/// The stream position up to which local users' device, key and presence
/// changes were announced to other servers, under the key
/// [`ANNOUNCED_UPTO`] (user IDs, the other keys, start with `@`).
pub const ANNOUNCED_POSITION: Table<String, u64> = Table::new(Cf::DeviceAnnouncements);
pub const ANNOUNCED_UPTO: &str = "upto";
/// SHA-256 of an OpenID token → (user ID, expiry in ms since the epoch).
pub const OPENID_TOKENS: Table<TokenHash, (String, u64)> = Table::new(Cf::OpenidTokens);
/// SHA-256 of a login token → (user ID, expiry in ms since the epoch).
pub const LOGIN_TOKENS: Table<TokenHash, (String, u64)> = Table::new(Cf::LoginTokens);
/// (client secret, session ID) → a validation session of an address.
pub const THREEPID_SESSIONS: Table<(String, String), ThreepidSession> =
    Table::new(Cf::ThreepidSessions);
/// (medium, address) → the account that has it.
pub const THREEPIDS: Table<(String, String), ThreepidOwner> = Table::new(Cf::Threepids);
/// (localpart, medium, address) → when it was added, and the identity
/// servers it is bound on.
pub const USER_THREEPIDS: Table<(String, String, String), UserThreepid> =
    Table::new(Cf::UserThreepids);
/// (localpart, app ID, pushkey) → a pusher of the account.
pub const PUSHERS: Table<(String, String, String), PusherRecord> = Table::new(Cf::Pushers);
/// (app ID, pushkey, localpart) → nothing: who has a pushkey.
pub const PUSHER_KEYS: Table<(String, String, String), ()> = Table::new(Cf::PusherKeys);
/// (localpart, app ID, pushkey, stream position of the event) → a
/// notification waiting for that pusher's gateway.
pub const PUSH_QUEUE: Table<(String, String, String, u64), PushItem> = Table::new(Cf::PushQueue);
/// (localpart, stream position of the event) → an event that notified the
/// user.
pub const NOTIFICATIONS: Table<(String, u64), NotificationRecord> = Table::new(Cf::Notifications);
/// `upto` → the stream position up to which events were looked at for
/// notifications.
pub const PUSH_STATE: Table<String, u64> = Table::new(Cf::PushState);
pub const PUSH_UPTO: &str = "upto";
/// The `push_state` key of the position the notifier started from on
/// this database: every event after it has been judged by it once it is
/// past `upto`.
pub const PUSH_SINCE: &str = "since";
/// (application service ID, queue position) → an item waiting to be
/// pushed to the service.
pub const APPSERVICE_QUEUE: Table<(String, u64), AppserviceItem> = Table::new(Cf::AppserviceQueue);
/// Application service ID → its transaction in flight (ID, body and the
/// queue positions it carries).
pub const APPSERVICE_TXNS: Table<String, OutboundTxn> = Table::new(Cf::AppserviceTxns);
/// `ephemeral_upto` → the stream position up to which receipts,
/// presence, to-device messages and device lists were looked at for
/// application services; `txn:{id}` → a service's last transaction number.
pub const APPSERVICE_STATE: Table<String, u64> = Table::new(Cf::AppserviceState);
pub const APPSERVICE_EPHEMERAL_UPTO: &str = "ephemeral_upto";
/// `txn:` + application service ID → the number of its last transaction.
pub const APPSERVICE_TXN_PREFIX: &str = "txn:";

/// Something waiting to be pushed to an application service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AppserviceItem {
    /// A room event, by ID.
    Event { event_id: String },
    /// A typing notice, receipt or presence update, as pushed.
    Ephemeral { event: serde_json::Value },
    /// A to-device message, as pushed (with `to_user_id`, `to_device_id`).
    ToDevice { message: serde_json::Value },
    /// A user's devices changed, or the user left the service's rooms.
    DeviceList { user_id: String, left: bool },
}
/// Report ID (microseconds since the epoch, or one past the last) → the
/// report (`{"kind", "reporter", "room_id", "event_id", "user_id",
/// "reason", "received_ts"}`).
pub const REPORTS: Table<u64, serde_json::Value> = Table::new(Cf::Reports);
/// (local signer, user of another server, key ID) → the signer's
/// signatures of that key (`{signer: {key name: signature}}`), shown to
/// the signer alone.
pub const REMOTE_SIGNATURES: Table<(String, String, String), serde_json::Value> =
    Table::new(Cf::RemoteSignatures);
/// Events by event ID.
pub const PDUS: Table<String, StoredPdu> = Table::new(Cf::Pdus);
/// Events moved to the archive tier, stored as in [`PDUS`].
pub const ARCHIVED_PDUS: Table<String, StoredPdu> = Table::new(Cf::ArchivedPdus);
/// Every event, wherever its tier.
pub const PDU_TIERS: Tiered<String, StoredPdu> = Tiered::new(PDUS, ARCHIVED_PDUS);
/// Event ID → when (ms) it was last edited, redacted, replied or reacted
/// to: the archive mover leaves it hot while that is recent.
pub const TOUCHED: Table<String, u64> = Table::new(Cf::Touched);
/// The archive mover's place: `cursor` (the last event ID looked at in
/// the pass under way) and `pass` (the pass's number).
pub const ARCHIVE_STATE: Table<String, serde_json::Value> = Table::new(Cf::ArchiveState);
/// Room ID → who blocked it and when.
pub const BLOCKED_ROOMS: Table<String, AdminMark> = Table::new(Cf::BlockedRooms);
/// User ID of a local user → who erased them and when.
pub const ERASED_USERS: Table<String, AdminMark> = Table::new(Cf::ErasedUsers);

/// Who among the admins did something, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminMark {
    pub by: String,
    pub ts: u64,
}
/// (room ID, stream position) → event ID.
pub const TIMELINE: Table<(String, u64), String> = Table::new(Cf::Timeline);
/// Stream position → the event written at it.
pub const STREAM: Table<u64, StreamEntry> = Table::new(Cf::Stream);
/// (room ID, event type, state key) → event ID of the current state.
pub const ROOM_STATE: Table<(String, String, String), String> = Table::new(Cf::RoomState);
/// State group ID → a snapshot or a delta on an earlier group.
pub const STATE_GROUPS: Table<u64, StateGroup> = Table::new(Cf::StateGroups);
/// State groups older than their room's latest snapshot, moved to the
/// archive tier.
pub const ARCHIVED_STATE_GROUPS: Table<u64, StateGroup> = Table::new(Cf::ArchivedStateGroups);
/// Every state group, wherever its tier.
pub const STATE_GROUP_TIERS: Tiered<u64, StateGroup> =
    Tiered::new(STATE_GROUPS, ARCHIVED_STATE_GROUPS);
/// Room ID → what the server keeps about the room as a whole.
pub const ROOMS: Table<String, RoomRecord> = Table::new(Cf::Rooms);
/// (user ID, room ID) → the user's membership in the room.
pub const USER_ROOMS: Table<(String, String), UserRoom> = Table::new(Cf::UserRooms);
/// (user ID, device ID, transaction ID) → the event the transaction sent.
pub const TRANSACTIONS: Table<(String, String, String), String> = Table::new(Cf::Transactions);

/// Room alias (`#name:server`) → the room and who made the alias.
pub const ALIASES: Table<String, AliasRecord> = Table::new(Cf::Aliases);
/// (room ID, alias) → nothing: a room's aliases.
pub const ROOM_ALIASES: Table<(String, String), ()> = Table::new(Cf::RoomAliases);
/// Room ID → nothing: the rooms published in the directory.
pub const PUBLIC_ROOMS: Table<String, ()> = Table::new(Cf::PublicRooms);

/// Where an alias points.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasRecord {
    pub room_id: String,
    pub creator: String,
}

/// A signing key: its version and its PKCS#8 DER bytes, hex-encoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerKeyRecord {
    pub version: String,
    pub der_hex: String,
    pub created_ts: u64,
}

/// Another server's keys: public keys as unpadded base64 by key ID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteKeysRecord {
    pub verify_keys: std::collections::BTreeMap<String, String>,
    /// Former keys: (public key, when it expired).
    pub old_verify_keys: std::collections::BTreeMap<String, (String, u64)>,
    /// Until when the current keys may be used (capped at fetch + 7 days).
    pub valid_until_ts: u64,
    pub fetched_ts: u64,
}

/// A stored event: the signed PDU and where it sits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPdu {
    pub room_id: String,
    /// The signed PDU in canonical JSON (redacted once redacted).
    pub json: String,
    pub stream: u64,
    /// The state group holding the state after this event.
    pub state_group: u64,
    /// The transaction ID the sending device gave, for its own echo.
    pub txn_id: Option<String>,
    pub sender_device: Option<String>,
    /// The event that redacted this one, if any.
    pub redacted_because: Option<String>,
    /// For a state event: the event it replaced in the room's state.
    #[serde(default)]
    pub replaces_state: Option<String>,
    /// Known only as part of another event's state or auth chain: not in
    /// the timeline, no state of its own here.
    #[serde(default)]
    pub outlier: bool,
    /// Accepted into the graph but failing the room's current state: kept
    /// out of the timeline and of the current state.
    #[serde(default)]
    pub soft_failed: bool,
}

/// One item of a destination's federation queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboxItem {
    /// A PDU, by event ID (its JSON is read when the transaction is made).
    Pdu(String),
    /// An EDU, whole.
    Edu(serde_json::Value),
}

/// A transaction made for a destination and not yet acknowledged: a retry
/// sends the same ID and body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundTxn {
    pub txn_id: String,
    pub body: serde_json::Value,
    /// The queue positions it carries, deleted once it is acknowledged.
    pub positions: Vec<u64>,
}

/// One entry of the global stream: what was written at a position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StreamEntry {
    /// An event of a room; for a member event, the user it is about.
    Event {
        room_id: String,
        event_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        member: Option<String>,
    },
    /// A user's account data (global when `room_id` is empty).
    AccountData {
        user_id: String,
        room_id: String,
        data_type: String,
    },
    /// A receipt in a room.
    Receipt {
        room_id: String,
        user_id: String,
        receipt_type: String,
    },
    /// A user's presence.
    Presence { user_id: String },
    /// A user's devices changed (added, renamed, deleted, new keys).
    DeviceList { user_id: String },
    /// A to-device message for one device.
    ToDevice { user_id: String, device_id: String },
}

/// (user ID, room ID or "" for global, type) → account data.
pub const ACCOUNT_DATA: Table<(String, String, String), StreamedValue> =
    Table::new(Cf::AccountData);
/// (room ID, receipt type, user ID, thread ID or "") → the receipt.
pub const RECEIPTS: Table<(String, String, String, String), Receipt> = Table::new(Cf::Receipts);
/// User ID → the user's presence.
pub const PRESENCE: Table<String, PresenceRecord> = Table::new(Cf::Presence);

/// (parent event ID, stream) → the relating event.
pub const RELATIONS: Table<(String, u64), Relation> = Table::new(Cf::Relations);
/// Relations of archived events, keyed as in [`RELATIONS`].
pub const ARCHIVED_RELATIONS: Table<(String, u64), Relation> = Table::new(Cf::ArchivedRelations);
/// Every relation, wherever its tier.
pub const RELATION_TIERS: Tiered<(String, u64), Relation> =
    Tiered::new(RELATIONS, ARCHIVED_RELATIONS);
/// (room ID, root event ID) → the thread's summary.
pub const THREADS: Table<(String, String), ThreadRecord> = Table::new(Cf::Threads);
/// (room ID, stream of the latest reply) → the thread's root event ID.
pub const THREAD_ACTIVITY: Table<(String, u64), String> = Table::new(Cf::ThreadActivity);

/// An event that relates to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    pub event_id: String,
    pub rel_type: String,
    pub event_type: String,
    pub sender: String,
}

/// A thread: its latest reply, its size and who took part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadRecord {
    pub latest_event_id: String,
    pub latest_stream: u64,
    pub count: u64,
    pub participants: Vec<String>,
}

/// (user ID, device ID) → the device's signed identity keys.
pub const DEVICE_KEYS: Table<(String, String), serde_json::Value> = Table::new(Cf::DeviceKeys);
/// (user ID, device ID, algorithm, key ID) → a one-time key.
pub const ONE_TIME_KEYS: Table<(String, String, String, String), OneTimeKey> =
    Table::new(Cf::OneTimeKeys);
/// (user ID, device ID, algorithm) → the device's fallback key.
pub const FALLBACK_KEYS: Table<(String, String, String), FallbackKey> =
    Table::new(Cf::FallbackKeys);
/// (user ID, device ID, stream position) → a to-device message.
pub const TO_DEVICE: Table<(String, String, u64), ToDeviceMessage> = Table::new(Cf::ToDevice);

/// (user ID, usage: `master`, `self_signing` or `user_signing`) → the key.
pub const CROSS_SIGNING_KEYS: Table<(String, String), serde_json::Value> =
    Table::new(Cf::CrossSigningKeys);
/// (user ID, version) → a room key backup version.
pub const BACKUP_VERSIONS: Table<(String, u64), BackupVersion> = Table::new(Cf::BackupVersions);
/// (user ID, version, room ID, session ID) → the backed-up session key.
pub const BACKUP_KEYS: Table<(String, u64, String, String), serde_json::Value> =
    Table::new(Cf::BackupKeys);

/// (server name, media ID) → the media's record.
pub const MEDIA: Table<(String, String), MediaRecord> = Table::new(Cf::Media);

/// An uploaded file, or a media ID waiting for its upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRecord {
    pub uploader: String,
    pub created_ts: u64,
    /// The SHA-256 of the content, hex: the file's name in the media
    /// directory. `None` while the upload is pending.
    pub content_hash: Option<String>,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    pub size: u64,
    /// For a pending media ID: when it stops waiting for its content.
    pub pending_until: Option<u64>,
    /// The admin who quarantined it: it is then never served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined_by: Option<String>,
}

/// (SHA-256 of the original, size as `{width}x{height}-{method}`) → the
/// thumbnail made of that content at that size.
pub const MEDIA_THUMBNAILS: Table<(String, String), ThumbnailRecord> =
    Table::new(Cf::MediaThumbnails);

/// A stored thumbnail: a file in the media directory like any upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThumbnailRecord {
    pub content_hash: String,
    pub content_type: String,
    pub size: u64,
    pub width: u32,
    pub height: u32,
}

/// (user ID, device ID) → the stream position up to which the device
/// acknowledged delivery.
pub const DELIVERY_ACKS: Table<(String, String), u64> = Table::new(Cf::DeliveryAcks);

/// A room key backup version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupVersion {
    pub algorithm: String,
    pub auth_data: serde_json::Value,
    /// Changes whenever the version's keys change.
    pub etag: u64,
    /// Deleted versions stay as tombstones so that their numbers are
    /// never given out again.
    #[serde(default)]
    pub deleted: bool,
}

/// A one-time key and when it was uploaded (keys are claimed oldest first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneTimeKey {
    pub key: serde_json::Value,
    pub uploaded: u64,
}

/// A fallback key: handed out when no one-time key is left.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FallbackKey {
    pub key_id: String,
    pub key: serde_json::Value,
    pub used: bool,
}

/// A message from one device to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToDeviceMessage {
    pub sender: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub content: serde_json::Value,
}

/// (user ID, filter ID) → the filter as the user uploaded it.
pub const FILTERS: Table<(String, String), serde_json::Value> = Table::new(Cf::Filters);

/// A JSON value and the stream position it was written at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamedValue {
    pub content: serde_json::Value,
    pub stream: u64,
}

/// A read receipt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub event_id: String,
    pub ts: u64,
    pub stream: u64,
}

/// A user's presence as set by the user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    pub presence: String,
    pub status_msg: Option<String>,
    pub last_active_ts: u64,
    pub stream: u64,
}

/// A room's state after some event, as a delta on an earlier group or as
/// a whole snapshot (`prev: None`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateGroup {
    pub prev: Option<u64>,
    /// Number of deltas between this group and its snapshot.
    pub chain_length: u32,
    /// (event type, state key, event ID) entries that this group sets.
    pub entries: Vec<(String, String, String)>,
}

/// What the server keeps about a room as a whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRecord {
    pub version: String,
    pub created_ts: u64,
    /// The events no other event follows yet: the next event's prev_events.
    pub forward_extremities: Vec<String>,
    pub depth: u64,
    /// The state group of the current state.
    pub state_group: u64,
    /// Members whose current membership is `join`, and `invite`.
    pub joined_members: u64,
    pub invited_members: u64,
    /// Other servers with a joined member: where this room's events go.
    #[serde(default)]
    pub remote_servers: Vec<String>,
}

/// A user's membership in a room.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRoom {
    pub membership: String,
    pub event_id: String,
    pub stream: u64,
    /// Set by `/forget` after leaving; cleared by the next membership.
    #[serde(default)]
    pub forgotten: bool,
}

/// A local account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Argon2id hash in PHC string form; `None` once deactivated.
    pub password_hash: Option<String>,
    pub admin: bool,
    pub deactivated: bool,
    pub created_ts: u64,
    /// Suspended by an admin: may read, not write (`M_USER_SUSPENDED`).
    #[serde(default)]
    pub suspended: bool,
    /// Locked by an admin: every request but logging out is refused
    /// (`M_USER_LOCKED`).
    #[serde(default)]
    pub locked: bool,
}

/// A validation session: a code sent to an address, and whether it was
/// given back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreepidSession {
    pub medium: String,
    pub address: String,
    /// What the validation is for: `register`, `add` or `password`.
    pub purpose: String,
    /// The client's `send_attempt` of the last email sent.
    pub send_attempt: u64,
    /// The code sent, hashed.
    pub token: TokenHash,
    pub created_ms: u64,
    /// Until when the code, or once validated the session, may be used.
    pub expires_ms: u64,
    pub validated_ms: Option<u64>,
}

/// The account a third-party identifier belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreepidOwner {
    pub localpart: String,
}

/// One of an account's third-party identifiers: added to the account
/// (`added_ms`), bound on identity servers (`id_servers`), or both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserThreepid {
    pub added_ms: Option<u64>,
    pub validated_ms: Option<u64>,
    pub id_servers: Vec<String>,
}

/// A pusher: where an account's notifications go, for one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PusherRecord {
    pub kind: String,
    pub app_display_name: String,
    pub device_display_name: String,
    pub profile_tag: Option<String>,
    pub lang: String,
    /// `url` and `format`, and anything else the client gave.
    pub data: serde_json::Value,
    /// The device whose access token set it; deleted with the device.
    pub device_id: Option<String>,
    pub created_ms: u64,
}

/// A notification waiting for a pusher's gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushItem {
    pub room_id: String,
    pub event_id: String,
    /// The rule's actions (for the `tweaks`).
    pub actions: serde_json::Value,
    pub queued_ms: u64,
}

/// An event that notified a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationRecord {
    pub room_id: String,
    pub event_id: String,
    pub actions: serde_json::Value,
    pub highlight: bool,
    pub ts: u64,
}

/// One device (one login) of a local account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub display_name: Option<String>,
    pub created_ts: u64,
    pub last_seen_ts: Option<u64>,
    pub last_seen_ip: Option<String>,
    /// The device's current access token, hashed: each device has one.
    pub access_token: TokenHash,
    /// The device's current refresh token, hashed, if it asked for one.
    pub refresh_token: Option<TokenHash>,
}

/// What an access token grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenRecord {
    pub localpart: String,
    pub device_id: String,
    /// Milliseconds since the epoch after which the token is expired;
    /// only tokens issued with a refresh token expire.
    pub expires_at_ms: Option<u64>,
}

/// What a refresh token renews.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshTokenRecord {
    pub localpart: String,
    pub device_id: String,
}

/// The SHA-256 digest of a secret token; tokens are never stored in clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenHash(#[serde(with = "hex_bytes")] pub [u8; 32]);

/// A device's key: the owner's localpart, then the device ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    pub localpart: String,
    pub device_id: String,
}

impl DeviceKey {
    pub fn new(localpart: &str, device_id: &str) -> Self {
        DeviceKey {
            localpart: localpart.to_owned(),
            device_id: device_id.to_owned(),
        }
    }

    /// The prefix shared by the keys of every device of `localpart`.
    pub fn user_prefix(localpart: &str) -> Vec<u8> {
        let mut prefix = localpart.as_bytes().to_vec();
        prefix.push(0);
        prefix
    }
}

impl Key for String {
    fn encode(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

impl Key for DeviceKey {
    fn encode(&self) -> Vec<u8> {
        let mut key = Self::user_prefix(&self.localpart);
        key.extend_from_slice(self.device_id.as_bytes());
        key
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let split = bytes.iter().position(|b| *b == 0)?;
        Some(DeviceKey {
            localpart: String::from_utf8(bytes[..split].to_vec()).ok()?,
            device_id: String::from_utf8(bytes[split + 1..].to_vec()).ok()?,
        })
    }
}

/// One part of a composite key. Strings are length-prefixed (so any
/// string, `0x00` included, is safe) and numbers big-endian (so they sort).
pub trait KeyPart: Sized {
    fn put(&self, out: &mut Vec<u8>);
    fn take(input: &mut &[u8]) -> Option<Self>;
}

impl KeyPart for String {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.len() as u32).to_be_bytes());
        out.extend_from_slice(self.as_bytes());
    }

    fn take(input: &mut &[u8]) -> Option<Self> {
        let len = u32::from_be_bytes(input.get(..4)?.try_into().ok()?) as usize;
        let text = String::from_utf8(input.get(4..4 + len)?.to_vec()).ok()?;
        *input = &input[4 + len..];
        Some(text)
    }
}

impl KeyPart for u64 {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_be_bytes());
    }

    fn take(input: &mut &[u8]) -> Option<Self> {
        let value = u64::from_be_bytes(input.get(..8)?.try_into().ok()?);
        *input = &input[8..];
        Some(value)
    }
}

/// The prefix of every key that starts with the string `first`.
pub fn str_prefix(first: &str) -> Vec<u8> {
    let mut out = Vec::new();
    first.to_owned().put(&mut out);
    out
}

/// The prefix of every key that starts with the strings `first`, `second`.
pub fn str2_prefix(first: &str, second: &str) -> Vec<u8> {
    let mut out = str_prefix(first);
    second.to_owned().put(&mut out);
    out
}

/// The key of a device's to-device row at `position`, from the device's
/// prefix ([`str2_prefix`]): where a scan from that position starts.
pub fn to_device_key_prefix(device_prefix: &[u8], position: u64) -> Vec<u8> {
    let mut out = device_prefix.to_vec();
    position.put(&mut out);
    out
}

impl Key for u64 {
    fn encode(&self) -> Vec<u8> {
        self.to_be_bytes().to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }
}

impl<A: KeyPart, B: KeyPart> Key for (A, B) {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.0.put(&mut out);
        self.1.put(&mut out);
        out
    }

    fn decode(mut bytes: &[u8]) -> Option<Self> {
        let a = A::take(&mut bytes)?;
        let b = B::take(&mut bytes)?;
        bytes.is_empty().then_some((a, b))
    }
}

impl<A: KeyPart, B: KeyPart, C: KeyPart> Key for (A, B, C) {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.0.put(&mut out);
        self.1.put(&mut out);
        self.2.put(&mut out);
        out
    }

    fn decode(mut bytes: &[u8]) -> Option<Self> {
        let a = A::take(&mut bytes)?;
        let b = B::take(&mut bytes)?;
        let c = C::take(&mut bytes)?;
        bytes.is_empty().then_some((a, b, c))
    }
}

impl<A: KeyPart, B: KeyPart, C: KeyPart, D: KeyPart> Key for (A, B, C, D) {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.0.put(&mut out);
        self.1.put(&mut out);
        self.2.put(&mut out);
        self.3.put(&mut out);
        out
    }

    fn decode(mut bytes: &[u8]) -> Option<Self> {
        let a = A::take(&mut bytes)?;
        let b = B::take(&mut bytes)?;
        let c = C::take(&mut bytes)?;
        let d = D::take(&mut bytes)?;
        bytes.is_empty().then_some((a, b, c, d))
    }
}

impl Key for TokenHash {
    fn encode(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(TokenHash(bytes.try_into().ok()?))
    }
}

/// Lowercase hexadecimal, for bytes kept inside JSON values.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hexadecimal string, or `None` if it is not one.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::to_hex(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(deserializer)?;
        super::from_hex(&text)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("expected 64 hexadecimal digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_decodes_both_cases_and_refuses_the_rest() {
        assert_eq!(from_hex("00fFa1"), Some(vec![0, 255, 161]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn device_keys_round_trip_and_group_by_user() {
        let key = DeviceKey::new("alice", "ABCDEF");
        assert_eq!(DeviceKey::decode(&key.encode()), Some(key.clone()));
        assert!(key.encode().starts_with(&DeviceKey::user_prefix("alice")));
        // "al" must not capture the devices of "alice".
        assert!(!key.encode().starts_with(&DeviceKey::user_prefix("al")));
    }

    #[test]
    fn composite_keys_round_trip_and_sort_by_parts() {
        let key = ("!room:x".to_owned(), 7u64);
        assert_eq!(<(String, u64)>::decode(&key.encode()), Some(key.clone()));
        let later = ("!room:x".to_owned(), 300u64);
        assert!(key.encode() < later.encode());
        assert!(later.encode().starts_with(&str_prefix("!room:x")));
        assert!(!later.encode().starts_with(&str_prefix("!room")));
        let state = (
            "!r".to_owned(),
            "m.room.member".to_owned(),
            "a\0b".to_owned(),
        );
        assert_eq!(
            <(String, String, String)>::decode(&state.encode()),
            Some(state.clone())
        );
        assert!(state
            .encode()
            .starts_with(&str2_prefix("!r", "m.room.member")));
        assert_eq!(<(String, u64)>::decode(&state.encode()), None);
        assert_eq!(u64::decode(&42u64.encode()), Some(42));
    }

    #[test]
    fn token_hashes_serialize_as_hex() {
        let hash = TokenHash([0xab; 32]);
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(32)));
        assert_eq!(serde_json::from_str::<TokenHash>(&json).unwrap(), hash);
        assert!(serde_json::from_str::<TokenHash>("\"abc\"").is_err());
    }
}

/// Another server's user's devices and cross-signing keys, kept current
/// by `m.device_list_update` and `m.signing_key_update` and refetched
/// whole (`/user/devices`) when an update shows a gap.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RemoteDeviceList {
    /// The `stream_id` of the last update applied.
    pub stream_id: u64,
    /// Device ID → its signed identity keys (`null` before it uploads any).
    pub devices: std::collections::BTreeMap<String, serde_json::Value>,
    pub master_key: Option<serde_json::Value>,
    pub self_signing_key: Option<serde_json::Value>,
}

/// What other servers were last told of a local user's devices: the
/// `stream_id` of the last `m.device_list_update` (one per device
/// change) and what each device and cross-signing key looked like.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Announced {
    pub stream_id: u64,
    /// Device ID → `{"keys": ..., "display_name": ...}` as announced.
    pub devices: std::collections::BTreeMap<String, serde_json::Value>,
    pub master_key: Option<serde_json::Value>,
    pub self_signing_key: Option<serde_json::Value>,
}
