//! The archive tier: old events move to the archived tables, and every
//! read answers as before the move.

mod common;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::federation::{federating_config, start_federating, TestCa};
use common::{send_message, send_text, token, TestServer};
use myelin::services::clock::ManualClock;
use reqwest::{Method, StatusCode};
use ruma::ServerName;
use serde_json::{json, Value};

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Events of a room made 40 days ago and 20 days ago.
struct History {
    room_id: String,
    token: String,
    /// Messages of 40 days ago nobody touched since.
    old: Vec<String>,
    /// A message of 40 days ago reacted to 20 days ago.
    reacted_lately: String,
    /// Messages of 20 days ago.
    recent: Vec<String>,
    edited: String,
    thread_root: String,
    /// A sync token from before everything.
    since: String,
}

async fn make_history(server: &TestServer, clock: &ManualClock) -> History {
    let token = token(&server.register("alice").await);
    let bob = token_of(server.register("bob").await);
    let (_, first) = server
        .get("/_matrix/client/v3/sync?timeout=0", Some(&token))
        .await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let room_id = server
        .create_room(
            &token,
            json!({ "preset": "public_chat", "initial_state": [{
                "type": "m.room.history_visibility", "state_key": "",
                "content": { "history_visibility": "world_readable" },
            }]}),
        )
        .await;
    common::join(server, &bob, &room_id).await;
    // More state changes than a snapshot's chain (32), so that the first
    // topics' state groups are older than the room's latest snapshot.
    for n in 0..40 {
        let (status, answer) = server
            .put(
                &format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.topic/"),
                Some(&token),
                json!({ "topic": format!("topic {n}") }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let mut old = Vec::new();
    for n in 0..8 {
        old.push(
            send_text(
                server,
                &bob,
                &room_id,
                &format!("old{n}"),
                &format!("old {n}"),
            )
            .await,
        );
    }
    let edited = old[1].clone();
    send_message(
        server,
        &bob,
        &room_id,
        "edit",
        json!({
            "msgtype": "m.text", "body": "* old 1, fixed",
            "m.new_content": { "msgtype": "m.text", "body": "old 1, fixed" },
            "m.relates_to": { "rel_type": "m.replace", "event_id": edited },
        }),
    )
    .await;
    let thread_root = old[2].clone();
    for n in 0..2 {
        send_message(
            server,
            &token,
            &room_id,
            &format!("thread{n}"),
            json!({
                "msgtype": "m.text", "body": format!("in the thread {n}"),
                "m.relates_to": { "rel_type": "m.thread", "event_id": thread_root },
            }),
        )
        .await;
    }
    send_message(
        server,
        &token,
        &room_id,
        "reply",
        json!({
            "msgtype": "m.text", "body": "a reply",
            "m.relates_to": { "m.in_reply_to": { "event_id": old[3] } },
        }),
    )
    .await;
    clock.advance_ms(20 * DAY_MS);
    let reacted_lately = old[4].clone();
    let (status, answer) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/send/m.reaction/react"),
            Some(&token),
            json!({ "m.relates_to": {
                "rel_type": "m.annotation", "event_id": reacted_lately, "key": "👍",
            }}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let mut recent = Vec::new();
    for n in 0..4 {
        recent.push(
            send_text(
                server,
                &bob,
                &room_id,
                &format!("new{n}"),
                &format!("new {n}"),
            )
            .await,
        );
    }
    clock.advance_ms(20 * DAY_MS);
    History {
        room_id,
        token,
        old,
        reacted_lately,
        recent,
        edited,
        thread_root,
        since,
    }
}

fn token_of(answer: Value) -> String {
    token(&answer)
}

/// Every read of the room a client or another server makes, as
/// (what, status, answer).
async fn every_read(
    server: &TestServer,
    peer: &TestServer,
    history: &History,
) -> Vec<(String, u16, Value)> {
    let room = &history.room_id;
    let mut paths = vec![
        format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100"),
        format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=100"),
        format!(
            "/_matrix/client/v1/rooms/{room}/relations/{}",
            history.edited
        ),
        format!(
            "/_matrix/client/v1/rooms/{room}/relations/{}",
            history.thread_root
        ),
        format!(
            "/_matrix/client/v1/rooms/{room}/relations/{}/m.annotation",
            history.reacted_lately
        ),
        format!("/_matrix/client/v1/rooms/{room}/threads"),
        format!(
            "/_matrix/client/v3/sync?set_presence=offline&since={}&filter={}",
            history.since,
            urlencoding(&json!({ "room": { "timeline": { "limit": 200 } } }).to_string())
        ),
    ];
    for id in history.old.iter().chain(&history.recent) {
        paths.push(format!("/_matrix/client/v3/rooms/{room}/event/{id}"));
        paths.push(format!(
            "/_matrix/client/v3/rooms/{room}/context/{id}?limit=6"
        ));
    }
    let mut reads = Vec::new();
    for path in paths {
        let (status, answer) = server.get(&path, Some(&history.token)).await;
        reads.push((path, status.as_u16(), answer));
    }
    let (status, answer) = server
        .post(
            "/_matrix/client/v3/search",
            Some(&history.token),
            json!({ "search_categories": { "room_events": { "search_term": "old" } } }),
        )
        .await;
    reads.push(("search".to_owned(), status.as_u16(), answer));
    // Another server's reads: the room is world-readable.
    let client = &peer.services().federation.client;
    let destination = ServerName::parse(server.server_name()).unwrap();
    let last = history.recent.last().unwrap();
    let mut federation_paths = vec![format!(
        "/_matrix/federation/v1/backfill/{room}?v={}&limit=100",
        urlencoding(last)
    )];
    for id in history.old.iter().chain(&history.recent) {
        federation_paths.push(format!("/_matrix/federation/v1/event/{}", urlencoding(id)));
    }
    for path in federation_paths {
        let answer = client
            .send(&destination, Method::GET, &path, None)
            .await
            .unwrap_or_else(|e| panic!("{path}: {e:?}"));
        reads.push((path, 200, answer));
    }
    reads
}

fn urlencoding(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn old_events_move_to_the_archive_and_read_the_same() {
    let ca = TestCa::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let clock = Arc::new(ManualClock::new(now - 40 * DAY_MS));
    let dir = tempfile::tempdir().unwrap();
    let mut config = federating_config(&dir, &ca, "127.0.0.2".parse().unwrap());
    // The test runs the mover itself.
    config.archive.enabled = false;
    let server = TestServer::start_in(dir, config, Some(clock.clone())).await;
    let peer = start_federating(&ca, "127.0.0.3", |_| {}).await;
    let history = make_history(&server, &clock).await;
    let archive = server.services().archive.clone();
    for id in history.old.iter().chain(&history.recent) {
        assert_eq!(archive.tier(id).unwrap(), Some("hot"));
    }

    let before = every_read(&server, &peer, &history).await;
    let moved = archive.pass(None).await.unwrap();
    // The old messages, the edit, the thread replies, the reply, the old
    // member and topic events that are no longer current.
    assert!(moved >= 7 + 1 + 2 + 1 + 39, "moved {moved}");
    for id in &history.old {
        let expected = if *id == history.reacted_lately {
            "hot"
        } else {
            "archived"
        };
        assert_eq!(archive.tier(id).unwrap(), Some(expected), "{id}");
    }
    for id in &history.recent {
        assert_eq!(archive.tier(id).unwrap(), Some("hot"), "{id}");
    }
    let status = archive.status().unwrap().to_json();
    assert!(
        status["archived"]["events"].as_u64().unwrap() > 0,
        "{status}"
    );
    // The edit's and the thread replies' relation rows, and the first
    // topics' state groups (older than the latest snapshot).
    assert!(
        status["archived_relations"].as_u64().unwrap() >= 3,
        "{status}"
    );
    assert!(
        status["archived_state_groups"].as_u64().unwrap() >= 5,
        "{status}"
    );
    assert_eq!(status["passes"], 1, "{status}");

    let after = every_read(&server, &peer, &history).await;
    assert_eq!(before.len(), after.len());
    for ((what, status, answer), (_, status_after, answer_after)) in before.iter().zip(&after) {
        assert_eq!(status, &200, "{what}: {answer}");
        assert_eq!(
            (status, answer),
            (status_after, answer_after),
            "{what} answers differently once archived"
        );
    }

    // A second pass finds nothing more to move.
    assert_eq!(archive.pass(None).await.unwrap(), 0);

    // Redacting an archived event brings it back to the hot tier, redacted.
    let target = &history.old[0];
    let (status, answer) = server
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{}/redact/{target}/r1",
                history.room_id
            ),
            Some(&history.token),
            json!({ "reason": "old" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(archive.tier(target).unwrap(), Some("hot"));
    let (status, event) = server
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{}/event/{target}",
                history.room_id
            ),
            Some(&history.token),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{event}");
    assert_eq!(event["content"], json!({}), "{event}");
    assert!(event["unsigned"]["redacted_because"].is_object(), "{event}");
    // Freshly redacted, it stays hot through the next pass.
    archive.pass(None).await.unwrap();
    assert_eq!(archive.tier(target).unwrap(), Some("hot"));
}
