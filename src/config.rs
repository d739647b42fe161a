//! Configuration: an optional TOML file, overridden by `MYELIN_*` variables.
//!
//! The whole configuration is parsed and validated once, before anything is
//! written; a problem is reported as one line naming the key. Every key has
//! a safe default, so Myelin runs with no configuration at all.
//! `config/myelin.toml` documents every key.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// The prefix of every environment variable that sets a configuration key.
pub const ENV_PREFIX: &str = "MYELIN_";
/// The variable that names the configuration file (like `--config`).
pub const CONFIG_FILE_ENV: &str = "MYELIN_CONFIG";

/// A configuration problem, worded for the person running the server.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// The validated configuration of one server.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The server name: the part after the colon in user IDs.
    pub server_name: String,
    /// Address and port the HTTP listener binds.
    pub listen: SocketAddr,
    /// Directory holding the database and the server's files.
    pub data_dir: PathBuf,
    /// Who may create an account over the client API.
    pub registration: RegistrationMode,
    /// Tokens accepted when `registration = "token"`.
    pub registration_tokens: Vec<String>,
    /// The secret of Synapse's shared-secret registration
    /// (`/_synapse/admin/v1/register`); unset, that endpoint is off.
    pub registration_shared_secret: Option<String>,
    /// Request rate limits per kind; `false` switches all of them off.
    pub rate_limits: RateLimits,
    /// Largest request body accepted, in bytes.
    pub max_request_body_bytes: usize,
    /// Lifetime of access tokens issued together with a refresh token.
    pub refreshable_access_token_lifetime_ms: u64,
    /// How long an unfinished user-interactive authentication session lives.
    pub uia_session_timeout_ms: u64,
    /// The version of rooms created without asking for one.
    pub default_room_version: String,
    /// Most joined plus invited members a room may have.
    pub max_room_members: u64,
    /// Whether the user directory finds every local user, not only those
    /// who share a room with the searcher or are in a public room.
    pub user_directory_search_all_users: bool,
    pub storage: StorageConfig,
    pub password_hashing: PasswordHashing,
    pub log: LogConfig,
    pub well_known: WellKnown,
    pub media: MediaConfig,
    pub websocket: WebSocketConfig,
    pub federation: FederationConfig,
    pub turn: TurnConfig,
    pub login_via_existing_session: LoginViaExistingSession,
    pub email: EmailConfig,
    pub push: PushConfig,
    pub appservices: AppservicesConfig,
    pub archive: ArchiveConfig,
    pub retention: RetentionConfig,
    pub server_notices: ServerNoticesConfig,
    pub metrics: MetricsConfig,
}

/// Signing in on a new device from one already signed in
/// (`POST /login/get_token`, then `m.login.token`), as for a QR code.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginViaExistingSession {
    /// Off by default, as in Synapse.
    pub enabled: bool,
    /// Whether asking for a login token needs the password again.
    pub require_auth: bool,
    /// How long a login token lasts.
    pub token_lifetime_ms: u64,
}

impl Default for LoginViaExistingSession {
    fn default() -> Self {
        LoginViaExistingSession {
            enabled: false,
            require_auth: true,
            token_lifetime_ms: 2 * 60 * 1000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_name: "localhost".to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8008)),
            data_dir: PathBuf::from("./myelin-data"),
            registration: RegistrationMode::Disabled,
            registration_tokens: Vec::new(),
            registration_shared_secret: None,
            rate_limits: RateLimits::default(),
            max_request_body_bytes: 20 * 1024 * 1024,
            refreshable_access_token_lifetime_ms: 5 * 60 * 1000,
            uia_session_timeout_ms: 10 * 60 * 1000,
            default_room_version: "12".to_owned(),
            max_room_members: 100,
            user_directory_search_all_users: false,
            storage: StorageConfig::default(),
            password_hashing: PasswordHashing::default(),
            log: LogConfig::default(),
            well_known: WellKnown::default(),
            media: MediaConfig::default(),
            websocket: WebSocketConfig::default(),
            federation: FederationConfig::default(),
            turn: TurnConfig::default(),
            login_via_existing_session: LoginViaExistingSession::default(),
            email: EmailConfig::default(),
            push: PushConfig::default(),
            appservices: AppservicesConfig::default(),
            archive: ArchiveConfig::default(),
            retention: RetentionConfig::default(),
            server_notices: ServerNoticesConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

/// The WebSocket push extension (`docs/websocket.md`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest frame (and message) a client may send, in bytes.
    pub max_frame_bytes: usize,
    /// Most requests of one connection waiting or running; more are
    /// answered `M_LIMIT_EXCEEDED`.
    pub max_requests_in_flight: usize,
    /// How often the server pings a connection.
    pub ping_interval_ms: u64,
    /// A connection that sends nothing (not even a pong) for this long is
    /// closed.
    pub idle_timeout_ms: u64,
    /// Longest one frame may wait to be written to a client that does not
    /// read; the connection is closed then, and the client resumes from
    /// its acknowledgement.
    pub send_timeout_ms: u64,
    /// How long a connection without an `Authorization` header has to send
    /// its `auth` frame.
    pub auth_timeout_ms: u64,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_frame_bytes: 128 * 1024,
            max_requests_in_flight: 32,
            ping_interval_ms: 30_000,
            idle_timeout_ms: 90_000,
            send_timeout_ms: 10_000,
            auth_timeout_ms: 10_000,
        }
    }
}

