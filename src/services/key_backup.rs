//! Server-side room key backup: versions of a user's backup (algorithm and
//! public auth data) and the encrypted session keys stored in them. The
//! server never sees a session key in clear: clients encrypt them to the
//! backup's public key.
//!
//! The only writer of `backup_versions` and `backup_keys`.

use std::collections::BTreeMap;

use ruma::UserId;
use serde_json::Value;

use super::error::{Error, Result};
use super::locks::StripedLocks;
use crate::storage::tables::{self, BackupVersion};
use crate::storage::{Batch, Storage};

/// Most versions and keys read at once.
const MAX_VERSIONS: usize = 100_000;
const MAX_KEYS: usize = 1_000_000;

pub struct KeyBackup {
    storage: Storage,
    locks: StripedLocks,
}

/// A version as clients read it.
pub struct VersionInfo {
    pub version: u64,
    pub record: BackupVersion,
    pub count: u64,
}

/// Which keys of a version a request means: all, a room's, or one session.
#[derive(Clone, Copy)]
pub enum Scope<'a> {
    All,
    Room(&'a str),
    Session(&'a str, &'a str),
}

/// (room ID, session ID, key data).
pub type SessionKey = (String, String, Value);

impl KeyBackup {
    pub fn new(storage: Storage) -> Self {
        KeyBackup {
            storage,
            locks: StripedLocks::new(64),
        }
    }

    /// Creates a new version, which becomes the current one.
    pub async fn create_version(
        &self,
        user: &UserId,
        algorithm: &str,
        auth_data: Value,
    ) -> Result<u64> {
        check_version_body(algorithm, &auth_data)?;
        let _guard = self.locks.lock(user.as_str()).await;
        let version = self.all_versions(user)?.last().map_or(1, |(v, _)| v + 1);
        let record = BackupVersion {
            algorithm: algorithm.to_owned(),
            auth_data,
            etag: 0,
            deleted: false,
        };
        let mut batch = Batch::new();
        batch.put(
            tables::BACKUP_VERSIONS,
            &(user.to_string(), version),
            &record,
        );
        self.storage.commit(batch).await?;
        Ok(version)
    }

    /// A version (the current one when `version` is `None`).
    pub fn version(&self, user: &UserId, version: Option<u64>) -> Result<Option<VersionInfo>> {
        let found = match version {
            Some(version) => self
                .storage
                .get(tables::BACKUP_VERSIONS, &(user.to_string(), version))?
                .filter(|record| !record.deleted)
                .map(|record| (version, record)),
            None => self.current(user)?,
        };
        let Some((version, record)) = found else {
            return Ok(None);
        };
        let count = self.keys(user, version, Scope::All)?.len() as u64;
        Ok(Some(VersionInfo {
            version,
            record,
            count,
        }))
    }

