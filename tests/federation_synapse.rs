//! Interoperability with Synapse (PyPI `matrix-synapse`, provisioned by
//! the test on first use): each server checks the other's key document and
//! `X-Matrix` signatures, over HTTPS with certificates of a CA the test
//! makes.

mod common;

use common::federation::{start_federating, TestCa};
use common::PASSWORD;
use myelin_testkit::synapse::{Synapse, SynapseSetup};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Starts Synapse on `ip` with a certificate of `ca`.
async fn start_synapse(ca: &TestCa, ip: &str) -> (Synapse, tempfile::TempDir) {
    let setup = SynapseSetup::on(ip.parse().unwrap(), ca);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let synapse = tokio::task::spawn_blocking(move || Synapse::start(&path, &setup))
        .await
        .unwrap()
        .unwrap_or_else(|error| panic!("{error}"));
    (synapse, dir)
}

/// Registers on Synapse through the dummy stage; returns the access token.
async fn register_on_synapse(http: &reqwest::Client, synapse: &Synapse, username: &str) -> String {
    let url = format!("{}/_matrix/client/v3/register", synapse.client_base);
    let post = |body: Value| {
        let request = http.post(&url).json(&body);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let first = post(json!({ "username": username, "password": PASSWORD })).await;
    let session = first["session"].as_str().expect("a UIA session").to_owned();
    let registered = post(json!({
        "username": username,
        "password": PASSWORD,
        "auth": { "type": "m.login.dummy", "session": session },
    }))
    .await;
    registered["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("registration failed: {registered}"))
        .to_owned()
}

#[tokio::test]
async fn myelin_and_synapse_read_each_others_profiles() {
    let ca = TestCa::new();
    let myelin = start_federating(&ca, "127.0.0.2", |_| {}).await;
    let (synapse, _dir) = start_synapse(&ca, "127.0.0.4").await;
    let http = reqwest::Client::new();

    let sam = register_on_synapse(&http, &synapse, "sam").await;
    let sam_id = format!("@sam:{}", synapse.server_name);
    let response = http
        .put(format!(
            "{}/_matrix/client/v3/profile/{sam_id}/displayname",
            synapse.client_base
        ))
        .bearer_auth(&sam)
        .json(&json!({ "displayname": "Sam of Synapse" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let (alice, alice_id) = myelin.register_named("alice", "Alice of Myelin").await;

    // Myelin signs; Synapse fetches Myelin's key and checks the signature.
    let (status, profile) = myelin
        .get(
            &format!("/_matrix/client/v3/profile/{sam_id}"),
            Some(&alice),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{profile}\n{}",
        synapse.log_tail(20)
    );
    assert_eq!(profile["displayname"], "Sam of Synapse");

    // Synapse signs; Myelin fetches Synapse's key and checks the signature.
    let response = http
        .get(format!(
            "{}/_matrix/client/v3/profile/{alice_id}",
            synapse.client_base
        ))
        .bearer_auth(&sam)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let profile: Value = response.json().await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "{profile}\n{}",
        synapse.log_tail(20)
    );
    assert_eq!(profile["displayname"], "Alice of Myelin");
}

/// A client of Synapse's client API as one user.
struct SynapseUser<'a> {
    http: &'a reqwest::Client,
    synapse: &'a Synapse,
    token: String,
}

impl SynapseUser<'_> {
    /// Syncs incrementally until `found` holds for one of the answers (a
    /// full sync without `since` is cached by Synapse for minutes).
    async fn sync_until(&self, what: &str, found: impl Fn(&Value) -> bool) {
        let mut since: Option<String> = None;
        for _ in 0..60 {
            let path = match &since {
                Some(since) => format!("/_matrix/client/v3/sync?timeout=1000&since={since}"),
                None => "/_matrix/client/v3/sync".to_owned(),
            };
            let (status, sync) = self.get(&path).await;
            assert_eq!(status, StatusCode::OK, "{sync}");
            if found(&sync) {
                return;
            }
            since = sync["next_batch"].as_str().map(str::to_owned);
        }
        panic!(
            "timed out waiting for {what}\n{}",
            self.synapse.log_tail(60)
        );
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.synapse.client_base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }
}

/// Polls `check` every 200 ms for up to 60 s.
async fn eventually<T, F, Fut>(what: &str, logs: &Synapse, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..300 {
        if let Some(found) = check().await {
            return found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}\n{}", logs.log_tail(40));
}

/// Whether a `/sync` answer has a message with `body` in the room's
/// timeline.
fn sync_has(sync: &Value, room_id: &str, body: &str) -> bool {
    sync["rooms"]["join"][room_id]["timeline"]["events"]
        .as_array()
        .is_some_and(|events| events.iter().any(|e| e["content"]["body"] == body))
}

/// The bodies of a room's messages on Myelin, oldest first.
async fn myelin_bodies(server: &common::TestServer, token: &str, room_id: &str) -> Vec<String> {
    let (_, page) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=100"),
            Some(token),
        )
        .await;
    let mut bodies: Vec<String> = page["chunk"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    bodies.reverse();
    bodies
}

#[tokio::test]
async fn myelin_and_synapse_share_rooms_both_ways() {
    let ca = TestCa::new();
    let myelin = start_federating(&ca, "127.0.0.2", |_| {}).await;
    let (synapse, _dir) = start_synapse(&ca, "127.0.0.4").await;
    let http = reqwest::Client::new();
    let sam = SynapseUser {
        http: &http,
        synapse: &synapse,
        token: register_on_synapse(&http, &synapse, "sam").await,
    };
    let sam_id = format!("@sam:{}", synapse.server_name);
    let (alice, alice_id) = myelin.register_named("alice", "Alice").await;

    // A Myelin user joins a Synapse room, by alias.
    let (status, room) = sam
        .post(
            "/_matrix/client/v3/createRoom",
            json!({ "preset": "public_chat", "room_alias_name": "lobby", "name": "Synapse lobby" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{room}");
    let synapse_room = room["room_id"].as_str().unwrap().to_owned();
    for (txn, body) in [("s0", "before you came"), ("s00", "and some more")] {
        let (status, _) = sam
            .call(
                reqwest::Method::PUT,
                &format!("/_matrix/client/v3/rooms/{synapse_room}/send/m.room.message/{txn}"),
                Some(json!({ "msgtype": "m.text", "body": body })),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let alias = format!("#lobby:{}", synapse.server_name);
    let (status, answer) = myelin
        .post(
            &format!("/_matrix/client/v3/join/{}", alias.replace('#', "%23")),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}\n{}", synapse.log_tail(40));
    assert_eq!(answer["room_id"], synapse_room.as_str());
    let (status, name) = myelin
        .get(
            &format!("/_matrix/client/v3/rooms/{synapse_room}/state/m.room.name"),
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{name}");
    assert_eq!(name["name"], "Synapse lobby");
    // History from before the join is fetched from Synapse (backfill) when
    // Alice pages back past her join.
    assert_eq!(
        myelin_bodies(&myelin, &alice, &synapse_room).await,
        ["before you came", "and some more"],
        "{}",
        synapse.log_tail(20)
    );

    // Messages both ways, each seen by the other side's sync.
    common::send_text(&myelin, &alice, &synapse_room, "m1", "hello Synapse").await;
    sam.sync_until("Alice's message in Sam's sync", |sync| {
        sync_has(sync, &synapse_room, "hello Synapse")
    })
    .await;
    let (status, _) = sam
        .call(
            reqwest::Method::PUT,
            &format!("/_matrix/client/v3/rooms/{synapse_room}/send/m.room.message/s1"),
            Some(json!({ "msgtype": "m.text", "body": "hello Myelin" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("Sam's message in Alice's sync", &synapse, || async {
        let (_, sync) = myelin.get("/_matrix/client/v3/sync", Some(&alice)).await;
        sync_has(&sync, &synapse_room, "hello Myelin").then_some(())
    })
    .await;

    // Alice leaves the Synapse room; Sam's server sees it.
    let (status, _) = myelin
        .post(
            &format!("/_matrix/client/v3/rooms/{synapse_room}/leave"),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("Alice's leave on Synapse", &synapse, || async {
        let (status, member) = sam
            .get(&format!(
                "/_matrix/client/v3/rooms/{synapse_room}/state/m.room.member/{alice_id}"
            ))
            .await;
        (status == StatusCode::OK && member["membership"] == "leave").then_some(())
    })
    .await;

    // A Myelin room: Alice invites Sam, Sam accepts, and they talk.
    let (status, room) = myelin
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            json!({ "preset": "private_chat", "name": "Myelin den", "invite": [] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{room}");
    let myelin_room = room["room_id"].as_str().unwrap().to_owned();
    let (status, answer) = myelin
        .post(
            &format!("/_matrix/client/v3/rooms/{myelin_room}/invite"),
            Some(&alice),
            json!({ "user_id": sam_id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}\n{}", synapse.log_tail(40));
    sam.sync_until("the invite in Sam's sync", |sync| {
        sync["rooms"]["invite"][&myelin_room]["invite_state"]["events"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["content"]["name"] == "Myelin den"))
    })
    .await;
    let (status, answer) = sam
        .post(
            &format!("/_matrix/client/v3/rooms/{myelin_room}/join"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}\n{}", synapse.log_tail(40));
    eventually("Sam's join on Myelin", &synapse, || async {
        let (status, member) = myelin
            .get(
                &format!("/_matrix/client/v3/rooms/{myelin_room}/state/m.room.member/{sam_id}"),
                Some(&alice),
            )
            .await;
        (status == StatusCode::OK && member["membership"] == "join").then_some(())
    })
    .await;
    common::send_text(&myelin, &alice, &myelin_room, "m2", "welcome to Myelin").await;
    sam.sync_until("Alice's message in Sam's sync", |sync| {
        sync_has(sync, &myelin_room, "welcome to Myelin")
    })
    .await;
    let (status, _) = sam
        .call(
            reqwest::Method::PUT,
            &format!("/_matrix/client/v3/rooms/{myelin_room}/send/m.room.message/s2"),
            Some(json!({ "msgtype": "m.text", "body": "thanks" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("Sam's message on Myelin", &synapse, || async {
        myelin_bodies(&myelin, &alice, &myelin_room)
            .await
            .contains(&"thanks".to_owned())
            .then_some(())
    })
    .await;

    // Typing and read receipts cross both ways.
    let (status, _) = sam
        .call(
            reqwest::Method::PUT,
            &format!("/_matrix/client/v3/rooms/{myelin_room}/typing/{sam_id}"),
            Some(json!({ "typing": true, "timeout": 20000 })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("Sam typing in Alice's sync", &synapse, || async {
        let (_, sync) = myelin.get("/_matrix/client/v3/sync", Some(&alice)).await;
        sync["rooms"]["join"][&myelin_room]["ephemeral"]["events"]
            .to_string()
            .contains(&sam_id)
            .then_some(())
    })
    .await;
    let (_, page) = myelin
        .get(
            &format!("/_matrix/client/v3/rooms/{myelin_room}/messages?dir=b&limit=1"),
            Some(&alice),
        )
        .await;
    let latest = page["chunk"][0]["event_id"].as_str().unwrap().to_owned();
    let (status, _) = myelin
        .post(
            &format!("/_matrix/client/v3/rooms/{myelin_room}/receipt/m.read/{latest}"),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    sam.sync_until("Alice's receipt in Sam's sync", |sync| {
        sync["rooms"]["join"][&myelin_room]["ephemeral"]["events"]
            .as_array()
            .is_some_and(|events| {
                events.iter().any(|e| {
                    e["type"] == "m.receipt"
                        && e["content"][&latest]["m.read"][&alice_id].is_object()
                })
            })
    })
    .await;
    // And the other way: Alice types, Sam reads.
    let (status, _) = myelin
        .put(
            &format!("/_matrix/client/v3/rooms/{myelin_room}/typing/{alice_id}"),
            Some(&alice),
            json!({ "typing": true, "timeout": 20000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    sam.sync_until("Alice typing in Sam's sync", |sync| {
        sync["rooms"]["join"][&myelin_room]["ephemeral"]["events"]
            .as_array()
            .is_some_and(|events| {
                events.iter().any(|e| {
                    e["type"] == "m.typing"
                        && e["content"]["user_ids"]
                            .as_array()
                            .is_some_and(|ids| ids.iter().any(|id| id == alice_id.as_str()))
                })
            })
    })
    .await;
    let (status, _) = sam
        .post(
            &format!("/_matrix/client/v3/rooms/{myelin_room}/receipt/m.read/{latest}"),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("Sam's receipt in Alice's sync", &synapse, || async {
        let (_, sync) = myelin.get("/_matrix/client/v3/sync", Some(&alice)).await;
        let events = &sync["rooms"]["join"][&myelin_room]["ephemeral"]["events"];
        events
            .as_array()
            .is_some_and(|events| {
                events.iter().any(|e| {
                    e["type"] == "m.receipt" && e["content"][&latest]["m.read"][&sam_id].is_object()
                })
            })
            .then_some(())
    })
    .await;

    // Device keys: Alice's server asks Synapse for Sam's.
    let (_, whoami) = sam.get("/_matrix/client/v3/account/whoami").await;
    let sam_device = whoami["device_id"].as_str().unwrap().to_owned();
    let (status, answer) = sam
        .post(
            "/_matrix/client/v3/keys/upload",
            json!({ "device_keys": {
                "user_id": sam_id,
                "device_id": sam_device,
                "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                "keys": { format!("curve25519:{sam_device}"): "sam-curve", format!("ed25519:{sam_device}"): "sam-ed" },
                "signatures": { &sam_id: { format!("ed25519:{sam_device}"): "signature" } },
            } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, keys) = myelin
        .post(
            "/_matrix/client/v3/keys/query",
            Some(&alice),
            json!({ "device_keys": { &sam_id: [] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    assert_eq!(
        keys["device_keys"][&sam_id][&sam_device]["keys"][format!("ed25519:{sam_device}")],
        "sam-ed",
        "{keys}\n{}",
        synapse.log_tail(20)
    );

    // Sam invites Alice to a Synapse room; Alice sees it and joins.
    let (status, room) = sam
        .post(
            "/_matrix/client/v3/createRoom",
            json!({ "preset": "private_chat", "name": "Synapse nook", "invite": [alice_id] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{room}");
    let nook = room["room_id"].as_str().unwrap().to_owned();
    eventually("Sam's invite in Alice's sync", &synapse, || async {
        let (_, sync) = myelin.get("/_matrix/client/v3/sync", Some(&alice)).await;
        sync["rooms"]["invite"][&nook]["invite_state"]["events"]
            .as_array()
            .is_some_and(|events| {
                events
                    .iter()
                    .any(|e| e["content"]["name"] == "Synapse nook")
            })
            .then_some(())
    })
    .await;
    let (status, answer) = myelin
        .post(
            &format!("/_matrix/client/v3/rooms/{nook}/join"),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}\n{}", synapse.log_tail(40));
    eventually("Alice's join on Synapse", &synapse, || async {
        let (status, member) = sam
            .get(&format!(
                "/_matrix/client/v3/rooms/{nook}/state/m.room.member/{alice_id}"
            ))
            .await;
        (status == StatusCode::OK && member["membership"] == "join").then_some(())
    })
    .await;
}
