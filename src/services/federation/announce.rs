//! The announcer: tells the servers that share a room with a local user of
//! that user's device changes (`m.device_list_update`), new cross-signing
//! keys (`m.signing_key_update`) and presence (`m.presence`).
//!
//! It follows the stream from a durable position (`device_announcements`,
//! key `upto`): every change of a local user's devices or keys and every
//! presence change is a stream entry, so nothing is missed across a crash.
//! A user's devices are compared with what was announced before, one
//! update per changed device, their `stream_id`s chained through
//! `prev_id`; the updates and the new position are written in one batch
//! with the outbox items that carry them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ruma::UserId;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::services::error::{Error, Result};
use crate::services::Services;
use crate::storage::tables::{self, Announced, StreamEntry};
use crate::storage::{Batch, Direction, Key, KeyRange};

/// Most stream entries looked at in one round.
const MAX_ENTRIES: usize = 1000;

/// A round runs at least this often, should a wake-up be missed.
const IDLE_ROUND: Duration = Duration::from_secs(5);

/// Runs until `stop`: a round after each device or presence change.
pub async fn run(services: Arc<Services>, stop: CancellationToken) {
    let registration = services.sync.register_everyone();
    loop {
        match announce(&services).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "announcing device changes failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = registration.notified() => {}
            _ = tokio::time::sleep(IDLE_ROUND) => {}
        }
    }
}

/// One round: announces the changes after the stored position; `true`
/// when more are waiting.
pub async fn announce(services: &Services) -> Result<bool> {
    let upto_key = tables::ANNOUNCED_UPTO.to_owned();
    let current = services.sync.current();
    let Some(from) = services
        .storage
        .get(tables::ANNOUNCED_POSITION, &upto_key)?
    else {
        // A new database: nothing before now was ever announced, and the
        // servers that share rooms ask for whole lists when they need them.
        let mut batch = Batch::new();
        batch.put(tables::ANNOUNCED_POSITION, &upto_key, &current);
        services.storage.commit(batch).await?;
        return Ok(false);
    };
    if from >= current {
        return Ok(false);
    }
    let range = KeyRange {
        lower: (from + 1).encode(),
        upper: Some((current + 1).encode()),
    };
    let entries = services
        .storage
        .scan(tables::STREAM, &range, Direction::Forward, MAX_ENTRIES)?;
    let more = entries.len() == MAX_ENTRIES;
    let upto = match entries.last() {
        Some((position, _)) if more => *position,
        _ => current,
    };
    let own = services.federation.server_name().as_str();
    let local = |user_id: &str| UserId::parse(user_id).is_ok_and(|u| u.server_name() == own);
    let mut device_users = BTreeSet::new();
    let mut presence_users = BTreeSet::new();
    for (_, entry) in entries {
        match entry {
            StreamEntry::DeviceList { user_id } if local(&user_id) => {
                device_users.insert(user_id);
            }
            StreamEntry::Presence { user_id } if local(&user_id) => {
                presence_users.insert(user_id);
            }
            _ => {}
        }
    }
    let mut batch = Batch::new();
    let mut queued: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for user_id in &device_users {
        let user = UserId::parse(user_id).map_err(|e| Error::Internal(e.to_string()))?;
        let edus = device_edus(services, &mut batch, &user)?;
        if edus.is_empty() {
            continue;
        }
        for destination in servers_sharing_rooms(services, &user)? {
            queued
                .entry(destination)
                .or_default()
                .extend(edus.iter().cloned());
        }
    }
    if services.config.federation.presence {
        let mut pushes: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for user_id in &presence_users {
            let user = UserId::parse(user_id).map_err(|e| Error::Internal(e.to_string()))?;
            let Some(record) = services.user_data.presence(&user)? else {
                continue;
            };
            let mut push = json!({
                "user_id": user_id,
                "presence": record.presence,
                "last_active_ago": services.now_ms().saturating_sub(record.last_active_ts),
                "currently_active": record.presence == "online",
            });
            if let Some(status) = record.status_msg {
                push["status_msg"] = json!(status);
            }
            for destination in servers_sharing_rooms(services, &user)? {
                pushes.entry(destination).or_default().push(push.clone());
            }
        }
        for (destination, push) in pushes {
            queued.entry(destination).or_default().push(json!({
                "edu_type": "m.presence",
                "content": { "push": push },
            }));
        }
    }
    for (destination, edus) in &queued {
        for edu in edus {
            services
                .rooms
                .queue_edu_into(&mut batch, destination, edu.clone());
        }
    }
    batch.put(tables::ANNOUNCED_POSITION, &upto_key, &upto);
    services.storage.commit(batch).await?;
    for destination in queued.keys() {
        services.rooms.outbox.wake(destination);
    }
    Ok(more)
}

