//! The WebSocket push extension with a real WebSocket client
//! (tokio-tungstenite): every operation, every error, resuming after a
//! reconnect, one session per device, and a client that stops reading.

mod common;

use std::time::Duration;

use common::ws::{ws_url, WsClient};
use common::{join, send_text, token, TestServer};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn body_of(frame: &Value) -> &str {
    frame["data"]["event"]["content"]["body"]
        .as_str()
        .unwrap_or_default()
}

#[tokio::test]
async fn every_operation_does_what_its_http_equivalent_does() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let _carol = token(&server.register("carol").await);
    let (mut a, ready) = WsClient::connect(&server, &alice).await;
    assert_eq!(ready["data"]["user_id"], "@alice:localhost");
    assert_eq!(ready["data"]["resumed"], false);
    let (mut b, b_ready) = WsClient::connect(&server, &bob).await;

    // create_chat: a room with a name, the participants invited.
    let chat = a
        .ok(
            "create_chat",
            json!({ "participants": ["@bob:localhost"], "chat_name": "Team" }),
        )
        .await;
    let room_id = chat["room_id"].as_str().unwrap().to_owned();
    let invite = b.push_where(|f| f["type"] == "invite").await;
    assert_eq!(invite["data"]["room_id"], room_id.as_str());
    let names: Vec<_> = invite["data"]["invite_state"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.name")
        .map(|e| e["content"]["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("Team")]);
    join(&server, &bob, &room_id).await;

    // send_message: text; the event reaches the other member's push with
    // a position, and the sender's answer names it.
    let sent = a
        .ok(
            "send_message",
            json!({ "chat_id": room_id, "text": "hello", "txn_id": "t1" }),
        )
        .await;
    let event_id = sent["event_id"].as_str().unwrap().to_owned();
    let pushed = b
        .push_where(|f| f["type"] == "event" && f["data"]["event"]["event_id"] == event_id.as_str())
        .await;
    assert_eq!(body_of(&pushed), "hello");
    assert_eq!(pushed["data"]["room_id"], room_id.as_str());
    assert!(pushed["pos"].as_str().unwrap().starts_with('s'));
    // The same transaction ID is the same event, as over HTTP.
    let again = a
        .ok(
            "send_message",
            json!({ "chat_id": room_id, "text": "hello", "txn_id": "t1" }),
        )
        .await;
    assert_eq!(again["event_id"], event_id.as_str());

    // An attachment (uploaded over HTTP) and full event content.
    let uri = upload(&server, &alice).await;
    let attached = a
        .ok(
            "send_message",
            json!({
                "chat_id": room_id, "txn_id": "t2", "text": "a picture",
                "attachment": { "url": uri, "mimetype": "image/png", "name": "p.png", "size": 3 },
            }),
        )
        .await;
    let picture = b
        .push_where(|f| f["data"]["event"]["event_id"] == attached["event_id"])
        .await;
    assert_eq!(picture["data"]["event"]["content"]["msgtype"], "m.image");
    assert_eq!(picture["data"]["event"]["content"]["url"], uri.as_str());
    let encrypted = json!({ "algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgAEn", "session_id": "s", "device_id": "D", "sender_key": "k" });
    a.ok(
        "send_message",
        json!({ "chat_id": room_id, "txn_id": "t3", "event_type": "m.room.encrypted", "content": encrypted }),
    )
    .await;
    let cipher = b.event_of("m.room.encrypted").await;
    assert_eq!(cipher["data"]["event"]["content"]["ciphertext"], "AwgAEn");

    // update_participants: ADD invites, REMOVE kicks.
    let added = a
        .ok(
            "update_participants",
            json!({ "chat_id": room_id, "action": "ADD", "user_ids": ["@carol:localhost"] }),
        )
        .await;
    assert_eq!(added["done"], json!(["@carol:localhost"]));
    let member = b
        .push_where(|f| {
            f["data"]["event"]["type"] == "m.room.member"
                && f["data"]["event"]["state_key"] == "@carol:localhost"
        })
        .await;
    assert_eq!(member["data"]["event"]["content"]["membership"], "invite");
    a.ok(
        "update_participants",
        json!({ "chat_id": room_id, "action": "REMOVE", "user_ids": ["@carol:localhost"], "reason": "test" }),
    )
    .await;
    let kicked = b
        .push_where(|f| {
            f["data"]["event"]["type"] == "m.room.member"
                && f["data"]["event"]["state_key"] == "@carol:localhost"
        })
        .await;
    assert_eq!(kicked["data"]["event"]["content"]["membership"], "leave");

    // typing and read_receipt reach the other side as pushes.
    a.ok(
        "typing",
        json!({ "chat_id": room_id, "typing": true, "timeout": 10000 }),
    )
    .await;
    let typing = b
        .push_where(|f| {
            f["type"] == "typing" && f["data"]["user_ids"] == json!(["@alice:localhost"])
        })
        .await;
    assert_eq!(typing["data"]["room_id"], room_id.as_str());
    b.ok(
        "read_receipt",
        json!({ "chat_id": room_id, "event_id": event_id }),
    )
    .await;
    let receipt = a
        .push_where(|f| {
            f["type"] == "receipt" && !f["data"]["content"][&event_id]["m.read"].is_null()
        })
        .await;
    assert!(receipt["data"]["content"][&event_id]["m.read"]["@bob:localhost"]["ts"].is_u64());

    // ack_message: Bob's delivery shows up for Alice as a receipt, over
    // WebSocket and over /sync.
    // Acknowledged up to the kick: Alice's newest event Bob has.
    let ack_pos = kicked["pos"].as_str().unwrap().to_owned();
    let (_, before_ack) = server.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let since = before_ack["next_batch"].as_str().unwrap().to_owned();
    let acked = b.ok("ack_message", json!({ "pos": ack_pos })).await;
    assert_eq!(acked["pos"], ack_pos.as_str());
    let delivered = a
        .push_where(|f| f["type"] == "receipt" && has_delivered(&f["data"]["content"]))
        .await;
    let newest = newest_delivered(&delivered["data"]["content"]);
    assert_eq!(
        newest,
        kicked["data"]["event"]["event_id"].as_str().unwrap()
    );
    let (_, http) = server
        .get(
            &format!("/_matrix/client/v3/sync?since={since}&timeout=10000"),
            Some(&alice),
        )
        .await;
    let ephemeral = &http["rooms"]["join"][&room_id]["ephemeral"]["events"];
    let via_sync = ephemeral
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.receipt")
        .expect("a receipt in /sync");
    assert_eq!(newest_delivered(&via_sync["content"]), newest);

    // A to-device message for Bob's device is pushed to it.
    let device = b_ready["data"]["device_id"].as_str().unwrap().to_owned();
    let (status, _) = server
        .put(
            "/_matrix/client/v3/sendToDevice/m.test/td1",
            Some(&alice),
            json!({ "messages": { "@bob:localhost": { device.as_str(): { "secret": 42 } } } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let to_device = b.push_where(|f| f["type"] == "to_device").await;
    assert_eq!(to_device["data"]["event"]["type"], "m.test");
    assert_eq!(to_device["data"]["event"]["sender"], "@alice:localhost");
    assert_eq!(to_device["data"]["event"]["content"]["secret"], 42);

    // ping, and sync to move the cursor.
    assert_eq!(a.ok("ping", json!({})).await, json!({}));
    let moved = b.ok("sync", json!({ "since": ack_pos })).await;
    assert_eq!(moved["pos"], ack_pos.as_str());
}

fn has_delivered(content: &Value) -> bool {
    content.as_object().is_some_and(|events| {
        events
            .values()
            .any(|e| !e["org.myelin.delivered"].is_null())
    })
}

fn newest_delivered(content: &Value) -> String {
    content
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, e)| !e["org.myelin.delivered"]["@bob:localhost"].is_null())
        .map(|(id, _)| id.clone())
        .expect("bob's delivered receipt")
}

async fn upload(server: &TestServer, token: &str) -> String {
    let response = server
        .http
        .post(server.url("/_matrix/media/v3/upload?filename=p.png"))
        .bearer_auth(token)
        .header("Content-Type", "image/png")
        .body(vec![1u8, 2, 3])
        .send()
        .await
        .unwrap();
    let answer: Value = response.json().await.unwrap();
    answer["content_uri"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn bad_requests_get_matrix_errors_and_change_nothing() {
    let server = TestServer::start_with(|c| c.websocket.max_frame_bytes = 4096).await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server.create_room(&bob, json!({})).await;
    let (mut a, _) = WsClient::connect(&server, &alice).await;

    a.send_text("{not json".to_owned()).await;
    let answer = a.answer(&Value::Null).await;
    assert_eq!(answer["errcode"], "M_NOT_JSON");
    a.send_text(r#"{"type":"ping"}"#.to_owned()).await;
    assert_eq!(a.answer(&Value::Null).await["errcode"], "M_BAD_JSON");
    a.fails("no_such_thing", json!({}), "M_UNRECOGNIZED").await;
    a.fails(
        "send_message",
        json!({ "chat_id": room_id }),
        "M_MISSING_PARAM",
    )
    .await;
    a.fails(
        "send_message",
        json!({ "chat_id": room_id, "txn_id": "x", "text": 5 }),
        "M_BAD_JSON",
    )
    .await;
    // Not a member: the same answer as over HTTP.
    let refused = a
        .fails(
            "send_message",
            json!({ "chat_id": room_id, "txn_id": "x", "text": "hi" }),
            "M_FORBIDDEN",
        )
        .await;
    let (status, http) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/y"),
            Some(&alice),
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(http["error"], refused["error"]);
    a.fails(
        "send_message",
        json!({ "chat_id": "nope", "txn_id": "x", "text": "hi" }),
        "M_INVALID_PARAM",
    )
    .await;
    a.fails(
        "send_message",
        json!({ "chat_id": room_id, "txn_id": "x", "attachment": { "url": "http://x/y" } }),
        "M_INVALID_PARAM",
    )
    .await;
    a.fails(
        "send_message",
        json!({ "chat_id": room_id, "txn_id": "x", "text": "a", "content": { "body": "b" } }),
        "M_INVALID_PARAM",
    )
    .await;
    a.fails(
        "update_participants",
        json!({ "chat_id": room_id, "action": "SHUFFLE", "user_ids": ["@bob:localhost"] }),
        "M_INVALID_PARAM",
    )
    .await;
    let partial = a
        .fails(
            "update_participants",
            json!({ "chat_id": room_id, "action": "ADD", "user_ids": ["@bob:localhost"] }),
            "M_FORBIDDEN",
        )
        .await;
    assert_eq!(partial["data"]["done"], json!([]));
    a.fails(
        "ack_message",
        json!({ "pos": "s999999999999999_0" }),
        "M_INVALID_PARAM",
    )
    .await;
    a.fails(
        "ack_message",
        json!({ "pos": "yesterday" }),
        "M_INVALID_PARAM",
    )
    .await;
    a.fails(
        "sync",
        json!({ "since": "s999999999999999_0" }),
        "M_INVALID_PARAM",
    )
    .await;
    a.fails(
        "typing",
        json!({ "chat_id": room_id, "typing": true }),
        "M_FORBIDDEN",
    )
    .await;
    a.fails(
        "read_receipt",
        json!({ "chat_id": room_id, "event_id": "$x" }),
        "M_FORBIDDEN",
    )
    .await;
    a.fails(
        "create_chat",
        json!({ "participants": ["not a user"] }),
        "M_INVALID_PARAM",
    )
    .await;
    a.fails("auth", json!({ "access_token": alice }), "M_INVALID_PARAM")
        .await;
    // Nothing of it reached the room.
    assert_eq!(messages_in(&server, &bob, &room_id).await, 0);
    // The connection still works; a frame over the limit closes it.
    a.ok("ping", json!({})).await;
    a.send_text("x".repeat(5000)).await;
    assert_eq!(a.closed().await, Some(CloseCode::Size));
}

#[tokio::test]
async fn tokens_come_in_the_header_or_the_first_frame_never_in_the_url() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let http = |path: String| {
        let server = &server;
        async move {
            let response = server
                .http
                .get(server.url(&path))
                .header("Connection", "Upgrade")
                .header("Upgrade", "websocket")
                .header("Sec-WebSocket-Version", "13")
                .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
                .bearer_auth("wrong")
                .send()
                .await
                .unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, answer) = http(common::ws::WS_PATH.to_owned()).await;
    assert_eq!(
        (status, answer["errcode"].clone()),
        (StatusCode::UNAUTHORIZED, json!("M_UNKNOWN_TOKEN"))
    );
    let (status, answer) = http(format!("{}?access_token={alice}", common::ws::WS_PATH)).await;
    assert_eq!(
        (status, answer["errcode"].clone()),
        (StatusCode::BAD_REQUEST, json!("M_INVALID_PARAM"))
    );
    // Not a WebSocket request at all.
    let (status, answer) = server.get(common::ws::WS_PATH, Some(&alice)).await;
    assert_eq!(
        (status, answer["errcode"].clone()),
        (StatusCode::BAD_REQUEST, json!("M_INVALID_PARAM"))
    );

    // The first frame: a wrong token is answered, then the connection closes.
    let request = ws_url(&server).into_client_request().unwrap();
    let (socket, _) = tokio_tungstenite::connect_async(request.clone())
        .await
        .unwrap();
    let mut client = WsClient::from_socket(socket);
    client
        .send_text(
            json!({ "type": "auth", "id": 1, "data": { "access_token": "wrong" } }).to_string(),
        )
        .await;
    let answer = client.next_frame().await.unwrap();
    assert_eq!(
        (answer["id"].clone(), answer["errcode"].clone()),
        (json!(1), json!("M_UNKNOWN_TOKEN"))
    );
    assert_eq!(client.closed().await, Some(CloseCode::from(4401)));
    // Another request before auth is refused the same way.
    let (socket, _) = tokio_tungstenite::connect_async(request.clone())
        .await
        .unwrap();
    let mut client = WsClient::from_socket(socket);
    client
        .send_text(json!({ "type": "ping", "id": 1 }).to_string())
        .await;
    assert_eq!(
        client.next_frame().await.unwrap()["errcode"],
        "M_MISSING_TOKEN"
    );
    // The right token: answered, then ready.
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut client = WsClient::from_socket(socket);
    client
        .send_text(
            json!({ "type": "auth", "id": "a", "data": { "access_token": alice } }).to_string(),
        )
        .await;
    let answer = client.next_frame().await.unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["data"]["user_id"], "@alice:localhost");
    assert_eq!(client.next_frame().await.unwrap()["type"], "ready");
    client.ok("ping", json!({})).await;

    // Logging out ends the connection at its next wake-up.
    let (status, _) = server
        .post("/_matrix/client/v3/logout", Some(&alice), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    client
        .send_text(json!({ "type": "sync", "id": 2 }).to_string())
        .await;
    assert_eq!(client.closed().await, Some(CloseCode::from(4401)));
}

#[tokio::test]
async fn a_reconnecting_device_gets_everything_after_its_ack_exactly_once() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "invite": ["@bob:localhost"] }))
        .await;
    join(&server, &bob, &room_id).await;
    let (mut b, _) = WsClient::connect(&server, &bob).await;
    for n in 0..5 {
        send_text(
            &server,
            &alice,
            &room_id,
            &format!("a{n}"),
            &format!("m{n}"),
        )
        .await;
    }
    // Bob reads the five, acknowledges them, and reads two more without
    // acknowledging them.
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let frame = b.event_of("m.room.message").await;
        seen.push(body_of(&frame).to_owned());
    }
    let synced = b.push_where(|f| f["type"] == "synced").await;
    b.ok("ack_message", json!({ "pos": synced["pos"] })).await;
    for n in 5..7 {
        send_text(
            &server,
            &alice,
            &room_id,
            &format!("a{n}"),
            &format!("m{n}"),
        )
        .await;
    }
    for _ in 5..7 {
        let frame = b.event_of("m.room.message").await;
        seen.push(body_of(&frame).to_owned());
    }
    drop(b);
    // Sent while Bob is away.
    for n in 7..12 {
        send_text(
            &server,
            &alice,
            &room_id,
            &format!("a{n}"),
            &format!("m{n}"),
        )
        .await;
    }
    let (mut b, ready) = WsClient::connect(&server, &bob).await;
    assert_eq!(ready["data"]["resumed"], true);
    // The stream position acknowledged (typing notices are not stored).
    let stream_part = |pos: &Value| pos.as_str().unwrap().split('_').next().unwrap().to_owned();
    assert_eq!(stream_part(&ready["pos"]), stream_part(&synced["pos"]));
    let mut again = Vec::new();
    loop {
        let frame = b
            .push_where(|f| f["type"] == "event" || f["type"] == "synced")
            .await;
        if frame["type"] == "synced" {
            break;
        }
        if frame["data"]["event"]["type"] == "m.room.message" {
            again.push(body_of(&frame).to_owned());
        }
    }
    let expected: Vec<String> = (5..12).map(|n| format!("m{n}")).collect();
    assert_eq!(again, expected, "everything after the ack, once, in order");
    assert_eq!(&seen[..5], &["m0", "m1", "m2", "m3", "m4"]);

    // One session per device: a second connection ends the first.
    let (mut newer, _) = WsClient::connect(&server, &bob).await;
    assert_eq!(b.closed().await, Some(CloseCode::from(4000)));
    newer.ok("ping", json!({})).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_resumes() {
    let send_timeout_ms = 300;
    let server = TestServer::start_with(|c| c.websocket.send_timeout_ms = send_timeout_ms).await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "invite": ["@bob:localhost"] }))
        .await;
    join(&server, &bob, &room_id).await;
    // Bob's socket has a small receive buffer, and Bob stops reading
    // after acknowledging where he stands.
    let (mut b, ready) = connect_small(&server, &bob).await;
    b.ok("ack_message", json!({ "pos": ready["pos"] })).await;
    let filler = "x".repeat(40_000);
    let total = 200;
    for n in 0..total {
        let body = format!("{n} {filler}");
        send_text(&server, &alice, &room_id, &format!("t{n}"), &body).await;
    }
    // He still reads nothing for a while: the sends can end before the
    // server's pushes have filled the socket's buffers and then waited
    // out the send timeout, and reading at once would unblock them.
    tokio::time::sleep(Duration::from_millis(send_timeout_ms * 7)).await;
    // The server gave up on him: his stream ends before all of it came.
    let mut received = 0;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match b.socket.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame["data"]["event"]["type"] == "m.room.message" {
                        received += 1;
                    }
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => {
                    return frame.map(|f| f.code);
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return None,
            }
        }
    })
    .await
    .expect("the connection ends");
    assert!(
        received < total,
        "{received} of {total} arrived: never cut off"
    );
    if let Some(code) = ended {
        assert_eq!(code, CloseCode::from(4429));
    }
    // Back, reading: every message after his ack, once, in order.
    let (mut b, ready) = WsClient::connect(&server, &bob).await;
    assert_eq!(ready["data"]["resumed"], true);
    let mut bodies = Vec::new();
    while bodies.len() < total {
        let frame = b.event_of("m.room.message").await;
        bodies.push(body_of(&frame).split(' ').next().unwrap().to_owned());
    }
    let expected: Vec<String> = (0..total).map(|n| n.to_string()).collect();
    assert_eq!(bodies, expected);
}

