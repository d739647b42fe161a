//! Building, reading and presenting PDUs.

use ruma::canonical_json::{redact, try_from_json_map, CanonicalJsonObject, CanonicalJsonValue};
use ruma::events::TimelineEventType;
use ruma::room_version_rules::RoomVersionRules;
use ruma::signatures::{add_content_hash_to_event, reference_hash, sign_event, JsonError};
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId,
    RoomVersionId, UInt, UserId,
};
use std::borrow::Cow;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::keys::SigningKey;

/// Why an event could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("the event is larger than the 65536 bytes a PDU may have")]
    TooLarge,
    #[error("invalid event: {0}")]
    Invalid(String),
}

impl From<JsonError> for EventError {
    fn from(error: JsonError) -> Self {
        match error {
            JsonError::PduTooLarge => EventError::TooLarge,
            other => EventError::Invalid(other.to_string()),
        }
    }
}

/// What a client (or a service) asks to send.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub kind: String,
    pub content: Value,
    pub state_key: Option<String>,
    /// The event a redaction redacts.
    pub redacts: Option<OwnedEventId>,
}

impl NewEvent {
    pub fn message(kind: &str, content: Value) -> Self {
        NewEvent {
            kind: kind.to_owned(),
            content,
            state_key: None,
            redacts: None,
        }
    }

    pub fn state(kind: &str, state_key: &str, content: Value) -> Self {
        NewEvent {
            kind: kind.to_owned(),
            content,
            state_key: Some(state_key.to_owned()),
            redacts: None,
        }
    }
}

/// Where a new event goes in its room's graph, and who signs it.
pub struct BuildContext<'a> {
    /// `None` only for the `m.room.create` event of a version 12 room,
    /// whose room ID is derived from its own event ID.
    pub room_id: Option<&'a RoomId>,
    pub version: &'a RoomVersionId,
    pub rules: &'a RoomVersionRules,
    pub sender: &'a UserId,
    pub prev_events: &'a [OwnedEventId],
    pub auth_events: &'a [OwnedEventId],
    pub depth: u64,
    pub origin_server_ts: u64,
    pub server_name: &'a str,
    /// The key that signs the event now; `None` leaves it unsigned until
    /// it first leaves for another server ([`Pdu::signed_text`]). Its ID
    /// is the same either way: the reference hash leaves signatures out.
    pub key: Option<&'a SigningKey>,
}

/// A persistent data unit: one event of a room's graph, hashed, and signed
/// by its server (see `text`).
#[derive(Clone, Debug)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    /// The room the event belongs to, also when the JSON has no `room_id`.
    pub room_id: OwnedRoomId,
    room_id_in_json: bool,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub kind: TimelineEventType,
    pub content: Box<RawValue>,
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: u64,
    /// The whole event as canonical JSON text, as it is stored: signed,
    /// unless it is this server's own event not yet sent anywhere.
    text: Box<str>,
    /// The same, parsed: kept from building or receiving the event, and
    /// parsed from `text` on first use for an event read from storage,
    /// which most readers (clients' timelines) never need.
    json: OnceLock<CanonicalJsonObject>,
}

/// The fields of a PDU that the server reads.
#[derive(Deserialize)]
struct PduFields {
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    kind: TimelineEventType,
    content: Box<RawValue>,
    state_key: Option<String>,
    prev_events: Vec<OwnedEventId>,
    auth_events: Vec<OwnedEventId>,
    redacts: Option<OwnedEventId>,
    depth: UInt,
}

impl Pdu {
    /// Builds and hashes a new event, and signs it if `ctx.key` is given.
    /// An unsigned event is refused if its signature would make it too
    /// large, as the signed event would be.
    pub fn build(new: &NewEvent, ctx: &BuildContext<'_>) -> Result<Pdu, EventError> {
        let mut object = json!({
            "auth_events": ctx.auth_events,
            "content": new.content,
            "depth": ctx.depth,
            "origin_server_ts": ctx.origin_server_ts,
            "prev_events": ctx.prev_events,
            "sender": ctx.sender,
            "type": new.kind,
        });
        if let Some(room_id) = ctx.room_id {
            object["room_id"] = json!(room_id);
        }
        if let Some(state_key) = &new.state_key {
            object["state_key"] = json!(state_key);
        }
        if let Some(redacts) = &new.redacts {
            // Version 11 moved `redacts` into the content; older versions
            // read it at the top level.
            if ctx.rules.redaction.content_field_redacts {
                object["content"]["redacts"] = json!(redacts);
            } else {
                object["redacts"] = json!(redacts);
            }
        }
        let Value::Object(map) = object else {
            unreachable!("built as an object")
        };
        let signer = ctx.key.map(|key| (ctx.server_name, key));
        Pdu::hash_object(map, ctx.room_id, ctx.rules, signer)
    }

