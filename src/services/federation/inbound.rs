//! Events other servers send: a PDU's checks before it may touch a room
//! (format and sizes, signatures with the signing servers' keys, content
//! hash), transactions (`PUT /send/{txnId}`, idempotent per origin and
//! transaction ID), and fetching the prev events a PDU names but this
//! server lacks.

use std::collections::BTreeMap;

use axum::http::Method;
use futures_util::future::join_all;
use myelin_federation::pdu::{
    check_format, check_signatures_and_hash, event_id, required_keys, Checked,
};
use myelin_federation::server_acl;
use myelin_federation::transaction::{MAX_EDUS, MAX_PDUS};
use ruma::room_version_rules::RoomVersionRules;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedEventId, OwnedRoomId, RoomId, ServerName,
};
use serde_json::{json, Value};

use crate::events::Pdu;
use crate::services::error::{Error, Result};
use crate::services::rooms::remote::Offered;
use crate::services::rooms::StateIds;
use crate::services::Services;
use crate::storage::tables;
use crate::storage::Batch;

/// Most events asked for at once with `get_missing_events`.
const MISSING_EVENTS_LIMIT: u64 = 20;

/// Checks a PDU received over federation and reads it: format, sizes,
/// signatures (fetching the signers' keys), content hash (a mismatch
/// leaves the redacted form). The event ID is computed, never trusted.
pub async fn check_pdu(
    services: &Services,
    value: &Value,
    rules: &RoomVersionRules,
) -> Result<Pdu> {
    let mut json: CanonicalJsonObject = match CanonicalJsonValue::try_from(value.clone()) {
        Ok(CanonicalJsonValue::Object(object)) => object,
        _ => {
            return Err(Error::BadJson(
                "a PDU must be a canonical JSON object".to_owned(),
            ))
        }
    };
    json.remove("unsigned");
    json.remove("event_id");
    check_format(&json, rules).map_err(|e| match e {
        myelin_federation::pdu::PduError::TooLarge => Error::TooLarge(e.to_string()),
        other => Error::BadJson(other.to_string()),
    })?;
    let sent_ts = match json.get("origin_server_ts") {
        Some(CanonicalJsonValue::Integer(ts)) => u64::try_from(i64::from(*ts)).unwrap_or(0),
        _ => 0,
    };
    let mut keys = BTreeMap::new();
    for (server, key_ids) in
        required_keys(&json, rules).map_err(|e| Error::BadJson(e.to_string()))?
    {
        let Some(key_id) = key_ids.iter().next() else {
            return Err(Error::Forbidden(format!(
                "the PDU has no signature of {server}"
            )));
        };
        let minimum = if rules.enforce_key_validity {
            sent_ts
        } else {
            0
        };
        let verified = services
            .federation
            .server_keys(&server, key_id, minimum)
            .await?;
        keys.insert(server, verified);
    }
    let json = match check_signatures_and_hash(&json, rules, &keys)
        .map_err(|e| Error::Forbidden(e.to_string()))?
    {
        Checked::Valid => json,
        Checked::Redacted(redacted) => {
            tracing::info!("a PDU's content hash does not match; kept redacted");
            redacted
        }
    };
    let id = event_id(&json, rules).map_err(|e| Error::BadJson(e.to_string()))?;
    let room_id = match json.get("room_id") {
        Some(CanonicalJsonValue::String(room_id)) => {
            RoomId::parse(room_id).map_err(|e| Error::BadJson(format!("room_id: {e}")))?
        }
        _ => OwnedRoomId::try_from(format!("!{}", &id.as_str()[1..]))
            .map_err(|e| Error::BadJson(e.to_string()))?,
    };
    Pdu::from_canonical(id, room_id, json).map_err(|e| Error::BadJson(e.to_string()))
}

