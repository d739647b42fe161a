//! The byte-level interface every storage backend implements.
//!
//! A backend knows column families, byte keys and byte values, nothing about
//! Matrix. Everything above it goes through the typed layer in
//! [`crate::storage`], which owns key encoding and value serialization.

use std::ops::Bound;

use super::StorageError;

/// The column families ("tables") of the database.
///
/// Every table Myelin stores is listed here once; `docs/storage.md` documents
/// the key and value layout of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// Database-wide facts such as the schema version.
    Meta,
    /// Local accounts by localpart.
    Users,
    /// Profile fields by localpart.
    Profiles,
    /// Devices by localpart and device ID.
    Devices,
    /// Access tokens by the SHA-256 of the token.
    AccessTokens,
    /// Refresh tokens by the SHA-256 of the token.
    RefreshTokens,
    /// The server's signing keys.
    ServerKeys,
    /// Every event (PDU) by event ID.
    Pdus,
    /// Each room's events in stream order.
    Timeline,
    /// Every event of every room in stream order: the one global stream.
    Stream,
    /// Each room's current state.
    RoomState,
    /// State snapshots and deltas: the state after each event.
    StateGroups,
    /// Room facts: version, forward extremities, depth, current state group.
    Rooms,
    /// Each user's membership in each room.
    UserRooms,
    /// Client transaction IDs of sent events, per device.
    Transactions,
    /// Room aliases: alias → room.
    Aliases,
    /// Room aliases by room, for listing.
    RoomAliases,
    /// Rooms published in the room directory.
    PublicRooms,
    /// Users' account data, global and per room.
    AccountData,
    /// Read receipts.
    Receipts,
    /// Users' presence.
    Presence,
    /// Events that relate to another event, by the event they relate to.
    Relations,
    /// Thread roots by room, with their latest activity.
    Threads,
    /// Thread roots by room and latest activity, newest last.
    ThreadActivity,
    /// Sync filters uploaded by users.
    Filters,
    /// Devices' identity keys for end-to-end encryption.
    DeviceKeys,
    /// Devices' one-time keys, until claimed.
    OneTimeKeys,
    /// Devices' fallback keys, one per algorithm.
    FallbackKeys,
    /// To-device messages waiting for their device.
    ToDevice,
    /// Users' cross-signing keys.
    CrossSigningKeys,
    /// Room key backup versions.
    BackupVersions,
    /// Backed-up room keys.
    BackupKeys,
    /// Uploaded media: what each media ID names.
    Media,
    /// Thumbnails made of uploaded images.
    MediaThumbnails,
    /// How far each device acknowledged delivery (WebSocket extension).
    DeliveryAcks,
    /// Other servers' signing keys, as fetched and checked.
    RemoteServerKeys,
    /// Events and EDUs waiting to go to each other server.
    FederationOutbox,
    /// The transaction in flight to each other server, kept for retries.
    FederationTxns,
    /// Transactions received from other servers, with their answers.
    FederationInbound,
    /// The stripped room state that came with an invite from another server.
    InviteState,
    /// Other servers' users' device lists, as last heard of.
    RemoteDevices,
    /// What other servers were last told of each local user's devices and
    /// cross-signing keys, and how far the stream has been announced.
    DeviceAnnouncements,
    /// Local users' signatures of other servers' users' keys.
    RemoteSignatures,
    /// Reports of events, rooms and users, for the server's admins.
    Reports,
    /// OpenID tokens a user asked for, until they expire.
    OpenidTokens,
    /// One-time login tokens (`m.login.token`), until used or expired.
    LoginTokens,
    /// Validation sessions of email addresses, until they expire.
    ThreepidSessions,
    /// Third-party identifiers (email addresses) and their accounts.
    Threepids,
    /// Each account's third-party identifiers and identity server binds.
    UserThreepids,
    /// The pushers of each account: where its push notifications go.
    Pushers,
    /// The accounts that have each (app ID, pushkey).
    PusherKeys,
    /// Notifications waiting for their push gateway, per pusher.
    PushQueue,
    /// The events that notified each user, for `GET /notifications`.
    Notifications,
    /// How far the stream has been looked at for notifications.
    PushState,
    /// What waits to be pushed to each application service.
    AppserviceQueue,
    /// Each application service's transaction in flight.
    AppserviceTxns,
    /// How far the stream has been looked at for application services.
    AppserviceState,
    /// Events moved to the archive tier, by event ID.
    ArchivedPdus,
    /// Relations of archived events, by the event they relate to.
    ArchivedRelations,
    /// State groups older than their room's latest snapshot.
    ArchivedStateGroups,
    /// Events recently edited, redacted, replied or reacted to: kept hot.
    Touched,
    /// Where the archive mover stands in its pass.
    ArchiveState,
    /// Rooms an admin blocked: no local user may join or be invited.
    BlockedRooms,
    /// Local users erased by an admin: their events are hidden from those
    /// who were not in the room when they were sent.
    ErasedUsers,
}

