//! matrix-rust-sdk (crates.io) against Myelin: it discovers simplified
//! sliding sync from `/versions`, logs in, lists the user's rooms through
//! matrix-sdk-ui's `SyncService` (the room list Element X uses), and
//! receives a live message.

use std::time::Duration;

use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::events::room::message::OriginalSyncRoomMessageEvent;
use matrix_sdk::ruma::OwnedRoomId;
use matrix_sdk::sliding_sync::VersionBuilder;
use matrix_sdk::Client;
use matrix_sdk_ui::sync_service::SyncService;
use myelin_client_tests::{Homeserver, PASSWORD};
use serde_json::{json, Value};

/// Long enough for a loaded machine; a healthy run takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(60);

/// Registers through the open (`m.login.dummy`) flow; returns the token.
async fn register(http: &reqwest::Client, base: &str, username: &str) -> String {
    let url = format!("{base}/_matrix/client/v3/register");
    let body = json!({ "username": username, "password": PASSWORD });
    let challenge: Value = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut body = body;
    body["auth"] = json!({ "type": "m.login.dummy", "session": challenge["session"] });
    let answer: Value = http
        .post(&url)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn element_x_room_list_lists_rooms_and_receives_a_live_message() {
    let server = Homeserver::start().await;
    let base = server.url.clone();
    let http = reqwest::Client::new();
    let alice = register(&http, &base, "alice").await;
    register(&http, &base, "bob").await;

    // Alice makes two rooms with Bob in them; Bob joins one, is invited to
    // the other.
    let create = format!("{base}/_matrix/client/v3/createRoom");
    let joined = post(
        &http,
        create.clone(),
        &alice,
        json!({
            "name": "Chat", "preset": "public_chat",
        }),
    )
    .await["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let invited = post(
        &http,
        create,
        &alice,
        json!({
            "name": "Invitation", "invite": ["@bob:localhost"],
        }),
    )
    .await["room_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let client = Client::builder()
        .homeserver_url(&base)
        .sliding_sync_version_builder(VersionBuilder::DiscoverNative)
        .build()
        .await
        .expect("client built, sliding sync discovered");
    client
        .matrix_auth()
        .login_username("bob", PASSWORD)
        .initial_device_display_name("sdk test")
        .send()
        .await
        .expect("login");
    client
        .join_room_by_id(&OwnedRoomId::try_from(joined.as_str()).unwrap())
        .await
        .expect("join");

    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
    client.add_event_handler(move |event: OriginalSyncRoomMessageEvent| {
        let sender = sender.clone();
        async move {
            let _ = sender.send(event.content.body().to_owned());
        }
    });
    let sync_service = SyncService::builder(client.clone())
        .build()
        .await
        .expect("sync service");
    sync_service.start().await;
    let room_list = sync_service.room_list_service();
    room_list.all_rooms().await.expect("the all-rooms list");

    // Both rooms show up in the room list, with their names.
    let listed = tokio::time::timeout(PATIENCE, async {
        loop {
            let joined_room = client.get_room(&OwnedRoomId::try_from(joined.as_str()).unwrap());
            let invited_room = client.get_room(&OwnedRoomId::try_from(invited.as_str()).unwrap());
            if let (Some(a), Some(b)) = (joined_room, invited_room) {
                if a.name().as_deref() == Some("Chat")
                    && b.state() == matrix_sdk::RoomState::Invited
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(listed.is_ok(), "the room list never showed both rooms");

    // A message Alice sends now arrives live.
    let send = format!("{base}/_matrix/client/v3/rooms/{joined}/send/m.room.message/live1");
    let answer = http
        .put(send)
        .bearer_auth(&alice)
        .json(&json!({ "msgtype": "m.text", "body": "hello, live" }))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());
    let body = tokio::time::timeout(PATIENCE, async {
        loop {
            let body = received.recv().await.expect("handler alive");
            if body == "hello, live" {
                return body;
            }
        }
    })
    .await
    .expect("the live message arrived");
    assert_eq!(body, "hello, live");
    sync_service.stop().await;

    // The classic sync loop of the same SDK gets the same room too.
    let response = client
        .sync_once(SyncSettings::default().timeout(Duration::from_secs(0)))
        .await
        .expect("a /sync v3 round");
    assert!(response.rooms.joined.contains_key(joined.as_str()));
}