/// Server-server federation (`/_matrix/federation`, `/_matrix/key`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Whether the federation API is served and other servers are spoken
    /// to. Off, this server is an island.
    pub enabled: bool,
    /// A listener of its own for the federation API (by convention port
    /// 8448). Without it, the federation API is served on `listen`.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain of the federation listener; with
    /// `tls_private_key` it serves HTTPS, as other servers expect.
    pub tls_certificate: Option<PathBuf>,
    /// PEM private key of `tls_certificate`.
    pub tls_private_key: Option<PathBuf>,
    /// What `/.well-known/matrix/server` answers as `m.server`
    /// (`host[:port]` where the federation API is reached); not served
    /// when unset.
    pub well_known_server: Option<String>,
    /// How long other servers may trust the published signing key
    /// document, in milliseconds.
    pub key_valid_for_ms: u64,
    /// Servers asked for another server's keys when it cannot be asked
    /// itself (notaries). None by default.
    pub trusted_key_servers: Vec<String>,
    /// Whether the TLS certificates of other servers are verified. Turn
    /// off only in tests.
    pub verify_certificates: bool,
    /// PEM file of certificate authorities trusted beside the system's
    /// (a private CA).
    pub ca_certificates: Option<PathBuf>,
    /// Address ranges outbound federation never connects to (CIDR). The
    /// default is Synapse's list of private, loopback, link-local and
    /// reserved ranges, so a room cannot make this server probe its own
    /// network.
    pub ip_range_denylist: Vec<String>,
    /// Ranges allowed even though `ip_range_denylist` covers them.
    pub ip_range_allowlist: Vec<String>,
    /// Longest wait for another server's answer, in milliseconds.
    pub request_timeout_ms: u64,
    /// First wait before sending again to a server that failed, in
    /// milliseconds; it doubles with each failure in a row.
    pub retry_base_ms: u64,
    /// Longest wait between attempts to a failing server, in milliseconds.
    /// A server that contacts this one is tried again at once.
    pub retry_max_ms: u64,
    /// Whether presence (online, idle, offline, status messages) is shared
    /// with other servers: sent as `m.presence` to the servers that share
    /// a room with the user, and taken from them. Off, neither.
    pub presence: bool,
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            enabled: true,
            listen: None,
            tls_certificate: None,
            tls_private_key: None,
            well_known_server: None,
            key_valid_for_ms: 24 * 60 * 60 * 1000,
            trusted_key_servers: Vec::new(),
            verify_certificates: true,
            ca_certificates: None,
            ip_range_denylist: myelin_federation::ip_ranges::DEFAULT_DENIED
                .iter()
                .map(|range| (*range).to_owned())
                .collect(),
            ip_range_allowlist: Vec::new(),
            request_timeout_ms: 30_000,
            retry_base_ms: 2_000,
            retry_max_ms: 10 * 60 * 1000,
            presence: true,
        }
    }
}

impl FederationConfig {
    /// The outbound address policy of the two lists (validated at load).
    pub fn ip_policy(&self) -> myelin_federation::ip_ranges::IpPolicy {
        let parse = |ranges: &[String]| ranges.iter().filter_map(|r| r.parse().ok()).collect();
        myelin_federation::ip_ranges::IpPolicy::new(
            parse(&self.ip_range_denylist),
            parse(&self.ip_range_allowlist),
        )
    }
}

/// Uploaded media (`/_matrix/media`, `/_matrix/client/v1/media`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Largest file accepted, in bytes.
    pub max_upload_bytes: u64,
    /// How long a media ID from `POST /_matrix/media/v1/create` waits for
    /// its upload.
    pub pending_upload_expiry_ms: u64,
    /// Whether the unauthenticated `/_matrix/media/v3` download endpoints
    /// serve media. Off by default, as Synapse freezes them: media is read
    /// through the authenticated `/_matrix/client/v1/media` endpoints.
    pub legacy_unauthenticated_downloads: bool,
    /// Whether `GET /_matrix/client/v1/media/preview_url` fetches pages.
    pub url_previews: bool,
    /// Whether previews may fetch private, loopback and link-local
    /// addresses. Off: a page on the server's own network is never fetched.
    pub url_preview_private_addresses: bool,
    /// The most pixels (width × height) an image may have to be
    /// thumbnailed. Larger images are refused from their header, before
    /// decoding, so a decompression bomb cannot exhaust memory.
    pub max_image_pixels: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            max_upload_bytes: 100 * 1024 * 1024,
            pending_upload_expiry_ms: 24 * 60 * 60 * 1000,
            legacy_unauthenticated_downloads: false,
            url_previews: false,
            url_preview_private_addresses: false,
            max_image_pixels: 32_000_000,
        }
    }
}

