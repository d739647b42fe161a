//! The archive tier: events older than `archive.after_days` move from the
//! hot tables to their archived twins (`docs/storage.md`), stored for size
//! rather than speed, and every read looks in both (`Tiered`).
//!
//! The mover walks the hot events in passes, one batch at a time. A batch
//! moves each old event with what only it uses (its relation row, and for
//! a state event its state group when that is older than the room's latest
//! snapshot) and records the mover's place, in one atomic change that
//! commits only if every row moved still holds what was read
//! ([`Storage::commit_checked`]): a crash loses and repeats nothing, and a
//! redaction racing the mover wins. Events still in use stay hot: a room's
//! current state, and events edited, redacted, replied or reacted to
//! within the same window (`touched`).
//!
//! With `retention.enabled`, the same passes delete the non-state events
//! past their lifetime (their room's `m.room.retention` `max_lifetime`, in
//! milliseconds, capped by `retention.max_lifetime_days`) from either
//! tier, with their timeline entry, their relation and thread summary
//! entries, and their marks of use, instead of archiving them: no
//! endpoint finds them after. An event that is still one of its room's
//! forward extremities is redacted instead (its room version's rules),
//! and deleted once a later event follows it, so that the room's graph
//! stays whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::clock::Clock;
use super::error::{Error, Result};
use super::rooms::draft::forget_relations;
use super::rooms::parse_stored;
use crate::config::{ArchiveConfig, RetentionConfig};
use crate::events::Pdu;
use crate::storage::tables::{self, RoomRecord, StoredPdu};
use crate::storage::{Batch, Cf, Direction, Key, KeyRange, Storage, TableSize};

const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// The key of the mover's place in the pass under way.
const CURSOR: &str = "cursor";
/// The key of the number of passes finished.
const PASSES: &str = "passes";
/// The key of the expiry walk's place in the archived events.
const EXPIRY_CURSOR: &str = "expiry_cursor";
/// Tries of a batch whose rows changed under it before the pass gives up
/// until the next one.
const TRIES: usize = 3;

/// What one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Hot events looked at.
    pub looked_at: usize,
    /// Events moved to the archive.
    pub archived: usize,
    /// Events deleted past their lifetime.
    pub expired: usize,
    /// Whether the pass reached the last hot event.
    pub finished: bool,
}

/// The archive tier's mover and its figures.
#[derive(Clone)]
pub struct Archiver {
    storage: Storage,
    clock: Arc<dyn Clock>,
    config: ArchiveConfig,
    retention: RetentionConfig,
}

/// Which table a walk goes through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// The hot events: archive the old ones, delete the expired ones.
    Hot,
    /// The archived events: delete the expired ones.
    Archived,
}

impl Archiver {
    pub fn new(
        storage: Storage,
        clock: Arc<dyn Clock>,
        config: ArchiveConfig,
        retention: RetentionConfig,
    ) -> Self {
        Archiver {
            storage,
            clock,
            config,
            retention,
        }
    }

    /// Events whose `origin_server_ts` is before this are old enough.
    fn cutoff(&self) -> u64 {
        self.clock
            .now_ms()
            .saturating_sub(self.config.after_days.saturating_mul(DAY_MS))
    }