    /// Hashes and signs an event made of `object` (a new event, or another
    /// server's membership template filled in), and reads it. Without a
    /// room ID (a version 12 create event), the room ID is derived.
    pub fn sign_object(
        map: serde_json::Map<String, Value>,
        room_id: Option<&RoomId>,
        rules: &RoomVersionRules,
        server_name: &str,
        key: &SigningKey,
    ) -> Result<Pdu, EventError> {
        Pdu::hash_object(map, room_id, rules, Some((server_name, key)))
    }

    /// Adds the content hash (and the signature of `signer`, if given)
    /// and derives the event ID from the reference hash.
    fn hash_object(
        map: serde_json::Map<String, Value>,
        room_id: Option<&RoomId>,
        rules: &RoomVersionRules,
        signer: Option<(&str, &SigningKey)>,
    ) -> Result<Pdu, EventError> {
        let mut canonical =
            try_from_json_map(map).map_err(|e| EventError::Invalid(e.to_string()))?;
        add_content_hash_to_event(&mut canonical)?;
        if let Some((server_name, key)) = signer {
            sign_event(server_name, key, &mut canonical, &rules.redaction)?;
        }
        let hash = reference_hash(&canonical, rules)?;
        let event_id =
            EventId::new_v2_or_v3(&hash).map_err(|e| EventError::Invalid(e.to_string()))?;
        let room_id = match room_id {
            Some(room_id) => room_id.to_owned(),
            None => RoomId::new_v2(&hash).map_err(|e| EventError::Invalid(e.to_string()))?,
        };
        Pdu::from_canonical(event_id, room_id, canonical)
    }

    /// Reads a built or received PDU.
    pub fn from_canonical(
        event_id: OwnedEventId,
        room_id: OwnedRoomId,
        json: CanonicalJsonObject,
    ) -> Result<Pdu, EventError> {
        let whole = CanonicalJsonValue::Object(json);
        let text = whole.to_string();
        let CanonicalJsonValue::Object(json) = whole else {
            unreachable!("made as an object")
        };
        let pdu = Pdu::from_text(event_id, room_id, text)?;
        let _ = pdu.json.set(json);
        Ok(pdu)
    }

    /// Reads a stored PDU from its canonical JSON text: only the fields the
    /// server reads are parsed now, the whole object when it is first asked
    /// for ([`Pdu::json`]).
    pub fn from_text(
        event_id: OwnedEventId,
        room_id: OwnedRoomId,
        text: String,
    ) -> Result<Pdu, EventError> {
        let fields: PduFields =
            serde_json::from_str(&text).map_err(|e| EventError::Invalid(e.to_string()))?;
        // Version 11 moved `redacts` into a redaction's content.
        let redacts = fields.redacts.or_else(|| {
            if fields.kind != TimelineEventType::RoomRedaction {
                return None;
            }
            #[derive(Deserialize)]
            struct Redacts {
                redacts: Option<OwnedEventId>,
            }
            serde_json::from_str::<Redacts>(fields.content.get())
                .ok()
                .and_then(|c| c.redacts)
        });
        Ok(Pdu {
            event_id,
            room_id_in_json: fields.room_id.is_some(),
            room_id,
            sender: fields.sender,
            origin_server_ts: fields.origin_server_ts,
            kind: fields.kind,
            content: fields.content,
            state_key: fields.state_key,
            prev_events: fields.prev_events,
            auth_events: fields.auth_events,
            redacts,
            depth: fields.depth.into(),
            text: text.into_boxed_str(),
            json: OnceLock::new(),
        })
    }

    /// The whole signed event, as other servers receive it.
    pub fn json(&self) -> &CanonicalJsonObject {
        self.json.get_or_init(|| {
            // The text is canonical JSON that this server wrote (or read
            // and checked before storing it); it parses.
            serde_json::from_str(&self.text).unwrap_or_else(|e| {
                tracing::error!(event_id = %self.event_id, "a stored event does not parse: {e}");
                CanonicalJsonObject::new()
            })
        })
    }

