//! Synapse (PyPI `matrix-synapse`) as a federation peer: a configuration
//! for loopback federation (an IP-literal server name with its port, an
//! HTTPS federation listener, a private CA, no key servers, no outbound
//! deny list, short retry intervals, no rate limits), its signing key, and
//! the process, stopped when the handle drops.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ProvisionError, Provisioner};

/// The Synapse release the tests run against.
pub const SYNAPSE: &str = "matrix-synapse==1.163.2";

/// Longest Synapse may take to answer its health check after starting.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Where and how a Synapse peer listens.
#[derive(Clone, Debug)]
pub struct SynapseSetup {
    /// The loopback address both listeners bind.
    pub ip: IpAddr,
    /// The federation listener's port; the server name is `ip:port`.
    pub federation_port: u16,
    /// The client listener's port (plain HTTP).
    pub client_port: u16,
    /// PEM certificate and key of the federation listener.
    pub tls_certificate: PathBuf,
    pub tls_private_key: PathBuf,
    /// PEM file of the CA that signed the other servers' certificates.
    pub ca_certificates: PathBuf,
}

impl SynapseSetup {
    /// Both listeners on free ports of `ip`, with a certificate of `ca`.
    pub fn on(ip: IpAddr, ca: &crate::ca::TestCa) -> Self {
        let (tls_certificate, tls_private_key) = ca.issue(ip);
        SynapseSetup {
            ip,
            federation_port: crate::ca::free_port(ip),
            client_port: crate::ca::free_port(ip),
            tls_certificate,
            tls_private_key,
            ca_certificates: ca.ca_pem.clone(),
        }
    }
}

/// A running Synapse.
pub struct Synapse {
    child: Child,
    pub server_name: String,
    /// `http://ip:client_port`
    pub client_base: String,
    /// `https://ip:federation_port`
    pub federation_base: String,
    pub dir: PathBuf,
}

impl Synapse {
    /// Provisions Synapse (once) and starts it with its files in `dir`.
    pub fn start(dir: &Path, setup: &SynapseSetup) -> Result<Synapse, String> {
        let python = match std::env::var_os("MYELIN_TEST_SYNAPSE_PYTHON") {
            Some(python) => PathBuf::from(python),
            None => Provisioner::from_environment()
                .python(&[SYNAPSE])
                .map_err(|e: ProvisionError| e.to_string())?
                .python(),
        };
        let server_name = format!("{}:{}", host(setup.ip), setup.federation_port);
        let config_path = dir.join("homeserver.yaml");
        std::fs::write(&config_path, configuration(dir, &server_name, setup))
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let generated = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "--generate-keys", "-c"])
            .arg(&config_path)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        if !generated.status.success() {
            return Err(format!(
                "synapse --generate-keys failed: {}",
                String::from_utf8_lossy(&generated.stderr)
            ));
        }
        let log = std::fs::File::create(dir.join("synapse.log")).map_err(|e| e.to_string())?;
        let child = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start synapse: {e}"))?;
        let mut synapse = Synapse {
            child,
            server_name,
            client_base: format!("http://{}:{}", host(setup.ip), setup.client_port),
            federation_base: format!("https://{}:{}", host(setup.ip), setup.federation_port),
            dir: dir.to_owned(),
        };
        synapse.wait_until_healthy(SocketAddr::new(setup.ip, setup.client_port))?;
        Ok(synapse)
    }

    /// The last lines of Synapse's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("synapse.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn wait_until_healthy(&mut self, client: SocketAddr) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "synapse exited with {status}:\n{}",
                    self.log_tail(30)
                ));
            }
            if health(client) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "synapse did not answer within {START_TIMEOUT:?}:\n{}",
            self.log_tail(30)
        ))
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `GET /health` answers 200.
fn health(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

/// Synapse's `homeserver.yaml` for loopback federation tests.
fn configuration(dir: &Path, server_name: &str, setup: &SynapseSetup) -> String {
    let dir = dir.display();
    let ip = setup.ip;
    let rate = "{per_second: 10000, burst_count: 10000}";
    format!(
        r#"server_name: "{server_name}"
pid_file: {dir}/homeserver.pid
listeners:
  - port: {client_port}
    bind_addresses: ['{ip}']
    type: http
    tls: false
    x_forwarded: false
    resources: [{{names: [client], compress: false}}]
  - port: {federation_port}
    bind_addresses: ['{ip}']
    type: http
    tls: true
    resources: [{{names: [federation], compress: false}}]
tls_certificate_path: {cert}
tls_private_key_path: {key}
database: {{name: sqlite3, args: {{database: {dir}/homeserver.db}}}}
media_store_path: {dir}/media_store
signing_key_path: {dir}/signing.key
registration_shared_secret: "myelin-test-shared-secret"
macaroon_secret_key: "myelin-test-macaroon-secret"
form_secret: "myelin-test-form-secret"
report_stats: false
enable_registration: true
enable_registration_without_verification: true
trusted_key_servers: []
suppress_key_server_warning: true
federation_verify_certificates: true
federation_custom_ca_list: [{ca}]
federation_ip_range_blacklist: []
ip_range_whitelist: ['127.0.0.0/8', '::1/128']
federation:
  destination_min_retry_interval: 1s
  destination_max_retry_interval: 3s
  destination_retry_multiplier: 2
rc_message: {rate}
rc_registration: {rate}
rc_login:
  address: {rate}
  account: {rate}
  failed_attempts: {rate}
rc_joins:
  local: {rate}
  remote: {rate}
rc_invites:
  per_room: {rate}
  per_user: {rate}
  per_issuer: {rate}
rc_federation: {{window_size: 1000, sleep_limit: 10000, sleep_delay: 0, reject_limit: 10000, concurrent: 100}}
"#,
        client_port = setup.client_port,
        federation_port = setup.federation_port,
        cert = setup.tls_certificate.display(),
        key = setup.tls_private_key.display(),
        ca = setup.ca_certificates.display(),
    )
}