impl Cf {
    /// Every column family, in a fixed order.
    pub const ALL: [Cf; 64] = [
        Cf::Meta,
        Cf::Users,
        Cf::Profiles,
        Cf::Devices,
        Cf::AccessTokens,
        Cf::RefreshTokens,
        Cf::ServerKeys,
        Cf::Pdus,
        Cf::Timeline,
        Cf::Stream,
        Cf::RoomState,
        Cf::StateGroups,
        Cf::Rooms,
        Cf::UserRooms,
        Cf::Transactions,
        Cf::Aliases,
        Cf::RoomAliases,
        Cf::PublicRooms,
        Cf::AccountData,
        Cf::Receipts,
        Cf::Presence,
        Cf::Relations,
        Cf::Threads,
        Cf::ThreadActivity,
        Cf::Filters,
        Cf::DeviceKeys,
        Cf::OneTimeKeys,
        Cf::FallbackKeys,
        Cf::ToDevice,
        Cf::CrossSigningKeys,
        Cf::BackupVersions,
        Cf::BackupKeys,
        Cf::Media,
        Cf::MediaThumbnails,
        Cf::DeliveryAcks,
        Cf::RemoteServerKeys,
        Cf::FederationOutbox,
        Cf::FederationTxns,
        Cf::FederationInbound,
        Cf::InviteState,
        Cf::RemoteDevices,
        Cf::DeviceAnnouncements,
        Cf::RemoteSignatures,
        Cf::Reports,
        Cf::OpenidTokens,
        Cf::LoginTokens,
        Cf::ThreepidSessions,
        Cf::Threepids,
        Cf::UserThreepids,
        Cf::Pushers,
        Cf::PusherKeys,
        Cf::PushQueue,
        Cf::Notifications,
        Cf::PushState,
        Cf::AppserviceQueue,
        Cf::AppserviceTxns,
        Cf::AppserviceState,
        Cf::ArchivedPdus,
        Cf::ArchivedRelations,
        Cf::ArchivedStateGroups,
        Cf::Touched,
        Cf::ArchiveState,
        Cf::BlockedRooms,
        Cf::ErasedUsers,
    ];

