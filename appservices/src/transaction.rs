//! Transactions: what the homeserver pushes to an application service
//! (`PUT /_matrix/app/v1/transactions/{txnId}`) and how much goes in one.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// Most events in one transaction.
pub const MAX_EVENTS: usize = 100;
/// Most ephemeral events (typing, receipts, presence) in one transaction.
pub const MAX_EPHEMERAL: usize = 100;
/// Most to-device messages in one transaction.
pub const MAX_TO_DEVICE: usize = 100;

/// The kind of a queued item, for cutting the queue into transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemKind {
    Event,
    Ephemeral,
    ToDevice,
    /// A device list change (MSC3202); not limited, as it folds into one
    /// set of users.
    DeviceList,
}

/// How many of the queue's leading items go into the next transaction:
/// items in order, stopping before the first that would pass a limit, so
/// the service sees them in the order they were queued.
pub fn next_batch(kinds: &[ItemKind]) -> usize {
    let (mut events, mut ephemeral, mut to_device) = (0, 0, 0);
    for (index, kind) in kinds.iter().enumerate() {
        let (count, limit) = match kind {
            ItemKind::Event => (&mut events, MAX_EVENTS),
            ItemKind::Ephemeral => (&mut ephemeral, MAX_EPHEMERAL),
            ItemKind::ToDevice => (&mut to_device, MAX_TO_DEVICE),
            ItemKind::DeviceList => continue,
        };
        if *count == limit {
            return index;
        }
        *count += 1;
    }
    kinds.len()
}

/// One transaction's content, gathered item by item.
#[derive(Clone, Debug, Default)]
pub struct Transaction {
    /// Events in the client format.
    pub events: Vec<Value>,
    /// `m.typing`, `m.receipt` (each with its `room_id`) and `m.presence`.
    pub ephemeral: Vec<Value>,
    /// To-device messages with `to_user_id` and `to_device_id` (MSC2409).
    pub to_device: Vec<Value>,
    device_lists: BTreeMap<String, bool>,
    /// MSC3202: one-time key counts per user and device.
    pub one_time_key_counts: BTreeMap<String, BTreeMap<String, Value>>,
    /// MSC3202: unused fallback key algorithms per user and device.
    pub unused_fallback_key_types: BTreeMap<String, BTreeMap<String, Value>>,
}

impl Transaction {
    /// A user's devices changed (`left: false`), or the user no longer
    /// shares a room with the service's users (`left: true`); the later
    /// news about one user wins.
    pub fn device_list(&mut self, user_id: &str, left: bool) {
        self.device_lists.insert(user_id.to_owned(), left);
    }

    /// The request body. Ephemeral events go under the stable key and
    /// MSC2409's, which bridges written before Matrix 1.13 read; the
    /// MSC3202 parts appear only when there is something to say.
    pub fn body(&self) -> Value {
        let mut body = Map::new();
        body.insert("events".to_owned(), json!(self.events));
        if !self.ephemeral.is_empty() {
            body.insert("ephemeral".to_owned(), json!(self.ephemeral));
            body.insert(
                "de.sorunome.msc2409.ephemeral".to_owned(),
                json!(self.ephemeral),
            );
        }
        if !self.to_device.is_empty() {
            body.insert(
                "de.sorunome.msc2409.to_device".to_owned(),
                json!(self.to_device),
            );
        }
        if !self.device_lists.is_empty() {
            let pick = |left: bool| -> Vec<&String> {
                self.device_lists
                    .iter()
                    .filter(|(_, l)| **l == left)
                    .map(|(user, _)| user)
                    .collect()
            };
            body.insert(
                "org.matrix.msc3202.device_lists".to_owned(),
                json!({ "changed": pick(false), "left": pick(true) }),
            );
        }
        if !self.one_time_key_counts.is_empty() {
            let counts = json!(self.one_time_key_counts);
            // Synapse wrote both spellings while MSC3202 settled; bridges
            // read one or the other.
            body.insert(
                "org.matrix.msc3202.device_one_time_keys_count".to_owned(),
                counts.clone(),
            );
            body.insert(
                "org.matrix.msc3202.device_one_time_key_counts".to_owned(),
                counts,
            );
        }
        if !self.unused_fallback_key_types.is_empty() {
            body.insert(
                "org.matrix.msc3202.device_unused_fallback_key_types".to_owned(),
                json!(self.unused_fallback_key_types),
            );
        }
        Value::Object(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ItemKind::*;

    #[test]
    fn batches_stop_at_the_first_item_past_a_limit() {
        assert_eq!(next_batch(&[]), 0);
        assert_eq!(next_batch(&[Event, Ephemeral, ToDevice, DeviceList]), 4);
        let mut kinds = vec![Event; MAX_EVENTS];
        kinds.push(Ephemeral);
        kinds.push(Event);
        kinds.push(Ephemeral);
        assert_eq!(next_batch(&kinds), MAX_EVENTS + 1);
        let mut kinds = vec![ToDevice; MAX_TO_DEVICE + 5];
        kinds.insert(0, Event);
        assert_eq!(next_batch(&kinds), MAX_TO_DEVICE + 1);
        let many_lists = vec![DeviceList; 1000];
        assert_eq!(next_batch(&many_lists), 1000);
    }

    #[test]
    fn the_body_names_each_part() {
        let empty = Transaction::default().body();
        assert_eq!(empty, json!({ "events": [] }));
        let mut txn = Transaction::default();
        txn.events.push(json!({ "type": "m.room.message" }));
        txn.ephemeral
            .push(json!({ "type": "m.typing", "room_id": "!r:x" }));
        txn.to_device
            .push(json!({ "type": "m.x", "to_user_id": "@a:x" }));
        txn.device_list("@a:x", false);
        txn.device_list("@b:x", true);
        txn.device_list("@b:x", false);
        txn.device_list("@c:x", true);
        txn.one_time_key_counts
            .entry("@a:x".to_owned())
            .or_default()
            .insert("DEV".to_owned(), json!({ "signed_curve25519": 5 }));
        let body = txn.body();
        assert_eq!(body["events"].as_array().unwrap().len(), 1);
        assert_eq!(body["ephemeral"], body["de.sorunome.msc2409.ephemeral"]);
        assert_eq!(
            body["de.sorunome.msc2409.to_device"][0]["to_user_id"],
            "@a:x"
        );
        assert_eq!(
            body["org.matrix.msc3202.device_lists"],
            json!({ "changed": ["@a:x", "@b:x"], "left": ["@c:x"] })
        );
        assert_eq!(
            body["org.matrix.msc3202.device_one_time_keys_count"]["@a:x"]["DEV"]
                ["signed_curve25519"],
            5
        );
        assert!(body
            .get("org.matrix.msc3202.device_unused_fallback_key_types")
            .is_none());
    }
}
