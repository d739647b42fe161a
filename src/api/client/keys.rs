//! End-to-end encryption keys and to-device messages.
//!
//! - `POST /_matrix/client/v3/keys/upload`
//! - `POST /_matrix/client/v3/keys/query`
//! - `POST /_matrix/client/v3/keys/claim`
//! - `GET /_matrix/client/v3/keys/changes`
//! - `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}`
//! - `POST /_matrix/client/v3/keys/device_signing/upload`
//! - `POST /_matrix/client/v3/keys/signatures/upload`

use std::collections::BTreeSet;

use axum::extract::State;
use axum::Json;
use ruma::{OwnedRoomId, UserId};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::membership::parse_user;
use super::sync::{device_lists, SyncToken};
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, JsonBody, Path, Query};
use crate::api::shared::{local_claim, local_device_keys};
use crate::api::AppState;
use crate::services::e2ee::{SignedKey, CROSS_SIGNING_USAGES};
use crate::services::federation::devices as remote_devices;
use crate::services::uia::{Flows, STAGE_PASSWORD};

/// Most users one query or claim may name.
const MAX_USERS_PER_REQUEST: usize = 1000;

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct UploadBody {
    device_keys: Option<Value>,
    one_time_keys: Map<String, Value>,
    fallback_keys: Map<String, Value>,
}

