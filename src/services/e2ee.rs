//! End-to-end encryption support: the keys devices publish (identity
//! keys, one-time keys, fallback keys) and the to-device messages they send
//! each other. The server stores and hands these out; it never sees a
//! message's plaintext.
//!
//! The only writer of `device_keys`, `one_time_keys`, `fallback_keys` and
//! `to_device` (besides device deletion in `accounts`, which removes a
//! device's rows in the same batch as the device).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ruma::UserId;
use serde_json::{Map, Value};

use super::clock::Clock;
use super::error::{Error, Result};
use super::locks::StripedLocks;
use super::stream::{Reservation, StreamCounter};
use crate::storage::tables::{self, FallbackKey, OneTimeKey, StreamEntry, ToDeviceMessage};
use crate::storage::{Batch, Storage};

/// Most one-time keys one device may hold.
const MAX_ONE_TIME_KEYS: usize = 10_000;
/// Most to-device messages one sync delivers.
pub const MAX_TO_DEVICE_PER_SYNC: usize = 1000;
/// Most waiting to-device messages removed with their device at once.
const MAX_WAITING_TO_DEVICE: usize = 1_000_000;
/// Most devices one `*` message fans out to.
const MAX_DEVICES: usize = 10_000;

pub struct E2ee {
    storage: Storage,
    stream: Arc<StreamCounter>,
    locks: StripedLocks,
    /// Upload order of one-time keys; starts at a thousand times the boot
    /// time in ms so that it keeps growing across restarts.
    upload_order: AtomicU64,
}

/// A one-time key's row: (user ID, device ID, algorithm, key ID).
type OneTimeKeyRow = (String, String, String, String);

/// A one-time key handed out by a claim: (`algorithm:key_id`, key).
pub type Claimed = (String, Value);

impl E2ee {
    pub fn new(storage: Storage, stream: Arc<StreamCounter>, clock: &dyn Clock) -> Self {
        E2ee {
            storage,
            stream,
            locks: StripedLocks::new(64),
            upload_order: AtomicU64::new(clock.now_ms().saturating_mul(1000)),
        }
    }

    /// `POST /keys/upload`: stores the device's keys; answers the one-time
    /// key counts. Identity keys must name this user and device; a one-time
    /// key ID uploaded again must carry the same key.
    pub async fn upload(
        &self,
        user: &UserId,
        device_id: &str,
        device_keys: Option<Value>,
        one_time_keys: Map<String, Value>,
        fallback_keys: Map<String, Value>,
    ) -> Result<BTreeMap<String, u64>> {
        let _guard = self.locks.lock(&format!("{user} {device_id}")).await;
        let mut batch = Batch::new();
        let mut reservation: Option<Reservation> = None;
        if let Some(keys) = device_keys {
            if keys["user_id"] != user.as_str() || keys["device_id"] != device_id {
                return Err(Error::InvalidParam(
                    "device_keys must name the uploading user and device".to_owned(),
                ));
            }
            check_key_object(&keys)?;
            let keys = without_unsigned(keys);
            let key = (user.to_string(), device_id.to_owned());
            if self.storage.get(tables::DEVICE_KEYS, &key)?.as_ref() != Some(&keys) {
                batch.put(tables::DEVICE_KEYS, &key, &keys);
                let entry = StreamEntry::DeviceList {
                    user_id: user.to_string(),
                };
                reservation = Some(self.stream.next_into(&mut batch, &entry).1);
            }
        }
        let held = self.one_time_keys(user, device_id)?.len();
        if held + one_time_keys.len() > MAX_ONE_TIME_KEYS {
            return Err(Error::InvalidParam(format!(
                "a device may hold at most {MAX_ONE_TIME_KEYS} one-time keys"
            )));
        }
        for (full_id, key) in one_time_keys {
            let (algorithm, key_id) = split_key_id(&full_id)?;
            let row = (user.to_string(), device_id.to_owned(), algorithm, key_id);
            match self.storage.get(tables::ONE_TIME_KEYS, &row)? {
                Some(existing) if existing.key == key => continue,
                Some(_) => {
                    return Err(Error::InvalidParam(format!(
                        "one-time key {full_id} already exists with another value"
                    )))
                }
                None => {}
            }
            let uploaded = self.upload_order.fetch_add(1, Ordering::SeqCst);
            batch.put(tables::ONE_TIME_KEYS, &row, &OneTimeKey { key, uploaded });
        }
        for (full_id, key) in fallback_keys {
            let (algorithm, key_id) = split_key_id(&full_id)?;
            let row = (user.to_string(), device_id.to_owned(), algorithm);
            let fallback = FallbackKey {
                key_id,
                key,
                used: false,
            };
            batch.put(tables::FALLBACK_KEYS, &row, &fallback);
        }
        self.storage.commit(batch).await?;
        drop(reservation);
        self.one_time_key_counts(user, device_id)
    }

