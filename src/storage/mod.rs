//! Durable storage: typed tables over a key-value backend.
//!
//! Storage holds bytes and knows nothing of Matrix rules. Each table is a
//! column family with a typed key (see [`Key`]) and a JSON value; every
//! multi-key change goes through one [`Batch`], which the backend applies
//! atomically. `docs/storage.md` documents every table's layout.

mod backend;
mod commit;
#[cfg(test)]
mod conformance;
mod memory;
mod rocks;
pub mod tables;

use std::marker::PhantomData;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use backend::{
    prefix_successor, Backend, Cf, Direction, EngineStats, KeyRange, RawBatch, TableSize,
};
pub use commit::Rewrites;
pub use memory::MemoryBackend;
pub use rocks::{ArchiveFiles, MemoryBudget, RocksBackend};

/// The on-disk format version this build writes and understands.
///
/// Raise it whenever a table's key or value layout changes, and teach
/// [`Storage::check_schema`] to migrate from the previous version.
///
/// Version 2 added the archive tier's tables. Nothing moves when a version
/// 1 database is opened (the tables start empty), but a build that knows
/// only version 1 must not open a database whose events may have moved
/// where it would not look.
pub const SCHEMA_VERSION: u32 = 2;

const SCHEMA_VERSION_KEY: &str = "schema_version";

/// Everything that can go wrong below the services.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage backend failed: {0}")]
    Backend(String),
    #[error("the database at {0} is in use by another Myelin process")]
    InUse(String),
    #[error(
        "the database was written by a newer Myelin (schema version {found}); \
         this build understands schema versions up to {supported}"
    )]
    TooNew { found: u32, supported: u32 },
    #[error("corrupt entry in table {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error("storage task failed: {0}")]
    Task(String),
}

/// A table key: a value with an order-preserving byte encoding.
pub trait Key: Sized {
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: &[u8]) -> Option<Self>;
}

/// A column family whose keys are `K` and whose values are JSON-encoded `V`.
pub struct Table<K, V> {
    cf: Cf,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Table<K, V> {
    pub const fn new(cf: Cf) -> Self {
        Table {
            cf,
            _types: PhantomData,
        }
    }

    pub fn cf(&self) -> Cf {
        self.cf
    }
}

/// A table whose rows may have moved to the archive tier: the hot table
/// and its archived twin, with the same keys and values. A row is in one
/// of the two, never both: the archive mover moves it in one batch, and a
/// rewrite ([`Batch::put_hot`]) brings it back hot.
pub struct Tiered<K, V> {
    pub hot: Table<K, V>,
    pub archived: Table<K, V>,
}

impl<K, V> Tiered<K, V> {
    pub const fn new(hot: Table<K, V>, archived: Table<K, V>) -> Self {
        Tiered { hot, archived }
    }
}

impl<K, V> Clone for Tiered<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K, V> Copy for Tiered<K, V> {}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K, V> Copy for Table<K, V> {}

/// A condition a batch commits under: a row still holds what was read.
type Expectation = Box<dyn Fn(&dyn Backend) -> Result<bool, StorageError> + Send>;

/// Typed changes that commit together or not at all.
#[derive(Default)]
pub struct Batch {
    raw: RawBatch,
    /// Set once the batch has committed, for whoever waits on the outcome
    /// (a stream position's reservation) without reading it back.
    committed: Vec<Arc<std::sync::atomic::AtomicBool>>,
    /// Rewrites a row that the archive mover may be moving: committed
    /// under the tier lock, never between the mover's check and write.
    tiered: bool,
    /// What must still hold for the batch to commit (the mover's reads).
    expectations: Vec<Expectation>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put<K: Key, V: Serialize>(&mut self, table: Table<K, V>, key: &K, value: &V) {
        let bytes = serde_json::to_vec(value).expect("table values serialize to JSON");
        self.raw.put(table.cf, key.encode(), bytes);
    }

    pub fn delete<K: Key, V>(&mut self, table: Table<K, V>, key: &K) {
        self.raw.delete(table.cf, key.encode());
    }

