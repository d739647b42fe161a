//! Sending email through an SMTP server (RFC 5321): `EHLO`, `STARTTLS` or
//! TLS from the first byte, `AUTH PLAIN`, one message to one recipient.
//!
//! The messages are short plain-text notices (validation codes), so this
//! speaks only the part of SMTP they need. Every reply is checked; a
//! refusal or a time-out is an error the request that asked for the email
//! reports.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName as TlsName;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{EmailConfig, SmtpSecurity};
use crate::services::error::{Error, Result};

/// Longest reply line read from the server.
const MAX_REPLY_LINE: usize = 4096;
/// Most lines of one reply.
const MAX_REPLY_LINES: usize = 100;

/// One message: to one recipient, plain text.
#[derive(Debug, Clone)]
pub struct Message {
    pub to: String,
    pub subject: String,
    pub text: String,
}

/// Sends messages through the configured SMTP server.
pub struct Mailer {
    host: String,
    port: u16,
    security: SmtpSecurity,
    credentials: Option<(String, String)>,
    /// The sender as written in `From:`, and its bare address.
    from_header: String,
    from_address: String,
    /// Said in `EHLO`, and the right-hand side of `Message-ID`s.
    helo_name: String,
    tls: TlsConnector,
    timeout: Duration,
}

impl Mailer {
    /// The mailer of `config`, or `None` when email is off.
    pub fn new(config: &EmailConfig, server_name: &str) -> Result<Option<Self>> {
        let Some(host) = config.smtp_host.clone() else {
            return Ok(None);
        };
        let helo_name = server_host(server_name).to_owned();
        let from_header = config
            .from
            .clone()
            .unwrap_or_else(|| format!("noreply@{helo_name}"));
        let from_address = sender_address(&from_header)
            .ok_or_else(|| Error::Internal(format!("email.from: {from_header:?}")))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &config.ca_certificates {
            let certificates = CertificateDer::pem_file_iter(path)
                .and_then(|found| found.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
            for certificate in certificates {
                roots
                    .add(certificate)
                    .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Internal(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Some(Mailer {
            host,
            port: config.smtp_port,
            security: config.security,
            credentials: config.smtp_user.clone().zip(config.smtp_password.clone()),
            from_header,
            from_address,
            helo_name,
            tls: TlsConnector::from(Arc::new(tls)),
            timeout: Duration::from_millis(config.timeout_ms),
        }))
    }

    /// Sends `message`, within the configured time.
    pub async fn send(&self, message: &Message, now_ms: u64) -> Result<()> {
        let failed = |why: String| Error::RemoteUnavailable(format!("email not sent: {why}"));
        let exchange = self.exchange(message, now_ms);
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(failed(why)),
            Err(_) => Err(failed("the SMTP server took too long".to_owned())),
        }
    }

    async fn exchange(&self, message: &Message, now_ms: u64) -> std::result::Result<(), String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot reach {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        match self.security {
            SmtpSecurity::Tls => {
                let tls = self.handshake(tcp).await?;
                let mut session = Session::new(tls);
                session.expect(220).await?;
                self.deliver(&mut session, message, now_ms).await
            }
            SmtpSecurity::Starttls => {
                let mut session = Session::new(tcp);
                session.expect(220).await?;
                let extensions = session
                    .command(&format!("EHLO {}", self.helo_name), 250)
                    .await?;
                if !has_extension(&extensions, "STARTTLS") {
                    return Err("the SMTP server does not offer STARTTLS".to_owned());
                }
                session.command("STARTTLS", 220).await?;
                let tls = self.handshake(session.into_inner()?).await?;
                self.deliver(&mut Session::new(tls), message, now_ms).await
            }
            SmtpSecurity::None => {
                let mut session = Session::new(tcp);
                session.expect(220).await?;
                self.deliver(&mut session, message, now_ms).await
            }
        }
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> std::result::Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let name = TlsName::try_from(self.host.clone())
            .map_err(|e| format!("{:?} as a TLS name: {e}", self.host))?;
        self.tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", self.host))
    }

    /// From `EHLO` (again, after `STARTTLS`) to `QUIT`.
    async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        session: &mut Session<S>,
        message: &Message,
        now_ms: u64,
    ) -> std::result::Result<(), String> {
        let extensions = session
            .command(&format!("EHLO {}", self.helo_name), 250)
            .await?;
        if let Some((user, password)) = &self.credentials {
            if !has_extension(&extensions, "AUTH") {
                return Err("the SMTP server offers no authentication".to_owned());
            }
            let plain = base64_padded(format!("\0{user}\0{password}").as_bytes());
            session
                .command(&format!("AUTH PLAIN {plain}"), 235)
                .await
                .map_err(|_| "the SMTP server refused the credentials".to_owned())?;
        }
        session
            .command(&format!("MAIL FROM:<{}>", self.from_address), 250)
            .await?;
        let to = &message.to;
        let accepted = session.command(&format!("RCPT TO:<{to}>"), 250).await;
        if accepted.is_err() {
            session.command(&format!("RCPT TO:<{to}>"), 251).await?;
        }
        session.command("DATA", 354).await?;
        let text = self.render(message, now_ms);
        session.write_raw(text.as_bytes()).await?;
        session.command(".", 250).await?;
        // The message is accepted; a failed goodbye changes nothing.
        let _ = session.command("QUIT", 221).await;
        Ok(())
    }

    /// The message as sent after `DATA`: headers, the text with CRLF line
    /// ends and dot-stuffing.
    fn render(&self, message: &Message, now_ms: u64) -> String {
        let id = crate::ids::new_secret("", &mut rand::thread_rng());
        let mut out = String::new();
        let headers = [
            ("From", self.from_header.clone()),
            ("To", message.to.clone()),
            ("Subject", encode_header(&message.subject)),
            ("Date", rfc5322_date(now_ms)),
            ("Message-ID", format!("<{id}@{}>", self.helo_name)),
            ("MIME-Version", "1.0".to_owned()),
            ("Content-Type", "text/plain; charset=utf-8".to_owned()),
            ("Content-Transfer-Encoding", "8bit".to_owned()),
        ];
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        for line in message.text.lines() {
            if line.starts_with('.') {
                out.push('.');
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
        out
    }
}

/// A connection to the SMTP server, reading replies line by line.
struct Session<S> {
    stream: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn new(stream: S) -> Self {
        Session {
            stream: BufReader::new(stream),
        }
    }

    /// The stream, for the TLS handshake after `STARTTLS`; the server must
    /// not have sent anything more yet.
    fn into_inner(self) -> std::result::Result<S, String> {
        if !self.stream.buffer().is_empty() {
            return Err("the SMTP server sent data before the TLS handshake".to_owned());
        }
        Ok(self.stream.into_inner())
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> std::result::Result<(), String> {
        let stream = self.stream.get_mut();
        stream.write_all(bytes).await.map_err(|e| e.to_string())?;
        stream.flush().await.map_err(|e| e.to_string())
    }

    /// Sends one command line and reads its reply, which must have `code`.
    async fn command(&mut self, line: &str, code: u16) -> std::result::Result<Vec<String>, String> {
        self.write_raw(format!("{line}\r\n").as_bytes()).await?;
        self.expect(code).await.map_err(|why| {
            // Never repeat a password in a message or log.
            let verb = line.split(' ').next().unwrap_or(line);
            format!("{verb}: {why}")
        })
    }

    /// Reads one reply (its lines end with `code-` then `code `).
    async fn expect(&mut self, code: u16) -> std::result::Result<Vec<String>, String> {
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            let read = (&mut self.stream)
                .take(MAX_REPLY_LINE as u64)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| e.to_string())?;
            if read == 0 {
                return Err("the SMTP server closed the connection".to_owned());
            }
            let line = String::from_utf8_lossy(&line).trim_end().to_owned();
            let Some(status) = line.get(..3).and_then(|s| s.parse::<u16>().ok()) else {
                return Err(format!("not an SMTP reply: {line:?}"));
            };
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_owned());
            if last {
                if status != code {
                    return Err(format!("the SMTP server answered {line:?}"));
                }
                return Ok(lines);
            }
            if lines.len() > MAX_REPLY_LINES {
                return Err("the SMTP server's reply is too long".to_owned());
            }
        }
    }
}

/// Whether an `EHLO` reply lists `name` (`STARTTLS`, `AUTH PLAIN LOGIN`).
fn has_extension(lines: &[String], name: &str) -> bool {
    lines.iter().skip(1).any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|keyword| keyword.eq_ignore_ascii_case(name))
    })
}

