//! Rooms over HTTP: creation, memberships, sending, state and history.

mod common;

use common::{assert_error, join, token, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn room_path(room_id: &str, suffix: &str) -> String {
    format!("/_matrix/client/v3/rooms/{room_id}{suffix}")
}

async fn send_text(
    server: &TestServer,
    token: &str,
    room_id: &str,
    txn: &str,
    body: &str,
) -> (StatusCode, Value) {
    let path = room_path(room_id, &format!("/send/m.room.message/{txn}"));
    server
        .put(
            &path,
            Some(token),
            json!({ "msgtype": "m.text", "body": body }),
        )
        .await
}

#[tokio::test]
async fn a_private_chat_is_created_joined_and_used() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(
            &alice,
            json!({
                "preset": "private_chat",
                "name": "Plans",
                "topic": "What we do next",
                "invite": ["@bob:localhost"],
            }),
        )
        .await;
    assert!(room_id.starts_with('!'));

    let (_, joined) = server
        .get("/_matrix/client/v3/joined_rooms", Some(&alice))
        .await;
    assert_eq!(joined["joined_rooms"], json!([room_id]));
    for empty_key in ["/state/m.room.name", "/state/m.room.name/"] {
        let (_, name) = server
            .get(&room_path(&room_id, empty_key), Some(&alice))
            .await;
        assert_eq!(name, json!({ "name": "Plans" }));
    }
    let (_, create) = server
        .get(
            &room_path(&room_id, "/state/m.room.create/?format=event"),
            Some(&alice),
        )
        .await;
    assert_eq!(create["content"]["room_version"], "12");
    assert_eq!(create["sender"], "@alice:localhost");

    // Bob is invited, so he may not read yet; after joining he may.
    let early = server.get(&room_path(&room_id, "/state"), Some(&bob)).await;
    assert_error(&early, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, answer) = server
        .post(&room_path(&room_id, "/join"), Some(&bob), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, members) = server
        .get(&room_path(&room_id, "/joined_members"), Some(&bob))
        .await;
    let joined = members["joined"].as_object().unwrap();
    assert_eq!(joined.len(), 2);
    assert_eq!(joined["@bob:localhost"]["display_name"], "bob");

    // Sending is idempotent per device and transaction ID.
    let (status, first) = send_text(&server, &alice, &room_id, "t1", "hello").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (_, again) = send_text(&server, &alice, &room_id, "t1", "hello").await;
    assert_eq!(first["event_id"], again["event_id"]);
    let (_, page) = server
        .get(
            &room_path(&room_id, "/messages?dir=b&limit=5"),
            Some(&alice),
        )
        .await;
    let chunk = page["chunk"].as_array().unwrap();
    assert_eq!(chunk[0]["event_id"], first["event_id"]);
    assert_eq!(chunk[0]["content"]["body"], "hello");
    assert_eq!(chunk[0]["unsigned"]["transaction_id"], "t1");
    assert_ne!(
        chunk[1]["content"]["body"], "hello",
        "the retry stored nothing"
    );
    let (_, seen_by_bob) = server
        .get(&room_path(&room_id, "/messages?dir=b&limit=1"), Some(&bob))
        .await;
    assert_eq!(seen_by_bob["chunk"][0]["event_id"], first["event_id"]);
    assert!(seen_by_bob["chunk"][0]["unsigned"]
        .get("transaction_id")
        .is_none());

    // Bob (power 0) may not rename the room (power 50 needed).
    let rename = server
        .put(
            &room_path(&room_id, "/state/m.room.name"),
            Some(&bob),
            json!({ "name": "Mine" }),
        )
        .await;
    assert_error(&rename, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (_, name) = server
        .get(&room_path(&room_id, "/state/m.room.name"), Some(&bob))
        .await;
    assert_eq!(name, json!({ "name": "Plans" }));
}

#[tokio::test]
async fn every_supported_room_version_works() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    for version in ["10", "11", "12"] {
        let room_id = server
            .create_room(&alice, json!({ "room_version": version }))
            .await;
        let (status, sent) = send_text(&server, &alice, &room_id, "x", version).await;
        assert_eq!(status, StatusCode::OK, "{version}: {sent}");
        let (_, create) = server
            .get(
                &room_path(&room_id, "/state/m.room.create/?format=event"),
                Some(&alice),
            )
            .await;
        assert_eq!(create["content"]["room_version"], version);
        // Version 12 rooms are named after their create event.
        if version == "12" {
            assert_eq!(&room_id[1..], &create["event_id"].as_str().unwrap()[1..]);
        } else {
            assert!(room_id.ends_with(":localhost"), "{room_id}");
        }
    }
    let unsupported = server
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            json!({ "room_version": "9" }),
        )
        .await;
    assert_error(
        &unsupported,
        StatusCode::BAD_REQUEST,
        "M_UNSUPPORTED_ROOM_VERSION",
    );
}

