//! Push notifications: the notifier and the sender.
//!
//! The notifier follows the stream from a durable position (`push_state`):
//! for every new event it judges, for each local member of the room (and
//! an invited user), whether the event notifies them (`notifications`).
//! Those it does are kept for `GET /notifications` and queued for each of
//! the user's pushers (`push_queue`), in one batch with the new position,
//! so a crash loses and repeats nothing.
//!
//! The sender delivers each pusher's queue in order to its push gateway
//! (the push gateway API's `POST /_matrix/push/v1/notify`), one request at
//! a time per pusher and pushers in parallel, so a slow gateway delays
//! only its own pushers. A failed request is retried with exponential
//! backoff; a notification older than `push.give_up_after_ms` is dropped;
//! a pushkey the gateway rejects removes its pusher.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ruma::UserId;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::error::{Error, Result};
use super::notifications::{event_decisions, unread_counts, Judges};
use super::pushers::PusherKey;
use super::Services;
use crate::storage::tables::{
    self, KeyPart, NotificationRecord, PushItem, PusherRecord, StreamEntry,
};
use crate::storage::{prefix_successor, Batch, Direction, Key, KeyRange};

/// Most stream entries looked at in one round.
const MAX_ENTRIES: usize = 500;
/// A round runs at least this often, should a wake-up be missed.
const IDLE_ROUND: Duration = Duration::from_secs(5);

/// The sender's shared state: the pushers being delivered to now.
#[derive(Default)]
pub struct Delivery {
    /// Wakes the sender: the notifier queued something.
    pub wake: tokio::sync::Notify,
    active: Mutex<HashSet<PusherKey>>,
}

/// Runs the notifier until `stop`.
pub async fn run_notifier(services: Arc<Services>, stop: CancellationToken) {
    let registration = services.sync.register_every_write();
    loop {
        match notify_round(&services).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "judging events for notifications failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = registration.notified() => {}
            _ = tokio::time::sleep(IDLE_ROUND) => {}
        }
        // Woken last by a write, the notifier would run first (the
        // scheduler runs the task woken last next): the readers woken by
        // the same write go before the judging of their events. A reader
        // whose answer needs the judgements makes them itself.
        tokio::task::yield_now().await;
    }
}

/// One round: the events after the stored position; `true` when more are
/// waiting.
pub async fn notify_round(services: &Services) -> Result<bool> {
    let upto_key = tables::PUSH_UPTO.to_owned();
    let current = services.sync.current();
    let since_key = tables::PUSH_SINCE.to_owned();
    let Some(from) = services.storage.get(tables::PUSH_STATE, &upto_key)? else {
        // A new database: notifications start now.
        let mut batch = Batch::new();
        batch.put(tables::PUSH_STATE, &upto_key, &current);
        batch.put(tables::PUSH_STATE, &since_key, &current);
        services.storage.commit(batch).await?;
        return Ok(false);
    };
    // Read once: the start position never changes. A database older than
    // it knows none, and what the notifier recorded is then never taken
    // for a judgement.
    if services.sync.notified_since.load(Ordering::Acquire) == u64::MAX {
        if let Some(since) = services.storage.get(tables::PUSH_STATE, &since_key)? {
            services.sync.notified_since.store(since, Ordering::Release);
        }
    }
    services.sync.notified_upto.store(from, Ordering::Release);
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
    let mut batch = Batch::new();
    let mut judges = Judges::default();
    let mut queued = 0;
    let now = services.now_ms();
    for (position, entry) in entries {
        let StreamEntry::Event {
            room_id, event_id, ..
        } = entry
        else {
            continue;
        };
        let Some((pdu, redacted)) = services.rooms.pdu_shared_marked(&event_id)? else {
            continue;
        };
        if redacted {
            continue;
        }
        let decided = event_decisions(services, &pdu, &mut judges)?;
        for (user, judged) in decided.iter() {
            if !judged.notify {
                continue;
            }
            let actions = Value::clone(&judged.actions);
            let localpart = user.localpart().to_owned();
            let record = NotificationRecord {
                room_id: room_id.clone(),
                event_id: event_id.clone(),
                actions: actions.clone(),
                highlight: judged.highlight,
                ts: u64::from(pdu.origin_server_ts.get()),
            };
            batch.put(
                tables::NOTIFICATIONS,
                &(localpart.clone(), position),
                &record,
            );
            for ((_, app_id, pushkey), _) in services.pushers.of_user(&localpart)? {
                let item = PushItem {
                    room_id: room_id.clone(),
                    event_id: event_id.clone(),
                    actions: actions.clone(),
                    queued_ms: now,
                };
                batch.put(
                    tables::PUSH_QUEUE,
                    &(localpart.clone(), app_id, pushkey, position),
                    &item,
                );
                queued += 1;
            }
        }
    }
    batch.put(tables::PUSH_STATE, &upto_key, &upto);
    services.storage.commit(batch).await?;
    services.sync.notified_upto.store(upto, Ordering::Release);
    if queued > 0 {
        services.delivery.wake.notify_one();
    }
    Ok(more)
}

