//! Simplified sliding sync (MSC4186) over HTTP: lists, ranges, filters,
//! required state, room subscriptions, extensions, positions and wake-ups.

mod common;

use common::{assert_error, send_text, token, woken, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

async fn sliding(server: &TestServer, token: &str, pos: Option<&str>, body: Value) -> Value {
    let path = match pos {
        Some(pos) => format!("{PATH}?pos={pos}&timeout=0"),
        None => PATH.to_owned(),
    };
    let (status, answer) = server.post(&path, Some(token), body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

fn pos(answer: &Value) -> String {
    answer["pos"].as_str().expect("pos").to_owned()
}

/// Alice, Bob, and three rooms: "Older" and "Newer" (Bob joined, "Newer"
/// with the latest message) and "Invite" (Bob invited).
struct World {
    server: TestServer,
    alice: String,
    bob: String,
    older: String,
    newer: String,
    invite: String,
}

async fn world() -> World {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let mut rooms = Vec::new();
    for name in ["Older", "Newer"] {
        let room_id = server
            .create_room(&alice, json!({ "name": name, "preset": "public_chat" }))
            .await;
        let (status, _) = server
            .post(
                &format!("/_matrix/client/v3/rooms/{room_id}/join"),
                Some(&bob),
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        rooms.push(room_id);
    }
    send_text(&server, &alice, &rooms[0], "1", "in older").await;
    send_text(&server, &alice, &rooms[1], "2", "in newer").await;
    let invite = server
        .create_room(
            &alice,
            json!({ "name": "Invite", "invite": ["@bob:localhost"] }),
        )
        .await;
    World {
        server,
        alice,
        bob,
        older: rooms.remove(0),
        newer: rooms.remove(0),
        invite,
    }
}

fn list_body(ranges: Value) -> Value {
    json!({
        "conn_id": "room-list",
        "lists": { "all": {
            "ranges": ranges,
            "timeline_limit": 1,
            "required_state": [["m.room.name", ""], ["m.room.member", "$LAZY"], ["m.room.create", ""]],
        } },
        "extensions": {
            "to_device": { "enabled": true },
            "e2ee": { "enabled": true },
            "account_data": { "enabled": true },
            "receipts": { "enabled": true, "rooms": ["*"] },
            "typing": { "enabled": true },
        },
    })
}

#[tokio::test]
async fn a_first_request_lists_rooms_newest_first_with_what_was_asked() {
    let w = world().await;
    let answer = sliding(&w.server, &w.bob, None, list_body(json!([[0, 9]]))).await;
    assert_eq!(answer["lists"]["all"]["count"], 3, "{answer}");
    let rooms = answer["rooms"].as_object().unwrap();
    assert_eq!(rooms.len(), 3);

    let newer = &rooms[&w.newer];
    assert_eq!(newer["initial"], true);
    assert_eq!(newer["name"], "Newer");
    assert_eq!(newer["joined_count"], 2);
    assert_eq!(newer["invited_count"], 0);
    assert_eq!(newer["num_live"], 0);
    assert_eq!(newer["notification_count"], 1);
    let timeline = newer["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 1);
    assert_eq!(timeline[0]["content"]["body"], "in newer");
    assert_eq!(newer["limited"], true);
    assert!(newer["prev_batch"].is_string());
    let mut state: Vec<(String, String)> = newer["required_state"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["state_key"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    state.sort();
    assert_eq!(
        state,
        [
            ("m.room.create".to_owned(), String::new()),
            ("m.room.member".to_owned(), "@alice:localhost".to_owned()),
            ("m.room.name".to_owned(), String::new()),
        ],
        "$LAZY gives the timeline senders' members only"
    );
    // Sorted by the latest activity: the invite is newest, then "Newer".
    assert!(rooms[&w.invite]["bump_stamp"].as_u64() > newer["bump_stamp"].as_u64());
    assert!(newer["bump_stamp"].as_u64() > rooms[&w.older]["bump_stamp"].as_u64());

    let invite = &rooms[&w.invite];
    assert_eq!(invite["name"], "Invite");
    let stripped = invite["invite_state"].as_array().unwrap();
    assert!(stripped
        .iter()
        .any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "invite"));

    let extensions = &answer["extensions"];
    assert!(
        extensions["to_device"]["next_batch"].is_string(),
        "{extensions}"
    );
    assert!(extensions["e2ee"]["device_lists"]["changed"].is_array());

    // A window of one holds only the newest room.
    let first = sliding(&w.server, &w.bob, None, list_body(json!([[0, 0]]))).await;
    let rooms = first["rooms"].as_object().unwrap();
    assert_eq!(rooms.keys().collect::<Vec<_>>(), [&w.invite]);
    assert_eq!(first["lists"]["all"]["count"], 3);
}

#[tokio::test]
async fn later_requests_carry_only_what_is_new() {
    let w = world().await;
    let body = list_body(json!([[0, 9]]));
    let first = sliding(&w.server, &w.bob, None, body.clone()).await;
    let quiet = sliding(&w.server, &w.bob, Some(&pos(&first)), body.clone()).await;
    assert!(quiet["rooms"].as_object().unwrap().is_empty(), "{quiet}");

    send_text(&w.server, &w.alice, &w.older, "3", "fresh").await;
    let next = sliding(&w.server, &w.bob, Some(&pos(&quiet)), body.clone()).await;
    let rooms = next["rooms"].as_object().unwrap();
    assert_eq!(rooms.keys().collect::<Vec<_>>(), [&w.older], "{next}");
    let older = &rooms[&w.older];
    assert!(older.get("initial").is_none());
    assert_eq!(older["num_live"], 1);
    assert_eq!(older["timeline"][0]["content"]["body"], "fresh");
    assert_eq!(older["limited"], false);
    let state = older["required_state"].as_array().unwrap();
    assert!(
        state.iter().all(|e| e["type"] == "m.room.member"),
        "unchanged state is not sent again: {state:?}"
    );

    // Replaying the previous position is allowed (a lost answer).
    let replay = sliding(&w.server, &w.bob, Some(&pos(&quiet)), body.clone()).await;
    assert!(replay["rooms"].get(&w.older).is_some());

    // Joining the invited room moves it out of the invite state.
    let (status, _) = w
        .server
        .post(
            &format!("/_matrix/client/v3/rooms/{}/join", w.invite),
            Some(&w.bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let joined = sliding(&w.server, &w.bob, Some(&pos(&replay)), body).await;
    let invite = &joined["rooms"][&w.invite];
    assert!(invite.get("invite_state").is_none(), "{joined}");
    assert_eq!(invite["timeline"][0]["content"]["membership"], "join");
}

#[tokio::test]
async fn unknown_positions_are_refused() {
    let w = world().await;
    let path = format!("{PATH}?pos=12345");
    let bogus = w
        .server
        .post(&path, Some(&w.bob), list_body(json!([[0, 1]])))
        .await;
    assert_error(&bogus, StatusCode::BAD_REQUEST, "M_UNKNOWN_POS");

    // A position from another connection is unknown on this one.
    let first = sliding(&w.server, &w.bob, None, list_body(json!([[0, 1]]))).await;
    let mut other = list_body(json!([[0, 1]]));
    other["conn_id"] = json!("other");
    let path = format!("{PATH}?pos={}", pos(&first));
    let crossed = w.server.post(&path, Some(&w.bob), other).await;
    assert_error(&crossed, StatusCode::BAD_REQUEST, "M_UNKNOWN_POS");

    // And so is a position from before a restart.
    let config = common::test_config(&w.server.dir);
    let dir = w.server.stop().await;
    let server = TestServer::start_in(dir, config, None).await;
    let stale = server
        .post(&path, Some(&w.bob), list_body(json!([[0, 1]])))
        .await;
    assert_error(&stale, StatusCode::BAD_REQUEST, "M_UNKNOWN_POS");
    let (status, versions) = server.get("/_matrix/client/versions", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        versions["unstable_features"]["org.matrix.simplified_msc3575"],
        true
    );
}

#[tokio::test]
async fn subscriptions_filters_and_wildcards() {
    let w = world().await;
    // Mark "Older" as a direct chat with Alice.
    let (status, _) = w
        .server
        .put(
            "/_matrix/client/v3/user/@bob:localhost/account_data/m.direct",
            Some(&w.bob),
            json!({ "@alice:localhost": [w.older] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let body = json!({
        "lists": {
            "dms": { "ranges": [[0, 9]], "timeline_limit": 0, "filters": { "is_dm": true } },
            "invites": { "ranges": [[0, 9]], "timeline_limit": 0, "filters": { "is_invite": true } },
        },
        "room_subscriptions": {
            (w.newer.clone()): { "timeline_limit": 5, "required_state": [["*", "*"]] },
        },
    });
    let answer = sliding(&w.server, &w.bob, None, body).await;
    assert_eq!(answer["lists"]["dms"]["count"], 1, "{answer}");
    assert_eq!(answer["lists"]["invites"]["count"], 1);
    let rooms = answer["rooms"].as_object().unwrap();
    assert_eq!(rooms[&w.older]["is_dm"], true);
    let newer = &rooms[&w.newer];
    let state_types: Vec<&str> = newer["required_state"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for kind in [
        "m.room.create",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.name",
    ] {
        assert!(state_types.contains(&kind), "{kind}: {state_types:?}");
    }
    assert_eq!(newer["timeline"].as_array().unwrap().len(), 5);

    // `$ME`: only one's own member event.
    let body = json!({
        "room_subscriptions": {
            (w.newer.clone()): { "timeline_limit": 0, "required_state": [["m.room.member", "$ME"]] },
        },
    });
    let answer = sliding(&w.server, &w.bob, None, body).await;
    let state = answer["rooms"][&w.newer]["required_state"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(state.len(), 1);
    assert_eq!(state[0]["state_key"], "@bob:localhost");
}

#[tokio::test]
async fn a_waiting_request_wakes_for_messages_typing_receipts_and_account_data() {
    let w = world().await;
    let body = list_body(json!([[0, 9]]));
    let mut position = pos(&sliding(&w.server, &w.bob, None, body.clone()).await);
    let room = format!("/_matrix/client/v3/rooms/{}", w.newer);
    for kind in ["message", "typing", "receipt", "account data"] {
        let url = w
            .server
            .url(&format!("{PATH}?pos={position}&timeout=60000"));
        let (bob, request) = (w.bob.clone(), body.clone());
        let waiting = tokio::spawn(async move {
            let answer = reqwest::Client::new()
                .post(url)
                .bearer_auth(bob)
                .json(&request)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), StatusCode::OK);
            answer.json::<Value>().await.unwrap()
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let (status, _) = match kind {
            "message" => {
                send_text(&w.server, &w.alice, &w.newer, "live", "live").await;
                (StatusCode::OK, Value::Null)
            }
            "typing" => {
                let path = format!("{room}/typing/@alice:localhost");
                w.server
                    .put(
                        &path,
                        Some(&w.alice),
                        json!({ "typing": true, "timeout": 30000 }),
                    )
                    .await
            }
            "receipt" => {
                let (_, messages) = w
                    .server
                    .get(&format!("{room}/messages?dir=b&limit=1"), Some(&w.alice))
                    .await;
                let event_id = messages["chunk"][0]["event_id"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                w.server
                    .post(
                        &format!("{room}/receipt/m.read/{event_id}"),
                        Some(&w.alice),
                        json!({}),
                    )
                    .await
            }
            _ => {
                let path = "/_matrix/client/v3/user/@bob:localhost/account_data/org.example";
                w.server.put(path, Some(&w.bob), json!({ "x": 1 })).await
            }
        };
        assert_eq!(status, StatusCode::OK);
        let answer = woken(waiting).await;
        let extensions = &answer["extensions"];
        let woken_with_it = match kind {
            "message" => answer["rooms"][&w.newer]["timeline"][0]["content"]["body"] == "live",
            "typing" => {
                extensions["typing"]["rooms"][&w.newer]["content"]["user_ids"]
                    == json!(["@alice:localhost"])
            }
            "receipt" => extensions["receipts"]["rooms"][&w.newer]["type"] == "m.receipt",
            _ => extensions["account_data"]["global"][0]["type"] == "org.example",
        };
        assert!(woken_with_it, "{kind}: {answer}");
        position = pos(&answer);
    }
}

#[tokio::test]
async fn the_e2ee_extension_names_changed_device_lists() {
    let w = world().await;
    let body = list_body(json!([[0, 9]]));
    let first = sliding(&w.server, &w.bob, None, body.clone()).await;
    w.server.login("alice", Some("TABLET")).await;
    let next = sliding(&w.server, &w.bob, Some(&pos(&first)), body).await;
    assert_eq!(
        next["extensions"]["e2ee"]["device_lists"]["changed"],
        json!(["@alice:localhost"]),
        "{next}"
    );
}

#[tokio::test]
async fn an_unnamed_room_comes_with_heroes_and_its_avatar() {
    let w = world().await;
    let room_id = w
        .server
        .create_room(&w.alice, json!({ "preset": "public_chat" }))
        .await;
    let (status, _) = w
        .server
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.avatar"),
            Some(&w.alice),
            json!({ "url": "mxc://localhost/avatar" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = w
        .server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/join"),
            Some(&w.bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let body = json!({
        "room_subscriptions": { (room_id.clone()): { "timeline_limit": 1 } },
    });
    let answer = sliding(&w.server, &w.bob, None, body).await;
    let room = &answer["rooms"][&room_id];
    assert!(room.get("name").is_none(), "{room}");
    assert_eq!(room["avatar"], "mxc://localhost/avatar");
    assert_eq!(
        room["heroes"],
        json!([{ "user_id": "@alice:localhost", "displayname": "alice" }])
    );
    assert_eq!(room["joined_count"], 2);
}

#[tokio::test]
async fn the_to_device_extension_delivers_until_acknowledged() {
    let w = world().await;
    let body = |since: Option<&str>| {
        let mut extension = json!({ "enabled": true });
        if let Some(since) = since {
            extension["since"] = json!(since);
        }
        json!({ "conn_id": "e2ee", "extensions": { "to_device": extension, "e2ee": { "enabled": true } } })
    };
    let first = sliding(&w.server, &w.bob, None, body(None)).await;
    let (_, whoami) = w
        .server
        .get("/_matrix/client/v3/account/whoami", Some(&w.bob))
        .await;
    let device = whoami["device_id"].as_str().unwrap().to_owned();
    let message = json!({ "messages": { "@bob:localhost": { (device.clone()): { "n": 1 } } } });
    let (status, _) = w
        .server
        .put(
            "/_matrix/client/v3/sendToDevice/org.example/t1",
            Some(&w.alice),
            message,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let next = sliding(&w.server, &w.bob, Some(&pos(&first)), body(None)).await;
    let to_device = &next["extensions"]["to_device"];
    assert_eq!(to_device["events"][0]["content"]["n"], 1, "{next}");
    let since = to_device["next_batch"].as_str().unwrap().to_owned();
    // Not acknowledged yet: given again.
    let again = sliding(&w.server, &w.bob, Some(&pos(&next)), body(None)).await;
    assert_eq!(
        again["extensions"]["to_device"]["events"][0]["content"]["n"],
        1
    );
    // Acknowledged with `since`: gone.
    let after = sliding(&w.server, &w.bob, Some(&pos(&again)), body(Some(&since))).await;
    assert!(
        after["extensions"]["to_device"]
            .get("events")
            .is_none_or(|e| e.as_array().unwrap().is_empty()),
        "{after}"
    );
}
