//! Rooms shared by two Myelin servers on loopback (HTTPS, a CA the test
//! makes): invites, joins, messages both ways, leaving, rejoining, bans,
//! delivery to a server that was down, concurrent state changes, and the
//! refusal of bad events.

mod common;

use std::time::Duration;

use common::federation::{federating_config, TestCa};
use common::{send_text, token, TestServer};
use myelin::services::federation::devices;
use reqwest::StatusCode;
use ruma::serde::{base64::Standard, Base64};
use ruma::signatures::{sign_json, Ed25519KeyPair};
use ruma::CanonicalJsonObject;
use serde_json::{json, Value};

/// Starts a federating server on `ip` with quick retries.
async fn start(ca: &TestCa, ip: &str) -> (TestServer, myelin::config::Config) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "off".into()))
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut config = federating_config(&dir, ca, ip.parse().unwrap());
    config.federation.retry_base_ms = 200;
    config.federation.retry_max_ms = 1_000;
    let server = TestServer::start_in(dir, config.clone(), None).await;
    (server, config)
}

/// Polls `check` every 100 ms for up to 30 s until it returns `Some`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..300 {
        if let Some(found) = check().await {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The message bodies of a room's timeline as `server` has it, oldest
/// first.
async fn bodies(server: &TestServer, token: &str, room_id: &str) -> Vec<String> {
    let (status, page) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=1000"),
            Some(token),
        )
        .await;
    if status != StatusCode::OK {
        return Vec::new();
    }
    let mut bodies: Vec<String> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["type"] == "m.room.message")
        .map(|event| event["content"]["body"].as_str().unwrap().to_owned())
        .collect();
    bodies.reverse();
    bodies
}

async fn membership(server: &TestServer, token: &str, room_id: &str, user: &str) -> Option<String> {
    let (status, event) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.member/{user}"),
            Some(token),
        )
        .await;
    (status == StatusCode::OK).then(|| event["membership"].as_str().unwrap().to_owned())
}

