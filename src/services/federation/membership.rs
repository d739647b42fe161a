//! Memberships across servers: a local user joining or leaving a room
//! through another server (`make_join`/`send_join` v2,
//! `make_leave`/`send_leave` v2), inviting another server's user
//! (`/invite` v2), and the resident side of the same endpoints for
//! other servers' users.

use axum::http::Method;
use futures_util::future::join_all;
use ruma::{OwnedEventId, OwnedServerName, RoomId, RoomVersionId, ServerName, UserId};
use serde_json::{json, Value};

use super::inbound::{check_pdu, require_acl, urlencode};
use super::SendError;
use crate::events::{self, NewEvent, Pdu, SUPPORTED_ROOM_VERSIONS};
use crate::services::error::{Error, Result};
use crate::services::rooms::draft::{membership_of, Accepted};
use crate::services::rooms::remote::Offered;
use crate::services::rooms::Rooms;
use crate::services::Services;

/// A remote server's refusal, as the client sees it.
fn refused(server: &ServerName, error: SendError) -> Error {
    match error {
        SendError::Refused { status, body } => {
            let why = body["error"]
                .as_str()
                .unwrap_or("no reason given")
                .to_owned();
            match (status, body["errcode"].as_str()) {
                (_, Some("M_INCOMPATIBLE_ROOM_VERSION")) => Error::UnsupportedRoomVersion(why),
                (403, _) => Error::Forbidden(format!("{server}: {why}")),
                (404, _) => Error::NotFound(format!("{server}: {why}")),
                _ => Error::RemoteUnavailable(format!("{server} answered {status}: {why}")),
            }
        }
        SendError::Failed(error) => error,
    }
}

