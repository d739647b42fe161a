//! Profile fields (`displayname`, `avatar_url`, `m.tz` and custom keys).
//!
//! A profile is one JSON object per account. The limits are the spec's:
//! keys up to 255 bytes, the whole profile under 64 KiB.

use super::error::{Error, Result};
use super::locks::StripedLocks;
use crate::storage::{tables, Batch, Storage};

pub type Profile = serde_json::Map<String, serde_json::Value>;

/// Longest profile key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;
/// Largest profile, serialized, in bytes.
pub const MAX_PROFILE_BYTES: usize = 64 * 1024;
/// Longest display name, in characters (Synapse's limit).
const MAX_DISPLAYNAME_CHARS: usize = 256;
/// Longest avatar URL, in characters (Synapse's limit).
const MAX_AVATAR_URL_CHARS: usize = 1000;

pub struct Profiles {
    storage: Storage,
    locks: StripedLocks,
}

impl Profiles {
    pub fn new(storage: Storage) -> Self {
        Profiles {
            storage,
            locks: StripedLocks::new(64),
        }
    }

    /// The whole profile of an account, or `None` when it has none.
    pub fn profile(&self, localpart: &str) -> Result<Option<Profile>> {
        Ok(self.storage.get(tables::PROFILES, &localpart.to_owned())?)
    }

    /// Sets one field. The caller has checked that the account exists and
    /// that the requester may change it.
    pub async fn set_field(
        &self,
        localpart: &str,
        key: &str,
        value: serde_json::Value,
    ) -> Result<()> {
        check_key(key)?;
        check_value(key, &value)?;
        let _guard = self.locks.lock(localpart).await;
        let mut profile = self.profile(localpart)?.unwrap_or_default();
        profile.insert(key.to_owned(), value);
        let size = serde_json::to_vec(&profile).map_or(usize::MAX, |bytes| bytes.len());
        if size > MAX_PROFILE_BYTES {
            return Err(Error::ProfileTooLarge(format!(
                "the profile would exceed {MAX_PROFILE_BYTES} bytes"
            )));
        }
        self.store(localpart, profile).await
    }

    /// Removes one field; removing a missing field is not an error.
    pub async fn delete_field(&self, localpart: &str, key: &str) -> Result<()> {
        check_key(key)?;
        let _guard = self.locks.lock(localpart).await;
        let mut profile = self.profile(localpart)?.unwrap_or_default();
        if profile.remove(key).is_none() {
            return Ok(());
        }
        self.store(localpart, profile).await
    }

    async fn store(&self, localpart: &str, profile: Profile) -> Result<()> {
        let mut batch = Batch::new();
        batch.put(tables::PROFILES, &localpart.to_owned(), &profile);
        self.storage.commit(batch).await?;
        Ok(())
    }
}

/// The spec's grammar for profile keys: the three defined names, or a
/// namespaced identifier such as `org.example.pronouns`.
pub fn check_key(key: &str) -> Result<()> {
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::KeyTooLarge(format!(
            "profile keys are limited to {MAX_KEY_BYTES} bytes"
        )));
    }
    if matches!(key, "avatar_url" | "displayname" | "m.tz") {
        return Ok(());
    }
    let segment_ok = |segment: &str| {
        let mut chars = segment.chars();
        chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    let segments: Vec<&str> = key.split('.').collect();
    if segments.len() >= 2 && segments.iter().all(|s| segment_ok(s)) {
        Ok(())
    } else {
        Err(Error::InvalidParam(format!(
            "{key:?} is not a valid profile key"
        )))
    }
}

fn check_value(key: &str, value: &serde_json::Value) -> Result<()> {
    let limit = match key {
        "displayname" => MAX_DISPLAYNAME_CHARS,
        "avatar_url" => MAX_AVATAR_URL_CHARS,
        "m.tz" => MAX_KEY_BYTES,
        _ => return Ok(()),
    };
    let text = value
        .as_str()
        .ok_or_else(|| Error::BadJson(format!("{key} must be a string")))?;
    if text.chars().count() > limit {
        return Err(Error::InvalidParam(format!(
            "{key} is too long (at most {limit} characters)"
        )));
    }
    if key == "avatar_url" && !(text.is_empty() || text.starts_with("mxc://")) {
        return Err(Error::InvalidParam(
            "avatar_url must be an mxc:// URI".to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_follow_the_spec_grammar() {
        for good in [
            "displayname",
            "avatar_url",
            "m.tz",
            "org.example.x",
            "a.b_2",
        ] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "nodot",
            "Org.example",
            "a..b",
            "a.",
            ".a",
            "a.2b",
            "a-b.c",
        ] {
            assert!(
                matches!(check_key(bad), Err(Error::InvalidParam(_))),
                "{bad}"
            );
        }
        let long = format!("a.{}", "b".repeat(300));
        assert!(matches!(check_key(&long), Err(Error::KeyTooLarge(_))));
    }

    #[tokio::test]
    async fn fields_round_trip_within_limits() {
        let profiles = Profiles::new(Storage::in_memory());
        profiles
            .set_field("a", "displayname", json!("Alice"))
            .await
            .unwrap();
        profiles
            .set_field("a", "org.example.n", json!({"x": [1]}))
            .await
            .unwrap();
        let profile = profiles.profile("a").unwrap().unwrap();
        assert_eq!(profile["displayname"], "Alice");
        assert_eq!(profile["org.example.n"], json!({"x": [1]}));
        profiles.delete_field("a", "displayname").await.unwrap();
        profiles.delete_field("a", "displayname").await.unwrap();
        assert!(!profiles
            .profile("a")
            .unwrap()
            .unwrap()
            .contains_key("displayname"));

        let too_big = json!("x".repeat(MAX_PROFILE_BYTES));
        let error = profiles.set_field("a", "org.example.big", too_big).await;
        assert!(matches!(error, Err(Error::ProfileTooLarge(_))));
        let error = profiles.set_field("a", "displayname", json!(5)).await;
        assert!(matches!(error, Err(Error::BadJson(_))));
        let error = profiles
            .set_field("a", "avatar_url", json!("http://x"))
            .await;
        assert!(matches!(error, Err(Error::InvalidParam(_))));
        // Refused changes left the profile as it was.
        assert_eq!(profiles.profile("a").unwrap().unwrap().len(), 1);
    }
}
