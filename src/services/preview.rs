//! URL previews: fetch a web page and read its OpenGraph data.
//!
//! A page is fetched only if every address its host resolves to is public
//! (unless the configuration allows private ones), the connection goes to
//! an address that was checked (no second lookup that could answer
//! differently), redirects are followed by hand and checked the same way,
//! and the body is read up to a limit.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::error::{Error, Result};

/// Most bytes of a page read.
const MAX_PAGE_BYTES: usize = 1024 * 1024;
/// Most redirects followed.
const MAX_REDIRECTS: usize = 5;
/// Longest a fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A fetched resource: where it ended up after redirects, its type and
/// (the start of) its body.
struct Fetched {
    url: reqwest::Url,
    content_type: String,
    body: Vec<u8>,
}

pub struct Previews {
    enabled: bool,
    allow_private: bool,
}

impl Previews {
    pub fn new(enabled: bool, allow_private: bool) -> Self {
        Previews {
            enabled,
            allow_private,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The OpenGraph data of the page at `url`, and the absolute URL of
    /// its `og:image`, if it names one.
    pub async fn preview(&self, url: &str) -> Result<(Map<String, Value>, Option<String>)> {
        let page = self.fetch(url, MAX_PAGE_BYTES).await?;
        let found = open_graph(&String::from_utf8_lossy(&page.body));
        let image = found
            .get("og:image")
            .and_then(Value::as_str)
            .and_then(|image| page.url.join(image).ok())
            .map(|image| image.to_string());
        Ok((found, image))
    }

    /// Fetches an image a page names: its content type and bytes, at most
    /// `max_bytes` of them (a larger image is not fetched whole: `None`).
    pub async fn fetch_image(
        &self,
        url: &str,
        max_bytes: usize,
    ) -> Result<Option<(String, Vec<u8>)>> {
        let fetched = self.fetch(url, max_bytes + 1).await?;
        if fetched.body.len() > max_bytes || !fetched.content_type.starts_with("image/") {
            return Ok(None);
        }
        Ok(Some((fetched.content_type, fetched.body)))
    }

    /// Fetches `url`, following and checking redirects; reads at most
    /// `max_bytes` of the body.
    async fn fetch(&self, url: &str, max_bytes: usize) -> Result<Fetched> {
        let mut url = reqwest::Url::parse(url)
            .map_err(|_| Error::InvalidParam(format!("{url:?} is not a URL")))?;
        for _ in 0..=MAX_REDIRECTS {
            if !matches!(url.scheme(), "http" | "https") {
                return Err(Error::InvalidParam("only http and https URLs".to_owned()));
            }
            let address = self.checked_address(&url).await?;
            let host = url.host_str().unwrap_or_default().to_owned();
            let client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(FETCH_TIMEOUT)
                .resolve(&host, address)
                .build()
                .map_err(|e| Error::Internal(e.to_string()))?;
            let mut response = client
                .get(url.clone())
                .send()
                .await
                .map_err(|e| Error::NotFound(format!("could not fetch the page: {e}")))?;
            if response.status().is_redirection() {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| Error::NotFound("a redirect without a location".to_owned()))?;
                url = url
                    .join(location)
                    .map_err(|_| Error::NotFound("a redirect to a bad URL".to_owned()))?;
                continue;
            }
            if !response.status().is_success() {
                return Err(Error::NotFound(format!(
                    "the page answered {}",
                    response.status()
                )));
            }
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                })
                .unwrap_or_default();
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| Error::NotFound(format!("could not read the page: {e}")))?
            {
                body.extend_from_slice(&chunk);
                if body.len() >= max_bytes {
                    body.truncate(max_bytes);
                    break;
                }
            }
            return Ok(Fetched {
                url,
                content_type,
                body,
            });
        }
        Err(Error::NotFound("too many redirects".to_owned()))
    }

    /// The address to connect to: the host's, all checked.
    async fn checked_address(&self, url: &reqwest::Url) -> Result<SocketAddr> {
        let host = url
            .host_str()
            .ok_or_else(|| Error::InvalidParam("a URL without a host".to_owned()))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Error::NotFound(format!("could not resolve {host}: {e}")))?
            .collect();
        let first = *addresses
            .first()
            .ok_or_else(|| Error::NotFound(format!("{host} has no address")))?;
        if !self.allow_private && addresses.iter().any(|a| !is_public(a.ip())) {
            return Err(Error::Forbidden(
                "previews of private, loopback or link-local addresses are not allowed".to_owned(),
            ));
        }
        Ok(first)
    }
}

