//! An in-memory backend for unit tests: ordered maps behind one lock.

use std::collections::BTreeMap;
use std::sync::RwLock;

use super::backend::{Backend, BatchOp, Cf, Direction, Entries, KeyRange, RawBatch, TableSize};
use super::StorageError;

type Table = BTreeMap<Vec<u8>, Vec<u8>>;

/// Keeps every column family in a `BTreeMap`; nothing survives the process.
pub struct MemoryBackend {
    tables: RwLock<Vec<Table>>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        MemoryBackend {
            tables: RwLock::new(vec![Table::new(); Cf::ALL.len()]),
        }
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

fn poisoned() -> StorageError {
    StorageError::Backend("in-memory store lock poisoned".to_owned())
}

impl Backend for MemoryBackend {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let tables = self.tables.read().map_err(|_| poisoned())?;
        Ok(tables[cf.index()].get(key).cloned())
    }

    fn write(&self, batch: RawBatch) -> Result<(), StorageError> {
        // One write lock over the whole batch: readers see all of it or none.
        let mut tables = self.tables.write().map_err(|_| poisoned())?;
        for op in batch.ops {
            match op {
                BatchOp::Put { cf, key, value } => {
                    tables[cf.index()].insert(key, value);
                }
                BatchOp::Delete { cf, key } => {
                    tables[cf.index()].remove(&key);
                }
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        cf: Cf,
        range: &KeyRange,
        direction: Direction,
        limit: usize,
    ) -> Result<Entries, StorageError> {
        let tables = self.tables.read().map_err(|_| poisoned())?;
        let entries = tables[cf.index()].range::<[u8], _>(range.bounds());
        let copy = |(k, v): (&Vec<u8>, &Vec<u8>)| (k.clone(), v.clone());
        Ok(match direction {
            Direction::Forward => entries.take(limit).map(copy).collect(),
            Direction::Backward => entries.rev().take(limit).map(copy).collect(),
        })
    }

    fn table_size(&self, cf: Cf) -> Result<TableSize, StorageError> {
        let tables = self.tables.read().map_err(|_| poisoned())?;
        let table = &tables[cf.index()];
        Ok(TableSize {
            rows: table.len() as u64,
            disk_bytes: 0,
            memory_bytes: table.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum(),
        })
    }

    fn compact(&self, _cf: Cf) -> Result<(), StorageError> {
        Ok(())
    }
}