/// Connects over a socket with a 4 KiB receive buffer.
async fn connect_small(server: &TestServer, token: &str) -> (WsClient, Value) {
    let addr = server.server.as_ref().unwrap().addr;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut request = ws_url(server).into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (socket, _) =
        tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    let mut client = WsClient::from_socket(socket);
    let ready = client.next_frame().await.unwrap();
    assert_eq!(ready["type"], "ready");
    (client, ready)
}

#[tokio::test]
async fn requests_past_the_in_flight_limit_are_refused() {
    let server = TestServer::start_with(|c| c.websocket.max_requests_in_flight = 1).await;
    let alice = token(&server.register("alice").await);
    let room_id = server.create_room(&alice, json!({})).await;
    let (mut a, _) = WsClient::connect(&server, &alice).await;
    let count = 30;
    for n in 0..count {
        let frame = json!({
            "type": "send_message", "id": n,
            "data": { "chat_id": room_id, "txn_id": format!("f{n}"), "text": format!("{n}") },
        });
        a.send_text(frame.to_string()).await;
    }
    // Answers come as requests finish: refusals at once, the rest in turn.
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < count {
        let frame = a.next_frame().await.expect("an answer");
        if frame.get("ok").is_some() {
            let id = frame["id"].as_u64().expect("a request's id");
            assert!(
                answers.insert(id, frame).is_none(),
                "one answer per request"
            );
        }
    }
    let mut limited = 0;
    let mut sent = 0;
    for answer in answers.values() {
        if answer["ok"] == true {
            assert!(answer["data"]["event_id"].is_string());
            sent += 1;
        } else {
            assert_eq!(answer["errcode"], "M_LIMIT_EXCEEDED", "{answer}");
            limited += 1;
        }
    }
    assert!(limited > 0 && sent > 0, "{sent} sent, {limited} limited");
    // Exactly the accepted ones are in the room.
    assert_eq!(messages_in(&server, &alice, &room_id).await, sent);
}