    /// Unclaimed one-time keys per algorithm.
    pub fn one_time_key_counts(
        &self,
        user: &UserId,
        device_id: &str,
    ) -> Result<BTreeMap<String, u64>> {
        let mut counts = BTreeMap::new();
        for ((_, _, algorithm, _), _) in self.one_time_keys(user, device_id)? {
            *counts.entry(algorithm).or_insert(0) += 1;
        }
        Ok(counts)
    }

    /// The algorithms of the device's fallback keys not yet handed out.
    pub fn unused_fallback_key_types(&self, user: &UserId, device_id: &str) -> Result<Vec<String>> {
        let prefix = tables::str2_prefix(user.as_str(), device_id);
        Ok(self
            .storage
            .scan_prefix(tables::FALLBACK_KEYS, &prefix, MAX_ONE_TIME_KEYS)?
            .into_iter()
            .filter(|(_, key)| !key.used)
            .map(|((_, _, algorithm), _)| algorithm)
            .collect())
    }

    /// A device's identity keys.
    pub fn device_keys(&self, user: &UserId, device_id: &str) -> Result<Option<Value>> {
        let key = (user.to_string(), device_id.to_owned());
        Ok(self.storage.get(tables::DEVICE_KEYS, &key)?)
    }

    /// `POST /keys/claim` for one device: its oldest one-time key of the
    /// algorithm, removed as it is handed out; else its fallback key,
    /// marked used. Each one-time key is handed out at most once.
    pub async fn claim(
        &self,
        user: &UserId,
        device_id: &str,
        algorithm: &str,
    ) -> Result<Option<Claimed>> {
        let _guard = self.locks.lock(&format!("{user} {device_id}")).await;
        let oldest = self
            .one_time_keys(user, device_id)?
            .into_iter()
            .filter(|((_, _, alg, _), _)| alg == algorithm)
            .min_by_key(|(_, key)| key.uploaded);
        let mut batch = Batch::new();
        if let Some((row, key)) = oldest {
            batch.delete(tables::ONE_TIME_KEYS, &row);
            self.storage.commit(batch).await?;
            return Ok(Some((format!("{}:{}", row.2, row.3), key.key)));
        }
        let row = (user.to_string(), device_id.to_owned(), algorithm.to_owned());
        let Some(mut fallback) = self.storage.get(tables::FALLBACK_KEYS, &row)? else {
            return Ok(None);
        };
        if !fallback.used {
            fallback.used = true;
            batch.put(tables::FALLBACK_KEYS, &row, &fallback);
            self.storage.commit(batch).await?;
        }
        Ok(Some((
            format!("{algorithm}:{}", fallback.key_id),
            fallback.key,
        )))
    }

    fn one_time_keys(
        &self,
        user: &UserId,
        device_id: &str,
    ) -> Result<Vec<(OneTimeKeyRow, OneTimeKey)>> {
        let prefix = tables::str2_prefix(user.as_str(), device_id);
        Ok(self
            .storage
            .scan_prefix(tables::ONE_TIME_KEYS, &prefix, MAX_ONE_TIME_KEYS)?)
    }

    /// `PUT /sendToDevice`: queues each message for its device (every
    /// device of the user for `*`), each at its own stream position, in one
    /// batch; `devices_of` lists a user's devices. `also` adds to the same
    /// batch (the messages for other servers); a transaction seen before
    /// writes nothing, and the answer says whether anything was written.
    pub async fn send_to_device(
        &self,
        sender: &UserId,
        kind: &str,
        messages: Vec<(String, String, Value)>,
        devices_of: impl Fn(&str) -> Result<Vec<String>>,
        txn: Option<(String, String, String)>,
        also: impl FnOnce(&mut Batch),
    ) -> Result<bool> {
        let mut batch = Batch::new();
        if let Some(key) = &txn {
            if self.storage.get(tables::TRANSACTIONS, key)?.is_some() {
                return Ok(false);
            }
            batch.put(tables::TRANSACTIONS, key, &String::new());
        }
        also(&mut batch);
        let mut reservations = Vec::new();
        for (user_id, device, content) in messages {
            let devices = if device == "*" {
                devices_of(&user_id)?
            } else {
                vec![device]
            };
            for device_id in devices.into_iter().take(MAX_DEVICES) {
                let entry = StreamEntry::ToDevice {
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                };
                let (position, reservation) = self.stream.next_into(&mut batch, &entry);
                reservations.push(reservation);
                let message = ToDeviceMessage {
                    sender: sender.to_string(),
                    kind: kind.to_owned(),
                    content: content.clone(),
                };
                let row = (user_id.clone(), device_id, position);
                batch.put(tables::TO_DEVICE, &row, &message);
            }
        }
        self.storage.commit(batch).await?;
        drop(reservations);
        Ok(true)
    }

