//! Every table's key type, value type and column family, in one place.
//!
//! Keys are encoded so that byte order matches the order the services scan
//! in. Composite keys join their parts with a `0x00` byte; the parts are
//! validated never to contain one (localparts by the user ID grammar,
//! device IDs by the API layer).

use serde::{Deserialize, Serialize};

use super::{Cf, Key, Table};

/// Database facts by name; see `docs/storage.md` for the names in use.
pub const META: Table<String, u32> = Table::new(Cf::Meta);
/// Accounts by localpart.
pub const USERS: Table<String, UserRecord> = Table::new(Cf::Users);
/// Profile fields by localpart, as one JSON object.
pub const PROFILES: Table<String, serde_json::Map<String, serde_json::Value>> =
    Table::new(Cf::Profiles);
/// Devices by (localpart, device ID).
pub const DEVICES: Table<DeviceKey, DeviceRecord> = Table::new(Cf::Devices);
/// Access tokens by the SHA-256 of the token.
pub const ACCESS_TOKENS: Table<TokenHash, AccessTokenRecord> = Table::new(Cf::AccessTokens);
/// Refresh tokens by the SHA-256 of the token.
pub const REFRESH_TOKENS: Table<TokenHash, RefreshTokenRecord> = Table::new(Cf::RefreshTokens);

/// A local account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Argon2id hash in PHC string form; `None` once deactivated.
    pub password_hash: Option<String>,
    pub admin: bool,
    pub deactivated: bool,
    pub created_ts: u64,
}

/// One device (one login) of a local account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub display_name: Option<String>,
    pub created_ts: u64,
    pub last_seen_ts: Option<u64>,
    pub last_seen_ip: Option<String>,
    /// The device's current access token, hashed: each device has one.
    pub access_token: TokenHash,
    /// The device's current refresh token, hashed, if it asked for one.
    pub refresh_token: Option<TokenHash>,
}

/// What an access token grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenRecord {
    pub localpart: String,
    pub device_id: String,
    /// Milliseconds since the epoch after which the token is expired;
    /// only tokens issued with a refresh token expire.
    pub expires_at_ms: Option<u64>,
}

/// What a refresh token renews.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshTokenRecord {
    pub localpart: String,
    pub device_id: String,
}

/// The SHA-256 digest of a secret token; tokens are never stored in clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenHash(#[serde(with = "hex_bytes")] pub [u8; 32]);

/// A device's key: the owner's localpart, then the device ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceKey {
    pub localpart: String,
    pub device_id: String,
}

impl DeviceKey {
    pub fn new(localpart: &str, device_id: &str) -> Self {
        DeviceKey {
            localpart: localpart.to_owned(),
            device_id: device_id.to_owned(),
        }
    }

    /// The prefix shared by the keys of every device of `localpart`.
    pub fn user_prefix(localpart: &str) -> Vec<u8> {
        let mut prefix = localpart.as_bytes().to_vec();
        prefix.push(0);
        prefix
    }
}

impl Key for String {
    fn encode(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

impl Key for DeviceKey {
    fn encode(&self) -> Vec<u8> {
        let mut key = Self::user_prefix(&self.localpart);
        key.extend_from_slice(self.device_id.as_bytes());
        key
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let split = bytes.iter().position(|b| *b == 0)?;
        Some(DeviceKey {
            localpart: String::from_utf8(bytes[..split].to_vec()).ok()?,
            device_id: String::from_utf8(bytes[split + 1..].to_vec()).ok()?,
        })
    }
}

impl Key for TokenHash {
    fn encode(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(TokenHash(bytes.try_into().ok()?))
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], serializer: S) -> Result<S::Ok, S::Error> {
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        serializer.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(deserializer)?;
        let invalid = || serde::de::Error::custom("expected 64 hexadecimal digits");
        if text.len() != 64 {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| invalid())?;
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_round_trip_and_group_by_user() {
        let key = DeviceKey::new("alice", "ABCDEF");
        assert_eq!(DeviceKey::decode(&key.encode()), Some(key.clone()));
        assert!(key.encode().starts_with(&DeviceKey::user_prefix("alice")));
        // "al" must not capture the devices of "alice".
        assert!(!key.encode().starts_with(&DeviceKey::user_prefix("al")));
    }

    #[test]
    fn token_hashes_serialize_as_hex() {
        let hash = TokenHash([0xab; 32]);
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(32)));
        assert_eq!(serde_json::from_str::<TokenHash>(&json).unwrap(), hash);
        assert!(serde_json::from_str::<TokenHash>("\"abc\"").is_err());
    }
}
