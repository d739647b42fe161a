//! Pushers and push notifications, against a push gateway started by the
//! test on loopback (the push gateway API's `/_matrix/push/v1/notify`):
//! delivery with counts, tweaks and `event_id_only`, a muted room, a
//! rejected pushkey, the gateway down while Myelin restarts, the pushers
//! API's errors, and `GET /notifications`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{assert_error, send_message, test_config, token, TestServer, PASSWORD};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// What the gateway received, in order.
type Received = Arc<Mutex<Vec<Value>>>;

/// A push gateway on `addr`: keeps every notification, rejects the
/// pushkey `rejected-key`.
async fn gateway(addr: SocketAddr, received: Received) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let app = axum::Router::new().route(
        "/_matrix/push/v1/notify",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let received = received.clone();
            async move {
                let rejected: Vec<Value> = body["notification"]["devices"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|d| d["pushkey"] == "rejected-key")
                    .map(|d| d["pushkey"].clone())
                    .collect();
                received.lock().unwrap().push(body);
                axum::Json(json!({ "rejected": rejected }))
            }
        }),
    );
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    })
}

fn push_config(config: &mut myelin::config::Config) {
    config.push.ip_range_allowlist = vec!["127.0.0.0/8".to_owned()];
    config.push.retry_base_ms = 50;
    config.push.retry_max_ms = 300;
}

