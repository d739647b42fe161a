//! Durable storage: typed tables over a key-value backend.
//!
//! Storage holds bytes and knows nothing of Matrix rules. Each table is a
//! column family with a typed key (see [`Key`]) and a JSON value; every
//! multi-key change goes through one [`Batch`], which the backend applies
//! atomically. `docs/storage.md` documents every table's layout.

mod backend;
#[cfg(test)]
mod conformance;
mod memory;
mod rocks;
pub mod tables;

use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use backend::{prefix_successor, Backend, Cf, Direction, KeyRange, RawBatch};
pub use memory::MemoryBackend;
pub use rocks::RocksBackend;

/// The on-disk format version this build writes and understands.
///
/// Raise it whenever a table's key or value layout changes, and teach
/// [`Storage::check_schema`] to migrate from the previous version.
pub const SCHEMA_VERSION: u32 = 1;

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

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K, V> Copy for Table<K, V> {}

/// Typed changes that commit together or not at all.
#[derive(Default)]
pub struct Batch {
    raw: RawBatch,
    /// Set once the batch has committed, for whoever waits on the outcome
    /// (a stream position's reservation) without reading it back.
    committed: Vec<Arc<std::sync::atomic::AtomicBool>>,
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

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Moves every change of `other` to the end of this batch.
    pub fn append(&mut self, other: Batch) {
        self.raw.ops.extend(other.raw.ops);
        self.committed.extend(other.committed);
    }

    /// A flag set when this batch has committed durably.
    pub fn committed_flag(&mut self) -> Arc<std::sync::atomic::AtomicBool> {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.committed.push(flag.clone());
        flag
    }

    /// Writes the batch, then sets its commit flags.
    fn write_to(self, backend: &dyn Backend) -> Result<(), StorageError> {
        backend.write(self.raw)?;
        for flag in self.committed {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(())
    }
}

/// The handle every service uses to read and write the database.
#[derive(Clone)]
pub struct Storage {
    backend: Arc<dyn Backend>,
}

impl Storage {
    /// Opens the RocksDB database in `path` and checks its schema version.
    pub fn open(path: &Path, sync_writes: bool) -> Result<Self, StorageError> {
        std::fs::create_dir_all(path)
            .map_err(|e| StorageError::Backend(format!("cannot create {}: {e}", path.display())))?;
        Self::with_backend(Arc::new(RocksBackend::open(path, sync_writes)?))
    }

    /// A fresh in-memory database, for tests.
    pub fn in_memory() -> Self {
        Self::with_backend(Arc::new(MemoryBackend::new())).expect("an empty store has no schema")
    }

    /// Wraps a backend after checking (or recording) its schema version.
    pub fn with_backend(backend: Arc<dyn Backend>) -> Result<Self, StorageError> {
        let storage = Storage { backend };
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

    /// Commits a batch durably, off the async runtime so that concurrent
    /// commits run on separate threads and share the log's fsync.
    pub async fn commit(&self, batch: Batch) -> Result<(), StorageError> {
        if batch.is_empty() {
            return Ok(());
        }
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || batch.write_to(backend.as_ref()))
            .await
            .map_err(|e| StorageError::Task(e.to_string()))?
    }

    /// Commits a batch on the calling thread (start-up and command-line use).
    pub fn write_blocking(&self, batch: Batch) -> Result<(), StorageError> {
        batch.write_to(self.backend.as_ref())
    }
}

fn decode_value<V: DeserializeOwned>(cf: Cf, bytes: &[u8]) -> Result<V, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt {
        table: cf.name(),
        detail: e.to_string(),
    })
}
