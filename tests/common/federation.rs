//! Federating servers on loopback: a certificate authority made for the
//! test, and servers named by IP literal with their port
//! (`127.0.0.2:PORT`), each with an HTTPS federation listener whose
//! certificate that authority signed.

use std::net::{IpAddr, SocketAddr};

use myelin::config::Config;
pub use myelin_testkit::ca::{free_port, TestCa};
use tempfile::TempDir;

use super::{test_config, TestServer};

/// The configuration of a federating server on `ip`: named
/// `{ip}:{port}`, its federation API on HTTPS at that address, trusting
/// the test CA, allowed to reach loopback.
pub fn federating_config(dir: &TempDir, ca: &TestCa, ip: IpAddr) -> Config {
    let port = free_port(ip);
    let (cert, key) = ca.issue(ip);
    let mut config = test_config(dir);
    config.server_name = format!("{ip}:{port}");
    config.federation.listen = Some(SocketAddr::new(ip, port));
    config.federation.tls_certificate = Some(cert);
    config.federation.tls_private_key = Some(key);
    config.federation.ca_certificates = Some(ca.ca_pem.clone());
    config.federation.ip_range_allowlist = vec!["127.0.0.0/8".to_owned()];
    config.federation.request_timeout_ms = 10_000;
    config
}

/// Starts a federating server on `ip`, adjusted by `adjust`.
pub async fn start_federating(
    ca: &TestCa,
    ip: &str,
    adjust: impl FnOnce(&mut Config),
) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = federating_config(&dir, ca, ip.parse().unwrap());
    adjust(&mut config);
    TestServer::start_in(dir, config, None).await
}

/// Two federating servers, on 127.0.0.2 and 127.0.0.3.
pub async fn two_servers(ca: &TestCa) -> (TestServer, TestServer) {
    let one = start_federating(ca, "127.0.0.2", |_| {}).await;
    let two = start_federating(ca, "127.0.0.3", |_| {}).await;
    (one, two)
}

impl TestServer {
    /// Registers `username` with a display name; returns the access token
    /// and the user ID.
    pub async fn register_named(&self, username: &str, displayname: &str) -> (String, String) {
        let token = super::token(&self.register(username).await);
        let user_id = format!("@{username}:{}", self.server_name());
        let (status, body) = self
            .put(
                &format!("/_matrix/client/v3/profile/{user_id}/displayname"),
                Some(&token),
                serde_json::json!({ "displayname": displayname }),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
        (token, user_id)
    }

    /// The server's name (`127.0.0.2:PORT` for federating servers).
    pub fn server_name(&self) -> String {
        self.server
            .as_ref()
            .unwrap()
            .services
            .config
            .server_name
            .clone()
    }

    /// The running server's services, for tests that act as the server.
    pub fn services(&self) -> std::sync::Arc<myelin::services::Services> {
        self.server.as_ref().unwrap().services.clone()
    }

    /// The base URL of the federation listener.
    pub fn federation_base(&self) -> String {
        let addr = self.server.as_ref().unwrap().federation_addr.unwrap();
        format!("https://{addr}")
    }
}

/// An HTTP client that trusts the test CA.
pub fn https_client(ca: &TestCa) -> reqwest::Client {
    let pem = std::fs::read(&ca.ca_pem).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}
