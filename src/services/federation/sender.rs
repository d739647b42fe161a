//! The federation sender: one worker per destination server drains that
//! server's durable queue (`federation_outbox`), one transaction at a time.
//!
//! A transaction is written to `federation_txns` before its first attempt,
//! so a retry (after a failure or a restart) sends the same ID and body,
//! and the peer's idempotency makes delivery exactly-once. Its queue items
//! are deleted, with it, in one batch once the peer acknowledged it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::Method;
use myelin_federation::transaction::{
    backoff_ms, next_batch, Queued, Transaction, MAX_EDUS, MAX_PDUS,
};
use ruma::ServerName;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::{Federation, SendError};
use crate::services::error::{Error, Result};
use crate::services::rooms::{federation_text, parse_stored};
use crate::services::Services;
use crate::storage::tables::{self, OutboundTxn, OutboxItem};
use crate::storage::{Batch, Direction, Key, KeyRange};

/// A destination's worker, as the rest of the server sees it.
#[derive(Default)]
pub struct DestinationState {
    /// New items were queued.
    queued: tokio::sync::Notify,
    /// The peer answered or contacted us: stop waiting out a backoff.
    alive: tokio::sync::Notify,
    failures: AtomicU32,
}

/// The workers by destination.
#[derive(Default)]
pub struct Destinations {
    workers: Mutex<HashMap<String, Arc<DestinationState>>>,
}

impl Destinations {
    /// A server we heard from is reachable: its worker retries at once.
    pub fn peer_alive(&self, server: &str) {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = workers.get(server) {
            if state.failures.swap(0, Ordering::SeqCst) > 0 {
                state.alive.notify_one();
            }
        }
    }
}

/// Runs the sender until `stop`: starts a worker for every destination
/// with queued items, then one for each destination woken later.
pub async fn run(services: Arc<Services>, stop: CancellationToken) {
    let Some(mut wakeups) = services.rooms.outbox.take_wakeups() else {
        return;
    };
    match queued_destinations(&services.federation) {
        Ok(destinations) => {
            for destination in destinations {
                wake(&services, &destination, &stop);
            }
        }
        Err(error) => tracing::error!(%error, "cannot read the federation queues"),
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            woken = wakeups.recv() => match woken {
                Some(destination) => wake(&services, &destination, &stop),
                None => return,
            },
        }
    }
}

fn wake(services: &Arc<Services>, destination: &str, stop: &CancellationToken) {
    let destinations = &services.federation.destinations;
    let mut workers = destinations
        .workers
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(state) = workers.get(destination) {
        state.queued.notify_one();
        return;
    }
    let state = Arc::new(DestinationState::default());
    workers.insert(destination.to_owned(), state.clone());
    tokio::spawn(worker(
        services.clone(),
        destination.to_owned(),
        state,
        stop.clone(),
    ));
}

/// Every destination with something queued or in flight.
fn queued_destinations(federation: &Federation) -> Result<Vec<String>> {
    let storage = &federation.storage;
    let mut found: Vec<String> = storage
        .scan(
            tables::FEDERATION_TXNS,
            &KeyRange::prefix(b""),
            Direction::Forward,
            usize::MAX,
        )?
        .into_iter()
        .map(|(destination, _)| destination)
        .collect();
    // One seek per destination: the first queue key past the previous one.
    let mut lower = Vec::new();
    loop {
        let range = KeyRange { lower, upper: None };
        let Some(((destination, _), _)) = storage
            .scan(tables::FEDERATION_OUTBOX, &range, Direction::Forward, 1)?
            .into_iter()
            .next()
        else {
            break;
        };
        lower = (destination.clone(), u64::MAX).encode();
        lower.push(0);
        if !found.contains(&destination) {
            found.push(destination);
        }
    }
    Ok(found)
}

async fn worker(
    services: Arc<Services>,
    destination: String,
    state: Arc<DestinationState>,
    stop: CancellationToken,
) {
    let federation = &services.federation;
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = send_next(federation, &destination) => outcome,
        };
        match outcome {
            Ok(true) => {
                state.failures.store(0, Ordering::SeqCst);
            }
            Ok(false) => {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = state.queued.notified() => {}
                }
            }
            Err(error) => {
                let failures = state.failures.fetch_add(1, Ordering::SeqCst) + 1;
                let config = &federation.config;
                let wait = backoff_ms(failures, config.retry_base_ms, config.retry_max_ms);
                tracing::warn!(
                    %destination, %error, failures, wait_ms = wait,
                    "federation transaction failed; will retry"
                );
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    _ = state.alive.notified() => {}
                }
            }
        }
    }
}

