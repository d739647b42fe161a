//! `/sync` over HTTP: what an initial and an incremental sync contain, the
//! delivery guarantees (every event once, in order; gaps marked and
//! fillable; tokens valid across restarts) and the wake-ups of a waiting
//! sync.

mod common;

use std::collections::BTreeSet;

use common::{assert_error, join, send_text, token, woken, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// One `/sync` call; panics unless it answers 200.
async fn sync(
    server: &TestServer,
    token: &str,
    since: Option<&str>,
    filter: Option<&str>,
    timeout_ms: u64,
) -> Value {
    let mut query = format!("timeout={timeout_ms}");
    if let Some(since) = since {
        query += &format!("&since={since}");
    }
    if let Some(filter) = filter {
        let encoded: String = form_urlencoded::byte_serialize(filter.as_bytes()).collect();
        query += &format!("&filter={encoded}");
    }
    let (status, answer) = server
        .get(&format!("/_matrix/client/v3/sync?{query}"), Some(token))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

fn next_batch(answer: &Value) -> String {
    answer["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned()
}

/// The bodies of the timeline's messages in one room of a sync answer.
fn bodies(answer: &Value, room_id: &str) -> Vec<String> {
    answer["rooms"]["join"][room_id]["timeline"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap().to_owned())
        .collect()
}

fn event_types(events: &Value) -> Vec<String> {
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn an_initial_sync_has_the_rooms_their_state_and_latest_events() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    join(&server, &bob, &room_id).await;
    for n in 0..12 {
        send_text(
            &server,
            &alice,
            &room_id,
            &format!("t{n}"),
            &format!("m{n}"),
        )
        .await;
    }
    let answer = sync(&server, &bob, None, None, 0).await;
    let room = &answer["rooms"]["join"][&room_id];
    let bodies = bodies(&answer, &room_id);
    assert_eq!(bodies, (2..12).map(|n| format!("m{n}")).collect::<Vec<_>>());
    assert_eq!(room["timeline"]["limited"], true);
    assert!(room["timeline"]["prev_batch"].is_string());
    let state_types = event_types(&room["state"]["events"]);
    for kind in ["m.room.create", "m.room.power_levels", "m.room.member"] {
        assert!(
            state_types.iter().any(|t| t == kind),
            "{kind} missing: {state_types:?}"
        );
    }
    assert_eq!(room["summary"]["m.joined_member_count"], 2);
    assert_eq!(room["summary"]["m.heroes"], json!(["@alice:localhost"]));
    assert_eq!(room["unread_notifications"]["notification_count"], 12);
    assert!(answer["rooms"]["invite"].as_object().unwrap().is_empty());
    assert!(answer["to_device"]["events"].is_array());
    assert!(answer["device_lists"]["changed"].is_array());

    // The sender's own sync carries the transaction IDs of its echoes and
    // nothing unread.
    let own = sync(&server, &alice, None, None, 0).await;
    let own_room = &own["rooms"]["join"][&room_id];
    let last = own_room["timeline"]["events"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["unsigned"]["transaction_id"], "t11");
    assert_eq!(own_room["unread_notifications"]["notification_count"], 0);
}

#[tokio::test]
async fn an_incremental_sync_has_exactly_what_came_after_the_token() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let room_id = server.create_room(&alice, json!({})).await;
    send_text(&server, &alice, &room_id, "1", "before").await;
    let first = sync(&server, &alice, None, None, 0).await;
    let since = next_batch(&first);
    for body in ["a", "b", "c"] {
        send_text(&server, &alice, &room_id, body, body).await;
    }
    let second = sync(&server, &alice, Some(&since), None, 0).await;
    assert_eq!(bodies(&second, &room_id), ["a", "b", "c"]);
    let room = &second["rooms"]["join"][&room_id];
    assert_eq!(room["timeline"]["limited"], false);
    assert!(room["state"]["events"].as_array().unwrap().is_empty());
    let third = sync(&server, &alice, Some(&next_batch(&second)), None, 0).await;
    assert!(
        third["rooms"]["join"].as_object().unwrap().is_empty(),
        "{third}"
    );

    // full_state gives the whole state again with an unchanged token.
    let path = format!(
        "/_matrix/client/v3/sync?since={}&full_state=true",
        next_batch(&second)
    );
    let (_, full) = server.get(&path, Some(&alice)).await;
    let state = &full["rooms"]["join"][&room_id]["state"]["events"];
    assert!(
        event_types(state).iter().any(|t| t == "m.room.create"),
        "{full}"
    );
}

/// Syncs from `since` until a sync has nothing new, filling every limited
/// gap through `/messages` back to the previous token; returns the message
/// bodies received, in order, the last token and the number of gaps.
async fn catch_up(
    server: &TestServer,
    token: &str,
    room_id: &str,
    mut since: String,
    filter: &str,
) -> (Vec<String>, String, usize) {
    let mut received = Vec::new();
    let mut gaps = 0;
    loop {
        let answer = sync(server, token, Some(&since), Some(filter), 0).await;
        let Some(room) = answer["rooms"]["join"].get(room_id) else {
            return (received, next_batch(&answer), gaps);
        };
        if room["timeline"]["limited"] == true {
            gaps += 1;
            let mut gap = Vec::new();
            let mut from = room["timeline"]["prev_batch"].as_str().unwrap().to_owned();
            loop {
                let path = format!(
                    "/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=7&from={from}&to={since}"
                );
                let (status, page) = server.get(&path, Some(token)).await;
                assert_eq!(status, StatusCode::OK, "{page}");
                for event in page["chunk"].as_array().unwrap() {
                    if event["type"] == "m.room.message" {
                        gap.push(event["content"]["body"].as_str().unwrap().to_owned());
                    }
                }
                match page["end"].as_str() {
                    Some(end) => from = end.to_owned(),
                    None => break,
                }
            }
            gap.reverse();
            received.extend(gap);
        }
        received.extend(bodies(&answer, room_id));
        since = next_batch(&answer);
    }
}

/// An incremental sync reads a short window forward and a longer one
/// backward: at the timeline limit and one past it, it gives the newest
/// events, limited only past it; and a device's inbox is read only when
/// something came for that device.
#[tokio::test]
async fn an_incremental_window_at_and_past_the_timeline_limit() {
    let server = TestServer::start().await;
    let alice = token(&server.register_device("alice", "DESK").await);
    let bob_phone = token(&server.register_device("bob", "PHONE").await);
    let bob_laptop = token(&server.login("bob", Some("LAPTOP")).await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    join(&server, &bob_phone, &room_id).await;
    let filter = r#"{"room":{"timeline":{"limit":3}}}"#;
    let mut since = next_batch(&sync(&server, &bob_phone, None, Some(filter), 0).await);
    let mut laptop_since = next_batch(&sync(&server, &bob_laptop, None, None, 0).await);
    for (count, limited) in [(2, false), (3, false), (4, true), (7, true)] {
        let sent: Vec<String> = (0..count).map(|n| format!("c{count}-{n}")).collect();
        for body in &sent {
            send_text(&server, &alice, &room_id, body, body).await;
        }
        let answer = sync(&server, &bob_phone, Some(&since), Some(filter), 0).await;
        let newest = &sent[sent.len().saturating_sub(3)..];
        assert_eq!(bodies(&answer, &room_id), newest, "{count} sent");
        let timeline = &answer["rooms"]["join"][&room_id]["timeline"];
        assert_eq!(timeline["limited"], limited, "{count} sent: {timeline}");
        since = next_batch(&answer);
    }

    let body = json!({ "messages": { "@bob:localhost": { "PHONE": { "n": 1 } } } });
    let (status, _) = server
        .put(
            "/_matrix/client/v3/sendToDevice/org.example.ping/p1",
            Some(&alice),
            body,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    send_text(&server, &alice, &room_id, "after", "after").await;
    let laptop = sync(&server, &bob_laptop, Some(&laptop_since), None, 0).await;
    assert_eq!(laptop["to_device"]["events"], json!([]), "{laptop}");
    assert!(!bodies(&laptop, &room_id).is_empty(), "{laptop}");
    laptop_since = next_batch(&laptop);
    let phone = sync(&server, &bob_phone, Some(&since), None, 0).await;
    assert_eq!(
        phone["to_device"]["events"][0]["content"]["n"], 1,
        "{phone}"
    );
    // Once synced past, the message is not given again; the laptop still
    // has none.
    let past = sync(&server, &bob_phone, Some(&next_batch(&phone)), None, 0).await;
    assert_eq!(past["to_device"]["events"], json!([]), "{past}");
    let laptop = sync(&server, &bob_laptop, Some(&laptop_since), None, 0).await;
    assert_eq!(laptop["to_device"]["events"], json!([]), "{laptop}");
}

#[tokio::test]
async fn a_device_catching_up_under_concurrent_writes_gets_every_event_once_in_order() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    join(&server, &bob, &room_id).await;
    let start = next_batch(&sync(&server, &bob, None, None, 0).await);
    let filter = r#"{"room":{"timeline":{"limit":4}}}"#;
    // Written while the device is away: its first sync must be limited.
    for n in 0..20 {
        send_text(
            &server,
            &alice,
            &room_id,
            &format!("early{n}"),
            &format!("early{n}"),
        )
        .await;
    }

    // Four writers send while the reader syncs with a small timeline
    // limit, so that most syncs are limited and leave gaps to fill.
    let mut writers = Vec::new();
    for writer in 0..4 {
        let base = server.base.clone();
        let (alice, room_id) = (alice.clone(), room_id.clone());
        writers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for n in 0..40 {
                let url = format!(
                    "{base}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/w{writer}-{n}"
                );
                let answer = http
                    .put(url)
                    .bearer_auth(&alice)
                    .json(&json!({ "msgtype": "m.text", "body": format!("w{writer}-{n}") }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.status(), StatusCode::OK);
            }
        }));
    }
    let mut received = Vec::new();
    let mut since = start.clone();
    let mut gaps = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        let (more, next, filled) = catch_up(&server, &bob, &room_id, since, filter).await;
        received.extend(more);
        since = next;
        gaps += filled;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let (more, _, filled) = catch_up(&server, &bob, &room_id, since, filter).await;
    received.extend(more);
    assert!(gaps + filled > 0, "the test must exercise at least one gap");

    // The order every reader agrees on: the room's timeline.
    let path = format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=f&limit=1000&from={start}");
    let (_, all) = server.get(&path, Some(&bob)).await;
    let expected: Vec<String> = all["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(expected.len(), 180);
    assert_eq!(
        received, expected,
        "every event once, in the timeline's order"
    );
}

#[tokio::test]
async fn tokens_stay_valid_across_a_restart() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let room_id = server.create_room(&alice, json!({})).await;
    let since = next_batch(&sync(&server, &alice, None, None, 0).await);
    send_text(&server, &alice, &room_id, "1", "before restart").await;
    let config = common::test_config(&server.dir);
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, config, None).await;
    send_text(&server, &alice, &room_id, "2", "after restart").await;
    let answer = sync(&server, &alice, Some(&since), None, 0).await;
    assert_eq!(
        bodies(&answer, &room_id),
        ["before restart", "after restart"]
    );
    let again = sync(&server, &alice, Some(&next_batch(&answer)), None, 0).await;
    assert!(again["rooms"]["join"].as_object().unwrap().is_empty());
}