    /// Writes a row of a tiered table hot, taking it out of the archive
    /// if it was there: for a row that existed before (a redaction, a
    /// relation forgotten), which may be archived or being archived.
    pub fn put_hot<K: Key, V: Serialize>(&mut self, tiers: Tiered<K, V>, key: &K, value: &V) {
        self.put(tiers.hot, key, value);
        self.delete(tiers.archived, key);
        self.tiered = true;
    }

    /// Deletes a row of a tiered table from both tiers.
    pub fn delete_tiered<K: Key, V>(&mut self, tiers: Tiered<K, V>, key: &K) {
        self.delete(tiers.hot, key);
        self.delete(tiers.archived, key);
        self.tiered = true;
    }

    /// Moves a row from one table to another (the archive mover), if
    /// `from[key]` still holds `value` when the batch commits.
    pub fn move_row<K, V>(&mut self, from: Table<K, V>, to: Table<K, V>, key: &K, value: V)
    where
        K: Key,
        V: Serialize + DeserializeOwned + PartialEq + Send + 'static,
    {
        self.put(to, key, &value);
        self.delete(from, key);
        self.expect(from, key, value);
    }

    /// Commits only if `table[key]` still holds `value` then (see
    /// [`Storage::commit_checked`]).
    pub fn expect<K, V>(&mut self, table: Table<K, V>, key: &K, value: V)
    where
        K: Key,
        V: DeserializeOwned + PartialEq + Send + 'static,
    {
        let key = key.encode();
        self.expectations
            .push(Box::new(move |backend: &dyn Backend| {
                Ok(match backend.get(table.cf, &key)? {
                    Some(bytes) => decode_value::<V>(table.cf, &bytes)? == value,
                    None => false,
                })
            }));
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Moves every change of `other` to the end of this batch.
    pub fn append(&mut self, other: Batch) {
        self.raw.ops.extend(other.raw.ops);
        self.committed.extend(other.committed);
        self.tiered |= other.tiered;
        self.expectations.extend(other.expectations);
    }

    /// A flag set when this batch has committed durably.
    pub fn committed_flag(&mut self) -> Arc<std::sync::atomic::AtomicBool> {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.committed.push(flag.clone());
        flag
    }

    /// Marks the batch as one that may rewrite or remove rows written
    /// before (an event stored again as another server sent it, an access
    /// token removed): it is written as a rewrite (see [`Rewrites`]).
    pub fn mark_rewrite(&mut self) {
        self.tiered = true;
    }

    /// Whether the batch rewrites or checks rows written before: it is
    /// then written alone, under the tier lock, as a rewrite.
    fn rewrites(&self) -> bool {
        self.tiered || !self.expectations.is_empty()
    }

    /// Writes the batch if its expectations hold, then sets its commit
    /// flags; `false` when an expectation failed and nothing was written.
    /// A batch that rewrites or checks tiered rows is written under the
    /// tier lock (see [`Rewrites::write`]), so that no rewrite lands
    /// between the mover's check and its write.
    fn write_to(self, backend: &dyn Backend) -> Result<bool, StorageError> {
        for expectation in &self.expectations {
            if !expectation(backend)? {
                return Ok(false);
            }
        }
        backend.write(self.raw)?;
        for flag in self.committed {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(true)
    }
}

/// The handle every service uses to read and write the database.
#[derive(Clone)]
pub struct Storage {
    backend: Arc<dyn Backend>,
    /// Serializes batches that rewrite rows of tiered tables with the
    /// archive mover's checked batches.
    tier_lock: Arc<Mutex<()>>,
    commits: Arc<CommitStats>,
    /// Advances around every commit that may change rows written before.
    rewrites: Arc<Rewrites>,
    /// The thread that writes the runtime's commits, in groups.
    committer: Arc<commit::Committer>,
}

/// How long commits took (the durable write, the sync included) and how
/// many operations their batches held.
pub struct CommitStats {
    pub seconds: crate::metrics::Histogram,
    pub operations: crate::metrics::Histogram,
}

impl Default for CommitStats {
    fn default() -> Self {
        CommitStats {
            seconds: crate::metrics::Histogram::new(&crate::metrics::LATENCY_BUCKETS),
            operations: crate::metrics::Histogram::new(&crate::metrics::SIZE_BUCKETS),
        }
    }
}

impl Storage {
    /// Opens the RocksDB database in `path` and checks its schema version.
    pub fn open(path: &Path, sync_writes: bool) -> Result<Self, StorageError> {
        Self::open_with(
            path,
            sync_writes,
            &ArchiveFiles::default(),
            MemoryBudget::default(),
        )
    }

    /// Opens the RocksDB database in `path`, the archive tier's tables
    /// stored as `archive` says, within the memory `budget`, and checks its
    /// schema version.
    pub fn open_with(
        path: &Path,
        sync_writes: bool,
        archive: &ArchiveFiles,
        budget: MemoryBudget,
    ) -> Result<Self, StorageError> {
        create_dir(path)?;
        Self::with_backend(Arc::new(RocksBackend::open_with(
            path,
            sync_writes,
            archive,
            budget,
        )?))
    }

    /// A fresh in-memory database, for tests.
    pub fn in_memory() -> Self {
        Self::with_backend(Arc::new(MemoryBackend::new())).expect("an empty store has no schema")
    }

    /// Opens an existing RocksDB database for reading only, while another
    /// process may have it open; its schema version must be this build's.
    pub fn open_read_only(path: &Path, archive: &ArchiveFiles) -> Result<Self, StorageError> {
        let storage = Self::unchecked(Arc::new(RocksBackend::open_read_only(path, archive)?));
        match storage.schema_version()? {
            Some(SCHEMA_VERSION) => Ok(storage),
            found => Err(StorageError::Backend(format!(
                "cannot read the database at {} read-only: its schema version is {found:?}, this build's {SCHEMA_VERSION}",
                path.display()
            ))),
        }
    }

    fn unchecked(backend: Arc<dyn Backend>) -> Self {
        let tier_lock: Arc<Mutex<()>> = Arc::default();
        let commits: Arc<CommitStats> = Arc::default();
        let rewrites: Arc<Rewrites> = Arc::default();
        let committer = commit::Committer::start(
            &backend,
            tier_lock.clone(),
            rewrites.clone(),
            commits.clone(),
        );
        Storage {
            backend,
            tier_lock,
            commits,
            rewrites,
            committer: Arc::new(committer),
        }
    }

    /// Wraps a backend after checking (or recording) its schema version.
    pub fn with_backend(backend: Arc<dyn Backend>) -> Result<Self, StorageError> {
        let storage = Self::unchecked(backend);
        storage.check_schema()?;
        Ok(storage)
    }

    fn check_schema(&self) -> Result<(), StorageError> {
        let key = SCHEMA_VERSION_KEY.to_owned();
        match self.get(tables::META, &key)? {
            Some(found) if found > SCHEMA_VERSION => Err(StorageError::TooNew {
                found,
                supported: SCHEMA_VERSION,
            }),
            Some(found) if found < SCHEMA_VERSION => {
                // From 1 to 2: the archive tier's tables, created empty.
                let mut batch = Batch::new();
                batch.put(tables::META, &key, &SCHEMA_VERSION);
                self.write_blocking(batch)
            }
            Some(_) => Ok(()),
            None => {
                let mut batch = Batch::new();
                batch.put(tables::META, &key, &SCHEMA_VERSION);
                self.write_blocking(batch)
            }
        }
    }

    /// The schema version recorded in the database.
    pub fn schema_version(&self) -> Result<Option<u32>, StorageError> {
        self.get(tables::META, &SCHEMA_VERSION_KEY.to_owned())
    }

    /// Reads one value.
    pub fn get<K: Key, V: DeserializeOwned>(
        &self,
        table: Table<K, V>,
        key: &K,
    ) -> Result<Option<V>, StorageError> {
        match self.backend.get(table.cf, &key.encode())? {
            Some(bytes) => decode_value(table.cf, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// One row of a tiered table, hot or archived.
    pub fn get_tiered<K: Key, V: DeserializeOwned>(
        &self,
        tiers: Tiered<K, V>,
        key: &K,
    ) -> Result<Option<V>, StorageError> {
        match self.get(tiers.hot, key)? {
            Some(value) => Ok(Some(value)),
            None => self.get(tiers.archived, key),
        }
    }

    /// Up to `limit` rows of a tiered table whose encoded key starts with
    /// `prefix`, from both tiers, in key order.
    pub fn scan_prefix_tiered<K: Key, V: DeserializeOwned>(
        &self,
        tiers: Tiered<K, V>,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(K, V)>, StorageError> {
        let hot = self.scan_prefix(tiers.hot, prefix, limit)?;
        let archived = self.scan_prefix(tiers.archived, prefix, limit)?;
        if archived.is_empty() {
            return Ok(hot);
        }
        let mut rows: Vec<(Vec<u8>, (K, V))> = hot
            .into_iter()
            .chain(archived)
            .map(|(key, value)| (key.encode(), (key, value)))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows.truncate(limit);
        Ok(rows.into_iter().map(|(_, row)| row).collect())
    }

    /// Up to `limit` entries whose encoded key starts with `prefix`, in order.
    pub fn scan_prefix<K: Key, V: DeserializeOwned>(
        &self,
        table: Table<K, V>,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(K, V)>, StorageError> {
        self.scan(table, &KeyRange::prefix(prefix), Direction::Forward, limit)
    }

    /// Up to `limit` entries inside `range`, walking in `direction`.
    pub fn scan<K: Key, V: DeserializeOwned>(
        &self,
        table: Table<K, V>,
        range: &KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<(K, V)>, StorageError> {
        let raw = self.backend.scan(table.cf, range, direction, limit)?;
        raw.into_iter()
            .map(|(key, value)| {
                let key = K::decode(&key).ok_or_else(|| StorageError::Corrupt {
                    table: table.cf.name(),
                    detail: format!("undecodable key {key:?}"),
                })?;
                Ok((key, decode_value(table.cf, &value)?))
            })
            .collect()
    }

    /// Commits a batch durably, off the async runtime: the committer
    /// thread writes the batches waiting together, with one log sync.
    pub async fn commit(&self, batch: Batch) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.commit_checked(batch).await.map(|_| ())
    }

    /// Commits a batch durably if every row it expects (see
    /// [`Batch::expect`]) still holds what was expected; `false` when one
    /// changed, and then nothing was written.
    pub async fn commit_checked(&self, batch: Batch) -> Result<bool, StorageError> {
        if batch.is_empty() {
            return Ok(true);
        }
        self.committer.commit(batch).await
    }

    /// The rewrite generation (see [`Rewrites`]).
    pub fn rewrites(&self) -> u64 {
        self.rewrites.current()
    }

    /// How many commits have written to `table` (see [`Rewrites`]): read
    /// it before reading the table, and what was read still holds while
    /// the count stays the same.
    pub fn table_writes<K, V>(&self, table: Table<K, V>) -> u64 {
        self.rewrites.table_writes(table.cf)
    }

    /// The commits' figures since the store was opened.
    pub fn commit_stats(&self) -> &CommitStats {
        &self.commits
    }

    /// The engine's own figures (see [`Backend::engine_stats`]).
    pub fn engine_stats(&self) -> Option<EngineStats> {
        self.backend.engine_stats()
    }

    /// The files of each table (see [`Backend::table_files`]).
    pub fn table_files(&self) -> Result<Vec<(Cf, String)>, StorageError> {
        self.backend.table_files()
    }

    /// Writes a consistent copy of the database into `dir` (see
    /// [`Backend::checkpoint`]).
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StorageError> {
        self.backend.checkpoint(dir)
    }

    /// Commits a batch on the calling thread (start-up and command-line use).
    pub fn write_blocking(&self, batch: Batch) -> Result<(), StorageError> {
        self.rewrites
            .write(batch, self.backend.as_ref(), &self.tier_lock)
            .map(|_| ())
    }

    /// Rewrites a table's files (see [`Backend::compact`]).
    pub fn compact(&self, table: Cf) -> Result<(), StorageError> {
        self.backend.compact(table)
    }

    /// The backend's own figures for a table (see [`Backend::table_size`]).
    pub fn table_size(&self, table: Cf) -> Result<TableSize, StorageError> {
        self.backend.table_size(table)
    }
}

/// Makes a directory and its parents, as a storage error.
fn create_dir(path: &Path) -> Result<(), StorageError> {
    std::fs::create_dir_all(path)
        .map_err(|e| StorageError::Backend(format!("cannot create {}: {e}", path.display())))
}

fn decode_value<V: DeserializeOwned>(cf: Cf, bytes: &[u8]) -> Result<V, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt {
        table: cf.name(),
        detail: e.to_string(),
    })
}