/// Sends the destination's transaction in flight, or makes the next one
/// from its queue. `Ok(false)`: nothing to send.
async fn send_next(federation: &Federation, destination: &str) -> Result<bool> {
    let storage = &federation.storage;
    let Ok(server) = ServerName::parse(destination) else {
        tracing::warn!(%destination, "dropping the queue of an invalid server name");
        drop_queue(federation, destination).await?;
        return Ok(false);
    };
    let txn = match storage.get(tables::FEDERATION_TXNS, &destination.to_owned())? {
        Some(txn) => txn,
        None => match make_transaction(federation, destination)? {
            Some(txn) => {
                let mut batch = Batch::new();
                batch.put(tables::FEDERATION_TXNS, &destination.to_owned(), &txn);
                storage.commit(batch).await?;
                txn
            }
            None => return Ok(false),
        },
    };
    let path = format!("/_matrix/federation/v1/send/{}", txn.txn_id);
    let answer = federation
        .client
        .send(&server, Method::PUT, &path, Some(&txn.body))
        .await;
    match answer {
        Ok(answer) => {
            if let Some(results) = answer["pdus"].as_object() {
                for (event_id, result) in results {
                    if let Some(error) = result.get("error") {
                        tracing::info!(%destination, %event_id, %error, "the peer refused an event");
                    }
                }
            }
        }
        // A refusal that a retry cannot change: the transaction is dropped
        // rather than blocking the queue for ever.
        Err(SendError::Refused { status, body }) if matches!(status, 400 | 403 | 404 | 413) => {
            tracing::warn!(%destination, status, %body, txn = %txn.txn_id, "the peer refused a transaction; dropped");
        }
        Err(error) => return Err(error.into()),
    }
    let mut batch = Batch::new();
    for position in &txn.positions {
        batch.delete(
            tables::FEDERATION_OUTBOX,
            &(destination.to_owned(), *position),
        );
    }
    batch.delete(tables::FEDERATION_TXNS, &destination.to_owned());
    storage.commit(batch).await?;
    Ok(true)
}

/// The next transaction of a destination's queue, `None` when empty.
fn make_transaction(federation: &Federation, destination: &str) -> Result<Option<OutboundTxn>> {
    let storage = &federation.storage;
    let items = storage.scan_prefix(
        tables::FEDERATION_OUTBOX,
        &tables::str_prefix(destination),
        MAX_PDUS + MAX_EDUS,
    )?;
    if items.is_empty() {
        return Ok(None);
    }
    // Each queue position with its item (`None`: an event since purged,
    // nothing to send, but its position goes with the transaction).
    let mut entries: Vec<(u64, Option<Queued<Box<RawValue>>>)> = Vec::new();
    for ((_, position), item) in items {
        let raw = match item {
            OutboxItem::Pdu(event_id) => match storage.get_tiered(tables::PDU_TIERS, &event_id)? {
                Some(stored) => {
                    // Events queued for another server were signed when
                    // built; one that was not is signed here.
                    let pdu = parse_stored(&event_id, &stored)?;
                    let text = federation_text(
                        storage,
                        federation.server_name.as_str(),
                        &federation.key,
                        &pdu,
                    )?;
                    Some(
                        RawValue::from_string(text.into_owned())
                            .map(Queued::Pdu)
                            .map_err(|e| Error::Internal(e.to_string()))?,
                    )
                }
                None => None,
            },
            OutboxItem::Edu(edu) => Some(
                RawValue::from_string(edu.to_string())
                    .map(Queued::Edu)
                    .map_err(|e| Error::Internal(e.to_string()))?,
            ),
        };
        entries.push((position, raw));
    }
    let present: Vec<Queued<Box<RawValue>>> = entries
        .iter()
        .filter_map(|(_, item)| item.clone())
        .collect();
    let taken = next_batch(&present);
    let mut positions = Vec::new();
    let mut counted = 0;
    for (position, item) in &entries {
        if item.is_some() {
            if counted == taken {
                break;
            }
            counted += 1;
        }
        positions.push(*position);
    }
    let queued = &present[..taken];
    let body = Transaction::new(
        federation.server_name.as_str(),
        federation.clock.now_ms(),
        queued,
    );
    let body = serde_json::to_value(&body).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(Some(OutboundTxn {
        txn_id: positions[0].to_string(),
        body,
        positions,
    }))
}

async fn drop_queue(federation: &Federation, destination: &str) -> Result<()> {
    let storage = &federation.storage;
    let items = storage.scan_prefix(
        tables::FEDERATION_OUTBOX,
        &tables::str_prefix(destination),
        100_000,
    )?;
    let mut batch = Batch::new();
    for (key, _) in items {
        batch.delete(tables::FEDERATION_OUTBOX, &key);
    }
    batch.delete(tables::FEDERATION_TXNS, &destination.to_owned());
    storage.commit(batch).await?;
    Ok(())
}