/// Starts a sync that waits up to a minute; returns its handle.
fn waiting_sync(server: &TestServer, token: &str, since: &str) -> tokio::task::JoinHandle<Value> {
    let url = server.url(&format!(
        "/_matrix/client/v3/sync?since={since}&timeout=60000"
    ));
    let token = token.to_owned();
    tokio::spawn(async move {
        let answer = reqwest::Client::new()
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        answer.json().await.unwrap()
    })
}

#[tokio::test]
async fn a_waiting_sync_wakes_for_each_kind_of_write() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    join(&server, &bob, &room_id).await;
    let mut since = next_batch(&sync(&server, &bob, None, None, 0).await);
    let room = format!("/_matrix/client/v3/rooms/{room_id}");
    let event_id = send_text(&server, &alice, &room_id, "x", "first").await;
    since = next_batch(&sync(&server, &bob, Some(&since), None, 0).await);

    // Each write below must end a wait of up to a minute, with itself in
    // the answer: a missed wake-up would return an empty answer instead.
    type Check = fn(&Value, &str) -> bool;
    let cases: Vec<(&str, Check)> = vec![
        ("message", |a, r| !bodies(a, r).is_empty()),
        ("state", |a, r| {
            event_types(&a["rooms"]["join"][r]["timeline"]["events"])
                .contains(&"m.room.topic".to_owned())
        }),
        ("typing", |a, r| {
            a["rooms"]["join"][r]["ephemeral"]["events"][0]["content"]["user_ids"]
                == json!(["@alice:localhost"])
        }),
        ("receipt", |a, r| {
            a["rooms"]["join"][r]["ephemeral"]["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["type"] == "m.receipt"))
        }),
        ("room account data", |a, r| {
            a["rooms"]["join"][r]["account_data"]["events"][0]["type"] == "org.example.room"
        }),
        ("global account data", |a, _| {
            a["account_data"]["events"][0]["type"] == "org.example.global"
        }),
        ("presence", |a, _| {
            a["presence"]["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["sender"] == "@alice:localhost"))
        }),
    ];
    for (kind, check) in cases {
        let waiting = waiting_sync(&server, &bob, &since);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let (status, answer) = match kind {
            "message" => {
                send_text(&server, &alice, &room_id, "y", "second").await;
                (StatusCode::OK, json!({}))
            }
            "state" => {
                server
                    .put(
                        &format!("{room}/state/m.room.topic"),
                        Some(&alice),
                        json!({ "topic": "t" }),
                    )
                    .await
            }
            "typing" => {
                server
                    .put(
                        &format!("{room}/typing/@alice:localhost"),
                        Some(&alice),
                        json!({ "typing": true, "timeout": 30000 }),
                    )
                    .await
            }
            "receipt" => {
                server
                    .post(
                        &format!("{room}/receipt/m.read/{event_id}"),
                        Some(&alice),
                        json!({}),
                    )
                    .await
            }
            "room account data" => {
                let path = format!(
                    "/_matrix/client/v3/user/@bob:localhost/rooms/{room_id}/account_data/org.example.room"
                );
                server.put(&path, Some(&bob), json!({ "a": 1 })).await
            }
            "global account data" => {
                let path = "/_matrix/client/v3/user/@bob:localhost/account_data/org.example.global";
                server.put(path, Some(&bob), json!({ "a": 1 })).await
            }
            "presence" => {
                server
                    .put(
                        "/_matrix/client/v3/presence/@alice:localhost/status",
                        Some(&alice),
                        json!({ "presence": "unavailable" }),
                    )
                    .await
            }
            _ => unreachable!(),
        };
        assert_eq!(status, StatusCode::OK, "{kind}: {answer}");
        let woken = woken(waiting).await;
        assert!(check(&woken, &room_id), "{kind}: {woken}");
        since = next_batch(&woken);
    }

    // A membership: an invite to a new room wakes the invitee's sync.
    let waiting = waiting_sync(&server, &bob, &since);
    let other = server
        .create_room(
            &alice,
            json!({ "invite": ["@bob:localhost"], "name": "Other" }),
        )
        .await;
    let woken = woken(waiting).await;
    let invite = &woken["rooms"]["invite"][&other]["invite_state"]["events"];
    let types = event_types(invite);
    assert!(types.contains(&"m.room.name".to_owned()), "{woken}");
    assert!(types.contains(&"m.room.member".to_owned()), "{woken}");
}

#[tokio::test]
async fn a_write_racing_the_start_of_a_wait_is_never_missed() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let room_id = server.create_room(&alice, json!({})).await;
    let mut since = next_batch(&sync(&server, &alice, None, None, 0).await);
    for n in 0..40 {
        // The send and the sync start together; whichever wins, the sync
        // must answer with the message (a lost wake-up would leave it
        // waiting a minute and answering empty).
        let waiting = waiting_sync(&server, &alice, &since);
        let body = format!("race {n}");
        send_text(&server, &alice, &room_id, &format!("r{n}"), &body).await;
        let answer = woken(waiting).await;
        let got = bodies(&answer, &room_id);
        let answer = if got.is_empty() {
            // The sync answered with something else first (its own
            // presence); the message must then be in the next one.
            sync(&server, &alice, Some(&next_batch(&answer)), None, 60_000).await
        } else {
            answer
        };
        assert_eq!(bodies(&answer, &room_id), [body]);
        since = next_batch(&answer);
    }
}

