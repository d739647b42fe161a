//! The checks a PDU received over federation passes before anything else
//! looks at it, in the spec's order: format and sizes, then signatures, then
//! the content hash (a PDU whose hash does not match is kept only in its
//! redacted form). Authorization is the server's business, after these.

use std::collections::{BTreeMap, BTreeSet};

use ruma::canonical_json::redact;
use ruma::room_version_rules::RoomVersionRules;
use ruma::signatures::{
    reference_hash, required_server_signatures_to_verify_event, verify_event, PublicKeyMap,
    Verified,
};
use ruma::{CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName};

use crate::server_keys::{signature_key_ids, VerifiedKeys};

/// The largest PDU, in bytes of canonical JSON.
pub const MAX_PDU_BYTES: usize = 65_536;
/// The longest `sender`, `room_id`, `state_key`, `type` and `event_id`.
pub const MAX_ID_BYTES: usize = 255;

/// Why a PDU was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("the PDU is larger than {MAX_PDU_BYTES} bytes")]
    TooLarge,
    #[error("malformed PDU: {0}")]
    Malformed(String),
    #[error("{0} is longer than {MAX_ID_BYTES} bytes")]
    FieldTooLong(&'static str),
    #[error("no key of {0} to check its signature with")]
    MissingKey(String),
    #[error("bad signature: {0}")]
    BadSignature(String),
}

/// A PDU that passed the checks.
#[derive(Debug, PartialEq)]
pub enum Checked {
    /// Signatures and content hash are right.
    Valid,
    /// The signatures are right but the content hash is not: the PDU is
    /// kept in this redacted form.
    Redacted(CanonicalJsonObject),
}

/// The fields every PDU has, with their JSON kinds.
const REQUIRED: [(&str, Kind); 9] = [
    ("auth_events", Kind::Array),
    ("content", Kind::Object),
    ("depth", Kind::Integer),
    ("hashes", Kind::Object),
    ("origin_server_ts", Kind::Integer),
    ("prev_events", Kind::Array),
    ("sender", Kind::String),
    ("signatures", Kind::Object),
    ("type", Kind::String),
];

#[derive(Clone, Copy)]
enum Kind {
    Array,
    Object,
    Integer,
    String,
}