/// Who may register over `POST /_matrix/client/v3/register`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationMode {
    /// Only the `myelin user add` command creates accounts.
    Disabled,
    /// Registration needs one of `registration_tokens`.
    Token,
    /// Anyone may register (the `m.login.dummy` stage).
    Open,
}

/// The most MiB a storage memory budget may name (1 TiB).
const MAX_STORAGE_MB: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Sync the write-ahead log before answering a write. Turning this off
    /// is unsafe: a crash may lose writes that were acknowledged.
    pub sync_writes: bool,
    /// MiB of the block cache every table of the database reads through.
    pub block_cache_mb: usize,
    /// MiB the memtables of every table may hold together before the
    /// largest is flushed to disk.
    pub memtable_mb: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            sync_writes: true,
            block_cache_mb: 64,
            memtable_mb: 256,
        }
    }
}

/// Argon2id cost parameters for new password hashes.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordHashing {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for PasswordHashing {
    fn default() -> Self {
        // The OWASP recommendation for Argon2id.
        PasswordHashing {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `myelin=debug,info`;
    /// `RUST_LOG` takes precedence when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// What `GET /.well-known/matrix/client` answers.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WellKnown {
    /// Public base URL of the client API; unset: the endpoint answers 404.
    pub client_base_url: Option<String>,
    /// Identity server to advertise, if any.
    pub identity_server_base_url: Option<String>,
    /// Whom to contact about the server (`GET /.well-known/matrix/support`).
    pub support_contacts: Vec<SupportContact>,
    /// A web page about getting support.
    pub support_page: Option<String>,
}

/// One contact of `/.well-known/matrix/support`: a role and a Matrix ID or
/// an email address (or both).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupportContact {
    /// `m.role.admin`, `m.role.security` or a namespaced role.
    pub role: String,
    pub matrix_id: Option<String>,
    pub email_address: Option<String>,
}

/// Email through an SMTP server: validating the addresses users add to
/// their accounts, resetting forgotten passwords. Off until `smtp_host`
/// is set.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    /// The SMTP server; none: no email is sent and adding an address
    /// answers `M_THREEPID_MEDIUM_NOT_SUPPORTED`.
    pub smtp_host: Option<String>,
    pub smtp_port: u16,
    /// How the connection is protected: `starttls`, `tls` (TLS from the
    /// first byte, usually port 465) or `none` (only for a relay on the
    /// same machine).
    pub security: SmtpSecurity,
    /// Credentials for `AUTH PLAIN`; none: no authentication.
    pub smtp_user: Option<String>,
    pub smtp_password: Option<String>,
    /// A PEM file of certificates to trust besides the usual roots.
    pub ca_certificates: Option<PathBuf>,
    /// The sender: an address, with an optional name (`Name <a@b>`).
    /// Default: `noreply@` the server name's host.
    pub from: Option<String>,
    /// Where the links in emails point; default: `well_known.client_base_url`,
    /// else `https://` the server name.
    pub public_base_url: Option<String>,
    /// How long a validation code lasts, and a validated address may be
    /// used.
    pub token_lifetime_ms: u64,
    /// Whether registering needs a validated email address.
    pub require_for_registration: bool,
    /// Longest an exchange with the SMTP server may take.
    pub timeout_ms: u64,
}

/// How the connection to the SMTP server is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    Starttls,
    Tls,
    None,
}

impl Default for EmailConfig {
    fn default() -> Self {
        EmailConfig {
            smtp_host: None,
            smtp_port: 587,
            security: SmtpSecurity::Starttls,
            smtp_user: None,
            smtp_password: None,
            ca_certificates: None,
            from: None,
            public_base_url: None,
            token_lifetime_ms: 60 * 60 * 1000,
            require_for_registration: false,
            timeout_ms: 30_000,
        }
    }
}

impl EmailConfig {
    pub fn enabled(&self) -> bool {
        self.smtp_host.is_some()
    }
}

/// The archive tier: old events move to tables stored for size.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Whether the mover runs. Archived events stay readable either way.
    pub enabled: bool,
    /// Events older than this many days move to the archive.
    pub after_days: u64,
    /// Another directory (another disk) for the archive's files; empty:
    /// with the database. Fixed once events are archived.
    pub path: Option<PathBuf>,
    /// The zstd level of the archive's settled files (1 to 22).
    pub zstd_level: i32,
    /// A pass over the hot events starts this often.
    pub interval_minutes: u64,
    /// Events looked at in one batch (one atomic change).
    pub batch_size: usize,
    /// Pause between batches, so the mover takes a bounded share of the
    /// disk and the processor.
    pub pause_ms: u64,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            enabled: true,
            after_days: 30,
            path: None,
            zstd_level: 19,
            interval_minutes: 60,
            batch_size: 500,
            pause_ms: 20,
        }
    }
}

