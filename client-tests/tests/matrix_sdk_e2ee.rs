//! Real end-to-end encryption through Myelin with matrix-rust-sdk (crates.io,
//! with its Olm/Megolm machine): Alice sends into an encrypted room, Bob
//! decrypts; Bob's second device decrypts the same message from the
//! server-side key backup after recovery; cross-signing is bootstrapped.
//! The server only ever stores the ciphertext.
//!
//! Across servers, with Synapse (PyPI `matrix-synapse`, provisioned by the
//! test) federating with Myelin: a Myelin user and a Synapse user chat in
//! an encrypted room and decrypt each other; the Synapse user's new device
//! reaches the Myelin user's client and decrypts what follows; to-device
//! messages cross once each way; images cross both ways byte for byte.

use std::time::Duration;

use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoomRequest;
use matrix_sdk::ruma::events::room::message::{
    OriginalSyncRoomMessageEvent, RoomMessageEventContent,
};
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use matrix_sdk::Client;
use matrix_sdk::RoomState;
use myelin_client_tests::{Homeserver, PASSWORD};
use myelin_testkit::ca::TestCa;
use myelin_testkit::synapse::{Synapse, SynapseSetup};
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

/// Registers on Synapse through the dummy stage of its interactive auth.
async fn register_on_synapse(base: &str, username: &str) {
    let http = reqwest::Client::new();
    let url = format!("{base}/_matrix/client/v3/register");
    let body = json!({ "username": username, "password": PASSWORD });
    let first: Value = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = first["session"].as_str().expect("a UIA session");
    let mut body = body;
    body["auth"] = json!({ "type": "m.login.dummy", "session": session });
    let answer = http.post(&url).json(&body).send().await.unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
}

/// Collects the IDs and bodies of the messages `client` decrypts (or
/// reads in the clear).
fn messages_of(client: &Client) -> tokio::sync::mpsc::UnboundedReceiver<(OwnedEventId, String)> {
    let (sender, received) = tokio::sync::mpsc::unbounded_channel();
    client.add_event_handler(move |event: OriginalSyncRoomMessageEvent| {
        let sender = sender.clone();
        async move {
            let _ = sender.send((event.event_id.clone(), event.content.body().to_owned()));
        }
    });
    received
}