/// How many `m.room.message` events the room has (up to 100).
async fn messages_in(server: &TestServer, token: &str, room_id: &str) -> usize {
    let (_, messages) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=100"),
            Some(token),
        )
        .await;
    messages["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .count()
}

#[tokio::test]
async fn an_idle_connection_is_pinged_and_closed_when_silent() {
    let server = TestServer::start_with(|c| {
        c.websocket.ping_interval_ms = 100;
        c.websocket.idle_timeout_ms = 400;
    })
    .await;
    let alice = token(&server.register("alice").await);
    // tungstenite answers pings only while it is read; this client reads
    // (and so pongs) for a second, then stops.
    let (mut a, _) = WsClient::connect(&server, &alice).await;
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < until {
        if let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_millis(200), a.socket.next()).await
        {
            if message.is_ping() {
                pings += 1;
            }
        }
    }
    assert!(pings >= 3, "{pings} pings");
    // Still open after more than the idle timeout, thanks to the pongs.
    a.ok("ping", json!({})).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Silent since then: closed as idle.
    assert_eq!(a.closed().await, Some(CloseCode::from(4408)));
}

#[tokio::test]
async fn stopping_the_server_closes_its_connections() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let (mut a, _) = WsClient::connect(&server, &alice).await;
    let stopping = tokio::spawn(async move { server.stop().await });
    assert_eq!(a.closed().await, Some(CloseCode::Away));
    let dir = tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the server stops")
        .unwrap();
    // The database closed: it opens again.
    let config = common::test_config(&dir);
    let again = TestServer::start_in(dir, config, None).await;
    again.stop().await;
}

