//! Server signing keys: the document a server publishes about its own keys
//! (`GET /_matrix/key/v2/server`), and the checks a document fetched from
//! another server (or from a notary) must pass before its keys are trusted.

use std::collections::BTreeMap;

use ruma::serde::Base64;
use ruma::signatures::{sign_json, verify_json, KeyPair, PublicKeyMap, PublicKeySet};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, ServerName};
use serde_json::json;

/// The longest a fetched key document is trusted, whatever its
/// `valid_until_ts` says: 7 days, as the spec advises.
pub const MAX_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;

/// One of the server's former keys, still published so that events it
/// signed can be checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OldKey {
    pub key_id: String,
    pub public_key: [u8; 32],
    pub expired_ts: u64,
}

/// Builds and signs this server's key document.
pub fn own_key_document(
    server_name: &ServerName,
    key: &impl KeyPair,
    key_id: &str,
    public_key: &[u8; 32],
    old_keys: &[OldKey],
    valid_until_ts: u64,
) -> Result<CanonicalJsonObject, KeyError> {
    let old_verify_keys: serde_json::Map<String, serde_json::Value> = old_keys
        .iter()
        .map(|old| {
            let body = json!({
                "key": base64(&old.public_key),
                "expired_ts": old.expired_ts,
            });
            (old.key_id.clone(), body)
        })
        .collect();
    let document = json!({
        "server_name": server_name.as_str(),
        "verify_keys": {
            key_id: { "key": base64(public_key) }
        },
        "old_verify_keys": old_verify_keys,
        "valid_until_ts": valid_until_ts,
    });
    let mut object = to_canonical(document)?;
    sign_json(server_name.as_str(), key, &mut object)
        .map_err(|e| KeyError::Malformed(e.to_string()))?;
    Ok(object)
}

/// Keys of a server, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedKeys {
    pub server_name: String,
    /// Current keys by key ID.
    pub verify_keys: BTreeMap<String, [u8; 32]>,
    /// Former keys by key ID, with when they stopped being used.
    pub old_verify_keys: BTreeMap<String, ([u8; 32], u64)>,
    /// Until when the current keys may be used, capped at `now + 7 days`.
    pub valid_until_ts: u64,
}

impl VerifiedKeys {
    /// The public key of `key_id`, current or old, for checking something
    /// made at `ts` (an old key only counts for what came before it
    /// expired; a current key only until `valid_until_ts`).
    pub fn key_for(&self, key_id: &str, ts: u64) -> Option<[u8; 32]> {
        if let Some(key) = self.verify_keys.get(key_id) {
            return (ts <= self.valid_until_ts).then_some(*key);
        }
        let (key, expired_ts) = self.old_verify_keys.get(key_id)?;
        (ts <= *expired_ts).then_some(*key)
    }
}

/// Why a key document was not trusted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("malformed key document: {0}")]
    Malformed(String),
    #[error("the key document is for {found}, not {expected}")]
    WrongServer { expected: String, found: String },
    #[error("the key document is not signed by its key {0}")]
    BadSignature(String),
    #[error("the key document expired at {0}")]
    Expired(u64),
}

