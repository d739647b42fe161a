//! The user directory (`POST /user_directory/search`): the users who share
//! a room with the searcher, those in rooms whose join rule is public, and
//! (when configured) every local user, found by user ID and display name.
//!
//! Read from the rooms' current member events and the profiles at each
//! search, so it is always current with memberships and profile changes;
//! the rooms looked at are bounded.

use std::collections::BTreeMap;

use ruma::{RoomId, UserId};
use serde_json::{json, Value};

use super::error::Result;
use super::Services;
use crate::storage::tables;

/// Most rooms looked at for public members, and most local users.
const MAX_SCANNED: usize = 10_000;

/// A user the searcher may find.
struct Candidate {
    display_name: Option<String>,
    avatar_url: Option<String>,
    shares_room: bool,
}

/// The users matching every word of `term` (each a prefix of a word of
/// their user ID or display name, case-insensitive), those who share a
/// room with the searcher first; `limit` of them, and whether there were
/// more.
pub fn search(
    services: &Services,
    searcher: &UserId,
    term: &str,
    limit: usize,
) -> Result<(Vec<Value>, bool)> {
    let words: Vec<String> = term.split_whitespace().map(str::to_lowercase).collect();
    let mut candidates: BTreeMap<String, Candidate> = BTreeMap::new();
    for room_id in services.rooms.rooms_of_user(searcher, "join")? {
        add_members(services, &room_id, true, &mut candidates)?;
    }
    let rooms = services
        .storage
        .scan_prefix(tables::ROOMS, b"", MAX_SCANNED)?;
    for (room_id, _) in rooms {
        let Ok(room_id) = RoomId::parse(&room_id) else {
            continue;
        };
        let public = services
            .rooms
            .state_event(&room_id, "m.room.join_rules", "")?
            .is_some_and(|rules| rules.content_value()["join_rule"] == "public");
        if public {
            add_members(services, &room_id, false, &mut candidates)?;
        }
    }
    if services.config.user_directory_search_all_users {
        for (localpart, user) in services
            .storage
            .scan_prefix(tables::USERS, b"", MAX_SCANNED)?
        {
            let user_id = format!("@{localpart}:{}", services.config.server_name);
            if user.deactivated || candidates.contains_key(&user_id) {
                continue;
            }
            let profile = services.profiles.profile(&localpart)?.unwrap_or_default();
            let text = |key: &str| profile.get(key).and_then(Value::as_str).map(str::to_owned);
            candidates.insert(
                user_id,
                Candidate {
                    display_name: text("displayname"),
                    avatar_url: text("avatar_url"),
                    shares_room: false,
                },
            );
        }
    }
    let mut found: Vec<(String, Candidate)> = candidates
        .into_iter()
        .filter(|(user_id, candidate)| matches(&words, user_id, candidate.display_name.as_deref()))
        .collect();
    found.sort_by_key(|(user_id, candidate)| {
        (
            !candidate.shares_room,
            candidate.display_name.is_none(),
            candidate
                .display_name
                .as_deref()
                .unwrap_or(user_id)
                .to_lowercase(),
            user_id.clone(),
        )
    });
    let limited = found.len() > limit;
    let results = found
        .into_iter()
        .take(limit)
        .map(|(user_id, candidate)| {
            let mut result = json!({ "user_id": user_id });
            if let Some(name) = candidate.display_name {
                result["display_name"] = json!(name);
            }
            if let Some(url) = candidate.avatar_url {
                result["avatar_url"] = json!(url);
            }
            result
        })
        .collect();
    Ok((results, limited))
}

/// Adds the room's joined members, with the name and avatar of their
/// member event.
fn add_members(
    services: &Services,
    room_id: &RoomId,
    shares_room: bool,
    candidates: &mut BTreeMap<String, Candidate>,
) -> Result<()> {
    for member in services
        .rooms
        .current_state(room_id, Some("m.room.member"))?
    {
        let content = member.content_value();
        let Some(user_id) = member.state_key.clone() else {
            continue;
        };
        if content["membership"] != "join" {
            continue;
        }
        let text = |key: &str| content[key].as_str().map(str::to_owned);
        let entry = candidates.entry(user_id).or_insert(Candidate {
            display_name: text("displayname"),
            avatar_url: text("avatar_url"),
            shares_room,
        });
        entry.shares_room |= shares_room;
    }
    Ok(())
}

/// Whether every word is the start of a word of the user ID or the
/// display name.
fn matches(words: &[String], user_id: &str, display_name: Option<&str>) -> bool {
    let haystack = format!("{} {}", user_id, display_name.unwrap_or_default()).to_lowercase();
    let parts: Vec<&str> = haystack
        .split(|c: char| !c.is_alphanumeric())
        .filter(|part| !part.is_empty())
        .collect();
    words.iter().all(|word| {
        haystack.starts_with(word.as_str())
            || parts.iter().any(|part| part.starts_with(word.as_str()))
            || (word.chars().any(|c| !c.is_alphanumeric()) && haystack.contains(word.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn words_match_the_start_of_words_of_the_id_or_name() {
        let words = |text: &str| -> Vec<String> {
            text.split_whitespace().map(str::to_lowercase).collect()
        };
        assert!(matches(&words("ali"), "@alice:example.org", None));
        assert!(matches(
            &words("LIDDELL al"),
            "@a1:example.org",
            Some("Alice Liddell")
        ));
        assert!(matches(&words("@alice:exa"), "@alice:example.org", None));
        assert!(!matches(
            &words("lice"),
            "@alice:example.org",
            Some("Alice")
        ));
        assert!(!matches(
            &words("alice bob"),
            "@alice:example.org",
            Some("Alice")
        ));
        assert!(matches(&words(""), "@alice:example.org", None));
    }
}
