//! The RocksDB backend: one column family per table, synced write-ahead log.
//!
//! Durability: with `sync_writes` on (the default) every batch is written
//! with `WriteOptions::set_sync(true)`, so the write-ahead log is fsync'd
//! before [`Backend::write`] returns. RocksDB's write group commit lets
//! concurrent writers share one fsync: callers write from separate blocking
//! threads, and a leader thread syncs the log once for the whole group.

use std::path::{Path, PathBuf};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, DBPath, IteratorMode,
    Options, ReadOptions, WriteBatch, WriteOptions, DB,
};

use super::backend::{
    Backend, BatchOp, Cf, Direction, EngineStats, Entries, KeyRange, RawBatch, TableSize,
};
use super::StorageError;

/// A RocksDB database opened with every column family of [`Cf::ALL`].
pub struct RocksBackend {
    db: DB,
    sync_writes: bool,
    /// How the archive tables are stored (in another directory, maybe).
    archive: ArchiveFiles,
}

impl RocksBackend {
    /// Opens (or creates) the database in `path`.
    ///
    /// Column families found on disk that this build does not know are
    /// opened too, so that a newer database reaches the schema check and
    /// fails there with a clear message instead of a RocksDB error.
    pub fn open(path: &Path, sync_writes: bool) -> Result<Self, StorageError> {
        Self::open_with(
            path,
            sync_writes,
            &ArchiveFiles::default(),
            MemoryBudget::default(),
        )
    }

    /// Opens (or creates) the database in `path`, with the archive tier's
    /// tables stored as `archive` says, within the memory `budget`.
    pub fn open_with(
        path: &Path,
        sync_writes: bool,
        archive: &ArchiveFiles,
        budget: MemoryBudget,
    ) -> Result<Self, StorageError> {
        if let Some(dir) = &archive.path {
            super::create_dir(dir)?;
        }
        let cache = Cache::new_lru_cache(budget.block_cache_bytes);
        let mut options = base_options(&cache);
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_db_write_buffer_size(budget.memtable_bytes);

        let descriptors = descriptors(&options, path, archive, &cache)?;
        let db = DB::open_cf_descriptors(&options, path, descriptors)
            .map_err(|e| open_error(path, e))?;
        Ok(RocksBackend {
            db,
            sync_writes,
            archive: archive.clone(),
        })
    }

    /// Opens an existing database for reading only, beside the process
    /// that has it open (`myelin archive status` while the server runs):
    /// it sees what was written up to the moment it opened.
    pub fn open_read_only(path: &Path, archive: &ArchiveFiles) -> Result<Self, StorageError> {
        let cache = Cache::new_lru_cache(MemoryBudget::default().block_cache_bytes);
        let options = base_options(&cache);
        let descriptors = descriptors(&options, path, archive, &cache)?;
        let db = DB::open_cf_descriptors_read_only(&options, path, descriptors, false)
            .map_err(|e| open_error(path, e))?;
        Ok(RocksBackend {
            db,
            sync_writes: false,
            archive: archive.clone(),
        })
    }

    fn handle(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, StorageError> {
        self.db
            .cf_handle(cf.name())
            .ok_or_else(|| StorageError::Backend(format!("column family {} missing", cf.name())))
    }
}

/// Every column family to open, with its options: this build's, and those
/// found on disk that this build does not know (opened so that a newer
/// database reaches the schema check and fails there with a clear message
/// instead of a RocksDB error).
fn descriptors(
    options: &Options,
    path: &Path,
    archive: &ArchiveFiles,
    cache: &Cache,
) -> Result<Vec<ColumnFamilyDescriptor>, StorageError> {
    let mut names: Vec<String> = Cf::ALL.iter().map(|cf| cf.name().to_owned()).collect();
    if let Ok(existing) = DB::list_cf(options, path) {
        for name in existing {
            if name != rocksdb::DEFAULT_COLUMN_FAMILY_NAME && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            let options = match Cf::ALL.iter().find(|cf| cf.name() == name) {
                Some(cf) if cf.is_archive() => archive_options(archive, cache)?,
                Some(Cf::Notifications) => notification_options(cache),
                _ => base_options(cache),
            };
            Ok(ColumnFamilyDescriptor::new(name, options))
        })
        .collect()
}

/// The options of an ordinary table, reading through the shared `cache`.
fn base_options(cache: &Cache) -> Options {
    let mut options = Options::default();
    options.set_compression_type(DBCompressionType::Lz4);
    options.set_bottommost_compression_type(DBCompressionType::Zstd);
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_block_cache(cache);
    options.set_block_based_table_factory(&table);
    options
}

/// The memtable of the notifications table. A message writes a row there
/// for each member it notifies (a hundred for a full chat) and those rows
/// are read rarely (`/notifications`, the push queue), so a memtable of
/// the usual 64 MiB would hold tens of megabytes of them for minutes
/// before its first flush, and the server's memory would climb that long
/// under a steady load before it levels off.
const NOTIFICATION_MEMTABLE_BYTES: usize = 8 << 20;

/// The options of the notifications table: an ordinary table whose
/// memtable is flushed at [`NOTIFICATION_MEMTABLE_BYTES`].
fn notification_options(cache: &Cache) -> Options {
    let mut options = base_options(cache);
    options.set_write_buffer_size(NOTIFICATION_MEMTABLE_BYTES);
    options
}

/// The memory RocksDB may hold, for all its tables together. Without it,
/// each of the 64 tables would have a block cache of its own and
/// memtables of up to 64 MiB, and a server's memory would grow with the
/// number of tables written to until each was flushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    /// The one block cache every table reads through.
    pub block_cache_bytes: usize,
    /// The memtables of every table together: past it, the largest is
    /// flushed to disk.
    pub memtable_bytes: usize,
}