    /// The device's waiting messages after stream position `after` and up
    /// to `upto`, oldest first, at most [`MAX_TO_DEVICE_PER_SYNC`]:
    /// (position, message).
    pub fn to_device(
        &self,
        user: &UserId,
        device_id: &str,
        after: u64,
        upto: u64,
    ) -> Result<Vec<(u64, ToDeviceMessage)>> {
        let prefix = tables::str2_prefix(user.as_str(), device_id);
        let mut range = crate::storage::KeyRange::prefix(&prefix);
        range.lower = tables::to_device_key_prefix(&prefix, after.saturating_add(1));
        Ok(self
            .storage
            .scan(
                tables::TO_DEVICE,
                &range,
                crate::storage::Direction::Forward,
                MAX_TO_DEVICE_PER_SYNC,
            )?
            .into_iter()
            .filter(|((_, _, position), _)| *position <= upto)
            .map(|((_, _, position), message)| (position, message))
            .collect())
    }

    /// Deletes the device's messages up to `position`: the device has
    /// synced past them, so it has them.
    pub async fn acknowledge_to_device(
        &self,
        user: &UserId,
        device_id: &str,
        position: u64,
    ) -> Result<()> {
        let prefix = tables::str2_prefix(user.as_str(), device_id);
        let delivered: Vec<_> = self
            .storage
            .scan_prefix(tables::TO_DEVICE, &prefix, MAX_TO_DEVICE_PER_SYNC)?
            .into_iter()
            .map(|(row, _)| row)
            .filter(|(_, _, p)| *p <= position)
            .collect();
        if delivered.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::new();
        for row in delivered {
            batch.delete(tables::TO_DEVICE, &row);
        }
        self.storage.commit(batch).await?;
        Ok(())
    }
}

/// The usages of cross-signing keys, in upload order.
pub const CROSS_SIGNING_USAGES: [&str; 3] = ["master", "self_signing", "user_signing"];

impl E2ee {
    /// One of the user's cross-signing keys.
    pub fn cross_signing_key(&self, user: &UserId, usage: &str) -> Result<Option<Value>> {
        let key = (user.to_string(), usage.to_owned());
        Ok(self.storage.get(tables::CROSS_SIGNING_KEYS, &key)?)
    }

    /// Whether an upload of cross-signing keys needs interactive auth: not
    /// the first one, nor one identical to what is stored.
    pub fn cross_signing_upload_needs_auth(
        &self,
        user: &UserId,
        keys: &[(String, Value)],
    ) -> Result<bool> {
        let mut any_stored = false;
        let mut all_same = true;
        for usage in CROSS_SIGNING_USAGES {
            let stored = self.cross_signing_key(user, usage)?;
            any_stored |= stored.is_some();
            if let Some((_, given)) = keys.iter().find(|(u, _)| u == usage) {
                all_same &= stored.as_ref() == Some(&without_unsigned(given.clone()));
            }
        }
        Ok(any_stored && !all_same)
    }

