//! End-to-end encryption support over HTTP: key upload, query and claim,
//! key changes, to-device messages and their delivery through `/sync`.

mod common;

use std::collections::BTreeSet;

use common::{assert_error, token, TestServer, PASSWORD};
use reqwest::{Method, StatusCode};
use ruma::serde::{base64::Standard, Base64};
use ruma::signatures::{sign_json, Ed25519KeyPair};
use ruma::CanonicalJsonObject;
use serde_json::{json, Value};

const V3: &str = "/_matrix/client/v3";

fn device_keys(user: &str, device: &str) -> Value {
    json!({
        "user_id": user,
        "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {
            format!("curve25519:{device}"): "curve-key",
            format!("ed25519:{device}"): "ed-key",
        },
        "signatures": { user: { format!("ed25519:{device}"): "signature" } },
    })
}

async fn upload(server: &TestServer, token: &str, body: Value) -> (StatusCode, Value) {
    server
        .post(&format!("{V3}/keys/upload"), Some(token), body)
        .await
}

async fn sync(server: &TestServer, token: &str, since: Option<&str>) -> Value {
    let path = match since {
        Some(since) => format!("{V3}/sync?since={since}&timeout=0"),
        None => format!("{V3}/sync?timeout=0"),
    };
    let (status, answer) = server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

#[tokio::test]
async fn keys_are_uploaded_queried_and_claimed_each_once() {
    let server = TestServer::start().await;
    let alice_login = server.register_device("alice", "PHONE").await;
    let alice = token(&alice_login);
    let bob = token(&server.register("bob").await);

    // Identity keys must be the uploader's.
    let wrong = upload(
        &server,
        &alice,
        json!({ "device_keys": device_keys("@bob:localhost", "PHONE") }),
    )
    .await;
    assert_error(&wrong, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let body = json!({
        "device_keys": device_keys("@alice:localhost", "PHONE"),
        "one_time_keys": {
            "signed_curve25519:AAAA": { "key": "k1" },
            "signed_curve25519:AAAB": { "key": "k2" },
            "signed_curve25519:AAAC": { "key": "k3" },
        },
        "fallback_keys": { "signed_curve25519:FFFF": { "key": "fallback", "fallback": true } },
    });
    let (status, answer) = upload(&server, &alice, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["one_time_key_counts"]["signed_curve25519"], 3);
    // Uploading a key ID again: the same key is fine, another is refused.
    let again = json!({ "one_time_keys": { "signed_curve25519:AAAA": { "key": "k1" } } });
    assert_eq!(upload(&server, &alice, again).await.0, StatusCode::OK);
    let clash = json!({ "one_time_keys": { "signed_curve25519:AAAA": { "key": "other" } } });
    assert_error(
        &upload(&server, &alice, clash).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );

    // Query: every device for an empty list, with its display name.
    let (status, answer) = server
        .post(
            &format!("{V3}/keys/query"),
            Some(&bob),
            json!({ "device_keys": { "@alice:localhost": [] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let phone = &answer["device_keys"]["@alice:localhost"]["PHONE"];
    assert_eq!(phone["keys"]["ed25519:PHONE"], "ed-key");
    assert_eq!(phone["unsigned"]["device_display_name"], "alice's phone");

    // Eight claims race for three one-time keys: each key is handed out
    // once, oldest first overall, and then the fallback key.
    let mut claims = Vec::new();
    for _ in 0..8 {
        let url = server.url(&format!("{V3}/keys/claim"));
        let bob = bob.clone();
        claims.push(tokio::spawn(async move {
            let answer: Value = reqwest::Client::new()
                .post(url)
                .bearer_auth(bob)
                .json(&json!({ "one_time_keys": { "@alice:localhost": { "PHONE": "signed_curve25519" } } }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            answer["one_time_keys"]["@alice:localhost"]["PHONE"]
                .as_object()
                .unwrap()
                .keys()
                .next()
                .unwrap()
                .clone()
        }));
    }
    let mut handed_out = Vec::new();
    for claim in claims {
        handed_out.push(claim.await.unwrap());
    }
    let one_time: BTreeSet<&String> = handed_out.iter().filter(|k| !k.ends_with("FFFF")).collect();
    assert_eq!(one_time.len(), 3, "{handed_out:?}");
    assert_eq!(handed_out.iter().filter(|k| k.ends_with("FFFF")).count(), 5);

    // The device sees its counts, and that its fallback key was used.
    let answer = sync(&server, &alice, None).await;
    assert_eq!(answer["device_one_time_keys_count"], json!({}));
    assert_eq!(answer["device_unused_fallback_key_types"], json!([]));
    let fresh = json!({ "fallback_keys": { "signed_curve25519:GGGG": { "key": "new" } } });
    assert_eq!(upload(&server, &alice, fresh).await.0, StatusCode::OK);
    let answer = sync(&server, &alice, None).await;
    assert_eq!(
        answer["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );
}

#[tokio::test]
async fn key_changes_are_listed_between_two_tokens() {
    let server = TestServer::start().await;
    let alice_login = server.register_device("alice", "PHONE").await;
    let alice = token(&alice_login);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let (status, _) = server
        .post(&format!("{V3}/rooms/{room_id}/join"), Some(&bob), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let from = sync(&server, &bob, None).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = json!({ "device_keys": device_keys("@alice:localhost", "PHONE") });
    assert_eq!(upload(&server, &alice, body).await.0, StatusCode::OK);
    let answer = sync(&server, &bob, Some(&from)).await;
    assert_eq!(
        answer["device_lists"]["changed"],
        json!(["@alice:localhost"])
    );
    let to = answer["next_batch"].as_str().unwrap();
    let (status, changes) = server
        .get(
            &format!("{V3}/keys/changes?from={from}&to={to}"),
            Some(&bob),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{changes}");
    assert_eq!(
        changes,
        json!({ "changed": ["@alice:localhost"], "left": [] })
    );
    let bad = server
        .get(&format!("{V3}/keys/changes?from=x&to={to}"), Some(&bob))
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
}

#[tokio::test]
async fn to_device_messages_arrive_in_order_once_and_stay_until_synced_past() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob_phone = token(&server.register_device("bob", "PHONE").await);
    let bob_laptop = token(&server.login("bob", Some("LAPTOP")).await);
    let since = sync(&server, &bob_phone, None).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();

    // A waiting sync is woken by a message for its device.
    let url = server.url(&format!("{V3}/sync?since={since}&timeout=60000"));
    let phone = bob_phone.clone();
    let waiting = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(phone)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    for (n, device) in ["PHONE", "PHONE", "*"].iter().enumerate() {
        let body = json!({ "messages": { "@bob:localhost": { *device: { "n": n } } } });
        let path = format!("{V3}/sendToDevice/org.example.ping/t{n}");
        let (status, _) = server.put(&path, Some(&alice), body.clone()).await;
        assert_eq!(status, StatusCode::OK);
        // A retried transaction sends nothing more.
        let (status, _) = server.put(&path, Some(&alice), body).await;
        assert_eq!(status, StatusCode::OK);
    }
    let woken = tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("woken by the message")
        .unwrap();
    assert!(
        !woken["to_device"]["events"].as_array().unwrap().is_empty(),
        "{woken}"
    );

    let numbers = |answer: &Value| -> Vec<u64> {
        answer["to_device"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(e["sender"], "@alice:localhost");
                assert_eq!(e["type"], "org.example.ping");
                e["content"]["n"].as_u64().unwrap()
            })
            .collect()
    };
    // Until the phone syncs past them, the messages are given again.
    let first = sync(&server, &bob_phone, Some(&since)).await;
    assert_eq!(numbers(&first), [0, 1, 2]);
    let again = sync(&server, &bob_phone, Some(&since)).await;
    assert_eq!(numbers(&again), [0, 1, 2]);
    let past = sync(
        &server,
        &bob_phone,
        Some(first["next_batch"].as_str().unwrap()),
    )
    .await;
    assert!(numbers(&past).is_empty());
    // `*` reached the laptop too.
    assert_eq!(numbers(&sync(&server, &bob_laptop, None).await), [2]);

    // Deleting the laptop removes its keys and its waiting messages.
    let body = json!({ "messages": { "@bob:localhost": { "LAPTOP": { "n": 9 } } } });
    server
        .put(
            &format!("{V3}/sendToDevice/org.example.ping/t9"),
            Some(&alice),
            body,
        )
        .await;
    let keys = json!({ "device_keys": device_keys("@bob:localhost", "LAPTOP") });
    assert_eq!(upload(&server, &bob_laptop, keys).await.0, StatusCode::OK);
    let auth = json!({ "auth": {
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": "bob" },
        "password": PASSWORD,
    } });
    let (status, challenge) = server
        .call(
            Method::DELETE,
            &format!("{V3}/devices/LAPTOP"),
            Some(&bob_phone),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let mut auth = auth;
    auth["auth"]["session"] = challenge["session"].clone();
    let (status, answer) = server
        .call(
            Method::DELETE,
            &format!("{V3}/devices/LAPTOP"),
            Some(&bob_phone),
            Some(auth),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, query) = server
        .post(
            &format!("{V3}/keys/query"),
            Some(&alice),
            json!({ "device_keys": { "@bob:localhost": ["LAPTOP"] } }),
        )
        .await;
    assert_eq!(query["device_keys"]["@bob:localhost"], json!({}));
    let laptop_again = token(&server.login("bob", Some("LAPTOP")).await);
    assert!(
        numbers(&sync(&server, &laptop_again, None).await).is_empty(),
        "old messages are gone"
    );
}

fn cross_signing_key(user: &str, usage: &str, public: &str) -> Value {
    json!({
        "user_id": user,
        "usage": [usage],
        "keys": { format!("ed25519:{public}"): public },
    })
}

#[tokio::test]
async fn cross_signing_keys_need_auth_only_to_be_replaced_and_signatures_merge() {
    let server = TestServer::start().await;
    let alice = token(&server.register_device("alice", "PHONE").await);
    let bob = token(&server.register("bob").await);
    let body = json!({ "device_keys": device_keys("@alice:localhost", "PHONE") });
    assert_eq!(upload(&server, &alice, body).await.0, StatusCode::OK);
    let path = format!("{V3}/keys/device_signing/upload");
    let user = "@alice:localhost";
    // The self-signing key is a real ed25519 key: the server checks the
    // signatures made with it.
    let der = Ed25519KeyPair::generate();
    let probe = Ed25519KeyPair::from_der(&der, "probe".into()).unwrap();
    let self_public = Base64::<Standard>::new(probe.public_key().to_vec()).encode();
    let self_signing = Ed25519KeyPair::from_der(&der, self_public.clone()).unwrap();
    let keys = json!({
        "master_key": cross_signing_key(user, "master", "MASTER"),
        "self_signing_key": cross_signing_key(user, "self_signing", &self_public),
        "user_signing_key": cross_signing_key(user, "user_signing", "USER"),
    });
    // The first upload and an identical one need no interactive auth.
    assert_eq!(
        server.post(&path, Some(&alice), keys.clone()).await.0,
        StatusCode::OK
    );
    assert_eq!(
        server.post(&path, Some(&alice), keys).await.0,
        StatusCode::OK
    );
    // Replacing a key does.
    let replacement = json!({ "master_key": cross_signing_key(user, "master", "MASTER2") });
    let (status, challenge) = server.post(&path, Some(&alice), replacement.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    let mut authed = replacement;
    authed["auth"] = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": "alice" },
        "password": PASSWORD,
        "session": challenge["session"],
    });
    let (status, answer) = server.post(&path, Some(&alice), authed).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // A key that is not the uploader's, or not for its usage, is refused.
    let wrong = json!({ "master_key": cross_signing_key("@alice:localhost", "self_signing", "X") });
    assert_error(
        &server.post(&path, Some(&bob), wrong).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );

    // Others see the master and self-signing keys; only Alice her
    // user-signing key.
    let query = json!({ "device_keys": { "@alice:localhost": [] } });
    let (_, seen_by_bob) = server
        .post(&format!("{V3}/keys/query"), Some(&bob), query.clone())
        .await;
    assert_eq!(
        seen_by_bob["master_keys"][user]["keys"]["ed25519:MASTER2"],
        "MASTER2"
    );
    let self_name = format!("ed25519:{self_public}");
    assert_eq!(
        seen_by_bob["self_signing_keys"][user]["keys"][&self_name],
        self_public.as_str()
    );
    assert!(seen_by_bob["user_signing_keys"].get(user).is_none());
    let (_, seen_by_alice) = server
        .post(&format!("{V3}/keys/query"), Some(&alice), query.clone())
        .await;
    assert_eq!(
        seen_by_alice["user_signing_keys"][user]["keys"]["ed25519:USER"],
        "USER"
    );

    // Alice signs her device with her self-signing key.
    let mut object: CanonicalJsonObject =
        serde_json::from_value(device_keys(user, "PHONE")).unwrap();
    sign_json(user, &self_signing, &mut object).unwrap();
    let signature = serde_json::to_value(&object).unwrap()["signatures"][user][&self_name].clone();
    assert!(signature.is_string());
    let mut signed = device_keys(user, "PHONE");
    signed["signatures"] = json!({ user: { (self_name.clone()): signature.clone() } });
    // A signature that does not verify is refused.
    let mut forged = device_keys(user, "PHONE");
    let bad = Base64::<Standard>::new(vec![7u8; 64]).encode();
    forged["signatures"] = json!({ user: { (self_name.clone()): bad } });
    let (_, answer) = server
        .post(
            &format!("{V3}/keys/signatures/upload"),
            Some(&alice),
            json!({ user: { "PHONE": forged } }),
        )
        .await;
    assert_eq!(
        answer["failures"][user]["PHONE"]["errcode"], "M_INVALID_SIGNATURE",
        "{answer}"
    );
    let mut tampered = device_keys(user, "PHONE");
    tampered["keys"]["ed25519:PHONE"] = json!("other");
    tampered["signatures"] = json!({ user: { (self_name.clone()): "x" } });
    let upload_signatures = json!({ user: {
        "PHONE": signed,
        "NOSUCHKEY": { "signatures": { user: { (self_name.clone()): "x" } } },
    } });
    let (status, answer) = server
        .post(
            &format!("{V3}/keys/signatures/upload"),
            Some(&alice),
            upload_signatures,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["failures"][user]["NOSUCHKEY"]["errcode"],
        "M_NOT_FOUND"
    );
    assert!(answer["failures"][user].get("PHONE").is_none(), "{answer}");
    let (_, answer) = server
        .post(
            &format!("{V3}/keys/signatures/upload"),
            Some(&alice),
            json!({ user: { "PHONE": tampered } }),
        )
        .await;
    assert_eq!(
        answer["failures"][user]["PHONE"]["errcode"],
        "M_INVALID_PARAM"
    );
    let (_, query) = server
        .post(&format!("{V3}/keys/query"), Some(&bob), query)
        .await;
    let signatures = &query["device_keys"][user]["PHONE"]["signatures"][user];
    assert_eq!(signatures[&self_name], signature);
    assert_eq!(
        signatures["ed25519:PHONE"], "signature",
        "the device's own signature stays"
    );
}

#[tokio::test]
async fn room_key_backup_versions_and_keys() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let missing = server
        .get(&format!("{V3}/room_keys/version"), Some(&alice))
        .await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let algorithm = "m.megolm_backup.v1.curve25519-aes-sha2";
    let create = json!({ "algorithm": algorithm, "auth_data": { "public_key": "pk" } });
    let (status, created) = server
        .post(
            &format!("{V3}/room_keys/version"),
            Some(&alice),
            create.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(created["version"], "1");

    let key = |index: u64, verified: bool, data: &str| {
        json!({
            "first_message_index": index,
            "forwarded_count": 0,
            "is_verified": verified,
            "session_data": { "ciphertext": data },
        })
    };
    let session = format!("{V3}/room_keys/keys/!room:localhost/sess1?version=1");
    let (status, answer) = server
        .put(&session, Some(&alice), key(5, false, "first"))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["count"], 1);
    let first_etag = answer["etag"].clone();
    // A worse key leaves the stored one; a better one replaces it.
    let (_, answer) = server
        .put(&session, Some(&alice), key(9, false, "worse"))
        .await;
    assert_eq!(answer["etag"], first_etag, "nothing changed");
    let (_, stored) = server.get(&session, Some(&alice)).await;
    assert_eq!(stored["session_data"]["ciphertext"], "first");
    let (_, answer) = server
        .put(&session, Some(&alice), key(7, true, "verified"))
        .await;
    assert_ne!(answer["etag"], first_etag);
    let (_, stored) = server.get(&session, Some(&alice)).await;
    assert_eq!(stored["session_data"]["ciphertext"], "verified");

    // Room and whole-backup forms.
    let room_body = json!({ "sessions": { "sess2": key(0, false, "two") } });
    let (_, answer) = server
        .put(
            &format!("{V3}/room_keys/keys/!room:localhost?version=1"),
            Some(&alice),
            room_body,
        )
        .await;
    assert_eq!(answer["count"], 2);
    let all_body = json!({ "rooms": { "!other:localhost": { "sessions": { "s3": key(0, false, "three") } } } });
    let (_, answer) = server
        .put(
            &format!("{V3}/room_keys/keys?version=1"),
            Some(&alice),
            all_body,
        )
        .await;
    assert_eq!(answer["count"], 3);
    let (_, all) = server
        .get(&format!("{V3}/room_keys/keys?version=1"), Some(&alice))
        .await;
    assert_eq!(
        all["rooms"]["!room:localhost"]["sessions"]
            .as_object()
            .unwrap()
            .len(),
        2
    );
    let (_, info) = server
        .get(&format!("{V3}/room_keys/version"), Some(&alice))
        .await;
    assert_eq!(
        (info["version"].as_str(), info["count"].as_u64()),
        (Some("1"), Some(3))
    );

    // A new version: writes to the old one are refused, reads still work.
    let (_, created) = server
        .post(
            &format!("{V3}/room_keys/version"),
            Some(&alice),
            create.clone(),
        )
        .await;
    assert_eq!(created["version"], "2");
    let stale = server
        .put(&session, Some(&alice), key(0, true, "late"))
        .await;
    assert_error(&stale, StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(stale.1["current_version"], "2");
    assert_eq!(server.get(&session, Some(&alice)).await.0, StatusCode::OK);

    // Updating: the algorithm cannot change.
    let path = format!("{V3}/room_keys/version/2");
    let update =
        json!({ "algorithm": algorithm, "auth_data": { "public_key": "pk2" }, "version": "2" });
    assert_eq!(
        server.put(&path, Some(&alice), update).await.0,
        StatusCode::OK
    );
    let (_, info) = server.get(&path, Some(&alice)).await;
    assert_eq!(info["auth_data"]["public_key"], "pk2");
    let other = json!({ "algorithm": "other", "auth_data": {} });
    assert_error(
        &server.put(&path, Some(&alice), other).await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );

    // Deleting keys, then a version; numbers are not given out again.
    let (_, answer) = server
        .call(
            Method::DELETE,
            &format!("{V3}/room_keys/keys/!room:localhost?version=1"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(answer["count"], 1);
    let (status, _) = server.call(Method::DELETE, &path, Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, info) = server
        .get(&format!("{V3}/room_keys/version"), Some(&alice))
        .await;
    assert_eq!(info["version"], "1");
    let (_, created) = server
        .post(&format!("{V3}/room_keys/version"), Some(&alice), create)
        .await;
    assert_eq!(created["version"], "3");
    let gone = server.get(&path, Some(&alice)).await;
    assert_error(&gone, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let unknown = server
        .get(&format!("{V3}/room_keys/keys?version=99"), Some(&alice))
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
}

#[tokio::test]
async fn malformed_key_objects_are_refused_and_unsigned_data_is_the_servers() {
    let server = TestServer::start().await;
    let alice = token(&server.register_device("alice", "PHONE").await);
    let mut bad = device_keys("@alice:localhost", "PHONE");
    bad["keys"] = json!(5);
    let answer = upload(&server, &alice, json!({ "device_keys": bad })).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let mut bad = device_keys("@alice:localhost", "PHONE");
    bad["signatures"] = json!({ "@alice:localhost": "not an object" });
    let answer = upload(&server, &alice, json!({ "device_keys": bad })).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    // Unsigned data from the client is dropped; the server fills it in.
    let mut keys = device_keys("@alice:localhost", "PHONE");
    keys["unsigned"] = json!(5);
    assert_eq!(
        upload(&server, &alice, json!({ "device_keys": keys }))
            .await
            .0,
        StatusCode::OK
    );
    let (status, answer) = server
        .post(
            &format!("{V3}/keys/query"),
            Some(&alice),
            json!({ "device_keys": { "@alice:localhost": [] } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let unsigned = &answer["device_keys"]["@alice:localhost"]["PHONE"]["unsigned"];
    assert_eq!(unsigned, &json!({ "device_display_name": "alice's phone" }));
}