impl Default for MemoryBudget {
    fn default() -> Self {
        MemoryBudget {
            block_cache_bytes: 64 << 20,
            memtable_bytes: 256 << 20,
        }
    }
}

/// Where and how the archive tier's tables are stored.
#[derive(Clone, Debug)]
pub struct ArchiveFiles {
    /// Another directory (another disk) for their files; `None`: with the
    /// rest of the database.
    pub path: Option<PathBuf>,
    /// The zstd level of their settled (bottommost) files.
    pub zstd_level: i32,
}

impl Default for ArchiveFiles {
    fn default() -> Self {
        ArchiveFiles {
            path: None,
            zstd_level: 19,
        }
    }
}

/// Dictionary size of the archive's zstd compression, and the sample each
/// dictionary is trained on (zstd's advice: about a hundred times larger).
const ARCHIVE_DICTIONARY_BYTES: i32 = 64 * 1024;
const ARCHIVE_TRAINING_BYTES: i32 = 100 * ARCHIVE_DICTIONARY_BYTES;
/// Block size of the archive's files: large blocks compress chat text far
/// better, and archived rows are read rarely.
const ARCHIVE_BLOCK_BYTES: usize = 64 * 1024;

/// The archive tier's tables: written once, read rarely, kept for years.
/// Recent files use zstd at a cheap level; the settled (bottommost) files,
/// where nearly all the data ends up, use zstd at `zstd_level` with a
/// dictionary trained on the file's own rows, and large blocks.
fn archive_options(archive: &ArchiveFiles, cache: &Cache) -> Result<Options, StorageError> {
    let mut options = Options::default();
    options.set_compression_type(DBCompressionType::Zstd);
    options.set_compression_options(-14, 3, 0, 0);
    options.set_bottommost_compression_type(DBCompressionType::Zstd);
    options.set_bottommost_compression_options(
        -14,
        archive.zstd_level,
        0,
        ARCHIVE_DICTIONARY_BYTES,
        true,
    );
    options.set_bottommost_zstd_max_train_bytes(ARCHIVE_TRAINING_BYTES, true);
    options.set_level_compaction_dynamic_level_bytes(true);
    let mut table = BlockBasedOptions::default();
    table.set_block_size(ARCHIVE_BLOCK_BYTES);
    table.set_bloom_filter(10.0, false);
    table.set_block_cache(cache);
    options.set_block_based_table_factory(&table);
    if let Some(dir) = &archive.path {
        let path = DBPath::new(dir, u64::MAX).map_err(backend_error)?;
        options.set_cf_paths(&[path]);
    }
    Ok(options)
}

