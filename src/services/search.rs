//! Full-text search of rooms' messages, names and topics (tantivy).
//!
//! The index lives in `data_dir/search` and is derived from the timeline:
//! an indexer follows the stream from the position stored with each
//! commit (the commit's payload), adding `m.room.message` bodies,
//! `m.room.name` names and `m.room.topic` topics and deleting what a
//! redaction removes. A crash loses at most what was not committed, which
//! the indexer reads again; a deleted or unreadable index is made again
//! from the start of the stream. The indexer adds what it reads at once
//! and commits every few seconds, or at once when a search waits: a search
//! waits (at most a second) for the index to reach the position current
//! when it came, so that a message is found as soon as it is sent.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ruma::OwnedRoomId;
use tantivy::collector::{Count, TopDocs};
use tantivy::query::{BooleanQuery, Occur, Query, QueryParser, TermSetQuery};
use tantivy::schema::{Field, Schema, Value, FAST, INDEXED, STORED, STRING, TEXT};
use tantivy::{doc, Index, IndexReader, IndexWriter, Order, ReloadPolicy, TantivyDocument, Term};
use tokio_util::sync::CancellationToken;

use super::error::{Error, Result};
use super::Services;
use crate::storage::tables::{self, StreamEntry};
use crate::storage::{Direction, Key, KeyRange};

/// Stream entries read in one round of the indexer.
const ROUND_ENTRIES: usize = 1000;
/// The indexer looks for new events this often when idle.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How long a search waits for the index to catch up.
const CATCH_UP: Duration = Duration::from_secs(1);
/// Documents added wait at most this long for their commit, unless a
/// search waits for them: each commit makes a segment, and segments are
/// merged, so committing every round would cost more than the indexing.
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);
/// Memory of the index writer.
const WRITER_BYTES: usize = 20_000_000;

/// The searchable parts of events.
pub const KEYS: [&str; 3] = ["content.body", "content.name", "content.topic"];

struct Fields {
    event_id: Field,
    room_id: Field,
    key: Field,
    text: Field,
    stream: Field,
}

pub struct Search {
    index: Index,
    reader: IndexReader,
    writer: Mutex<IndexWriter>,
    fields: Fields,
    /// The stream position the committed index covers.
    indexed: AtomicU64,
    /// The stream position the writer has read up to (committed or not).
    added: AtomicU64,
    /// The highest position a search waits for the index to cover.
    wanted: AtomicU64,
}

/// One hit: the event and how well it matched.
pub struct Hit {
    pub event_id: String,
    pub room_id: String,
    pub rank: f32,
}

/// What a search asks for.
pub struct SearchQuery<'a> {
    pub term: &'a str,
    pub keys: &'a [String],
    pub rooms: &'a [OwnedRoomId],
    pub by_recency: bool,
    pub offset: usize,
    pub limit: usize,
}

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let fields = Fields {
        // Stored only: an event ID is unique to its document, and a term
        // dictionary of random IDs is what made merging segments costly.
        // Documents are deleted by their stream position instead.
        event_id: builder.add_text_field("event_id", STORED),
        room_id: builder.add_text_field("room_id", STRING | STORED),
        key: builder.add_text_field("key", STRING),
        text: builder.add_text_field("text", TEXT),
        stream: builder.add_u64_field("stream", INDEXED | FAST | STORED),
    };
    (builder.build(), fields)
}

fn index_error(error: impl std::fmt::Display) -> Error {
    Error::Internal(format!("search index: {error}"))
}

impl Search {
    /// Opens the index in `dir`, or makes it anew (empty) when it is
    /// missing or cannot be read.
    pub fn open(dir: &Path) -> Result<Self> {
        let (schema, fields) = schema();
        let index = match open_index(dir, &schema) {
            Ok(index) => index,
            Err(error) => {
                tracing::warn!(%error, "the search index is made again");
                let _ = std::fs::remove_dir_all(dir);
                open_index(dir, &schema)?
            }
        };
        let indexed = index
            .load_metas()
            .map_err(index_error)?
            .payload
            .and_then(|payload| payload.parse().ok())
            .unwrap_or(0);
        let writer = index
            .writer_with_num_threads(1, WRITER_BYTES)
            .map_err(index_error)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(index_error)?;
        Ok(Search {
            index,
            reader,
            writer: Mutex::new(writer),
            fields,
            indexed: AtomicU64::new(indexed),
            added: AtomicU64::new(indexed),
            wanted: AtomicU64::new(0),
        })
    }

    /// The stream position the index covers.
    pub fn indexed(&self) -> u64 {
        self.indexed.load(Ordering::SeqCst)
    }