/// Notices from the server to its users (`POST
/// /_synapse/admin/v1/send_server_notice`), sent by a user of its own in a
/// room of their own per user.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerNoticesConfig {
    /// Off by default, as in Synapse.
    pub enabled: bool,
    /// The localpart of the user that sends the notices, made when first
    /// needed.
    pub localpart: String,
    pub display_name: String,
    /// The name of each user's notice room.
    pub room_name: String,
}

impl Default for ServerNoticesConfig {
    fn default() -> Self {
        ServerNoticesConfig {
            enabled: false,
            localpart: "notices".to_owned(),
            display_name: "Server Notices".to_owned(),
            room_name: "Server Notices".to_owned(),
        }
    }
}

/// The Prometheus metrics listener (`GET /metrics`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served; unset (the default), nowhere.
    pub listen: Option<SocketAddr>,
}

/// Deleting events past their lifetime instead of archiving them.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Off by default: every event is kept.
    pub enabled: bool,
    /// The longest any event is kept, in days, whatever its room asks;
    /// `None`: as long as the room's `m.room.retention` says.
    pub max_lifetime_days: Option<u64>,
}

/// Push notifications through the push gateways of pushers.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Address ranges (CIDR) a gateway may be at although
    /// `federation.ip_range_denylist` denies them (private networks,
    /// loopback): by default a pusher URL that resolves there is refused.
    pub ip_range_allowlist: Vec<String>,
    /// Longest a gateway may take to answer.
    pub request_timeout_ms: u64,
    /// The first retry after a failed request, doubled each time up to
    /// `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// A notification not delivered after this long is dropped.
    pub give_up_after_ms: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            ip_range_allowlist: Vec::new(),
            request_timeout_ms: 10_000,
            retry_base_ms: 1_000,
            retry_max_ms: 10 * 60 * 1000,
            give_up_after_ms: 24 * 60 * 60 * 1000,
        }
    }
}

/// Application services (bridges and bots) and how they are pushed to.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppservicesConfig {
    /// The registration files (YAML, as the spec describes them), one per
    /// application service. A file that cannot be read or used stops the
    /// server at start.
    pub registration_files: Vec<PathBuf>,
    /// Longest a service may take to answer a transaction or a query.
    pub request_timeout_ms: u64,
    /// The first retry after a failed transaction, doubled each time up
    /// to `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for AppservicesConfig {
    fn default() -> Self {
        AppservicesConfig {
            registration_files: Vec::new(),
            request_timeout_ms: 30_000,
            retry_base_ms: 1_000,
            retry_max_ms: 5 * 60 * 1000,
        }
    }
}

impl Config {
    /// Reads and checks the application service registration files.
    pub fn appservice_registrations(
        &self,
    ) -> Result<myelin_appservices::Registrations, ConfigError> {
        let mut files = Vec::with_capacity(self.appservices.registration_files.len());
        for path in &self.appservices.registration_files {
            let name = path.display().to_string();
            let fail = |problem: String| {
                ConfigError(format!(
                    "appservices.registration_files: {}",
                    myelin_appservices::RegistrationError {
                        file: name.clone(),
                        problem,
                    }
                ))
            };
            let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            let registration = myelin_appservices::Registration::from_yaml(&text).map_err(fail)?;
            files.push((name, registration));
        }
        myelin_appservices::Registrations::new(&self.server_name, files)
            .map_err(|e| ConfigError(format!("appservices.registration_files: {e}")))
    }
}

impl Config {
    /// The address policy for push gateways: the federation's denied
    /// ranges, with the push allowlist (validated at load).
    pub fn push_ip_policy(&self) -> myelin_federation::ip_ranges::IpPolicy {
        let parse = |ranges: &[String]| ranges.iter().filter_map(|r| r.parse().ok()).collect();
        myelin_federation::ip_ranges::IpPolicy::new(
            parse(&self.federation.ip_range_denylist),
            parse(&self.push.ip_range_allowlist),
        )
    }
}

/// TURN servers for calls (`GET /voip/turnServer`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// The TURN URIs (`turn:turn.example.org?transport=udp`, ...); none:
    /// no TURN server is offered.
    pub uris: Vec<String>,
    /// The secret shared with the TURN server (coturn's
    /// `static-auth-secret`): each user gets a username and password made
    /// from it that expire after `user_lifetime_ms`.
    pub shared_secret: Option<String>,
    /// Fixed credentials, when there is no shared secret.
    pub username: Option<String>,
    pub password: Option<String>,
    /// How long credentials made from the shared secret last.
    pub user_lifetime_ms: u64,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            uris: Vec::new(),
            shared_secret: None,
            username: None,
            password: None,
            user_lifetime_ms: 24 * 60 * 60 * 1000,
        }
    }
}