/// Whether the room's `m.room.server_acl` lets `server` take part.
pub fn acl_allows(services: &Services, room_id: &RoomId, server: &ServerName) -> Result<bool> {
    Ok(
        match services
            .rooms
            .state_event(room_id, "m.room.server_acl", "")?
        {
            Some(acl) => server_acl::allows(&acl.content_value(), server),
            None => true,
        },
    )
}

/// Refuses a server the room's `m.room.server_acl` denies (403).
pub fn require_acl(services: &Services, room_id: &RoomId, server: &ServerName) -> Result<()> {
    if acl_allows(services, room_id, server)? {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "{server} is denied by the room's server ACL"
        )))
    }
}

/// `PUT /_matrix/federation/v1/send/{txnId}`: each PDU checked and offered
/// to its room (rooms concurrently, each room's PDUs in order), and the
/// answer with each PDU's result. A transaction seen before gets the
/// answer it got then.
pub async fn receive_transaction(
    services: &Services,
    origin: &ServerName,
    txn_id: &str,
    body: &Value,
) -> Result<Value> {
    let key = (origin.to_string(), txn_id.to_owned());
    if let Some(answer) = services.storage.get(tables::FEDERATION_INBOUND, &key)? {
        return Ok(answer);
    }
    if body["origin"]
        .as_str()
        .is_some_and(|o| o != origin.as_str())
    {
        return Err(Error::BadJson(
            "the transaction's origin is not the server that signed the request".to_owned(),
        ));
    }
    let pdus = body["pdus"]
        .as_array()
        .ok_or_else(|| Error::BadJson("pdus must be an array".to_owned()))?;
    let edus = body
        .get("edus")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if pdus.len() > MAX_PDUS || edus > MAX_EDUS {
        return Err(Error::BadJson(format!(
            "a transaction carries at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs"
        )));
    }
    let mut by_room: Vec<(String, Vec<&Value>)> = Vec::new();
    for pdu in pdus {
        let room = pdu["room_id"].as_str().unwrap_or_default().to_owned();
        match by_room.iter_mut().find(|(r, _)| *r == room) {
            Some((_, list)) => list.push(pdu),
            None => by_room.push((room, vec![pdu])),
        }
    }
    let rooms = join_all(by_room.into_iter().map(|(_, list)| async move {
        let mut results = Vec::new();
        for value in list {
            results.push(receive_pdu(services, origin, value).await);
        }
        results
    }))
    .await;
    for edu in body
        .get("edus")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Err(error) = receive_edu(services, origin, edu).await {
            tracing::info!(%origin, %error, "an EDU was refused");
        }
    }
    let mut answers = serde_json::Map::new();
    for (event_id, result) in rooms.into_iter().flatten() {
        let Some(event_id) = event_id else { continue };
        let entry = match result {
            Ok(()) => json!({}),
            Err(error) => json!({ "error": error.to_string() }),
        };
        answers.insert(event_id, entry);
    }
    let answer = json!({ "pdus": answers });
    let mut batch = Batch::new();
    batch.put(tables::FEDERATION_INBOUND, &key, &answer);
    services.storage.commit(batch).await?;
    Ok(answer)
}

/// Typing notices from another server last this long unless renewed.
const REMOTE_TYPING_MS: u64 = 30_000;

