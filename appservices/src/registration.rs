//! Registration files: how an application service is introduced to the
//! homeserver (the spec's "Registration" section), read from YAML and
//! checked once at start.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

use crate::namespace::{Namespaces, RawNamespaces};

/// One application service, as its registration file describes it.
#[derive(Clone, Debug)]
pub struct Registration {
    /// Unique and never changing; names the service in its queue.
    pub id: String,
    /// Where transactions and queries go; `None` when the service wants
    /// no traffic.
    pub url: Option<String>,
    /// What the service authenticates with.
    pub as_token: String,
    /// What the homeserver authenticates with.
    pub hs_token: String,
    pub sender_localpart: String,
    /// `@sender_localpart:server_name`, set by [`Registrations::new`].
    pub sender: String,
    pub namespaces: Namespaces,
    /// Whether the service's users are rate-limited (the sender never is).
    pub rate_limited: bool,
    /// The third-party protocols the service bridges.
    pub protocols: Vec<String>,
    /// Whether typing notices, receipts, presence and to-device messages
    /// are pushed too (`receive_ephemeral`, or MSC2409's older key).
    pub receive_ephemeral: bool,
    /// MSC3202: device list changes and one-time key counts in
    /// transactions, and `device_id` masquerading.
    pub device_extensions: bool,
    /// MSC4190: the service manages its users' devices with
    /// `PUT /devices/{deviceId}` and deletes them without authentication.
    pub device_management: bool,
}

/// A registration file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("application service registration {file}: {problem}")]
pub struct RegistrationError {
    pub file: String,
    pub problem: String,
}

impl Registration {
    /// Parses and checks one registration file's text.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let raw: RawRegistration = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        raw.check()
    }

    /// Whether the service is interested in a user: its sender, or a user
    /// in its user namespaces.
    pub fn is_interested_in_user(&self, user_id: &str) -> bool {
        user_id == self.sender || self.namespaces.has_user(user_id)
    }

    /// Whether the service may act as `user_id`.
    pub fn may_masquerade_as(&self, user_id: &str) -> bool {
        self.is_interested_in_user(user_id)
    }
}

/// Every configured application service, with the look-ups the server
/// needs on each request.
#[derive(Clone, Debug, Default)]
pub struct Registrations {
    all: Vec<Registration>,
    by_as_token: HashMap<String, usize>,
}

