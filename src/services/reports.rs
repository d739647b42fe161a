//! Reports of events, rooms and users that local users make for the
//! server's admins, kept in the `reports` table (its only writer) and
//! listed oldest first.

use std::sync::Mutex;

use serde_json::{json, Value};

use super::error::Result;
use crate::storage::{tables, Batch, Direction, Key, KeyRange, Storage};

/// Longest reason kept, in characters; a longer one is cut.
const MAX_REASON_CHARS: usize = 1000;

pub struct Reports {
    storage: Storage,
    /// The last report ID handed out.
    last: Mutex<u64>,
}

/// What is reported.
pub enum Reported<'a> {
    Event { room_id: &'a str, event_id: &'a str },
    Room { room_id: &'a str },
    User { user_id: &'a str },
}

impl Reports {
    pub fn new(storage: Storage) -> Result<Self> {
        let everything = KeyRange::prefix(b"");
        let last = storage
            .scan(tables::REPORTS, &everything, Direction::Backward, 1)?
            .first()
            .map_or(0, |(id, _)| *id);
        Ok(Reports {
            storage,
            last: Mutex::new(last),
        })
    }

    /// Keeps a report by `reporter`, received at `now_ms`.
    pub async fn add(
        &self,
        reporter: &str,
        reported: Reported<'_>,
        reason: Option<&str>,
        now_ms: u64,
    ) -> Result<u64> {
        let id = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            *last = (*last + 1).max(now_ms.saturating_mul(1000));
            *last
        };
        let reason: Option<String> = reason.map(|r| r.chars().take(MAX_REASON_CHARS).collect());
        let mut report = json!({
            "id": id,
            "reporter": reporter,
            "reason": reason,
            "received_ts": now_ms,
        });
        match reported {
            Reported::Event { room_id, event_id } => {
                report["kind"] = json!("event");
                report["room_id"] = json!(room_id);
                report["event_id"] = json!(event_id);
            }
            Reported::Room { room_id } => {
                report["kind"] = json!("room");
                report["room_id"] = json!(room_id);
            }
            Reported::User { user_id } => {
                report["kind"] = json!("user");
                report["user_id"] = json!(user_id);
            }
        }
        let mut batch = Batch::new();
        batch.put(tables::REPORTS, &id, &report);
        self.storage.commit(batch).await?;
        Ok(id)
    }

    /// Up to `limit` reports after the report ID `after`, oldest first.
    pub fn list(&self, after: u64, limit: usize) -> Result<Vec<Value>> {
        let range = KeyRange {
            lower: after.saturating_add(1).encode(),
            upper: None,
        };
        Ok(self
            .storage
            .scan(tables::REPORTS, &range, Direction::Forward, limit)?
            .into_iter()
            .map(|(_, report)| report)
            .collect())
    }
}