/// Rate limits per kind of request, or none at all.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimits {
    pub enabled: bool,
    /// Login attempts per client address.
    pub login: RateLimit,
    /// Accounts created per client address.
    pub registration: RateLimit,
    /// Registration token checks per client address.
    pub registration_token_validity: RateLimit,
    /// Validation emails asked for (`requestToken`) per client address.
    pub threepid_validation: RateLimit,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            enabled: true,
            login: RateLimit::default(),
            registration: RateLimit::default(),
            registration_token_validity: RateLimit {
                per_second: 0.1,
                burst: 5,
            },
            // Synapse's: a few emails, then one every five minutes.
            threepid_validation: RateLimit {
                per_second: 0.003,
                burst: 5,
            },
        }
    }
}

/// A token bucket: `burst` requests at once, refilled at `per_second`.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        // Synapse's defaults for logins and registrations per address.
        RateLimit {
            per_second: 0.17,
            burst: 3,
        }
    }
}

/// `rate_limits` is either a boolean or a table of kinds.
impl<'de> Deserialize<'de> for RateLimits {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Kinds {
            #[serde(default)]
            login: RateLimit,
            #[serde(default)]
            registration: RateLimit,
            #[serde(default = "token_validity_default")]
            registration_token_validity: RateLimit,
            #[serde(default = "threepid_validation_default")]
            threepid_validation: RateLimit,
        }

        fn threepid_validation_default() -> RateLimit {
            RateLimits::default().threepid_validation
        }

        fn token_validity_default() -> RateLimit {
            RateLimits::default().registration_token_validity
        }

        struct RateLimitsVisitor;
        impl<'de> Visitor<'de> for RateLimitsVisitor {
            type Value = RateLimits;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a boolean or a table of rate limits")
            }

            fn visit_bool<E: de::Error>(self, enabled: bool) -> Result<RateLimits, E> {
                Ok(RateLimits {
                    enabled,
                    ..RateLimits::default()
                })
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RateLimits, A::Error> {
                let kinds = Kinds::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RateLimits {
                    enabled: true,
                    login: kinds.login,
                    registration: kinds.registration,
                    registration_token_validity: kinds.registration_token_validity,
                    threepid_validation: kinds.threepid_validation,
                })
            }
        }
        deserializer.deserialize_any(RateLimitsVisitor)
    }
}

