//! The application service sender: one worker per service with a URL
//! drains that service's durable queue (`appservice_queue`), one
//! transaction at a time.
//!
//! A transaction is written to `appservice_txns` before its first
//! attempt, so that a retry (after an error, a time-out or a restart)
//! sends the same ID and body; its ID is one more than the service's
//! last (`appservice_state`), so no two transactions share one. Once the
//! service answered 2xx, its items are deleted with it in one batch. A
//! service that fails or hangs is retried with exponential backoff and
//! holds up only its own queue.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use myelin_appservices::transaction::{next_batch, ItemKind, Transaction};
use myelin_appservices::Registration;
use myelin_federation::transaction::backoff_ms;
use ruma::UserId;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::services::error::Result;
use crate::services::Services;
use crate::storage::tables::{self, AppserviceItem, OutboundTxn};
use crate::storage::{Batch, Direction, Key, KeyRange, Storage};

/// Queue items looked at for one transaction.
const MAX_ITEMS_SCANNED: usize = 1_000;

/// Runs one worker per service with a URL until `stop`; each drains what
/// is already queued, then waits for its wake-ups.
pub async fn run(services: Arc<Services>, stop: CancellationToken) {
    let appservices = &services.appservices;
    let Some(mut wakeups) = appservices.outbox.take_wakeups() else {
        return;
    };
    if let Err(error) = drop_orphaned_queues(&services).await {
        tracing::warn!(%error, "cannot drop the queues of removed application services");
    }
    let mut workers = std::collections::HashMap::new();
    for (index, service) in appservices.registrations.iter().enumerate() {
        if service.url.is_none() {
            continue;
        }
        let queued = Arc::new(Notify::new());
        workers.insert(service.id.clone(), queued.clone());
        tokio::spawn(worker(services.clone(), index, queued, stop.clone()));
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            woken = wakeups.recv() => match woken {
                Some(id) => {
                    if let Some(queued) = workers.get(&id) {
                        queued.notify_one();
                    }
                }
                None => return,
            },
        }
    }
}

async fn worker(
    services: Arc<Services>,
    index: usize,
    queued: Arc<Notify>,
    stop: CancellationToken,
) {
    let Some(service) = services.appservices.registrations.get(index) else {
        return;
    };
    let config = services.appservices.config().clone();
    let mut failures = 0u32;
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = send_next(&services, service) => outcome,
        };
        match outcome {
            Ok(true) => failures = 0,
            Ok(false) => {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = queued.notified() => {}
                }
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let wait = backoff_ms(failures, config.retry_base_ms, config.retry_max_ms);
                tracing::warn!(
                    appservice = %service.id, %error, failures, wait_ms = wait,
                    "application service transaction failed; will retry"
                );
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                }
            }
        }
    }
}

/// Every service ID with queued items: one seek per service.
pub fn queued_services(storage: &Storage) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let mut lower = Vec::new();
    loop {
        let range = KeyRange { lower, upper: None };
        let Some(((id, _), _)) = storage
            .scan(tables::APPSERVICE_QUEUE, &range, Direction::Forward, 1)?
            .into_iter()
            .next()
        else {
            return Ok(found);
        };
        lower = (id.clone(), u64::MAX).encode();
        lower.push(0);
        found.push(id);
    }
}

/// Deletes what is queued for services that are no longer configured, or
/// have no URL now: nothing would ever send it.
async fn drop_orphaned_queues(services: &Services) -> Result<()> {
    let registrations = &services.appservices.registrations;
    for id in queued_services(&services.storage)? {
        if registrations.by_id(&id).is_some_and(|s| s.url.is_some()) {
            continue;
        }
        loop {
            let items = services.storage.scan_prefix(
                tables::APPSERVICE_QUEUE,
                &tables::str_prefix(&id),
                MAX_ITEMS_SCANNED,
            )?;
            if items.is_empty() {
                break;
            }
            let mut batch = Batch::new();
            for (key, _) in items {
                batch.delete(tables::APPSERVICE_QUEUE, &key);
            }
            batch.delete(tables::APPSERVICE_TXNS, &id);
            services.storage.commit(batch).await?;
        }
        tracing::info!(appservice = %id, "dropped the queue of a service without a URL or registration");
    }
    Ok(())
}

