//! Pushers: where a user's push notifications go (a push gateway's URL and
//! the pushkey that names the device there), set by a client for its
//! device. A pusher belongs to the device whose access token set it, and
//! is deleted with it.

use std::net::IpAddr;
use std::sync::Arc;

use myelin_federation::ip_ranges::IpPolicy;
use serde_json::{json, Value};

use super::clock::Clock;
use super::error::{Error, Result};
use crate::storage::tables::{self, KeyPart, NotificationRecord, PusherRecord};
use crate::storage::{prefix_successor, Batch, Direction, Key, KeyRange, Storage};

/// The path a gateway's URL must have (the push gateway API).
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";
/// Longest pushkey (bytes) and app ID (characters), as the spec says.
const MAX_PUSHKEY_BYTES: usize = 512;
const MAX_APP_ID_CHARS: usize = 64;
/// Most pushers of one account.
const MAX_PUSHERS: usize = 100;

/// A pusher's key: (localpart, app ID, pushkey).
pub type PusherKey = (String, String, String);

/// What `POST /pushers/set` asks.
pub struct SetPusher {
    pub kind: Option<String>,
    pub app_id: String,
    pub pushkey: String,
    pub app_display_name: Option<String>,
    pub device_display_name: Option<String>,
    pub profile_tag: Option<String>,
    pub lang: Option<String>,
    pub data: Option<Value>,
    pub append: bool,
}

pub struct Pushers {
    storage: Storage,
    clock: Arc<dyn Clock>,
    policy: IpPolicy,
}

impl Pushers {
    pub fn new(storage: Storage, clock: Arc<dyn Clock>, policy: IpPolicy) -> Self {
        Pushers {
            storage,
            clock,
            policy,
        }
    }

    /// The account's pushers, as `GET /pushers` shows them.
    pub fn list(&self, localpart: &str) -> Result<Vec<Value>> {
        Ok(self
            .of_user(localpart)?
            .into_iter()
            .map(|((_, app_id, pushkey), pusher)| {
                let mut shown = json!({
                    "pushkey": pushkey,
                    "kind": pusher.kind,
                    "app_id": app_id,
                    "app_display_name": pusher.app_display_name,
                    "device_display_name": pusher.device_display_name,
                    "lang": pusher.lang,
                    "data": pusher.data,
                });
                if let Some(tag) = pusher.profile_tag {
                    shown["profile_tag"] = json!(tag);
                }
                shown
            })
            .collect())
    }

    /// Every pusher of an account, by (localpart, app ID, pushkey).
    pub fn of_user(&self, localpart: &str) -> Result<Vec<(PusherKey, PusherRecord)>> {
        Ok(self.storage.scan_prefix(
            tables::PUSHERS,
            &tables::str_prefix(localpart),
            MAX_PUSHERS,
        )?)
    }

    /// Whether the account has any pusher.
    pub fn has_any(&self, localpart: &str) -> Result<bool> {
        Ok(!self
            .storage
            .scan_prefix(tables::PUSHERS, &tables::str_prefix(localpart), 1)?
            .is_empty())
    }

