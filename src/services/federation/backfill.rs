//! History of a room from before this server joined it, fetched from the
//! servers in the room (`GET /backfill`) when a client pages back past
//! the oldest event here.
//!
//! Backfilled events take timeline positions below the room's oldest one
//! (live positions start at 2^32, see `services::stream`), get no stream
//! position (they are history, not news to any sync) and take the state
//! before the oldest event as theirs.

use std::sync::Arc;

use axum::http::Method;
use ruma::{OwnedEventId, RoomId, ServerName};

use super::inbound::{check_pdu, urlencode};
use crate::events::Pdu;
use crate::services::error::Result;
use crate::services::Services;

/// Fetches up to `limit` events of the room's history from before its
/// oldest event here, from the first server in the room that answers.
/// Returns how many were stored.
pub async fn backfill(services: &Services, room_id: &RoomId, limit: usize) -> Result<usize> {
    let rooms = &services.rooms;
    let Some(record) = rooms.room(room_id)? else {
        return Ok(0);
    };
    let Some((_, oldest)) = rooms.oldest_timeline_event(room_id)? else {
        return Ok(0);
    };
    let missing: Vec<OwnedEventId> = oldest
        .prev_events
        .iter()
        .filter(|id| {
            rooms
                .pdu(id.as_str())
                .ok()
                .flatten()
                .is_none_or(|(_, stored)| stored.outlier)
        })
        .cloned()
        .collect();
    if missing.is_empty() || record.remote_servers.is_empty() {
        return Ok(0);
    }
    let (_, rules) = rooms.version_of(room_id)?;
    let query: String = missing
        .iter()
        .map(|id| format!("v={}", urlencode(id.as_str())))
        .collect::<Vec<_>>()
        .join("&");
    let path = format!(
        "/_matrix/federation/v1/backfill/{}?{query}&limit={}",
        urlencode(room_id.as_str()),
        limit.clamp(1, 100)
    );
    for server in &record.remote_servers {
        let Ok(server) = ServerName::parse(server) else {
            continue;
        };
        let answer = match services
            .federation
            .client
            .send(&server, Method::GET, &path, None)
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                let error: crate::services::error::Error = error.into();
                tracing::info!(%server, %room_id, %error, "backfill failed");
                continue;
            }
        };
        let mut events: Vec<Pdu> = Vec::new();
        for value in answer["pdus"].as_array().into_iter().flatten() {
            match check_pdu(services, value, &rules).await {
                Ok(pdu) if pdu.room_id == room_id => events.push(pdu),
                Ok(_) => {}
                Err(error) => tracing::info!(%error, "a backfilled event failed its checks"),
            }
        }
        let events: Vec<Arc<Pdu>> = events.into_iter().map(Arc::new).collect();
        return rooms.store_backfilled(room_id, events).await;
    }
    Ok(0)
}