/// Checks the size and shape of a PDU: required fields of the right kinds,
/// identifiers within their lengths, `room_id` present except on the create
/// event of a room version whose room ID is the create event's ID.
pub fn check_format(pdu: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<(), PduError> {
    let bytes = serde_json::to_vec(pdu).map_err(|e| PduError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_PDU_BYTES {
        return Err(PduError::TooLarge);
    }
    for (field, kind) in REQUIRED {
        let value = pdu
            .get(field)
            .ok_or_else(|| PduError::Malformed(format!("{field} is missing")))?;
        let right = matches!(
            (kind, value),
            (Kind::Array, CanonicalJsonValue::Array(_))
                | (Kind::Object, CanonicalJsonValue::Object(_))
                | (Kind::Integer, CanonicalJsonValue::Integer(_))
                | (Kind::String, CanonicalJsonValue::String(_))
        );
        if !right {
            return Err(PduError::Malformed(format!("{field} has the wrong type")));
        }
    }
    let is_create = string(pdu, "type") == Some("m.room.create");
    let room_id_optional = is_create && rules.authorization.room_create_event_id_as_room_id;
    match pdu.get("room_id") {
        Some(CanonicalJsonValue::String(_)) => {}
        None if room_id_optional => {}
        _ => return Err(PduError::Malformed("room_id is missing".to_owned())),
    }
    for field in ["sender", "room_id", "state_key", "type", "event_id"] {
        if string(pdu, field).is_some_and(|value| value.len() > MAX_ID_BYTES) {
            return Err(PduError::FieldTooLong(field));
        }
    }
    let sender = string(pdu, "sender").unwrap_or_default();
    ruma::UserId::parse(sender)
        .map_err(|_| PduError::Malformed(format!("sender {sender:?} is not a user ID")))?;
    Ok(())
}

/// The servers whose keys are needed to check the PDU's signatures, each
/// with the key IDs it signed with.
pub fn required_keys(
    pdu: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<BTreeMap<OwnedServerName, BTreeSet<String>>, PduError> {
    let servers = required_server_signatures_to_verify_event(pdu, &rules.signatures)
        .map_err(|e| PduError::Malformed(e.to_string()))?;
    Ok(servers
        .into_iter()
        .map(|server| {
            let key_ids = signature_key_ids(pdu, server.as_str())
                .into_iter()
                .collect();
            (server, key_ids)
        })
        .collect())
}

/// Checks the signatures with the servers' verified keys (each key only if
/// it was valid when the PDU was sent, as room versions from 5 require),
/// then the content hash.
pub fn check_signatures_and_hash(
    pdu: &CanonicalJsonObject,
    rules: &RoomVersionRules,
    keys: &BTreeMap<OwnedServerName, VerifiedKeys>,
) -> Result<Checked, PduError> {
    let sent_ts = match pdu.get("origin_server_ts") {
        Some(CanonicalJsonValue::Integer(ts)) => u64::try_from(i64::from(*ts)).unwrap_or(0),
        _ => {
            return Err(PduError::Malformed(
                "origin_server_ts is missing".to_owned(),
            ))
        }
    };
    let mut map = PublicKeyMap::new();
    for (server, key_ids) in required_keys(pdu, rules)? {
        let known = keys
            .get(&server)
            .ok_or_else(|| PduError::MissingKey(server.to_string()))?;
        let usable: BTreeMap<String, ruma::serde::Base64> = key_ids
            .iter()
            .filter_map(|key_id| {
                let at = if rules.enforce_key_validity {
                    sent_ts
                } else {
                    0
                };
                let key = known.key_for(key_id, at)?;
                Some((key_id.clone(), ruma::serde::Base64::new(key.to_vec())))
            })
            .collect();
        if usable.is_empty() {
            return Err(PduError::MissingKey(server.to_string()));
        }
        map.insert(server.to_string(), usable);
    }
    match verify_event(&map, pdu, rules) {
        Ok(Verified::All) => Ok(Checked::Valid),
        Ok(Verified::Signatures) => {
            let redacted = redact(pdu.clone(), &rules.redaction, None)
                .map_err(|e| PduError::Malformed(e.to_string()))?;
            Ok(Checked::Redacted(redacted))
        }
        Err(error) => Err(PduError::BadSignature(error.to_string())),
    }
}

/// The event ID of a PDU in a room version whose IDs are reference hashes.
pub fn event_id(
    pdu: &CanonicalJsonObject,
    rules: &RoomVersionRules,
) -> Result<OwnedEventId, PduError> {
    let hash = reference_hash(pdu, rules).map_err(|e| PduError::Malformed(e.to_string()))?;
    OwnedEventId::try_from(format!("${hash}")).map_err(|e| PduError::Malformed(e.to_string()))
}

fn string<'a>(pdu: &'a CanonicalJsonObject, field: &str) -> Option<&'a str> {
    match pdu.get(field) {
        Some(CanonicalJsonValue::String(value)) => Some(value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use ruma::signatures::{hash_and_sign_event, Ed25519KeyPair};
    use ruma::{RoomVersionId, ServerName};
    use serde_json::json;

    use super::*;
    use crate::server_keys::{own_key_document, to_canonical, verify_key_document};

    const NOW: u64 = 1_700_000_000_000;

    struct Origin {
        pair: Ed25519KeyPair,
        keys: BTreeMap<OwnedServerName, VerifiedKeys>,
    }

    fn origin() -> Origin {
        let der = Ed25519KeyPair::generate();
        let pair = Ed25519KeyPair::from_der(&der, "k1".to_owned()).unwrap();
        let name = <&ServerName>::try_from("origin.example").unwrap();
        let document = own_key_document(
            name,
            &pair,
            "ed25519:k1",
            &pair.public_key(),
            &[],
            NOW + 1000,
        )
        .unwrap();
        let verified = verify_key_document(&document, name, None, NOW).unwrap();
        let keys = BTreeMap::from([(name.to_owned(), verified)]);
        Origin { pair, keys }
    }

    fn rules() -> RoomVersionRules {
        RoomVersionId::V11.rules().unwrap()
    }

    fn message(origin: &Origin, body: &str) -> CanonicalJsonObject {
        let mut pdu = to_canonical(json!({
            "auth_events": ["$create", "$power", "$member"],
            "content": {"msgtype": "m.text", "body": body},
            "depth": 5,
            "origin_server_ts": NOW - 10,
            "prev_events": ["$prev"],
            "room_id": "!room:origin.example",
            "sender": "@alice:origin.example",
            "type": "m.room.message",
        }))
        .unwrap();
        hash_and_sign_event("origin.example", &origin.pair, &mut pdu, &rules().redaction).unwrap();
        pdu
    }

    #[test]
    fn a_signed_pdu_is_valid() {
        let origin = origin();
        let pdu = message(&origin, "hello");
        check_format(&pdu, &rules()).unwrap();
        let needed = required_keys(&pdu, &rules()).unwrap();
        let server = <&ServerName>::try_from("origin.example")
            .unwrap()
            .to_owned();
        assert_eq!(needed[&server], BTreeSet::from(["ed25519:k1".to_owned()]));
        assert_eq!(
            check_signatures_and_hash(&pdu, &rules(), &origin.keys),
            Ok(Checked::Valid)
        );
        assert!(event_id(&pdu, &rules()).unwrap().as_str().starts_with('$'));
    }

    #[test]
    fn a_wrong_content_hash_keeps_only_the_redacted_event() {
        let origin = origin();
        let mut pdu = message(&origin, "hello");
        let forged = to_canonical(json!({"msgtype": "m.text", "body": "forged"})).unwrap();
        pdu.insert("content".to_owned(), CanonicalJsonValue::Object(forged));
        match check_signatures_and_hash(&pdu, &rules(), &origin.keys).unwrap() {
            Checked::Redacted(redacted) => {
                assert_eq!(
                    redacted["content"],
                    CanonicalJsonValue::Object(Default::default())
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forged_signatures_and_unknown_keys_are_refused() {
        let origin = origin();
        let mut pdu = message(&origin, "hello");
        pdu.insert("depth".to_owned(), CanonicalJsonValue::Integer(6u8.into()));
        assert!(matches!(
            check_signatures_and_hash(&pdu, &rules(), &origin.keys),
            Err(PduError::BadSignature(_))
        ));
        let pdu = message(&origin, "hello");
        assert_eq!(
            check_signatures_and_hash(&pdu, &rules(), &BTreeMap::new()),
            Err(PduError::MissingKey("origin.example".to_owned()))
        );
        // A key valid only until before the PDU was sent does not count.
        let mut stale = origin.keys.clone();
        for keys in stale.values_mut() {
            keys.valid_until_ts = NOW - 100;
        }
        assert_eq!(
            check_signatures_and_hash(&pdu, &rules(), &stale),
            Err(PduError::MissingKey("origin.example".to_owned()))
        );
    }

    #[test]
    fn format_and_sizes() {
        let origin = origin();
        let pdu = message(&origin, "hello");
        for field in ["auth_events", "depth", "room_id", "sender", "hashes"] {
            let mut broken = pdu.clone();
            broken.remove(field);
            assert!(
                matches!(check_format(&broken, &rules()), Err(PduError::Malformed(_))),
                "{field}"
            );
        }
        let mut wrong_kind = pdu.clone();
        wrong_kind.insert(
            "depth".to_owned(),
            CanonicalJsonValue::String("5".to_owned()),
        );
        assert!(matches!(
            check_format(&wrong_kind, &rules()),
            Err(PduError::Malformed(_))
        ));
        let mut long = pdu.clone();
        long.insert(
            "type".to_owned(),
            CanonicalJsonValue::String("t".repeat(256)),
        );
        assert_eq!(
            check_format(&long, &rules()),
            Err(PduError::FieldTooLong("type"))
        );
        let mut big = pdu.clone();
        let body = to_canonical(json!({"body": "x".repeat(MAX_PDU_BYTES)})).unwrap();
        big.insert("content".to_owned(), CanonicalJsonValue::Object(body));
        assert_eq!(check_format(&big, &rules()), Err(PduError::TooLarge));
        let mut not_user = pdu.clone();
        not_user.insert(
            "sender".to_owned(),
            CanonicalJsonValue::String("alice".to_owned()),
        );
        assert!(matches!(
            check_format(&not_user, &rules()),
            Err(PduError::Malformed(_))
        ));
    }
}
