//! The outbound federation client: finds where a server is (discovery),
//! refuses denied addresses, signs each request with `X-Matrix` and speaks
//! HTTPS (certificates verified unless configured otherwise).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, Method};
use myelin_federation::discovery::{self, Destination, Lookups};
use myelin_federation::ip_ranges::IpPolicy;
use myelin_federation::request_auth::SignedRequest;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use ruma::{CanonicalJsonValue, OwnedServerName, ServerName};
use serde_json::Value;

use crate::config::FederationConfig;
use crate::events::SigningKey;
use crate::services::clock::Clock;
use crate::services::error::{Error, Result};

/// Largest answer read from another server.
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// Largest well-known document read.
const MAX_WELL_KNOWN_BYTES: usize = 64 * 1024;
/// Most well-known answers remembered.
const MAX_WELL_KNOWN_CACHED: usize = 10_000;

/// Largest error answer read.
const MAX_ERROR_BYTES: usize = 64 * 1024;

/// An answer of any content (media), as read.
#[derive(Debug)]
pub struct RawAnswer {
    pub content_type: Option<String>,
    pub content_disposition: Option<String>,
    /// Where a redirect pointed.
    pub location: Option<String>,
    pub body: Vec<u8>,
}

/// Signs and sends requests to other servers.
pub struct FederationClient {
    http: reqwest::Client,
    policy: Arc<IpPolicy>,
    origin: OwnedServerName,
    key: Arc<SigningKey>,
    clock: Arc<dyn Clock>,
    /// Well-known answers by host name: the delegated name (or none) and
    /// until when the answer holds, in ms.
    well_known: Mutex<HashMap<String, (Option<OwnedServerName>, u64)>>,
    /// The system's DNS servers for SRV look-ups (`None` when the system
    /// configuration cannot be read: discovery then skips SRV).
    dns: Option<hickory_resolver::TokioResolver>,
}

/// Why a request to another server gave nothing usable.
#[derive(Debug)]
pub enum SendError {
    /// The server answered, but not with a success.
    Refused { status: u16, body: Value },
    /// No usable answer at all.
    Failed(Error),
}

impl From<SendError> for Error {
    fn from(error: SendError) -> Self {
        match error {
            SendError::Refused { status, body } => {
                Error::RemoteUnavailable(format!("the server answered {status}: {body}"))
            }
            SendError::Failed(error) => error,
        }
    }
}

impl FederationClient {
    pub fn new(
        config: &FederationConfig,
        origin: OwnedServerName,
        key: Arc<SigningKey>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let policy = Arc::new(config.ip_policy());
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .connect_timeout(Duration::from_millis(config.request_timeout_ms.min(10_000)))
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(PolicyResolver(policy.clone())))
            .danger_accept_invalid_certs(!config.verify_certificates)
            .user_agent(concat!("Myelin/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &config.ca_certificates {
            let pem = std::fs::read(path)
                .map_err(|e| Error::Internal(format!("cannot read {}: {e}", path.display())))?;
            for certificate in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?
            {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let http = builder
            .build()
            .map_err(|e| Error::Internal(format!("federation client: {e}")))?;
        let dns = match hickory_resolver::TokioResolver::builder_tokio() {
            Ok(builder) => Some(builder.build()),
            Err(error) => {
                tracing::warn!(%error, "no DNS configuration: SRV records will not be looked up");
                None
            }
        };
        Ok(FederationClient {
            http,
            policy,
            origin,
            key,
            clock,
            well_known: Mutex::default(),
            dns,
        })
    }

    /// Sends a signed request to `destination` and returns its JSON answer.
    pub async fn send(
        &self,
        destination: &ServerName,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> std::result::Result<Value, SendError> {
        let unavailable = |why: String| {
            SendError::Failed(Error::RemoteUnavailable(format!("{destination}: {why}")))
        };
        let content = match body {
            Some(value) => match CanonicalJsonValue::try_from(value.clone()) {
                Ok(content) => Some(content),
                Err(e) => return Err(SendError::Failed(Error::Internal(e.to_string()))),
            },
            None => None,
        };
        let place = self.locate(destination).await.map_err(SendError::Failed)?;
        let authorization = SignedRequest {
            method: method.as_str(),
            uri: path_and_query,
            origin: &self.origin,
            destination,
            content: content.as_ref(),
        }
        .authorization(self.key.as_ref(), &self.key.key_id());
        let url = format!(
            "https://{}:{}{path_and_query}",
            url_host(&place.tls_name),
            place.port
        );
        let mut request = self
            .http
            .request(method, &url)
            .header(header::HOST, &place.host_header)
            .header(header::AUTHORIZATION, authorization.to_string());
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| unavailable(error_chain(&e)))?;
        let status = response.status().as_u16();
        let bytes = read_limited(response, MAX_RESPONSE_BYTES)
            .await
            .map_err(unavailable)?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|_| unavailable(format!("answered {status} with a body that is not JSON")))?;
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            Err(SendError::Refused {
                status,
                body: value,
            })
        }
    }