#[tokio::test]
async fn rooms_joined_while_connected_are_pushed_from_their_first_message() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let (mut b, _) = WsClient::connect(&server, &bob).await;
    for round in 0..3 {
        let room_id = server
            .create_room(&alice, json!({ "invite": ["@bob:localhost"] }))
            .await;
        b.push_where(|f| f["type"] == "invite" && f["data"]["room_id"] == room_id.as_str())
            .await;
        // The messages go out as soon as Bob's join is answered, while his
        // connection may still be taking in the join.
        join(&server, &bob, &room_id).await;
        for n in 0..5 {
            let body = json!({ "msgtype": "m.text", "body": format!("{round}-{n}") });
            common::send_message(&server, &alice, &room_id, &format!("t{round}-{n}"), body).await;
        }
        let mut bodies = Vec::new();
        while bodies.len() < 5 {
            let frame = b
                .push_where(|f| {
                    f["type"] == "event"
                        && f["data"]["room_id"] == room_id.as_str()
                        && f["data"]["event"]["type"] == "m.room.message"
                })
                .await;
            bodies.push(body_of(&frame).to_owned());
        }
        let wanted: Vec<String> = (0..5).map(|n| format!("{round}-{n}")).collect();
        assert_eq!(
            bodies, wanted,
            "every message of room {round}, once, in order"
        );
    }
}