/// Checks a key document fetched for `expected`: its server name, every
/// current key's self-signature, and (when `notary` is given) the notary's
/// signature with the notary's keys. `valid_until_ts` is capped at
/// `now_ms + 7 days`; a document already expired is refused.
pub fn verify_key_document(
    document: &CanonicalJsonObject,
    expected: &ServerName,
    notary: Option<(&ServerName, &VerifiedKeys)>,
    now_ms: u64,
) -> Result<VerifiedKeys, KeyError> {
    let found = string_field(document, "server_name")?;
    if found != expected.as_str() {
        return Err(KeyError::WrongServer {
            expected: expected.to_string(),
            found,
        });
    }
    let verify_keys = key_map(document, "verify_keys")?;
    if verify_keys.is_empty() {
        return Err(KeyError::Malformed("verify_keys is empty".to_owned()));
    }
    let old_verify_keys = old_key_map(document)?;
    let valid_until_ts = match document.get("valid_until_ts") {
        Some(CanonicalJsonValue::Integer(ts)) => u64::try_from(i64::from(*ts)).unwrap_or(0),
        _ => return Err(KeyError::Malformed("valid_until_ts is missing".to_owned())),
    };
    if valid_until_ts < now_ms {
        return Err(KeyError::Expired(valid_until_ts));
    }
    for (key_id, public_key) in &verify_keys {
        let keys = single_key(expected.as_str(), key_id, public_key);
        check_signature_of(document, expected.as_str(), key_id, &keys)?;
    }
    if let Some((notary_name, notary_keys)) = notary {
        check_notary_signature(document, notary_name, notary_keys, now_ms)?;
    }
    Ok(VerifiedKeys {
        server_name: found,
        verify_keys,
        old_verify_keys,
        valid_until_ts: valid_until_ts.min(now_ms.saturating_add(MAX_VALIDITY_MS)),
    })
}

/// A notary's document must carry a valid signature of the notary by one
/// of its current keys.
fn check_notary_signature(
    document: &CanonicalJsonObject,
    notary: &ServerName,
    notary_keys: &VerifiedKeys,
    now_ms: u64,
) -> Result<(), KeyError> {
    let signed_by = signature_key_ids(document, notary.as_str());
    for key_id in &signed_by {
        if let Some(public_key) = notary_keys.key_for(key_id, now_ms) {
            let keys = single_key(notary.as_str(), key_id, &public_key);
            return check_signature_of(document, notary.as_str(), key_id, &keys);
        }
    }
    Err(KeyError::BadSignature(format!("of notary {notary}")))
}

/// Verifies the one signature `entity`'s `key_id` made over `document`.
fn check_signature_of(
    document: &CanonicalJsonObject,
    entity: &str,
    key_id: &str,
    keys: &PublicKeyMap,
) -> Result<(), KeyError> {
    // `verify_json` checks every entity that signed; keep only `entity`'s
    // signature by `key_id` so that other signers do not need keys here.
    let mut only = document.clone();
    let signature = document
        .get("signatures")
        .and_then(|s| match s {
            CanonicalJsonValue::Object(by_entity) => by_entity.get(entity),
            _ => None,
        })
        .and_then(|s| match s {
            CanonicalJsonValue::Object(by_key) => by_key.get(key_id).cloned(),
            _ => None,
        })
        .ok_or_else(|| KeyError::BadSignature(key_id.to_owned()))?;
    let signatures = BTreeMap::from([(
        entity.to_owned(),
        CanonicalJsonValue::Object(BTreeMap::from([(key_id.to_owned(), signature)])),
    )]);
    only.insert(
        "signatures".to_owned(),
        CanonicalJsonValue::Object(signatures),
    );
    verify_json(keys, &only).map_err(|_| KeyError::BadSignature(key_id.to_owned()))
}