impl Config {
    /// Reads the file (if any), applies `MYELIN_*` overrides from `env`,
    /// and validates the result.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut root = match file {
            Some(path) => read_file(path)?,
            None => toml::Table::new(),
        };
        for (name, value) in env {
            apply_env_override(&mut root, &name, &value)?;
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(root)).map_err(|e| {
                // toml's messages add the key on a second line; the path says it.
                let inner = e.inner().to_string();
                let problem = inner.lines().next().unwrap_or_default().to_owned();
                ConfigError(format!("{}: {problem}", e.path()))
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration from the process environment and an optional file.
    pub fn from_environment(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load(file, std::env::vars())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.appservice_registrations()?;
        let appservices = &self.appservices;
        if appservices.request_timeout_ms < 100 {
            return Err(ConfigError(
                "appservices.request_timeout_ms: must be at least 100".to_owned(),
            ));
        }
        if appservices.retry_base_ms == 0 || appservices.retry_max_ms < appservices.retry_base_ms {
            return Err(ConfigError(
                "appservices.retry_max_ms: must be at least appservices.retry_base_ms, which must not be 0"
                    .to_owned(),
            ));
        }
        let fail = |key: &str, problem: String| Err(ConfigError(format!("{key}: {problem}")));
        if !(1..=22).contains(&self.archive.zstd_level) {
            return fail("archive.zstd_level", "must be 1 to 22".to_owned());
        }
        if self.archive.batch_size == 0 || self.archive.interval_minutes == 0 {
            return fail(
                "archive.batch_size",
                "archive.batch_size and archive.interval_minutes must not be 0".to_owned(),
            );
        }
        if self
            .registration_shared_secret
            .as_ref()
            .is_some_and(|secret| secret.is_empty())
        {
            return fail("registration_shared_secret", "must not be empty".to_owned());
        }
        if self.server_notices.enabled {
            if let Err(problem) = crate::ids::check_appservice_localpart(
                &self.server_notices.localpart,
                &self.server_name,
            ) {
                return fail("server_notices.localpart", problem);
            }
        }
        if self.retention.max_lifetime_days == Some(0) {
            return fail("retention.max_lifetime_days", "must not be 0".to_owned());
        }
        if let Err(problem) = validate_server_name(&self.server_name) {
            return fail("server_name", problem);
        }
        for contact in &self.well_known.support_contacts {
            if contact.role.is_empty()
                || (contact.matrix_id.is_none() && contact.email_address.is_none())
            {
                return fail(
                    "well_known.support_contacts",
                    "each contact needs a role and a matrix_id or an email_address".to_owned(),
                );
            }
        }
        let turn = &self.turn;
        let credentials =
            turn.shared_secret.is_some() || (turn.username.is_some() && turn.password.is_some());
        if !turn.uris.is_empty() && !credentials {
            return fail(
                "turn.uris",
                "need a shared_secret, or a username and a password".to_owned(),
            );
        }
        let email = &self.email;
        if email.smtp_user.is_some() != email.smtp_password.is_some() {
            return fail(
                "email.smtp_user",
                "needs email.smtp_password, and the other way round".to_owned(),
            );
        }
        if email.require_for_registration && !email.enabled() {
            return fail(
                "email.require_for_registration",
                "needs email.smtp_host".to_owned(),
            );
        }
        if let Some(from) = &email.from {
            if crate::services::email::sender_address(from).is_none() {
                return fail(
                    "email.from",
                    format!("{from:?} is not an address or `Name <address>`"),
                );
            }
        }
        if self.registration == RegistrationMode::Token && self.registration_tokens.is_empty() {
            return fail(
                "registration_tokens",
                "must list at least one token when registration = \"token\"".to_owned(),
            );
        }
        for token in &self.registration_tokens {
            let valid_char = |c: char| c.is_ascii_alphanumeric() || "._~-".contains(c);
            if token.is_empty() || token.len() > 64 || !token.chars().all(valid_char) {
                return fail(
                    "registration_tokens",
                    format!("{token:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ ~ -"),
                );
            }
        }
        for (key, limit) in [
            ("rate_limits.login", self.rate_limits.login),
            ("rate_limits.registration", self.rate_limits.registration),
            (
                "rate_limits.registration_token_validity",
                self.rate_limits.registration_token_validity,
            ),
            (
                "rate_limits.threepid_validation",
                self.rate_limits.threepid_validation,
            ),
        ] {
            if !(limit.per_second.is_finite() && limit.per_second > 0.0) || limit.burst == 0 {
                return fail(key, "per_second and burst must be positive".to_owned());
            }
        }
        let supported = crate::events::SUPPORTED_ROOM_VERSIONS
            .iter()
            .any(|v| v.as_str() == self.default_room_version);
        if !supported {
            return fail(
                "default_room_version",
                format!("{:?} is not one of 10, 11, 12", self.default_room_version),
            );
        }
        if self.max_room_members < 2 {
            return fail("max_room_members", "must be at least 2".to_owned());
        }
        if self.max_request_body_bytes < 1024 {
            return fail("max_request_body_bytes", "must be at least 1024".to_owned());
        }
        if self.media.max_upload_bytes < 1024 {
            return fail("media.max_upload_bytes", "must be at least 1024".to_owned());
        }
        for (key, value, least) in [
            ("storage.block_cache_mb", self.storage.block_cache_mb, 1),
            ("storage.memtable_mb", self.storage.memtable_mb, 4),
        ] {
            if !(least..=MAX_STORAGE_MB).contains(&value) {
                return fail(key, format!("must be from {least} to {MAX_STORAGE_MB}"));
            }
        }
        let ws = &self.websocket;
        if ws.max_frame_bytes < 1024 {
            return fail(
                "websocket.max_frame_bytes",
                "must be at least 1024".to_owned(),
            );
        }
        if ws.max_requests_in_flight == 0 {
            return fail(
                "websocket.max_requests_in_flight",
                "must be at least 1".to_owned(),
            );
        }
        for (key, value) in [
            ("websocket.ping_interval_ms", ws.ping_interval_ms),
            ("websocket.idle_timeout_ms", ws.idle_timeout_ms),
            ("websocket.send_timeout_ms", ws.send_timeout_ms),
            ("websocket.auth_timeout_ms", ws.auth_timeout_ms),
        ] {
            if value < 10 {
                return fail(key, "must be at least 10".to_owned());
            }
        }
        if self.media.max_image_pixels == 0 {
            return fail("media.max_image_pixels", "must be at least 1".to_owned());
        }
        if self.media.pending_upload_expiry_ms < 1000 {
            return fail(
                "media.pending_upload_expiry_ms",
                "must be at least 1000".to_owned(),
            );
        }
        if self.refreshable_access_token_lifetime_ms < 1000 {
            return fail(
                "refreshable_access_token_lifetime_ms",
                "must be at least 1000".to_owned(),
            );
        }
        let hashing = &self.password_hashing;
        if let Err(e) = argon2::Params::new(
            hashing.memory_kib,
            hashing.iterations,
            hashing.parallelism,
            None,
        ) {
            return fail("password_hashing", e.to_string());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return fail("log.level", e.to_string());
        }
        for (key, url) in [
            (
                "well_known.client_base_url",
                &self.well_known.client_base_url,
            ),
            (
                "well_known.identity_server_base_url",
                &self.well_known.identity_server_base_url,
            ),
        ] {
            if let Some(url) = url {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return fail(key, "must start with https:// or http://".to_owned());
                }
            }
        }
        self.validate_federation()
    }

    fn validate_federation(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, problem: String| Err(ConfigError(format!("{key}: {problem}")));
        let federation = &self.federation;
        if federation.tls_certificate.is_some() != federation.tls_private_key.is_some() {
            return fail(
                "federation.tls_certificate",
                "needs federation.tls_private_key, and the other way round".to_owned(),
            );
        }
        if federation.tls_certificate.is_some() && federation.listen.is_none() {
            return fail(
                "federation.tls_certificate",
                "serves HTTPS on federation.listen, which is not set".to_owned(),
            );
        }
        if let Some(server) = &federation.well_known_server {
            if let Err(problem) = validate_server_name(server) {
                return fail("federation.well_known_server", problem);
            }
        }
        for server in &federation.trusted_key_servers {
            if let Err(problem) = validate_server_name(server) {
                return fail("federation.trusted_key_servers", problem);
            }
        }
        for (key, ranges) in [
            (
                "federation.ip_range_denylist",
                &federation.ip_range_denylist,
            ),
            (
                "federation.ip_range_allowlist",
                &federation.ip_range_allowlist,
            ),
            ("push.ip_range_allowlist", &self.push.ip_range_allowlist),
        ] {
            for range in ranges {
                if let Err(e) = range.parse::<myelin_federation::ip_ranges::IpRange>() {
                    return fail(key, e.to_string());
                }
            }
        }
        if federation.key_valid_for_ms < 60_000 {
            return fail(
                "federation.key_valid_for_ms",
                "must be at least 60000".to_owned(),
            );
        }
        if federation.request_timeout_ms < 100 {
            return fail(
                "federation.request_timeout_ms",
                "must be at least 100".to_owned(),
            );
        }
        if federation.retry_base_ms == 0 || federation.retry_max_ms < federation.retry_base_ms {
            return fail(
                "federation.retry_max_ms",
                "retry_base_ms must be above 0 and retry_max_ms at least retry_base_ms".to_owned(),
            );
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
    text.parse::<toml::Table>().map_err(|e| {
        let message = e.message().to_owned();
        let line = e
            .span()
            .map(|span| text[..span.start].lines().count().max(1))
            .unwrap_or(0);
        ConfigError(format!("{} line {line}: {message}", path.display()))
    })
}

/// Sets the key that `MYELIN_A__B` names (`a.b`) to the variable's value.
///
/// The value is read as a TOML literal when it is one (`false`, `8`,
/// `["x"]`), and as a plain string otherwise (`localhost`, `0.0.0.0:8008`).
fn apply_env_override(root: &mut toml::Table, name: &str, value: &str) -> Result<(), ConfigError> {
    let Some(key) = name.strip_prefix(ENV_PREFIX) else {
        return Ok(());
    };
    if name == CONFIG_FILE_ENV {
        return Ok(());
    }
    let path: Vec<String> = key.split("__").map(|part| part.to_lowercase()).collect();
    if path.iter().any(|part| part.is_empty()) {
        return Err(ConfigError(format!("{name}: not a configuration key")));
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));

    let (last, parents) = path.split_last().expect("split yields one part at least");
    let mut table = root;
    for part in parents {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(inner) => inner,
            _ => {
                return Err(ConfigError(format!(
                    "{name}: {part} is not a table of keys"
                )))
            }
        };
    }
    table.insert(last.clone(), parsed);
    Ok(())
}

