//! matrix-rust-sdk (crates.io) registers a pusher for its device; the push
//! gateway (a minimal one on loopback, speaking the push gateway API) is
//! sent each notifying message; the SDK reads the room's counts, which its
//! read receipt resets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::push::{PusherIds, PusherInit, PusherKind};
use matrix_sdk::ruma::api::client::receipt::create_receipt::v3::ReceiptType;
use matrix_sdk::ruma::events::receipt::ReceiptThread;
use matrix_sdk::ruma::push::HttpPusherData;
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId};
use matrix_sdk::Client;
use myelin_client_tests::{Homeserver, PASSWORD};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A push gateway: every request body it was sent, answered `200` with
/// no rejected pushkey. HTTP/1.1 with keep-alive, just enough for it.
async fn gateway() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/_matrix/push/v1/notify",
        listener.local_addr().unwrap()
    );
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let kept = received.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut length = 0;
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        reader.read_line(&mut line).await.unwrap();
                        let header = line.trim_end().to_ascii_lowercase();
                        if header.is_empty() {
                            break;
                        }
                        if let Some(value) = header.strip_prefix("content-length:") {
                            length = value.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).await.unwrap();
                    kept.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    let answer = "{\"rejected\":[]}";
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    reader
                        .get_mut()
                        .write_all(response.as_bytes())
                        .await
                        .unwrap();
                }
            });
        }
    });
    (url, received)
}

async fn register(http: &reqwest::Client, base: &str, username: &str) -> String {
    let body = json!({
        "username": username,
        "password": PASSWORD,
        "auth": { "type": "m.login.dummy" },
    });
    let answer: Value = http
        .post(format!("{base}/_matrix/client/v3/register"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["access_token"]
        .as_str()
        .expect("registered")
        .to_owned()
}

async fn post(http: &reqwest::Client, url: String, token: &str, body: Value) -> Value {
    let answer = http
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    answer.json().await.unwrap()
}

async fn send(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    room: &str,
    txn: &str,
    content: Value,
) -> OwnedEventId {
    let answer: Value = http
        .put(format!(
            "{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}"
        ))
        .bearer_auth(token)
        .json(&content)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    OwnedEventId::try_from(answer["event_id"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_registers_a_pusher_is_pushed_and_reads_its_counts() {
    let (url, received) = gateway().await;
    let server = Homeserver::start_with(|config| {
        config.push.ip_range_allowlist = vec!["127.0.0.0/8".to_owned()];
    })
    .await;
    let base = server.url.clone();
    let http = reqwest::Client::new();
    let alice = register(&http, &base, "alice").await;
    register(&http, &base, "bob").await;

    let bob = Client::builder()
        .homeserver_url(&base)
        .build()
        .await
        .unwrap();
    bob.matrix_auth()
        .login_username("bob", PASSWORD)
        .send()
        .await
        .expect("login");
    let pusher = PusherInit {
        ids: PusherIds::new("bob-phone".to_owned(), "org.example.sdk".to_owned()),
        kind: PusherKind::Http(HttpPusherData::new(url.clone())),
        app_display_name: "SDK test".to_owned(),
        device_display_name: "Bob's phone".to_owned(),
        profile_tag: None,
        lang: "en".to_owned(),
    };
    bob.pusher()
        .set(pusher.into(), false)
        .await
        .expect("pusher set");
    let listed: Value = http
        .get(format!("{base}/_matrix/client/v3/pushers"))
        .bearer_auth(bob.access_token().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["pushers"][0]["pushkey"], "bob-phone");

    let created = post(
        &http,
        format!("{base}/_matrix/client/v3/createRoom"),
        &alice,
        json!({ "preset": "public_chat", "name": "Pushed" }),
    )
    .await;
    let room_id = OwnedRoomId::try_from(created["room_id"].as_str().unwrap()).unwrap();
    bob.join_room_by_id(&room_id).await.expect("joined");
    let settings = SyncSettings::default().timeout(Duration::from_millis(0));
    bob.sync_once(settings.clone()).await.unwrap();

    let text = |body: &str| json!({ "msgtype": "m.text", "body": body });
    send(&http, &base, &alice, room_id.as_str(), "1", text("one")).await;
    send(&http, &base, &alice, room_id.as_str(), "2", text("two")).await;
    let mention = json!({ "msgtype": "m.text", "body": "Bob?", "m.mentions": { "user_ids": ["@bob:localhost"] } });
    let last = send(&http, &base, &alice, room_id.as_str(), "3", mention).await;

    // The gateway hears of each, in order.
    let mut pushed = Vec::new();
    for _ in 0..600 {
        pushed = received.lock().unwrap().clone();
        if pushed.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pushed.len(), 3, "{pushed:?}");
    assert_eq!(pushed[2]["notification"]["event_id"], last.as_str());
    assert_eq!(pushed[2]["notification"]["counts"]["unread"], 3);
    assert_eq!(
        pushed[2]["notification"]["devices"][0]["pushkey"],
        "bob-phone"
    );
    assert_eq!(
        pushed[2]["notification"]["devices"][0]["tweaks"]["highlight"],
        true
    );

    // The SDK reads the counts, and its receipt resets them.
    bob.sync_once(settings.clone()).await.unwrap();
    let room = bob.get_room(&room_id).expect("the room");
    let counts = room.unread_notification_counts();
    assert_eq!((counts.notification_count, counts.highlight_count), (3, 1));
    room.send_single_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, last)
        .await
        .expect("receipt");
    bob.sync_once(settings).await.unwrap();
    let counts = room.unread_notification_counts();
    assert_eq!((counts.notification_count, counts.highlight_count), (0, 0));
}