    /// Sets, replaces or (kind `null`) deletes a pusher of the account.
    pub async fn set(&self, localpart: &str, device_id: &str, request: SetPusher) -> Result<()> {
        check_length("app_id", &request.app_id, MAX_APP_ID_CHARS, true)?;
        if request.pushkey.is_empty() || request.pushkey.len() > MAX_PUSHKEY_BYTES {
            return Err(Error::InvalidParam(format!(
                "pushkey must be 1 to {MAX_PUSHKEY_BYTES} bytes"
            )));
        }
        let key = (
            localpart.to_owned(),
            request.app_id.clone(),
            request.pushkey.clone(),
        );
        let index = (
            request.app_id.clone(),
            request.pushkey.clone(),
            localpart.to_owned(),
        );
        let mut batch = Batch::new();
        let Some(kind) = request.kind else {
            // Deleting a pusher that is not there changes nothing.
            batch.delete(tables::PUSHERS, &key);
            batch.delete(tables::PUSHER_KEYS, &index);
            forget_queue_into(&self.storage, &mut batch, &key)?;
            self.storage.commit(batch).await?;
            return Ok(());
        };
        if kind != "http" {
            return Err(Error::InvalidParam(format!(
                "unsupported pusher kind {kind:?}: only \"http\" is"
            )));
        }
        let required = |name: &str, value: Option<String>| {
            value.ok_or_else(|| Error::MissingParam(format!("Missing parameter: {name}")))
        };
        let app_display_name = required("app_display_name", request.app_display_name)?;
        let device_display_name = required("device_display_name", request.device_display_name)?;
        let lang = required("lang", request.lang)?;
        let data = request
            .data
            .filter(Value::is_object)
            .ok_or_else(|| Error::MissingParam("Missing parameter: data".to_owned()))?;
        let url = data.get("url").and_then(Value::as_str).ok_or_else(|| {
            Error::InvalidParam("data.url is required for an http pusher".to_owned())
        })?;
        self.check_url(url).await?;
        if let Some(format) = data.get("format") {
            if format != "event_id_only" {
                return Err(Error::InvalidParam(
                    "data.format must be \"event_id_only\" when given".to_owned(),
                ));
            }
        }
        if !request.append {
            // The pushkey is this account's alone now.
            let mut prefix = Vec::new();
            request.app_id.put(&mut prefix);
            request.pushkey.put(&mut prefix);
            let others = self
                .storage
                .scan_prefix(tables::PUSHER_KEYS, &prefix, usize::MAX)?;
            for ((app_id, pushkey, other), ()) in others {
                if other != localpart {
                    let other_key = (other.clone(), app_id.clone(), pushkey.clone());
                    batch.delete(tables::PUSHERS, &other_key);
                    batch.delete(tables::PUSHER_KEYS, &(app_id, pushkey, other));
                    forget_queue_into(&self.storage, &mut batch, &other_key)?;
                }
            }
        }
        if self.storage.get(tables::PUSHERS, &key)?.is_none()
            && self.of_user(localpart)?.len() >= MAX_PUSHERS
        {
            return Err(Error::InvalidParam(format!(
                "an account may have at most {MAX_PUSHERS} pushers"
            )));
        }
        let record = PusherRecord {
            kind,
            app_display_name,
            device_display_name,
            profile_tag: request.profile_tag,
            lang,
            data,
            device_id: Some(device_id.to_owned()),
            created_ms: self.clock.now_ms(),
        };
        batch.put(tables::PUSHERS, &key, &record);
        batch.put(tables::PUSHER_KEYS, &index, &());
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Deletes a pusher and what waits for it (a gateway rejected its
    /// pushkey).
    pub async fn remove(&self, key: &PusherKey) -> Result<()> {
        let mut batch = Batch::new();
        batch.delete(tables::PUSHERS, key);
        batch.delete(
            tables::PUSHER_KEYS,
            &(key.1.clone(), key.2.clone(), key.0.clone()),
        );
        forget_queue_into(&self.storage, &mut batch, key)?;
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// A gateway URL must be HTTP(S), end in the notify path, and not be
    /// at a denied address (checked for every address its host has).
    async fn check_url(&self, url: &str) -> Result<()> {
        let invalid = |why: String| Error::InvalidParam(format!("data.url {url:?}: {why}"));
        let parsed = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if parsed.scheme() != "https" && parsed.scheme() != "http" {
            return Err(invalid("must be an http or https URL".to_owned()));
        }
        if parsed.path() != NOTIFY_PATH {
            return Err(invalid(format!("the path must be {NOTIFY_PATH}")));
        }
        self.check_address(&parsed).await.map_err(invalid)?;
        Ok(())
    }

    /// Up to `count` of the events that notified the user, newest first,
    /// before the stream position `before` (exclusive).
    pub fn notifications(
        &self,
        localpart: &str,
        before: Option<u64>,
        count: usize,
    ) -> Result<Vec<(u64, NotificationRecord)>> {
        let prefix = tables::str_prefix(localpart);
        let upper = match before {
            Some(before) => (localpart.to_owned(), before).encode(),
            None => prefix_successor(&prefix).unwrap_or_default(),
        };
        let range = KeyRange {
            lower: prefix,
            upper: Some(upper),
        };
        Ok(self
            .storage
            .scan(tables::NOTIFICATIONS, &range, Direction::Backward, count)?
            .into_iter()
            .map(|((_, position), record)| (position, record))
            .collect())
    }

    /// Whether every address of the URL's host is one push may go to
    /// (when the pusher is set, and again before each request, as DNS may
    /// have changed); the reason when not.
    pub async fn check_address(&self, url: &reqwest::Url) -> std::result::Result<(), String> {
        let host = url
            .host_str()
            .ok_or_else(|| "names no host".to_owned())?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let addresses: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                let port = url.port_or_known_default().unwrap_or(443);
                tokio::net::lookup_host((host, port))
                    .await
                    .map_err(|e| format!("its host cannot be resolved: {e}"))?
                    .map(|address| address.ip())
                    .collect()
            }
        };
        if addresses.is_empty() || addresses.iter().any(|ip| !self.policy.permits(*ip)) {
            return Err(
                "its host is at an address this server may not push to (see push.ip_range_allowlist)"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

/// Adds to `batch` the deletion of a device's pushers (the device is being
/// deleted: logged out, or its account's password changed).
pub fn forget_device_into(
    storage: &Storage,
    batch: &mut Batch,
    localpart: &str,
    device_id: &str,
) -> Result<()> {
    let pushers =
        storage.scan_prefix(tables::PUSHERS, &tables::str_prefix(localpart), MAX_PUSHERS)?;
    for (key, pusher) in pushers {
        if pusher.device_id.as_deref() == Some(device_id) {
            batch.delete(tables::PUSHERS, &key);
            batch.delete(
                tables::PUSHER_KEYS,
                &(key.1.clone(), key.2.clone(), key.0.clone()),
            );
            forget_queue_into(storage, batch, &key)?;
        }
    }
    Ok(())
}

/// Adds to `batch` the deletion of what waits for a pusher.
fn forget_queue_into(storage: &Storage, batch: &mut Batch, key: &PusherKey) -> Result<()> {
    let mut prefix = Vec::new();
    key.0.put(&mut prefix);
    key.1.put(&mut prefix);
    key.2.put(&mut prefix);
    for (item, _) in storage.scan_prefix(tables::PUSH_QUEUE, &prefix, usize::MAX)? {
        batch.delete(tables::PUSH_QUEUE, &item);
    }
    Ok(())
}

fn check_length(name: &str, value: &str, max_chars: usize, required: bool) -> Result<()> {
    if (required && value.is_empty()) || value.chars().count() > max_chars {
        return Err(Error::InvalidParam(format!(
            "{name} must be 1 to {max_chars} characters"
        )));
    }
    Ok(())
}