#[tokio::test]
async fn filters_shape_the_answer() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let carol = token(&server.register("carol").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat", "name": "Room" }))
        .await;
    let quiet = server.create_room(&bob, json!({})).await;
    join(&server, &bob, &room_id).await;
    join(&server, &carol, &room_id).await;
    send_text(&server, &alice, &room_id, "1", "from alice").await;
    server
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/send/org.example.other/2"),
            Some(&alice),
            json!({}),
        )
        .await;

    // A stored filter: two events, messages only, lazy-loaded members.
    let stored = json!({
        "room": {
            "timeline": { "limit": 2, "types": ["m.room.message"] },
            "state": { "lazy_load_members": true },
            "not_rooms": [quiet],
        },
        "event_fields": ["type", "state_key", "content.body", "sender"],
    });
    let (status, created) = server
        .post(
            "/_matrix/client/v3/user/@bob:localhost/filter",
            Some(&bob),
            stored,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let filter_id = created["filter_id"].as_str().unwrap();
    let answer = sync(&server, &bob, None, Some(filter_id), 0).await;
    assert!(answer["rooms"]["join"].get(&quiet).is_none(), "not_rooms");
    let room = &answer["rooms"]["join"][&room_id];
    let timeline = room["timeline"]["events"].as_array().unwrap();
    assert!(
        timeline.iter().all(|e| e["type"] == "m.room.message"),
        "{room}"
    );
    assert_eq!(
        timeline.last().unwrap(),
        &json!({
            "type": "m.room.message",
            "content": { "body": "from alice" },
            "sender": "@alice:localhost",
        })
    );
    let members: BTreeSet<String> = room["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap().to_owned())
        .collect();
    let senders: BTreeSet<String> = timeline
        .iter()
        .map(|e| e["sender"].as_str().unwrap().to_owned())
        .chain(["@bob:localhost".to_owned()])
        .collect();
    assert_eq!(members, senders, "only the senders' and one's own members");
    assert!(!members.contains("@carol:localhost") || senders.contains("@carol:localhost"));

    // An inline filter.
    let inline = r#"{"room":{"timeline":{"limit":1},"rooms":["QUIET"]}}"#.replace("QUIET", &quiet);
    let answer = sync(&server, &bob, None, Some(&inline), 0).await;
    let joined = answer["rooms"]["join"].as_object().unwrap();
    assert_eq!(joined.keys().collect::<Vec<_>>(), [&quiet]);
    assert_eq!(
        joined[&quiet]["timeline"]["events"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let unknown = server
        .get("/_matrix/client/v3/sync?filter=nope", Some(&bob))
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let malformed = server
        .get("/_matrix/client/v3/sync?filter=%7Bnope", Some(&bob))
        .await;
    assert_error(&malformed, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let bad_since = server
        .get("/_matrix/client/v3/sync?since=yesterday", Some(&bob))
        .await;
    assert_error(&bad_since, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let bad_presence = server
        .get("/_matrix/client/v3/sync?set_presence=busy", Some(&bob))
        .await;
    assert_error(&bad_presence, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let anonymous = server.get("/_matrix/client/v3/sync", None).await;
    assert_error(&anonymous, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
}

#[tokio::test]
async fn memberships_move_rooms_between_sections() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    let since = next_batch(&sync(&server, &bob, None, None, 0).await);

    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/invite"),
            Some(&alice),
            json!({ "user_id": "@bob:localhost" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let invited = sync(&server, &bob, Some(&since), None, 0).await;
    let invite_state = &invited["rooms"]["invite"][&room_id]["invite_state"]["events"];
    let own = invite_state
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.member")
        .unwrap();
    assert_eq!(own["content"]["membership"], "invite");
    assert_eq!(own["sender"], "@alice:localhost");

    // Joining: the room arrives in `join` with its whole state.
    join(&server, &bob, &room_id).await;
    let joined = sync(&server, &bob, Some(&next_batch(&invited)), None, 0).await;
    let room = &joined["rooms"]["join"][&room_id];
    let mut seen = event_types(&room["state"]["events"]);
    seen.extend(event_types(&room["timeline"]["events"]));
    assert!(seen.contains(&"m.room.create".to_owned()), "{joined}");
    assert_eq!(room["summary"]["m.joined_member_count"], 2);

    // Kicked: the room moves to `leave`, with the kick in its timeline.
    send_text(&server, &alice, &room_id, "1", "goodbye").await;
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/kick"),
            Some(&alice),
            json!({ "user_id": "@bob:localhost", "reason": "test" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    send_text(&server, &alice, &room_id, "2", "after the kick").await;
    let left = sync(&server, &bob, Some(&next_batch(&joined)), None, 0).await;
    let timeline = &left["rooms"]["leave"][&room_id]["timeline"]["events"];
    let events = timeline.as_array().unwrap();
    assert_eq!(events[0]["content"]["body"], "goodbye");
    assert_eq!(events.last().unwrap()["content"]["membership"], "leave");
    assert!(left["rooms"]["join"].get(&room_id).is_none());

    // An initial sync shows left rooms only when the filter asks.
    let plain = sync(&server, &bob, None, None, 0).await;
    assert!(plain["rooms"]["leave"].get(&room_id).is_none());
    let with_leave = sync(
        &server,
        &bob,
        None,
        Some(r#"{"room":{"include_leave":true}}"#),
        0,
    )
    .await;
    assert!(with_leave["rooms"]["leave"].get(&room_id).is_some());

    // Knocking.
    let knockable = server
        .create_room(
            &alice,
            json!({ "initial_state": [{
            "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" }
        }] }),
        )
        .await;
    let before = next_batch(&plain);
    let (status, answer) = server
        .post(
            &format!("/_matrix/client/v3/knock/{knockable}"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let knocked = sync(&server, &bob, Some(&before), None, 0).await;
    assert!(
        knocked["rooms"]["knock"][&knockable]["knock_state"]["events"].is_array(),
        "{knocked}"
    );
}

#[tokio::test]
async fn unread_counts_follow_messages_receipts_and_mentions() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat", "name": "Named" }))
        .await;
    join(&server, &bob, &room_id).await;
    send_text(&server, &alice, &room_id, "1", "one").await;
    let last = send_text(&server, &alice, &room_id, "2", "two").await;
    let (status, _) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/3"),
            Some(&alice),
            json!({ "msgtype": "m.text", "body": "hey bob", "m.mentions": { "user_ids": ["@bob:localhost"] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let answer = sync(&server, &bob, None, None, 0).await;
    let room = &answer["rooms"]["join"][&room_id];
    assert_eq!(
        room["unread_notifications"],
        json!({ "notification_count": 3, "highlight_count": 1 })
    );
    assert!(
        room["summary"].get("m.heroes").is_none(),
        "a named room has no heroes"
    );

    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{last}"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let after = sync(&server, &bob, Some(&next_batch(&answer)), None, 0).await;
    let room = &after["rooms"]["join"][&room_id];
    assert_eq!(
        room["unread_notifications"],
        json!({ "notification_count": 1, "highlight_count": 1 })
    );
    let receipt = &room["ephemeral"]["events"][0];
    assert_eq!(receipt["type"], "m.receipt");
    assert!(receipt["content"][&last]["m.read"]["@bob:localhost"]["ts"].is_u64());
}

#[tokio::test]
async fn set_presence_marks_the_user_for_those_who_share_a_room() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let carol = token(&server.register("carol").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    join(&server, &bob, &room_id).await;
    let since = next_batch(&sync(&server, &bob, None, None, 0).await);
    let (status, _) = server
        .get(
            "/_matrix/client/v3/sync?set_presence=unavailable",
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .get("/_matrix/client/v3/sync?set_presence=online", Some(&carol))
        .await;
    assert_eq!(status, StatusCode::OK);
    let answer = sync(&server, &bob, Some(&since), None, 0).await;
    let events = answer["presence"]["events"].as_array().unwrap();
    let alice_presence = events
        .iter()
        .find(|e| e["sender"] == "@alice:localhost")
        .expect("alice's presence");
    assert_eq!(alice_presence["content"]["presence"], "unavailable");
    assert!(
        events.iter().all(|e| e["sender"] != "@carol:localhost"),
        "carol shares no room with bob"
    );
}

#[tokio::test]
async fn many_presence_changes_at_once_show_only_room_mates() {
    // More changes in one window than a sync checks user by user: the
    // room's member list answers who shares a room.
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    join(&server, &bob, &room_id).await;
    let mut others = Vec::new();
    for n in 0..70 {
        others.push(token(&server.register(&format!("user{n}")).await));
    }
    // Three of them are room mates; the rest share no room with Bob.
    for other in &others[..3] {
        join(&server, other, &room_id).await;
    }
    let since = next_batch(&sync(&server, &bob, None, None, 0).await);
    for other in others.iter().chain([&alice]) {
        let (status, _) = server
            .get("/_matrix/client/v3/sync?set_presence=online", Some(other))
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let answer = sync(&server, &bob, Some(&since), None, 0).await;
    let mut senders: Vec<&str> = answer["presence"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sender"].as_str().unwrap())
        .collect();
    senders.sort_unstable();
    assert_eq!(
        senders,
        [
            "@alice:localhost",
            "@user0:localhost",
            "@user1:localhost",
            "@user2:localhost"
        ]
    );
}

#[tokio::test]
async fn device_lists_name_who_changed_devices_and_who_left() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let carol = token(&server.register("carol").await);
    server.register("dave").await;
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    join(&server, &bob, &room_id).await;
    let device_lists = |answer: &Value| {
        let list = |field: &str| -> Vec<String> {
            answer["device_lists"][field]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u.as_str().unwrap().to_owned())
                .collect()
        };
        (list("changed"), list("left"))
    };
    let since = next_batch(&sync(&server, &bob, None, None, 0).await);

    // A new device of Alice (who shares a room) wakes Bob's waiting sync;
    // one of Dave (who shares none) is not named.
    let waiting = waiting_sync(&server, &bob, &since);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    server.login("dave", None).await;
    let phone = server.login("alice", Some("PHONE")).await;
    let answer = woken(waiting).await;
    let mut since = next_batch(&answer);
    let (changed, _) = device_lists(&answer);
    let answer = if changed.is_empty() {
        // Woken by Dave's login first: Alice's is in the next answer.
        let next = sync(&server, &bob, Some(&since), None, 0).await;
        since = next_batch(&next);
        next
    } else {
        answer
    };
    assert_eq!(
        device_lists(&answer),
        (vec!["@alice:localhost".to_owned()], vec![])
    );

    // Carol joins: her devices are now Bob's business.
    join(&server, &carol, &room_id).await;
    let answer = sync(&server, &bob, Some(&since), None, 0).await;
    assert_eq!(device_lists(&answer).0, ["@carol:localhost"]);
    since = next_batch(&answer);

    // Carol leaves the only room they shared: she is `left`.
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/leave"),
            Some(&carol),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let answer = sync(&server, &bob, Some(&since), None, 0).await;
    assert_eq!(
        device_lists(&answer),
        (vec![], vec!["@carol:localhost".to_owned()])
    );
    since = next_batch(&answer);

    // Alice deletes a device (with her password); Bob's own new device.
    let phone_token = token(&phone);
    let body = json!({ "auth": {
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": "alice" },
        "password": common::PASSWORD,
    } });
    let (status, challenge) = server
        .call(
            reqwest::Method::DELETE,
            "/_matrix/client/v3/devices/PHONE",
            Some(&phone_token),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    let mut body = body;
    body["auth"]["session"] = challenge["session"].clone();
    let (status, answer) = server
        .call(
            reqwest::Method::DELETE,
            "/_matrix/client/v3/devices/PHONE",
            Some(&alice),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    server.login("bob", Some("LAPTOP")).await;
    let answer = sync(&server, &bob, Some(&since), None, 0).await;
    let (mut changed, left) = device_lists(&answer);
    changed.sort();
    assert_eq!(changed, ["@alice:localhost", "@bob:localhost"]);
    assert!(left.is_empty());
}

#[tokio::test]
async fn a_filter_that_leaves_out_every_room_keeps_presence_and_device_lists() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    join(&server, &bob, &room_id).await;
    let light = r#"{"room": {"rooms": []}}"#;
    let since = next_batch(&sync(&server, &bob, None, Some(light), 0).await);

    // Alice comes online, signs in on a phone and speaks.
    let (status, _) = server
        .get("/_matrix/client/v3/sync?set_presence=online", Some(&alice))
        .await;
    assert_eq!(status, StatusCode::OK);
    server.login("alice", Some("PHONE")).await;
    send_text(&server, &alice, &room_id, "t1", "hello").await;
    let (status, _) = server
        .put(
            "/_matrix/client/v3/user/@bob:localhost/account_data/org.example.light",
            Some(&bob),
            json!({ "kept": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // Bob's light sync has no rooms, but everything else.
    let answer = sync(&server, &bob, Some(&since), Some(light), 0).await;
    for section in ["join", "invite", "leave", "knock"] {
        assert_eq!(answer["rooms"][section], json!({}), "{answer}");
    }
    let presence = answer["presence"]["events"].as_array().unwrap();
    assert!(
        presence.iter().any(|e| e["sender"] == "@alice:localhost"),
        "{answer}"
    );
    assert_eq!(
        answer["device_lists"]["changed"],
        json!(["@alice:localhost"])
    );
    assert_eq!(
        event_types(&answer["account_data"]["events"]),
        ["org.example.light"]
    );
}