/// `user` of `server` joins `room_id` through `resident`, which then has
/// the join (seen by `resident_token`'s user).
async fn join_through(
    server: &TestServer,
    token: &str,
    room_id: &str,
    resident: &TestServer,
    resident_token: &str,
    user_id: &str,
) {
    let (status, answer) = server
        .post(
            &format!(
                "/_matrix/client/v3/join/{}?via={}",
                room_id.replace('!', "%21"),
                resident.server_name()
            ),
            Some(token),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    eventually("the join on the resident server", || async {
        (membership(resident, resident_token, room_id, user_id)
            .await
            .as_deref()
            == Some("join"))
        .then_some(())
    })
    .await;
}

async fn create_public_room(server: &TestServer, token: &str) -> String {
    let (status, room) = server
        .post(
            "/_matrix/client/v3/createRoom",
            Some(token),
            json!({ "preset": "public_chat", "name": "Across" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{room}");
    room["room_id"].as_str().unwrap().to_owned()
}

/// Two servers, Alice of the first, Bob of the second, and a public room
/// Alice made (Bob not in it yet).
struct Shared {
    one: TestServer,
    two: TestServer,
    alice: String,
    alice_id: String,
    bob: String,
    bob_id: String,
    room_id: String,
}

async fn shared_room(ca: &TestCa) -> Shared {
    let (one, _) = start(ca, "127.0.0.2").await;
    let (two, _) = start(ca, "127.0.0.3").await;
    let (alice, alice_id) = one.register_named("alice", "Alice").await;
    let (bob, bob_id) = two.register_named("bob", "Bob").await;
    let room_id = create_public_room(&one, &alice).await;
    Shared {
        one,
        two,
        alice,
        alice_id,
        bob,
        bob_id,
        room_id,
    }
}

/// `inviter` on `server` invites `user_id`, which must succeed.
async fn invite(server: &TestServer, inviter: &str, room_id: &str, user_id: &str) {
    let (status, answer) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/invite"),
            Some(inviter),
            json!({ "user_id": user_id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

#[tokio::test]
async fn two_servers_share_a_room_from_invite_to_ban() {
    let ca = TestCa::new();
    let Shared {
        one,
        two,
        alice,
        bob,
        bob_id,
        room_id,
        ..
    } = shared_room(&ca).await;

    // An invite across servers reaches Bob's sync with the room's name.
    invite(&one, &alice, &room_id, &bob_id).await;
    let (status, sync) = two.get("/_matrix/client/v3/sync", Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    let invite = &sync["rooms"]["invite"][&room_id]["invite_state"]["events"];
    let events = invite.as_array().expect("the invite is in Bob's sync");
    assert!(events
        .iter()
        .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Across"));
    assert!(events
        .iter()
        .any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "invite"));

    // Bob accepts: his server joins through Alice's.
    let (status, answer) = two
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/join"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    eventually("Bob's join on Alice's server", || async {
        (membership(&one, &alice, &room_id, &bob_id).await.as_deref() == Some("join")).then_some(())
    })
    .await;
    // Bob's server has the room's state: its name and Alice's membership.
    let (status, name) = two
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.name"),
            Some(&bob),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{name}");
    assert_eq!(name["name"], "Across");

    // Messages both ways.
    send_text(&one, &alice, &room_id, "a1", "hello from one").await;
    eventually("Alice's message on Bob's server", || async {
        bodies(&two, &bob, &room_id)
            .await
            .contains(&"hello from one".to_owned())
            .then_some(())
    })
    .await;
    send_text(&two, &bob, &room_id, "b1", "hello from two").await;
    eventually("Bob's message on Alice's server", || async {
        (bodies(&one, &alice, &room_id).await == ["hello from one", "hello from two"]).then_some(())
    })
    .await;
    // Bob's server asks Alice's which event was the last before now.
    let one_name = ruma::ServerName::parse(one.server_name()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let path = format!(
        "/_matrix/federation/v1/timestamp_to_event/{}?ts={now}&dir=b",
        room_id.replace('!', "%21")
    );
    let found = two
        .services()
        .federation
        .client
        .send(&one_name, reqwest::Method::GET, &path, None)
        .await
        .unwrap();
    let (_, last) = one
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=1"),
            Some(&alice),
        )
        .await;
    assert_eq!(found["event_id"], last["chunk"][0]["event_id"], "{found}");

    // Bob's own sync sees Alice's message in his timeline.
    let (_, sync) = two.get("/_matrix/client/v3/sync", Some(&bob)).await;
    let timeline = sync["rooms"]["join"][&room_id]["timeline"]["events"].to_string();
    assert!(timeline.contains("hello from one"), "{timeline}");

    // Bob leaves; Alice's server sees it.
    let (status, _) = two
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/leave"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("Bob's leave on Alice's server", || async {
        (membership(&one, &alice, &room_id, &bob_id).await.as_deref() == Some("leave"))
            .then_some(())
    })
    .await;

    // Bob rejoins by room ID through Alice's server (the room is public),
    // and catches what was said while he was away.
    send_text(&one, &alice, &room_id, "a2", "while you were out").await;
    let (status, answer) = two
        .post(
            &format!(
                "/_matrix/client/v3/join/{}?via={}",
                room_id.replace('!', "%21"),
                one.server_name()
            ),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    eventually("Bob's rejoin on Alice's server", || async {
        (membership(&one, &alice, &room_id, &bob_id).await.as_deref() == Some("join")).then_some(())
    })
    .await;
    send_text(&one, &alice, &room_id, "a3", "welcome back").await;
    eventually("messages after the rejoin", || async {
        bodies(&two, &bob, &room_id)
            .await
            .contains(&"welcome back".to_owned())
            .then_some(())
    })
    .await;

    // Alice bans Bob: both servers agree, and Bob cannot come back.
    let (status, answer) = one
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/ban"),
            Some(&alice),
            json!({ "user_id": bob_id, "reason": "enough" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    eventually("the ban on Bob's server", || async {
        (membership(&two, &bob, &room_id, &bob_id).await.as_deref() == Some("ban")).then_some(())
    })
    .await;
    let (status, _) = two
        .post(
            &format!(
                "/_matrix/client/v3/join/{}?via={}",
                room_id.replace('!', "%21"),
                one.server_name()
            ),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_server_that_was_down_receives_every_message_once_in_order() {
    let ca = TestCa::new();
    let (one, _) = start(&ca, "127.0.0.2").await;
    let (two, two_config) = start(&ca, "127.0.0.3").await;
    let (alice, _) = one.register_named("alice", "Alice").await;
    let (bob, bob_id) = two.register_named("bob", "Bob").await;
    let room_id = create_public_room(&one, &alice).await;
    join_through(&two, &bob, &room_id, &one, &alice, &bob_id).await;

    let dir = two.stop().await;
    let expected: Vec<String> = (0..100).map(|i| format!("message {i}")).collect();
    for (i, body) in expected.iter().enumerate() {
        send_text(&one, &alice, &room_id, &format!("t{i}"), body).await;
    }
    let two = TestServer::start_in(dir, two_config, None).await;
    let bob = token(&two.login("bob", None).await);
    let _ = bob_id;
    eventually("all 100 messages on the restarted server", || async {
        let got = bodies(&two, &bob, &room_id).await;
        (got.len() >= expected.len()).then_some(())
    })
    .await;
    assert_eq!(bodies(&two, &bob, &room_id).await, expected);
}

#[tokio::test]
async fn concurrent_state_changes_on_both_servers_converge() {
    let ca = TestCa::new();
    let (one, _) = start(&ca, "127.0.0.2").await;
    let (two, _) = start(&ca, "127.0.0.3").await;
    let (alice, _) = one.register_named("alice", "Alice").await;
    let (bob, bob_id) = two.register_named("bob", "Bob").await;
    let (status, room) = one
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            json!({ "preset": "public_chat", "power_level_content_override": { "state_default": 0 } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{room}");
    let room_id = room["room_id"].as_str().unwrap().to_owned();
    join_through(&two, &bob, &room_id, &one, &alice, &bob_id).await;

    let topic_path = format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.topic");
    let (a, b) = tokio::join!(
        one.put(&topic_path, Some(&alice), json!({ "topic": "from one" })),
        two.put(&topic_path, Some(&bob), json!({ "topic": "from two" })),
    );
    assert_eq!(a.0, StatusCode::OK, "{}", a.1);
    assert_eq!(b.0, StatusCode::OK, "{}", b.1);
    // Then a message from each, so that each server's graph has the other's
    // events after its own.
    send_text(&one, &alice, &room_id, "m1", "after one").await;
    send_text(&two, &bob, &room_id, "m2", "after two").await;
    let topic = |server: &'static str| {
        let (srv, tok) = if server == "one" {
            (&one, &alice)
        } else {
            (&two, &bob)
        };
        let path = topic_path.clone();
        async move {
            let (_, body) = srv.get(&path, Some(tok)).await;
            body["topic"].as_str().map(str::to_owned)
        }
    };
    eventually("the same topic on both servers", || async {
        let (a, b) = (topic("one").await, topic("two").await);
        let both_seen = bodies(&one, &alice, &room_id).await.len() == 2
            && bodies(&two, &bob, &room_id).await.len() == 2;
        (both_seen && a.is_some() && a == b).then_some(())
    })
    .await;
}

/// Alice's server leaves the events no other server receives unsigned; the
/// ones from before Bob's server joined leave it signed, and verify with
/// its key as any server checks them.
#[tokio::test]
async fn events_from_before_another_server_joined_leave_signed() {
    let ca = TestCa::new();
    let Shared {
        one,
        two,
        alice,
        bob,
        bob_id,
        room_id,
        ..
    } = shared_room(&ca).await;
    let early = send_text(&one, &alice, &room_id, "e1", "before Bob").await;
    let one_services = one.services();
    let one_name = ruma::ServerName::parse(one.server_name()).unwrap();
    let (stored, _) = one_services.rooms.pdu(&early).unwrap().unwrap();
    assert!(
        stored.json().get("signatures").is_none(),
        "no other server was in the room: {}",
        stored.json_str()
    );

    // Joining checks the room's state and auth chain, signatures and all.
    join_through(&two, &bob, &room_id, &one, &alice, &bob_id).await;
    let late = send_text(&one, &alice, &room_id, "e2", "after Bob").await;
    eventually("Alice's later message on Bob's server", || async {
        bodies(&two, &bob, &room_id)
            .await
            .contains(&"after Bob".to_owned())
            .then_some(())
    })
    .await;
    let (stored, _) = one_services.rooms.pdu(&late).unwrap().unwrap();
    let signatures = stored.json().get("signatures");
    assert!(
        matches!(signatures, Some(ruma::CanonicalJsonValue::Object(s)) if s.contains_key(one_name.as_str())),
        "signed as it was made, for the servers in the room: {}",
        stored.json_str()
    );

    // The early message, asked for over federation, comes signed.
    let two_services = two.services();
    let path = format!("/_matrix/federation/v1/event/{}", early.replace('$', "%24"));
    let answer = two_services
        .federation
        .client
        .send(&one_name, reqwest::Method::GET, &path, None)
        .await
        .unwrap();
    let event: CanonicalJsonObject = serde_json::from_value(answer["pdus"][0].clone()).unwrap();
    let document = one_services.federation.own_key_document().unwrap();
    let keys = myelin_federation::server_keys::verify_key_document(
        &document,
        &one_name,
        None,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    )
    .unwrap();
    let rules = ruma::RoomVersionId::V12.rules().unwrap();
    let by_server = [(one_name.clone(), keys)].into_iter().collect();
    assert_eq!(
        myelin_federation::pdu::check_signatures_and_hash(&event, &rules, &by_server),
        Ok(myelin_federation::pdu::Checked::Valid)
    );
    assert_eq!(
        myelin_federation::pdu::event_id(&event, &rules)
            .unwrap()
            .as_str(),
        early,
        "the same event it was before it was signed"
    );
}

#[tokio::test]
async fn bad_events_are_refused_and_change_nothing() {
    let ca = TestCa::new();
    let Shared {
        one,
        two,
        alice,
        bob,
        bob_id,
        room_id,
        ..
    } = shared_room(&ca).await;
    join_through(&two, &bob, &room_id, &one, &alice, &bob_id).await;
    send_text(&two, &bob, &room_id, "ok", "a real message").await;
    eventually("Bob's message on Alice's server", || async {
        (bodies(&one, &alice, &room_id).await == ["a real message"]).then_some(())
    })
    .await;

    // Server two's own client makes signed requests to server one, with
    // events it tampers with.
    let two_services = &two.services();
    let client = &two_services.federation.client;
    let one_name = ruma::ServerName::parse(one.server_name()).unwrap();
    let (_, latest) = one
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=1"),
            Some(&alice),
        )
        .await;
    let latest_id = latest["chunk"][0]["event_id"].as_str().unwrap().to_owned();
    let (_, original) = {
        let path = format!(
            "/_matrix/federation/v1/event/{}",
            latest_id.replace('$', "%24")
        );
        (
            (),
            client
                .send(&one_name, reqwest::Method::GET, &path, None)
                .await
                .unwrap(),
        )
    };
    let good: Value = original["pdus"][0].clone();

    let mut forged = good.clone();
    forged["content"]["body"] = json!("forged words");
    forged["origin_server_ts"] = json!(good["origin_server_ts"].as_u64().unwrap() + 1);
    let mut impersonating = good.clone();
    impersonating["sender"] = json!(format!("@alice:{}", one.server_name()));
    impersonating["origin_server_ts"] = json!(good["origin_server_ts"].as_u64().unwrap() + 2);
    let mut oversized = good.clone();
    oversized["content"]["body"] = json!("x".repeat(70_000));
    let mut unknown_room = good.clone();
    unknown_room["room_id"] = json!(format!("!nowhere:{}", one.server_name()));
    // Signed by Bob's server, but Carol never joined: it fails the
    // authorization rules.
    let carol = format!("@carol:{}", two.server_name());
    let mut template = good.clone();
    let template_object = template.as_object_mut().unwrap();
    for field in ["signatures", "hashes", "unsigned", "event_id"] {
        template_object.remove(field);
    }
    template["sender"] = json!(carol);
    template["content"]["body"] = json!("an outsider speaks");
    let rules = ruma::RoomVersionId::V12.rules().unwrap();
    let unauthorized = two_services.rooms.sign_template(template, &rules).unwrap();
    let unauthorized: Value = serde_json::from_str(&unauthorized.json_text()).unwrap();
    let body = json!({
        "origin": two.server_name(),
        "origin_server_ts": 0,
        "pdus": [forged, impersonating, oversized, unknown_room, unauthorized],
        "edus": [],
    });
    let answer = client
        .send(
            &one_name,
            reqwest::Method::PUT,
            "/_matrix/federation/v1/send/bad1",
            Some(&body),
        )
        .await
        .unwrap();
    let results = answer["pdus"].as_object().unwrap();
    assert!(results.len() >= 3, "{answer}");
    for (event_id, result) in results {
        assert!(result["error"].is_string(), "{event_id} accepted: {answer}");
    }
    // A replayed transaction ID gets the first answer again.
    let again = client
        .send(
            &one_name,
            reqwest::Method::PUT,
            "/_matrix/federation/v1/send/bad1",
            Some(&json!({"origin": two.server_name(), "origin_server_ts": 0, "pdus": []})),
        )
        .await
        .unwrap();
    assert_eq!(again, answer);
    // A body that is not JSON is refused outright with a Matrix error.
    let url = format!("{}/_matrix/federation/v1/send/bad2", one.federation_base());
    let response = common::federation::https_client(&ca)
        .put(&url)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error());
    let error: Value = response.json().await.unwrap();
    assert!(error["errcode"].is_string(), "{error}");
    // A PDU that is no event at all gets an error of its own, if any, and
    // changes nothing.
    let malformed = json!({
        "origin": two.server_name(),
        "origin_server_ts": 0,
        "pdus": [{ "room_id": room_id, "type": 7 }, "not an object"],
    });
    let answer = client
        .send(
            &one_name,
            reqwest::Method::PUT,
            "/_matrix/federation/v1/send/bad3",
            Some(&malformed),
        )
        .await
        .unwrap();
    for (event_id, result) in answer["pdus"].as_object().unwrap() {
        assert!(result["error"].is_string(), "{event_id} accepted: {answer}");
    }

    // Nothing of it reached Alice's timeline, and the server still works.
    assert_eq!(bodies(&one, &alice, &room_id).await, ["a real message"]);
    send_text(&two, &bob, &room_id, "ok2", "still talking").await;
    eventually("a good message after the bad ones", || async {
        (bodies(&one, &alice, &room_id).await == ["a real message", "still talking"]).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_user_knocks_on_a_room_of_another_server_and_is_let_in() {
    let ca = TestCa::new();
    let (one, _) = start(&ca, "127.0.0.2").await;
    let (two, _) = start(&ca, "127.0.0.3").await;
    let (alice, _) = one.register_named("alice", "Alice").await;
    let (bob, bob_id) = two.register_named("bob", "Bob").await;
    let (status, room) = one
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            json!({
                "preset": "private_chat",
                "name": "Knock first",
                "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }],
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{room}");
    let room_id = room["room_id"].as_str().unwrap().to_owned();

    let (status, answer) = two
        .post(
            &format!(
                "/_matrix/client/v3/knock/{}?via={}",
                room_id.replace('!', "%21"),
                one.server_name()
            ),
            Some(&bob),
            json!({ "reason": "let me in" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // Bob's sync shows the knock with the room's name; Alice's server has it.
    let (_, sync) = two.get("/_matrix/client/v3/sync", Some(&bob)).await;
    let knock_state = &sync["rooms"]["knock"][&room_id]["knock_state"]["events"];
    assert!(
        knock_state
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["content"]["name"] == "Knock first")),
        "{sync}"
    );
    assert_eq!(
        membership(&one, &alice, &room_id, &bob_id).await.as_deref(),
        Some("knock")
    );

    // Alice lets him in with an invite; Bob joins.
    invite(&one, &alice, &room_id, &bob_id).await;
    let (status, answer) = two
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/join"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    eventually("Bob's join on Alice's server", || async {
        (membership(&one, &alice, &room_id, &bob_id).await.as_deref() == Some("join")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_server_the_room_acl_denies_is_refused() {
    let ca = TestCa::new();
    let Shared {
        one,
        two,
        alice,
        bob,
        bob_id,
        room_id,
        ..
    } = shared_room(&ca).await;
    join_through(&two, &bob, &room_id, &one, &alice, &bob_id).await;

    // Alice's server denies Bob's; its later events are refused, and its
    // reading requests too.
    let (status, answer) = one
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.server_acl"),
            Some(&alice),
            json!({ "allow": ["*"], "deny": [two.server_name().split(':').next().unwrap()], "allow_ip_literals": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    send_text(&two, &bob, &room_id, "denied", "can you hear me").await;
    for i in 0..25 {
        send_text(
            &two,
            &bob,
            &room_id,
            &format!("gap{i}"),
            &format!("gap {i}"),
        )
        .await;
    }
    send_text(&one, &alice, &room_id, "after", "after the acl").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(bodies(&one, &alice, &room_id).await, ["after the acl"]);
    let one_name = ruma::ServerName::parse(one.server_name()).unwrap();
    let path = format!(
        "/_matrix/federation/v1/state_ids/{}?event_id={}",
        room_id.replace('!', "%21"),
        answer["event_id"].as_str().unwrap().replace('$', "%24")
    );
    let refused = two
        .services()
        .federation
        .client
        .send(&one_name, reqwest::Method::GET, &path, None)
        .await;
    match refused {
        Err(myelin::services::federation::SendError::Refused { status, .. }) => {
            assert_eq!(status, 403)
        }
        other => panic!("the denied server read the state: {other:?}"),
    }

    // The ACL lifted, Bob's next event names prev events Alice's server
    // never took (25 of them, more than get_missing_events fetches): the
    // state at its prev event is fetched instead, and the event accepted.
    let (status, _) = one
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.server_acl"),
            Some(&alice),
            json!({ "allow": ["*"], "deny": [], "allow_ip_literals": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("the lifted ACL on Bob's server", || async {
        let (_, acl) = two
            .get(
                &format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.server_acl"),
                Some(&bob),
            )
            .await;
        (acl["deny"] == json!([])).then_some(())
    })
    .await;
    send_text(&two, &bob, &room_id, "back", "back again").await;
    eventually("Bob's message after the gap", || async {
        bodies(&one, &alice, &room_id)
            .await
            .contains(&"back again".to_owned())
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_remote_invite_can_be_rejected_and_a_full_room_refuses_a_remote_join() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = federating_config(&dir, &ca, "127.0.0.2".parse().unwrap());
    config.max_room_members = 2;
    let one = TestServer::start_in(dir, config, None).await;
    let (two, _) = start(&ca, "127.0.0.3").await;
    let (alice, _) = one.register_named("alice", "Alice").await;
    let (bob, bob_id) = two.register_named("bob", "Bob").await;
    let room_id = create_public_room(&one, &alice).await;

    // Bob is invited and says no: his server leaves through Alice's.
    invite(&one, &alice, &room_id, &bob_id).await;
    let (_, before) = two.get("/_matrix/client/v3/sync", Some(&bob)).await;
    assert!(before["rooms"]["invite"][&room_id].is_object(), "{before}");
    let since = before["next_batch"].as_str().unwrap().to_owned();
    let (status, answer) = two
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/leave"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        membership(&one, &alice, &room_id, &bob_id).await.as_deref(),
        Some("leave")
    );
    let (_, sync) = two
        .get(
            &format!("/_matrix/client/v3/sync?since={since}"),
            Some(&bob),
        )
        .await;
    assert!(sync["rooms"]["invite"][&room_id].is_null(), "{sync}");
    assert!(sync["rooms"]["leave"][&room_id].is_object(), "{sync}");

    // Dave, of Alice's server, joins: the room now has its two members.
    let (dave, _) = one.register_named("dave", "Dave").await;
    common::join(&one, &dave, &room_id).await;
    let join = |token: String| {
        let two = &two;
        let path = format!(
            "/_matrix/client/v3/join/{}?via={}",
            room_id.replace('!', "%21"),
            one.server_name()
        );
        async move { two.post(&path, Some(&token), json!({})).await }
    };
    // A third member is one too many, also through federation.
    let (status, answer) = join(bob.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("The room is full"),
        "{answer}"
    );
    assert_eq!(
        membership(&one, &alice, &room_id, &bob_id).await.as_deref(),
        Some("leave")
    );

    // Dave leaves and Bob gets in through federation. A join that Bob's
    // server then makes on its own (Carol's; its cap is its own) would
    // take the room past Alice's server's cap: there it is kept out of
    // the room's state.
    let (status, _) = one
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/leave"),
            Some(&dave),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = join(bob.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (carol, carol_id) = two.register_named("carol", "Carol").await;
    common::join(&two, &carol, &room_id).await;
    let (_, event) = two
        .get(
            &format!(
                "/_matrix/client/v3/rooms/{room_id}/state/m.room.member/{carol_id}?format=event"
            ),
            Some(&carol),
        )
        .await;
    let carol_join = event["event_id"]
        .as_str()
        .expect("Carol's join event")
        .to_owned();
    // Once Alice's server has the event, it is there but not in the state.
    let one_name = ruma::ServerName::parse(one.server_name()).unwrap();
    let two_services = two.services();
    eventually("Carol's join on Alice's server", || {
        let path = format!(
            "/_matrix/federation/v1/event/{}",
            carol_join.replace('$', "%24")
        );
        let (client, one_name) = (&two_services.federation.client, &one_name);
        async move {
            client
                .send(one_name, reqwest::Method::GET, &path, None)
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
    assert_ne!(
        membership(&one, &alice, &room_id, &carol_id)
            .await
            .as_deref(),
        Some("join")
    );
    let (_, members) = one
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/joined_members"),
            Some(&alice),
        )
        .await;
    assert_eq!(members["joined"].as_object().unwrap().len(), 2, "{members}");
}

#[tokio::test]
async fn an_invite_from_a_server_that_went_away_can_still_be_rejected() {
    let ca = TestCa::new();
    let Shared {
        one,
        two,
        alice,
        bob,
        bob_id,
        room_id,
        ..
    } = shared_room(&ca).await;
    invite(&one, &alice, &room_id, &bob_id).await;
    let (_, before) = two.get("/_matrix/client/v3/sync", Some(&bob)).await;
    assert!(before["rooms"]["invite"][&room_id].is_object(), "{before}");
    let since = before["next_batch"].as_str().unwrap().to_owned();

    // Alice's server is gone; Bob still gets rid of the invite.
    one.stop().await;
    let (status, answer) = two
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/leave"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, sync) = two
        .get(
            &format!("/_matrix/client/v3/sync?since={since}"),
            Some(&bob),
        )
        .await;
    assert!(sync["rooms"]["invite"][&room_id].is_null(), "{sync}");
    assert!(sync["rooms"]["leave"][&room_id].is_object(), "{sync}");
}

#[tokio::test]
async fn typing_and_read_receipts_cross_servers() {
    let ca = TestCa::new();
    let Shared {
        one,
        two,
        alice,
        alice_id,
        bob,
        bob_id,
        room_id,
    } = shared_room(&ca).await;
    join_through(&two, &bob, &room_id, &one, &alice, &bob_id).await;

    // Bob types; Alice's sync shows it.
    let (status, _) = two
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/typing/{bob_id}"),
            Some(&bob),
            json!({ "typing": true, "timeout": 20000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("Bob typing in Alice's sync", || async {
        let (_, sync) = one.get("/_matrix/client/v3/sync", Some(&alice)).await;
        sync["rooms"]["join"][&room_id]["ephemeral"]["events"]
            .as_array()
            .is_some_and(|events| {
                events.iter().any(|e| {
                    e["type"] == "m.typing"
                        && e["content"]["user_ids"]
                            .as_array()
                            .is_some_and(|ids| ids.iter().any(|id| id == bob_id.as_str()))
                })
            })
            .then_some(())
    })
    .await;

    // Alice reads Bob's message: a private receipt stays home, the public
    // one reaches Bob's sync.
    let event_id = send_text(&two, &bob, &room_id, "r1", "read me").await;
    eventually("Bob's message on Alice's server", || async {
        (bodies(&one, &alice, &room_id).await == ["read me"]).then_some(())
    })
    .await;
    for receipt_type in ["m.read.private", "m.read"] {
        let (status, answer) = one
            .post(
                &format!("/_matrix/client/v3/rooms/{room_id}/receipt/{receipt_type}/{event_id}"),
                Some(&alice),
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let receipts = eventually("Alice's receipt in Bob's sync", || async {
        let (_, sync) = two.get("/_matrix/client/v3/sync", Some(&bob)).await;
        let events = sync["rooms"]["join"][&room_id]["ephemeral"]["events"].clone();
        events
            .as_array()
            .is_some_and(|events| {
                events.iter().any(|e| {
                    e["type"] == "m.receipt"
                        && e["content"][&event_id]["m.read"][&alice_id].is_object()
                })
            })
            .then_some(events)
    })
    .await;
    assert!(
        !receipts.to_string().contains("m.read.private"),
        "{receipts}"
    );
    // A threaded receipt crosses with its thread.
    let (status, answer) = one
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{event_id}"),
            Some(&alice),
            json!({ "thread_id": "main" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    eventually("Alice's threaded receipt in Bob's sync", || async {
        let (_, sync) = two.get("/_matrix/client/v3/sync", Some(&bob)).await;
        let events = &sync["rooms"]["join"][&room_id]["ephemeral"]["events"];
        events
            .as_array()
            .is_some_and(|events| {
                events.iter().any(|e| {
                    e["type"] == "m.receipt"
                        && e["content"][&event_id]["m.read"][&alice_id]["thread_id"] == "main"
                })
            })
            .then_some(())
    })
    .await;
    // Typing and receipts that speak for a user of another server, or in a
    // room the user is not in, are ignored.
    let (_, before) = one.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let since = before["next_batch"].as_str().unwrap().to_owned();
    let other_room = create_public_room(&one, &alice).await;
    let forged = [
        json!({ "edu_type": "m.typing", "content": { "room_id": room_id, "user_id": alice_id, "typing": true } }),
        json!({ "edu_type": "m.typing", "content": { "room_id": other_room, "user_id": bob_id, "typing": true } }),
        json!({ "edu_type": "m.receipt", "content": { &other_room: { "m.read": { &bob_id: { "event_ids": [event_id], "data": { "ts": 1 } } } } } }),
        json!({ "edu_type": "m.typing", "content": "not an object" }),
    ];
    for (i, edu) in forged.into_iter().enumerate() {
        send_edu(&two, &one, &format!("forged{i}"), edu).await;
    }
    let (_, after) = one
        .get(
            &format!("/_matrix/client/v3/sync?since={since}&timeout=0"),
            Some(&alice),
        )
        .await;
    let typing_in = |room: &str| -> Vec<Value> {
        after["rooms"]["join"][room]["ephemeral"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|event| event["type"] == "m.typing")
            .flat_map(|event| {
                event["content"]["user_ids"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    };
    assert!(!typing_in(&room_id).contains(&json!(alice_id)), "{after}");
    assert!(typing_in(&other_room).is_empty(), "{after}");
    let elsewhere = after["rooms"]["join"][&other_room]["ephemeral"].to_string();
    assert!(!elsewhere.contains(&bob_id), "{after}");
}

#[tokio::test]
async fn to_device_messages_cross_servers_once() {
    let ca = TestCa::new();
    let (one, _) = start(&ca, "127.0.0.2").await;
    let (two, _) = start(&ca, "127.0.0.3").await;
    let (alice, alice_id) = one.register_named("alice", "Alice").await;
    let bob = two.register_device("bob", "BOBPHONE").await;
    let bob = token(&bob);
    let bob_id = format!("@bob:{}", two.server_name());

    // Through the client API: Alice's server queues it for Bob's.
    let (status, answer) = one
        .put(
            "/_matrix/client/v3/sendToDevice/m.room_key_request/t1",
            Some(&alice),
            json!({ "messages": { &bob_id: { "BOBPHONE": { "hello": "bob" } } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let to_device = |bob: String| {
        let two = &two;
        async move {
            let (_, sync) = two.get("/_matrix/client/v3/sync", Some(&bob)).await;
            sync["to_device"]["events"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        }
    };
    let events = eventually("Alice's to-device message on Bob's phone", || async {
        let events = to_device(bob.clone()).await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["sender"], alice_id.as_str());
    assert_eq!(events[0]["type"], "m.room_key_request");
    assert_eq!(events[0]["content"]["hello"], "bob");

    // The same EDU in two transactions (a retry) arrives once; one that
    // speaks for another server's user does not arrive at all.
    let client = &one.services().federation.client;
    let two_name = ruma::ServerName::parse(two.server_name()).unwrap();
    let edu = |sender: &str, body: &str| {
        json!({
            "edu_type": "m.direct_to_device",
            "content": {
                "sender": sender,
                "type": "org.example.test",
                "message_id": format!("id-{body}"),
                "messages": { &bob_id: { "*": { "body": body } } },
            },
        })
    };
    let forged_sender = format!("@mallory:{}", two.server_name());
    for (txn, edu) in [
        ("e1", edu(&alice_id, "once")),
        ("e2", edu(&alice_id, "once")),
        ("e3", edu(&forged_sender, "forged")),
        ("e4", edu(&alice_id, "last")),
    ] {
        let body = json!({ "origin": one.server_name(), "origin_server_ts": 0, "pdus": [], "edus": [edu] });
        client
            .send(
                &two_name,
                reqwest::Method::PUT,
                &format!("/_matrix/federation/v1/send/{txn}"),
                Some(&body),
            )
            .await
            .unwrap();
    }
    let (_, first) = two.get("/_matrix/client/v3/sync", Some(&bob)).await;
    let bodies: Vec<String> = first["to_device"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(bodies, ["once", "last"], "{first}");
}

#[tokio::test]
async fn device_keys_are_queried_and_claimed_across_servers() {
    let ca = TestCa::new();
    let (one, _) = start(&ca, "127.0.0.2").await;
    let (two, _) = start(&ca, "127.0.0.3").await;
    let (alice, _) = one.register_named("alice", "Alice").await;
    let bob = token(&two.register_device("bob", "BOBPHONE").await);
    let bob_id = format!("@bob:{}", two.server_name());
    let (status, answer) = two
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&bob),
            json!({
                "device_keys": {
                    "user_id": bob_id,
                    "device_id": "BOBPHONE",
                    "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                    "keys": { "curve25519:BOBPHONE": "curve-key", "ed25519:BOBPHONE": "ed-key" },
                    "signatures": { &bob_id: { "ed25519:BOBPHONE": "signature" } },
                },
                "one_time_keys": { "signed_curve25519:AAAA": { "key": "otk-1" } },
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // Alice's server asks Bob's; a server that is not there is a failure.
    let nowhere = "@ghost:127.0.0.9:1";
    let (status, keys) = one
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&alice),
            json!({ "device_keys": { &bob_id: [], nowhere: [] }, "timeout": 5000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    assert_eq!(
        keys["device_keys"][&bob_id]["BOBPHONE"]["keys"]["ed25519:BOBPHONE"], "ed-key",
        "{keys}"
    );
    assert!(keys["failures"]["127.0.0.9:1"].is_object(), "{keys}");

    // The one-time key is claimed once.
    let claim = || {
        one.post(
            "/_matrix/client/v3/keys/claim",
            Some(&alice),
            json!({ "one_time_keys": { &bob_id: { "BOBPHONE": "signed_curve25519" } } }),
        )
    };
    let (status, first) = claim().await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(
        first["one_time_keys"][&bob_id]["BOBPHONE"]["signed_curve25519:AAAA"]["key"], "otk-1",
        "{first}"
    );
    let (_, second) = claim().await;
    assert!(second["one_time_keys"][&bob_id].is_null(), "{second}");

    // The device list as other servers read it.
    let two_name = ruma::ServerName::parse(two.server_name()).unwrap();
    let path = format!(
        "/_matrix/federation/v1/user/devices/{}",
        bob_id.replace('@', "%40").replace(':', "%3A")
    );
    let devices = one
        .services()
        .federation
        .client
        .send(&two_name, reqwest::Method::GET, &path, None)
        .await
        .unwrap();
    assert_eq!(devices["user_id"], bob_id.as_str());
    assert_eq!(devices["devices"][0]["device_id"], "BOBPHONE", "{devices}");
}

/// What `server` says of `user_id`'s devices and master key to `token`.
async fn query_keys(server: &TestServer, token: &str, user_id: &str) -> Value {
    let (status, keys) = server
        .post(
            "/_matrix/client/v3/keys/query",
            Some(token),
            json!({ "device_keys": { user_id: [] }, "timeout": 5000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    keys
}

/// The device IDs with keys in a `/keys/query` answer for `user_id`.
fn device_ids(keys: &Value, user_id: &str) -> Vec<String> {
    keys["device_keys"][user_id]
        .as_object()
        .map(|devices| devices.keys().cloned().collect())
        .unwrap_or_default()
}

/// Identity keys of a device as a client uploads them.
fn device_keys(user_id: &str, device_id: &str) -> Value {
    json!({
        "user_id": user_id,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device_id}"): format!("curve-{device_id}"),
            format!("ed25519:{device_id}"): format!("ed-{device_id}"),
        },
        "signatures": { user_id: { format!("ed25519:{device_id}"): "signature" } },
    })
}

/// Sends one EDU to `to` as the server of `from`, in a transaction of its own.
async fn send_edu(from: &TestServer, to: &TestServer, txn: &str, edu: Value) {
    let to_name = ruma::ServerName::parse(to.server_name()).unwrap();
    let body = json!({
        "origin": from.server_name(),
        "origin_server_ts": 0,
        "pdus": [],
        "edus": [edu],
    });
    from.services()
        .federation
        .client
        .send(
            &to_name,
            reqwest::Method::PUT,
            &format!("/_matrix/federation/v1/send/{txn}"),
            Some(&body),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn remote_device_lists_are_tracked_and_a_gap_is_healed() {
    let ca = TestCa::new();
    let Shared {
        one,
        two,
        alice,
        alice_id,
        bob,
        bob_id,
        room_id,
    } = shared_room(&ca).await;
    join_through(&two, &bob, &room_id, &one, &alice, &bob_id).await;
    let (_, first) = one.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();

    // Bob signs in on a tablet and uploads its keys: Alice's sync says his
    // devices changed, and her server keeps his list.
    let tablet = token(&two.login("bob", Some("BOBTAB")).await);
    let (status, answer) = two
        .post(
            "/_matrix/client/v3/keys/upload",
            Some(&tablet),
            json!({ "device_keys": device_keys(&bob_id, "BOBTAB") }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let bob_user = ruma::UserId::parse(&bob_id).unwrap();
    eventually("Bob's tablet kept by Alice's server", || async {
        let list = devices::current_list(&one.services(), &bob_user).unwrap()?;
        list.devices["BOBTAB"].is_object().then_some(())
    })
    .await;
    let (_, sync) = one
        .get(
            &format!("/_matrix/client/v3/sync?since={since}&timeout=0"),
            Some(&alice),
        )
        .await;
    let changed = &sync["device_lists"]["changed"];
    assert!(
        changed
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u == bob_id.as_str()),
        "{sync}"
    );

    // Bob's new cross-signing keys follow.
    let master = json!({
        "user_id": bob_id,
        "usage": ["master"],
        "keys": { "ed25519:bobmaster": "bobmaster" },
    });
    let (status, answer) = two
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            Some(&bob),
            json!({ "master_key": master }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    eventually("Bob's master key on Alice's server", || async {
        let list = devices::current_list(&one.services(), &bob_user).unwrap()?;
        list.master_key.filter(|key| *key == master).map(|_| ())
    })
    .await;

    // Alice verifies Bob: her user-signing key signs his master key. Her
    // server keeps the signature and shows it to her alone.
    let der = Ed25519KeyPair::generate();
    let probe = Ed25519KeyPair::from_der(&der, "probe".into()).unwrap();
    let public = Base64::<Standard>::new(probe.public_key().to_vec()).encode();
    let user_signing = Ed25519KeyPair::from_der(&der, public.clone()).unwrap();
    let own_key = |usage: &str, key: &str| json!({ "user_id": alice_id, "usage": [usage], "keys": { format!("ed25519:{key}"): key } });
    let (status, answer) = one
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            Some(&alice),
            json!({
                "master_key": own_key("master", "alicemaster"),
                "user_signing_key": own_key("user_signing", &public),
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let mut object: CanonicalJsonObject = serde_json::from_value(master.clone()).unwrap();
    sign_json(&alice_id, &user_signing, &mut object).unwrap();
    let signed = serde_json::to_value(&object).unwrap();
    let mut forged = signed.clone();
    forged["keys"] = json!({ "ed25519:bobmaster": "another" });
    for (object, failure) in [(forged, Some("M_INVALID_PARAM")), (signed, None)] {
        let (status, answer) = one
            .post(
                "/_matrix/client/v3/keys/signatures/upload",
                Some(&alice),
                json!({ &bob_id: { "bobmaster": object } }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(
            answer["failures"][&bob_id]["bobmaster"]["errcode"].as_str(),
            failure,
            "{answer}"
        );
    }
    let signature_name = format!("ed25519:{public}");
    let keys = query_keys(&one, &alice, &bob_id).await;
    assert!(
        keys["master_keys"][&bob_id]["signatures"][&alice_id][&signature_name].is_string(),
        "{keys}"
    );
    let (carol, _) = one.register_named("carol", "Carol").await;
    let keys = query_keys(&one, &carol, &bob_id).await;
    assert!(
        keys["master_keys"][&bob_id]["signatures"][&alice_id].is_null(),
        "{keys}"
    );

    // An update that follows on from the last one is applied as it is...
    let known = devices::current_list(&one.services(), &bob_user)
        .unwrap()
        .unwrap();
    let update = |device_id: &str, stream_id: u64, prev_id: u64| {
        json!({
            "edu_type": "m.device_list_update",
            "content": {
                "user_id": bob_id,
                "device_id": device_id,
                "stream_id": stream_id,
                "prev_id": [prev_id],
                "keys": device_keys(&bob_id, device_id),
            },
        })
    };
    let next = known.stream_id + 1;
    send_edu(&two, &one, "d1", update("EXTRA", next, known.stream_id)).await;
    let keys = query_keys(&one, &alice, &bob_id).await;
    assert!(
        device_ids(&keys, &bob_id).contains(&"EXTRA".to_owned()),
        "{keys}"
    );
    // ...one after a gap makes Alice's server fetch Bob's whole list,
    // which has neither device.
    send_edu(&two, &one, "d2", update("AFTERGAP", next + 5, next + 4)).await;
    let keys = query_keys(&one, &alice, &bob_id).await;
    assert_eq!(device_ids(&keys, &bob_id), ["BOBTAB"], "{keys}");
    let healed = devices::current_list(&one.services(), &bob_user)
        .unwrap()
        .unwrap();
    let announced =
        myelin::services::federation::announce::announced_stream_id(&two.services(), &bob_user)
            .unwrap();
    assert_eq!(healed.stream_id, announced);

    // Updates about a user of another server, about a user who shares no
    // room, or without a stream ID change nothing.
    let stranger = format!("@stranger:{}", two.server_name());
    let mut no_stream = update("NOSTREAM", announced + 1, announced);
    no_stream["content"]
        .as_object_mut()
        .unwrap()
        .remove("stream_id");
    let mut forged = update("FORGED", 1, 0);
    forged["content"]["user_id"] = json!(alice_id);
    let mut unrelated = update("UNRELATED", 1, 0);
    unrelated["content"]["user_id"] = json!(stranger);
    for (txn, edu) in [("d3", forged), ("d4", unrelated), ("d5", no_stream)] {
        send_edu(&two, &one, txn, edu).await;
    }
    let keys = query_keys(&one, &alice, &bob_id).await;
    assert_eq!(device_ids(&keys, &bob_id), ["BOBTAB"], "{keys}");
    let stranger = ruma::UserId::parse(&stranger).unwrap();
    assert!(devices::current_list(&one.services(), &stranger)
        .unwrap()
        .is_none());
    let keys = query_keys(&one, &alice, &alice_id).await;
    assert!(device_ids(&keys, &alice_id).is_empty(), "{keys}");

    // The list is kept: with Bob's server gone, Alice's still answers.
    drop(two.stop().await);
    let keys = query_keys(&one, &alice, &bob_id).await;
    assert_eq!(device_ids(&keys, &bob_id), ["BOBTAB"], "{keys}");
    assert_eq!(
        keys["master_keys"][&bob_id]["keys"], master["keys"],
        "{keys}"
    );
    assert_eq!(keys["failures"], json!({}), "{keys}");
}

#[tokio::test]
async fn presence_crosses_servers_unless_turned_off() {
    let ca = TestCa::new();
    let Shared {
        one,
        two,
        alice,
        alice_id: _,
        bob,
        bob_id,
        room_id,
    } = shared_room(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = federating_config(&dir, &ca, "127.0.0.4".parse().unwrap());
    config.federation.presence = false;
    let three = TestServer::start_in(dir, config, None).await;
    let (carol, carol_id) = three.register_named("carol", "Carol").await;
    join_through(&two, &bob, &room_id, &one, &alice, &bob_id).await;
    join_through(&three, &carol, &room_id, &one, &alice, &carol_id).await;

    let presence_of = |sync: &Value, user: &str| -> Option<Value> {
        sync["presence"]["events"]
            .as_array()?
            .iter()
            .find(|event| event["sender"] == user)
            .map(|event| event["content"].clone())
    };
    let (status, answer) = two
        .put(
            &format!("/_matrix/client/v3/presence/{bob_id}/status"),
            Some(&bob),
            json!({ "presence": "online", "status_msg": "on the train" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    eventually("Bob's presence in Alice's sync", || async {
        let (_, sync) = one.get("/_matrix/client/v3/sync", Some(&alice)).await;
        let content = presence_of(&sync, &bob_id)?;
        (content["status_msg"] == "on the train").then_some(())
    })
    .await;

    // Carol's server shares no presence: it neither takes Bob's (which
    // arrived with the message that follows it) nor sends Carol's.
    let (status, _) = three
        .put(
            &format!("/_matrix/client/v3/presence/{carol_id}/status"),
            Some(&carol),
            json!({ "presence": "online", "status_msg": "at home" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    send_text(&two, &bob, &room_id, "p1", "after presence").await;
    send_text(&three, &carol, &room_id, "p2", "after Carol's presence").await;
    eventually("both messages on Alice's and Carol's servers", || async {
        let on_one = bodies(&one, &alice, &room_id).await;
        let on_three = bodies(&three, &carol, &room_id).await;
        (on_one.len() == 2 && on_three.len() == 2).then_some(())
    })
    .await;
    let (_, sync) = three.get("/_matrix/client/v3/sync", Some(&carol)).await;
    assert_eq!(presence_of(&sync, &bob_id), None, "{sync}");
    let (_, sync) = one.get("/_matrix/client/v3/sync", Some(&alice)).await;
    assert_eq!(presence_of(&sync, &carol_id), None, "{sync}");
}

/// A `width`×`height` PNG gradient.
fn png(width: u32, height: u32) -> Vec<u8> {
    let pixels = image::RgbaImage::from_fn(width, height, |x, y| {
        image::Rgba([(x * 255 / width) as u8, (y * 255 / height) as u8, 90, 255])
    });
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgba8(pixels)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

/// `GET path` on `server` as `token`, with an optional `Range`.
async fn get_media(
    server: &TestServer,
    path: &str,
    token: &str,
    range: Option<&str>,
) -> reqwest::Response {
    let mut request = server.http.get(server.url(path)).bearer_auth(token);
    if let Some(range) = range {
        request = request.header("Range", range);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn media_of_another_server_is_fetched_kept_and_capped() {
    let ca = TestCa::new();
    let (one, _) = start(&ca, "127.0.0.2").await;
    let (two, _) = start(&ca, "127.0.0.3").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = federating_config(&dir, &ca, "127.0.0.4".parse().unwrap());
    config.media.max_upload_bytes = 1_000;
    let small = TestServer::start_in(dir, config, None).await;
    let (alice, _) = one.register_named("alice", "Alice").await;
    let (bob, _) = two.register_named("bob", "Bob").await;
    let (sam, _) = small.register_named("sam", "Sam").await;

    let image = png(300, 200);
    assert!(image.len() > 1_000);
    let response = two
        .http
        .post(two.url("/_matrix/media/v3/upload?filename=photo.png"))
        .bearer_auth(&bob)
        .header("Content-Type", "image/png")
        .body(image.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let uri: Value = response.json().await.unwrap();
    let rest = uri["content_uri"]
        .as_str()
        .unwrap()
        .strip_prefix("mxc://")
        .unwrap()
        .to_owned();
    let download = format!("/_matrix/client/v1/media/download/{rest}");
    let thumbnail = format!("/_matrix/client/v1/media/thumbnail/{rest}?width=32&height=32");

    // Alice's server fetches Bob's image from his server: the same bytes,
    // type and name, in byte ranges too; the thumbnail is the one Bob's
    // server makes.
    let response = get_media(&one, &download, &alice, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/png");
    let disposition = response.headers()["content-disposition"].to_str().unwrap();
    assert!(disposition.contains("photo.png"), "{disposition}");
    assert_eq!(response.bytes().await.unwrap().as_ref(), image.as_slice());
    let response = get_media(&one, &download, &alice, Some("bytes=10-19")).await;
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(response.bytes().await.unwrap().as_ref(), &image[10..20]);
    let at_home = get_media(&two, &thumbnail, &bob, None).await;
    assert_eq!(at_home.status(), StatusCode::OK);
    let at_home = at_home.bytes().await.unwrap();
    let fetched = get_media(&one, &thumbnail, &alice, None).await;
    assert_eq!(fetched.status(), StatusCode::OK);
    assert!(fetched.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("image/"));
    assert_eq!(fetched.bytes().await.unwrap(), at_home);

    // Unknown media of another server is not found; the federation
    // endpoints want a signed request.
    let (status, answer) = one
        .get(
            &format!(
                "/_matrix/client/v1/media/download/{}/nosuchmedia",
                two.server_name()
            ),
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(answer["errcode"], "M_NOT_FOUND");
    let media_id = rest.rsplit('/').next().unwrap();
    let unsigned = common::federation::https_client(&ca)
        .get(format!(
            "{}/_matrix/federation/v1/media/download/{media_id}",
            two.federation_base()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);

    // A server whose limit the image exceeds refuses it and keeps nothing.
    for _ in 0..2 {
        let response = get_media(&small, &download, &sam, None).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["errcode"], "M_TOO_LARGE", "{answer}");
    }
    let (server, media_id) = rest.split_once('/').unwrap();
    assert!(small
        .services()
        .media
        .open(server, media_id)
        .unwrap()
        .is_none());

    // Kept: with Bob's server gone, Alice's still serves both.
    drop(two.stop().await);
    let response = get_media(&one, &download, &alice, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap().as_ref(), image.as_slice());
    let response = get_media(&one, &thumbnail, &alice, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap(), at_home);
}

#[tokio::test]
async fn a_restricted_room_admits_members_of_the_allowed_room_from_another_server() {
    let ca = TestCa::new();
    let Shared {
        one,
        two,
        alice,
        alice_id,
        bob,
        bob_id,
        room_id: lobby,
    } = shared_room(&ca).await;
    join_through(&two, &bob, &lobby, &one, &alice, &bob_id).await;
    let (carol, _) = two.register_named("carol", "Carol").await;
    let restricted_to = |allowed: &str| {
        json!({
            "preset": "private_chat",
            "initial_state": [{
                "type": "m.room.join_rules",
                "state_key": "",
                "content": {
                    "join_rule": "restricted",
                    "allow": [{ "type": "m.room_membership", "room_id": allowed }],
                },
            }],
        })
    };
    let (status, room) = one
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            restricted_to(&lobby),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{room}");
    let inner = room["room_id"].as_str().unwrap().to_owned();
    let join_path = format!(
        "/_matrix/client/v3/join/{}?via={}",
        inner.replace('!', "%21"),
        one.server_name()
    );

    // Bob is in the lobby: Alice's server vouches for his join.
    let (status, answer) = two.post(&join_path, Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, member) = one
        .get(
            &format!("/_matrix/client/v3/rooms/{inner}/state/m.room.member/{bob_id}"),
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{member}");
    assert_eq!(member["membership"], "join");
    assert_eq!(
        member["join_authorised_via_users_server"],
        alice_id.as_str()
    );

    // Carol is not: refused, and the room is unchanged.
    let (status, answer) = two.post(&join_path, Some(&carol), json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    let carol_id = format!("@carol:{}", two.server_name());
    assert_eq!(membership(&one, &alice, &inner, &carol_id).await, None);

    // A room restricted to one Alice's server is not in: it cannot vouch.
    let (status, room) = two
        .post("/_matrix/client/v3/createRoom", Some(&bob), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{room}");
    let elsewhere = room["room_id"].as_str().unwrap().to_owned();
    let (status, room) = one
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            restricted_to(&elsewhere),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{room}");
    let unvouched = room["room_id"].as_str().unwrap().to_owned();
    let one_name = ruma::ServerName::parse(one.server_name()).unwrap();
    let path = format!(
        "/_matrix/federation/v1/make_join/{}/{}?ver=10&ver=11",
        unvouched.replace('!', "%21"),
        bob_id.replace('@', "%40").replace(':', "%3A")
    );
    let refused = two
        .services()
        .federation
        .client
        .send(&one_name, reqwest::Method::GET, &path, None)
        .await
        .unwrap_err();
    match refused {
        myelin::services::federation::SendError::Refused { status, body } => {
            assert_eq!(status, 400, "{body}");
            assert_eq!(body["errcode"], "M_UNABLE_TO_AUTHORISE_JOIN", "{body}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_room_with_members_of_another_server_is_upgraded_and_they_follow() {
    let ca = TestCa::new();
    let Shared {
        one,
        two,
        alice,
        alice_id: _,
        bob,
        bob_id,
        room_id: old,
    } = shared_room(&ca).await;
    join_through(&two, &bob, &old, &one, &alice, &bob_id).await;
    let (status, answer) = one
        .post(
            &format!("/_matrix/client/v3/rooms/{old}/upgrade"),
            Some(&alice),
            json!({ "new_version": "11" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let new = answer["replacement_room"].as_str().unwrap().to_owned();

    // Bob's server has the tombstone, which names the new room; Bob can no
    // longer speak in the old room.
    let tombstone = eventually("the tombstone on Bob's server", || async {
        let (status, tombstone) = two
            .get(
                &format!("/_matrix/client/v3/rooms/{old}/state/m.room.tombstone"),
                Some(&bob),
            )
            .await;
        (status == StatusCode::OK).then_some(tombstone)
    })
    .await;
    assert_eq!(tombstone["replacement_room"], new.as_str());
    let (status, _) = two
        .put(
            &format!("/_matrix/client/v3/rooms/{old}/send/m.room.message/late"),
            Some(&bob),
            json!({ "msgtype": "m.text", "body": "too late" }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // He follows it to the new room, which knows its predecessor, and
    // messages cross there.
    join_through(&two, &bob, &new, &one, &alice, &bob_id).await;
    let (status, create) = two
        .get(
            &format!("/_matrix/client/v3/rooms/{new}/state/m.room.create"),
            Some(&bob),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{create}");
    assert_eq!(create["predecessor"]["room_id"], old.as_str());
    send_text(&two, &bob, &new, "n1", "in the new room").await;
    eventually(
        "Bob's message in the new room on Alice's server",
        || async { (bodies(&one, &alice, &new).await == ["in the new room"]).then_some(()) },
    )
    .await;
}

/// Creates a room as `token` with `body`; its ID.
async fn create_room_with(server: &TestServer, token: &str, body: Value) -> String {
    let (status, room) = server
        .post("/_matrix/client/v3/createRoom", Some(token), body)
        .await;
    assert_eq!(status, StatusCode::OK, "{room}");
    room["room_id"].as_str().unwrap().to_owned()
}

/// Names `child` a child of `space`.
async fn add_child(server: &TestServer, token: &str, space: &str, child: &str, content: Value) {
    let path = format!("/_matrix/client/v3/rooms/{space}/state/m.space.child/{child}");
    let (status, answer) = server.put(&path, Some(token), content).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

/// `GET /room_summary/{target}`, with a token or without.
async fn room_summary(
    server: &TestServer,
    token: Option<&str>,
    target: &str,
) -> (StatusCode, Value) {
    server
        .get(&format!("/_matrix/client/v1/room_summary/{target}"), token)
        .await
}

/// `GET /hierarchy` of `space` with `query`, which must succeed.
async fn hierarchy_of(server: &TestServer, token: &str, space: &str, query: &str) -> Value {
    let path = format!("/_matrix/client/v1/rooms/{space}/hierarchy{query}");
    let (status, answer) = server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

/// The room IDs of a `/hierarchy` answer, in order.
fn hierarchy_rooms(answer: &Value) -> Vec<String> {
    answer["rooms"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .iter()
        .map(|room| room["room_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_space_spanning_two_servers_is_browsed_from_either() {
    let ca = TestCa::new();
    let Shared {
        one,
        two,
        alice,
        bob,
        bob_id,
        ..
    } = shared_room(&ca).await;
    let space = json!({ "preset": "public_chat", "name": "Space", "creation_content": { "type": "m.space" } });
    let one_name = one.server_name();
    let two_name = two.server_name();
    // On Alice's server: the space, a public room (suggested) and a private
    // one; on Bob's: a public room and a sub-space with a room of its own.
    let top = create_room_with(&one, &alice, space.clone()).await;
    let lobby = create_room_with(
        &one,
        &alice,
        json!({ "preset": "public_chat", "name": "Lobby", "room_alias_name": "lobby" }),
    )
    .await;
    let private = create_room_with(
        &one,
        &alice,
        json!({ "preset": "private_chat", "name": "Secret" }),
    )
    .await;
    let cafe = create_room_with(
        &two,
        &bob,
        json!({ "preset": "public_chat", "name": "Cafe" }),
    )
    .await;
    let sub = create_room_with(&two, &bob, space).await;
    let corner = create_room_with(
        &two,
        &bob,
        json!({ "preset": "public_chat", "name": "Corner" }),
    )
    .await;
    add_child(
        &one,
        &alice,
        &top,
        &lobby,
        json!({ "via": [one_name], "suggested": true, "order": "a" }),
    )
    .await;
    add_child(
        &one,
        &alice,
        &top,
        &private,
        json!({ "via": [one_name], "order": "b" }),
    )
    .await;
    add_child(
        &one,
        &alice,
        &top,
        &cafe,
        json!({ "via": [two_name], "order": "c" }),
    )
    .await;
    add_child(
        &one,
        &alice,
        &top,
        &sub,
        json!({ "via": [two_name], "order": "d" }),
    )
    .await;
    add_child(
        &one,
        &alice,
        &top,
        "!nowhere:127.0.0.9",
        json!({ "via": [] }),
    )
    .await;
    add_child(&two, &bob, &sub, &corner, json!({ "via": [two_name] })).await;
    join_through(&two, &bob, &top, &one, &alice, &bob_id).await;

    let hierarchy = |server, token, query| hierarchy_of(server, token, &top, query);
    // Alice sees all of it: what her server is not in comes from Bob's.
    let seen = hierarchy(&one, &alice, "").await;
    assert_eq!(
        hierarchy_rooms(&seen),
        [top.as_str(), &lobby, &private, &cafe, &sub, &corner],
        "{seen}"
    );
    let cafe_summary = &seen["rooms"][3];
    assert_eq!(cafe_summary["name"], "Cafe");
    assert_eq!(cafe_summary["join_rule"], "public");
    assert_eq!(cafe_summary["num_joined_members"], 1);
    assert_eq!(seen["rooms"][0]["room_type"], "m.space");
    assert_eq!(
        seen["rooms"][0]["children_state"].as_array().unwrap().len(),
        4
    );

    // Bob is not in the private room: Alice's server does not show it to
    // his; the rest comes in pages, and as far down and as suggested as
    // asked.
    let everything = [top.as_str(), &lobby, &cafe, &sub, &corner];
    assert_eq!(
        hierarchy_rooms(&hierarchy(&two, &bob, "").await),
        everything
    );
    let mut paged = Vec::new();
    let mut query = "?limit=2".to_owned();
    loop {
        let page = hierarchy_of(&two, &bob, &top, &query).await;
        paged.extend(hierarchy_rooms(&page));
        match page["next_batch"].as_str() {
            Some(next) => query = format!("?limit=2&from={next}"),
            None => break,
        }
    }
    assert_eq!(paged, everything);
    assert_eq!(
        hierarchy_rooms(&hierarchy(&two, &bob, "?max_depth=1").await),
        [top.as_str(), &lobby, &cafe, &sub]
    );
    assert_eq!(
        hierarchy_rooms(&hierarchy(&two, &bob, "?suggested_only=true").await),
        [top.as_str(), &lobby]
    );
    let first = hierarchy(&two, &bob, "?limit=1").await;
    let next = first["next_batch"].as_str().unwrap();
    let (status, answer) = two
        .get(
            &format!("/_matrix/client/v1/rooms/{top}/hierarchy?limit=1&max_depth=1&from={next}"),
            Some(&bob),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["errcode"], "M_INVALID_PARAM");

    // Summaries: of a room this server is in, by alias, without a token
    // for a public room; of one on Bob's server, through it; none of a
    // private room for someone outside it.
    let alias = format!("%23lobby:{one_name}");
    let (status, answer) = room_summary(&one, Some(&alice), &alias).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["room_id"], lobby.as_str());
    assert_eq!(answer["membership"], "join");
    assert!(answer.get("children_state").is_none(), "{answer}");
    let (status, answer) = room_summary(&one, None, &alias).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer.get("membership").is_none(), "{answer}");
    let target = format!("{corner}?via={two_name}");
    let (status, answer) = room_summary(&one, Some(&alice), &target).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["name"], "Corner");
    assert_eq!(answer["membership"], "leave");
    let (status, answer) = room_summary(&one, None, &private).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");

    // A room one may not see is refused as a space to browse.
    let (status, answer) = one
        .get(
            &format!("/_matrix/client/v1/rooms/{private}/hierarchy"),
            Some(&one.register_named("carol", "Carol").await.0),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
}

/// A media server that knows only the legacy endpoints, on `ip` over HTTPS
/// with a certificate of `ca`: the federation media endpoints answer
/// `M_UNRECOGNIZED`, the legacy download answers the file, the legacy
/// thumbnail redirects. Its name (`ip:port`) is returned.
async fn legacy_media_server(ca: &TestCa, ip: &str, file: Vec<u8>) -> String {
    use axum::http::{header, StatusCode as Status};
    use axum::response::IntoResponse;
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let port = common::federation::free_port(ip);
    let name = format!("{ip}:{port}");
    let (cert, key) = ca.issue(ip);
    let acceptor = myelin::tls::acceptor(&cert, &key).unwrap();
    let tcp = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    let unrecognized = || async {
        let body = json!({ "errcode": "M_UNRECOGNIZED", "error": "Unrecognized request" });
        (Status::NOT_FOUND, axum::Json(body))
    };
    let thumbnail_file = png(8, 8);
    let location = format!("https://{name}/cdn/thumbnail");
    let app = axum::Router::new()
        .route(
            "/_matrix/federation/v1/media/download/{id}",
            axum::routing::get(unrecognized),
        )
        .route(
            "/_matrix/federation/v1/media/thumbnail/{id}",
            axum::routing::get(unrecognized),
        )
        .route(
            "/_matrix/media/v3/download/{server}/{id}",
            axum::routing::get(move || async move {
                ([(header::CONTENT_TYPE, "image/png")], file).into_response()
            }),
        )
        .route(
            "/_matrix/media/v3/thumbnail/{server}/{id}",
            axum::routing::get(move || async move {
                (Status::FOUND, [(header::LOCATION, location)]).into_response()
            }),
        )
        .route(
            "/cdn/thumbnail",
            axum::routing::get(move || async move {
                ([(header::CONTENT_TYPE, "image/png")], thumbnail_file).into_response()
            }),
        );
    let listener = myelin::tls::TlsListener::new(tcp, acceptor);
    tokio::spawn(async move { axum::serve(listener, app.into_make_service()).await });
    name
}

#[tokio::test]
async fn media_of_a_server_without_federation_media_comes_through_the_legacy_endpoints() {
    let ca = TestCa::new();
    let (one, _) = start(&ca, "127.0.0.2").await;
    let (alice, _) = one.register_named("alice", "Alice").await;
    let image = png(40, 30);
    let legacy = legacy_media_server(&ca, "127.0.0.5", image.clone()).await;

    let response = get_media(
        &one,
        &format!("/_matrix/client/v1/media/download/{legacy}/old"),
        &alice,
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert_eq!(response.bytes().await.unwrap().as_ref(), image.as_slice());
    let response = get_media(
        &one,
        &format!("/_matrix/client/v1/media/thumbnail/{legacy}/old?width=8&height=8"),
        &alice,
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.bytes().await.unwrap().as_ref(),
        png(8, 8).as_slice()
    );
}
