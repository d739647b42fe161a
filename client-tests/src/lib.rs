//! Starts a Myelin server for tests that drive it with real Matrix client
//! libraries (matrix-rust-sdk here), on a free loopback port with its own
//! data directory.

use myelin::config::{Config, RegistrationMode};
use myelin::server::{self, RunningServer};
use myelin_testkit::ca::{free_port, TestCa};
use std::net::{IpAddr, SocketAddr};
use tempfile::TempDir;

/// Open registration, no rate limits, cheap password hashing.
fn test_config(dir: &TempDir) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("loopback address"),
        data_dir: dir.path().to_path_buf(),
        registration: RegistrationMode::Open,
        ..Config::default()
    };
    config.rate_limits.enabled = false;
    config.password_hashing.memory_kib = 64;
    config.password_hashing.iterations = 1;
    config
}

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
        let config = test_config(&dir);
        Self::start_in(dir, config).await
    }

    /// Like [`Homeserver::start`], with the configuration adjusted.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = test_config(&dir);
        adjust(&mut config);
        Self::start_in(dir, config).await
    }

    /// A server that federates on `ip`: named `{ip}:{port}`, its
    /// federation API on HTTPS at that address with a certificate of
    /// `ca`, trusting `ca`, allowed to reach loopback.
    pub async fn start_federating(ca: &TestCa, ip: IpAddr) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = test_config(&dir);
        let port = free_port(ip);
        let (cert, key) = ca.issue(ip);
        config.server_name = format!("{ip}:{port}");
        config.federation.listen = Some(SocketAddr::new(ip, port));
        config.federation.tls_certificate = Some(cert);
        config.federation.tls_private_key = Some(key);
        config.federation.ca_certificates = Some(ca.ca_pem.clone());
        config.federation.ip_range_allowlist = vec!["127.0.0.0/8".to_owned()];
        config.federation.retry_base_ms = 200;
        config.federation.retry_max_ms = 2_000;
        Self::start_in(dir, config).await
    }

    async fn start_in(dir: TempDir, config: Config) -> Self {
        let server = server::start(config).await.expect("server starts");
        Homeserver {
            url: format!("http://{}", server.addr),
            server,
            dir,
        }
    }
}