/// `POST /_matrix/client/v3/keys/upload`
pub async fn upload(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<UploadBody>,
) -> ApiResult<Json<Value>> {
    if authed.device_id.is_empty() {
        // An application service acting without naming a device.
        return Err(MatrixError::missing_param(
            "To upload keys, name the device (org.matrix.msc3202.device_id)",
        ));
    }
    let user = parse_user(&authed.user_id.to_string())?;
    let counts = state
        .e2ee
        .upload(
            &user,
            &authed.device_id,
            body.device_keys,
            body.one_time_keys,
            body.fallback_keys,
        )
        .await?;
    Ok(Json(json!({ "one_time_key_counts": counts })))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct QueryBody {
    device_keys: Map<String, Value>,
    timeout: Option<u64>,
}

/// `POST /_matrix/client/v3/keys/query`: the identity keys of the devices
/// asked for (every device of a user given an empty list), with their
/// display names; other servers' users are asked of their servers.
pub async fn query(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<QueryBody>,
) -> ApiResult<Json<Value>> {
    if body.device_keys.len() > MAX_USERS_PER_REQUEST {
        return Err(MatrixError::invalid_param(format!(
            "at most {MAX_USERS_PER_REQUEST} users per query"
        )));
    }
    let me = parse_user(&authed.user_id.to_string())?;
    let mut device_keys = Map::new();
    let mut failures = Map::new();
    let mut cross_signing: [Map<String, Value>; 3] = Default::default();
    let mut remote: std::collections::BTreeMap<String, Map<String, Value>> = Default::default();
    for (user_id, wanted) in &body.device_keys {
        let user = parse_user(user_id)?;
        let wanted: Vec<String> = serde_json::from_value(wanted.clone())
            .map_err(|_| MatrixError::bad_json("device_keys values must be lists of device IDs"))?;
        if user.server_name().as_str() != state.config.server_name {
            // Kept lists are current while the user shares a room here.
            let shares = remote_devices::shares_room_with_local(&state, &user)?;
            let kept = match shares {
                true => remote_devices::kept_list(&state, &user)?,
                false => None,
            };
            if let Some(list) = kept {
                let devices: Map<String, Value> = list
                    .devices
                    .into_iter()
                    .filter(|(id, keys)| {
                        keys.is_object() && (wanted.is_empty() || wanted.contains(id))
                    })
                    .collect();
                device_keys.insert(user_id.clone(), Value::Object(devices));
                let keys = [list.master_key, list.self_signing_key];
                for (slot, key) in keys.into_iter().enumerate() {
                    if let Some(key) = key {
                        cross_signing[slot].insert(user_id.clone(), key);
                    }
                }
                continue;
            }
            if shares {
                // Kept from now on, so later queries need not ask.
                let (state, user) = (state.clone(), user.clone());
                tokio::spawn(async move {
                    let _ = remote_devices::resync(&state, &user).await;
                });
            }
            remote
                .entry(user.server_name().to_string())
                .or_default()
                .insert(user_id.clone(), json!(wanted));
            continue;
        }
        let devices = local_device_keys(&state, &user, &wanted)?;
        device_keys.insert(user_id.clone(), Value::Object(devices));
        for (slot, usage) in CROSS_SIGNING_USAGES.iter().enumerate() {
            // A user-signing key is shown to its owner only.
            if *usage == "user_signing" && user != me {
                continue;
            }
            if let Some(key) = state.e2ee.cross_signing_key(&user, usage)? {
                cross_signing[slot].insert(user_id.clone(), key);
            }
        }
    }
    let answers = ask_servers(
        &state,
        remote,
        "/_matrix/federation/v1/user/keys/query",
        "device_keys",
        body.timeout,
        &mut failures,
    )
    .await;
    for (server, answer) in answers {
        merge_own(&answer["device_keys"], &server, &mut device_keys);
        merge_own(&answer["master_keys"], &server, &mut cross_signing[0]);
        merge_own(&answer["self_signing_keys"], &server, &mut cross_signing[1]);
    }
    let [mut master_keys, self_signing_keys, user_signing_keys] = cross_signing;
    with_own_signatures(&state, &me, &mut master_keys)?;
    Ok(Json(json!({
        "device_keys": device_keys,
        "master_keys": master_keys,
        "self_signing_keys": self_signing_keys,
        "user_signing_keys": user_signing_keys,
        "failures": failures,
    })))
}

/// Adds to other servers' users' master keys the signatures `me` made of
/// them (kept here, for `me` alone).
fn with_own_signatures(
    state: &AppState,
    me: &UserId,
    master_keys: &mut Map<String, Value>,
) -> ApiResult<()> {
    for (user_id, key) in master_keys.iter_mut() {
        if UserId::parse(user_id)
            .is_ok_and(|user| user.server_name().as_str() == state.config.server_name)
        {
            continue;
        }
        for key_id in cross_signing_key_ids(key) {
            state.e2ee.add_own_signatures(me, user_id, &key_id, key)?;
        }
    }
    Ok(())
}

/// The key IDs of a cross-signing key: its public keys.
fn cross_signing_key_ids(key: &Value) -> Vec<String> {
    key["keys"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(name, _)| name.strip_prefix("ed25519:").map(str::to_owned))
        .collect()
}

/// Copies into `into` the entries of `answer` (by user ID) that belong
/// to `server`: another server answers for its own users only.
fn merge_own(answer: &Value, server: &str, into: &mut Map<String, Value>) {
    for (user, value) in answer.as_object().into_iter().flatten() {
        if UserId::parse(user).is_ok_and(|user| user.server_name().as_str() == server) {
            into.insert(user.clone(), value.clone());
        }
    }
}

/// Asks each server, all at once, for its users in `remote` (server →
/// users, sent as `field`) with a signed POST to `path`, each within the
/// request's timeout (10 s by default, at most 60 s). The answers by
/// server; a server that gives none is added to `failures`.
async fn ask_servers(
    state: &AppState,
    remote: std::collections::BTreeMap<String, Map<String, Value>>,
    path: &str,
    field: &str,
    timeout_ms: Option<u64>,
    failures: &mut Map<String, Value>,
) -> Vec<(String, Value)> {
    let timeout = std::time::Duration::from_millis(timeout_ms.unwrap_or(10_000).min(60_000));
    let asked = remote.into_iter().map(|(server, users)| async move {
        let body = json!({ field: users });
        let answer = match ruma::ServerName::parse(&server) {
            Ok(name) => {
                let request = state.federation.client.send(
                    &name,
                    axum::http::Method::POST,
                    path,
                    Some(&body),
                );
                match tokio::time::timeout(timeout, request).await {
                    Ok(Ok(answer)) => Some(answer),
                    Ok(Err(error)) => {
                        let error: crate::services::error::Error = error.into();
                        tracing::info!(%server, %error, "keys request to another server failed");
                        None
                    }
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        (server, answer)
    });
    let mut answered = Vec::new();
    for (server, answer) in futures_util::future::join_all(asked).await {
        match answer {
            Some(answer) => answered.push((server, answer)),
            None => {
                failures.insert(server, json!({}));
            }
        }
    }
    answered
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DeviceSigningBody {
    master_key: Option<Value>,
    self_signing_key: Option<Value>,
    user_signing_key: Option<Value>,
    auth: Option<Value>,
}

/// `POST /_matrix/client/v3/keys/device_signing/upload`: interactive auth
/// (password) is needed to replace keys, not for the first upload nor for
/// re-uploading the same keys.
pub async fn device_signing_upload(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<DeviceSigningBody>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&authed.user_id.to_string())?;
    let keys: Vec<(String, Value)> = [
        ("master", body.master_key),
        ("self_signing", body.self_signing_key),
        ("user_signing", body.user_signing_key),
    ]
    .into_iter()
    .filter_map(|(usage, key)| Some((usage.to_owned(), key?)))
    .collect();
    if state.e2ee.cross_signing_upload_needs_auth(&user, &keys)? {
        let flows = Flows(vec![vec![STAGE_PASSWORD]]);
        let purpose = format!("device_signing_upload {user}");
        state
            .authorize_interactively(&purpose, &flows, body.auth.as_ref(), Some(&authed))
            .await?;
    }
    state.e2ee.upload_cross_signing(&user, keys).await?;
    Ok(Json(json!({})))
}

/// `POST /_matrix/client/v3/keys/signatures/upload`
pub async fn signatures_upload(
    State(state): State<AppState>,
    Auth(authed): Auth,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let signer = parse_user(&authed.user_id.to_string())?;
    let mut objects = Vec::new();
    let mut remote_objects = Vec::new();
    let mut unknown: std::collections::BTreeMap<String, Map<String, Value>> = Default::default();
    // Each other server's user's kept list, read once.
    let mut lists = std::collections::BTreeMap::new();
    for (user_id, keys) in body {
        let user = parse_user(&user_id)?;
        let Some(keys) = keys.as_object() else {
            return Err(MatrixError::bad_json(
                "each user maps key IDs to signed objects",
            ));
        };
        for (key_id, object) in keys {
            if user.server_name().as_str() == state.config.server_name {
                objects.push(SignedKey {
                    user_id: user_id.clone(),
                    key_id: key_id.clone(),
                    object: object.clone(),
                    remote: None,
                });
            } else {
                remote_objects.push((user.clone(), key_id.clone(), object.clone()));
                if !lists.contains_key(&user) {
                    let list = remote_devices::current_list(&state, &user)?;
                    if list.is_none() {
                        unknown
                            .entry(user.server_name().to_string())
                            .or_default()
                            .insert(user_id.clone(), json!([]));
                    }
                    lists.insert(user.clone(), list);
                }
            }
        }
    }
    // The keys of other servers' users not kept here are asked of their
    // servers.
    let answers = ask_servers(
        &state,
        unknown,
        "/_matrix/federation/v1/user/keys/query",
        "device_keys",
        None,
        &mut Map::new(),
    )
    .await;
    for (user, key_id, object) in remote_objects {
        let key = match lists.get(&user).and_then(Option::as_ref) {
            Some(list) => [&list.master_key, &list.self_signing_key]
                .into_iter()
                .flatten()
                .find(|key| cross_signing_key_ids(key).contains(&key_id))
                .cloned()
                .or_else(|| list.devices.get(&key_id).filter(|k| k.is_object()).cloned()),
            None => answers
                .iter()
                .filter(|(server, _)| server == user.server_name().as_str())
                .find_map(|(_, answer)| {
                    let master = &answer["master_keys"][user.as_str()];
                    let self_signing = &answer["self_signing_keys"][user.as_str()];
                    [master, self_signing]
                        .into_iter()
                        .find(|key| cross_signing_key_ids(key).contains(&key_id))
                        .or_else(|| Some(&answer["device_keys"][user.as_str()][&key_id]))
                        .filter(|key| key.is_object())
                        .cloned()
                }),
        };
        // A key whose server did not answer is an unknown key.
        objects.push(SignedKey {
            user_id: user.to_string(),
            key_id,
            object,
            remote: Some(key),
        });
    }
    let failures = state.e2ee.upload_signatures(&signer, objects).await?;
    let answer = serde_json::to_value(failures)
        .map_err(|e| crate::services::error::Error::Internal(e.to_string()))?;
    Ok(Json(json!({ "failures": answer })))
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ClaimBody {
    one_time_keys: Map<String, Value>,
    timeout: Option<u64>,
}

/// `POST /_matrix/client/v3/keys/claim`
pub async fn claim(
    State(state): State<AppState>,
    Auth(_authed): Auth,
    JsonBody(body): JsonBody<ClaimBody>,
) -> ApiResult<Json<Value>> {
    if body.one_time_keys.len() > MAX_USERS_PER_REQUEST {
        return Err(MatrixError::invalid_param(format!(
            "at most {MAX_USERS_PER_REQUEST} users per claim"
        )));
    }
    let mut claimed = Map::new();
    let mut failures = Map::new();
    let mut remote: std::collections::BTreeMap<String, Map<String, Value>> = Default::default();
    for (user_id, devices) in &body.one_time_keys {
        let user = parse_user(user_id)?;
        let devices: Map<String, Value> = serde_json::from_value(devices.clone())
            .map_err(|_| MatrixError::bad_json("one_time_keys values must be objects"))?;
        if user.server_name().as_str() != state.config.server_name {
            remote
                .entry(user.server_name().to_string())
                .or_default()
                .insert(user_id.clone(), Value::Object(devices));
            continue;
        }
        let keys = local_claim(&state, &user, &devices).await?;
        if !keys.is_empty() {
            claimed.insert(user_id.clone(), Value::Object(keys));
        }
    }
    let answers = ask_servers(
        &state,
        remote,
        "/_matrix/federation/v1/user/keys/claim",
        "one_time_keys",
        body.timeout,
        &mut failures,
    )
    .await;
    for (server, answer) in answers {
        merge_own(&answer["one_time_keys"], &server, &mut claimed);
    }
    Ok(Json(
        json!({ "one_time_keys": claimed, "failures": failures }),
    ))
}

#[derive(Deserialize)]
pub struct ChangesQuery {
    from: String,
    to: String,
}

/// `GET /_matrix/client/v3/keys/changes`: whose devices changed between
/// two sync tokens, and who stopped sharing a room with the user.
pub async fn changes(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(query): Query<ChangesQuery>,
) -> ApiResult<Json<Value>> {
    let user = parse_user(&authed.user_id.to_string())?;
    let from = SyncToken::parse(&query.from)?;
    let to = SyncToken::parse(&query.to)?;
    let changes = state.sync.changes(&user, from.stream, to.stream)?;
    let joined: BTreeSet<OwnedRoomId> = state
        .rooms
        .rooms_of_user(&user, "join")?
        .into_iter()
        .collect();
    let (changed, left) = device_lists(&state, &user, &changes, &joined)?;
    Ok(Json(json!({ "changed": changed, "left": left })))
}

#[derive(Deserialize)]
pub struct SendToDeviceBody {
    messages: Map<String, Value>,
}

/// `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}`: idempotent
/// per device and transaction ID.
pub async fn send_to_device(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((kind, txn_id)): Path<(String, String)>,
    JsonBody(body): JsonBody<SendToDeviceBody>,
) -> ApiResult<Json<Value>> {
    let sender = parse_user(&authed.user_id.to_string())?;
    let mut messages = Vec::new();
    // Messages for other servers' users, by server: one m.direct_to_device
    // EDU each, queued with the local messages.
    let mut remote: std::collections::BTreeMap<String, Map<String, Value>> = Default::default();
    for (user_id, devices) in &body.messages {
        let user = parse_user(user_id)?;
        let Some(devices) = devices.as_object() else {
            return Err(MatrixError::bad_json("messages values must be objects"));
        };
        if user.server_name().as_str() != state.config.server_name {
            if devices.values().any(|content| !content.is_object()) {
                return Err(MatrixError::bad_json("message contents must be objects"));
            }
            remote
                .entry(user.server_name().to_string())
                .or_default()
                .insert(user_id.clone(), Value::Object(devices.clone()));
            continue;
        }
        for (device_id, content) in devices {
            if !content.is_object() {
                return Err(MatrixError::bad_json("message contents must be objects"));
            }
            messages.push((user.to_string(), device_id.clone(), content.clone()));
        }
    }
    let txn = (
        sender.to_string(),
        authed.device_id.clone(),
        format!("sendToDevice {kind} {txn_id}"),
    );
    let devices_of = |user_id: &str| -> crate::services::error::Result<Vec<String>> {
        let user = UserId::parse(user_id)
            .map_err(|e| crate::services::error::Error::Internal(e.to_string()))?;
        Ok(state
            .accounts
            .devices(user.localpart())?
            .into_iter()
            .map(|d| d.device_id)
            .collect())
    };
    // The message ID names the request, so that a retried EDU is
    // recognised by the receiving server.
    let message_id = |destination: &str| {
        use sha2::Digest;
        let digest =
            sha2::Sha256::digest(format!("{}\n{}\n{}\n{destination}", txn.0, txn.1, txn.2));
        digest[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let edus: Vec<(String, Value)> = remote
        .into_iter()
        .map(|(destination, messages)| {
            let edu = json!({
                "edu_type": "m.direct_to_device",
                "content": {
                    "sender": sender,
                    "type": kind,
                    "message_id": message_id(&destination),
                    "messages": messages,
                },
            });
            (destination, edu)
        })
        .collect();
    let destinations: Vec<String> = edus.iter().map(|(d, _)| d.clone()).collect();
    let rooms = &state.rooms;
    let written = state
        .e2ee
        .send_to_device(
            &sender,
            &kind,
            messages,
            devices_of,
            Some(txn.clone()),
            |batch| {
                for (destination, edu) in edus {
                    rooms.queue_edu_into(batch, &destination, edu);
                }
            },
        )
        .await?;
    if written {
        for destination in destinations {
            rooms.outbox.wake(&destination);
        }
    }
    Ok(Json(json!({})))
}