    /// An unsigned `GET` of a public document of another server (its key
    /// document): the same discovery and address policy, no `X-Matrix`.
    pub async fn get_public(&self, destination: &ServerName, path: &str) -> Result<Value> {
        let unavailable = |why: String| Error::RemoteUnavailable(format!("{destination}: {why}"));
        let place = self.locate(destination).await?;
        let url = format!("https://{}:{}{path}", url_host(&place.tls_name), place.port);
        let response = self
            .http
            .get(&url)
            .header(header::HOST, &place.host_header)
            .send()
            .await
            .map_err(|e| unavailable(error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(unavailable(format!("answered {status}")));
        }
        let bytes = read_limited(response, MAX_RESPONSE_BYTES)
            .await
            .map_err(unavailable)?;
        serde_json::from_slice(&bytes).map_err(|_| unavailable("answered with non-JSON".to_owned()))
    }

    /// A `GET` of `path` on `destination` whose answer may be any bytes
    /// (media), signed with `X-Matrix` when `signed`; at most `limit`
    /// bytes are read. Answers that are not a success are `Refused`, with
    /// their body as JSON when it is.
    pub async fn get_bytes(
        &self,
        destination: &ServerName,
        path: &str,
        signed: bool,
        limit: usize,
    ) -> std::result::Result<RawAnswer, SendError> {
        let place = self.locate(destination).await.map_err(SendError::Failed)?;
        let url = format!("https://{}:{}{path}", url_host(&place.tls_name), place.port);
        let mut request = self.http.get(&url).header(header::HOST, &place.host_header);
        if signed {
            let authorization = SignedRequest {
                method: "GET",
                uri: path,
                origin: &self.origin,
                destination,
                content: None,
            }
            .authorization(self.key.as_ref(), &self.key.key_id());
            request = request.header(header::AUTHORIZATION, authorization.to_string());
        }
        self.raw_answer(request, destination.as_str(), limit).await
    }

    /// A `POST` to an identity server (`host[:port]`, HTTPS, no
    /// discovery): with the user's `access_token` for the identity server,
    /// or, without one, signed with `X-Matrix` as a request of this
    /// homeserver itself (`/3pid/unbind`).
    pub async fn identity_post(
        &self,
        server: &ServerName,
        path: &str,
        access_token: Option<&str>,
        body: &Value,
    ) -> std::result::Result<Value, SendError> {
        let unavailable =
            |why: String| SendError::Failed(Error::RemoteUnavailable(format!("{server}: {why}")));
        let host = server.host();
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        if literal.is_some_and(|ip| !self.policy.permits(ip)) {
            return Err(unavailable("in a denied IP range".to_owned()));
        }
        let url = format!("https://{server}{path}");
        let mut request = self.http.post(&url).json(body);
        match access_token {
            Some(token) => request = request.bearer_auth(token),
            None => {
                let content = CanonicalJsonValue::try_from(body.clone())
                    .map_err(|e| SendError::Failed(Error::Internal(e.to_string())))?;
                let authorization = SignedRequest {
                    method: "POST",
                    uri: path,
                    origin: &self.origin,
                    destination: server,
                    content: Some(&content),
                }
                .authorization(self.key.as_ref(), &self.key.key_id());
                request = request.header(header::AUTHORIZATION, authorization.to_string());
            }
        }
        let response = request
            .send()
            .await
            .map_err(|e| unavailable(error_chain(&e)))?;
        let status = response.status().as_u16();
        let bytes = read_limited(response, MAX_ERROR_BYTES)
            .await
            .map_err(unavailable)?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            Err(SendError::Refused {
                status,
                body: value,
            })
        }
    }

    /// An unsigned `GET` of a URL another server pointed to (a media
    /// `Location`), under the same address policy.
    pub async fn get_url(
        &self,
        url: &str,
        limit: usize,
    ) -> std::result::Result<RawAnswer, SendError> {
        let failed = |why: String| SendError::Failed(Error::RemoteUnavailable(why));
        let parsed = reqwest::Url::parse(url).map_err(|e| failed(format!("{url}: {e}")))?;
        if parsed.scheme() != "https" && parsed.scheme() != "http" {
            return Err(failed(format!("{url} is not an HTTP URL")));
        }
        let Some(host) = parsed.host_str() else {
            return Err(failed(format!("{url} names no host")));
        };
        let literal = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        if literal.is_some_and(|ip| !self.policy.permits(ip)) {
            return Err(failed(format!("{url} is in a denied IP range")));
        }
        self.raw_answer(self.http.get(parsed), url, limit).await
    }