async fn set_pusher(
    server: &TestServer,
    token: &str,
    pushkey: &str,
    url: &str,
    format: Option<&str>,
) {
    let mut data = json!({ "url": url });
    if let Some(format) = format {
        data["format"] = json!(format);
    }
    let body = json!({
        "kind": "http", "app_id": "org.example.chat", "pushkey": pushkey,
        "app_display_name": "Chat", "device_display_name": "Phone", "lang": "en",
        "data": data,
    });
    let (status, answer) = server
        .post("/_matrix/client/v3/pushers/set", Some(token), body)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

/// The notifications received for `pushkey`.
fn for_key(received: &Received, pushkey: &str) -> Vec<Value> {
    received
        .lock()
        .unwrap()
        .iter()
        .filter(|b| b["notification"]["devices"][0]["pushkey"] == pushkey)
        .map(|b| b["notification"].clone())
        .collect()
}

/// Waits until `pushkey` has `count` notifications.
async fn wait_for(received: &Received, pushkey: &str, count: usize) -> Vec<Value> {
    for _ in 0..600 {
        let seen = for_key(received, pushkey);
        if seen.len() >= count {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{pushkey}: {count} notifications expected, got {:?}",
        for_key(received, pushkey)
    );
}

#[tokio::test]
async fn notifications_reach_the_gateway_once_and_survive_its_outage_and_a_restart() {
    let addr: SocketAddr = format!(
        "127.0.0.1:{}",
        common::federation::free_port("127.0.0.1".parse().unwrap())
    )
    .parse()
    .unwrap();
    let url = format!("http://{addr}/_matrix/push/v1/notify");
    let received: Received = Arc::default();
    let running = gateway(addr, received.clone()).await;
    let server = TestServer::start_with(push_config).await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let carol = token(&server.register("carol").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat", "name": "Trio" }))
        .await;
    for member in [&bob, &carol] {
        common::join(&server, member, &room_id).await;
    }
    set_pusher(&server, &bob, "bob-key", &url, None).await;
    set_pusher(&server, &carol, "carol-key", &url, Some("event_id_only")).await;
    let (_, listed) = server.get("/_matrix/client/v3/pushers", Some(&bob)).await;
    assert_eq!(listed["pushers"][0]["pushkey"], "bob-key");
    assert_eq!(listed["pushers"][0]["data"]["url"], url);

    // A message reaches both offline members' pushers, with the counts.
    let text = |body: &str| json!({ "msgtype": "m.text", "body": body });
    let first = send_message(&server, &alice, &room_id, "1", text("hello both")).await;
    let to_bob = wait_for(&received, "bob-key", 1).await;
    let to_carol = wait_for(&received, "carol-key", 1).await;
    assert_eq!(to_bob[0]["event_id"], first);
    assert_eq!(to_bob[0]["room_id"], room_id);
    assert_eq!(to_bob[0]["type"], "m.room.message");
    assert_eq!(to_bob[0]["sender"], "@alice:localhost");
    assert_eq!(to_bob[0]["room_name"], "Trio");
    assert_eq!(to_bob[0]["content"]["body"], "hello both");
    assert_eq!(to_bob[0]["counts"]["unread"], 1);
    assert_eq!(to_bob[0]["prio"], "low");
    assert_eq!(to_bob[0]["devices"][0]["app_id"], "org.example.chat");
    assert!(to_bob[0]["devices"][0]["data"].get("url").is_none());
    // event_id_only: no content, nothing of the event but its IDs.
    assert_eq!(to_carol[0]["event_id"], first);
    assert!(to_carol[0].get("content").is_none() && to_carol[0].get("sender").is_none());
    assert_eq!(to_carol[0]["counts"]["unread"], 1);

    // A mention highlights and sounds, for Bob only.
    let mention = json!({ "msgtype": "m.text", "body": "Bob!", "m.mentions": { "user_ids": ["@bob:localhost"] } });
    let second = send_message(&server, &alice, &room_id, "2", mention).await;
    let to_bob = wait_for(&received, "bob-key", 2).await;
    assert_eq!(to_bob[1]["event_id"], second);
    assert_eq!(
        to_bob[1]["devices"][0]["tweaks"],
        json!({ "sound": "default", "highlight": true })
    );
    assert_eq!(to_bob[1]["prio"], "high");
    assert_eq!(to_bob[1]["counts"]["unread"], 2);
    let to_carol = wait_for(&received, "carol-key", 2).await;
    assert_eq!(to_carol[1]["devices"][0]["tweaks"], json!({}));

    // Bob mutes the room: Carol is pushed the next message, Bob is not.
    let mute = json!({
        "conditions": [{ "kind": "event_match", "key": "room_id", "pattern": room_id }],
        "actions": [],
    });
    let (status, _) = server
        .put(
            "/_matrix/client/v3/pushrules/global/override/mute",
            Some(&bob),
            mute,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let third = send_message(&server, &alice, &room_id, "3", text("shh")).await;
    let to_carol = wait_for(&received, "carol-key", 3).await;
    assert_eq!(to_carol[2]["event_id"], third);
    let (_, listed) = server
        .get("/_matrix/client/v3/notifications", Some(&bob))
        .await;
    let ids: Vec<&Value> = listed["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["event"]["event_id"])
        .collect();
    assert_eq!(ids, vec![&json!(second), &json!(first)], "{listed}");
    let (status, _) = server
        .call(
            reqwest::Method::DELETE,
            "/_matrix/client/v3/pushrules/global/override/mute",
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // GET /notifications: newest first, highlights only, paged.
    let (_, only) = server
        .get(
            "/_matrix/client/v3/notifications?only=highlight",
            Some(&bob),
        )
        .await;
    assert_eq!(only["notifications"].as_array().unwrap().len(), 1, "{only}");
    assert_eq!(only["notifications"][0]["event"]["event_id"], second);
    assert_eq!(only["notifications"][0]["read"], false);
    assert_eq!(only["notifications"][0]["room_id"], room_id);
    let (_, page) = server
        .get("/_matrix/client/v3/notifications?limit=1", Some(&bob))
        .await;
    assert_eq!(page["notifications"][0]["event"]["event_id"], second);
    let next = page["next_token"].as_str().expect("a next token");
    let (_, rest) = server
        .get(
            &format!("/_matrix/client/v3/notifications?limit=5&from={next}"),
            Some(&bob),
        )
        .await;
    assert_eq!(
        rest["notifications"][0]["event"]["event_id"], first,
        "{rest}"
    );
    assert!(rest.get("next_token").is_none());
    let bad = server
        .get(
            "/_matrix/client/v3/notifications?only=everything",
            Some(&bob),
        )
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // A pushkey the gateway rejects removes its pusher.
    let dave = token(&server.register("dave").await);
    common::join(&server, &dave, &room_id).await;
    set_pusher(&server, &dave, "rejected-key", &url, None).await;
    send_message(&server, &alice, &room_id, "4", text("for dave")).await;
    wait_for(&received, "rejected-key", 1).await;
    let mut gone = false;
    for _ in 0..200 {
        let (_, listed) = server.get("/_matrix/client/v3/pushers", Some(&dave)).await;
        if listed["pushers"] == json!([]) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the rejected pusher is removed");
    let bob_before = wait_for(&received, "bob-key", 3).await.len();

    // The gateway goes down; thirty messages; Myelin restarts; the gateway
    // comes back: every notification arrives, once.
    running.abort();
    let _ = running.await;
    let mut sent = Vec::new();
    for n in 0..30 {
        sent.push(
            send_message(
                &server,
                &alice,
                &room_id,
                &format!("down-{n}"),
                text(&format!("message {n}")),
            )
            .await,
        );
    }
    // Let the notifier queue them before the restart (it is durable
    // either way: what is not queued yet is judged after the restart).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = server.stop().await;
    let mut config = test_config(&dir);
    push_config(&mut config);
    let server = TestServer::start_in(dir, config, None).await;
    let _back = gateway(addr, received.clone()).await;
    let to_bob = wait_for(&received, "bob-key", bob_before + 30).await;
    let delivered: Vec<&Value> = to_bob[bob_before..]
        .iter()
        .map(|n| &n["event_id"])
        .collect();
    let expected: Vec<Value> = sent.iter().map(|id| json!(id)).collect();
    assert_eq!(
        delivered,
        expected.iter().collect::<Vec<_>>(),
        "in order, once each"
    );
    let to_carol = wait_for(&received, "carol-key", 4 + 30).await;
    assert_eq!(to_carol.len(), 4 + 30);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        for_key(&received, "bob-key").len(),
        bob_before + 30,
        "no duplicates"
    );
    drop(server);
}

#[tokio::test]
async fn pushers_are_checked_and_belong_to_their_device() {
    let server = TestServer::start().await;
    let bob = token(&server.register("bob").await);
    let set = "/_matrix/client/v3/pushers/set";
    let good = json!({
        "kind": "http", "app_id": "org.example.chat", "pushkey": "k",
        "app_display_name": "Chat", "device_display_name": "Phone", "lang": "en",
        "data": { "url": "https://push.example.org/_matrix/push/v1/notify" },
    });
    let with = |key: &str, value: Value| {
        let mut body = good.clone();
        body[key] = value;
        body
    };
    let refusals = [
        (
            with("kind", json!("email")),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            with("kind", json!(5)),
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
        ),
        (
            with("app_id", json!("")),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            with("app_id", json!("a".repeat(65))),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            with("pushkey", json!("k".repeat(513))),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            with("data", json!({ "url": "https://push.example.org/notify" })),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            with(
                "data",
                json!({ "url": "ftp://push.example.org/_matrix/push/v1/notify" }),
            ),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            with("data", json!({})),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            with(
                "data",
                json!({ "url": "https://push.example.org/_matrix/push/v1/notify", "format": "full" }),
            ),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        // Loopback and private networks are refused unless allowed.
        (
            with(
                "data",
                json!({ "url": "http://127.0.0.1:9/_matrix/push/v1/notify" }),
            ),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            with(
                "data",
                json!({ "url": "http://10.1.2.3/_matrix/push/v1/notify" }),
            ),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            with(
                "data",
                json!({ "url": "http://[::1]/_matrix/push/v1/notify" }),
            ),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            json!({ "kind": "http", "pushkey": "k" }),
            StatusCode::BAD_REQUEST,
            "M_MISSING_PARAM",
        ),
        (
            json!({ "app_id": "a", "pushkey": "k" }),
            StatusCode::BAD_REQUEST,
            "M_MISSING_PARAM",
        ),
    ];
    for (body, status, errcode) in refusals {
        let answer = server.post(set, Some(&bob), body.clone()).await;
        assert_error(&answer, status, errcode);
    }
    let (_, listed) = server.get("/_matrix/client/v3/pushers", Some(&bob)).await;
    assert_eq!(listed, json!({ "pushers": [] }));

    // A pusher of a second device goes when that device logs out; one of
    // the first stays, and is replaced by setting it again.
    let phone = token(&server.login("bob", Some("PHONE")).await);
    let mut public = good.clone();
    public["pushkey"] = json!("phone-key");
    // An address literal of a public range: no DNS needed for the check.
    public["data"] = json!({ "url": "https://93.184.215.14/_matrix/push/v1/notify" });
    let (status, answer) = server.post(set, Some(&phone), public.clone()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let mut first = public.clone();
    first["pushkey"] = json!("laptop-key");
    assert_eq!(
        server.post(set, Some(&bob), first.clone()).await.0,
        StatusCode::OK
    );
    first["device_display_name"] = json!("Laptop");
    assert_eq!(server.post(set, Some(&bob), first).await.0, StatusCode::OK);
    let (_, listed) = server.get("/_matrix/client/v3/pushers", Some(&bob)).await;
    assert_eq!(listed["pushers"].as_array().unwrap().len(), 2, "{listed}");
    let (status, _) = server
        .post("/_matrix/client/v3/logout", Some(&phone), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, listed) = server.get("/_matrix/client/v3/pushers", Some(&bob)).await;
    let pushers = listed["pushers"].as_array().unwrap();
    assert_eq!(pushers.len(), 1, "{listed}");
    assert_eq!(pushers[0]["pushkey"], "laptop-key");
    assert_eq!(pushers[0]["device_display_name"], "Laptop");

    // Another account taking the pushkey (append false) takes it away.
    let carol = token(&server.register("carol").await);
    let mut taken = public.clone();
    taken["pushkey"] = json!("laptop-key");
    assert_eq!(
        server.post(set, Some(&carol), taken).await.0,
        StatusCode::OK
    );
    let (_, listed) = server.get("/_matrix/client/v3/pushers", Some(&bob)).await;
    assert_eq!(listed["pushers"], json!([]), "{listed}");
    // kind null deletes.
    let delete = json!({ "kind": null, "app_id": "org.example.chat", "pushkey": "laptop-key" });
    assert_eq!(
        server.post(set, Some(&carol), delete).await.0,
        StatusCode::OK
    );
    let (_, listed) = server.get("/_matrix/client/v3/pushers", Some(&carol)).await;
    assert_eq!(listed["pushers"], json!([]));
    // A password change that logs out the other devices removes theirs.
    let phone = token(&server.login("carol", Some("PHONE")).await);
    let mut carols = public;
    carols["pushkey"] = json!("carol-phone");
    assert_eq!(
        server.post(set, Some(&phone), carols).await.0,
        StatusCode::OK
    );
    let (status, challenge) = server
        .post(
            "/_matrix/client/v3/account/password",
            Some(&carol),
            json!({ "new_password": "new" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let change = json!({
        "new_password": "new", "logout_devices": true,
        "auth": { "type": "m.login.password", "session": challenge["session"], "identifier": { "type": "m.id.user", "user": "carol" }, "password": PASSWORD },
    });
    let (status, answer) = server
        .post("/_matrix/client/v3/account/password", Some(&carol), change)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, listed) = server.get("/_matrix/client/v3/pushers", Some(&carol)).await;
    assert_eq!(listed["pushers"], json!([]));
}

/// A gateway that takes requests but answers none until `release`; it
/// counts the requests it holds.
async fn stuck_gateway(
    addr: SocketAddr,
    held: Arc<Mutex<usize>>,
    release: Arc<tokio::sync::Notify>,
) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let app = axum::Router::new().route(
        "/_matrix/push/v1/notify",
        axum::routing::post(move |axum::Json(_): axum::Json<Value>| {
            let held = held.clone();
            let release = release.clone();
            async move {
                *held.lock().unwrap() += 1;
                release.notified().await;
                axum::Json(json!({ "rejected": [] }))
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

#[tokio::test]
async fn a_gateway_that_does_not_answer_holds_up_neither_sends_nor_other_pushers() {
    let loopback = "127.0.0.1".parse().unwrap();
    let stuck_addr: SocketAddr = format!("127.0.0.1:{}", common::federation::free_port(loopback))
        .parse()
        .unwrap();
    let good_addr: SocketAddr = format!("127.0.0.1:{}", common::federation::free_port(loopback))
        .parse()
        .unwrap();
    let held = Arc::new(Mutex::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    stuck_gateway(stuck_addr, held.clone(), release.clone()).await;
    let received: Received = Arc::default();
    let _good = gateway(good_addr, received.clone()).await;
    let server = TestServer::start_with(push_config).await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let carol = token(&server.register("carol").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    for member in [&bob, &carol] {
        common::join(&server, member, &room_id).await;
    }
    let stuck_url = format!("http://{stuck_addr}/_matrix/push/v1/notify");
    let good_url = format!("http://{good_addr}/_matrix/push/v1/notify");
    set_pusher(&server, &bob, "bob-key", &stuck_url, None).await;
    set_pusher(&server, &carol, "carol-key", &good_url, None).await;

    let first = send_message(
        &server,
        &alice,
        &room_id,
        "0",
        json!({ "msgtype": "m.text", "body": "0" }),
    )
    .await;
    // Bob's gateway holds the first request...
    for _ in 0..600 {
        if *held.lock().unwrap() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*held.lock().unwrap(), 1);
    // ...while sends go on being answered, and Carol's gateway hears of
    // every message.
    let mut sent = vec![first];
    for n in 1..10 {
        sent.push(
            send_message(
                &server,
                &alice,
                &room_id,
                &n.to_string(),
                json!({ "msgtype": "m.text", "body": n.to_string() }),
            )
            .await,
        );
    }
    let to_carol = wait_for(&received, "carol-key", 10).await;
    let ids: Vec<Value> = to_carol.iter().map(|n| n["event_id"].clone()).collect();
    assert_eq!(ids, sent.iter().map(|id| json!(id)).collect::<Vec<_>>());
    assert_eq!(*held.lock().unwrap(), 1, "one request at a time per pusher");
    // Released, Bob's gateway gets the rest.
    for _ in 0..600 {
        release.notify_waiters();
        if *held.lock().unwrap() >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*held.lock().unwrap(), 10);
    release.notify_waiters();
}
