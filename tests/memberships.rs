//! Every membership transition, allowed and forbidden, as a table.

mod common;

use common::{token, TestServer};
use reqwest::StatusCode;
use serde_json::json;

/// (actor, endpoint, target, expected status, membership of target after)
type Step = (
    &'static str,
    &'static str,
    &'static str,
    StatusCode,
    &'static str,
);

const OK: StatusCode = StatusCode::OK;
const NO: StatusCode = StatusCode::FORBIDDEN;

fn steps() -> Vec<Step> {
    vec![
        // Invite, then join; an invitee may also refuse.
        ("alice", "invite", "bob", OK, "invite"),
        ("alice", "invite", "bob", OK, "invite"),
        ("bob", "join", "bob", OK, "join"),
        ("alice", "invite", "bob", NO, "join"),
        ("alice", "invite", "carol", OK, "invite"),
        ("carol", "leave", "carol", OK, "leave"),
        // Not invited, not joining; leaving twice is refused.
        ("carol", "join", "carol", NO, "leave"),
        ("carol", "leave", "carol", NO, "leave"),
        // A member with no power may not kick or ban; a moderator may not
        // ban someone of their own level.
        ("bob", "kick", "alice", NO, "join"),
        ("bob", "ban", "alice", NO, "join"),
        ("moderator", "ban", "moderator2", NO, "join"),
        // Kick: out, and back by invitation.
        ("moderator", "kick", "bob", OK, "leave"),
        ("moderator", "kick", "bob", NO, "leave"),
        ("alice", "invite", "bob", OK, "invite"),
        ("bob", "join", "bob", OK, "join"),
        // Ban: out, and no way back until unbanned.
        ("moderator", "ban", "bob", OK, "ban"),
        ("bob", "join", "bob", NO, "ban"),
        ("alice", "invite", "bob", NO, "ban"),
        ("bob", "unban", "bob", NO, "ban"),
        ("moderator", "unban", "bob", OK, "leave"),
        ("moderator", "unban", "bob", NO, "leave"),
        ("alice", "invite", "bob", OK, "invite"),
        ("bob", "join", "bob", OK, "join"),
        // Banning someone who never joined is allowed.
        ("alice", "ban", "dave", OK, "ban"),
        // Knocking needs a knock join rule; this room is invite-only.
        ("carol", "knock", "carol", NO, "leave"),
        ("bob", "leave", "bob", OK, "leave"),
    ]
}

#[tokio::test]
async fn membership_transitions_follow_the_rules() {
    let server = TestServer::start().await;
    let mut tokens = std::collections::HashMap::new();
    for name in ["alice", "bob", "carol", "dave", "moderator", "moderator2"] {
        tokens.insert(name, token(&server.register(name).await));
    }
    let room = server.create_room(&tokens["alice"], json!({
                "preset": "private_chat",
                "room_version": "11",
                "invite": ["@moderator:localhost", "@moderator2:localhost"],
                "power_level_content_override": {
                    "users": { "@alice:localhost": 100, "@moderator:localhost": 50, "@moderator2:localhost": 50 },
                },
            })).await;
    for name in ["moderator", "moderator2"] {
        let (status, _) = server
            .post(
                &format!("/_matrix/client/v3/rooms/{room}/join"),
                Some(&tokens[name]),
                json!({}),
            )
            .await;
        assert_eq!(status, OK);
    }
    for (index, (actor, action, target, expected, after)) in steps().into_iter().enumerate() {
        let user_id = format!("@{target}:localhost");
        let path = match action {
            "join" | "leave" => format!("/_matrix/client/v3/rooms/{room}/{action}"),
            "knock" => format!("/_matrix/client/v3/knock/{room}"),
            _ => format!("/_matrix/client/v3/rooms/{room}/{action}"),
        };
        let body = match action {
            "join" | "leave" | "knock" => json!({}),
            _ => json!({ "user_id": user_id }),
        };
        let (status, answer) = server.post(&path, Some(&tokens[actor]), body).await;
        assert_eq!(
            status, expected,
            "step {index}: {actor} {action} {target}: {answer}"
        );
        if status != OK {
            assert!(
                answer["errcode"].as_str().is_some(),
                "step {index}: {answer}"
            );
        }
        let (_, members) = server
            .get(
                &format!("/_matrix/client/v3/rooms/{room}/members"),
                Some(&tokens["alice"]),
            )
            .await;
        let membership = members["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .find(|event| event["state_key"] == user_id.as_str())
            .map_or("leave", |event| {
                event["content"]["membership"].as_str().unwrap()
            });
        assert_eq!(membership, after, "step {index}: {actor} {action} {target}");
    }
}

#[tokio::test]
async fn knocks_are_answered_by_invites_or_withdrawn() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room = server.create_room(&alice, json!({ "initial_state": [{ "type": "m.room.join_rules", "content": { "join_rule": "knock" } }] })).await;
    let knock = format!("/_matrix/client/v3/knock/{room}");
    assert_eq!(server.post(&knock, Some(&bob), json!({})).await.0, OK);
    // Withdrawn, then knocked again and let in.
    let leave = format!("/_matrix/client/v3/rooms/{room}/leave");
    assert_eq!(server.post(&leave, Some(&bob), json!({})).await.0, OK);
    assert_eq!(server.post(&knock, Some(&bob), json!({})).await.0, OK);
    let invite = format!("/_matrix/client/v3/rooms/{room}/invite");
    let (status, _) = server
        .post(
            &invite,
            Some(&alice),
            json!({ "user_id": "@bob:localhost" }),
        )
        .await;
    assert_eq!(status, OK);
    let join = format!("/_matrix/client/v3/rooms/{room}/join");
    assert_eq!(server.post(&join, Some(&bob), json!({})).await.0, OK);
    let (_, joined) = server
        .get("/_matrix/client/v3/joined_rooms", Some(&bob))
        .await;
    assert_eq!(joined["joined_rooms"], json!([room]));
}