    async fn raw_answer(
        &self,
        request: reqwest::RequestBuilder,
        whom: &str,
        limit: usize,
    ) -> std::result::Result<RawAnswer, SendError> {
        let unavailable =
            |why: String| SendError::Failed(Error::RemoteUnavailable(format!("{whom}: {why}")));
        let response = request
            .send()
            .await
            .map_err(|e| unavailable(error_chain(&e)))?;
        let status = response.status().as_u16();
        let header_text = |name: header::HeaderName| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header_text(header::CONTENT_TYPE);
        let content_disposition = header_text(header::CONTENT_DISPOSITION);
        let location = header_text(header::LOCATION);
        if !(200..300).contains(&status) {
            let body = read_limited(response, MAX_ERROR_BYTES)
                .await
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .unwrap_or(Value::Null);
            if (300..400).contains(&status) {
                if let Some(location) = location {
                    return Ok(RawAnswer {
                        content_type: None,
                        content_disposition: None,
                        location: Some(location),
                        body: Vec::new(),
                    });
                }
            }
            return Err(SendError::Refused { status, body });
        }
        if response
            .content_length()
            .is_some_and(|length| length > limit as u64)
        {
            return Err(SendError::Failed(Error::TooLarge(format!(
                "{whom} answered more than {limit} bytes"
            ))));
        }
        let body = read_limited(response, limit)
            .await
            .map_err(|why| SendError::Failed(Error::TooLarge(format!("{whom}: {why}"))))?;
        Ok(RawAnswer {
            content_type,
            content_disposition,
            location: None,
            body,
        })
    }

    /// Where `destination` is reached, refusing denied addresses.
    async fn locate(&self, destination: &ServerName) -> Result<Destination> {
        let place = discovery::resolve(destination, self).await;
        if let Ok(ip) = place.connect_host.parse::<IpAddr>() {
            if !self.policy.permits(ip) {
                return Err(Error::RemoteUnavailable(format!(
                    "{destination}: {ip} is in a denied IP range"
                )));
            }
        }
        Ok(place)
    }
}

impl Lookups for FederationClient {
    async fn well_known(&self, hostname: &str) -> Option<OwnedServerName> {
        let now = self.clock.now_ms();
        if let Some((answer, until)) = self.well_known.lock().expect("not poisoned").get(hostname) {
            if *until > now {
                return answer.clone();
            }
        }
        let (answer, ttl) = self.fetch_well_known(hostname).await;
        let mut cache = self.well_known.lock().expect("not poisoned");
        if cache.len() >= MAX_WELL_KNOWN_CACHED {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= MAX_WELL_KNOWN_CACHED {
                cache.clear();
            }
        }
        let until = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        cache.insert(hostname.to_owned(), (answer.clone(), until));
        answer
    }

    async fn srv(&self, name: &str) -> Option<(String, u16)> {
        let resolver = self.dns.as_ref()?;
        let records = resolver.srv_lookup(name).await.ok()?;
        // The lowest priority wins; among equals, the heaviest. A target of
        // "." says the service is not offered.
        records
            .iter()
            .filter(|record| !record.target().is_root())
            .min_by_key(|record| (record.priority(), u16::MAX - record.weight()))
            .map(|record| {
                let target = record.target().to_utf8();
                (target.trim_end_matches('.').to_owned(), record.port())
            })
    }
}

impl FederationClient {
    async fn fetch_well_known(&self, hostname: &str) -> (Option<OwnedServerName>, Duration) {
        let failed = (None, discovery::WELL_KNOWN_ERROR_TTL);
        let url = format!("https://{hostname}/.well-known/matrix/server");
        let Ok(response) = self.http.get(&url).send().await else {
            return failed;
        };
        if !response.status().is_success() {
            return failed;
        }
        let ttl = discovery::well_known_ttl(
            response
                .headers()
                .get(header::CACHE_CONTROL)
                .and_then(|v| v.to_str().ok()),
        );
        match read_limited(response, MAX_WELL_KNOWN_BYTES).await {
            Ok(body) => match discovery::parse_well_known(&body) {
                Some(name) => (Some(name), ttl),
                None => failed,
            },
            Err(_) => failed,
        }
    }
}

/// Resolves host names with the system resolver and keeps only the
/// addresses the policy permits.
struct PolicyResolver(Arc<IpPolicy>);

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| policy.permits(addr.ip()))
                .collect();
            if found.is_empty() {
                return Err(format!("{host} has no address outside the denied IP ranges").into());
            }
            let addrs: Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

/// A host as it appears in a URL: IPv6 addresses in brackets.
fn url_host(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => host.to_owned(),
    }
}

/// An error with its causes, which reqwest keeps apart.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The body of an answer, refused past `limit` bytes.
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > limit {
            return Err(format!("answer larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
