//! Who reads which history: history visibility, former members, filters.

mod common;

use common::{assert_error, join, token, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn send(server: &TestServer, token: &str, room: &str, body: &str) -> String {
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{body}");
    let (status, answer) = server
        .put(
            &path,
            Some(token),
            json!({ "msgtype": "m.text", "body": body }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["event_id"].as_str().unwrap().to_owned()
}

async fn bodies(
    server: &TestServer,
    token: &str,
    room: &str,
    filter: Option<&str>,
) -> (StatusCode, Vec<String>, Value) {
    let mut path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100");
    if let Some(filter) = filter {
        path.push_str(&format!("&filter={}", urlencode(filter)));
    }
    let (status, page) = server.get(&path, Some(token)).await;
    let bodies = page["chunk"]
        .as_array()
        .map(|chunk| {
            chunk
                .iter()
                .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (status, bodies, page)
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn former_members_read_what_they_could_see_and_the_state_when_they_left() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let stranger = token(&server.register("stranger").await);
    let room = server
        .create_room(&alice, json!({ "preset": "public_chat", "name": "Before" }))
        .await;
    send(&server, &alice, &room, "m1").await;
    join(&server, &bob, &room).await;
    send(&server, &bob, &room, "m2").await;
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/leave"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    send(&server, &alice, &room, "m3").await;
    server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.name"),
            Some(&alice),
            json!({ "name": "After" }),
        )
        .await;

    let (status, seen, _) = bodies(&server, &bob, &room, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        seen,
        ["m2"],
        "shared history: only what bob saw while joined"
    );
    let (_, seen, _) = bodies(&server, &alice, &room, None).await;
    assert_eq!(seen, ["m3", "m2", "m1"]);
    let (_, name) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.name"),
            Some(&bob),
        )
        .await;
    assert_eq!(name["name"], "Before", "the state as bob left it");
    let outside = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/messages"),
            Some(&stranger),
        )
        .await;
    assert_error(&outside, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // Joined history: a newcomer sees nothing sent under it before they
    // joined; what was sent under the earlier shared setting stays visible.
    server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.history_visibility"),
            Some(&alice),
            json!({ "history_visibility": "joined" }),
        )
        .await;
    send(&server, &alice, &room, "m4").await;
    let carol = token(&server.register("carol").await);
    join(&server, &carol, &room).await;
    send(&server, &alice, &room, "m5").await;
    let (_, seen, _) = bodies(&server, &carol, &room, None).await;
    assert_eq!(seen, ["m5", "m3", "m2", "m1"]);

    // World-readable: anyone reads what is sent from then on (the setting
    // in force when an event was sent is the one that counts).
    server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.history_visibility"),
            Some(&alice),
            json!({ "history_visibility": "world_readable" }),
        )
        .await;
    send(&server, &alice, &room, "m6").await;
    let (status, seen, _) = bodies(&server, &stranger, &room, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen, ["m6"]);
}

#[tokio::test]
async fn messages_filters_and_lazy_loaded_members() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    join(&server, &bob, &room).await;
    send(&server, &alice, &room, "a1").await;
    send(&server, &bob, &room, "b1").await;

    let filter =
        r#"{"types":["m.room.message"],"senders":["@bob:localhost"],"lazy_load_members":true}"#;
    let (status, seen, page) = bodies(&server, &alice, &room, Some(filter)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(seen, ["b1"]);
    let members: Vec<&str> = page["state"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["@bob:localhost"]);
    let (_, seen, page) = bodies(
        &server,
        &alice,
        &room,
        Some(r#"{"not_types":["m.room.member"]}"#),
    )
    .await;
    assert_eq!(seen, ["b1", "a1"]);
    assert!(page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["type"] != "m.room.member"));
    let (status, _, _) = bodies(&server, &alice, &room, Some("{broken")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Members as of a token from before bob joined.
    let (_, early) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=3"),
            Some(&alice),
        )
        .await;
    let token_then = early["end"].as_str().unwrap();
    let (_, then) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/members?at={token_then}"),
            Some(&alice),
        )
        .await;
    assert_eq!(then["chunk"].as_array().unwrap().len(), 1, "{then}");
    let (_, now) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/members"),
            Some(&alice),
        )
        .await;
    assert_eq!(now["chunk"].as_array().unwrap().len(), 2);
}