    /// Waits (at most a second) until the index covers `position`.
    pub async fn catch_up(&self, position: u64) {
        self.wanted.fetch_max(position, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        while self.indexed() < position && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The events matching `query` in its rooms, best or newest first.
    /// Also the number of all matches.
    pub fn search(&self, query: &SearchQuery<'_>) -> Result<(Vec<Hit>, usize)> {
        let f = &self.fields;
        let mut parser = QueryParser::for_index(&self.index, vec![f.text]);
        parser.set_conjunction_by_default();
        let (text, _) = parser.parse_query_lenient(query.term);
        let rooms = TermSetQuery::new(
            query
                .rooms
                .iter()
                .map(|room| Term::from_field_text(f.room_id, room.as_str())),
        );
        let keys = TermSetQuery::new(
            query
                .keys
                .iter()
                .map(|key| Term::from_field_text(f.key, key)),
        );
        let clauses: Vec<(Occur, Box<dyn Query>)> = vec![
            (Occur::Must, text),
            (Occur::Must, Box::new(rooms)),
            (Occur::Must, Box::new(keys)),
        ];
        let combined = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let limit = query.limit.max(1);
        let stored = |address| -> Result<(String, String)> {
            let document: TantivyDocument = searcher.doc(address).map_err(index_error)?;
            let text_of = |field| {
                document
                    .get_first(field)
                    .and_then(|value| value.as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            Ok((text_of(f.event_id), text_of(f.room_id)))
        };
        let mut hits = Vec::new();
        let count = if query.by_recency {
            let top = TopDocs::with_limit(limit)
                .and_offset(query.offset)
                .order_by_fast_field::<u64>("stream", Order::Desc);
            let (found, count) = searcher
                .search(&combined, &(top, Count))
                .map_err(index_error)?;
            for (_, address) in found {
                let (event_id, room_id) = stored(address)?;
                hits.push(Hit {
                    event_id,
                    room_id,
                    rank: 1.0,
                });
            }
            count
        } else {
            let top = TopDocs::with_limit(limit).and_offset(query.offset);
            let (found, count) = searcher
                .search(&combined, &(top, Count))
                .map_err(index_error)?;
            for (rank, address) in found {
                let (event_id, room_id) = stored(address)?;
                hits.push(Hit {
                    event_id,
                    room_id,
                    rank,
                });
            }
            count
        };
        Ok((hits, count))
    }

    /// One round of the indexer: adds the events after the position read
    /// up to, and commits (with the position reached) when `commit_due` or
    /// a search waits. Answers (more are waiting, committed).
    fn index_round(
        &self,
        services: &Services,
        upto: u64,
        commit_due: bool,
    ) -> Result<(bool, bool)> {
        let more = self.add_round(services, upto)?;
        let added = self.added.load(Ordering::SeqCst);
        let searched = self.wanted.load(Ordering::SeqCst) > self.indexed();
        if added <= self.indexed() || !(commit_due || searched) {
            return Ok((more, false));
        }
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut commit = writer.prepare_commit().map_err(index_error)?;
        commit.set_payload(&added.to_string());
        commit.commit().map_err(index_error)?;
        drop(writer);
        self.reader.reload().map_err(index_error)?;
        self.indexed.store(added, Ordering::SeqCst);
        Ok((more, true))
    }

    /// Adds the events after the position read up to, to at most `upto`,
    /// to the writer; `true` when more are waiting.
    fn add_round(&self, services: &Services, upto: u64) -> Result<bool> {
        let from = self.added.load(Ordering::SeqCst);
        if from >= upto {
            return Ok(false);
        }
        let range = KeyRange {
            lower: (from + 1).encode(),
            upper: Some((upto + 1).encode()),
        };
        let entries =
            services
                .storage
                .scan(tables::STREAM, &range, Direction::Forward, ROUND_ENTRIES)?;
        let more = entries.len() == ROUND_ENTRIES;
        let reached = match entries.last() {
            Some((position, _)) if more => *position,
            _ => upto,
        };
        let f = &self.fields;
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        for (position, entry) in entries {
            let StreamEntry::Event { event_id, .. } = entry else {
                continue;
            };
            let Some((pdu, redacted)) = services.rooms.pdu_shared_marked(&event_id)? else {
                continue;
            };
            let content = pdu.content_value();
            if pdu.kind.to_string() == "m.room.redaction" {
                // The redacted event: top-level before room version 11,
                // in the content from it on.
                let target = pdu
                    .redacts
                    .as_ref()
                    .map(ToString::to_string)
                    .or_else(|| content["redacts"].as_str().map(str::to_owned));
                // Its document is found by its stream position.
                let position = match target {
                    Some(target) => services.rooms.pdu(&target)?.map(|(_, s)| s.stream),
                    None => None,
                };
                if let Some(position) = position.filter(|p| *p > 0) {
                    writer.delete_term(Term::from_field_u64(f.stream, position));
                }
                continue;
            }
            if redacted {
                continue;
            }
            let (key, text) = match pdu.kind.to_string().as_str() {
                "m.room.message" => ("content.body", &content["body"]),
                "m.room.name" => ("content.name", &content["name"]),
                "m.room.topic" => ("content.topic", &content["topic"]),
                _ => continue,
            };
            let Some(text) = text.as_str() else {
                continue;
            };
            writer
                .add_document(doc!(
                    f.event_id => pdu.event_id.as_str(),
                    f.room_id => pdu.room_id.as_str(),
                    f.key => key,
                    f.text => text,
                    f.stream => position,
                ))
                .map_err(index_error)?;
        }
        self.added.store(reached, Ordering::SeqCst);
        Ok(more)
    }
}

fn open_index(dir: &Path, schema: &Schema) -> Result<Index> {
    std::fs::create_dir_all(dir).map_err(index_error)?;
    let directory = tantivy::directory::MmapDirectory::open(dir).map_err(index_error)?;
    let index = Index::open_or_create(directory, schema.clone()).map_err(index_error)?;
    Ok(index)
}

/// Where the index lives under the data directory.
pub fn index_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("search")
}

/// Runs the indexer until `stop`.
pub async fn run(services: Arc<Services>, stop: CancellationToken) {
    let mut last_commit = tokio::time::Instant::now();
    loop {
        let upto = services.sync.current();
        let commit_due = last_commit.elapsed() >= COMMIT_INTERVAL;
        let round = {
            let services = services.clone();
            tokio::task::spawn_blocking(move || {
                services.search.index_round(&services, upto, commit_due)
            })
            .await
        };
        let more = match round {
            Ok(Ok((more, committed))) => {
                if committed {
                    last_commit = tokio::time::Instant::now();
                }
                more
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "indexing for search failed");
                false
            }
            Err(error) => {
                tracing::warn!(%error, "the search indexer stopped");
                false
            }
        };
        if more {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(IDLE_POLL) => {}
        }
    }
}