/// The key IDs `entity` signed `document` with.
pub fn signature_key_ids(document: &CanonicalJsonObject, entity: &str) -> Vec<String> {
    match document.get("signatures") {
        Some(CanonicalJsonValue::Object(by_entity)) => match by_entity.get(entity) {
            Some(CanonicalJsonValue::Object(by_key)) => by_key.keys().cloned().collect(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// A public key map of one key of one entity, as ruma's verifiers take it.
pub fn single_key(entity: &str, key_id: &str, public_key: &[u8; 32]) -> PublicKeyMap {
    let set: PublicKeySet = BTreeMap::from([(key_id.to_owned(), Base64::new(public_key.to_vec()))]);
    BTreeMap::from([(entity.to_owned(), set)])
}

fn string_field(document: &CanonicalJsonObject, field: &str) -> Result<String, KeyError> {
    match document.get(field) {
        Some(CanonicalJsonValue::String(value)) => Ok(value.clone()),
        _ => Err(KeyError::Malformed(format!("{field} is missing"))),
    }
}

/// `{key_id: {"key": base64}}` with each key 32 bytes of ed25519.
fn key_map(
    document: &CanonicalJsonObject,
    field: &str,
) -> Result<BTreeMap<String, [u8; 32]>, KeyError> {
    let Some(CanonicalJsonValue::Object(keys)) = document.get(field) else {
        return Err(KeyError::Malformed(format!("{field} is missing")));
    };
    keys.iter()
        .filter(|(key_id, _)| key_id.starts_with("ed25519:"))
        .map(|(key_id, body)| Ok((key_id.clone(), public_key_of(key_id, body)?)))
        .collect()
}

fn old_key_map(
    document: &CanonicalJsonObject,
) -> Result<BTreeMap<String, ([u8; 32], u64)>, KeyError> {
    let Some(CanonicalJsonValue::Object(keys)) = document.get("old_verify_keys") else {
        return Ok(BTreeMap::new());
    };
    let mut found = BTreeMap::new();
    for (key_id, body) in keys.iter().filter(|(id, _)| id.starts_with("ed25519:")) {
        let public_key = public_key_of(key_id, body)?;
        let expired_ts = match body {
            CanonicalJsonValue::Object(fields) => fields.get("expired_ts"),
            _ => None,
        };
        let Some(CanonicalJsonValue::Integer(expired_ts)) = expired_ts else {
            return Err(KeyError::Malformed(format!("{key_id} has no expired_ts")));
        };
        let expired_ts = u64::try_from(i64::from(*expired_ts)).unwrap_or(0);
        found.insert(key_id.clone(), (public_key, expired_ts));
    }
    Ok(found)
}

fn public_key_of(key_id: &str, body: &CanonicalJsonValue) -> Result<[u8; 32], KeyError> {
    let bad = || KeyError::Malformed(format!("{key_id} is not a 32-byte base64 key"));
    let CanonicalJsonValue::Object(fields) = body else {
        return Err(bad());
    };
    let Some(CanonicalJsonValue::String(encoded)) = fields.get("key") else {
        return Err(bad());
    };
    let decoded: Base64 = Base64::parse(encoded.as_str()).map_err(|_| bad())?;
    decoded.as_bytes().try_into().map_err(|_| bad())
}

/// Unpadded standard base64, as Matrix writes keys and signatures.
pub fn base64(bytes: &[u8]) -> String {
    let value: Base64 = Base64::new(bytes.to_vec());
    value.encode()
}

/// JSON as canonical JSON (integers within the safe range, no floats).
pub fn to_canonical(value: serde_json::Value) -> Result<CanonicalJsonObject, KeyError> {
    match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(object)) => Ok(object),
        Ok(_) => Err(KeyError::Malformed("not a JSON object".to_owned())),
        Err(e) => Err(KeyError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use ruma::signatures::Ed25519KeyPair;

    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn key(version: &str) -> Ed25519KeyPair {
        let der = Ed25519KeyPair::generate();
        Ed25519KeyPair::from_der(&der, version.to_owned()).unwrap()
    }

    fn name(text: &str) -> &ServerName {
        <&ServerName>::try_from(text).unwrap()
    }

    fn document(server: &str, pair: &Ed25519KeyPair, valid_until_ts: u64) -> CanonicalJsonObject {
        let old = OldKey {
            key_id: "ed25519:old".to_owned(),
            public_key: [7; 32],
            expired_ts: NOW - 1000,
        };
        let key_id = format!("ed25519:{}", pair.version());
        own_key_document(
            name(server),
            pair,
            &key_id,
            &pair.public_key(),
            &[old],
            valid_until_ts,
        )
        .unwrap()
    }

    #[test]
    fn own_document_verifies_and_is_capped() {
        let pair = key("a1");
        let doc = document("one.example:8448", &pair, NOW + 30 * MAX_VALIDITY_MS);
        let keys = verify_key_document(&doc, name("one.example:8448"), None, NOW).unwrap();
        assert_eq!(keys.verify_keys["ed25519:a1"], pair.public_key());
        assert_eq!(keys.valid_until_ts, NOW + MAX_VALIDITY_MS);
        assert_eq!(keys.old_verify_keys["ed25519:old"], ([7; 32], NOW - 1000));
        assert_eq!(keys.key_for("ed25519:a1", NOW), Some(pair.public_key()));
        assert_eq!(keys.key_for("ed25519:a1", NOW + MAX_VALIDITY_MS + 1), None);
        assert_eq!(keys.key_for("ed25519:old", NOW - 2000), Some([7; 32]));
        assert_eq!(keys.key_for("ed25519:old", NOW), None);
    }

    #[test]
    fn forged_wrong_or_expired_documents_are_refused() {
        let pair = key("a1");
        let doc = document("one.example", &pair, NOW + 1000);
        assert_eq!(
            verify_key_document(&doc, name("two.example"), None, NOW),
            Err(KeyError::WrongServer {
                expected: "two.example".to_owned(),
                found: "one.example".to_owned()
            })
        );
        assert_eq!(
            verify_key_document(&doc, name("one.example"), None, NOW + 2000),
            Err(KeyError::Expired(NOW + 1000))
        );
        let mut forged = doc.clone();
        forged.insert(
            "valid_until_ts".to_owned(),
            CanonicalJsonValue::Integer((1i64 << 50).try_into().unwrap()),
        );
        assert_eq!(
            verify_key_document(&forged, name("one.example"), None, NOW),
            Err(KeyError::BadSignature("ed25519:a1".to_owned()))
        );
        // Signed by a different key than the one it publishes.
        let other = key("a1");
        let mut swapped = document("one.example", &other, NOW + 1000);
        swapped.insert("signatures".to_owned(), doc["signatures"].clone());
        assert!(matches!(
            verify_key_document(&swapped, name("one.example"), None, NOW),
            Err(KeyError::BadSignature(_))
        ));
    }

    #[test]
    fn notary_signatures_are_checked() {
        let origin = key("o1");
        let notary = key("n1");
        let mut doc = document("origin.example", &origin, NOW + 1000);
        let notary_doc = document("notary.example", &notary, NOW + 1000);
        let notary_keys =
            verify_key_document(&notary_doc, name("notary.example"), None, NOW).unwrap();
        let vouched = Some((name("notary.example"), &notary_keys));
        assert!(matches!(
            verify_key_document(&doc, name("origin.example"), vouched, NOW),
            Err(KeyError::BadSignature(_))
        ));
        sign_json("notary.example", &notary, &mut doc).unwrap();
        let keys = verify_key_document(&doc, name("origin.example"), vouched, NOW).unwrap();
        assert_eq!(keys.verify_keys["ed25519:o1"], origin.public_key());
    }

    #[test]
    fn malformed_documents_are_refused() {
        let pair = key("a1");
        let doc = document("one.example", &pair, NOW + 1000);
        for field in ["server_name", "verify_keys", "valid_until_ts"] {
            let mut broken = doc.clone();
            broken.remove(field);
            assert!(matches!(
                verify_key_document(&broken, name("one.example"), None, NOW),
                Err(KeyError::Malformed(_))
            ));
        }
        let mut short = doc.clone();
        short.insert(
            "verify_keys".to_owned(),
            CanonicalJsonValue::Object(
                to_canonical(json!({"ed25519:a1": {"key": "AAAA"}})).unwrap(),
            ),
        );
        assert!(matches!(
            verify_key_document(&short, name("one.example"), None, NOW),
            Err(KeyError::Malformed(_))
        ));
    }
}