    /// `POST /keys/device_signing/upload`, once authorised: each key must
    /// be the user's, for its usage, with exactly one public key.
    pub async fn upload_cross_signing(
        &self,
        user: &UserId,
        keys: Vec<(String, Value)>,
    ) -> Result<()> {
        let _guard = self.locks.lock(user.as_str()).await;
        let mut batch = Batch::new();
        for (usage, key) in &keys {
            check_key_object(key)?;
            let names_usage = key["usage"]
                .as_array()
                .is_some_and(|usages| usages.iter().any(|u| u == usage.as_str()));
            let one_key = key["keys"].as_object().is_some_and(|k| k.len() == 1);
            if key["user_id"] != user.as_str() || !names_usage || !one_key {
                return Err(Error::InvalidParam(format!(
                    "the {usage} key must name {user}, the usage {usage:?} and one public key"
                )));
            }
            let row = (user.to_string(), usage.clone());
            batch.put(
                tables::CROSS_SIGNING_KEYS,
                &row,
                &without_unsigned(key.clone()),
            );
        }
        let entry = StreamEntry::DeviceList {
            user_id: user.to_string(),
        };
        let (_, _reservation) = self.stream.next_into(&mut batch, &entry);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// `POST /keys/signatures/upload`: adds the signer's signatures to the
    /// devices and cross-signing keys named; answers the failures per user
    /// and key ID. The signed object must be the stored one (for another
    /// server's user, the key as known here), and each signature must
    /// verify with one of the signer's keys. Signatures of other servers'
    /// users' keys are kept for the signer alone.
    pub async fn upload_signatures(
        &self,
        signer: &UserId,
        objects: Vec<SignedKey>,
    ) -> Result<BTreeMap<String, BTreeMap<String, Value>>> {
        let _guard = self.locks.lock(signer.as_str()).await;
        let mut failures: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        let mut fail = |user: &str, key_id: &str, errcode: &str, error: &str| {
            failures.entry(user.to_owned()).or_default().insert(
                key_id.to_owned(),
                serde_json::json!({ "errcode": errcode, "error": error }),
            );
        };
        let mut batch = Batch::new();
        let mut changed = std::collections::BTreeSet::new();
        for SignedKey {
            user_id,
            key_id,
            object,
            remote,
        } in objects
        {
            let Some(new_signatures) = object["signatures"][signer.as_str()].as_object() else {
                fail(
                    &user_id,
                    &key_id,
                    "M_INVALID_PARAM",
                    "no signature by the uploader",
                );
                continue;
            };
            let found = match remote {
                None => self
                    .signable(&user_id, &key_id)?
                    .map(|(row, stored)| (row, stored.clone(), stored)),
                Some(known) => {
                    let row = (signer.to_string(), user_id.clone(), key_id.clone());
                    let kept = self
                        .storage
                        .get(tables::REMOTE_SIGNATURES, &row)?
                        .unwrap_or_else(|| serde_json::json!({ "signatures": {} }));
                    known.map(|key| (Signable::Remote(row), key, kept))
                }
            };
            let Some((row, key, mut stored)) = found else {
                fail(&user_id, &key_id, "M_NOT_FOUND", "unknown key");
                continue;
            };
            if without_signatures(&key) != without_signatures(&object) {
                fail(
                    &user_id,
                    &key_id,
                    "M_INVALID_PARAM",
                    "the signed object is not the stored key",
                );
                continue;
            }
            if let Err(reason) = self.check_signatures(signer, new_signatures, &object) {
                fail(&user_id, &key_id, "M_INVALID_SIGNATURE", &reason);
                continue;
            }
            for (name, signature) in new_signatures {
                add_signature(&mut stored, signer.as_str(), name, signature.clone());
            }
            match row {
                Signable::Device(row) => batch.put(tables::DEVICE_KEYS, &row, &stored),
                Signable::CrossSigning(row) => batch.put(tables::CROSS_SIGNING_KEYS, &row, &stored),
                Signable::Remote(row) => batch.put(tables::REMOTE_SIGNATURES, &row, &stored),
            }
            changed.insert(user_id);
        }
        let mut reservations = Vec::new();
        for user_id in changed {
            let entry = StreamEntry::DeviceList { user_id };
            reservations.push(self.stream.next_into(&mut batch, &entry).1);
        }
        self.storage.commit(batch).await?;
        drop(reservations);
        Ok(failures)
    }

    /// Adds to `key` (a key of `owner`, another server's user, whose ID is
    /// `key_id`) the signatures `viewer` made of it.
    pub fn add_own_signatures(
        &self,
        viewer: &UserId,
        owner: &str,
        key_id: &str,
        key: &mut Value,
    ) -> Result<()> {
        let row = (viewer.to_string(), owner.to_owned(), key_id.to_owned());
        if let Some(stored) = self.storage.get(tables::REMOTE_SIGNATURES, &row)? {
            for (name, signature) in stored["signatures"][viewer.as_str()]
                .as_object()
                .into_iter()
                .flatten()
            {
                add_signature(key, viewer.as_str(), name, signature.clone());
            }
        }
        Ok(())
    }

    /// Checks each of the signer's new signatures on `object` against the
    /// signer's public key it names (one of their devices or cross-signing
    /// keys); `Err` says why one does not hold.
    fn check_signatures(
        &self,
        signer: &UserId,
        signatures: &Map<String, Value>,
        object: &Value,
    ) -> std::result::Result<(), String> {
        let canonical: ruma::CanonicalJsonObject = serde_json::from_value(object.clone())
            .map_err(|e| format!("not canonical JSON: {e}"))?;
        let signed = ruma::signatures::to_canonical_json_string_for_signing(&canonical)
            .map_err(|e| e.to_string())?;
        for (name, signature) in signatures {
            let public_key = self
                .signing_key(signer, name)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("{name} is not a key of {signer}"))?;
            let decode = |text: &str| {
                ruma::serde::Base64::<ruma::serde::base64::Standard>::parse(text)
                    .map(|b| b.into_inner())
                    .map_err(|e| e.to_string())
            };
            let signature = decode(signature.as_str().ok_or("a signature must be a string")?)?;
            ruma::signatures::verify_canonical_json_bytes(
                &ruma::SigningKeyAlgorithm::Ed25519,
                &decode(&public_key)?,
                &signature,
                signed.as_bytes(),
            )
            .map_err(|_| format!("the signature by {name} does not verify"))?;
        }
        Ok(())
    }