#[tokio::test]
async fn another_device_logging_out_leaves_the_connection_open() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let bob_phone = token(&server.login("bob", Some("PHONE")).await);
    let room_id = server
        .create_room(&alice, json!({ "invite": ["@bob:localhost"] }))
        .await;
    join(&server, &bob, &room_id).await;
    let (mut b, _) = WsClient::connect(&server, &bob).await;
    let (status, _) = server
        .post("/_matrix/client/v3/logout", Some(&bob_phone), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    // Bob's other token was removed; his own still stands, and the next
    // message reaches this connection.
    let body = json!({ "msgtype": "m.text", "body": "after the logout" });
    common::send_message(&server, &alice, &room_id, "t1", body).await;
    let frame = b
        .push_where(|f| f["type"] == "event" && f["data"]["event"]["type"] == "m.room.message")
        .await;
    assert_eq!(body_of(&frame), "after the logout");
    b.ok("ping", json!({})).await;
}

#[tokio::test]
async fn a_room_left_while_connected_is_pushed_as_left_and_then_silent() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let invite = json!({ "invite": ["@bob:localhost"] });
    let left_room = server.create_room(&alice, invite.clone()).await;
    let kept_room = server.create_room(&alice, invite).await;
    join(&server, &bob, &left_room).await;
    join(&server, &bob, &kept_room).await;
    let (mut b, _) = WsClient::connect(&server, &bob).await;
    send_text(&server, &alice, &left_room, "t1", "before the leave").await;
    assert_eq!(
        body_of(&b.event_of("m.room.message").await),
        "before the leave"
    );
    // The connection keeps Bob's memberships from push to push; his leave
    // must still move the room out of what he is pushed.
    let path = format!("/_matrix/client/v3/rooms/{left_room}/leave");
    let (status, answer) = server.post(&path, Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let leave = b
        .push_where(|f| {
            f["type"] == "event"
                && f["data"]["event"]["type"] == "m.room.member"
                && f["data"]["event"]["content"]["membership"] == "leave"
        })
        .await;
    assert_eq!(leave["data"]["room_id"], left_room.as_str());
    send_text(&server, &alice, &left_room, "t2", "after the leave").await;
    send_text(&server, &alice, &kept_room, "t3", "in the other room").await;
    // Pushes come in stream order: a message of the left room, sent
    // first, would come before the other room's.
    let next = b.event_of("m.room.message").await;
    assert_eq!(body_of(&next), "in the other room");
    assert_eq!(next["data"]["room_id"], kept_room.as_str());
}
