//! Outgoing transactions: which queued PDUs and EDUs go into the next
//! transaction to a destination, the transaction's body, and how long to
//! wait before retrying a destination that failed.

use serde::Serialize;
use serde_json::value::RawValue;

/// Most PDUs in one transaction (the spec's limit).
pub const MAX_PDUS: usize = 50;
/// Most EDUs in one transaction (the spec's limit).
pub const MAX_EDUS: usize = 100;

/// One item of a destination's queue, in queue order.
#[derive(Clone, Debug, PartialEq)]
pub enum Queued<T> {
    Pdu(T),
    Edu(T),
}

/// The items of the next transaction: the longest prefix of the queue that
/// holds at most [`MAX_PDUS`] PDUs and [`MAX_EDUS`] EDUs, so that items
/// leave in the order they were queued. Returns how many items it took.
pub fn next_batch<T>(queue: &[Queued<T>]) -> usize {
    let (mut pdus, mut edus) = (0, 0);
    for (taken, item) in queue.iter().enumerate() {
        let count = match item {
            Queued::Pdu(_) => &mut pdus,
            Queued::Edu(_) => &mut edus,
        };
        let limit = match item {
            Queued::Pdu(_) => MAX_PDUS,
            Queued::Edu(_) => MAX_EDUS,
        };
        if *count == limit {
            return taken;
        }
        *count += 1;
    }
    queue.len()
}

/// The body of `PUT /_matrix/federation/v1/send/{txnId}`.
#[derive(Debug, Serialize)]
pub struct Transaction<'a> {
    pub origin: &'a str,
    pub origin_server_ts: u64,
    pub pdus: Vec<&'a RawValue>,
    pub edus: Vec<&'a RawValue>,
}

impl<'a> Transaction<'a> {
    /// A transaction of the given queue items.
    pub fn new(origin: &'a str, origin_server_ts: u64, items: &'a [Queued<Box<RawValue>>]) -> Self {
        let mut transaction = Transaction {
            origin,
            origin_server_ts,
            pdus: Vec::new(),
            edus: Vec::new(),
        };
        for item in items {
            match item {
                Queued::Pdu(pdu) => transaction.pdus.push(pdu),
                Queued::Edu(edu) => transaction.edus.push(edu),
            }
        }
        transaction
    }
}

/// Exponential backoff for a destination after `failures` failures in a
/// row: `base_ms * 2^(failures - 1)`, at most `max_ms`; nothing to wait
/// after no failure.
pub fn backoff_ms(failures: u32, base_ms: u64, max_ms: u64) -> u64 {
    if failures == 0 {
        return 0;
    }
    let doublings = (failures - 1).min(63);
    base_ms
        .checked_mul(1u64 << doublings)
        .unwrap_or(max_ms)
        .min(max_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(pdus: usize, edus: usize) -> Vec<Queued<u32>> {
        let mut items: Vec<Queued<u32>> = (0..pdus).map(|_| Queued::Pdu(0)).collect();
        items.extend((0..edus).map(|_| Queued::Edu(0)));
        items
    }

    #[test]
    fn batches_respect_both_limits_and_the_order() {
        assert_eq!(next_batch::<u32>(&[]), 0);
        assert_eq!(next_batch(&queue(10, 10)), 20);
        assert_eq!(next_batch(&queue(120, 0)), MAX_PDUS);
        assert_eq!(next_batch(&queue(0, 150)), MAX_EDUS);
        assert_eq!(next_batch(&queue(50, 5)), 50 + 5);
        // The 51st PDU stops the batch even though EDUs follow it.
        let mut items = queue(51, 0);
        items.push(Queued::Edu(0));
        assert_eq!(next_batch(&items), 50);
    }

    #[test]
    fn the_body_splits_pdus_and_edus() {
        let raw = |text: &str| RawValue::from_string(text.to_owned()).unwrap();
        let items = vec![
            Queued::Pdu(raw(r#"{"a":1}"#)),
            Queued::Edu(raw(r#"{"edu_type":"m.typing"}"#)),
            Queued::Pdu(raw(r#"{"b":2}"#)),
        ];
        let body = serde_json::to_string(&Transaction::new("one.example", 5, &items)).unwrap();
        assert_eq!(
            body,
            r#"{"origin":"one.example","origin_server_ts":5,"pdus":[{"a":1},{"b":2}],"edus":[{"edu_type":"m.typing"}]}"#
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let waits: Vec<u64> = (0..8).map(|n| backoff_ms(n, 1000, 30_000)).collect();
        assert_eq!(waits, [0, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]);
        assert_eq!(backoff_ms(200, 1000, 3_600_000), 3_600_000);
    }
}