#[tokio::test]
async fn two_hundred_messages_paginate_back_in_order() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let room_id = server.create_room(&alice, json!({})).await;
    for i in 0..200 {
        let (status, _) =
            send_text(&server, &alice, &room_id, &format!("m{i}"), &format!("{i}")).await;
        assert_eq!(status, StatusCode::OK);
    }
    let mut bodies = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let mut path = room_path(&room_id, "/messages?dir=b&limit=30");
        if let Some(from) = &from {
            path.push_str(&format!("&from={from}"));
        }
        let (status, page) = server.get(&path, Some(&alice)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        for event in page["chunk"].as_array().unwrap() {
            if event["type"] == "m.room.message" {
                bodies.push(
                    event["content"]["body"]
                        .as_str()
                        .unwrap()
                        .parse::<u32>()
                        .unwrap(),
                );
            }
        }
        match page.get("end") {
            Some(end) => from = Some(end.as_str().unwrap().to_owned()),
            None => break,
        }
    }
    let expected: Vec<u32> = (0..200).rev().collect();
    assert_eq!(bodies, expected);

    // And forward from the start.
    let (_, page) = server
        .get(
            &room_path(&room_id, "/messages?dir=f&limit=1000"),
            Some(&alice),
        )
        .await;
    let forward: Vec<&str> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(forward.len(), 200);
    assert_eq!(forward[0], "0");
    assert_eq!(forward[199], "199");
}