impl super::Services {
    /// `GET /_matrix/client/v1/media/preview_url`: the page's OpenGraph
    /// data. Its `og:image` is fetched (with the same address checks) and
    /// stored as media uploaded by `user`, and named by its `mxc://` URI,
    /// with `og:image:type`, `matrix:image:size` and its dimensions; an
    /// image that cannot be fetched or is too large is left out, as
    /// Synapse does.
    pub async fn preview_url(&self, user: &str, url: &str) -> Result<Map<String, Value>> {
        let (mut found, image_url) = self.previews.preview(url).await?;
        found.remove("og:image");
        let Some(image_url) = image_url else {
            return Ok(found);
        };
        let limit = usize::try_from(self.media.max_upload_bytes()).unwrap_or(usize::MAX);
        let Ok(Some((content_type, bytes))) = self.previews.fetch_image(&image_url, limit).await
        else {
            return Ok(found);
        };
        let mut incoming = self.media.incoming()?;
        incoming.write(&bytes)?;
        let description = super::media::Description {
            content_type: Some(content_type.clone()),
            filename: None,
        };
        let media_id = self.media.store(user, None, incoming, description).await?;
        let uri = format!("mxc://{}/{media_id}", self.media.server_name());
        found.insert("og:image".to_owned(), json!(uri));
        found.insert("og:image:type".to_owned(), json!(content_type));
        found.insert("matrix:image:size".to_owned(), json!(bytes.len()));
        if let Some((width, height)) = super::thumbnail::dimensions(&bytes) {
            found.entry("og:image:width").or_insert(json!(width));
            found.entry("og:image:height").or_insert(json!(height));
        }
        Ok(found)
    }
}

/// Whether an address is on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// The page's `og:*` meta properties, with the title element as a
/// fallback for `og:title`.
pub fn open_graph(html: &str) -> Map<String, Value> {
    let mut found = Map::new();
    let lower = html.to_ascii_lowercase();
    let mut rest = 0;
    while let Some(start) = lower[rest..].find("<meta") {
        let start = rest + start;
        let Some(end) = lower[start..].find('>') else {
            break;
        };
        let tag = &html[start..start + end];
        rest = start + end;
        let property = attribute(tag, "property").or_else(|| attribute(tag, "name"));
        let (Some(property), Some(content)) = (property, attribute(tag, "content")) else {
            continue;
        };
        if property.starts_with("og:") && !found.contains_key(&property) {
            found.insert(property, json!(decode_entities(&content)));
        }
    }
    if !found.contains_key("og:title") {
        if let (Some(open), Some(close)) = (lower.find("<title"), lower.find("</title>")) {
            if let Some(gt) = lower[open..].find('>') {
                let text = html[open + gt + 1..close.max(open + gt + 1)].trim();
                if !text.is_empty() {
                    found.insert("og:title".to_owned(), json!(decode_entities(text)));
                }
            }
        }
    }
    found
}

/// The value of `name="..."` (or single-quoted) in a tag.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let mut from = 0;
    while let Some(at) = lower[from..].find(name) {
        let at = from + at;
        from = at + name.len();
        let before_ok = at == 0 || lower.as_bytes()[at - 1].is_ascii_whitespace();
        let after = lower[from..].trim_start();
        if !before_ok || !after.starts_with('=') {
            continue;
        }
        let value_start = tag.len() - after.len() + 1;
        let value = tag[value_start..].trim_start();
        let quote = value.chars().next()?;
        if quote == '"' || quote == '\'' {
            let inner = &value[1..];
            return inner.find(quote).map(|end| inner[..end].to_owned());
        }
        return Some(
            value
                .split_whitespace()
                .next()?
                .trim_end_matches('/')
                .to_owned(),
        );
    }
    None
}

fn decode_entities(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_graph_properties_and_the_title_fallback() {
        let html = r#"<html><head><title>Plain</title>
            <meta property="og:title" content="A &amp; B">
            <META PROPERTY='og:description' CONTENT='Words here'/>
            <meta name="og:site_name" content="Site">
            <meta property="other" content="x"></head></html>"#;
        let found = open_graph(html);
        assert_eq!(found["og:title"], "A & B");
        assert_eq!(found["og:description"], "Words here");
        assert_eq!(found["og:site_name"], "Site");
        assert!(!found.contains_key("other"));
        let fallback = open_graph("<title> Only a title </title>");
        assert_eq!(fallback["og:title"], "Only a title");
    }

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