    /// A copy without the parsed object, to be kept in memory as an event
    /// read from storage is: the object, if ever asked for, is parsed
    /// again from the text. A built event's object is larger than its text.
    pub fn lean(&self) -> Pdu {
        Pdu {
            event_id: self.event_id.clone(),
            room_id: self.room_id.clone(),
            room_id_in_json: self.room_id_in_json,
            sender: self.sender.clone(),
            origin_server_ts: self.origin_server_ts,
            kind: self.kind.clone(),
            content: self.content.clone(),
            state_key: self.state_key.clone(),
            prev_events: self.prev_events.clone(),
            auth_events: self.auth_events.clone(),
            redacts: self.redacts.clone(),
            depth: self.depth,
            text: self.text.clone(),
            json: OnceLock::new(),
        }
    }

    /// The canonical JSON text of the event as stored (see `text`).
    pub fn json_str(&self) -> &str {
        &self.text
    }

    /// Whether this is `server_name`'s own event that it has not signed
    /// yet: one built while only this server was in its room.
    pub fn needs_signature(&self, server_name: &str) -> bool {
        if self.sender.server_name().as_str() != server_name {
            return false;
        }
        let signed = match self.json.get() {
            Some(json) => matches!(
                json.get("signatures"),
                Some(CanonicalJsonValue::Object(signatures)) if signatures.contains_key(server_name)
            ),
            // An event read from storage: only its signers are read, not
            // the whole object, which most of the events that leave (those
            // signed when built) never need.
            None => {
                #[derive(Deserialize)]
                struct Signers {
                    #[serde(default)]
                    signatures: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
                }
                serde_json::from_str::<Signers>(&self.text)
                    .is_ok_and(|signers| signers.signatures.contains_key(server_name))
            }
        };
        !signed
    }