    /// The public key behind `ed25519:<id>` of a user: a device's key, or a
    /// cross-signing key (whose ID is the key itself).
    fn signing_key(&self, user: &UserId, name: &str) -> Result<Option<String>> {
        let Some(id) = name.strip_prefix("ed25519:") else {
            return Ok(None);
        };
        if let Some(keys) = self.device_keys(user, id)? {
            if let Some(key) = keys["keys"][name].as_str() {
                return Ok(Some(key.to_owned()));
            }
        }
        for usage in CROSS_SIGNING_USAGES {
            if let Some(key) = self.cross_signing_key(user, usage)? {
                if let Some(public) = key["keys"][name].as_str() {
                    return Ok(Some(public.to_owned()));
                }
            }
        }
        Ok(None)
    }

    /// A device's keys (key ID = device ID) or a cross-signing key (key ID
    /// = its public key) of a user.
    fn signable(&self, user_id: &str, key_id: &str) -> Result<Option<(Signable, Value)>> {
        let row = (user_id.to_owned(), key_id.to_owned());
        if let Some(keys) = self.storage.get(tables::DEVICE_KEYS, &row)? {
            return Ok(Some((Signable::Device(row), keys)));
        }
        for usage in CROSS_SIGNING_USAGES {
            let row = (user_id.to_owned(), usage.to_owned());
            if let Some(key) = self.storage.get(tables::CROSS_SIGNING_KEYS, &row)? {
                let matches = key["keys"]
                    .as_object()
                    .is_some_and(|keys| keys.contains_key(&format!("ed25519:{key_id}")));
                if matches {
                    return Ok(Some((Signable::CrossSigning(row), key)));
                }
            }
        }
        Ok(None)
    }
}

enum Signable {
    Device((String, String)),
    CrossSigning((String, String)),
    /// A signature of another server's user's key: (signer, user, key ID).
    Remote((String, String, String)),
}

/// One signed object of `POST /keys/signatures/upload`.
pub struct SignedKey {
    pub user_id: String,
    pub key_id: String,
    pub object: Value,
    /// For another server's user: the key as known here (`None` when it is
    /// not known). `None` for local users, whose keys are stored.
    pub remote: Option<Option<Value>>,
}

/// A key object as stored: an object whose `keys` is an object and whose
/// `signatures`, if any, maps users to objects.
fn check_key_object(key: &Value) -> Result<()> {
    let bad = |what: &str| Err(Error::BadJson(format!("keys: {what}")));
    let Some(fields) = key.as_object() else {
        return bad("must be an object");
    };
    if !fields.get("keys").is_some_and(Value::is_object) {
        return bad("`keys` must be an object");
    }
    if let Some(signatures) = fields.get("signatures") {
        let well_formed = signatures
            .as_object()
            .is_some_and(|users| users.values().all(Value::is_object));
        if !well_formed {
            return bad("`signatures` must map users to objects");
        }
    }
    Ok(())
}

/// A key object without the unsigned data a client may have sent: that
/// part is the server's to fill in.
fn without_unsigned(mut key: Value) -> Value {
    if let Some(fields) = key.as_object_mut() {
        fields.remove("unsigned");
    }
    key
}