    /// The column family's name on disk. Never change one: it is the format.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Users => "users",
            Cf::Profiles => "profiles",
            Cf::Devices => "devices",
            Cf::AccessTokens => "access_tokens",
            Cf::RefreshTokens => "refresh_tokens",
            Cf::ServerKeys => "server_keys",
            Cf::Pdus => "pdus",
            Cf::Timeline => "timeline",
            Cf::Stream => "stream",
            Cf::RoomState => "room_state",
            Cf::StateGroups => "state_groups",
            Cf::Rooms => "rooms",
            Cf::UserRooms => "user_rooms",
            Cf::Transactions => "transactions",
            Cf::Aliases => "aliases",
            Cf::RoomAliases => "room_aliases",
            Cf::PublicRooms => "public_rooms",
            Cf::AccountData => "account_data",
            Cf::Receipts => "receipts",
            Cf::Presence => "presence",
            Cf::Relations => "relations",
            Cf::Threads => "threads",
            Cf::ThreadActivity => "thread_activity",
            Cf::Filters => "filters",
            Cf::DeviceKeys => "device_keys",
            Cf::OneTimeKeys => "one_time_keys",
            Cf::FallbackKeys => "fallback_keys",
            Cf::ToDevice => "to_device",
            Cf::CrossSigningKeys => "cross_signing_keys",
            Cf::BackupVersions => "backup_versions",
            Cf::BackupKeys => "backup_keys",
            Cf::Media => "media",
            Cf::MediaThumbnails => "media_thumbnails",
            Cf::DeliveryAcks => "delivery_acks",
            Cf::RemoteServerKeys => "remote_server_keys",
            Cf::FederationOutbox => "federation_outbox",
            Cf::FederationTxns => "federation_txns",
            Cf::FederationInbound => "federation_inbound",
            Cf::InviteState => "invite_state",
            Cf::RemoteDevices => "remote_devices",
            Cf::DeviceAnnouncements => "device_announcements",
            Cf::RemoteSignatures => "remote_signatures",
            Cf::Reports => "reports",
            Cf::OpenidTokens => "openid_tokens",
            Cf::LoginTokens => "login_tokens",
            Cf::ThreepidSessions => "threepid_sessions",
            Cf::Threepids => "threepids",
            Cf::UserThreepids => "user_threepids",
            Cf::Pushers => "pushers",
            Cf::PusherKeys => "pusher_keys",
            Cf::PushQueue => "push_queue",
            Cf::Notifications => "notifications",
            Cf::PushState => "push_state",
            Cf::AppserviceQueue => "appservice_queue",
            Cf::AppserviceTxns => "appservice_txns",
            Cf::AppserviceState => "appservice_state",
            Cf::ArchivedPdus => "archived_pdus",
            Cf::ArchivedRelations => "archived_relations",
            Cf::ArchivedStateGroups => "archived_state_groups",
            Cf::Touched => "touched",
            Cf::ArchiveState => "archive_state",
            Cf::BlockedRooms => "blocked_rooms",
            Cf::ErasedUsers => "erased_users",
        }
    }

    /// Whether the table is part of the archive tier: cold data, stored
    /// for size rather than speed (and where `archive.path` says).
    pub fn is_archive(self) -> bool {
        matches!(
            self,
            Cf::ArchivedPdus | Cf::ArchivedRelations | Cf::ArchivedStateGroups
        )
    }

    /// Position in [`Cf::ALL`], for backends that keep one slot per table
    /// (`ALL` lists the tables in the order they are declared, as a test
    /// checks).
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// One change inside a [`RawBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchOp {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
}

// [`RawBatch::tables`] keeps one bit per table in a `u64`.
const _: () = assert!(Cf::ALL.len() <= u64::BITS as usize);

/// Changes that a backend applies all together or not at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawBatch {
    pub ops: Vec<BatchOp>,
}

impl RawBatch {
    pub fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(BatchOp::Put { cf, key, value });
    }

    pub fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.ops.push(BatchOp::Delete { cf, key });
    }

    /// The tables the batch writes to, one bit each at its
    /// [`Cf::index`] (there are at most 64 tables).
    pub fn tables(&self) -> u64 {
        self.ops.iter().fold(0, |tables, op| {
            let (BatchOp::Put { cf, .. } | BatchOp::Delete { cf, .. }) = op;
            tables | 1 << cf.index()
        })
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Which way a scan walks the keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// A range of keys: `lower` inclusive, `upper` exclusive (`None`: no end).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub lower: Vec<u8>,
    pub upper: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Self {
        KeyRange {
            lower: prefix.to_vec(),
            upper: prefix_successor(prefix),
        }
    }

    /// Every key after `key`, to the end (a scan that goes on past the
    /// last key it read).
    pub fn after(key: &[u8]) -> Self {
        let mut lower = key.to_vec();
        // The smallest key greater than `key`.
        lower.push(0);
        KeyRange { lower, upper: None }
    }

    /// The range as standard bounds, for ordered maps.
    pub fn bounds(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        let upper = match &self.upper {
            Some(upper) => Bound::Excluded(upper.as_slice()),
            None => Bound::Unbounded,
        };
        (Bound::Included(self.lower.as_slice()), upper)
    }
}

