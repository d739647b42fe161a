//! Server discovery: where to send a server's federation requests, in the
//! spec's resolution order (IP literal, explicit port,
//! `/.well-known/matrix/server`, SRV `_matrix-fed._tcp` then `_matrix._tcp`,
//! port 8448).
//!
//! The network look-ups (the well-known document and SRV records) are
//! behind [`Lookups`], so the order is tested without a network; the outbound
//! client supplies the real ones. A/AAAA resolution of the chosen host is the
//! connector's job, after the IP range checks.

use std::future::Future;
use std::time::Duration;

use ruma::{OwnedServerName, ServerName};

/// The port federation uses when nothing names another.
pub const DEFAULT_PORT: u16 = 8448;

/// How long a well-known answer is kept when its headers say nothing.
pub const WELL_KNOWN_DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest a well-known answer is kept, whatever its headers say.
pub const WELL_KNOWN_MAX_TTL: Duration = Duration::from_secs(48 * 3600);
/// How long a failed well-known look-up is remembered.
pub const WELL_KNOWN_ERROR_TTL: Duration = Duration::from_secs(3600);

/// Where and how to reach a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The host to connect to: an IP address or a name to resolve (A/AAAA).
    pub connect_host: String,
    pub port: u16,
    /// The `Host` header of every request.
    pub host_header: String,
    /// The name the server's TLS certificate must be valid for (also the
    /// SNI name).
    pub tls_name: String,
}

/// The network look-ups discovery needs.
pub trait Lookups {
    /// `m.server` of `https://{hostname}/.well-known/matrix/server`, or
    /// `None` when the document is missing or invalid.
    fn well_known(&self, hostname: &str) -> impl Future<Output = Option<OwnedServerName>> + Send;
    /// The target and port of the first usable SRV record of `name`.
    fn srv(&self, name: &str) -> impl Future<Output = Option<(String, u16)>> + Send;
}

/// Resolves `server` to the place its federation API is reached.
pub async fn resolve(server: &ServerName, lookups: &impl Lookups) -> Destination {
    if let Some(destination) = without_lookups(server) {
        return destination;
    }
    let hostname = server.host();
    if let Some(delegated) = lookups.well_known(hostname).await {
        if let Some(destination) = without_lookups(&delegated) {
            return destination;
        }
        return by_srv_or_default(delegated.host(), lookups).await;
    }
    by_srv_or_default(hostname, lookups).await
}

/// Steps 1 and 2 of the order: an IP literal, or a name with an explicit
/// port, is used as it is.
fn without_lookups(server: &ServerName) -> Option<Destination> {
    let host = server.host();
    if server.is_ip_literal() {
        let port = server.port().unwrap_or(DEFAULT_PORT);
        return Some(Destination {
            connect_host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            host_header: server.as_str().to_owned(),
            tls_name: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        });
    }
    server.port().map(|port| Destination {
        connect_host: host.to_owned(),
        port,
        host_header: server.as_str().to_owned(),
        tls_name: host.to_owned(),
    })
}

/// The SRV steps, then port 8448 of the name itself. The `Host` header and
/// the certificate name stay the name looked up, not the SRV target.
async fn by_srv_or_default(hostname: &str, lookups: &impl Lookups) -> Destination {
    for prefix in ["_matrix-fed._tcp", "_matrix._tcp"] {
        if let Some((target, port)) = lookups.srv(&format!("{prefix}.{hostname}")).await {
            return Destination {
                connect_host: target.trim_end_matches('.').to_owned(),
                port,
                host_header: hostname.to_owned(),
                tls_name: hostname.to_owned(),
            };
        }
    }
    Destination {
        connect_host: hostname.to_owned(),
        port: DEFAULT_PORT,
        host_header: hostname.to_owned(),
        tls_name: hostname.to_owned(),
    }
}

/// `m.server` of a well-known document; `None` when it is not a JSON object
/// with a valid server name there.
pub fn parse_well_known(body: &[u8]) -> Option<OwnedServerName> {
    let document: serde_json::Value = serde_json::from_slice(body).ok()?;
    let name = document.get("m.server")?.as_str()?;
    ServerName::parse(name).ok()
}