/// Adds one signature to a stored key object, whatever shape its
/// `signatures` had.
fn add_signature(stored: &mut Value, signer: &str, name: &str, signature: Value) {
    let Some(fields) = stored.as_object_mut() else {
        return;
    };
    let signatures = fields
        .entry("signatures")
        .or_insert_with(|| Value::Object(Map::new()));
    if !signatures.is_object() {
        *signatures = Value::Object(Map::new());
    }
    let Some(by_user) = signatures.as_object_mut() else {
        return;
    };
    let mine = by_user
        .entry(signer)
        .or_insert_with(|| Value::Object(Map::new()));
    if !mine.is_object() {
        *mine = Value::Object(Map::new());
    }
    if let Some(mine) = mine.as_object_mut() {
        mine.insert(name.to_owned(), signature);
    }
}

/// A key object without its signatures and unsigned data, to compare what
/// was signed with what is stored.
fn without_signatures(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(fields) = object.as_object_mut() {
        fields.remove("signatures");
        fields.remove("unsigned");
    }
    object
}

/// Adds to `batch` the removal of every key and waiting message of a
/// device, for its deletion.
pub fn forget_device_into(
    storage: &Storage,
    batch: &mut Batch,
    user_id: &str,
    device_id: &str,
) -> Result<()> {
    let prefix = tables::str2_prefix(user_id, device_id);
    batch.delete(
        tables::DEVICE_KEYS,
        &(user_id.to_owned(), device_id.to_owned()),
    );
    for (row, _) in storage.scan_prefix(tables::ONE_TIME_KEYS, &prefix, MAX_ONE_TIME_KEYS)? {
        batch.delete(tables::ONE_TIME_KEYS, &row);
    }
    for (row, _) in storage.scan_prefix(tables::FALLBACK_KEYS, &prefix, MAX_ONE_TIME_KEYS)? {
        batch.delete(tables::FALLBACK_KEYS, &row);
    }
    for (row, _) in storage.scan_prefix(tables::TO_DEVICE, &prefix, MAX_WAITING_TO_DEVICE)? {
        batch.delete(tables::TO_DEVICE, &row);
    }
    batch.delete(
        tables::DELIVERY_ACKS,
        &(user_id.to_owned(), device_id.to_owned()),
    );
    Ok(())
}

/// `signed_curve25519:AAAAHQ` → (`signed_curve25519`, `AAAAHQ`).
fn split_key_id(full_id: &str) -> Result<(String, String)> {
    match full_id.split_once(':') {
        Some((algorithm, key_id)) if !algorithm.is_empty() && !key_id.is_empty() => {
            Ok((algorithm.to_owned(), key_id.to_owned()))
        }
        _ => Err(Error::InvalidParam(format!(
            "{full_id:?} is not an algorithm:key_id pair"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::clock::ManualClock;
    use serde_json::json;

    #[tokio::test]
    async fn one_time_keys_go_oldest_first_then_the_fallback_key() {
        let storage = Storage::in_memory();
        let stream = Arc::new(StreamCounter::load(&storage, Arc::default()).unwrap());
        let e2ee = E2ee::new(storage, stream, &ManualClock::new(1));
        let user = UserId::parse("@a:x").unwrap();
        let keys = |ids: &[&str]| -> Map<String, Value> {
            ids.iter()
                .map(|id| (format!("signed_curve25519:{id}"), json!({ "key": id })))
                .collect()
        };
        // Uploaded later but named earlier: upload order decides.
        e2ee.upload(&user, "D", None, keys(&["ZZZ"]), Map::new())
            .await
            .unwrap();
        let fallback = keys(&["FFF"]);
        let counts = e2ee
            .upload(&user, "D", None, keys(&["AAA"]), fallback)
            .await
            .unwrap();
        assert_eq!(counts["signed_curve25519"], 2);
        let mut order = Vec::new();
        for _ in 0..4 {
            let (key_id, _) = e2ee
                .claim(&user, "D", "signed_curve25519")
                .await
                .unwrap()
                .unwrap();
            order.push(key_id);
        }
        assert_eq!(
            order,
            [
                "signed_curve25519:ZZZ",
                "signed_curve25519:AAA",
                "signed_curve25519:FFF",
                "signed_curve25519:FFF"
            ]
        );
        assert!(e2ee
            .unused_fallback_key_types(&user, "D")
            .unwrap()
            .is_empty());
        assert!(e2ee.claim(&user, "D", "other").await.unwrap().is_none());
        assert!(matches!(
            e2ee.upload(&user, "D", None, keys(&[""]), Map::new()).await,
            Err(Error::InvalidParam(_))
        ));
    }
}
