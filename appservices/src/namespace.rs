//! Namespaces: the user IDs, room aliases and room IDs an application
//! service is interested in, each a regular expression that may claim
//! its matches exclusively.
//!
//! A regular expression matches a value when it matches from the value's
//! start, as Synapse reads registrations (Python's `re.match`), so files
//! written for Synapse claim the same IDs here.

use regex::Regex;
use serde::Deserialize;

/// One entry of a namespace list.
#[derive(Clone, Debug)]
pub struct Namespace {
    /// Whether only this application service may create or use the IDs.
    pub exclusive: bool,
    /// The expression as written in the registration.
    pub regex: String,
    anchored: Regex,
}

impl Namespace {
    /// Compiles `regex`; the error says what is wrong with it.
    pub fn new(regex: &str, exclusive: bool) -> Result<Self, String> {
        // Checked alone first, so that the anchor cannot be closed off
        // by a stray parenthesis of the expression (`a)|(b`).
        let anchored = Regex::new(regex)
            .and_then(|_| Regex::new(&format!("^(?:{regex})")))
            .map_err(|e| {
                // The parser's message draws the expression over several
                // lines; its last line says what is wrong.
                let text = e.to_string();
                let why = text
                    .lines()
                    .rev()
                    .find(|line| !line.trim().is_empty())
                    .unwrap_or_default()
                    .trim_start_matches("error: ")
                    .to_owned();
                format!("invalid regex {regex:?}: {why}")
            })?;
        Ok(Namespace {
            exclusive,
            regex: regex.to_owned(),
            anchored,
        })
    }

    /// Whether `value` falls within this namespace.
    pub fn matches(&self, value: &str) -> bool {
        self.anchored.is_match(value)
    }
}

/// The three lists of a registration's `namespaces`.
#[derive(Clone, Debug, Default)]
pub struct Namespaces {
    pub users: Vec<Namespace>,
    pub aliases: Vec<Namespace>,
    pub rooms: Vec<Namespace>,
}

impl Namespaces {
    /// Whether a user ID is in one of the user namespaces.
    pub fn has_user(&self, user_id: &str) -> bool {
        self.users.iter().any(|n| n.matches(user_id))
    }

    /// Whether a user ID is in an exclusive user namespace.
    pub fn claims_user(&self, user_id: &str) -> bool {
        self.users.iter().any(|n| n.exclusive && n.matches(user_id))
    }

    /// Whether a room alias is in one of the alias namespaces.
    pub fn has_alias(&self, alias: &str) -> bool {
        self.aliases.iter().any(|n| n.matches(alias))
    }

    /// Whether a room alias is in an exclusive alias namespace.
    pub fn claims_alias(&self, alias: &str) -> bool {
        self.aliases.iter().any(|n| n.exclusive && n.matches(alias))
    }

    /// Whether a room ID is in one of the room namespaces.
    pub fn has_room(&self, room_id: &str) -> bool {
        self.rooms.iter().any(|n| n.matches(room_id))
    }
}

/// A namespace entry as a registration file writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNamespace {
    exclusive: bool,
    regex: String,
}

/// The `namespaces` object as a registration file writes it.
#[derive(Deserialize, Default)]
pub(crate) struct RawNamespaces {
    #[serde(default)]
    users: Option<Vec<RawNamespace>>,
    #[serde(default)]
    aliases: Option<Vec<RawNamespace>>,
    #[serde(default)]
    rooms: Option<Vec<RawNamespace>>,
}

impl RawNamespaces {
    /// Compiles every expression, naming the list and entry of a bad one.
    pub(crate) fn compile(self) -> Result<Namespaces, String> {
        let list = |name: &str, raw: Option<Vec<RawNamespace>>| {
            raw.unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(index, entry)| {
                    Namespace::new(&entry.regex, entry.exclusive)
                        .map_err(|why| format!("namespaces.{name}[{index}]: {why}"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Namespaces {
            users: list("users", self.users)?,
            aliases: list("aliases", self.aliases)?,
            rooms: list("rooms", self.rooms)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(regex: &str, value: &str, expected: bool) {
        let namespace = Namespace::new(regex, true).unwrap();
        assert_eq!(namespace.matches(value), expected, "{regex} on {value}");
    }

    #[test]
    fn matching_is_anchored_at_the_start_only() {
        check("@_irc_.*:example\\.org", "@_irc_alice:example.org", true);
        check("@_irc_.*:example\\.org", "@alice:example.org", false);
        check("@_irc_.*:example\\.org", "@x_irc_a:example.org", false);
        // As in Synapse: no implicit anchor at the end.
        check("@bot", "@bot:example.org", true);
        check("@bot$", "@bot:example.org", false);
        check("!.*:example\\.org", "!abc:example.org", true);
        check("#_irc_.*", "#_irc_libera:example.org", true);
        // An alternation stays inside the anchor.
        check("@a|@b", "@b:x", true);
        check("@a|@b", "x@b:x", false);
    }

    #[test]
    fn exclusivity_is_per_entry() {
        let namespaces = Namespaces {
            users: vec![
                Namespace::new("@_slack_.*", true).unwrap(),
                Namespace::new("@.*:other\\.org", false).unwrap(),
            ],
            ..Default::default()
        };
        assert!(namespaces.claims_user("@_slack_bob:example.org"));
        assert!(namespaces.has_user("@carol:other.org"));
        assert!(!namespaces.claims_user("@carol:other.org"));
        assert!(!namespaces.has_user("@carol:example.org"));
    }

    #[test]
    fn the_anchor_cannot_be_escaped() {
        assert!(Namespace::new("x)|(.*", true).is_err());
    }

    #[test]
    fn a_bad_expression_is_named() {
        let raw = RawNamespaces {
            users: None,
            aliases: Some(vec![RawNamespace {
                exclusive: true,
                regex: "#(unclosed".to_owned(),
            }]),
            rooms: None,
        };
        let error = raw.compile().unwrap_err();
        assert_eq!(
            error,
            "namespaces.aliases[0]: invalid regex \"#(unclosed\": unclosed group"
        );
    }
}
