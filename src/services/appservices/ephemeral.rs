//! The ephemeral follower: follows the stream from a durable position
//! (`appservice_state`) and queues, for the services that asked for them,
//! typing notices, public read receipts and presence (`receive_ephemeral`),
//! to-device messages for their users (MSC2409), and device list changes
//! (MSC3202), in one batch with the new position.
//!
//! Typing notices are not in the stream; the follower looks at the rooms
//! whose notices changed since its last round, so after a restart the
//! notices of before are not pushed again (they have ended by then).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use myelin_appservices::Registration;
use ruma::{RoomId, UserId};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::services::error::Result;
use crate::services::user_data::TypingSerial;
use crate::services::Services;
use crate::storage::tables::{self, AppserviceItem, StreamEntry};
use crate::storage::{Batch, Direction, Key, KeyRange};

/// Most stream entries looked at in one round.
const MAX_ENTRIES: usize = 500;
/// A round runs at least this often, should a wake-up be missed.
const IDLE_ROUND: Duration = Duration::from_secs(5);

/// Runs the follower until `stop`, when some service wants ephemeral
/// data or device lists.
pub async fn run(services: Arc<Services>, stop: CancellationToken) {
    let wanted = services
        .appservices
        .registrations
        .iter()
        .any(|s| s.url.is_some() && (s.receive_ephemeral || s.device_extensions));
    if !wanted {
        return;
    }
    let registration = services.sync.register_every_write();
    let mut typing_seen = services.user_data.typing_serial();
    loop {
        match round(&services, &mut typing_seen).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "queueing ephemeral data for application services failed")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = registration.notified() => {}
            _ = tokio::time::sleep(IDLE_ROUND) => {}
        }
    }
}

/// What one round queues: (service index, item).
type Queued = Vec<(usize, AppserviceItem)>;

/// One round; `true` when more entries are waiting.
async fn round(services: &Services, typing_seen: &mut TypingSerial) -> Result<bool> {
    let upto_key = tables::APPSERVICE_EPHEMERAL_UPTO.to_owned();
    let current = services.sync.current();
    let storage = &services.storage;
    let Some(from) = storage.get(tables::APPSERVICE_STATE, &upto_key)? else {
        let mut batch = Batch::new();
        batch.put(tables::APPSERVICE_STATE, &upto_key, &current);
        storage.commit(batch).await?;
        return Ok(false);
    };
    let mut queued: Queued = Vec::new();
    let typing_now = typing_changes(services, *typing_seen, &mut queued)?;
    let (upto, more) = if from < current {
        let range = KeyRange {
            lower: (from + 1).encode(),
            upper: Some((current + 1).encode()),
        };
        let entries = storage.scan(tables::STREAM, &range, Direction::Forward, MAX_ENTRIES)?;
        let more = entries.len() == MAX_ENTRIES;
        let upto = match entries.last() {
            Some((position, _)) if more => *position,
            _ => current,
        };
        for (position, entry) in entries {
            entry_items(services, position, entry, &mut queued)?;
        }
        (upto, more)
    } else {
        (from, false)
    };
    if queued.is_empty() && upto == from {
        *typing_seen = typing_now;
        return Ok(false);
    }
    let appservices = &services.appservices;
    let mut batch = Batch::new();
    let mut woken = BTreeSet::new();
    for (index, item) in queued {
        let Some(service) = appservices.registrations.get(index) else {
            continue;
        };
        if service.url.is_none() {
            continue;
        }
        let position = appservices.outbox.next_position();
        batch.put(
            tables::APPSERVICE_QUEUE,
            &(service.id.clone(), position),
            &item,
        );
        woken.insert(service.id.clone());
    }
    batch.put(tables::APPSERVICE_STATE, &upto_key, &upto);
    storage.commit(batch).await?;
    // Only now: a failed round looks at the same typing changes again.
    *typing_seen = typing_now;
    for id in woken {
        appservices.outbox.wake(&id);
    }
    Ok(more)
}