fn version_query() -> String {
    SUPPORTED_ROOM_VERSIONS
        .iter()
        .map(|v| format!("ver={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Joins `user` to a room this server is not in, through the first of
/// `servers` that lets them in.
pub async fn join_remote(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
    servers: &[OwnedServerName],
    content: Value,
) -> Result<OwnedEventId> {
    services.rooms.check_not_blocked(room_id, "join")?;
    first_of(services, servers, room_id, "join", |server| {
        join_through(services, server, room_id, user, content.clone())
    })
    .await
}

/// Tries `attempt` through each of `servers` (but this one) in turn, until
/// one succeeds; the last error otherwise.
async fn first_of<'a, F, Fut>(
    services: &Services,
    servers: &'a [OwnedServerName],
    room_id: &RoomId,
    action: &str,
    attempt: F,
) -> Result<OwnedEventId>
where
    F: Fn(&'a ServerName) -> Fut,
    Fut: std::future::Future<Output = Result<OwnedEventId>>,
{
    let mut last = Error::NotFound(format!("No known servers to {action} this room through"));
    for server in servers {
        if server.as_str() == services.federation.server_name().as_str() {
            continue;
        }
        match attempt(server).await {
            Ok(event_id) => return Ok(event_id),
            Err(error) => {
                tracing::info!(%server, %room_id, %error, action, "failed through this server");
                last = error;
            }
        }
    }
    Err(last)
}

/// Fetches a membership template from `server` and signs it filled in.
async fn template(
    services: &Services,
    server: &ServerName,
    kind: &str,
    room_id: &RoomId,
    user: &UserId,
    content: Value,
) -> Result<(RoomVersionId, Pdu)> {
    let mut path = format!(
        "/_matrix/federation/v1/{kind}/{}/{}",
        urlencode(room_id.as_str()),
        urlencode(user.as_str())
    );
    if kind != "make_leave" {
        path = format!("{path}?{}", version_query());
    }
    let answer = services
        .federation
        .client
        .send(server, Method::GET, &path, None)
        .await
        .map_err(|e| refused(server, e))?;
    let version = match answer["room_version"].as_str() {
        Some(version) => RoomVersionId::try_from(version)
            .map_err(|_| Error::UnsupportedRoomVersion(version.to_owned()))?,
        None => RoomVersionId::V1,
    };
    let rules = events::room_version_rules(&version)
        .ok_or_else(|| Error::UnsupportedRoomVersion(version.to_string()))?;
    let mut event = answer["event"].clone();
    let membership = event["content"]["membership"].as_str().unwrap_or_default();
    let expected = match kind {
        "make_join" => "join",
        "make_leave" => "leave",
        _ => "knock",
    };
    if event["type"] != "m.room.member"
        || event["state_key"] != user.as_str()
        || event["sender"] != user.as_str()
        || event["room_id"] != room_id.as_str()
        || membership != expected
    {
        return Err(Error::RemoteUnavailable(format!(
            "{server} answered {kind} with a template for another event"
        )));
    }
    if let (Value::Object(content), Some(template)) = (content, event["content"].as_object_mut()) {
        for (key, value) in content {
            template.entry(key).or_insert(value);
        }
    }
    event["origin_server_ts"] = json!(services.now_ms());
    event["origin"] = json!(services.federation.server_name());
    if let Some(object) = event.as_object_mut() {
        object.remove("signatures");
        object.remove("hashes");
        object.remove("unsigned");
        object.remove("event_id");
    }
    let pdu = services.rooms.sign_template(event, &rules)?;
    Ok((version, pdu))
}

async fn join_through(
    services: &Services,
    server: &ServerName,
    room_id: &RoomId,
    user: &UserId,
    content: Value,
) -> Result<OwnedEventId> {
    let (version, pdu) = template(services, server, "make_join", room_id, user, content).await?;
    let rules = events::room_version_rules(&version)
        .ok_or_else(|| Error::UnsupportedRoomVersion(version.to_string()))?;
    let path = format!(
        "/_matrix/federation/v2/send_join/{}/{}",
        urlencode(room_id.as_str()),
        urlencode(pdu.event_id.as_str())
    );
    let body: Value =
        serde_json::from_str(pdu.json_str()).map_err(|e| Error::Internal(e.to_string()))?;
    let answer = services
        .federation
        .client
        .send(server, Method::PUT, &path, Some(&body))
        .await
        .map_err(|e| refused(server, e))?;
    // A restricted join comes back countersigned by the resident server.
    let join = match answer.get("event") {
        Some(event) if event.is_object() => {
            let signed = check_pdu(services, event, &rules).await?;
            if signed.event_id != pdu.event_id {
                return Err(Error::RemoteUnavailable(format!(
                    "{server} answered send_join with another event"
                )));
            }
            signed
        }
        _ => pdu,
    };
    let check_all = |field: &'static str| {
        let values: Vec<Value> = answer[field].as_array().cloned().unwrap_or_default();
        let rules = rules.clone();
        async move {
            let checked = join_all(values.iter().map(|v| check_pdu(services, v, &rules))).await;
            let mut events = Vec::new();
            for result in checked {
                match result {
                    Ok(pdu) => events.push(pdu),
                    Err(error) => {
                        tracing::warn!(%error, field, "an event of send_join failed its checks")
                    }
                }
            }
            events
        }
    };
    let state = check_all("state").await;
    let auth_chain = check_all("auth_chain").await;
    if !state
        .iter()
        .any(|pdu| pdu.kind.to_string() == "m.room.create")
    {
        return Err(Error::RemoteUnavailable(format!(
            "{server} answered send_join without the room's create event"
        )));
    }
    let event_id = join.event_id.clone();
    services
        .rooms
        .import_joined_room(&version, join, state, auth_chain)
        .await?;
    Ok(event_id)
}

/// Leaves (or rejects an invite to, or retracts a knock on) a room this
/// server is not in, through `server`.
pub async fn leave_remote(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
    server: &ServerName,
    content: Value,
) -> Result<OwnedEventId> {
    let (version, pdu) = template(services, server, "make_leave", room_id, user, content).await?;
    let _ = version;
    let path = format!(
        "/_matrix/federation/v2/send_leave/{}/{}",
        urlencode(room_id.as_str()),
        urlencode(pdu.event_id.as_str())
    );
    let body: Value =
        serde_json::from_str(pdu.json_str()).map_err(|e| Error::Internal(e.to_string()))?;
    services
        .federation
        .client
        .send(server, Method::PUT, &path, Some(&body))
        .await
        .map_err(|e| refused(server, e))?;
    services.rooms.record_outside_membership(&pdu, None).await?;
    Ok(pdu.event_id.clone())
}

/// Knocks on a room this server is not in, through the first of
/// `servers` that takes the knock; the room's stripped state that comes
/// back is what the user's syncs show.
pub async fn knock_remote(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
    servers: &[OwnedServerName],
    content: Value,
) -> Result<OwnedEventId> {
    services.rooms.check_not_blocked(room_id, "knock")?;
    first_of(services, servers, room_id, "knock on", |server| {
        let content = content.clone();
        async move {
            let (_, pdu) = template(services, server, "make_knock", room_id, user, content).await?;
            let path = format!(
                "/_matrix/federation/v1/send_knock/{}/{}",
                urlencode(room_id.as_str()),
                urlencode(pdu.event_id.as_str())
            );
            let body: Value =
                serde_json::from_str(pdu.json_str()).map_err(|e| Error::Internal(e.to_string()))?;
            let answer = services
                .federation
                .client
                .send(server, Method::PUT, &path, Some(&body))
                .await
                .map_err(|e| refused(server, e))?;
            let stripped: Vec<Value> = answer["knock_room_state"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|event| event["type"].is_string())
                .take(50)
                .collect();
            services
                .rooms
                .record_outside_membership(&pdu, Some(stripped))
                .await?;
            Ok(pdu.event_id.clone())
        }
    })
    .await
}

/// Sets aside a pending invite or knock of a room this server is not in
/// when the room's servers cannot be told: a leave event made and signed
/// here after the user's membership event, kept outside the room like
/// the invite was. The room's servers never see it; the user's syncs do.
pub async fn leave_locally(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
    content: Value,
) -> Result<OwnedEventId> {
    let key = (user.to_string(), room_id.to_string());
    let entry = services
        .storage
        .get(crate::storage::tables::USER_ROOMS, &key)?
        .ok_or_else(|| Error::Forbidden(format!("{user} has nothing to leave in {room_id}")))?;
    let (pending, _) = services
        .rooms
        .pdu(&entry.event_id)?
        .ok_or_else(|| Error::NotFound(format!("{} is not stored", entry.event_id)))?;
    let mut content = content;
    content["membership"] = json!("leave");
    let template = json!({
        "room_id": room_id,
        "sender": user,
        "state_key": user,
        "type": "m.room.member",
        "content": content,
        "origin_server_ts": services.now_ms(),
        "depth": pending.depth + 1,
        "prev_events": [pending.event_id],
        "auth_events": [pending.event_id],
    });
    let rules = pending_rules(services, &pending)?;
    let leave = services.rooms.sign_template(template, &rules)?;
    services
        .rooms
        .record_outside_membership(&leave, None)
        .await?;
    Ok(leave.event_id.clone())
}

/// The rules of the room version an event outside a room was made for: the
/// room's own when this server knows it, else the version whose event IDs
/// match the event (every supported version hashes the same way).
fn pending_rules(
    services: &Services,
    pending: &Pdu,
) -> Result<ruma::room_version_rules::RoomVersionRules> {
    if let Ok((_, rules)) = services.rooms.version_of(&pending.room_id) {
        return Ok(rules);
    }
    for version in SUPPORTED_ROOM_VERSIONS.iter().rev() {
        let Some(rules) = events::room_version_rules(version) else {
            continue;
        };
        if myelin_federation::pdu::event_id(pending.json(), &rules)
            .is_ok_and(|id| id == pending.event_id)
        {
            return Ok(rules);
        }
    }
    Err(Error::Internal(
        "the room version of the invite is unknown".to_owned(),
    ))
}

/// Invites another server's user: the invite is built here, signed by the
/// invitee's server through `/invite` v2, then recorded and sent to the
/// room.
pub async fn invite_remote(
    services: &Services,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    content: Value,
) -> Result<OwnedEventId> {
    let mut content = content;
    content["membership"] = json!("invite");
    let new = NewEvent::state("m.room.member", target.as_str(), content);
    let stripped = services.rooms.invite_room_state(room_id, sender)?;
    let server = target.server_name().to_owned();
    services
        .rooms
        .append_countersigned(room_id, sender, new, |pdu, version| async move {
            let rules = events::room_version_rules(&version)
                .ok_or_else(|| Error::UnsupportedRoomVersion(version.to_string()))?;
            let event = pdu_value(&services.rooms, &pdu)?;
            let path = format!(
                "/_matrix/federation/v2/invite/{}/{}",
                urlencode(room_id.as_str()),
                urlencode(pdu.event_id.as_str())
            );
            let body = json!({
                "event": event,
                "room_version": version,
                "invite_room_state": stripped,
            });
            let answer = services
                .federation
                .client
                .send(&server, Method::PUT, &path, Some(&body))
                .await
                .map_err(|e| refused(&server, e))?;
            let signed = check_pdu(services, &answer["event"], &rules).await?;
            let countersigned = signed.json().get("signatures").is_some_and(|s| match s {
                ruma::CanonicalJsonValue::Object(s) => s.contains_key(server.as_str()),
                _ => false,
            });
            if !countersigned {
                return Err(Error::RemoteUnavailable(format!(
                    "{server} did not sign the invite"
                )));
            }
            Ok(signed)
        })
        .await
}

// The resident side.

/// `GET /make_join` and `/make_leave` (`membership` join or leave): a
/// template for another server's user.
pub fn make_membership(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    user: &UserId,
    membership: &str,
    versions: &[String],
) -> Result<Value> {
    if user.server_name() != origin {
        return Err(Error::Forbidden(format!("{origin} cannot act for {user}")));
    }
    if !services.rooms.server_in_room(room_id)? {
        return Err(Error::NotFound(format!("this server is not in {room_id}")));
    }
    require_acl(services, room_id, origin)?;
    let (version, template) = services
        .rooms
        .membership_template(room_id, user, membership)?;
    if membership != "leave" && !versions.iter().any(|v| v == version.as_str()) {
        return Err(Error::IncompatibleRoomVersion(version.to_string()));
    }
    if membership == "join" {
        services.rooms.require_room_for(room_id, user)?;
    }
    Ok(json!({ "room_version": version, "event": template }))
}

/// `PUT /send_join` and `/send_leave` (v2): the signed membership event of
/// another server's user, accepted into the room and sent to its other
/// servers. A join is answered with the room's state before it and the
/// auth chain.
pub async fn send_membership(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &str,
    membership: &str,
    body: &Value,
) -> Result<Value> {
    let (_, rules) = services.rooms.version_of(room_id)?;
    require_acl(services, room_id, origin)?;
    let body = if membership == "join" {
        services.rooms.vouch_for_join(room_id, body, &rules)?
    } else {
        body.clone()
    };
    let pdu = check_pdu(services, &body, &rules).await?;
    if pdu.event_id.as_str() != event_id || pdu.room_id != room_id {
        return Err(Error::BadJson(
            "the event's ID or room is not the one in the path".to_owned(),
        ));
    }
    if pdu.kind.to_string() != "m.room.member"
        || pdu.state_key.as_deref() != Some(pdu.sender.as_str())
        || membership_of(&pdu.content_value()) != membership
    {
        return Err(Error::BadJson(format!(
            "the event must be the sender's own {membership}"
        )));
    }
    if pdu.sender.server_name() != origin {
        return Err(Error::Forbidden(format!(
            "{origin} cannot act for {}",
            pdu.sender
        )));
    }
    if membership == "join" {
        services.rooms.require_room_for(room_id, &pdu.sender)?;
    }
    let state_before = match services
        .rooms
        .offer_remote(pdu.clone(), Some(origin.as_str()), true)
        .await?
    {
        Offered::Accepted(Accepted::SoftFailed) => {
            return Err(Error::Forbidden(
                "the room's current state does not allow this event".to_owned(),
            ))
        }
        Offered::Accepted(_) => services.rooms.state_before(&pdu, &rules)?,
        Offered::MissingPrevEvents(_) => {
            return Err(Error::BadJson(
                "the event's prev events are not known here".to_owned(),
            ))
        }
    };
    if membership == "knock" {
        let stripped = services.rooms.invite_room_state(room_id, &pdu.sender)?;
        return Ok(json!({ "knock_room_state": stripped }));
    }
    if membership != "join" {
        return Ok(json!({}));
    }
    let state_ids =
        state_before.map_err(|_| Error::Internal("state before the join".to_owned()))?;
    let mut state = Vec::new();
    let mut ids = Vec::new();
    for event_id in state_ids.values() {
        if let Some((event, _)) = services.rooms.pdu(event_id)? {
            ids.push(event.event_id.clone());
            state.push(pdu_value(&services.rooms, &event)?);
        }
    }
    ids.extend(pdu.auth_events.iter().cloned());
    let auth_chain = services
        .rooms
        .auth_chain(ids)?
        .iter()
        .map(|event| pdu_value(&services.rooms, event))
        .collect::<Result<Vec<_>>>()?;
    let servers: Vec<String> = services
        .rooms
        .room(room_id)?
        .map(|record| record.remote_servers)
        .unwrap_or_default()
        .into_iter()
        .chain([services.federation.server_name().to_string()])
        .collect();
    Ok(json!({
        "origin": services.federation.server_name(),
        "state": state,
        "auth_chain": auth_chain,
        "event": pdu_value(&services.rooms, &pdu)?,
        "members_omitted": false,
        "servers_in_room": servers,
    }))
}

/// `PUT /invite` (v2): another server invites a local user. The event is
/// checked, signed by this server and kept with the room state that came
/// with it, for the user's syncs.
pub async fn receive_invite(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &str,
    body: &Value,
) -> Result<Value> {
    let version = body["room_version"]
        .as_str()
        .ok_or_else(|| Error::BadJson("room_version is missing".to_owned()))?;
    let version = RoomVersionId::try_from(version)
        .map_err(|_| Error::IncompatibleRoomVersion(version.to_owned()))?;
    let rules = events::room_version_rules(&version)
        .ok_or_else(|| Error::IncompatibleRoomVersion(version.to_string()))?;
    let pdu = check_pdu(services, &body["event"], &rules).await?;
    if pdu.event_id.as_str() != event_id || pdu.room_id != room_id {
        return Err(Error::BadJson(
            "the event's ID or room is not the one in the path".to_owned(),
        ));
    }
    if pdu.kind.to_string() != "m.room.member" || membership_of(&pdu.content_value()) != "invite" {
        return Err(Error::BadJson("the event is not an invite".to_owned()));
    }
    services.rooms.check_not_blocked(room_id, "invite")?;
    if pdu.sender.server_name() != origin {
        return Err(Error::Forbidden(format!(
            "{origin} cannot act for {}",
            pdu.sender
        )));
    }
    let target = pdu
        .state_key
        .as_deref()
        .and_then(|key| UserId::parse(key).ok())
        .ok_or_else(|| Error::BadJson("the invite has no valid target".to_owned()))?;
    if target.server_name() != services.federation.server_name() {
        return Err(Error::BadJson(format!(
            "{target} is not a user of this server"
        )));
    }
    // A bridge's user that does not exist yet is asked about first.
    services.ensure_appservice_user(target.as_str()).await?;
    if services.accounts.user(target.localpart())?.is_none() {
        return Err(Error::NotFound(format!("unknown user {target}")));
    }
    let signed = services.rooms.countersign(&pdu, &rules)?;
    let stripped: Vec<Value> = body["invite_room_state"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|event| event["type"].is_string())
        .take(50)
        .collect();
    // In a room this server is part of, the invite arrives with the room's
    // events too; outside, it is kept on its own.
    if !services.rooms.server_in_room(room_id)? {
        services
            .rooms
            .record_outside_membership(&signed, Some(stripped))
            .await?;
    }
    Ok(json!({ "event": pdu_value(&services.rooms, &signed)? }))
}

/// A PDU as other servers receive it: signed, if it is this server's
/// event and was not signed yet (see [`Rooms::federation_text`]).
pub fn pdu_value(rooms: &Rooms, pdu: &Pdu) -> Result<Value> {
    let text = rooms.federation_text(pdu)?;
    serde_json::from_str(&text).map_err(|e| Error::Internal(e.to_string()))
}

/// The server part of the sender of the invite (or knock answer) a user
/// holds for a room this server is not in.
pub fn inviting_server(
    services: &Services,
    room_id: &RoomId,
    user: &UserId,
) -> Result<Option<OwnedServerName>> {
    let key = (user.to_string(), room_id.to_string());
    let Some(entry) = services
        .storage
        .get(crate::storage::tables::USER_ROOMS, &key)?
    else {
        return Ok(None);
    };
    Ok(services
        .rooms
        .pdu(&entry.event_id)?
        .map(|(pdu, _)| pdu.sender.server_name().to_owned()))
}
