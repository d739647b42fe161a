//! Request authentication: the `X-Matrix` `Authorization` header that signs
//! every federation request, made for outbound requests and checked on
//! inbound ones.
//!
//! The signature covers the canonical JSON of `method`, `uri` (path and
//! query as sent), `origin`, `destination` and, when the request has a
//! body, `content`.

use std::fmt;

use ruma::signatures::{sign_json, verify_json, KeyPair};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, ServerName};

use crate::server_keys::single_key;

/// The parameters of an `X-Matrix` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XMatrix {
    pub origin: OwnedServerName,
    /// Optional in the grammar (older servers omit it); checked when given.
    pub destination: Option<OwnedServerName>,
    /// The signing key's ID, such as `ed25519:abc`.
    pub key: String,
    /// The unpadded base64 signature.
    pub sig: String,
}

/// Why a request's authentication was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing or malformed X-Matrix authorization: {0}")]
    Malformed(String),
    #[error("the request is addressed to {0}, not to this server")]
    WrongDestination(String),
    #[error("the request's signature does not verify")]
    BadSignature,
    #[error("the request body is not JSON")]
    BadBody,
}

impl fmt::Display for XMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "X-Matrix origin=\"{}\"", self.origin)?;
        if let Some(destination) = &self.destination {
            write!(f, ",destination=\"{destination}\"")?;
        }
        write!(f, ",key=\"{}\",sig=\"{}\"", self.key, self.sig)
    }
}

impl XMatrix {
    /// Parses an `Authorization` header value. Parameter names are matched
    /// without regard to case; unknown parameters are ignored.
    pub fn parse(header: &str) -> Result<Self, AuthError> {
        let bad = |why: &str| AuthError::Malformed(why.to_owned());
        let (scheme, params) = header
            .trim()
            .split_once(' ')
            .ok_or_else(|| bad("no parameters"))?;
        if !scheme.eq_ignore_ascii_case("X-Matrix") {
            return Err(bad("the scheme is not X-Matrix"));
        }
        let (mut origin, mut destination, mut key, mut sig) = (None, None, None, None);
        for (name, value) in parameters(params).ok_or_else(|| bad("unbalanced quotes"))? {
            match name.to_ascii_lowercase().as_str() {
                "origin" => origin = Some(value),
                "destination" => destination = Some(value),
                "key" => key = Some(value),
                "sig" => sig = Some(value),
                _ => {}
            }
        }
        let server = |value: String, what: &str| {
            ServerName::parse(value).map_err(|_| bad(&format!("{what} is not a server name")))
        };
        Ok(XMatrix {
            origin: server(origin.ok_or_else(|| bad("no origin"))?, "origin")?,
            destination: destination.map(|d| server(d, "destination")).transpose()?,
            key: key.ok_or_else(|| bad("no key"))?,
            sig: sig.ok_or_else(|| bad("no sig"))?,
        })
    }
}

/// `name=value` pairs separated by commas; values may be quoted, with
/// backslash escapes inside the quotes.
fn parameters(text: &str) -> Option<Vec<(String, String)>> {
    let mut found = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(found);
        }
        let name: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        chars.next()?; // '='
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ',')));
        }
        found.push((name.trim().to_owned(), value.trim().to_owned()));
    }
}

/// A request as its signature covers it.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The path and query, exactly as on the request line.
    pub uri: &'a str,
    pub origin: &'a ServerName,
    pub destination: &'a ServerName,
    /// The JSON body, if the request has one.
    pub content: Option<&'a CanonicalJsonValue>,
}

impl SignedRequest<'_> {
    fn json(&self) -> CanonicalJsonObject {
        let mut object = CanonicalJsonObject::new();
        let text = |s: &str| CanonicalJsonValue::String(s.to_owned());
        object.insert("method".to_owned(), text(self.method));
        object.insert("uri".to_owned(), text(self.uri));
        object.insert("origin".to_owned(), text(self.origin.as_str()));
        object.insert("destination".to_owned(), text(self.destination.as_str()));
        if let Some(content) = self.content {
            object.insert("content".to_owned(), content.clone());
        }
        object
    }

    /// The `Authorization` header for this request, signed with `key`
    /// (whose ID is `key_id`).
    pub fn authorization(&self, key: &impl KeyPair, key_id: &str) -> XMatrix {
        let mut object = self.json();
        sign_json(self.origin.as_str(), key, &mut object)
            .expect("a request object is always signable");
        let sig = crate::server_keys::signature_key_ids(&object, self.origin.as_str())
            .into_iter()
            .next()
            .and_then(|id| signature(&object, self.origin.as_str(), &id))
            .expect("sign_json added the signature");
        XMatrix {
            origin: self.origin.to_owned(),
            destination: Some(self.destination.to_owned()),
            key: key_id.to_owned(),
            sig,
        }
    }

    /// Checks `header` against this request, as received by
    /// `self.destination`, with the origin's public key for `header.key`.
    pub fn verify(&self, header: &XMatrix, public_key: &[u8; 32]) -> Result<(), AuthError> {
        if let Some(destination) = &header.destination {
            if destination.as_str() != self.destination.as_str() {
                return Err(AuthError::WrongDestination(destination.to_string()));
            }
        }
        let mut object = self.json();
        let by_key = CanonicalJsonObject::from([(
            header.key.clone(),
            CanonicalJsonValue::String(header.sig.clone()),
        )]);
        let signatures = CanonicalJsonObject::from([(
            header.origin.to_string(),
            CanonicalJsonValue::Object(by_key),
        )]);
        object.insert(
            "signatures".to_owned(),
            CanonicalJsonValue::Object(signatures),
        );
        let keys = single_key(header.origin.as_str(), &header.key, public_key);
        verify_json(&keys, &object).map_err(|_| AuthError::BadSignature)
    }
}

