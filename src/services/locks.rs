//! Striped locks that serialize read-modify-write sequences per key.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use tokio::sync::{Mutex, MutexGuard};

/// A fixed set of mutexes; a key always maps to the same one. Writers of
/// different keys rarely share a stripe, so their commits (and fsyncs) can
/// still be grouped by the storage layer.
pub struct StripedLocks {
    stripes: Vec<Mutex<()>>,
}

impl StripedLocks {
    pub fn new(count: usize) -> Self {
        StripedLocks {
            stripes: (0..count.max(1)).map(|_| Mutex::new(())).collect(),
        }
    }

    pub async fn lock(&self, key: &str) -> MutexGuard<'_, ()> {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let index = (hasher.finish() % self.stripes.len() as u64) as usize;
        self.stripes[index].lock().await
    }
}
