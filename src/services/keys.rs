//! The server's signing key: generated on first start, kept in the database.

use rand::distributions::{Alphanumeric, Distribution};

use super::error::{Error, Result};
use crate::events::SigningKey;
use crate::storage::tables::{self, ServerKeyRecord};
use crate::storage::{Batch, Storage};

const CURRENT: &str = "current";

/// Loads the current signing key, or makes and stores one.
pub fn load_or_generate(storage: &Storage, now_ms: u64) -> Result<SigningKey> {
    if let Some(record) = storage.get(tables::SERVER_KEYS, &CURRENT.to_owned())? {
        let der = tables::from_hex(&record.der_hex)
            .ok_or_else(|| Error::Internal("stored signing key is not hex".to_owned()))?;
        return SigningKey::from_der(der, &record.version).map_err(Error::Internal);
    }
    let suffix: String = (0..6)
        .map(|_| Alphanumeric.sample(&mut rand::thread_rng()) as char)
        .collect();
    let key = SigningKey::generate(&format!("a_{suffix}")).map_err(Error::Internal)?;
    let record = ServerKeyRecord {
        version: key.version().to_owned(),
        der_hex: tables::to_hex(key.der()),
        created_ts: now_ms,
    };
    let mut batch = Batch::new();
    batch.put(tables::SERVER_KEYS, &CURRENT.to_owned(), &record);
    storage.write_blocking(batch)?;
    tracing::info!(key_id = %key.key_id(), "generated the server's signing key");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_and_kept() {
        let storage = Storage::in_memory();
        let first = load_or_generate(&storage, 1).unwrap();
        let again = load_or_generate(&storage, 2).unwrap();
        assert_eq!(first.key_id(), again.key_id());
        assert_eq!(first.public_key(), again.public_key());
        assert!(first.key_id().starts_with("ed25519:a_"));
    }
}