    /// Replaces a version's auth data; the algorithm cannot change.
    pub async fn update_version(
        &self,
        user: &UserId,
        version: u64,
        algorithm: &str,
        auth_data: Value,
    ) -> Result<()> {
        check_version_body(algorithm, &auth_data)?;
        let _guard = self.locks.lock(user.as_str()).await;
        let key = (user.to_string(), version);
        let mut record = self.live_version(user, version)?;
        if record.algorithm != algorithm {
            return Err(Error::InvalidParam(
                "the algorithm of a backup version cannot change".to_owned(),
            ));
        }
        record.auth_data = auth_data;
        let mut batch = Batch::new();
        batch.put(tables::BACKUP_VERSIONS, &key, &record);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Deletes a version and every key in it.
    pub async fn delete_version(&self, user: &UserId, version: u64) -> Result<()> {
        let _guard = self.locks.lock(user.as_str()).await;
        let mut record = self.live_version(user, version)?;
        let mut batch = Batch::new();
        for (room, session, _) in self.keys(user, version, Scope::All)? {
            batch.delete(
                tables::BACKUP_KEYS,
                &(user.to_string(), version, room, session),
            );
        }
        record.deleted = true;
        batch.put(
            tables::BACKUP_VERSIONS,
            &(user.to_string(), version),
            &record,
        );
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Stores session keys in the current version, each replacing the one
    /// stored only if it is better (verified, then earlier first message
    /// index, then fewer forwards); answers (etag, count).
    pub async fn put_keys(
        &self,
        user: &UserId,
        version: u64,
        keys: Vec<SessionKey>,
    ) -> Result<(u64, u64)> {
        let _guard = self.locks.lock(user.as_str()).await;
        let (current, mut record) = self
            .current(user)?
            .ok_or_else(|| Error::NotFound("no backup version exists".to_owned()))?;
        if current != version {
            return Err(Error::WrongRoomKeysVersion {
                current_version: current.to_string(),
            });
        }
        let mut batch = Batch::new();
        let mut changed = false;
        for (room, session, data) in keys {
            if !data.is_object() {
                return Err(Error::BadJson(
                    "session key data must be an object".to_owned(),
                ));
            }
            let row = (user.to_string(), version, room, session);
            let stored = self.storage.get(tables::BACKUP_KEYS, &row)?;
            if stored.is_none_or(|old| better(&data, &old)) {
                batch.put(tables::BACKUP_KEYS, &row, &data);
                changed = true;
            }
        }
        if changed {
            record.etag += 1;
            batch.put(
                tables::BACKUP_VERSIONS,
                &(user.to_string(), version),
                &record,
            );
            self.storage.commit(batch).await?;
        }
        let count = self.keys(user, version, Scope::All)?.len() as u64;
        Ok((record.etag, count))
    }

    /// The keys of a version in a scope.
    pub fn keys(&self, user: &UserId, version: u64, scope: Scope<'_>) -> Result<Vec<SessionKey>> {
        let mut prefix = tables::str_prefix(user.as_str());
        prefix.extend_from_slice(&version.to_be_bytes());
        match scope {
            Scope::All => {}
            Scope::Room(room) | Scope::Session(room, _) => {
                prefix.extend_from_slice(&tables::str_prefix(room));
            }
        }
        let entries = self
            .storage
            .scan_prefix(tables::BACKUP_KEYS, &prefix, MAX_KEYS)?;
        Ok(entries
            .into_iter()
            .filter(|((_, _, _, session), _)| match scope {
                Scope::Session(_, wanted) => session == wanted,
                _ => true,
            })
            .map(|((_, _, room, session), data)| (room, session, data))
            .collect())
    }

    /// Deletes the keys of a version in a scope; answers (etag, count).
    pub async fn delete_keys(
        &self,
        user: &UserId,
        version: u64,
        scope: Scope<'_>,
    ) -> Result<(u64, u64)> {
        let _guard = self.locks.lock(user.as_str()).await;
        let mut record = self.live_version(user, version)?;
        let doomed = self.keys(user, version, scope)?;
        if !doomed.is_empty() {
            let mut batch = Batch::new();
            for (room, session, _) in doomed {
                batch.delete(
                    tables::BACKUP_KEYS,
                    &(user.to_string(), version, room, session),
                );
            }
            record.etag += 1;
            batch.put(
                tables::BACKUP_VERSIONS,
                &(user.to_string(), version),
                &record,
            );
            self.storage.commit(batch).await?;
        }
        let count = self.keys(user, version, Scope::All)?.len() as u64;
        Ok((record.etag, count))
    }

    fn live_version(&self, user: &UserId, version: u64) -> Result<BackupVersion> {
        self.storage
            .get(tables::BACKUP_VERSIONS, &(user.to_string(), version))?
            .filter(|record| !record.deleted)
            .ok_or_else(|| Error::NotFound(format!("unknown backup version {version}")))
    }

    /// The newest version not deleted.
    fn current(&self, user: &UserId) -> Result<Option<(u64, BackupVersion)>> {
        Ok(self
            .all_versions(user)?
            .into_iter()
            .rev()
            .find(|(_, record)| !record.deleted))
    }

    fn all_versions(&self, user: &UserId) -> Result<Vec<(u64, BackupVersion)>> {
        let prefix = tables::str_prefix(user.as_str());
        let versions: BTreeMap<u64, BackupVersion> = self
            .storage
            .scan_prefix(tables::BACKUP_VERSIONS, &prefix, MAX_VERSIONS)?
            .into_iter()
            .map(|((_, version), record)| (version, record))
            .collect();
        Ok(versions.into_iter().collect())
    }
}

fn check_version_body(algorithm: &str, auth_data: &Value) -> Result<()> {
    if algorithm.is_empty() || !auth_data.is_object() {
        return Err(Error::BadJson(
            "a backup version needs an algorithm and an auth_data object".to_owned(),
        ));
    }
    Ok(())
}

/// Whether `new` should replace `old`: a verified key beats an unverified
/// one, then the earlier first message index, then fewer forwards.
fn better(new: &Value, old: &Value) -> bool {
    let verified = |v: &Value| v["is_verified"].as_bool().unwrap_or(false);
    let index = |v: &Value| v["first_message_index"].as_u64().unwrap_or(u64::MAX);
    let forwards = |v: &Value| v["forwarded_count"].as_u64().unwrap_or(u64::MAX);
    (!verified(new), index(new), forwards(new)) < (!verified(old), index(old), forwards(old))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_stored_key_is_replaced_only_by_a_better_one() {
        let key = |verified: bool, index: u64, forwards: u64| json!({ "is_verified": verified, "first_message_index": index, "forwarded_count": forwards });
        assert!(better(&key(true, 9, 9), &key(false, 0, 0)));
        assert!(!better(&key(false, 0, 0), &key(true, 9, 9)));
        assert!(better(&key(false, 1, 9), &key(false, 2, 0)));
        assert!(better(&key(false, 1, 0), &key(false, 1, 1)));
        assert!(
            !better(&key(false, 1, 1), &key(false, 1, 1)),
            "equal keeps the old"
        );
    }
}
