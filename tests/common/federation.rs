//! Federating servers on loopback: a certificate authority made for the
//! test, and servers named by IP literal with their port
//! (`127.0.0.2:PORT`), each with an HTTPS federation listener whose
//! certificate that authority signed.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;

use myelin::config::Config;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tempfile::TempDir;

use super::{test_config, TestServer};

/// A certificate authority whose files live as long as it does.
pub struct TestCa {
    dir: TempDir,
    cert: rcgen::Certificate,
    key: KeyPair,
    pub ca_pem: PathBuf,
}

impl TestCa {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Myelin test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, cert.pem()).unwrap();
        TestCa {
            dir,
            cert,
            key,
            ca_pem,
        }
    }

    /// A certificate for `ip` and its key, as PEM files.
    pub fn issue(&self, ip: IpAddr) -> (PathBuf, PathBuf) {
        let params = CertificateParams::new(vec![ip.to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let cert_path = self.dir.path().join(format!("{ip}.pem"));
        let key_path = self.dir.path().join(format!("{ip}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

/// A free port on `ip`.
pub fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind(SocketAddr::new(ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