/// Sends the service's transaction in flight, or makes the next one from
/// its queue. `Ok(false)`: nothing to send.
async fn send_next(
    services: &Services,
    service: &Registration,
) -> std::result::Result<bool, String> {
    let storage = &services.storage;
    let key = service.id.clone();
    let stored = storage
        .get(tables::APPSERVICE_TXNS, &key)
        .map_err(|e| e.to_string())?;
    let txn = match stored {
        Some(txn) => txn,
        None => match make_transaction(services, service).map_err(|e| e.to_string())? {
            Some(txn) => {
                let mut batch = Batch::new();
                batch.put(tables::APPSERVICE_TXNS, &key, &txn);
                // The transaction's number, never used again.
                let number: u64 = txn.txn_id.parse().unwrap_or(0);
                batch.put(tables::APPSERVICE_STATE, &txn_counter_key(&key), &number);
                storage.commit(batch).await.map_err(|e| e.to_string())?;
                txn
            }
            None => return Ok(false),
        },
    };
    services
        .appservices
        .put_transaction(service, &txn.txn_id, &txn.body)
        .await?;
    let mut batch = Batch::new();
    for position in &txn.positions {
        batch.delete(tables::APPSERVICE_QUEUE, &(key.clone(), *position));
    }
    batch.delete(tables::APPSERVICE_TXNS, &key);
    storage.commit(batch).await.map_err(|e| e.to_string())?;
    Ok(true)
}

/// The next transaction of the service's queue, `None` when it is empty.
fn make_transaction(services: &Services, service: &Registration) -> Result<Option<OutboundTxn>> {
    let items = services.storage.scan_prefix(
        tables::APPSERVICE_QUEUE,
        &tables::str_prefix(&service.id),
        MAX_ITEMS_SCANNED,
    )?;
    let kinds: Vec<ItemKind> = items
        .iter()
        .map(|(_, item)| match item {
            AppserviceItem::Event { .. } => ItemKind::Event,
            AppserviceItem::Ephemeral { .. } => ItemKind::Ephemeral,
            AppserviceItem::ToDevice { .. } => ItemKind::ToDevice,
            AppserviceItem::DeviceList { .. } => ItemKind::DeviceList,
        })
        .collect();
    let taken = next_batch(&kinds);
    if taken == 0 {
        return Ok(None);
    }
    let previous = services
        .storage
        .get(tables::APPSERVICE_STATE, &txn_counter_key(&service.id))?
        .unwrap_or(0);
    let txn_id = (previous + 1).to_string();
    let mut txn = Transaction::default();
    let mut positions = Vec::with_capacity(taken);
    // The service's users whose devices the transaction mentions, for the
    // MSC3202 key counts.
    let mut devices = BTreeSet::new();
    for ((_, position), item) in items.into_iter().take(taken) {
        positions.push(position);
        match item {
            // An event since purged has nothing to send; its position
            // still goes with the transaction.
            AppserviceItem::Event { event_id } => {
                if let Some((pdu, _)) = services.rooms.pdu(&event_id)? {
                    txn.events.push(pdu.client_event());
                }
            }
            AppserviceItem::Ephemeral { event } => txn.ephemeral.push(event),
            AppserviceItem::ToDevice { message } => {
                let user = message["to_user_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let device = message["to_device_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                devices.insert((user, device));
                txn.to_device.push(message);
            }
            AppserviceItem::DeviceList { user_id, left } => txn.device_list(&user_id, left),
        }
    }
    if service.device_extensions {
        add_key_counts(services, service, &devices, &mut txn)?;
    }
    Ok(Some(OutboundTxn {
        txn_id,
        body: txn.body(),
        positions,
    }))
}

/// The `appservice_state` key of a service's last transaction number.
fn txn_counter_key(id: &str) -> String {
    format!("{}{id}", tables::APPSERVICE_TXN_PREFIX)
}

/// MSC3202: the one-time key counts and unused fallback key types of the
/// service's devices that the transaction's to-device messages went to.
fn add_key_counts(
    services: &Services,
    service: &Registration,
    devices: &BTreeSet<(String, String)>,
    txn: &mut Transaction,
) -> Result<()> {
    for (user, device) in devices {
        if !service.is_interested_in_user(user) {
            continue;
        }
        let Ok(user_id) = UserId::parse(user.as_str()) else {
            continue;
        };
        let counts = services.e2ee.one_time_key_counts(&user_id, device)?;
        let fallback = services.e2ee.unused_fallback_key_types(&user_id, device)?;
        txn.one_time_key_counts
            .entry(user.clone())
            .or_default()
            .insert(device.clone(), json!(counts));
        txn.unused_fallback_key_types
            .entry(user.clone())
            .or_default()
            .insert(device.clone(), json!(fallback));
    }
    Ok(())
}
