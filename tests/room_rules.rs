//! Rules that cut across endpoints: restricted joins, the member cap from
//! any path, redaction rights, thread roots, size limits.

mod common;

use common::{assert_error, token, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn send(
    server: &TestServer,
    token: &str,
    room: &str,
    txn: &str,
    content: Value,
) -> (StatusCode, Value) {
    let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
    server.put(&path, Some(token), content).await
}

#[tokio::test]
async fn restricted_rooms_admit_members_of_the_allowed_room_only() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let carol = token(&server.register("carol").await);
    let space = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let restricted = server
        .create_room(
            &alice,
            json!({ "initial_state": [{ "type": "m.room.join_rules", "content": {
                "join_rule": "restricted",
                "allow": [{ "type": "m.room_membership", "room_id": space }],
            }}]}),
        )
        .await;
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{space}/join"),
            Some(&bob),
            json!({}),
        )
        .await;
    let (status, answer) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{restricted}/join"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, member) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{restricted}/state/m.room.member/@bob:localhost"),
            Some(&bob),
        )
        .await;
    assert_eq!(
        member["join_authorised_via_users_server"],
        "@alice:localhost"
    );

    let refused = server
        .post(
            &format!("/_matrix/client/v3/rooms/{restricted}/join"),
            Some(&carol),
            json!({}),
        )
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // Naming a voucher oneself does not work either.
    let forged = server
        .put(
            &format!("/_matrix/client/v3/rooms/{restricted}/state/m.room.member/@carol:localhost"),
            Some(&carol),
            json!({ "membership": "join", "join_authorised_via_users_server": "@alice:localhost" }),
        )
        .await;
    assert_error(&forged, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn the_member_cap_holds_for_initial_state_and_the_state_api() {
    let server = TestServer::start_with(|config| config.max_room_members = 2).await;
    let alice = token(&server.register("alice").await);
    for name in ["b", "c"] {
        server.register(name).await;
    }
    let invites = json!({ "initial_state": [
        { "type": "m.room.member", "state_key": "@b:localhost", "content": { "membership": "invite" } },
        { "type": "m.room.member", "state_key": "@c:localhost", "content": { "membership": "invite" } },
    ]});
    let refused = server
        .post("/_matrix/client/v3/createRoom", Some(&alice), invites)
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let room = server
        .create_room(&alice, json!({ "invite": ["@b:localhost"] }))
        .await;
    let full = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.member/@c:localhost"),
            Some(&alice),
            json!({ "membership": "invite" }),
        )
        .await;
    assert_error(&full, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert!(full.1["error"].as_str().unwrap().contains("full"));
}

#[tokio::test]
async fn only_the_sender_or_a_moderator_may_redact() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/join"),
            Some(&bob),
            json!({}),
        )
        .await;
    let (_, by_alice) = send(&server, &alice, &room, "a", json!({ "body": "alice's" })).await;
    let (_, by_bob) = send(&server, &bob, &room, "b", json!({ "body": "bob's" })).await;
    let redact = |token: String, event: &Value, txn: &str| {
        let path = format!(
            "/_matrix/client/v3/rooms/{room}/redact/{}/{txn}",
            event["event_id"].as_str().unwrap()
        );
        let server = &server;
        async move { server.put(&path, Some(&token), json!({})).await }
    };
    let refused = redact(bob.clone(), &by_alice, "r1").await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_eq!(redact(bob.clone(), &by_bob, "r2").await.0, StatusCode::OK);
    assert_eq!(redact(alice.clone(), &by_bob, "r3").await.0, StatusCode::OK);
    let (_, kept) = server
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{room}/event/{}",
                by_alice["event_id"].as_str().unwrap()
            ),
            Some(&alice),
        )
        .await;
    assert_eq!(kept["content"]["body"], "alice's");
    let (_, gone) = server
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{room}/event/{}",
                by_bob["event_id"].as_str().unwrap()
            ),
            Some(&alice),
        )
        .await;
    assert_eq!(gone["content"], json!({}));
    assert_eq!(
        gone["unsigned"]["redacted_because"]["type"],
        "m.room.redaction"
    );
}

