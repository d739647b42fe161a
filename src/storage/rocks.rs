//! The RocksDB backend: one column family per table, synced write-ahead log.
//!
//! Durability: with `sync_writes` on (the default) every batch is written
//! with `WriteOptions::set_sync(true)`, so the write-ahead log is fsync'd
//! before [`Backend::write`] returns. RocksDB's write group commit lets
//! concurrent writers share one fsync: callers write from separate blocking
//! threads, and a leader thread syncs the log once for the whole group.

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DBCompressionType, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions, DB,
};

use super::backend::{Backend, BatchOp, Cf, Direction, Entries, KeyRange, RawBatch};
use super::StorageError;

/// A RocksDB database opened with every column family of [`Cf::ALL`].
pub struct RocksBackend {
    db: DB,
    sync_writes: bool,
}

impl RocksBackend {
    /// Opens (or creates) the database in `path`.
    ///
    /// Column families found on disk that this build does not know are
    /// opened too, so that a newer database reaches the schema check and
    /// fails there with a clear message instead of a RocksDB error.
    pub fn open(path: &Path, sync_writes: bool) -> Result<Self, StorageError> {
        let mut options = base_options();
        options.create_if_missing(true);
        options.create_missing_column_families(true);

        let mut names: Vec<String> = Cf::ALL.iter().map(|cf| cf.name().to_owned()).collect();
        if let Ok(existing) = DB::list_cf(&options, path) {
            for name in existing {
                if name != rocksdb::DEFAULT_COLUMN_FAMILY_NAME && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        let descriptors = names
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, base_options()));
        let db = DB::open_cf_descriptors(&options, path, descriptors)
            .map_err(|e| open_error(path, e))?;
        Ok(RocksBackend { db, sync_writes })
    }

    fn handle(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StorageError::Backend(format!("column family {} missing", cf.name())))
    }
}

fn base_options() -> Options {
    let mut options = Options::default();
    options.set_compression_type(DBCompressionType::Lz4);
    options.set_bottommost_compression_type(DBCompressionType::Zstd);
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    options.set_block_based_table_factory(&table);
    options
}

fn open_error(path: &Path, error: rocksdb::Error) -> StorageError {
    let text = error.to_string();
    if text.contains("lock") {
        StorageError::InUse(path.display().to_string())
    } else {
        StorageError::Backend(format!("cannot open {}: {text}", path.display()))
    }
}

fn backend_error(error: rocksdb::Error) -> StorageError {
    StorageError::Backend(error.to_string())
}

impl Backend for RocksBackend {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.db.get_cf(self.handle(cf)?, key).map_err(backend_error)
    }

    fn write(&self, batch: RawBatch) -> Result<(), StorageError> {
        let mut write = WriteBatch::default();
        for op in &batch.ops {
            match op {
                BatchOp::Put { cf, key, value } => write.put_cf(self.handle(*cf)?, key, value),
                BatchOp::Delete { cf, key } => write.delete_cf(self.handle(*cf)?, key),
            }
        }
        let mut options = WriteOptions::default();
        options.set_sync(self.sync_writes);
        self.db.write_opt(write, &options).map_err(backend_error)
    }

    fn scan(
        &self,
        cf: Cf,
        range: &KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Entries, StorageError> {
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(range.lower.clone());
        if let Some(upper) = &range.upper {
            options.set_iterate_upper_bound(upper.clone());
        }
        let mode = match direction {
            Direction::Forward => IteratorMode::Start,
            Direction::Backward => IteratorMode::End,
        };
        let mut entries = Vec::new();
        for item in self.db.iterator_cf_opt(self.handle(cf)?, options, mode) {
            if entries.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(backend_error)?;
            entries.push((key.into_vec(), value.into_vec()));
        }
        Ok(entries)
    }
}
