//! The one counter of stream positions, shared by every kind of write that
//! sync will order: events, account data, receipts, presence.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::storage::tables::{self, StreamEntry};
use crate::storage::{Batch, Direction, KeyRange, Storage, StorageError};

pub struct StreamCounter {
    last: AtomicU64,
}

impl StreamCounter {
    /// Continues after the last position recorded in the `stream` table.
    pub fn load(storage: &Storage) -> Result<Self, StorageError> {
        let everything = KeyRange::prefix(b"");
        let last = storage
            .scan(tables::STREAM, &everything, Direction::Backward, 1)?
            .first()
            .map_or(0, |(position, _)| *position);
        Ok(StreamCounter {
            last: AtomicU64::new(last),
        })
    }

    /// A new position, recorded in `batch` with what it stands for.
    pub fn next_into(&self, batch: &mut Batch, entry: &StreamEntry) -> u64 {
        let position = self.last.fetch_add(1, Ordering::SeqCst) + 1;
        batch.put(tables::STREAM, &position, entry);
        position
    }

    /// The last position handed out.
    pub fn current(&self) -> u64 {
        self.last.load(Ordering::SeqCst)
    }
}