/// One EDU of a transaction. Typing notices and read receipts are taken
/// when they speak for a user of the origin who is joined to the room;
/// other kinds are left to the parts that use them.
async fn receive_edu(services: &Services, origin: &ServerName, edu: &Value) -> Result<()> {
    let joined_user = |user: &str, room: &RoomId| -> Result<Option<ruma::OwnedUserId>> {
        let Ok(user) = ruma::UserId::parse(user) else {
            return Ok(None);
        };
        if user.server_name() != origin
            || !acl_allows(services, room, origin)?
            || services.rooms.membership(room, &user)? != "join"
        {
            return Ok(None);
        }
        Ok(Some(user))
    };
    let content = &edu["content"];
    match edu["edu_type"].as_str() {
        Some("m.typing") => {
            let Some(room) = content["room_id"]
                .as_str()
                .and_then(|r| RoomId::parse(r).ok())
            else {
                return Err(Error::BadJson("m.typing without a room".to_owned()));
            };
            let Some(user) = joined_user(content["user_id"].as_str().unwrap_or_default(), &room)?
            else {
                return Err(Error::Forbidden(
                    "m.typing for a user the origin may not speak for".to_owned(),
                ));
            };
            let typing = content["typing"].as_bool().unwrap_or(false);
            services
                .user_data
                .set_typing(&room, &user, typing, REMOTE_TYPING_MS);
        }
        Some("m.receipt") => {
            for (room, types) in content.as_object().into_iter().flatten() {
                let Ok(room) = RoomId::parse(room) else {
                    continue;
                };
                for (user, receipt) in types["m.read"].as_object().into_iter().flatten() {
                    let Some(user) = joined_user(user, &room)? else {
                        continue;
                    };
                    let Some(event_id) = receipt["event_ids"][0].as_str() else {
                        continue;
                    };
                    let in_room = services
                        .rooms
                        .pdu(event_id)?
                        .is_some_and(|(pdu, _)| pdu.room_id == room);
                    if !in_room {
                        continue;
                    }
                    let thread = receipt["data"]["thread_id"].as_str().unwrap_or_default();
                    services
                        .user_data
                        .set_receipt(&room, &user, "m.read", thread, event_id)
                        .await?;
                }
            }
        }
        Some("m.direct_to_device") => {
            let sender = content["sender"]
                .as_str()
                .and_then(|s| ruma::UserId::parse(s).ok())
                .filter(|sender| sender.server_name() == origin)
                .ok_or_else(|| {
                    Error::Forbidden("m.direct_to_device from a user of another server".to_owned())
                })?;
            let (Some(kind), Some(message_id)) =
                (content["type"].as_str(), content["message_id"].as_str())
            else {
                return Err(Error::BadJson(
                    "m.direct_to_device without type or message_id".to_owned(),
                ));
            };
            let own = services.federation.server_name();
            let mut messages = Vec::new();
            for (user, devices) in content["messages"].as_object().into_iter().flatten() {
                let Ok(user) = ruma::UserId::parse(user) else {
                    continue;
                };
                if user.server_name() != own {
                    continue;
                }
                for (device, message) in devices.as_object().into_iter().flatten() {
                    if message.is_object() {
                        messages.push((user.to_string(), device.clone(), message.clone()));
                    }
                }
            }
            let devices_of = |user_id: &str| -> Result<Vec<String>> {
                let user =
                    ruma::UserId::parse(user_id).map_err(|e| Error::Internal(e.to_string()))?;
                Ok(services
                    .accounts
                    .devices(user.localpart())?
                    .into_iter()
                    .map(|d| d.device_id)
                    .collect())
            };
            // The message ID makes a retried EDU a repeat: written once.
            let seen = (
                origin.to_string(),
                String::new(),
                format!("m.direct_to_device {message_id}"),
            );
            services
                .e2ee
                .send_to_device(&sender, kind, messages, devices_of, Some(seen), |_| {})
                .await?;
        }
        Some("m.device_list_update") => {
            super::devices::receive_device_update(services, origin, content).await?;
        }
        Some("m.signing_key_update") => {
            super::devices::receive_signing_key_update(services, origin, content).await?;
        }
        Some("m.presence") => {
            super::devices::receive_presence(services, origin, content).await?;
        }
        _ => {}
    }
    Ok(())
}