    /// Runs passes until `stop`: one at start-up, then every
    /// `interval_minutes`, each batch followed by `pause_ms`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let interval = Duration::from_secs(self.config.interval_minutes.saturating_mul(60));
        loop {
            let started = std::time::Instant::now();
            match self.pass(Some(&stop)).await {
                Ok(moved) if moved > 0 => tracing::info!(
                    moved,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "archive pass finished"
                ),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "archive pass failed"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Goes on with the pass under way (or starts one) until it finishes
    /// or `stop`; the number of events moved.
    pub async fn pass(&self, stop: Option<&CancellationToken>) -> Result<u64> {
        let pause = Duration::from_millis(self.config.pause_ms);
        let mut moved = 0;
        let mut walk = Walk::Hot;
        loop {
            let report = self.batch(walk).await?;
            moved += report.archived as u64;
            if report.expired > 0 {
                tracing::info!(
                    expired = report.expired,
                    "events past their lifetime deleted"
                );
            }
            if report.finished {
                if walk == Walk::Hot && self.retention.enabled {
                    walk = Walk::Archived;
                    continue;
                }
                self.forget_old_touches().await?;
                return Ok(moved);
            }
            if let Some(stop) = stop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(moved),
                    _ = tokio::time::sleep(pause) => {}
                }
            } else if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// One batch: the next `batch_size` hot events after the mover's place.
    async fn batch(&self, walk: Walk) -> Result<BatchReport> {
        for _ in 0..TRIES {
            if let Some(report) = self.try_batch(walk).await? {
                return Ok(report);
            }
        }
        Err(Error::Internal(
            "events kept changing under the archive mover".to_owned(),
        ))
    }

    /// One batch, or `None` when a row changed between its read and the
    /// commit (nothing was written then). The reads and the choices run
    /// on a blocking thread, off the runtime that serves requests.
    async fn try_batch(&self, walk: Walk) -> Result<Option<BatchReport>> {
        let this = self.clone();
        let (batch, report) = tokio::task::spawn_blocking(move || this.prepare_batch(walk))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        Ok(self.storage.commit_checked(batch).await?.then_some(report))
    }

    /// Reads the next `batch_size` hot events after the mover's place and
    /// makes the batch that moves the old ones and records the new place.
    fn prepare_batch(&self, walk: Walk) -> Result<(Batch, BatchReport)> {
        let (table, cursor_key) = match walk {
            Walk::Hot => (tables::PDUS, CURSOR),
            Walk::Archived => (tables::ARCHIVED_PDUS, EXPIRY_CURSOR),
        };
        let cursor: Option<String> = self
            .storage
            .get(tables::ARCHIVE_STATE, &cursor_key.to_owned())?
            .and_then(|v| v.as_str().map(str::to_owned));
        let range = match &cursor {
            Some(cursor) => KeyRange::after(&cursor.encode()),
            None => KeyRange::prefix(b""),
        };
        let limit = self.config.batch_size;
        let rows = self
            .storage
            .scan(table, &range, Direction::Forward, limit)?;
        let finished = rows.len() < limit;
        let cutoff = self.cutoff();
        let mut batch = Batch::new();
        let mut rooms = RoomFacts::default();
        let mut expiring: Vec<(Pdu, u64)> = Vec::new();
        let mut report = BatchReport {
            looked_at: rows.len(),
            finished,
            ..BatchReport::default()
        };
        for (event_id, stored) in &rows {
            let pdu = match parse_stored(event_id, stored) {
                Ok(pdu) => pdu,
                Err(error) => {
                    tracing::warn!(%event_id, %error, "unreadable event left where it is");
                    continue;
                }
            };
            match self.expiry(&mut rooms, event_id, stored, &pdu)? {
                Expiry::Delete => {
                    self.expire(&mut batch, table, event_id, stored, &pdu);
                    expiring.push((pdu, stored.stream));
                    report.expired += 1;
                    continue;
                }
                Expiry::Redact(redacted) => {
                    batch.expect(table, event_id, stored.clone());
                    let mut kept = stored.clone();
                    kept.json = redacted;
                    batch.put(table, event_id, &kept);
                    expiring.push((pdu, stored.stream));
                    report.expired += 1;
                    continue;
                }
                Expiry::Keep => {}
            }
            if walk == Walk::Archived
                || !self.config.enabled
                || self.stays_hot(event_id, stored, &pdu, cutoff)?
            {
                continue;
            }
            self.move_event(&mut batch, &mut rooms, event_id, stored, &pdu)?;
            report.archived += 1;
        }
        let forgotten: Vec<(&Pdu, u64)> = expiring.iter().map(|(pdu, s)| (pdu, *s)).collect();
        forget_relations(&self.storage, &mut batch, &forgotten)?;
        for (pdu, _) in &expiring {
            // A thread root takes its thread's summary with it.
            let key = (pdu.room_id.to_string(), pdu.event_id.to_string());
            if let Some(thread) = self.storage.get(tables::THREADS, &key)? {
                batch.delete(tables::THREADS, &key);
                batch.delete(
                    tables::THREAD_ACTIVITY,
                    &(key.0.clone(), thread.latest_stream),
                );
            }
        }
        match rows.last() {
            Some((last, _)) if !finished => {
                batch.put(tables::ARCHIVE_STATE, &cursor_key.to_owned(), &json!(last))
            }
            _ => {
                batch.delete(tables::ARCHIVE_STATE, &cursor_key.to_owned());
                if walk == Walk::Hot {
                    let passes = self.passes()? + 1;
                    batch.put(tables::ARCHIVE_STATE, &PASSES.to_owned(), &json!(passes));
                }
            }
        }
        Ok((batch, report))
    }

    /// What retention asks of an event: a non-state event past its
    /// lifetime is deleted, or, while it is one of its room's forward
    /// extremities (the next event must still name it), redacted by its
    /// room version's rules and kept until another event follows it.
    fn expiry(
        &self,
        rooms: &mut RoomFacts,
        event_id: &str,
        stored: &StoredPdu,
        pdu: &Pdu,
    ) -> Result<Expiry> {
        if !self.retention.enabled || pdu.state_key.is_some() {
            return Ok(Expiry::Keep);
        }
        let facts = rooms.of(self, &stored.room_id)?;
        let Some(lifetime) = facts.lifetime else {
            return Ok(Expiry::Keep);
        };
        let ts = u64::from(pdu.origin_server_ts.get());
        if ts.saturating_add(lifetime) > self.clock.now_ms() {
            return Ok(Expiry::Keep);
        }
        let Some(room) = &facts.record else {
            return Ok(Expiry::Delete);
        };
        if !room.forward_extremities.iter().any(|id| id == event_id) {
            return Ok(Expiry::Delete);
        }
        let rules = ruma::RoomVersionId::try_from(room.version.as_str())
            .ok()
            .and_then(|version| crate::events::room_version_rules(&version));
        let Some(rules) = rules else {
            return Ok(Expiry::Keep);
        };
        let redacted = pdu
            .redacted(&rules)
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(if redacted.json_str() == pdu.json_str() {
            Expiry::Keep
        } else {
            Expiry::Redact(redacted.json_text())
        })
    }

    /// Adds to `batch` the deletion of an expired event from `table` (its
    /// tier), its timeline entry and its marks of use; the relations go
    /// with [`forget_relations`].
    fn expire(
        &self,
        batch: &mut Batch,
        table: crate::storage::Table<String, StoredPdu>,
        event_id: &str,
        stored: &StoredPdu,
        pdu: &Pdu,
    ) {
        let key = event_id.to_owned();
        batch.expect(table, &key, stored.clone());
        batch.delete_tiered(tables::PDU_TIERS, &key);
        if stored.stream > 0 && !stored.outlier {
            batch.delete(tables::TIMELINE, &(pdu.room_id.to_string(), stored.stream));
        }
        batch.delete(tables::TOUCHED, &key);
    }

    /// The lifetime of a room's non-state events, in milliseconds: its
    /// `m.room.retention` `max_lifetime` (raised to its `min_lifetime`),
    /// capped by `retention.max_lifetime_days`; `None`: forever.
    fn room_lifetime(&self, room_id: &str) -> Result<Option<u64>> {
        let server = self
            .retention
            .max_lifetime_days
            .map(|days| days.saturating_mul(DAY_MS));
        let key = (
            room_id.to_owned(),
            "m.room.retention".to_owned(),
            String::new(),
        );
        let mut room = None;
        if let Some(event_id) = self.storage.get(tables::ROOM_STATE, &key)? {
            if let Some(stored) = self.storage.get_tiered(tables::PDU_TIERS, &event_id)? {
                let content = parse_stored(&event_id, &stored)?.content_value();
                let max = content["max_lifetime"].as_u64();
                let min = content["min_lifetime"].as_u64();
                room = match (max, min) {
                    (Some(max), Some(min)) => Some(max.max(min)),
                    (max, _) => max,
                };
            }
        }
        Ok(match (room, server) {
            (Some(room), Some(server)) => Some(room.min(server)),
            (room, server) => room.or(server),
        })
    }

    /// Whether an event stays in the hot tier: it is recent, or recently
    /// used, or part of its room's current state.
    fn stays_hot(
        &self,
        event_id: &str,
        stored: &StoredPdu,
        pdu: &Pdu,
        cutoff: u64,
    ) -> Result<bool> {
        if u64::from(pdu.origin_server_ts.get()) >= cutoff {
            return Ok(true);
        }
        if let Some(touched) = self.storage.get(tables::TOUCHED, &event_id.to_owned())? {
            if touched >= cutoff {
                return Ok(true);
            }
        }
        if let Some(state_key) = &pdu.state_key {
            let key = (
                stored.room_id.clone(),
                pdu.kind.to_string(),
                state_key.clone(),
            );
            let current = self.storage.get(tables::ROOM_STATE, &key)?;
            if current.as_deref() == Some(event_id) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Adds to `batch` the move of one event and of what only it uses.
    fn move_event(
        &self,
        batch: &mut Batch,
        rooms: &mut RoomFacts,
        event_id: &str,
        stored: &StoredPdu,
        pdu: &Pdu,
    ) -> Result<()> {
        batch.move_row(
            tables::PDUS,
            tables::ARCHIVED_PDUS,
            &event_id.to_owned(),
            stored.clone(),
        );
        let content = pdu.content_value();
        let parent = content
            .pointer("/m.relates_to/event_id")
            .and_then(Value::as_str);
        if let (Some(parent), true) = (parent, stored.stream > 0) {
            let key = (parent.to_owned(), stored.stream);
            if let Some(relation) = self.storage.get(tables::RELATIONS, &key)? {
                batch.move_row(
                    tables::RELATIONS,
                    tables::ARCHIVED_RELATIONS,
                    &key,
                    relation,
                );
            }
        }
        let group_id = stored.state_group;
        let own_group = pdu.state_key.is_some() && !stored.outlier && group_id != 0;
        if own_group && group_id < rooms.of(self, &stored.room_id)?.latest_snapshot {
            if let Some(group) = self.storage.get(tables::STATE_GROUPS, &group_id)? {
                batch.move_row(
                    tables::STATE_GROUPS,
                    tables::ARCHIVED_STATE_GROUPS,
                    &group_id,
                    group,
                );
            }
        }
        Ok(())
    }

    /// Deletes the marks of use older than the window: those events may
    /// go to the archive at the next pass.
    async fn forget_old_touches(&self) -> Result<()> {
        let cutoff = self.cutoff();
        let mut range = KeyRange::prefix(b"");
        loop {
            let limit = self.config.batch_size;
            let rows = self
                .storage
                .scan(tables::TOUCHED, &range, Direction::Forward, limit)?;
            let mut batch = Batch::new();
            for (event_id, when) in &rows {
                if *when < cutoff {
                    batch.delete(tables::TOUCHED, event_id);
                }
            }
            self.storage.commit(batch).await?;
            match rows.last() {
                Some((last, _)) if rows.len() == limit => range = KeyRange::after(&last.encode()),
                _ => return Ok(()),
            }
        }
    }

    /// Passes finished since the database was made.
    fn passes(&self) -> Result<u64> {
        Ok(self
            .storage
            .get(tables::ARCHIVE_STATE, &PASSES.to_owned())?
            .and_then(|v| v.as_u64())
            .unwrap_or(0))
    }

    /// Where an event is stored: `"hot"`, `"archived"`, or `None` when
    /// it is not stored at all.
    pub fn tier(&self, event_id: &str) -> Result<Option<&'static str>> {
        let key = event_id.to_owned();
        if self.storage.get(tables::PDUS, &key)?.is_some() {
            return Ok(Some("hot"));
        }
        Ok(self
            .storage
            .get(tables::ARCHIVED_PDUS, &key)?
            .map(|_| "archived"))
    }

    /// Events hot and archived, their bytes, and the mover's place.
    pub fn status(&self) -> Result<ArchiveStatus> {
        let cursor = self
            .storage
            .get(tables::ARCHIVE_STATE, &CURSOR.to_owned())?
            .and_then(|v| v.as_str().map(str::to_owned));
        Ok(ArchiveStatus {
            hot: self.storage.table_size(Cf::Pdus)?,
            archived: self.storage.table_size(Cf::ArchivedPdus)?,
            archived_relations: self.storage.table_size(Cf::ArchivedRelations)?.rows,
            archived_state_groups: self.storage.table_size(Cf::ArchivedStateGroups)?.rows,
            passes: self.passes()?,
            pass_under_way: cursor.is_some(),
        })
    }

    /// Rewrites the event tables' files into their settled form (for
    /// figures that do not depend on when RocksDB last compacted).
    pub fn compact(&self) -> Result<()> {
        for cf in [
            Cf::Pdus,
            Cf::ArchivedPdus,
            Cf::Relations,
            Cf::ArchivedRelations,
            Cf::StateGroups,
            Cf::ArchivedStateGroups,
        ] {
            self.storage.compact(cf)?;
        }
        Ok(())
    }
}

/// The archive's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchiveStatus {
    pub hot: TableSize,
    pub archived: TableSize,
    /// Rows of the archived relations and state groups (estimates).
    pub archived_relations: u64,
    pub archived_state_groups: u64,
    pub passes: u64,
    pub pass_under_way: bool,
}

impl ArchiveStatus {
    /// As `myelin archive status` prints it: one JSON object.
    pub fn to_json(&self) -> Value {
        // Rows not yet flushed count as events but not as bytes on disk:
        // `myelin archive compact` first gives exact sizes.
        let tier = |size: &TableSize| {
            json!({
                "events": size.rows,
                "disk_bytes": size.disk_bytes,
                "unflushed_bytes": size.memory_bytes,
                "bytes_per_event": size.disk_bytes.checked_div(size.rows).unwrap_or(0),
            })
        };
        json!({
            "hot": tier(&self.hot),
            "archived": tier(&self.archived),
            "archived_relations": self.archived_relations,
            "archived_state_groups": self.archived_state_groups,
            "passes": self.passes,
            "pass_under_way": self.pass_under_way,
        })
    }
}

/// What retention does with one event.
enum Expiry {
    Keep,
    Delete,
    /// Keep it in this redacted form (its canonical JSON).
    Redact(String),
}

/// What a batch needs of each room, read once per batch: its record, the
/// latest snapshot in the chain of its current state group (groups before
/// it serve only older events), and its events' lifetime.
#[derive(Default)]
struct RoomFacts(HashMap<String, Facts>);

struct Facts {
    record: Option<RoomRecord>,
    latest_snapshot: u64,
    lifetime: Option<u64>,
}

impl RoomFacts {
    fn of(&mut self, archiver: &Archiver, room_id: &str) -> Result<&Facts> {
        if !self.0.contains_key(room_id) {
            let facts = Self::read(archiver, room_id)?;
            self.0.insert(room_id.to_owned(), facts);
        }
        Ok(&self.0[room_id])
    }

    fn read(archiver: &Archiver, room_id: &str) -> Result<Facts> {
        let storage = &archiver.storage;
        let record = storage.get(tables::ROOMS, &room_id.to_owned())?;
        let mut group_id = record.as_ref().map_or(0, |room| room.state_group);
        while group_id != 0 {
            match storage.get(tables::STATE_GROUPS, &group_id)? {
                Some(group) => match group.prev {
                    Some(prev) => group_id = prev,
                    None => break,
                },
                None => group_id = 0,
            }
        }
        let lifetime = match archiver.retention.enabled {
            true => archiver.room_lifetime(room_id)?,
            false => None,
        };
        Ok(Facts {
            record,
            latest_snapshot: group_id,
            lifetime,
        })
    }
}