/// A request body as canonical JSON; an empty body is no content.
pub fn body_content(body: &[u8]) -> Result<Option<CanonicalJsonValue>, AuthError> {
    if body.is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| AuthError::BadBody)?;
    CanonicalJsonValue::try_from(value)
        .map(Some)
        .map_err(|_| AuthError::BadBody)
}

fn signature(object: &CanonicalJsonObject, entity: &str, key_id: &str) -> Option<String> {
    let CanonicalJsonValue::Object(by_entity) = object.get("signatures")? else {
        return None;
    };
    let CanonicalJsonValue::Object(by_key) = by_entity.get(entity)? else {
        return None;
    };
    match by_key.get(key_id)? {
        CanonicalJsonValue::String(sig) => Some(sig.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use ruma::signatures::Ed25519KeyPair;
    use serde_json::json;

    use super::*;

    fn name(text: &str) -> &ServerName {
        <&ServerName>::try_from(text).unwrap()
    }

    fn pair() -> Ed25519KeyPair {
        Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "k1".to_owned()).unwrap()
    }

    #[test]
    fn headers_round_trip_and_parse_loosely() {
        let header = XMatrix {
            origin: name("127.0.0.2:8448").to_owned(),
            destination: Some(name("[::1]:8448").to_owned()),
            key: "ed25519:k1".to_owned(),
            sig: "c2ln".to_owned(),
        };
        assert_eq!(XMatrix::parse(&header.to_string()), Ok(header.clone()));
        let loose = r#"x-matrix  Origin=127.0.0.2:8448 , KEY="ed25519:k1",sig="c2ln",extra="a\"b",destination="[::1]:8448""#;
        assert_eq!(XMatrix::parse(loose), Ok(header));
        let no_destination = XMatrix::parse(r#"X-Matrix origin=a.example,key="ed25519:k",sig="s""#);
        assert_eq!(no_destination.unwrap().destination, None);
        for bad in [
            "Bearer abc",
            "X-Matrix",
            r#"X-Matrix key="ed25519:k",sig="s""#,
            r#"X-Matrix origin="not a name",key="k",sig="s""#,
            r#"X-Matrix origin="a.example,key="k",sig="s"#,
        ] {
            assert!(
                matches!(XMatrix::parse(bad), Err(AuthError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn signed_requests_verify_and_forgeries_do_not() {
        let key = pair();
        let content = body_content(br#"{"pdus":[],"edus":[]}"#).unwrap();
        let request = SignedRequest {
            method: "PUT",
            uri: "/_matrix/federation/v1/send/t1",
            origin: name("one.example"),
            destination: name("two.example"),
            content: content.as_ref(),
        };
        let header = request.authorization(&key, "ed25519:k1");
        let parsed = XMatrix::parse(&header.to_string()).unwrap();
        assert_eq!(request.verify(&parsed, &key.public_key()), Ok(()));

        let other_body = body_content(br#"{"pdus":[{}],"edus":[]}"#).unwrap();
        let tampered = SignedRequest {
            content: other_body.as_ref(),
            ..request
        };
        assert_eq!(
            tampered.verify(&parsed, &key.public_key()),
            Err(AuthError::BadSignature)
        );
        let other_path = SignedRequest {
            uri: "/_matrix/federation/v1/send/t2",
            ..request
        };
        assert_eq!(
            other_path.verify(&parsed, &key.public_key()),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            request.verify(&parsed, &pair().public_key()),
            Err(AuthError::BadSignature)
        );
        let elsewhere = SignedRequest {
            destination: name("three.example"),
            ..request
        };
        assert_eq!(
            elsewhere.verify(&parsed, &key.public_key()),
            Err(AuthError::WrongDestination("two.example".to_owned()))
        );
    }

    #[test]
    fn bodies() {
        assert_eq!(body_content(b""), Ok(None));
        assert_eq!(body_content(b"{not json"), Err(AuthError::BadBody));
        assert_eq!(body_content(b"1.5"), Err(AuthError::BadBody));
        assert!(
            body_content(&serde_json::to_vec(&json!({"a": [1, "b"]})).unwrap())
                .unwrap()
                .is_some()
        );
    }
}