/// Checks the server name grammar: a host name or IP literal, then an
/// optional port.
pub fn validate_server_name(name: &str) -> Result<(), String> {
    let (host, port) = split_host_port(name);
    if let Some(port) = port {
        if port.parse::<u16>().is_err() {
            return Err(format!("{name:?} has an invalid port"));
        }
    }
    let valid_dns = !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    let valid_ipv6 = host.starts_with('[')
        && host.ends_with(']')
        && host[1..host.len() - 1]
            .parse::<std::net::Ipv6Addr>()
            .is_ok();
    if valid_dns || valid_ipv6 {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid server name"))
    }
}

fn split_host_port(name: &str) -> (&str, Option<&str>) {
    if name.starts_with('[') {
        match name.rfind("]:") {
            Some(i) => (&name[..=i], Some(&name[i + 2..])),
            None => (name, None),
        }
    } else {
        match name.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (name, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("myelin.toml");
        std::fs::write(&path, toml).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(Some(&path), env).map_err(|e| e.to_string())
    }

    fn check_error(toml: &str, env: &[(&str, &str)], expected: &str) {
        let error = load(toml, env).expect_err("configuration must be refused");
        assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        assert!(!error.contains('\n'), "{error:?} spans several lines");
    }

    #[test]
    fn no_configuration_means_safe_defaults() {
        let config = Config::load(None, Vec::new()).unwrap();
        assert_eq!(config.server_name, "localhost");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8008");
        assert_eq!(config.data_dir, PathBuf::from("./myelin-data"));
        assert_eq!(config.registration, RegistrationMode::Disabled);
        assert!(config.rate_limits.enabled);
        assert!(config.storage.sync_writes);
    }

    #[test]
    fn the_example_configuration_is_the_defaults() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/myelin.toml");
        let config = Config::load(Some(&example), Vec::new()).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = load(
            "server_name = \"example.org\"\nregistration = \"open\"\n",
            &[
                ("MYELIN_SERVER_NAME", "chat.example.com"),
                ("MYELIN_LISTEN", "127.0.0.1:9000"),
                ("MYELIN_DATA_DIR", "/var/lib/x"),
                ("MYELIN_RATE_LIMITS", "false"),
                ("MYELIN_STORAGE__SYNC_WRITES", "false"),
                ("MYELIN_CONFIG", "ignored.toml"),
                ("PATH", "/bin"),
            ],
        )
        .unwrap();
        assert_eq!(config.server_name, "chat.example.com");
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(config.registration, RegistrationMode::Open);
        assert!(!config.rate_limits.enabled);
        assert!(!config.storage.sync_writes);
    }

    #[test]
    fn rate_limits_take_a_table_or_a_boolean() {
        let config = load("[rate_limits.login]\nper_second = 2.0\nburst = 5\n", &[]).unwrap();
        assert!(config.rate_limits.enabled);
        assert_eq!(config.rate_limits.login.burst, 5);
        assert_eq!(config.rate_limits.registration, RateLimit::default());
        let config = load("", &[("MYELIN_RATE_LIMITS__REGISTRATION__BURST", "9")]).unwrap();
        assert_eq!(config.rate_limits.registration.burst, 9);
        assert!(
            !load("rate_limits = false", &[])
                .unwrap()
                .rate_limits
                .enabled
        );
    }

    #[test]
    fn bad_configurations_name_the_key() {
        check_error("listen = \"nowhere\"", &[], "listen");
        check_error("registration = \"maybe\"", &[], "registration");
        check_error("colour = \"blue\"", &[], "colour");
        check_error("[storage]\nfsync = true", &[], "storage");
        check_error("[storage]\nmemtable_mb = 1", &[], "storage.memtable_mb");
        check_error(
            "[storage]\nblock_cache_mb = 0",
            &[],
            "storage.block_cache_mb",
        );
        check_error("", &[("MYELIN_LISTEN", "nowhere")], "listen");
        check_error(
            "",
            &[("MYELIN_REGISTRATION", "token")],
            "registration_tokens",
        );
        check_error("server_name = \"bad name\"", &[], "server_name");
        check_error("server_name = \"host:99999\"", &[], "server_name");
        check_error("rate_limits = \"slow\"", &[], "rate_limits");
        check_error("[rate_limits.login]\nburst = 0", &[], "rate_limits.login");
        check_error(
            "registration_tokens = [\"has space\"]",
            &[],
            "registration_tokens",
        );
        check_error("max_request_body_bytes = 10", &[], "max_request_body_bytes");
        check_error("default_room_version = \"9\"", &[], "default_room_version");
        check_error("max_room_members = 1", &[], "max_room_members");
        check_error(
            "[password_hashing]\nmemory_kib = 1",
            &[],
            "password_hashing",
        );
        check_error("[log]\nformat = \"xml\"", &[], "log.format");
        check_error(
            "[well_known]\nclient_base_url = \"x\"",
            &[],
            "client_base_url",
        );
        check_error("server_name = ", &[], "line 1");
    }

    #[test]
    fn federation_settings_are_checked() {
        let config = load("[federation]\nip_range_allowlist = [\"127.0.0.0/8\"]", &[]).unwrap();
        assert!(config.federation.enabled);
        let policy = config.federation.ip_policy();
        assert!(policy.permits("127.0.0.2".parse().unwrap()));
        assert!(!policy.permits("10.0.0.1".parse().unwrap()));
        check_error(
            "[federation]\nip_range_denylist = [\"10.0.0.0/99\"]",
            &[],
            "federation.ip_range_denylist",
        );
        check_error(
            "[federation]\nlisten = \"127.0.0.1:8448\"\ntls_certificate = \"c.pem\"",
            &[],
            "federation.tls_certificate",
        );
        check_error(
            "[federation]\ntls_certificate = \"c.pem\"\ntls_private_key = \"k.pem\"",
            &[],
            "federation.listen, which is not set",
        );
        check_error(
            "[federation]\nwell_known_server = \"a b\"",
            &[],
            "federation.well_known_server",
        );
        check_error(
            "[federation]\ntrusted_key_servers = [\"host:x\"]",
            &[],
            "federation.trusted_key_servers",
        );
        check_error(
            "[federation]\nkey_valid_for_ms = 5",
            &[],
            "federation.key_valid_for_ms",
        );
        let env = load("", &[("MYELIN_FEDERATION__ENABLED", "false")]).unwrap();
        assert!(!env.federation.enabled);
    }

    #[test]
    fn server_names_follow_the_grammar() {
        for good in [
            "localhost",
            "example.org:8448",
            "1.2.3.4",
            "[::1]:80",
            "[::1]",
        ] {
            assert_eq!(validate_server_name(good), Ok(()), "{good}");
        }
        for bad in ["", "a b", "host:", "host:x", "[::1", "a/b", "[zz]:1"] {
            assert!(validate_server_name(bad).is_err(), "{bad}");
        }
    }
}