    /// The event as other servers receive it: signed by `server_name`
    /// with `key` if it is that server's event and not signed yet. The
    /// signature covers the redacted event, so it is the same whenever it
    /// is made (ed25519 signatures are deterministic).
    pub fn signed_text(
        &self,
        rules: &RoomVersionRules,
        server_name: &str,
        key: &SigningKey,
    ) -> Result<Cow<'_, str>, EventError> {
        if !self.needs_signature(server_name) {
            return Ok(Cow::Borrowed(&self.text));
        }
        let mut json = self.json().clone();
        sign_event(server_name, key, &mut json, &rules.redaction)?;
        Ok(Cow::Owned(CanonicalJsonValue::Object(json).to_string()))
    }

    /// The length of the event's text once `server_name` has signed it
    /// with `key`: what the size limit of a PDU applies to.
    pub fn signed_len(&self, server_name: &str, key: &SigningKey) -> usize {
        if !self.needs_signature(server_name) {
            return self.text.len();
        }
        // An ed25519 signature is 64 bytes, 86 characters of unpadded
        // base64; the object is new, so it comes with a comma before it.
        let signatures = format!(
            r#","signatures":{{"{server_name}":{{"{}":"{}"}}}}"#,
            key.key_id(),
            "A".repeat(86)
        );
        self.text.len() + signatures.len()
    }

    /// The content as a JSON value.
    pub fn content_value(&self) -> Value {
        serde_json::from_str(self.content.get()).unwrap_or(Value::Object(Default::default()))
    }

    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// The event as this room version's redaction algorithm leaves it.
    pub fn redacted(&self, rules: &RoomVersionRules) -> Result<Pdu, EventError> {
        let json = redact(self.json().clone(), &rules.redaction, None)
            .map_err(|e| EventError::Invalid(e.to_string()))?;
        Pdu::from_canonical(self.event_id.clone(), self.room_id.clone(), json)
    }

    /// The event in the client-server API's format ("ClientEvent").
    pub fn client_event(&self) -> Value {
        let mut event = json!({
            "content": self.content_value(),
            "event_id": self.event_id,
            "origin_server_ts": self.origin_server_ts,
            "room_id": self.room_id,
            "sender": self.sender,
            "type": self.kind.to_string(),
            "unsigned": {},
        });
        if let Some(state_key) = &self.state_key {
            event["state_key"] = json!(state_key);
        }
        if let Some(redacts) = &self.redacts {
            event["redacts"] = json!(redacts);
        }
        event
    }

    /// The canonical JSON text of the signed event, owned.
    pub fn json_text(&self) -> String {
        self.text.to_string()
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }

    fn room_id(&self) -> Option<&RoomId> {
        self.room_id_in_json.then_some(&*self.room_id)
    }

    fn sender(&self) -> &UserId {
        &self.sender
    }

    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }

    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }

    fn content(&self) -> &RawValue {
        &self.content
    }

    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }

    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }

    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }

    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }

    fn rejected(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use ruma::serde::Base64;
    use ruma::signatures::{verify_event, PublicKeyMap, Verified};
    use ruma::RoomVersionId;

    use super::*;

    fn build(
        version: RoomVersionId,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
    ) -> (Pdu, SigningKey, RoomVersionRules) {
        let rules = version.rules().unwrap();
        let key = SigningKey::generate("k1").unwrap();
        let new = NewEvent {
            kind: kind.to_owned(),
            content,
            state_key: state_key.map(str::to_owned),
            redacts: None,
        };
        let pdu = build_with(&version, &rules, &new, Some(&key));
        (pdu, key, rules)
    }

    /// Alice's event in a room of example.org, signed with `key` if given.
    fn build_with(
        version: &RoomVersionId,
        rules: &RoomVersionRules,
        new: &NewEvent,
        key: Option<&SigningKey>,
    ) -> Pdu {
        let room_id = RoomId::parse("!room:example.org").unwrap();
        let sender = UserId::parse("@alice:example.org").unwrap();
        let prev = [EventId::parse("$prev").unwrap()];
        let ctx = BuildContext {
            room_id: Some(&room_id),
            version,
            rules,
            sender: &sender,
            prev_events: &prev,
            auth_events: &prev,
            depth: 7,
            origin_server_ts: 1_700_000_000_000,
            server_name: "example.org",
            key,
        };
        Pdu::build(new, &ctx).unwrap()
    }

    /// example.org's public key, as a checking server knows it.
    fn public_keys(key: &SigningKey) -> PublicKeyMap {
        let mut set = std::collections::BTreeMap::new();
        set.insert(key.key_id(), Base64::new(key.public_key().to_vec()));
        let mut keys = PublicKeyMap::new();
        keys.insert("example.org".to_owned(), set);
        keys
    }

    #[test]
    fn built_events_are_hashed_signed_and_named_by_their_hash() {
        for version in [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12] {
            let (pdu, key, rules) = build(version, "m.room.message", None, json!({ "body": "hi" }));
            assert!(pdu.event_id.as_str().starts_with('$'));
            assert_eq!(pdu.event_id.as_str().len(), 44);
            let keys = public_keys(&key);
            assert_eq!(
                verify_event(&keys, pdu.json(), &rules).unwrap(),
                Verified::All
            );
            // Changing the content breaks the content hash, not the signature.
            let mut tampered = pdu.json().clone();
            tampered.insert(
                "content".into(),
                CanonicalJsonValue::Object(Default::default()),
            );
            assert_eq!(
                verify_event(&keys, &tampered, &rules).unwrap(),
                Verified::Signatures
            );
            let reread = Pdu::from_canonical(
                pdu.event_id.clone(),
                pdu.room_id.clone(),
                pdu.json().clone(),
            );
            assert_eq!(reread.unwrap().content_value(), json!({ "body": "hi" }));
        }
    }

    #[test]
    fn an_event_left_unsigned_is_the_same_event_once_signed() {
        for version in [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12] {
            let rules = version.rules().unwrap();
            let key = SigningKey::generate("k1").unwrap();
            let new = NewEvent::message("m.room.message", json!({ "body": "later" }));
            let signed = build_with(&version, &rules, &new, Some(&key));
            let unsigned = build_with(&version, &rules, &new, None);
            assert_eq!(
                unsigned.event_id, signed.event_id,
                "the ID ignores signatures"
            );
            assert!(unsigned.json().get("signatures").is_none());
            assert!(
                unsigned.json().get("hashes").is_some(),
                "hashed all the same"
            );
            assert!(unsigned.needs_signature("example.org"));
            assert!(!signed.needs_signature("example.org"));
            // As read from storage, before the whole object is parsed.
            assert!(unsigned.lean().needs_signature("example.org"));
            assert!(!signed.lean().needs_signature("example.org"));
            assert!(
                !unsigned.needs_signature("other.example"),
                "not that server's event"
            );

            // Signed on the way out: the very event that was signed at once.
            let text = unsigned.signed_text(&rules, "example.org", &key).unwrap();
            assert_eq!(text, signed.json_str());
            assert_eq!(unsigned.signed_len("example.org", &key), text.len());
            assert_eq!(signed.signed_len("example.org", &key), text.len());
            let borrowed = signed.signed_text(&rules, "example.org", &key).unwrap();
            assert!(
                matches!(borrowed, Cow::Borrowed(_)),
                "a signed event is left as it is"
            );

            // And it verifies, as another server checks it.
            let object: CanonicalJsonObject = serde_json::from_str(&text).unwrap();
            assert_eq!(
                verify_event(&public_keys(&key), &object, &rules).unwrap(),
                Verified::All
            );
        }
    }

    #[test]
    fn an_event_read_from_its_stored_text_is_the_event_that_was_built() {
        let target = EventId::parse("$target").unwrap();
        let content = json!({ "redacts": target, "reason": "spam" });
        let (redaction, _, _) = build(RoomVersionId::V11, "m.room.redaction", None, content);
        // `redacts` in the content means nothing outside a redaction.
        let content = json!({ "body": "hi", "redacts": target });
        let (message, _, _) = build(RoomVersionId::V11, "m.room.message", None, content);
        for built in [&redaction, &message] {
            let text = built.json_text();
            let read = Pdu::from_text(built.event_id.clone(), built.room_id.clone(), text.clone())
                .unwrap();
            assert_eq!(read.json_str(), text);
            assert_eq!(read.json(), built.json(), "the whole object, parsed on use");
            let lean = built.lean();
            assert!(lean.json.get().is_none(), "the object is not kept");
            assert_eq!(lean.json_str(), built.json_str());
            assert_eq!(lean.json(), built.json(), "parsed again from the text");
            assert_eq!(read.sender, built.sender);
            assert_eq!(read.kind, built.kind);
            assert_eq!(read.content.get(), built.content.get());
            assert_eq!(read.auth_events, built.auth_events);
            assert_eq!(read.prev_events, built.prev_events);
            assert_eq!(read.depth, 7);
            assert_eq!(read.redacts, built.redacts);
        }
        assert_eq!(redaction.redacts, Some(target));
        assert_eq!(message.redacts, None);
        let not_json = Pdu::from_text(
            redaction.event_id.clone(),
            redaction.room_id.clone(),
            "{".to_owned(),
        );
        assert!(not_json.is_err());
    }

    #[test]
    fn oversized_events_are_refused() {
        let rules = RoomVersionId::V12.rules().unwrap();
        let key = SigningKey::generate("k1").unwrap();
        let room_id = RoomId::parse("!room:example.org").unwrap();
        let sender = UserId::parse("@alice:example.org").unwrap();
        let new = NewEvent::message("m.room.message", json!({ "body": "x".repeat(70_000) }));
        let ctx = BuildContext {
            room_id: Some(&room_id),
            version: &RoomVersionId::V12,
            rules: &rules,
            sender: &sender,
            prev_events: &[],
            auth_events: &[],
            depth: 1,
            origin_server_ts: 0,
            server_name: "example.org",
            key: Some(&key),
        };
        assert!(matches!(Pdu::build(&new, &ctx), Err(EventError::TooLarge)));
    }

    /// (version, type, state key, content, content left after redaction)
    fn check_redaction(
        version: RoomVersionId,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
        expected: Value,
    ) {
        let (pdu, _, rules) = build(version.clone(), kind, state_key, content);
        let redacted = pdu.redacted(&rules).unwrap();
        assert_eq!(redacted.content_value(), expected, "v{version} {kind}");
        assert_eq!(redacted.event_id, pdu.event_id);
    }

    #[test]
    fn redaction_keeps_what_each_version_keeps() {
        let member = json!({ "membership": "join", "displayname": "A", "join_authorised_via_users_server": "@x:y" });
        let create =
            json!({ "creator": "@alice:example.org", "room_version": "10", "m.federate": false });
        let levels =
            json!({ "users": {}, "invite": 0, "ban": 50, "notifications": { "room": 50 } });
        for version in [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12] {
            check_redaction(
                version.clone(),
                "m.room.message",
                None,
                json!({ "body": "secret" }),
                json!({}),
            );
            check_redaction(
                version.clone(),
                "m.room.member",
                Some("@alice:example.org"),
                member.clone(),
                json!({ "membership": "join", "join_authorised_via_users_server": "@x:y" }),
            );
            let v10 = version == RoomVersionId::V10;
            // Version 11 keeps the whole create content and `invite` levels.
            let expected_create = if v10 {
                json!({ "creator": "@alice:example.org" })
            } else {
                create.clone()
            };
            check_redaction(
                version.clone(),
                "m.room.create",
                Some(""),
                create.clone(),
                expected_create,
            );
            let expected_levels = if v10 {
                json!({ "users": {}, "ban": 50 })
            } else {
                json!({ "users": {}, "ban": 50, "invite": 0 })
            };
            check_redaction(
                version.clone(),
                "m.room.power_levels",
                Some(""),
                levels.clone(),
                expected_levels,
            );
        }
    }
}
