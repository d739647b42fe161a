//! Other servers' users' device lists (`remote_devices`), kept for the
//! users who share a room with a local user, so that `/keys/query` can
//! answer from them and `/sync` reports their changes.
//!
//! An `m.device_list_update` whose `prev_id`s are all at or below the
//! stored `stream_id` follows on from what is known and is applied. One
//! that does not shows a gap (an update that never arrived), and the whole
//! list is fetched again from the user's server (`/user/devices`). Every
//! change is a `DeviceList` stream entry for the user, so the clients of
//! local users who share a room with them re-query the keys.

use axum::http::Method;
use ruma::{ServerName, UserId};
use serde_json::Value;

use super::inbound::urlencode;
use crate::services::error::{Error, Result};
use crate::services::Services;
use crate::storage::tables::{self, RemoteDeviceList, StreamEntry};
use crate::storage::Batch;

/// Most devices kept for one user of another server.
const MAX_DEVICES: usize = 1000;

/// Whether a user of another server is joined to a room a local user is
/// joined to: only then are their device lists and presence kept.
pub fn shares_room_with_local(services: &Services, user: &UserId) -> Result<bool> {
    for room_id in services.rooms.rooms_of_user(user, "join")? {
        if services.rooms.server_in_room(&room_id)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The user an EDU speaks for, who must belong to the server that sent it.
fn user_of_origin(content: &Value, origin: &ServerName) -> Result<ruma::OwnedUserId> {
    let user = content["user_id"]
        .as_str()
        .and_then(|user| UserId::parse(user).ok())
        .ok_or_else(|| Error::BadJson("the EDU names no valid user_id".to_owned()))?;
    if user.server_name() != origin {
        return Err(Error::Forbidden(format!(
            "{origin} may not speak for {user}"
        )));
    }
    Ok(user)
}

/// `keys` are the signed identity keys of `device_id` of `user`.
fn device_keys_of(user: &UserId, device_id: &str, keys: &Value) -> bool {
    keys.is_object() && keys["user_id"] == user.as_str() && keys["device_id"] == device_id
}

/// A cross-signing key object that names `user`.
fn cross_signing_key_of(user: &UserId, key: &Value) -> Option<Value> {
    (key.is_object() && key["user_id"] == user.as_str()).then(|| key.clone())
}

/// Stores `list` and records the change for the clients that share a room.
async fn store(services: &Services, user: &UserId, list: Option<&RemoteDeviceList>) -> Result<()> {
    let mut batch = Batch::new();
    match list {
        Some(list) => batch.put(tables::REMOTE_DEVICES, &user.to_string(), list),
        None => batch.delete(tables::REMOTE_DEVICES, &user.to_string()),
    }
    let entry = StreamEntry::DeviceList {
        user_id: user.to_string(),
    };
    let (_, _reservation) = services.rooms.stream().next_into(&mut batch, &entry);
    services.storage.commit(batch).await?;
    Ok(())
}

/// `m.device_list_update` from `origin`.
pub async fn receive_device_update(
    services: &Services,
    origin: &ServerName,
    content: &Value,
) -> Result<()> {
    let user = user_of_origin(content, origin)?;
    let (Some(device_id), Some(stream_id)) =
        (content["device_id"].as_str(), content["stream_id"].as_u64())
    else {
        return Err(Error::BadJson(
            "m.device_list_update needs device_id and stream_id".to_owned(),
        ));
    };
    let prev_ids: Vec<u64> = match content.get("prev_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_u64).collect(),
        Some(_) => return Err(Error::BadJson("prev_id must be a list".to_owned())),
    };
    let deleted = content["deleted"].as_bool().unwrap_or(false);
    let keys = content.get("keys").filter(|keys| !keys.is_null());
    if keys.is_some_and(|keys| !device_keys_of(&user, device_id, keys)) {
        return Err(Error::BadJson(
            "the keys of the update are not the device's".to_owned(),
        ));
    }
    if !shares_room_with_local(services, &user)? {
        return Ok(());
    }
    let guard = services.federation.device_locks.lock(user.as_str()).await;
    let stored = services
        .storage
        .get(tables::REMOTE_DEVICES, &user.to_string())?;
    match stored {
        Some(list) if stream_id <= list.stream_id => Ok(()),
        Some(mut list) if prev_ids.iter().all(|id| *id <= list.stream_id) => {
            if deleted {
                list.devices.remove(device_id);
            } else {
                if list.devices.len() >= MAX_DEVICES && !list.devices.contains_key(device_id) {
                    return Err(Error::BadJson(format!(
                        "{user} has more than {MAX_DEVICES} devices"
                    )));
                }
                list.devices
                    .insert(device_id.to_owned(), keys.cloned().unwrap_or(Value::Null));
            }
            list.stream_id = stream_id;
            store(services, &user, Some(&list)).await
        }
        // Not known yet, or an update missed: the whole list again.
        _ => {
            drop(guard);
            resync(services, &user).await
        }
    }
}

/// `m.signing_key_update` from `origin`: new cross-signing keys.
pub async fn receive_signing_key_update(
    services: &Services,
    origin: &ServerName,
    content: &Value,
) -> Result<()> {
    let user = user_of_origin(content, origin)?;
    let master_key = content.get("master_key").filter(|key| !key.is_null());
    let self_signing_key = content.get("self_signing_key").filter(|key| !key.is_null());
    let checked = |key: Option<&Value>| -> Result<Option<Value>> {
        key.map(|key| {
            cross_signing_key_of(&user, key).ok_or_else(|| {
                Error::BadJson("a cross-signing key of the update names another user".to_owned())
            })
        })
        .transpose()
    };
    let master_key = checked(master_key)?;
    let self_signing_key = checked(self_signing_key)?;
    if !shares_room_with_local(services, &user)? {
        return Ok(());
    }
    let _guard = services.federation.device_locks.lock(user.as_str()).await;
    let mut list = services
        .storage
        .get(tables::REMOTE_DEVICES, &user.to_string())?;
    if let Some(list) = &mut list {
        if master_key.is_some() {
            list.master_key = master_key;
        }
        if self_signing_key.is_some() {
            list.self_signing_key = self_signing_key;
        }
    }
    // An untracked user's clients re-query, and their server is asked.
    store(services, &user, list.as_ref()).await
}

/// Fetches `user`'s whole device list from their server and keeps it. If
/// the server cannot be asked, the list is forgotten, so that key queries
/// ask the server until the list is known again.
pub async fn resync(services: &Services, user: &UserId) -> Result<()> {
    let _guard = services.federation.device_locks.lock(user.as_str()).await;
    let path = format!(
        "/_matrix/federation/v1/user/devices/{}",
        urlencode(user.as_str())
    );
    let fetched = services
        .federation
        .client
        .send(user.server_name(), Method::GET, &path, None)
        .await
        .map_err(Error::from)
        .and_then(|answer| list_of_answer(user, &answer));
    match fetched {
        Ok(list) => store(services, user, Some(&list)).await,
        Err(error) => {
            tracing::info!(%user, %error, "cannot fetch the device list");
            let known = services
                .storage
                .get(tables::REMOTE_DEVICES, &user.to_string())?
                .is_some();
            if known {
                store(services, user, None).await?;
            }
            Err(error)
        }
    }
}

/// A `/user/devices` answer as a device list, checked to be `user`'s.
fn list_of_answer(user: &UserId, answer: &Value) -> Result<RemoteDeviceList> {
    let refused = |why: &str| Error::RemoteUnavailable(format!("device list of {user}: {why}"));
    if answer["user_id"] != user.as_str() {
        return Err(refused("the answer is about another user"));
    }
    let stream_id = answer["stream_id"]
        .as_u64()
        .ok_or_else(|| refused("no stream_id"))?;
    let devices = answer["devices"]
        .as_array()
        .ok_or_else(|| refused("no devices"))?;
    if devices.len() > MAX_DEVICES {
        return Err(refused("too many devices"));
    }
    let mut list = RemoteDeviceList {
        stream_id,
        master_key: cross_signing_key_of(user, &answer["master_key"]),
        self_signing_key: cross_signing_key_of(user, &answer["self_signing_key"]),
        ..RemoteDeviceList::default()
    };
    for device in devices {
        let Some(device_id) = device["device_id"].as_str() else {
            return Err(refused("a device without device_id"));
        };
        let keys = &device["keys"];
        let keys = if device_keys_of(user, device_id, keys) {
            keys.clone()
        } else {
            Value::Null
        };
        list.devices.insert(device_id.to_owned(), keys);
    }
    Ok(list)
}

/// The kept device list of a user of another server, when it is current:
/// they share a room with a local user, so their server sends updates.
pub fn current_list(services: &Services, user: &UserId) -> Result<Option<RemoteDeviceList>> {
    if !shares_room_with_local(services, user)? {
        return Ok(None);
    }
    kept_list(services, user)
}

/// The kept device list of a user of another server, current or not.
pub fn kept_list(services: &Services, user: &UserId) -> Result<Option<RemoteDeviceList>> {
    Ok(services
        .storage
        .get(tables::REMOTE_DEVICES, &user.to_string())?)
}

/// `m.presence` from `origin`: the presence of its users who share a room
/// with a local user.
pub async fn receive_presence(
    services: &Services,
    origin: &ServerName,
    content: &Value,
) -> Result<()> {
    if !services.config.federation.presence {
        return Ok(());
    }
    let pushes = content["push"]
        .as_array()
        .ok_or_else(|| Error::BadJson("m.presence needs a push list".to_owned()))?;
    for push in pushes {
        let Ok(user) = user_of_origin(push, origin) else {
            continue;
        };
        let Some(presence) = push["presence"].as_str() else {
            continue;
        };
        if !matches!(presence, "online" | "offline" | "unavailable")
            || !shares_room_with_local(services, &user)?
        {
            continue;
        }
        let ago = push["last_active_ago"].as_u64().unwrap_or(0);
        let status_msg = push["status_msg"].as_str().map(str::to_owned);
        services
            .user_data
            .set_presence_at(
                &user,
                presence,
                status_msg,
                services.now_ms().saturating_sub(ago),
            )
            .await?;
    }
    Ok(())
}
