//! Starts a Myelin server for tests that drive it with real Matrix client
//! libraries (matrix-rust-sdk here), on a free loopback port with its own
//! data directory.

use myelin::config::{Config, RegistrationMode};
use myelin::server::{self, RunningServer};
use tempfile::TempDir;

/// The password every test account gets.
pub const PASSWORD: &str = "correct horse battery staple";

/// A running server; dropped with its data directory at the end of a test.
pub struct Homeserver {
    pub url: String,
    pub server: RunningServer,
    pub dir: TempDir,
}

impl Homeserver {
    /// Open registration, no rate limits, cheap password hashing.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("loopback address"),
            data_dir: dir.path().to_path_buf(),
            registration: RegistrationMode::Open,
            ..Config::default()
        };
        config.rate_limits.enabled = false;
        config.password_hashing.memory_kib = 64;
        config.password_hashing.iterations = 1;
        let server = server::start(config).await.expect("server starts");
        Homeserver {
            url: format!("http://{}", server.addr),
            server,
            dir,
        }
    }
}
