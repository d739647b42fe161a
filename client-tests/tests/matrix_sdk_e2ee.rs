//! Real end-to-end encryption through Myelin with matrix-rust-sdk (crates.io,
//! with its Olm/Megolm machine): Alice sends into an encrypted room, Bob
//! decrypts; Bob's second device decrypts the same message from the
//! server-side key backup after recovery; cross-signing is bootstrapped.
//! The server only ever stores the ciphertext.

use std::time::Duration;

use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoomRequest;
use matrix_sdk::ruma::events::room::message::{
    OriginalSyncRoomMessageEvent, RoomMessageEventContent,
};
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use matrix_sdk::Client;
use myelin_client_tests::{Homeserver, PASSWORD};
use serde_json::{json, Value};

const PATIENCE: Duration = Duration::from_secs(60);
const QUICK_SYNC: Duration = Duration::from_millis(200);

async fn register(base: &str, username: &str) {
    let url = format!("{base}/_matrix/client/v3/register");
    let body = json!({
        "username": username,
        "password": PASSWORD,
        "auth": { "type": "m.login.dummy" },
    });
    let answer = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
}

async fn client(base: &str, username: &str, device_id: &str) -> Client {
    let client = Client::builder()
        .homeserver_url(base)
        .build()
        .await
        .expect("client");
    client
        .matrix_auth()
        .login_username(username, PASSWORD)
        .device_id(device_id)
        .send()
        .await
        .expect("login");
    client
}

async fn sync(client: &Client) {
    client
        .sync_once(SyncSettings::default().timeout(QUICK_SYNC))
        .await
        .expect("sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_message_is_decrypted_by_the_recipient_and_its_second_device() {
    let server = Homeserver::start().await;
    let base = server.url.clone();
    register(&base, "alice").await;
    register(&base, "bob").await;
    let alice = client(&base, "alice", "ALICE1").await;
    let bob = client(&base, "bob", "BOB1").await;
    sync(&alice).await;
    sync(&bob).await;

    // Cross-signing: the first bootstrap needs no interactive auth.
    alice
        .encryption()
        .bootstrap_cross_signing(None)
        .await
        .expect("cross-signing bootstrapped");
    let status = alice
        .encryption()
        .cross_signing_status()
        .await
        .expect("status");
    assert!(status.has_master && status.has_self_signing && status.has_user_signing);
    // The bootstrap signed the device with the self-signing key, and the
    // server checked and kept that signature.
    let query: Value = reqwest::Client::new()
        .post(format!("{base}/_matrix/client/v3/keys/query"))
        .bearer_auth(alice.access_token().unwrap())
        .json(&json!({ "device_keys": { "@alice:localhost": ["ALICE1"] } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let self_signing = query["self_signing_keys"]["@alice:localhost"]["keys"]
        .as_object()
        .expect("self-signing key published")
        .keys()
        .next()
        .unwrap()
        .clone();
    let device_signatures = &query["device_keys"]["@alice:localhost"]["ALICE1"]["signatures"];
    assert!(
        device_signatures["@alice:localhost"][&self_signing].is_string(),
        "{query}"
    );

    // An encrypted room with both in it.
    let room = alice
        .create_room(CreateRoomRequest::new())
        .await
        .expect("room created");
    room.enable_encryption().await.expect("encryption enabled");
    let bob_id = OwnedUserId::try_from("@bob:localhost").unwrap();
    room.invite_user_by_id(&bob_id).await.expect("invited");
    let room_id: OwnedRoomId = room.room_id().to_owned();
    sync(&bob).await;
    bob.get_room(&room_id)
        .expect("invite seen")
        .join()
        .await
        .expect("joined");
    sync(&alice).await;

    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
    bob.add_event_handler(move |event: OriginalSyncRoomMessageEvent| {
        let sender = sender.clone();
        async move {
            let _ = sender.send((event.event_id.clone(), event.content.body().to_owned()));
        }
    });
    let room = alice.get_room(&room_id).expect("room");
    assert!(room.latest_encryption_state().await.unwrap().is_encrypted());
    let sent = room
        .send(RoomMessageEventContent::text_plain("the secret plan"))
        .await
        .expect("sent encrypted");
    let event_id: OwnedEventId = sent.response.event_id;

    let body = tokio::time::timeout(PATIENCE, async {
        loop {
            sync(&bob).await;
            if let Ok((id, body)) = received.try_recv() {
                if id == event_id {
                    return body;
                }
            }
        }
    })
    .await
    .expect("Bob decrypted the message");
    assert_eq!(body, "the secret plan");

    // What the server stored is ciphertext.
    let url = format!("{base}/_matrix/client/v3/rooms/{room_id}/event/{event_id}");
    let token = alice.access_token().unwrap();
    let stored: Value = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["type"], "m.room.encrypted");
    assert!(!stored.to_string().contains("secret plan"));

    // Bob turns on recovery (key backup and secret storage) on his first
    // device; his second device recovers with the key and reads the
    // message from the backup.
    let recovery_key = bob
        .encryption()
        .recovery()
        .enable()
        .await
        .expect("recovery on");
    bob.encryption()
        .backups()
        .wait_for_steady_state()
        .await
        .expect("keys backed up");
    let bob2 = client(&base, "bob", "BOB2").await;
    sync(&bob2).await;
    bob2.encryption()
        .recovery()
        .recover(&recovery_key)
        .await
        .expect("recovered");
    bob2.encryption()
        .backups()
        .download_room_keys_for_room(&room_id)
        .await
        .expect("keys downloaded");
    let event = bob2
        .get_room(&room_id)
        .expect("room on the second device")
        .event(&event_id, None)
        .await
        .expect("event");
    assert!(
        event.encryption_info().is_some(),
        "decrypted from the backup"
    );
    let decrypted: Value = event.raw().deserialize_as().unwrap();
    assert_eq!(decrypted["content"]["body"], "the secret plan");
}