#[tokio::test]
async fn threads_need_a_root_in_the_room_and_forget_redacted_replies() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let room = server.create_room(&alice, json!({})).await;
    let other = server.create_room(&alice, json!({})).await;
    let (_, root) = send(&server, &alice, &room, "root", json!({ "body": "root" })).await;
    let (_, elsewhere) = send(&server, &alice, &other, "e", json!({ "body": "elsewhere" })).await;
    let reply = |root: &Value| json!({ "body": "re", "m.relates_to": { "rel_type": "m.thread", "event_id": root["event_id"] } });
    let foreign = send(&server, &alice, &room, "t0", reply(&elsewhere)).await;
    assert_error(&foreign, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let (_, first) = send(&server, &alice, &room, "t1", reply(&root)).await;
    let nested = send(&server, &alice, &room, "t2", reply(&first)).await;
    assert_error(&nested, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let (_, second) = send(&server, &alice, &room, "t3", reply(&root)).await;

    let root_path = format!(
        "/_matrix/client/v3/rooms/{room}/event/{}",
        root["event_id"].as_str().unwrap()
    );
    let (_, before) = server.get(&root_path, Some(&alice)).await;
    assert_eq!(before["unsigned"]["m.relations"]["m.thread"]["count"], 2);
    let path = format!(
        "/_matrix/client/v3/rooms/{room}/redact/{}/x",
        second["event_id"].as_str().unwrap()
    );
    assert_eq!(
        server.put(&path, Some(&alice), json!({})).await.0,
        StatusCode::OK
    );
    let (_, after) = server.get(&root_path, Some(&alice)).await;
    let thread = &after["unsigned"]["m.relations"]["m.thread"];
    assert_eq!(thread["count"], 1);
    assert_eq!(thread["latest_event"]["event_id"], first["event_id"]);
}

#[tokio::test]
async fn types_and_state_keys_have_a_size_limit() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let room = server.create_room(&alice, json!({})).await;
    let long_type = "t".repeat(256);
    let answer = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/{long_type}/x"),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let long_key = "k".repeat(256);
    let answer = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/state/org.example/{long_key}"),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let (status, _) = server
        .put(
            &format!(
                "/_matrix/client/v3/rooms/{room}/state/org.example/{}",
                "k".repeat(255)
            ),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn invalid_initial_state_and_aliases_are_refused() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    // Room version 12 forbids listing a creator in the power levels.
    let body = json!({ "power_level_content_override": { "users": { "@alice:localhost": 100 } } });
    let invalid = server
        .post("/_matrix/client/v3/createRoom", Some(&alice), body)
        .await;
    assert_error(&invalid, StatusCode::BAD_REQUEST, "M_INVALID_ROOM_STATE");
    let (_, joined) = server
        .get("/_matrix/client/v3/joined_rooms", Some(&alice))
        .await;
    assert_eq!(joined["joined_rooms"], json!([]));

    let room = server
        .create_room(&alice, json!({ "room_alias_name": "mine" }))
        .await;
    server
        .create_room(&alice, json!({ "room_alias_name": "theirs" }))
        .await;
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias");
    let wrong = server
        .put(&path, Some(&alice), json!({ "alias": "#theirs:localhost" }))
        .await;
    assert_error(&wrong, StatusCode::BAD_REQUEST, "M_BAD_ALIAS");
    let missing = server
        .put(
            &path,
            Some(&alice),
            json!({ "alias": "#mine:localhost", "alt_aliases": ["#nope:localhost"] }),
        )
        .await;
    assert_error(&missing, StatusCode::BAD_REQUEST, "M_BAD_ALIAS");
    let (status, _) = server
        .put(
            &path,
            Some(&alice),
            json!({ "alias": "#mine:localhost", "alt_aliases": ["#far:elsewhere.org"] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn relations_stop_at_the_to_token() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let room = server.create_room(&alice, json!({})).await;
    let (_, root) = send(&server, &alice, &room, "root", json!({ "body": "root" })).await;
    let root_id = root["event_id"].as_str().unwrap();
    let mut replies = Vec::new();
    for i in 0..4 {
        let content = json!({ "body": i.to_string(), "m.relates_to": { "rel_type": "m.thread", "event_id": root_id } });
        let (_, reply) = send(&server, &alice, &room, &format!("r{i}"), content).await;
        replies.push(reply["event_id"].as_str().unwrap().to_owned());
    }
    let base = format!("/_matrix/client/v1/rooms/{room}/relations/{root_id}");
    let (_, first_two) = server
        .get(&format!("{base}?dir=f&limit=2"), Some(&alice))
        .await;
    let token_after_two = first_two["next_batch"].as_str().unwrap().to_owned();
    let (_, bounded) = server
        .get(&format!("{base}?dir=b&to={token_after_two}"), Some(&alice))
        .await;
    let ids: Vec<&str> = bounded["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [replies[3].as_str(), replies[2].as_str()]);
}

#[tokio::test]
async fn create_room_checks_the_canonical_alias_of_its_initial_state() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    server
        .create_room(&alice, json!({ "room_alias_name": "taken" }))
        .await;
    let canonical = |alias: &str| json!({ "initial_state": [{ "type": "m.room.canonical_alias", "content": { "alias": alias } }] });
    let elsewhere = server
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            canonical("#taken:localhost"),
        )
        .await;
    assert_error(&elsewhere, StatusCode::BAD_REQUEST, "M_BAD_ALIAS");
    let missing = server
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            canonical("#nowhere:localhost"),
        )
        .await;
    assert_error(&missing, StatusCode::BAD_REQUEST, "M_BAD_ALIAS");
    let mut own = canonical("#fresh:localhost");
    own["room_alias_name"] = json!("fresh");
    let (status, answer) = server
        .post("/_matrix/client/v3/createRoom", Some(&alice), own)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let room = answer["room_id"].as_str().unwrap();
    let path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.canonical_alias");
    let (status, _) = server
        .put(&path, Some(&alice), json!({ "alias": null }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let bad = server
        .put(
            &path,
            Some(&alice),
            json!({ "alt_aliases": "#fresh:localhost" }),
        )
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_BAD_JSON");
}

/// Each send is checked against the room's current power levels, also
/// right after they change (the server remembers current state entries
/// only while that state is not written).
#[tokio::test]
async fn a_send_is_checked_against_the_power_levels_of_the_moment() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    common::join(&server, &bob, &room).await;
    let body = json!({ "msgtype": "m.text", "body": "hello" });
    let (status, answer) = send(&server, &bob, &room, "b1", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    let levels_path = format!("/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/");
    let (status, mut levels) = server.get(&levels_path, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{levels}");
    levels["events_default"] = json!(50);
    let (status, answer) = server.put(&levels_path, Some(&alice), levels.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, refused) = send(&server, &bob, &room, "b2", body.clone()).await;
    assert_error(&(status, refused), StatusCode::FORBIDDEN, "M_FORBIDDEN");

    levels["events_default"] = json!(0);
    let (status, answer) = server.put(&levels_path, Some(&alice), levels).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = send(&server, &bob, &room, "b3", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}
