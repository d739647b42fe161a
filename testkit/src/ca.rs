//! Servers that federate on loopback: a certificate authority made for
//! the test, whose certificates name IP addresses (servers are named by
//! IP literal with their port), and free ports to listen on.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A certificate authority whose files live as long as it does.
pub struct TestCa {
    dir: tempfile::TempDir,
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The authority's certificate, which servers are told to trust.
    pub ca_pem: PathBuf,
}

impl TestCa {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Myelin test CA");
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("the CA certificate");
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, cert.pem()).expect("the CA file");
        TestCa {
            dir,
            cert,
            key,
            ca_pem,
        }
    }

    /// A certificate for `ip` and its key, as PEM files.
    pub fn issue(&self, ip: IpAddr) -> (PathBuf, PathBuf) {
        let params = CertificateParams::new(vec![ip.to_string()]).expect("parameters");
        let key = KeyPair::generate().expect("a key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("a certificate");
        let cert_path = self.dir.path().join(format!("{ip}.pem"));
        let key_path = self.dir.path().join(format!("{ip}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("the certificate file");
        std::fs::write(&key_path, key.serialize_pem()).expect("the key file");
        (cert_path, key_path)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// A free port on `ip`.
pub fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind(SocketAddr::new(ip, 0))
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}
