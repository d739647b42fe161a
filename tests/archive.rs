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
    react(server, &token, &room_id, "react", &reacted_lately).await;
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

/// Reacts 👍 to `target`; the reaction's event ID.
async fn react(server: &TestServer, token: &str, room_id: &str, txn: &str, target: &str) -> String {
    let (status, answer) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/send/m.reaction/{txn}"),
            Some(token),
            json!({ "m.relates_to": {
                "rel_type": "m.annotation", "event_id": target, "key": "👍",
            }}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["event_id"].as_str().unwrap().to_owned()
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
    // The test runs the passes itself: the server's own pass runs at its
    // start, with nothing to move, and the next an hour later.
    let config = federating_config(&dir, &ca, "127.0.0.2".parse().unwrap());
    let server = TestServer::start_in(dir, config, Some(clock.clone())).await;
    let peer = start_federating(&ca, "127.0.0.3", |_| {}).await;
    let history = make_history(&server, &clock).await;
    let archive = server.services().archive.clone();
    for id in history.old.iter().chain(&history.recent) {
        assert_eq!(archive.tier(id).unwrap(), Some("hot"));
    }

    let before = every_read(&server, &peer, &history).await;
    let passes = archive.status().unwrap().passes;
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
    assert_eq!(status["passes"], passes + 1, "{status}");

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

/// The event IDs of a room's `/messages`, newest first.
async fn timeline_ids(server: &TestServer, token: &str, room_id: &str) -> Vec<String> {
    let (status, page) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=100"),
            Some(token),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn search_hits(server: &TestServer, token: &str, term: &str) -> Vec<String> {
    let (status, answer) = server
        .post(
            "/_matrix/client/v3/search",
            Some(token),
            json!({ "search_categories": { "room_events": { "search_term": term } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["search_categories"]["room_events"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"]["event_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_past_their_lifetime_are_gone_from_every_endpoint() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let clock = Arc::new(ManualClock::new(now - 40 * DAY_MS));
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(&dir);
    config.archive.after_days = 10;
    config.retention.enabled = true;
    config.retention.max_lifetime_days = Some(30);
    let server = TestServer::start_in(dir, config, Some(clock.clone())).await;
    let token = token(&server.register("keeper").await);
    let event = |room: &str, id: &str| format!("/_matrix/client/v3/rooms/{room}/event/{id}");

    // 40 days ago: a room whose messages outlive the server's 30 days.
    let room = server.create_room(&token, json!({})).await;
    let (_, topic) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/"),
            Some(&token),
            json!({ "topic": "kept: state never expires" }),
        )
        .await;
    let topic = topic["event_id"].as_str().unwrap().to_owned();
    let reaction = react(&server, &token, &room, "r1", &topic).await;
    let old = send_text(&server, &token, &room, "old", "zebra crossing long ago").await;
    let root = send_text(&server, &token, &room, "root", "a thread root").await;
    let reply = send_message(
        &server,
        &token,
        &room,
        "reply",
        json!({
            "msgtype": "m.text", "body": "in the thread",
            "m.relates_to": { "rel_type": "m.thread", "event_id": root },
        }),
    )
    .await;
    // A room whose last event is old: it is the room's forward extremity.
    let quiet = server.create_room(&token, json!({})).await;
    let last_word = send_text(&server, &token, &quiet, "last", "the last word").await;

    // 25 days ago: a message kept by the server's limit, archived.
    clock.advance_ms(15 * DAY_MS);
    let other = server.create_room(&token, json!({})).await;
    let archived_first = send_text(&server, &token, &other, "a1", "zebra in the archive").await;
    // 20 days ago, 5 days ago.
    clock.advance_ms(5 * DAY_MS);
    let kept = send_text(&server, &token, &room, "kept", "zebra still here").await;
    clock.advance_ms(15 * DAY_MS);
    let recent = send_text(&server, &token, &other, "a2", "recent").await;
    clock.advance_ms(5 * DAY_MS);

    let (_, relations) = server
        .get(
            &format!("/_matrix/client/v1/rooms/{room}/relations/{topic}"),
            Some(&token),
        )
        .await;
    assert_eq!(
        relations["chunk"].as_array().unwrap().len(),
        1,
        "{relations}"
    );
    let (_, threads) = server
        .get(
            &format!("/_matrix/client/v1/rooms/{room}/threads"),
            Some(&token),
        )
        .await;
    assert_eq!(threads["chunk"].as_array().unwrap().len(), 1, "{threads}");
    assert_eq!(search_hits(&server, &token, "zebra").await.len(), 3);

    let archive = server.services().archive.clone();
    archive.pass(None).await.unwrap();

    let expired = [&reaction, &old, &root, &reply];
    for id in expired {
        assert_eq!(archive.tier(id).unwrap(), None, "{id} is still stored");
        let answer = server.get(&event(&room, id), Some(&token)).await;
        common::assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");
        let answer = server
            .get(
                &format!("/_matrix/client/v3/rooms/{room}/context/{id}"),
                Some(&token),
            )
            .await;
        common::assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    }
    let timeline = timeline_ids(&server, &token, &room).await;
    for id in expired {
        assert!(!timeline.contains(id), "{id} in /messages");
    }
    assert!(timeline.contains(&kept) && timeline.contains(&topic));
    let (_, relations) = server
        .get(
            &format!("/_matrix/client/v1/rooms/{room}/relations/{topic}"),
            Some(&token),
        )
        .await;
    assert_eq!(relations["chunk"], json!([]), "{relations}");
    let (_, threads) = server
        .get(
            &format!("/_matrix/client/v1/rooms/{room}/threads"),
            Some(&token),
        )
        .await;
    assert_eq!(threads["chunk"], json!([]), "{threads}");
    let hits = search_hits(&server, &token, "zebra").await;
    assert!(!hits.contains(&old), "{hits:?}");
    assert_eq!(hits.len(), 2, "{hits:?}");
    let (_, sync) = server
        .get(
            "/_matrix/client/v3/sync?set_presence=offline&filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A100%7D%7D%7D",
            Some(&token),
        )
        .await;
    let synced = sync.to_string();
    for id in expired {
        assert!(!synced.contains(id.as_str()), "{id} in /sync");
    }
    // The topic (state) and the message within the limit (now archived)
    // stay.
    for (in_room, id) in [(&room, &topic), (&room, &kept)] {
        let (status, answer) = server.get(&event(in_room, id), Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert!(
            answer["content"]["body"].is_string() || id == &topic,
            "{answer}"
        );
    }
    // An expired event the room's next event must still name is kept
    // redacted: its content is gone.
    let (status, answer) = server.get(&event(&quiet, &last_word), Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["content"], json!({}), "{answer}");
    // Once another event follows it, it goes too.
    send_text(&server, &token, &quiet, "after", "a new word").await;
    archive.pass(None).await.unwrap();
    assert_eq!(archive.tier(&last_word).unwrap(), None);
    assert_eq!(archive.tier(&kept).unwrap(), Some("archived"));
    assert_eq!(archive.tier(&archived_first).unwrap(), Some("archived"));

    // A room's own lifetime, shorter than the server's, reaches archived
    // events too.
    let (status, answer) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{other}/state/m.room.retention/"),
            Some(&token),
            json!({ "max_lifetime": 20 * DAY_MS }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    archive.pass(None).await.unwrap();
    assert_eq!(archive.tier(&archived_first).unwrap(), None);
    let answer = server
        .get(&event(&other, &archived_first), Some(&token))
        .await;
    common::assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let timeline = timeline_ids(&server, &token, &other).await;
    assert!(!timeline.contains(&archived_first) && timeline.contains(&recent));
}