#[tokio::test]
async fn the_member_cap_refuses_the_member_past_it() {
    let server = TestServer::start_with(|config| config.max_room_members = 3).await;
    let alice = token(&server.register("alice").await);
    for name in ["b1", "b2", "b3"] {
        server.register(name).await;
    }
    let too_many = server
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            json!({ "invite": ["@b1:localhost", "@b2:localhost", "@b3:localhost"] }),
        )
        .await;
    assert_error(&too_many, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert!(too_many.1["error"].as_str().unwrap().contains("full"));
    let (_, joined) = server
        .get("/_matrix/client/v3/joined_rooms", Some(&alice))
        .await;
    assert_eq!(joined["joined_rooms"], json!([]), "nothing was written");

    let room_id = server
        .create_room(&alice, json!({ "invite": ["@b1:localhost"] }))
        .await;
    let (status, _) = server
        .post(
            &room_path(&room_id, "/invite"),
            Some(&alice),
            json!({ "user_id": "@b2:localhost" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let full = server
        .post(
            &room_path(&room_id, "/invite"),
            Some(&alice),
            json!({ "user_id": "@b3:localhost" }),
        )
        .await;
    assert_error(&full, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let error = full.1["error"].as_str().unwrap();
    assert!(error.contains("full") && error.contains('3'), "{error}");
}

#[tokio::test]
async fn memberships_move_only_as_the_rules_allow() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let join = |token: String| {
        let path = room_path(&room_id, "/join");
        let server = &server;
        async move { server.post(&path, Some(&token), json!({})).await }
    };
    assert_eq!(join(bob.clone()).await.0, StatusCode::OK);
    // Bob may not kick Alice.
    let kick = server
        .post(
            &room_path(&room_id, "/kick"),
            Some(&bob),
            json!({ "user_id": "@alice:localhost" }),
        )
        .await;
    assert_error(&kick, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // Alice bans Bob; he cannot come back until unbanned.
    let (status, _) = server
        .post(
            &room_path(&room_id, "/ban"),
            Some(&alice),
            json!({ "user_id": "@bob:localhost", "reason": "spam" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_error(
        &join(bob.clone()).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    let (status, _) = server
        .post(
            &room_path(&room_id, "/unban"),
            Some(&alice),
            json!({ "user_id": "@bob:localhost" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(join(bob.clone()).await.0, StatusCode::OK);
    // Kicked, then back (the room is public); then he leaves.
    let (status, _) = server
        .post(
            &room_path(&room_id, "/kick"),
            Some(&alice),
            json!({ "user_id": "@bob:localhost" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(join(bob.clone()).await.0, StatusCode::OK);
    let (status, _) = server
        .post(&room_path(&room_id, "/leave"), Some(&bob), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, joined) = server
        .get("/_matrix/client/v3/joined_rooms", Some(&bob))
        .await;
    assert_eq!(joined["joined_rooms"], json!([]));
    let (_, members) = server
        .get(
            &room_path(&room_id, "/members?membership=leave"),
            Some(&alice),
        )
        .await;
    assert_eq!(members["chunk"].as_array().unwrap().len(), 1);

    // A private room cannot be joined uninvited.
    let private = server
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    let refused = server
        .post(&room_path(&private, "/join"), Some(&bob), json!({}))
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn redaction_strips_content() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    for version in ["10", "11", "12"] {
        let room_id = server
            .create_room(&alice, json!({ "room_version": version }))
            .await;
        let (_, sent) = send_text(&server, &alice, &room_id, "a", "secret").await;
        let event_id = sent["event_id"].as_str().unwrap();
        let path = room_path(&room_id, &format!("/redact/{event_id}/r1"));
        let (status, redaction) = server
            .put(&path, Some(&alice), json!({ "reason": "oops" }))
            .await;
        assert_eq!(status, StatusCode::OK, "{redaction}");
        let (_, event) = server
            .get(
                &room_path(&room_id, &format!("/event/{event_id}")),
                Some(&alice),
            )
            .await;
        assert_eq!(event["content"], json!({}), "{version}: {event}");
        assert_eq!(
            event["unsigned"]["redacted_because"]["event_id"],
            redaction["event_id"]
        );

        // A state event, read (and so remembered) before its redaction,
        // reads redacted after it.
        let topic_path = room_path(&room_id, "/state/m.room.topic");
        let (status, topic) = server
            .put(&topic_path, Some(&alice), json!({ "topic": "private" }))
            .await;
        assert_eq!(status, StatusCode::OK, "{topic}");
        let (_, before) = server.get(&topic_path, Some(&alice)).await;
        assert_eq!(before["topic"], "private", "{version}: {before}");
        let topic_id = topic["event_id"].as_str().unwrap();
        let path = room_path(&room_id, &format!("/redact/{topic_id}/r2"));
        let (status, redaction) = server.put(&path, Some(&alice), json!({})).await;
        assert_eq!(status, StatusCode::OK, "{redaction}");
        let (status, after) = server.get(&topic_path, Some(&alice)).await;
        assert_eq!(status, StatusCode::OK, "{after}");
        assert_eq!(after, json!({}), "{version}: {after}");
    }
}

#[tokio::test]
async fn bad_room_requests_change_nothing() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let unknown = send_text(&server, &alice, "!nowhere:localhost", "t", "x").await;
    assert_error(&unknown, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let invalid = send_text(&server, &alice, "not-a-room", "t", "x").await;
    assert_error(&invalid, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let room_id = server.create_room(&alice, json!({})).await;
    let big = json!({ "msgtype": "m.text", "body": "x".repeat(70_000) });
    let too_large = server
        .put(
            &room_path(&room_id, "/send/m.room.message/big"),
            Some(&alice),
            big,
        )
        .await;
    assert_error(&too_large, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    let float = server
        .put(
            &room_path(&room_id, "/send/m.room.message/f"),
            Some(&alice),
            json!({ "n": 1.5 }),
        )
        .await;
    assert_error(&float, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let missing = server
        .get(&room_path(&room_id, "/event/$nothing"), Some(&alice))
        .await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (_, page) = server
        .get(
            &room_path(&room_id, "/messages?dir=b&limit=1"),
            Some(&alice),
        )
        .await;
    assert_ne!(
        page["chunk"][0]["type"], "m.room.message",
        "nothing was stored"
    );
}

#[tokio::test]
async fn knocking_and_forgetting() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let knockable = server.create_room(&alice,
        json!({ "initial_state": [{ "type": "m.room.join_rules", "content": { "join_rule": "knock" } }] }),
    )
    .await;
    let (status, answer) = server
        .post(
            &format!("/_matrix/client/v3/knock/{knockable}"),
            Some(&bob),
            json!({ "reason": "hi" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["room_id"], knockable.as_str());
    let (_, knocks) = server
        .get(
            &room_path(&knockable, "/members?membership=knock"),
            Some(&alice),
        )
        .await;
    assert_eq!(knocks["chunk"][0]["state_key"], "@bob:localhost");
    let invite_only = server.create_room(&alice, json!({})).await;
    let refused = server
        .post(
            &format!("/_matrix/client/v3/knock/{invite_only}"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    let still_in = server
        .post(&room_path(&invite_only, "/forget"), Some(&alice), json!({}))
        .await;
    assert_error(&still_in, StatusCode::BAD_REQUEST, "M_UNKNOWN");
    let (status, _) = server
        .post(&room_path(&invite_only, "/leave"), Some(&alice), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .post(&room_path(&invite_only, "/forget"), Some(&alice), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn profile_changes_and_deactivation_reach_the_rooms() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let (status, _) = server
        .post(&room_path(&room_id, "/join"), Some(&bob), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .put(
            "/_matrix/client/v3/profile/@bob:localhost/displayname",
            Some(&bob),
            json!({ "displayname": "Robert" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, member) = server
        .get(
            &room_path(&room_id, "/state/m.room.member/@bob:localhost?format=event"),
            Some(&alice),
        )
        .await;
    assert_eq!(member["content"]["displayname"], "Robert");
    let (_, page) = server
        .get(
            &room_path(&room_id, "/messages?dir=b&limit=1"),
            Some(&alice),
        )
        .await;
    let latest = &page["chunk"][0];
    assert_eq!(latest["content"]["displayname"], "Robert");
    assert_eq!(latest["unsigned"]["prev_content"]["displayname"], "bob");
    assert!(latest["unsigned"]["replaces_state"].is_string());
    assert!(latest["unsigned"]["age"].is_u64());
    let (_, members) = server
        .get(
            &room_path(&room_id, "/members?membership=join"),
            Some(&alice),
        )
        .await;
    let bob_member = members["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["state_key"] == "@bob:localhost")
        .unwrap();
    assert_eq!(bob_member["unsigned"]["prev_content"]["displayname"], "bob");

    // Membership through the state API obeys the same rules.
    let (status, _) = server
        .put(
            &room_path(&room_id, "/state/m.room.member/@bob:localhost"),
            Some(&alice),
            json!({ "membership": "ban" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .put(
            &room_path(&room_id, "/state/m.room.member/@bob:localhost"),
            Some(&alice),
            json!({ "membership": "leave" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        server
            .post(&room_path(&room_id, "/join"), Some(&bob), json!({}))
            .await
            .0,
        StatusCode::OK
    );

    // A deactivated account leaves its rooms.
    let (_, challenge) = server
        .post(
            "/_matrix/client/v3/account/deactivate",
            Some(&bob),
            json!({}),
        )
        .await;
    let auth = json!({ "auth": {
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": "bob" },
        "password": common::PASSWORD,
        "session": challenge["session"],
    }});
    let (status, answer) = server
        .post("/_matrix/client/v3/account/deactivate", Some(&bob), auth)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, members) = server
        .get(&room_path(&room_id, "/joined_members"), Some(&alice))
        .await;
    assert_eq!(members["joined"].as_object().unwrap().len(), 1);
}

#[tokio::test]
async fn rooms_created_in_one_millisecond_get_their_own_ids() {
    // A stopped clock: every create event would have the same timestamp.
    let clock = std::sync::Arc::new(myelin::services::clock::ManualClock::new(1_700_000_000_000));
    let dir = tempfile::tempdir().unwrap();
    let config = common::test_config(&dir);
    let server = TestServer::start_in(dir, config, Some(clock)).await;
    let alice = common::token(&server.register("alice").await);
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..5 {
        ids.insert(server.create_room(&alice, serde_json::json!({})).await);
    }
    assert_eq!(ids.len(), 5, "{ids:?}");
    let (_, sync) = server.get("/_matrix/client/v3/sync", Some(&alice)).await;
    assert_eq!(sync["rooms"]["join"].as_object().unwrap().len(), 5);
}

#[tokio::test]
async fn events_rooms_and_users_are_reported_to_the_admins() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let (status, sent) = send_text(&server, &alice, &room_id, "r1", "rude words").await;
    assert_eq!(status, StatusCode::OK);
    let event_id = sent["event_id"].as_str().unwrap().to_owned();
    let report = |path: String, token: String, body: Value| {
        let server = &server;
        async move { server.post(&path, Some(&token), body).await }
    };
    let event_path = format!("/_matrix/client/v3/rooms/{room_id}/report/{event_id}");

    // Bob is not in the room: as if the event did not exist.
    let answer = report(event_path.clone(), bob.clone(), json!({ "reason": "rude" })).await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    join(&server, &bob, &room_id).await;
    let answer = report(event_path.clone(), bob.clone(), json!({ "reason": "rude" })).await;
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
    let unknown = format!("/_matrix/client/v3/rooms/{room_id}/report/$nothing");
    let answer = report(unknown, bob.clone(), json!({})).await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    let room_path = format!("/_matrix/client/v3/rooms/{room_id}/report");
    let answer = report(room_path, bob.clone(), json!({ "reason": "" })).await;
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
    let answer = report(
        "/_matrix/client/v3/rooms/!nowhere:localhost/report".to_owned(),
        bob.clone(),
        json!({ "reason": "" }),
    )
    .await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let answer = report(
        "/_matrix/client/v3/users/@alice:localhost/report".to_owned(),
        bob.clone(),
        json!({ "reason": "rude" }),
    )
    .await;
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
    let answer = report(
        "/_matrix/client/v3/users/@nobody:localhost/report".to_owned(),
        bob.clone(),
        json!({ "reason": "rude" }),
    )
    .await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let answer = report(
        "/_matrix/client/v3/users/@alice:localhost/report".to_owned(),
        bob.clone(),
        json!({ "reason": 5 }),
    )
    .await;
    assert_eq!(answer.0, StatusCode::BAD_REQUEST, "{}", answer.1);

    // Kept for the admins, oldest first.
    let kept = server.services().reports.list(0, 10).unwrap();
    let kinds: Vec<&str> = kept.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["event", "room", "user"]);
    assert_eq!(kept[0]["event_id"], event_id.as_str());
    assert_eq!(kept[0]["reporter"], "@bob:localhost");
    assert_eq!(kept[2]["user_id"], "@alice:localhost");
}

#[tokio::test]
async fn the_legacy_event_stream_room_initial_sync_and_third_party_lookups() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "name": "Old school" }),
        )
        .await;
    let (status, _) = send_text(&server, &alice, &room_id, "e1", "first").await;
    assert_eq!(status, StatusCode::OK);

    // The stream from now on: nothing yet, then what is sent while waiting.
    let (status, now) = server
        .get("/_matrix/client/v3/events?timeout=0", Some(&alice))
        .await;
    assert_eq!(status, StatusCode::OK, "{now}");
    assert_eq!(now["chunk"], json!([]));
    let end = now["end"].as_str().unwrap().to_owned();
    let waiting = {
        let url = server.url(&format!(
            "/_matrix/client/v3/events?from={end}&timeout=10000"
        ));
        let request = server.http.get(url).bearer_auth(&alice);
        tokio::spawn(async move { request.send().await.unwrap().json::<Value>().await.unwrap() })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (status, _) = send_text(&server, &alice, &room_id, "e2", "second").await;
    assert_eq!(status, StatusCode::OK);
    let woken = waiting.await.unwrap();
    let bodies: Vec<&str> = woken["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, ["second"], "{woken}");
    let answer = server
        .get("/_matrix/client/v3/events?from=nonsense", Some(&alice))
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // A room's initial sync.
    let (status, initial) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/initialSync"),
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{initial}");
    assert_eq!(initial["room_id"], room_id.as_str());
    assert_eq!(initial["membership"], "join");
    assert_eq!(initial["visibility"], "private");
    let bodies: Vec<&str> = initial["messages"]["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, ["first", "second"]);
    assert!(initial["state"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Old school"));
    // Bob was never in this (not world-readable) room.
    let answer = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/initialSync"),
            Some(&bob),
        )
        .await;
    assert_eq!(answer.0, StatusCode::FORBIDDEN, "{}", answer.1);

    // No bridge, no protocol.
    let (status, protocols) = server
        .get("/_matrix/client/v3/thirdparty/protocols", Some(&alice))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(protocols, json!({}));
    let answer = server
        .get("/_matrix/client/v3/thirdparty/protocol/irc", Some(&alice))
        .await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (status, found) = server
        .get(
            "/_matrix/client/v3/thirdparty/location?alias=%23irc:localhost",
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(found, json!([]));
}

/// `POST /search` for room events with `request` (the search term and
/// the rest); the `room_events` answer.
async fn search(server: &TestServer, token: &str, request: Value, next: Option<&str>) -> Value {
    let path = match next {
        Some(next) => format!("/_matrix/client/v3/search?next_batch={next}"),
        None => "/_matrix/client/v3/search".to_owned(),
    };
    let (status, answer) = server
        .post(
            &path,
            Some(token),
            json!({ "search_categories": { "room_events": request } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["search_categories"]["room_events"].clone()
}

/// The bodies (or names) of the results, in order.
fn found(answer: &Value) -> Vec<String> {
    answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let content = &r["result"]["content"];
            content["body"]
                .as_str()
                .or(content["name"].as_str())
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn search_finds_what_the_user_may_read_and_survives_losing_its_index() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let carol = token(&server.register("carol").await);
    let room = server
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "name": "Fox den" }),
        )
        .await;
    join(&server, &bob, &room).await;
    let mut sent = Vec::new();
    for (i, body) in ["the quick brown fox", "a lazy dog", "quick thinking"]
        .iter()
        .enumerate()
    {
        let (status, answer) = send_text(&server, &alice, &room, &format!("q{i}"), body).await;
        assert_eq!(status, StatusCode::OK);
        sent.push(answer["event_id"].as_str().unwrap().to_owned());
    }

    // Found at once, best first or newest first, with highlights.
    let answer = search(&server, &bob, json!({ "search_term": "QUICK" }), None).await;
    assert_eq!(answer["count"], 2, "{answer}");
    assert_eq!(answer["highlights"], json!(["quick"]));
    let mut bodies = found(&answer);
    bodies.sort();
    assert_eq!(bodies, ["quick thinking", "the quick brown fox"]);
    let answer = search(
        &server,
        &bob,
        json!({ "search_term": "quick", "order_by": "recent" }),
        None,
    )
    .await;
    assert_eq!(found(&answer), ["quick thinking", "the quick brown fox"]);
    let answer = search(
        &server,
        &bob,
        json!({ "search_term": "fox", "keys": ["content.name"] }),
        None,
    )
    .await;
    assert_eq!(found(&answer), ["Fox den"]);

    // Pages, context, groups and state.
    let request = json!({ "search_term": "quick", "order_by": "recent", "filter": { "limit": 1 } });
    let first = search(&server, &bob, request.clone(), None).await;
    assert_eq!(found(&first), ["quick thinking"]);
    let next = first["next_batch"].as_str().unwrap().to_owned();
    let second = search(&server, &bob, request, Some(&next)).await;
    assert_eq!(found(&second), ["the quick brown fox"]);
    assert!(second.get("next_batch").is_none(), "{second}");
    let answer = search(
        &server,
        &bob,
        json!({
            "search_term": "lazy",
            "event_context": { "before_limit": 1, "after_limit": 1, "include_profile": true },
            "groupings": { "group_by": [{ "key": "room_id" }] },
            "include_state": true,
        }),
        None,
    )
    .await;
    let context = &answer["results"][0]["context"];
    assert_eq!(
        context["events_before"][0]["event_id"],
        sent[0].as_str(),
        "{answer}"
    );
    assert_eq!(context["events_after"][0]["event_id"], sent[2].as_str());
    assert!(context["profile_info"]["@alice:localhost"].is_object());
    assert_eq!(
        answer["groups"]["room_id"][&room]["results"],
        json!([sent[1]])
    );
    assert!(answer["state"][&room]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "m.room.create"));

    // History visibility: Carol sees only what was sent while she was in.
    let hidden = server
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "initial_state": [{
                "type": "m.room.history_visibility", "state_key": "",
                "content": { "history_visibility": "joined" },
            }] }),
        )
        .await;
    send_text(&server, &alice, &hidden, "h1", "secret early").await;
    join(&server, &carol, &hidden).await;
    send_text(&server, &alice, &hidden, "h2", "secret middle").await;
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{hidden}/leave"),
            Some(&carol),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    send_text(&server, &alice, &hidden, "h3", "secret late").await;
    let answer = search(&server, &carol, json!({ "search_term": "secret" }), None).await;
    assert_eq!(found(&answer), ["secret middle"], "{answer}");
    let answer = search(&server, &bob, json!({ "search_term": "secret" }), None).await;
    assert!(found(&answer).is_empty(), "{answer}");

    // A redacted message is no longer found.
    let (status, _) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/redact/{}/r1", sent[1]),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let answer = search(&server, &bob, json!({ "search_term": "lazy" }), None).await;
    assert!(found(&answer).is_empty(), "{answer}");
    // Gone from the index itself, not only hidden when the hit is read.
    assert_eq!(answer["count"], 0, "{answer}");

    // Bad requests.
    let (status, _) = server
        .post(
            "/_matrix/client/v3/search",
            Some(&bob),
            json!({ "search_categories": { "room_events": { "keys": ["content.body"] } } }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let answer = server
        .post(
            "/_matrix/client/v3/search",
            Some(&bob),
            json!({ "search_categories": { "room_events": { "search_term": "x", "order_by": "loudest" } } }),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // The index deleted while the server is down is made again.
    let dir = server.stop().await;
    std::fs::remove_dir_all(dir.path().join("search")).unwrap();
    let config = common::test_config(&dir);
    let server = TestServer::start_in(dir, config, None).await;
    let bob = token(&server.login("bob", None).await);
    let answer = search(&server, &bob, json!({ "search_term": "quick" }), None).await;
    assert_eq!(answer["count"], 2, "{answer}");
}