/// Syncs `client` until it has received `event_id`; its body.
async fn body_of(
    client: &Client,
    received: &mut tokio::sync::mpsc::UnboundedReceiver<(OwnedEventId, String)>,
    event_id: &OwnedEventId,
    synapse: &Synapse,
) -> String {
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            sync(client).await;
            while let Ok((id, body)) = received.try_recv() {
                if &id == event_id {
                    return body;
                }
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{event_id} never decrypted\n{}", synapse.log_tail(40)))
}

/// Syncs until `done` holds, for at most [`PATIENCE`].
async fn sync_until(client: &Client, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let reached = tokio::time::timeout(PATIENCE, async {
        loop {
            sync(client).await;
            if done().await {
                return;
            }
            tokio::time::sleep(QUICK_SYNC).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "timed out waiting for {what}");
}

/// A device signed in without a client library: its access token.
async fn raw_login(base: &str, username: &str, device_id: &str) -> String {
    let body = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": username },
        "password": PASSWORD,
        "device_id": device_id,
    });
    let answer: Value = reqwest::Client::new()
        .post(format!("{base}/_matrix/client/v3/login"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["access_token"]
        .as_str()
        .expect("logged in")
        .to_owned()
}

/// The to-device events of a device's syncs until `wanted` of them came,
/// then of two more syncs, so that a repeat would show.
async fn to_device_events(base: &str, token: &str, wanted: usize) -> Vec<Value> {
    let http = reqwest::Client::new();
    let mut since: Option<String> = None;
    let mut events = Vec::new();
    let mut after = 0;
    for _ in 0..60 {
        let url = match &since {
            Some(since) => format!("{base}/_matrix/client/v3/sync?timeout=1000&since={since}"),
            None => format!("{base}/_matrix/client/v3/sync?timeout=0"),
        };
        let sync: Value = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        events.extend(
            sync["to_device"]["events"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
        since = sync["next_batch"].as_str().map(str::to_owned);
        if events.len() >= wanted {
            after += 1;
            if after > 2 {
                break;
            }
        }
    }
    events
}

/// Sends one to-device message through the client API.
async fn send_to_device(base: &str, token: &str, user_id: &str, device_id: &str, txn: &str) {
    let body = json!({ "messages": { user_id: { device_id: { "note": txn } } } });
    let answer = reqwest::Client::new()
        .put(format!(
            "{base}/_matrix/client/v3/sendToDevice/org.example.note/{txn}"
        ))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
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

/// Uploads `image` to the server at `base`; its `mxc://` URI without the
/// scheme (`server/mediaId`).
async fn upload(base: &str, token: &str, image: &[u8]) -> String {
    let answer: Value = reqwest::Client::new()
        .post(format!("{base}/_matrix/media/v3/upload?filename=photo.png"))
        .bearer_auth(token)
        .header("Content-Type", "image/png")
        .body(image.to_vec())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uri = answer["content_uri"].as_str().expect("uploaded");
    uri.strip_prefix("mxc://").unwrap().to_owned()
}

/// `GET` of an authenticated media path: the status, content type and
/// bytes.
async fn media(base: &str, token: &str, path: &str) -> (u16, String, Vec<u8>) {
    let response = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, kind, response.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_chat_between_myelin_and_synapse() {
    let ca = TestCa::new();
    let myelin = Homeserver::start_federating(&ca, "127.0.0.2".parse().unwrap()).await;
    let setup = SynapseSetup::on("127.0.0.4".parse().unwrap(), &ca);
    let synapse_dir = tempfile::tempdir().unwrap();
    let path = synapse_dir.path().to_owned();
    let synapse = tokio::task::spawn_blocking(move || Synapse::start(&path, &setup))
        .await
        .unwrap()
        .unwrap_or_else(|error| panic!("{error}"));
    let myelin_name = myelin.server.services.config.server_name.clone();
    register(&myelin.url, "alice").await;
    register_on_synapse(&synapse.client_base, "sam").await;
    let alice = client(&myelin.url, "alice", "ALICE1").await;
    let sam = client(&synapse.client_base, "sam", "SAM1").await;
    sync(&alice).await;
    sync(&sam).await;
    let alice_id = format!("@alice:{myelin_name}");
    let sam_id = OwnedUserId::try_from(format!("@sam:{}", synapse.server_name)).unwrap();

    // Alice's encrypted room on Myelin; Sam joins it from Synapse.
    let room = alice
        .create_room(CreateRoomRequest::new())
        .await
        .expect("room created");
    room.enable_encryption().await.expect("encryption enabled");
    room.invite_user_by_id(&sam_id).await.expect("invited");
    let room_id: OwnedRoomId = room.room_id().to_owned();
    sync_until(&sam, "Sam's invite", async || {
        sam.get_room(&room_id)
            .is_some_and(|room| room.state() == RoomState::Invited)
    })
    .await;
    sam.get_room(&room_id)
        .unwrap()
        .join()
        .await
        .unwrap_or_else(|error| panic!("joined: {error}\n{}", synapse.log_tail(40)));
    sync_until(&alice, "Sam's join on Myelin", async || {
        room.joined_members_count() == 2
    })
    .await;

    // Each decrypts the other.
    let mut alice_got = messages_of(&alice);
    let mut sam_got = messages_of(&sam);
    let sent = room
        .send(RoomMessageEventContent::text_plain("from Myelin"))
        .await
        .expect("sent");
    let body = body_of(&sam, &mut sam_got, &sent.response.event_id, &synapse).await;
    assert_eq!(body, "from Myelin");
    let sam_room = sam.get_room(&room_id).unwrap();
    assert!(sam_room
        .latest_encryption_state()
        .await
        .unwrap()
        .is_encrypted());
    let sent = sam_room
        .send(RoomMessageEventContent::text_plain("from Synapse"))
        .await
        .expect("sent");
    let body = body_of(&alice, &mut alice_got, &sent.response.event_id, &synapse).await;
    assert_eq!(body, "from Synapse");

    // Sam signs in on a second device: Alice's client learns of it, and
    // the device decrypts Alice's next message.
    let sam2 = client(&synapse.client_base, "sam", "SAM2").await;
    let mut sam2_got = messages_of(&sam2);
    sync(&sam2).await;
    sync_until(
        &alice,
        "Sam's second device in Alice's client",
        async || {
            let devices = alice.encryption().get_user_devices(&sam_id).await.unwrap();
            let found = devices.devices().any(|device| device.device_id() == "SAM2");
            found
        },
    )
    .await;
    let sent = room
        .send(RoomMessageEventContent::text_plain(
            "to both of Sam's devices",
        ))
        .await
        .expect("sent");
    let body = body_of(&sam2, &mut sam2_got, &sent.response.event_id, &synapse).await;
    assert_eq!(body, "to both of Sam's devices");

    // To-device messages cross once each way.
    let alice_raw = raw_login(&myelin.url, "alice", "ALICERAW").await;
    let sam_raw = raw_login(&synapse.client_base, "sam", "SAMRAW").await;
    send_to_device(
        &myelin.url,
        &alice_raw,
        sam_id.as_str(),
        "SAMRAW",
        "to-synapse",
    )
    .await;
    send_to_device(
        &synapse.client_base,
        &sam_raw,
        &alice_id,
        "ALICERAW",
        "to-myelin",
    )
    .await;
    for (base, token, note, sender) in [
        (
            &synapse.client_base,
            &sam_raw,
            "to-synapse",
            alice_id.as_str(),
        ),
        (&myelin.url, &alice_raw, "to-myelin", sam_id.as_str()),
    ] {
        let events = to_device_events(base, token, 1).await;
        let notes: Vec<&Value> = events
            .iter()
            .filter(|event| event["type"] == "org.example.note")
            .collect();
        assert_eq!(notes.len(), 1, "{events:?}\n{}", synapse.log_tail(40));
        assert_eq!(notes[0]["content"]["note"], note);
        assert_eq!(notes[0]["sender"], sender);
    }

    // An image uploaded on Synapse is read through Myelin byte for byte,
    // its thumbnail too; and the reverse.
    let alice_token = alice.access_token().unwrap();
    let sam_token = sam.access_token().unwrap();
    let image = png(640, 480);
    let on_synapse = upload(&synapse.client_base, &sam_token, &image).await;
    let on_myelin = upload(&myelin.url, &alice_token, &image).await;
    for (room, uri) in [(&sam_room, &on_synapse), (&room, &on_myelin)] {
        let content =
            json!({ "msgtype": "m.image", "body": "photo.png", "url": format!("mxc://{uri}") });
        room.send_raw("m.room.message", content)
            .await
            .expect("image sent");
    }
    let download = |uri: &str| format!("/_matrix/client/v1/media/download/{uri}");
    let thumbnail = |uri: &str| {
        format!("/_matrix/client/v1/media/thumbnail/{uri}?width=64&height=64&method=scale")
    };
    for (home, home_token, other, other_token, uri) in [
        (
            &synapse.client_base,
            &sam_token,
            &myelin.url,
            &alice_token,
            &on_synapse,
        ),
        (
            &myelin.url,
            &alice_token,
            &synapse.client_base,
            &sam_token,
            &on_myelin,
        ),
    ] {
        let (status, kind, bytes) = media(other, other_token, &download(uri)).await;
        assert_eq!(status, 200, "{uri}: {}", synapse.log_tail(30));
        assert_eq!(kind, "image/png");
        assert!(bytes == image, "{uri} arrived changed");
        let (status, kind, at_home) = media(home, home_token, &thumbnail(uri)).await;
        assert_eq!(status, 200, "{uri}");
        let (status, other_kind, across) = media(other, other_token, &thumbnail(uri)).await;
        assert_eq!(status, 200, "{uri}: {}", synapse.log_tail(30));
        assert!(other_kind.starts_with("image/"), "{other_kind}");
        if uri == &on_synapse {
            // Myelin serves the thumbnail Synapse made.
            assert_eq!(other_kind, kind);
            assert!(across == at_home, "the thumbnail of {uri} arrived changed");
        }
    }
}