/// The smallest key greater than every key that starts with `prefix`, or
/// `None` when no such key exists (the prefix is empty or all `0xff`).
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < u8::MAX {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

/// Key-value pairs as a scan returns them.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// A key-value store with column families, atomic batches and ordered scans.
pub trait Backend: Send + Sync + 'static {
    /// The value stored under `key`, if any.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Applies every operation of `batch` atomically. When the backend is
    /// configured to be durable, the batch is on stable storage on return.
    fn write(&self, batch: RawBatch) -> Result<(), StorageError>;

    /// Up to `limit` entries inside `range`, in key order or reversed.
    fn scan(
        &self,
        cf: Cf,
        range: &KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Entries, StorageError>;

    /// How many rows the table holds and their bytes, as the backend can
    /// tell without reading them (RocksDB: estimates).
    fn table_size(&self, cf: Cf) -> Result<TableSize, StorageError>;

    /// Rewrites the table's files so that deleted rows are gone and every
    /// row is stored as its settled form (RocksDB: a full compaction).
    fn compact(&self, cf: Cf) -> Result<(), StorageError>;

    /// The engine's own figures (memory, compactions, stalls); `None` for
    /// a backend that has none.
    fn engine_stats(&self) -> Option<EngineStats> {
        None
    }

    /// The files that hold each table's rows, by file name (RocksDB: the
    /// live table files); empty for a backend without files.
    fn table_files(&self) -> Result<Vec<(Cf, String)>, StorageError> {
        Ok(Vec::new())
    }

    /// Writes a consistent copy of the whole database into `dir`, which
    /// must not exist, while writes go on (RocksDB: a checkpoint, hard
    /// links where it can).
    fn checkpoint(&self, dir: &std::path::Path) -> Result<(), StorageError> {
        let _ = dir;
        Err(StorageError::Backend(
            "this storage backend cannot make a checkpoint".to_owned(),
        ))
    }
}

/// What a storage engine tells of itself, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineStats {
    /// Bytes in memtables, over every table.
    pub memtable_bytes: u64,
    /// Bytes of the block caches in use.
    pub block_cache_bytes: u64,
    /// Bytes of the open table files' indexes and filters, held beside
    /// the block cache.
    pub table_readers_bytes: u64,
    /// Bytes of the tables' files.
    pub sst_bytes: u64,
    pub running_compactions: u64,
    pub running_flushes: u64,
    /// Bytes compactions still have to rewrite, by the engine's estimate.
    pub pending_compaction_bytes: u64,
    /// Writes stopped (1) until compactions catch up.
    pub write_stopped: u64,
    /// The rate writes are slowed to, bytes a second (0: not slowed).
    pub delayed_write_rate: u64,
    /// Seconds writers stalled since the engine opened.
    pub stall_seconds: f64,
}

/// A table's size as its backend knows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSize {
    /// Rows (an estimate in RocksDB).
    pub rows: u64,
    /// Bytes in files, compressed.
    pub disk_bytes: u64,
    /// Bytes written but not yet in files (RocksDB's memtables).
    pub memory_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_successor_carries_over_0xff() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
        assert_eq!(prefix_successor(b""), None);
    }

    #[test]
    fn every_cf_has_a_unique_name_and_index() {
        let mut names: Vec<_> = Cf::ALL.iter().map(|cf| cf.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Cf::ALL.len());
        for (i, cf) in Cf::ALL.iter().enumerate() {
            assert_eq!(cf.index(), i);
        }
    }
}