impl Registrations {
    /// Checks the registrations together: IDs, tokens and sender users
    /// must each be unique. `files` pairs each with its file's name.
    pub fn new(
        server_name: &str,
        files: Vec<(String, Registration)>,
    ) -> Result<Self, RegistrationError> {
        let mut all = Vec::with_capacity(files.len());
        let mut by_as_token = HashMap::new();
        let mut ids = HashSet::new();
        let mut tokens = HashSet::new();
        let mut senders = HashSet::new();
        for (file, mut registration) in files {
            let refuse = |problem: String| RegistrationError {
                file: file.clone(),
                problem,
            };
            if !ids.insert(registration.id.clone()) {
                return Err(refuse(format!(
                    "the id {:?} is used by another registration",
                    registration.id
                )));
            }
            for (name, token) in [
                ("as_token", &registration.as_token),
                ("hs_token", &registration.hs_token),
            ] {
                if !tokens.insert(token.clone()) {
                    return Err(refuse(format!(
                        "its {name} is used elsewhere (tokens must be unique)"
                    )));
                }
            }
            if !senders.insert(registration.sender_localpart.clone()) {
                return Err(refuse(format!(
                    "the sender_localpart {:?} is used by another registration",
                    registration.sender_localpart
                )));
            }
            registration.sender = format!("@{}:{server_name}", registration.sender_localpart);
            by_as_token.insert(registration.as_token.clone(), all.len());
            all.push(registration);
        }
        Ok(Registrations { all, by_as_token })
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Registration> {
        self.all.iter()
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// The registration at `index`, as [`Registrations::iter`] counts.
    pub fn get(&self, index: usize) -> Option<&Registration> {
        self.all.get(index)
    }

    /// The service whose `as_token` this is.
    pub fn by_as_token(&self, token: &str) -> Option<&Registration> {
        self.by_as_token.get(token).map(|&index| &self.all[index])
    }

    pub fn by_id(&self, id: &str) -> Option<&Registration> {
        self.all.iter().find(|r| r.id == id)
    }

    /// The service that claims `user_id` exclusively, if one does.
    pub fn exclusive_owner_of_user(&self, user_id: &str) -> Option<&Registration> {
        self.all
            .iter()
            .find(|r| r.namespaces.claims_user(user_id) || r.sender == user_id)
    }

    /// The service that claims `alias` exclusively, if one does.
    pub fn exclusive_owner_of_alias(&self, alias: &str) -> Option<&Registration> {
        self.all.iter().find(|r| r.namespaces.claims_alias(alias))
    }
}

/// A registration file as written.
#[derive(Deserialize)]
struct RawRegistration {
    id: Option<String>,
    // `url` must be present, and may be null.
    #[serde(default, deserialize_with = "present")]
    url: Option<Option<String>>,
    as_token: Option<String>,
    hs_token: Option<String>,
    sender_localpart: Option<String>,
    namespaces: Option<RawNamespaces>,
    #[serde(default)]
    rate_limited: Option<bool>,
    #[serde(default)]
    protocols: Option<Vec<String>>,
    #[serde(default)]
    receive_ephemeral: Option<bool>,
    #[serde(default, rename = "de.sorunome.msc2409.push_ephemeral")]
    push_ephemeral_msc2409: Option<bool>,
    #[serde(default, rename = "org.matrix.msc3202")]
    msc3202: Option<bool>,
    #[serde(default, rename = "io.element.msc4190")]
    msc4190: Option<bool>,
}

/// Tells a null value (`Some(None)`) from a missing key (`None`).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(deserializer).map(Some)
}

impl RawRegistration {
    fn check(self) -> Result<Registration, String> {
        let required = |name: &str, value: Option<String>| match value {
            Some(value) if !value.trim().is_empty() => Ok(value),
            Some(_) => Err(format!("{name} is empty")),
            None => Err(format!("{name} is missing")),
        };
        let id = required("id", self.id)?;
        let as_token = required("as_token", self.as_token)?;
        let hs_token = required("hs_token", self.hs_token)?;
        let sender_localpart = required("sender_localpart", self.sender_localpart)?;
        if !sender_localpart.chars().all(is_localpart_char) {
            return Err(format!(
                "sender_localpart {sender_localpart:?} is not a valid user localpart"
            ));
        }
        let url = match self.url {
            None => return Err("url is missing (write `url: null` for no traffic)".to_owned()),
            Some(None) => None,
            Some(Some(url)) => Some(check_url(&url)?),
        };
        let namespaces = self
            .namespaces
            .ok_or_else(|| "namespaces is missing".to_owned())?
            .compile()?;
        let protocols = self.protocols.unwrap_or_default();
        if let Some(bad) = protocols.iter().find(|p| p.is_empty() || p.contains('/')) {
            return Err(format!("protocols: {bad:?} is not a protocol name"));
        }
        Ok(Registration {
            id,
            url,
            as_token,
            hs_token,
            sender_localpart,
            sender: String::new(),
            namespaces,
            rate_limited: self.rate_limited.unwrap_or(true),
            protocols,
            receive_ephemeral: self
                .receive_ephemeral
                .or(self.push_ephemeral_msc2409)
                .unwrap_or(false),
            device_extensions: self.msc3202.unwrap_or(false),
            device_management: self.msc4190.unwrap_or(false),
        })
    }
}

/// An `http` or `https` URL, without its trailing slash.
fn check_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("url {url:?} is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') || url.chars().any(char::is_whitespace) {
        return Err(format!("url {url:?} names no host"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// The characters of a user ID's localpart in the spec's grammar.
fn is_localpart_char(c: char) -> bool {
    matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '=' | '-' | '/' | '+')
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id: irc
url: "http://127.0.0.1:9000/"
as_token: secret-as
hs_token: secret-hs
sender_localpart: _irc_bot
rate_limited: false
protocols: ["irc"]
de.sorunome.msc2409.push_ephemeral: true
org.matrix.msc3202: true
namespaces:
  users:
    - exclusive: true
      regex: '@_irc_.*:example\.org'
  aliases:
    - exclusive: false
      regex: '#_irc_.*'
"#;

    fn problem(yaml: &str) -> String {
        Registration::from_yaml(yaml).unwrap_err()
    }

    #[test]
    fn a_full_registration_is_read() {
        let registration = Registration::from_yaml(GOOD).unwrap();
        assert_eq!(registration.id, "irc");
        assert_eq!(registration.url.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(!registration.rate_limited);
        assert!(registration.receive_ephemeral);
        assert!(registration.device_extensions);
        assert!(!registration.device_management);
        assert_eq!(registration.protocols, ["irc"]);
        assert!(registration.namespaces.claims_user("@_irc_x:example.org"));
        assert!(registration.namespaces.has_alias("#_irc_x:example.org"));
        assert!(!registration.namespaces.claims_alias("#_irc_x:example.org"));
        assert!(registration.namespaces.rooms.is_empty());
    }

    #[test]
    fn defaults_and_a_null_url() {
        let yaml =
            "id: a\nurl: null\nas_token: x\nhs_token: y\nsender_localpart: bot\nnamespaces: {}\n";
        let registration = Registration::from_yaml(yaml).unwrap();
        assert_eq!(registration.url, None);
        assert!(registration.rate_limited);
        assert!(!registration.receive_ephemeral);
    }

    #[test]
    fn each_problem_is_named() {
        let base =
            "id: a\nurl: null\nas_token: x\nhs_token: y\nsender_localpart: bot\nnamespaces: {}\n";
        let without = |key: &str| {
            base.lines()
                .filter(|line| !line.starts_with(key))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(problem(&without("id:")), "id is missing");
        assert!(problem(&without("url:")).starts_with("url is missing"));
        assert_eq!(problem(&without("as_token:")), "as_token is missing");
        assert_eq!(problem(&without("namespaces:")), "namespaces is missing");
        let bad_url = base.replace("url: null", "url: ftp://x");
        assert!(problem(&bad_url).contains("not an http:// or https:// URL"));
        let bad_sender = base.replace("sender_localpart: bot", "sender_localpart: Bot!");
        assert!(problem(&bad_sender).contains("not a valid user localpart"));
        let empty = base.replace("as_token: x", "as_token: ''");
        assert_eq!(problem(&empty), "as_token is empty");
        let bad_regex = base.replace(
            "namespaces: {}",
            "namespaces:\n  users:\n    - exclusive: true\n      regex: '@(('",
        );
        assert!(problem(&bad_regex).starts_with("namespaces.users[0]: invalid regex"));
        assert!(!problem("[not, a, mapping]").is_empty());
    }

    fn named(id: &str, as_token: &str, hs_token: &str, sender: &str) -> (String, Registration) {
        let yaml = format!(
            "id: {id}\nurl: null\nas_token: {as_token}\nhs_token: {hs_token}\nsender_localpart: {sender}\nnamespaces: {{}}\n"
        );
        (
            format!("{id}.yaml"),
            Registration::from_yaml(&yaml).unwrap(),
        )
    }

    #[test]
    fn duplicates_are_refused_naming_the_file() {
        let check = |(_, second): (String, Registration), expected: &str| {
            let second = ("b.yaml".to_owned(), second);
            let first = named("a", "t1", "t2", "bot_a");
            let error = Registrations::new("example.org", vec![first, second]).unwrap_err();
            assert_eq!(error.file, "b.yaml");
            assert!(error.problem.contains(expected), "{}", error.problem);
        };
        check(named("a", "t3", "t4", "bot_b"), "the id \"a\"");
        check(
            named("b", "t1", "t4", "bot_b"),
            "as_token is used elsewhere",
        );
        check(
            named("b", "t3", "t1", "bot_b"),
            "hs_token is used elsewhere",
        );
        check(named("b", "t3", "t4", "bot_a"), "sender_localpart");
        let fine = Registrations::new(
            "example.org",
            vec![
                named("a", "t1", "t2", "bot_a"),
                named("b", "t3", "t4", "bot_b"),
            ],
        )
        .unwrap();
        assert_eq!(fine.by_as_token("t3").unwrap().sender, "@bot_b:example.org");
        assert!(fine.by_as_token("t2").is_none());
        assert!(fine.exclusive_owner_of_user("@bot_a:example.org").is_some());
    }
}