/// Bytes of rows written at once by a copying backup.
const COPY_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// The seconds of `Cumulative stall: HH:MM:SS.mmm H:M:S` in RocksDB's
/// `rocksdb.dbstats` text.
fn cumulative_stall_seconds(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("Cumulative stall:"))?;
    let clock = line
        .trim_start_matches("Cumulative stall:")
        .split_whitespace()
        .next()?;
    let mut parts = clock.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
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

    fn table_size(&self, cf: Cf) -> Result<TableSize, StorageError> {
        let handle = self.handle(cf)?;
        let property = |name: &str| -> Result<u64, StorageError> {
            Ok(self
                .db
                .property_int_value_cf(handle, name)
                .map_err(backend_error)?
                .unwrap_or(0))
        };
        Ok(TableSize {
            rows: property("rocksdb.estimate-num-keys")?,
            disk_bytes: property("rocksdb.live-sst-files-size")?,
            memory_bytes: property("rocksdb.cur-size-all-mem-tables")?,
        })
    }

    fn engine_stats(&self) -> Option<EngineStats> {
        let mut stats = EngineStats::default();
        for cf in Cf::ALL {
            let Ok(handle) = self.handle(cf) else {
                continue;
            };
            let property = |name: &str| {
                self.db
                    .property_int_value_cf(handle, name)
                    .ok()
                    .flatten()
                    .unwrap_or(0)
            };
            stats.memtable_bytes += property("rocksdb.cur-size-all-mem-tables");
            // One cache serves every table: each reports all of it.
            stats.block_cache_bytes = stats
                .block_cache_bytes
                .max(property("rocksdb.block-cache-usage"));
            stats.table_readers_bytes += property("rocksdb.estimate-table-readers-mem");
            stats.sst_bytes += property("rocksdb.live-sst-files-size");
            stats.pending_compaction_bytes += property("rocksdb.estimate-pending-compaction-bytes");
        }
        let property = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        stats.running_compactions = property("rocksdb.num-running-compactions");
        stats.running_flushes = property("rocksdb.num-running-flushes");
        stats.write_stopped = property("rocksdb.is-write-stopped");
        stats.delayed_write_rate = property("rocksdb.actual-delayed-write-rate");
        stats.stall_seconds = self
            .db
            .property_value("rocksdb.dbstats")
            .ok()
            .flatten()
            .and_then(|text| cumulative_stall_seconds(&text))
            .unwrap_or(0.0);
        Some(stats)
    }

    fn table_files(&self) -> Result<Vec<(Cf, String)>, StorageError> {
        let files = self.db.live_files().map_err(backend_error)?;
        Ok(files
            .into_iter()
            .filter_map(|file| {
                let cf = Cf::ALL
                    .into_iter()
                    .find(|cf| cf.name() == file.column_family_name)?;
                Some((cf, file.name.trim_start_matches('/').to_owned()))
            })
            .collect())
    }

    fn checkpoint(&self, dir: &Path) -> Result<(), StorageError> {
        if self.archive.path.is_none() {
            let checkpoint =
                rocksdb::checkpoint::Checkpoint::new(&self.db).map_err(backend_error)?;
            return checkpoint.create_checkpoint(dir).map_err(backend_error);
        }
        // RocksDB's checkpoint cannot follow tables kept in another
        // directory: copy every row as of one snapshot into a new database
        // in `dir` instead (all its files there).
        let snapshot = self.db.snapshot();
        let local = ArchiveFiles {
            path: None,
            zstd_level: self.archive.zstd_level,
        };
        let copy = RocksBackend::open_with(dir, false, &local, MemoryBudget::default())?;
        for cf in Cf::ALL {
            let mut options = ReadOptions::default();
            options.set_snapshot(&snapshot);
            let mut batch = WriteBatch::default();
            let mut bytes = 0;
            for row in self
                .db
                .iterator_cf_opt(self.handle(cf)?, options, IteratorMode::Start)
            {
                let (key, value) = row.map_err(backend_error)?;
                bytes += key.len() + value.len();
                batch.put_cf(copy.handle(cf)?, key, value);
                if bytes >= COPY_BATCH_BYTES {
                    copy.db
                        .write(std::mem::take(&mut batch))
                        .map_err(backend_error)?;
                    bytes = 0;
                }
            }
            copy.db.write(batch).map_err(backend_error)?;
        }
        copy.db.flush().map_err(backend_error)?;
        for cf in Cf::ALL {
            copy.db.flush_cf(copy.handle(cf)?).map_err(backend_error)?;
        }
        Ok(())
    }

    fn compact(&self, cf: Cf) -> Result<(), StorageError> {
        let handle = self.handle(cf)?;
        self.db.flush_cf(handle).map_err(backend_error)?;
        let mut options = rocksdb::CompactOptions::default();
        options.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        self.db
            .compact_range_cf_opt(handle, None::<&[u8]>, None::<&[u8]>, &options);
        Ok(())
    }
}

#[cfg(test)]
mod stall_tests {
    #[test]
    fn the_cumulative_stall_is_read_from_the_db_stats() {
        let text = "** DB Stats **\nUptime(secs): 10.0 total\nCumulative stall: 01:02:03.500 H:M:S, 0.0 percent\nInterval stall: 00:00:0.000 H:M:S, 0.0 percent\n";
        assert_eq!(super::cumulative_stall_seconds(text), Some(3723.5));
        assert_eq!(super::cumulative_stall_seconds("nothing"), None);
    }
}

#[cfg(test)]
mod memtable_tests {
    use super::*;

    /// The `write_buffer_size` RocksDB recorded for `table` in the
    /// options file it wrote when the database was opened.
    fn recorded_write_buffer(dir: &Path, table: &str) -> Option<u64> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("OPTIONS-")
            })
            .collect();
        files.sort();
        let text = std::fs::read_to_string(files.last()?).unwrap();
        let heading = format!("[CFOptions \"{table}\"]");
        let section = text.split(&heading).nth(1)?;
        let section = section.split("\n[").next()?;
        section
            .lines()
            .find_map(|line| line.trim().strip_prefix("write_buffer_size="))
            .map(|value| value.parse().unwrap())
    }

    #[test]
    fn the_notifications_memtable_is_flushed_sooner_than_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let backend = RocksBackend::open(dir.path(), false).unwrap();
        drop(backend);
        let notifications = recorded_write_buffer(dir.path(), Cf::Notifications.name());
        assert_eq!(notifications, Some(NOTIFICATION_MEMTABLE_BYTES as u64));
        let pdus = recorded_write_buffer(dir.path(), Cf::Pdus.name()).unwrap();
        assert!(pdus > NOTIFICATION_MEMTABLE_BYTES as u64, "{pdus}");
    }
}
