//! Delivery acknowledgements: a device says it has everything up to a
//! stream position, and the senders see it.
//!
//! The position is kept per device (where its next push session resumes),
//! the device's to-device messages up to it are delivered and deleted, and
//! in each room with new events the user gets an `org.myelin.delivered`
//! receipt on the newest event of someone else: the receipts stream
//! carries it to the senders' devices, over `/sync` and over WebSocket.

use ruma::UserId;

use super::error::{Error, Result};
use super::Services;
use crate::storage::tables;
use crate::storage::{Batch, Direction};

/// The receipt type that says a user's device received an event.
pub const DELIVERED_RECEIPT: &str = "org.myelin.delivered";

/// Timeline events looked at, newest first, for the newest one from
/// someone else in a room.
const MAX_LOOK_BACK: usize = 50;

impl Services {
    /// Where the device acknowledged delivery up to, if it ever did.
    pub fn delivered_upto(&self, user: &UserId, device_id: &str) -> Result<Option<u64>> {
        let key = (user.to_string(), device_id.to_owned());
        Ok(self.storage.get(tables::DELIVERY_ACKS, &key)?)
    }

    /// Records that the device has every event up to `position`. A
    /// position at or before the last one acknowledged changes nothing;
    /// one past the stream's current position is refused.
    pub async fn acknowledge_delivery(
        &self,
        user: &UserId,
        device_id: &str,
        position: u64,
    ) -> Result<()> {
        let current = self.sync.current();
        if position > current {
            return Err(Error::InvalidParam(format!(
                "position {position} is past the stream's current position {current}"
            )));
        }
        let before = self.delivered_upto(user, device_id)?.unwrap_or(0);
        if position <= before {
            return Ok(());
        }
        self.mark_rooms_delivered(user, before, position).await?;
        self.e2ee
            .acknowledge_to_device(user, device_id, position)
            .await?;
        let mut batch = Batch::new();
        let key = (user.to_string(), device_id.to_owned());
        batch.put(tables::DELIVERY_ACKS, &key, &position);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Sets the user's delivered receipt, in each joined room with events
    /// in (`after`, `upto`], on the newest event there from someone else.
    async fn mark_rooms_delivered(&self, user: &UserId, after: u64, upto: u64) -> Result<()> {
        let changes = self.sync.changes(user, after, upto)?;
        for room_id in self.rooms.rooms_of_user(user, "join")? {
            if !changes.room_has_events(room_id.as_str()) {
                continue;
            }
            let page = self.rooms.page(
                &room_id,
                upto,
                Some(after),
                Direction::Backward,
                MAX_LOOK_BACK,
            )?;
            let newest = page
                .events
                .iter()
                .zip(&page.positions)
                .find(|(pdu, _)| pdu.sender.as_str() != user.as_str());
            let Some((pdu, position)) = newest else {
                continue;
            };
            let already = self
                .user_data
                .receipt(&room_id, DELIVERED_RECEIPT, user, "")?
                .and_then(|receipt| self.rooms.pdu(&receipt.event_id).ok().flatten())
                .is_some_and(|(_, stored)| stored.stream >= *position);
            if already {
                continue;
            }
            self.user_data
                .set_receipt(&room_id, user, DELIVERED_RECEIPT, "", pdu.event_id.as_str())
                .await?;
        }
        Ok(())
    }
}
