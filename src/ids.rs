//! Matrix identifiers: parsing and the rules for new ones. Pure functions.

use rand::distributions::{Alphanumeric, Distribution, Uniform};
use rand::Rng;

/// The longest user ID the spec allows, in bytes.
pub const MAX_USER_ID_BYTES: usize = 255;

/// A user ID split into its parts: `@localpart:server_name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserId {
    pub localpart: String,
    pub server_name: String,
}

impl UserId {
    pub fn new(localpart: &str, server_name: &str) -> Self {
        UserId {
            localpart: localpart.to_owned(),
            server_name: server_name.to_owned(),
        }
    }

    /// Parses `@localpart:server`, accepting the historical localpart
    /// characters that existing IDs may carry (printable ASCII but `:`).
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() > MAX_USER_ID_BYTES {
            return None;
        }
        let rest = text.strip_prefix('@')?;
        let (localpart, server_name) = rest.split_once(':')?;
        let historical = |c: char| ('\u{21}'..='\u{7e}').contains(&c) && c != ':';
        if localpart.is_empty() || !localpart.chars().all(historical) {
            return None;
        }
        crate::config::validate_server_name(server_name).ok()?;
        Some(UserId::new(localpart, server_name))
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "@{}:{}", self.localpart, self.server_name)
    }
}

/// Checks a localpart requested for a new account, as Synapse does: the
/// spec's current grammar, not starting with `_` (reserved for bridges),
/// not all digits (reserved for guests), and short enough for a user ID.
pub fn check_new_localpart(localpart: &str, server_name: &str) -> Result<(), String> {
    check_appservice_localpart(localpart, server_name)?;
    if localpart.starts_with('_') {
        return Err("User ID may not begin with _".to_owned());
    }
    Ok(())
}

/// The localpart of a new account an application service registers: the
/// same rules, except that it may begin with `_`.
pub fn check_appservice_localpart(localpart: &str, server_name: &str) -> Result<(), String> {
    if localpart.is_empty() {
        return Err("User ID cannot be empty".to_owned());
    }
    let allowed = |c: char| matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '=' | '-' | '/' | '+');
    if !localpart.chars().all(allowed) {
        return Err("User ID can only contain characters a-z, 0-9, or '=_-./+'".to_owned());
    }
    if localpart.chars().all(|c| c.is_ascii_digit()) {
        return Err("Numeric user IDs are reserved for guest users".to_owned());
    }
    if localpart.len() + server_name.len() + 2 > MAX_USER_ID_BYTES {
        return Err(format!(
            "User ID may not be longer than {MAX_USER_ID_BYTES} characters"
        ));
    }
    Ok(())
}

/// A device ID is opaque to the server, but it becomes part of storage keys
/// and appears in logs: it must be printable and reasonably short.
pub fn check_device_id(device_id: &str) -> Result<(), String> {
    if device_id.is_empty() || device_id.len() > 255 {
        return Err("device_id must be 1 to 255 bytes".to_owned());
    }
    if device_id.chars().any(char::is_control) {
        return Err("device_id may not contain control characters".to_owned());
    }
    Ok(())
}

/// A new device ID: ten capital letters, as Synapse makes them.
pub fn new_device_id(rng: &mut impl Rng) -> String {
    let letters = Uniform::new_inclusive(b'A', b'Z');
    (0..10).map(|_| letters.sample(rng) as char).collect()
}

/// A new secret token with a recognisable prefix and 256 bits of randomness.
pub fn new_secret(prefix: &str, rng: &mut impl Rng) -> String {
    let random: String = (0..43).map(|_| Alphanumeric.sample(rng) as char).collect();
    format!("{prefix}{random}")
}

/// A localpart for a registration that did not ask for one.
pub fn new_localpart(rng: &mut impl Rng) -> String {
    let chars = Uniform::new_inclusive(b'a', b'z');
    let random: String = (0..12).map(|_| chars.sample(rng) as char).collect();
    format!("user-{random}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_parse() {
        assert_eq!(
            UserId::parse("@alice:example.org"),
            Some(UserId::new("alice", "example.org"))
        );
        assert_eq!(
            UserId::parse("@Old.Style:localhost:8008"),
            Some(UserId::new("Old.Style", "localhost:8008"))
        );
        for bad in ["alice", "@alice", "@:example.org", "@a b:x", "@a:bad host"] {
            assert_eq!(UserId::parse(bad), None, "{bad}");
        }
        assert_eq!(UserId::parse(&format!("@{}:x", "a".repeat(260))), None);
    }

    #[test]
    fn new_localparts_follow_synapse_rules() {
        assert!(check_new_localpart("alice.b-c=d/e+f_9", "example.org").is_ok());
        for bad in ["", "Alice", "al ice", "_bridge", "12345", "ali:ce", "é"] {
            assert!(check_new_localpart(bad, "example.org").is_err(), "{bad}");
        }
        assert!(check_new_localpart(&"a".repeat(250), "example.org").is_err());
    }

    #[test]
    fn generated_identifiers_are_valid() {
        let mut rng = rand::thread_rng();
        let device = new_device_id(&mut rng);
        assert_eq!(device.len(), 10);
        assert!(check_device_id(&device).is_ok());
        assert!(check_new_localpart(&new_localpart(&mut rng), "x").is_ok());
        let secret = new_secret("mya_", &mut rng);
        assert!(secret.starts_with("mya_") && secret.len() == 47);
        assert!(check_device_id("a\0b").is_err());
    }
}