/// The updates that tell of what changed in `user`'s devices and
/// cross-signing keys since the last announcement, recorded in `batch` as
/// announced.
fn device_edus(services: &Services, batch: &mut Batch, user: &UserId) -> Result<Vec<Value>> {
    let mut announced = services
        .storage
        .get(tables::DEVICE_ANNOUNCEMENTS, &user.to_string())?
        .unwrap_or_default();
    let devices = current_devices(services, user)?;
    let mut edus = Vec::new();
    let names: BTreeSet<&String> = announced.devices.keys().chain(devices.keys()).collect();
    for device_id in names {
        let now = devices.get(device_id);
        if announced.devices.get(device_id) == now {
            continue;
        }
        let prev_id: Vec<u64> = (announced.stream_id > 0)
            .then_some(announced.stream_id)
            .into_iter()
            .collect();
        announced.stream_id += 1;
        let mut content = json!({
            "user_id": user,
            "device_id": device_id,
            "stream_id": announced.stream_id,
            "prev_id": prev_id,
            "deleted": now.is_none(),
        });
        if let Some(now) = now {
            if now["keys"].is_object() {
                content["keys"] = now["keys"].clone();
            }
            if let Some(name) = now["display_name"].as_str() {
                content["device_display_name"] = json!(name);
            }
        }
        edus.push(json!({ "edu_type": "m.device_list_update", "content": content }));
    }
    announced.devices = devices;
    let master_key = services.e2ee.cross_signing_key(user, "master")?;
    let self_signing_key = services.e2ee.cross_signing_key(user, "self_signing")?;
    if master_key != announced.master_key || self_signing_key != announced.self_signing_key {
        let mut content = json!({ "user_id": user });
        if let Some(key) = &master_key {
            content["master_key"] = key.clone();
        }
        if let Some(key) = &self_signing_key {
            content["self_signing_key"] = key.clone();
        }
        edus.push(json!({ "edu_type": "m.signing_key_update", "content": content }));
        announced.master_key = master_key;
        announced.self_signing_key = self_signing_key;
    }
    if !edus.is_empty() {
        batch.put(tables::DEVICE_ANNOUNCEMENTS, &user.to_string(), &announced);
    }
    Ok(edus)
}

/// A local user's devices as they are now: device ID →
/// `{"keys", "display_name"}`.
fn current_devices(services: &Services, user: &UserId) -> Result<BTreeMap<String, Value>> {
    let mut devices = BTreeMap::new();
    for device in services.accounts.devices(user.localpart())? {
        let keys = services.e2ee.device_keys(user, &device.device_id)?;
        devices.insert(
            device.device_id.clone(),
            json!({ "keys": keys, "display_name": device.record.display_name }),
        );
    }
    Ok(devices)
}

/// The `stream_id` other servers were last told for a local user (0
/// before any announcement), as `/user/devices` answers it.
pub fn announced_stream_id(services: &Services, user: &UserId) -> Result<u64> {
    Ok(services
        .storage
        .get(tables::DEVICE_ANNOUNCEMENTS, &user.to_string())?
        .map_or(0, |announced: Announced| announced.stream_id))
}

/// The other servers with a member joined to one of the user's rooms.
pub fn servers_sharing_rooms(services: &Services, user: &UserId) -> Result<BTreeSet<String>> {
    let mut servers = BTreeSet::new();
    for room_id in services.rooms.rooms_of_user(user, "join")? {
        if let Some(record) = services.rooms.room(&room_id)? {
            servers.extend(record.remote_servers);
        }
    }
    Ok(servers)
}