/// The host of a server name (`example.org:8448` → `example.org`).
fn server_host(server_name: &str) -> &str {
    if let Some(rest) = server_name.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    server_name
        .rsplit_once(':')
        .map_or(server_name, |(host, _)| host)
}

/// The bare address of a sender: `a@b` or `Name <a@b>`.
pub fn sender_address(from: &str) -> Option<String> {
    let from = from.trim();
    let address = match from.rsplit_once('<') {
        Some((_, rest)) => rest.strip_suffix('>')?,
        None => from,
    };
    valid_address(address).then(|| address.to_owned())
}

/// Whether `address` is a plain email address: one `@`, something on
/// each side, nothing that could break a command or header line.
pub fn valid_address(address: &str) -> bool {
    let Some((local, domain)) = address.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && address.len() <= 254
        && address
            .chars()
            .all(|c| c.is_ascii_graphic() && !"<>()[]\\,;:\"".contains(c))
}

/// A header value, RFC 2047-encoded when it is not plain ASCII.
fn encode_header(value: &str) -> String {
    if value.chars().all(|c| c.is_ascii() && !c.is_ascii_control()) {
        return value.to_owned();
    }
    format!("=?utf-8?B?{}?=", base64_padded(value.as_bytes()))
}

/// Standard base64 with padding, as SMTP and MIME expect.
pub fn base64_padded(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A `Date:` header value (RFC 5322), in UTC.
fn rfc5322_date(now_ms: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let seconds = now_ms / 1000;
    let days = seconds / 86_400;
    let in_day = seconds % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's method).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day} {} {year} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_as_mime_expects() {
        assert_eq!(base64_padded(b""), "");
        assert_eq!(base64_padded(b"f"), "Zg==");
        assert_eq!(base64_padded(b"fo"), "Zm8=");
        assert_eq!(base64_padded(b"foo"), "Zm9v");
        assert_eq!(base64_padded(b"\0user\0pass"), "AHVzZXIAcGFzcw==");
    }

    #[test]
    fn dates_are_rfc5322() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        // 2026-11-30 03:24:42 UTC.
        assert_eq!(
            rfc5322_date(1_796_009_082_000),
            "Mon, 30 Nov 2026 03:24:42 +0000"
        );
        assert_eq!(
            rfc5322_date(951_782_400_000),
            "Tue, 29 Feb 2000 00:00:00 +0000"
        );
    }

    #[test]
    fn addresses_and_senders() {
        assert!(valid_address("alice@example.org"));
        assert!(!valid_address("alice"));
        assert!(!valid_address("@example.org"));
        assert!(!valid_address("alice@"));
        assert!(!valid_address("a@b@c"));
        assert!(!valid_address("alice@example.org\r\nRCPT TO:<x@y>"));
        assert!(!valid_address("alice <a@b>"));
        assert_eq!(
            sender_address("Myelin <noreply@example.org>").as_deref(),
            Some("noreply@example.org")
        );
        assert_eq!(sender_address("a@b").as_deref(), Some("a@b"));
        assert_eq!(sender_address("Myelin <nope>"), None);
        assert_eq!(server_host("example.org:8448"), "example.org");
        assert_eq!(server_host("[::1]:8448"), "::1");
        assert_eq!(server_host("example.org"), "example.org");
    }

    #[test]
    fn extensions_are_read_from_the_ehlo_reply() {
        let reply: Vec<String> = [
            "mail.example.org",
            "SIZE 100",
            "STARTTLS",
            "AUTH PLAIN LOGIN",
        ]
        .map(str::to_owned)
        .to_vec();
        assert!(has_extension(&reply, "starttls"));
        assert!(has_extension(&reply, "AUTH"));
        assert!(!has_extension(&reply, "8BITMIME"));
    }
}