/// Runs the sender until `stop`: starts a worker for each pusher with
/// something queued.
pub async fn run_sender(services: Arc<Services>, stop: CancellationToken) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_millis(
            services.config.push.request_timeout_ms,
        ))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("Myelin/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(http) => http,
        Err(error) => {
            tracing::error!(%error, "no HTTP client for push gateways: push is off");
            return;
        }
    };
    loop {
        if let Err(error) = dispatch(&services, &http, &stop) {
            tracing::warn!(%error, "looking for queued notifications failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = services.delivery.wake.notified() => {}
            _ = tokio::time::sleep(IDLE_ROUND) => {}
        }
    }
}

/// Starts a worker for every pusher with queued notifications and none.
fn dispatch(
    services: &Arc<Services>,
    http: &reqwest::Client,
    stop: &CancellationToken,
) -> Result<()> {
    let mut lower = Vec::new();
    loop {
        let range = KeyRange {
            lower: lower.clone(),
            upper: None,
        };
        let Some(((localpart, app_id, pushkey, _), _)) = services
            .storage
            .scan(tables::PUSH_QUEUE, &range, Direction::Forward, 1)?
            .into_iter()
            .next()
        else {
            return Ok(());
        };
        let key: PusherKey = (localpart, app_id, pushkey);
        let prefix = pusher_prefix(&key);
        lower = match prefix_successor(&prefix) {
            Some(next) => next,
            None => return Ok(()),
        };
        let mut active = services
            .delivery
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if active.insert(key.clone()) {
            tokio::spawn(deliver_all(
                services.clone(),
                http.clone(),
                key,
                stop.clone(),
            ));
        }
    }
}

fn pusher_prefix(key: &PusherKey) -> Vec<u8> {
    let mut prefix = Vec::new();
    key.0.put(&mut prefix);
    key.1.put(&mut prefix);
    key.2.put(&mut prefix);
    prefix
}

/// Delivers a pusher's queue in order until it is empty.
async fn deliver_all(
    services: Arc<Services>,
    http: reqwest::Client,
    key: PusherKey,
    stop: CancellationToken,
) {
    let settings = services.config.push.clone();
    let mut delay = settings.retry_base_ms;
    loop {
        let next = {
            // Under the lock: the dispatcher sees this worker until it
            // has seen the queue empty.
            let mut active = services
                .delivery
                .active
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let next = first_item(&services, &key);
            if matches!(next, Ok(None) | Err(_)) {
                active.remove(&key);
            }
            next
        };
        let (position, item) = match next {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%error, "reading the push queue failed");
                return;
            }
        };
        // Stopping does not wait for a gateway: what was not confirmed is
        // sent again after the restart.
        let outcome = tokio::select! {
            _ = stop.cancelled() => {
                let mut active = services.delivery.active.lock().unwrap_or_else(|e| e.into_inner());
                active.remove(&key);
                return;
            }
            outcome = deliver(&services, &http, &key, position, &item) => outcome,
        };
        let queue_key = (key.0.clone(), key.1.clone(), key.2.clone(), position);
        let done = match outcome {
            Ok(Delivered::Accepted) => true,
            Ok(Delivered::Rejected) => {
                tracing::info!(app_id = %key.1, "the push gateway rejected a pushkey: pusher removed");
                if let Err(error) = services.pushers.remove(&key).await {
                    tracing::warn!(%error, "removing a rejected pusher failed");
                }
                continue;
            }
            Ok(Delivered::NoPusher) => true,
            Err(why) => {
                let age = services.now_ms().saturating_sub(item.queued_ms);
                if age >= settings.give_up_after_ms {
                    tracing::warn!(%why, app_id = %key.1, "a notification was dropped after retrying too long");
                    true
                } else {
                    tracing::debug!(%why, delay, "push gateway failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => {
                            let mut active = services.delivery.active.lock().unwrap_or_else(|e| e.into_inner());
                            active.remove(&key);
                            return;
                        }
                        _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
                    }
                    delay = (delay.saturating_mul(2)).min(settings.retry_max_ms);
                    false
                }
            }
        };
        if done {
            delay = settings.retry_base_ms;
            let mut batch = Batch::new();
            batch.delete(tables::PUSH_QUEUE, &queue_key);
            if let Err(error) = services.storage.commit(batch).await {
                tracing::warn!(%error, "could not mark a notification delivered");
            }
        }
    }
}