/// How long to keep a well-known answer, from its `Cache-Control` header:
/// `max-age` (capped), `no-store`/`no-cache` (not kept), else the default.
pub fn well_known_ttl(cache_control: Option<&str>) -> Duration {
    let Some(header) = cache_control else {
        return WELL_KNOWN_DEFAULT_TTL;
    };
    let mut ttl = WELL_KNOWN_DEFAULT_TTL;
    for directive in header.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Duration::ZERO;
        }
        if let Some(seconds) = lower.strip_prefix("max-age=") {
            if let Ok(seconds) = seconds.trim_matches('"').parse::<u64>() {
                ttl = Duration::from_secs(seconds);
            }
        }
    }
    ttl.min(WELL_KNOWN_MAX_TTL)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[derive(Default)]
    struct Fake {
        well_known: HashMap<String, String>,
        srv: HashMap<String, (String, u16)>,
    }

    impl Lookups for Fake {
        async fn well_known(&self, hostname: &str) -> Option<OwnedServerName> {
            let name = self.well_known.get(hostname)?;
            ServerName::parse(name).ok()
        }
        async fn srv(&self, name: &str) -> Option<(String, u16)> {
            self.srv.get(name).cloned()
        }
    }

    fn check(server: &str, lookups: &Fake, expected: (&str, u16, &str, &str)) {
        let server = ServerName::parse(server).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let got = runtime.block_on(resolve(&server, lookups));
        let (connect_host, port, host_header, tls_name) = expected;
        assert_eq!(
            got,
            Destination {
                connect_host: connect_host.to_owned(),
                port,
                host_header: host_header.to_owned(),
                tls_name: tls_name.to_owned(),
            },
            "{server}"
        );
    }

    fn with_well_known(host: &str, target: &str) -> Fake {
        let mut fake = Fake::default();
        fake.well_known.insert(host.to_owned(), target.to_owned());
        fake
    }

    #[test]
    fn ip_literals_are_used_as_they_are() {
        let none = Fake::default();
        check(
            "127.0.0.2:8448",
            &none,
            ("127.0.0.2", 8448, "127.0.0.2:8448", "127.0.0.2"),
        );
        check(
            "127.0.0.2",
            &none,
            ("127.0.0.2", 8448, "127.0.0.2", "127.0.0.2"),
        );
        check("[::1]:9000", &none, ("::1", 9000, "[::1]:9000", "::1"));
        // Even with a well-known document, an IP literal is never delegated.
        let fake = with_well_known("127.0.0.2", "other.example");
        check(
            "127.0.0.2",
            &fake,
            ("127.0.0.2", 8448, "127.0.0.2", "127.0.0.2"),
        );
    }

    #[test]
    fn an_explicit_port_skips_the_look_ups() {
        let fake = with_well_known("example.org", "other.example");
        check(
            "example.org:8500",
            &fake,
            ("example.org", 8500, "example.org:8500", "example.org"),
        );
    }

    #[test]
    fn well_known_delegation_then_its_own_steps() {
        let fake = with_well_known("example.org", "matrix.example.net:443");
        check(
            "example.org",
            &fake,
            (
                "matrix.example.net",
                443,
                "matrix.example.net:443",
                "matrix.example.net",
            ),
        );
        let fake = with_well_known("example.org", "10.0.0.5");
        check(
            "example.org",
            &fake,
            ("10.0.0.5", 8448, "10.0.0.5", "10.0.0.5"),
        );

        let mut fake = with_well_known("example.org", "matrix.example.net");
        fake.srv.insert(
            "_matrix-fed._tcp.matrix.example.net".to_owned(),
            ("fed.example.net.".to_owned(), 8999),
        );
        check(
            "example.org",
            &fake,
            (
                "fed.example.net",
                8999,
                "matrix.example.net",
                "matrix.example.net",
            ),
        );

        let fake = with_well_known("example.org", "matrix.example.net");
        check(
            "example.org",
            &fake,
            (
                "matrix.example.net",
                8448,
                "matrix.example.net",
                "matrix.example.net",
            ),
        );
    }

    #[test]
    fn srv_records_in_order_then_port_8448() {
        let mut fake = Fake::default();
        fake.srv.insert(
            "_matrix._tcp.example.org".to_owned(),
            ("old.example.org".to_owned(), 1111),
        );
        check(
            "example.org",
            &fake,
            ("old.example.org", 1111, "example.org", "example.org"),
        );
        fake.srv.insert(
            "_matrix-fed._tcp.example.org".to_owned(),
            ("new.example.org".to_owned(), 2222),
        );
        check(
            "example.org",
            &fake,
            ("new.example.org", 2222, "example.org", "example.org"),
        );
        check(
            "example.org",
            &Fake::default(),
            ("example.org", 8448, "example.org", "example.org"),
        );
    }

    #[test]
    fn well_known_documents() {
        let parsed = parse_well_known(br#"{"m.server": "matrix.example.net:443"}"#);
        assert_eq!(parsed.unwrap().as_str(), "matrix.example.net:443");
        assert!(parse_well_known(br#"{"m.server": "not a name"}"#).is_none());
        assert!(parse_well_known(br#"{"m.server": 5}"#).is_none());
        assert!(parse_well_known(b"<html>").is_none());
        assert!(parse_well_known(b"{}").is_none());
    }

    #[test]
    fn well_known_cache_lifetimes() {
        assert_eq!(well_known_ttl(None), WELL_KNOWN_DEFAULT_TTL);
        assert_eq!(
            well_known_ttl(Some("public, max-age=600")),
            Duration::from_secs(600)
        );
        assert_eq!(well_known_ttl(Some("max-age=99999999")), WELL_KNOWN_MAX_TTL);
        assert_eq!(well_known_ttl(Some("no-store")), Duration::ZERO);
        assert_eq!(well_known_ttl(Some("max-age=junk")), WELL_KNOWN_DEFAULT_TTL);
    }
}