/// The items one stream entry means for the services.
fn entry_items(
    services: &Services,
    position: u64,
    entry: StreamEntry,
    queued: &mut Queued,
) -> Result<()> {
    let registrations = &services.appservices.registrations;
    match entry {
        StreamEntry::Receipt {
            room_id,
            user_id,
            receipt_type,
        } if receipt_type == "m.read" => {
            let (Ok(room), Ok(user)) = (RoomId::parse(&room_id), UserId::parse(&user_id)) else {
                return Ok(());
            };
            let interest = services.rooms.appservice_interest(&room)?;
            if !interest
                .iter()
                .any(|&i| wants_ephemeral(registrations.get(i)))
            {
                return Ok(());
            }
            for (thread, receipt) in services
                .user_data
                .receipts_of(&room, &receipt_type, &user)?
            {
                if receipt.stream != position {
                    continue;
                }
                let mut read = json!({ "ts": receipt.ts });
                if !thread.is_empty() {
                    read["thread_id"] = json!(thread);
                }
                let event = json!({
                    "type": "m.receipt",
                    "room_id": room_id,
                    "content": { receipt.event_id: { "m.read": { user_id.clone(): read } } },
                });
                let item = AppserviceItem::Ephemeral { event };
                push_to(
                    services,
                    queued,
                    interest.iter().copied(),
                    wants_ephemeral,
                    item,
                );
            }
        }
        StreamEntry::Presence { user_id } => {
            let Ok(user) = UserId::parse(&user_id) else {
                return Ok(());
            };
            let Some(record) = services.user_data.presence(&user)? else {
                return Ok(());
            };
            let now = services.now_ms();
            let event = json!({
                "type": "m.presence",
                "sender": user_id,
                "content": {
                    "presence": record.presence,
                    "status_msg": record.status_msg,
                    "last_active_ago": now.saturating_sub(record.last_active_ts),
                    "currently_active": record.presence == "online",
                },
            });
            let sharing = services_sharing_rooms_with(services, &user)?;
            let item = AppserviceItem::Ephemeral { event };
            push_to(services, queued, sharing, wants_ephemeral, item);
        }
        StreamEntry::ToDevice { user_id, device_id } => {
            let key = (user_id.clone(), device_id.clone(), position);
            let Some(message) = services.storage.get(tables::TO_DEVICE, &key)? else {
                return Ok(());
            };
            let pushed = json!({
                "type": message.kind,
                "sender": message.sender,
                "content": message.content,
                "to_user_id": user_id,
                "to_device_id": device_id,
            });
            let item = AppserviceItem::ToDevice { message: pushed };
            let wants = |service: Option<&Registration>| {
                service.is_some_and(|s| s.receive_ephemeral && s.is_interested_in_user(&user_id))
            };
            push_to(services, queued, 0..registrations.len(), wants, item);
        }
        StreamEntry::DeviceList { user_id } => {
            let Ok(user) = UserId::parse(&user_id) else {
                return Ok(());
            };
            let sharing = services_sharing_rooms_with(services, &user)?;
            let item = AppserviceItem::DeviceList {
                user_id: user_id.clone(),
                left: false,
            };
            push_to(services, queued, sharing, wants_device_lists, item);
        }
        StreamEntry::Event {
            member: Some(member),
            room_id,
            event_id,
        } => left_items(services, &room_id, &event_id, &member, queued)?,
        _ => {}
    }
    Ok(())
}

/// MSC3202's `left`: a user who left (or was kicked or banned from) a
/// room of a service and shares no other room with it.
fn left_items(
    services: &Services,
    room_id: &str,
    event_id: &str,
    member: &str,
    queued: &mut Queued,
) -> Result<()> {
    let registrations = &services.appservices.registrations;
    if !registrations.iter().any(|s| s.device_extensions) {
        return Ok(());
    }
    let (Ok(room), Ok(user)) = (RoomId::parse(room_id), UserId::parse(member)) else {
        return Ok(());
    };
    let Some((pdu, _)) = services.rooms.pdu(event_id)? else {
        return Ok(());
    };
    let membership = crate::services::rooms::draft::membership_of(&pdu.content_value());
    if membership == "join" || membership == "invite" {
        return Ok(());
    }
    let still_shared = services_sharing_rooms_with(services, &user)?;
    let interest = services.rooms.appservice_interest(&room)?;
    let gone = interest
        .iter()
        .copied()
        .filter(|i| !still_shared.contains(i));
    let item = AppserviceItem::DeviceList {
        user_id: member.to_owned(),
        left: true,
    };
    push_to(services, queued, gone, wants_device_lists, item);
    Ok(())
}

/// The services interested in the user or in a room the user is in.
fn services_sharing_rooms_with(services: &Services, user: &UserId) -> Result<BTreeSet<usize>> {
    let registrations = &services.appservices.registrations;
    let mut found: BTreeSet<usize> = registrations
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_interested_in_user(user.as_str()))
        .map(|(index, _)| index)
        .collect();
    for room in services.rooms.rooms_of_user(user, "join")? {
        found.extend(services.rooms.appservice_interest(&room)?.iter().copied());
        if found.len() == registrations.len() {
            break;
        }
    }
    Ok(found)
}

/// `m.typing` for the rooms whose notices changed since `seen`; the
/// serial they are current at.
fn typing_changes(
    services: &Services,
    seen: TypingSerial,
    queued: &mut Queued,
) -> Result<TypingSerial> {
    let (serial, rooms) = services.user_data.typing_changed_since(seen);
    for (room_id, users) in rooms {
        let Ok(room) = RoomId::parse(&room_id) else {
            continue;
        };
        let event = json!({
            "type": "m.typing",
            "room_id": room_id,
            "content": { "user_ids": users },
        });
        let interest = services.rooms.appservice_interest(&room)?;
        let item = AppserviceItem::Ephemeral { event };
        push_to(
            services,
            queued,
            interest.iter().copied(),
            wants_ephemeral,
            item,
        );
    }
    Ok(serial)
}

/// Queues `item` for each of the services `indices` (into the
/// registrations) that `wants` it.
fn push_to(
    services: &Services,
    queued: &mut Queued,
    indices: impl IntoIterator<Item = usize>,
    wants: impl Fn(Option<&Registration>) -> bool,
    item: AppserviceItem,
) {
    let registrations = &services.appservices.registrations;
    for index in indices {
        if wants(registrations.get(index)) {
            queued.push((index, item.clone()));
        }
    }
}

fn wants_ephemeral(service: Option<&Registration>) -> bool {
    service.is_some_and(|s| s.receive_ephemeral)
}

fn wants_device_lists(service: Option<&Registration>) -> bool {
    service.is_some_and(|s| s.device_extensions)
}