fn first_item(services: &Services, key: &PusherKey) -> Result<Option<(u64, PushItem)>> {
    Ok(services
        .storage
        .scan_prefix(tables::PUSH_QUEUE, &pusher_prefix(key), 1)?
        .into_iter()
        .next()
        .map(|((_, _, _, position), item)| (position, item)))
}

enum Delivered {
    Accepted,
    /// The gateway rejected the pushkey.
    Rejected,
    /// The pusher is gone: nothing to send.
    NoPusher,
}

/// One notification to the pusher's gateway.
async fn deliver(
    services: &Services,
    http: &reqwest::Client,
    key: &PusherKey,
    _position: u64,
    item: &PushItem,
) -> std::result::Result<Delivered, String> {
    let pusher = services
        .storage
        .get(tables::PUSHERS, key)
        .map_err(|e| e.to_string())?;
    let Some(pusher) = pusher else {
        return Ok(Delivered::NoPusher);
    };
    let url = pusher.data["url"].as_str().unwrap_or_default().to_owned();
    let parsed = reqwest::Url::parse(&url).map_err(|e| format!("{url}: {e}"))?;
    services
        .pushers
        .check_address(&parsed)
        .await
        .map_err(|why| format!("{url}: {why}"))?;
    let body = notification(services, key, &pusher, item).map_err(|e| e.to_string())?;
    let response = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("{url} answered {status}"));
    }
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    let rejected = answer["rejected"]
        .as_array()
        .is_some_and(|keys| keys.iter().any(|k| k == key.2.as_str()));
    Ok(if rejected {
        Delivered::Rejected
    } else {
        Delivered::Accepted
    })
}

/// The push gateway API's request body for one notification.
fn notification(
    services: &Services,
    key: &PusherKey,
    pusher: &PusherRecord,
    item: &PushItem,
) -> Result<Value> {
    let mut data = pusher.data.clone();
    if let Some(data) = data.as_object_mut() {
        data.remove("url");
    }
    let mut tweaks = serde_json::Map::new();
    for action in item.actions.as_array().into_iter().flatten() {
        if let Some(name) = action.get("set_tweak").and_then(Value::as_str) {
            let value = action.get("value").cloned().unwrap_or(json!(true));
            tweaks.insert(name.to_owned(), value);
        }
    }
    let high = tweaks.contains_key("sound") || tweaks.get("highlight") == Some(&json!(true));
    let device = json!({
        "app_id": key.1,
        "pushkey": key.2,
        "pushkey_ts": pusher.created_ms / 1000,
        "data": data,
        "tweaks": tweaks,
    });
    let user = UserId::parse(format!("@{}:{}", key.0, services.rooms.server_name()))
        .map_err(|e| Error::Internal(e.to_string()))?;
    let mut notification = json!({
        "event_id": item.event_id,
        "room_id": item.room_id,
        "prio": if high { "high" } else { "low" },
        "counts": { "unread": unread_total(services, &user)? },
        "devices": [device],
    });
    let event_id_only = pusher.data["format"] == "event_id_only";
    if !event_id_only {
        if let Some(pdu) = services.rooms.pdu_shared(&item.event_id)? {
            notification["type"] = json!(pdu.kind.to_string());
            notification["sender"] = json!(pdu.sender);
            notification["content"] = pdu.content_value();
            if let Some(state_key) = &pdu.state_key {
                notification["user_is_target"] = json!(state_key == user.as_str());
            }
            let room = &pdu.room_id;
            if let Some(name) = services.rooms.state_event(room, "m.room.name", "")? {
                if let Some(name) = name.content_value()["name"].as_str() {
                    notification["room_name"] = json!(name);
                }
            }
            if let Some(member) =
                services
                    .rooms
                    .state_event(room, "m.room.member", pdu.sender.as_str())?
            {
                if let Some(name) = member.content_value()["displayname"].as_str() {
                    notification["sender_display_name"] = json!(name);
                }
            }
        }
    }
    Ok(json!({ "notification": notification }))
}

/// The user's unread notifications across their rooms (the badge).
fn unread_total(services: &Services, user: &UserId) -> Result<u64> {
    let owned = user.to_owned();
    let current = services.sync.current();
    let mut total = 0;
    for room_id in services.rooms.rooms_of_user(user, "join")? {
        total += unread_counts(services, &owned, &room_id, current)?
            .total()
            .0;
    }
    Ok(total)
}