/// One PDU of a transaction: its event ID when it could be computed, and
/// what became of it.
async fn receive_pdu(
    services: &Services,
    origin: &ServerName,
    value: &Value,
) -> (Option<String>, Result<()>) {
    let room_id = match value["room_id"].as_str().map(RoomId::parse) {
        Some(Ok(room_id)) => room_id,
        _ => return (None, Err(Error::BadJson("room_id is missing".to_owned()))),
    };
    let rules = match services.rooms.version_of(&room_id) {
        Ok((_, rules)) => rules,
        Err(error) => return (None, Err(error)),
    };
    let pdu = match check_pdu(services, value, &rules).await {
        Ok(pdu) => pdu,
        Err(error) => {
            let id = CanonicalJsonValue::try_from(value.clone())
                .ok()
                .and_then(|v| match v {
                    CanonicalJsonValue::Object(o) => event_id(&o, &rules).ok(),
                    _ => None,
                })
                .map(|id| id.to_string());
            return (id, Err(error));
        }
    };
    let id = pdu.event_id.to_string();
    (Some(id), accept(services, origin, pdu, &rules).await)
}

/// Offers a checked PDU to its room, fetching missing prev events from
/// `origin` first when it names some.
pub async fn accept(
    services: &Services,
    origin: &ServerName,
    pdu: Pdu,
    rules: &RoomVersionRules,
) -> Result<()> {
    for server in [origin, pdu.sender.server_name()] {
        require_acl(services, &pdu.room_id, server)?;
    }
    match services
        .rooms
        .offer_remote(pdu.clone(), Some(origin.as_str()), false)
        .await?
    {
        Offered::Accepted(_) => return Ok(()),
        Offered::MissingPrevEvents(_) => {}
    }
    fetch_missing_events(services, origin, &pdu, rules).await?;
    if let Offered::MissingPrevEvents(missing) = services
        .rooms
        .offer_remote(pdu.clone(), Some(origin.as_str()), false)
        .await?
    {
        // The gap is wider than get_missing_events reaches: take the state
        // at each missing prev event from the origin instead.
        for prev in missing {
            fetch_state_at(services, origin, &pdu.room_id, &prev, rules).await?;
        }
    }
    match services
        .rooms
        .offer_remote(pdu, Some(origin.as_str()), false)
        .await?
    {
        Offered::Accepted(_) => Ok(()),
        Offered::MissingPrevEvents(missing) => Err(Error::NotFound(format!(
            "prev events not found: {}",
            missing
                .iter()
                .map(|id| id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Asks `origin` for the events between the room's forward extremities
/// and `pdu` (`get_missing_events`, bounded) and offers them oldest first.
async fn fetch_missing_events(
    services: &Services,
    origin: &ServerName,
    pdu: &Pdu,
    rules: &RoomVersionRules,
) -> Result<()> {
    let record = services
        .rooms
        .room(&pdu.room_id)?
        .ok_or_else(|| Error::NotFound(format!("unknown room {}", pdu.room_id)))?;
    let body = json!({
        "earliest_events": record.forward_extremities,
        "latest_events": [pdu.event_id],
        "limit": MISSING_EVENTS_LIMIT,
        "min_depth": record.depth.saturating_sub(MISSING_EVENTS_LIMIT),
    });
    let path = format!(
        "/_matrix/federation/v1/get_missing_events/{}",
        urlencode(pdu.room_id.as_str())
    );
    let answer = services
        .federation
        .client
        .send(origin, Method::POST, &path, Some(&body))
        .await?;
    let mut events = Vec::new();
    for value in answer["events"].as_array().into_iter().flatten() {
        match check_pdu(services, value, rules).await {
            Ok(event) if event.room_id == pdu.room_id => events.push(event),
            Ok(_) => {}
            Err(error) => tracing::info!(%error, "a missing event failed its checks"),
        }
    }
    events.sort_by_key(|event| event.depth);
    for event in events {
        if let Offered::MissingPrevEvents(missing) = services
            .rooms
            .offer_remote(event.clone(), Some(origin.as_str()), false)
            .await?
        {
            tracing::info!(event = %event.event_id, ?missing, "a fetched event still lacks prev events");
        }
    }
    Ok(())
}

/// Most events fetched one by one to fill in the state at a prev event.
const MAX_STATE_FETCH: usize = 1_000;
/// Events fetched at once.
const FETCH_CONCURRENCY: usize = 20;

/// Takes the state at a prev event this server lacks from `origin`
/// (`/state_ids`, then `/event` for each event not here), checks every
/// event, and stores the prev event with that state (no timeline entry),
/// so that the events after it can be authorized.
async fn fetch_state_at(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &EventId,
    rules: &RoomVersionRules,
) -> Result<()> {
    let path = format!(
        "/_matrix/federation/v1/state_ids/{}?event_id={}",
        urlencode(room_id.as_str()),
        urlencode(event_id.as_str())
    );
    let answer = services
        .federation
        .client
        .send(origin, Method::GET, &path, None)
        .await?;
    let ids = |field: &str| -> Vec<OwnedEventId> {
        answer[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|id| EventId::parse(id).ok())
            .collect()
    };
    let state_ids = ids("pdu_ids");
    let mut wanted: Vec<OwnedEventId> = Vec::new();
    for id in state_ids
        .iter()
        .chain(ids("auth_chain_ids").iter())
        .chain(std::iter::once(&event_id.to_owned()))
    {
        if !wanted.contains(id) && services.rooms.pdu(id.as_str())?.is_none() {
            wanted.push(id.clone());
        }
    }
    if wanted.len() > MAX_STATE_FETCH {
        return Err(Error::RemoteUnavailable(format!(
            "the state at {event_id} needs {} events, more than {MAX_STATE_FETCH}",
            wanted.len()
        )));
    }
    let mut events: Vec<Pdu> = Vec::new();
    for chunk in wanted.chunks(FETCH_CONCURRENCY) {
        for result in join_all(
            chunk
                .iter()
                .map(|id| fetch_event(services, origin, id, rules)),
        )
        .await
        {
            match result {
                Ok(pdu) if pdu.room_id == room_id => events.push(pdu),
                Ok(_) => {}
                Err(error) => tracing::info!(%error, "an event of the state failed its checks"),
            }
        }
    }
    let find = |id: &EventId| -> Result<Option<Pdu>> {
        if let Some(pdu) = events.iter().find(|pdu| pdu.event_id == id) {
            return Ok(Some(pdu.clone()));
        }
        Ok(services.rooms.pdu(id.as_str())?.map(|(pdu, _)| pdu))
    };
    let mut state = StateIds::new();
    for id in &state_ids {
        if let Some(pdu) = find(id)? {
            if let Some(key) = &pdu.state_key {
                state.insert((pdu.kind.to_string(), key.clone()), id.to_string());
            }
        }
    }
    let prev = find(event_id)?
        .ok_or_else(|| Error::NotFound(format!("{origin} did not give {event_id}")))?;
    events.retain(|pdu| pdu.event_id != event_id);
    services.rooms.store_with_state(prev, state, events).await
}

/// One event from `origin` (`GET /event`), checked.
async fn fetch_event(
    services: &Services,
    origin: &ServerName,
    event_id: &EventId,
    rules: &RoomVersionRules,
) -> Result<Pdu> {
    let path = format!(
        "/_matrix/federation/v1/event/{}",
        urlencode(event_id.as_str())
    );
    let answer = services
        .federation
        .client
        .send(origin, Method::GET, &path, None)
        .await?;
    let value = answer["pdus"]
        .get(0)
        .ok_or_else(|| Error::NotFound(format!("{origin} did not give {event_id}")))?;
    let pdu = check_pdu(services, value, rules).await?;
    if pdu.event_id != event_id {
        return Err(Error::RemoteUnavailable(format!(
            "{origin} answered {event_id} with another event"
        )));
    }
    Ok(pdu)
}

/// Percent-encodes a path segment.
pub fn urlencode(segment: &str) -> String {
    form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
