//! Federation between Myelin servers on loopback, each named by IP literal
//! and port, speaking HTTPS with certificates of a CA the test makes:
//! server keys, notary answers, signed requests and their refusal.

mod common;

use std::collections::BTreeMap;

use common::federation::{https_client, start_federating, two_servers, TestCa};
use common::{assert_error, token, TestServer};
use myelin_federation::request_auth::SignedRequest;
use myelin_federation::server_keys::{to_canonical, verify_key_document};
use reqwest::StatusCode;
use ruma::signatures::Ed25519KeyPair;
use ruma::ServerName;
use serde_json::{json, Value};

fn name(text: &str) -> &ServerName {
    <&ServerName>::try_from(text).unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn get_json(http: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    let response = http.get(url).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn the_key_document_is_served_over_https_and_verifies() {
    let ca = TestCa::new();
    let one = start_federating(&ca, "127.0.0.2", |_| {}).await;
    let http = https_client(&ca);
    let base = one.federation_base();

    let (status, document) = get_json(&http, &format!("{base}/_matrix/key/v2/server")).await;
    assert_eq!(status, StatusCode::OK);
    let server_name = one.server_name();
    let document = to_canonical(document).unwrap();
    let keys = verify_key_document(&document, name(&server_name), None, now_ms()).unwrap();
    assert_eq!(keys.verify_keys.len(), 1);
    // One day of validity by default.
    assert!(keys.valid_until_ts > now_ms() + 23 * 3600 * 1000);

    let (status, version) = get_json(&http, &format!("{base}/_matrix/federation/v1/version")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version["server"]["name"], "Myelin");

    // The federation API has its own listener: the client listener does
    // not serve it, and the federation listener does not serve clients.
    let (status, _) = one.get("/_matrix/key/v2/server", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = get_json(&http, &format!("{base}/_matrix/client/versions")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["errcode"], "M_UNRECOGNIZED");
}

#[tokio::test]
async fn without_a_listener_of_its_own_federation_shares_the_main_one() {
    let plain = TestServer::start().await;
    let (status, document) = plain.get("/_matrix/key/v2/server", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(document["server_name"], "localhost");
    let (status, well_known) = plain.get("/.well-known/matrix/server", None).await;
    assert_error(&(status, well_known), StatusCode::NOT_FOUND, "M_NOT_FOUND");

    let delegated = TestServer::start_with(|config| {
        config.federation.well_known_server = Some("matrix.example.org:443".to_owned());
    })
    .await;
    let (status, well_known) = delegated.get("/.well-known/matrix/server", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(well_known, json!({ "m.server": "matrix.example.org:443" }));

    let island = TestServer::start_with(|config| config.federation.enabled = false).await;
    let answer = island.get("/_matrix/key/v2/server", None).await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_UNRECOGNIZED");
}

#[tokio::test]
async fn a_remote_profile_is_read_through_a_signed_request() {
    let ca = TestCa::new();
    let (one, two) = two_servers(&ca).await;
    let (_, alice_id) = one.register_named("alice", "Alice of One").await;
    let bob = token(&two.register("bob").await);

    let (status, profile) = two
        .get(
            &format!("/_matrix/client/v3/profile/{alice_id}"),
            Some(&bob),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    assert_eq!(profile["displayname"], "Alice of One");
    let (status, field) = two
        .get(
            &format!("/_matrix/client/v3/profile/{alice_id}/displayname"),
            Some(&bob),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(field, json!({ "displayname": "Alice of One" }));

    let nobody = format!("@nobody:{}", one.server_name());
    let answer = two
        .get(&format!("/_matrix/client/v3/profile/{nobody}"), Some(&bob))
        .await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // One fetched two's key to check the request's signature, and keeps
    // it: with two gone, the key is still at hand.
    let two_name = two.server_name();
    let (_, two_document) = get_json(
        &https_client(&ca),
        &format!("{}/_matrix/key/v2/server", two.federation_base()),
    )
    .await;
    let two_key_id = two_document["verify_keys"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    two.stop().await;
    let federation = &one.server.as_ref().unwrap().services.federation;
    let kept = federation
        .server_keys(name(&two_name), &two_key_id, now_ms())
        .await
        .unwrap();
    assert!(kept.verify_keys.contains_key(&two_key_id));
    // A key ID two never published is not invented.
    assert!(federation
        .server_keys(name(&two_name), "ed25519:none", 0)
        .await
        .is_err());
}

#[tokio::test]
async fn unsigned_forged_and_misaddressed_requests_are_refused() {
    let ca = TestCa::new();
    let (one, two) = two_servers(&ca).await;
    one.register("alice").await;
    let http = https_client(&ca);
    let one_name = one.server_name();
    let path = format!(
        "/_matrix/federation/v1/query/profile?user_id=%40alice%3A{}",
        one_name.replace(':', "%3A")
    );
    let url = format!("{}{path}", one.federation_base());
    let two_name = two.server_name();
    let impostor = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "x".to_owned()).unwrap();
    let signed_by_impostor = |origin: &str, destination: &str| {
        let header = SignedRequest {
            method: "GET",
            uri: &path,
            origin: name(origin),
            destination: name(destination),
            content: None,
        }
        .authorization(&impostor, "ed25519:x");
        Some(header.to_string())
    };
    let cases = [
        ("unsigned", None),
        ("not X-Matrix", Some("X-Matrix nonsense".to_owned())),
        // Claims to be two, signed with a key that is not two's.
        ("forged", signed_by_impostor(&two_name, &one_name)),
        // A server that does not exist has no keys to check with.
        (
            "no such server",
            signed_by_impostor("127.0.0.9:1", &one_name),
        ),
        (
            "addressed elsewhere",
            signed_by_impostor(&two_name, "127.0.0.5:8448"),
        ),
    ];
    for (case, authorization) in cases {
        let mut request = http.get(&url);
        if let Some(authorization) = authorization {
            request = request.header("Authorization", authorization);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {body}");
        assert_eq!(body["errcode"], "M_UNAUTHORIZED", "{case}");
    }

    // The server still answers a good request afterwards.
    let bob = token(&two.register("bob").await);
    let (status, _) = two
        .get(
            &format!("/_matrix/client/v3/profile/@alice:{one_name}"),
            Some(&bob),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_notary_countersigns_the_keys_it_fetched() {
    let ca = TestCa::new();
    let one = start_federating(&ca, "127.0.0.2", |_| {}).await;
    let notary = start_federating(&ca, "127.0.0.3", |_| {}).await;
    let http = https_client(&ca);
    let one_name = one.server_name();
    let notary_name = notary.server_name();

    let (_, notary_document) = get_json(
        &http,
        &format!("{}/_matrix/key/v2/server", notary.federation_base()),
    )
    .await;
    let notary_keys = verify_key_document(
        &to_canonical(notary_document).unwrap(),
        name(&notary_name),
        None,
        now_ms(),
    )
    .unwrap();

    let query = json!({ "server_keys": { one_name.clone(): { "ed25519:any": {} } } });
    let response = http
        .post(format!("{}/_matrix/key/v2/query", notary.federation_base()))
        .json(&query)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    let documents = answer["server_keys"].as_array().unwrap();
    assert_eq!(documents.len(), 1, "{answer}");
    let document = to_canonical(documents[0].clone()).unwrap();
    let vouched = Some((name(&notary_name), &notary_keys));
    let keys = verify_key_document(&document, name(&one_name), vouched, now_ms()).unwrap();
    assert_eq!(keys.server_name, one_name);

    // The GET form, and a server that cannot be reached (left out).
    let (status, answer) = get_json(
        &http,
        &format!(
            "{}/_matrix/key/v2/query/127.0.0.9:1",
            notary.federation_base()
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({ "server_keys": [] }));

    let too_many: BTreeMap<String, Value> = (0..51)
        .map(|i| (format!("s{i}.example"), json!({})))
        .collect();
    let response = http
        .post(format!("{}/_matrix/key/v2/query", notary.federation_base()))
        .json(&json!({ "server_keys": too_many }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn denied_address_ranges_are_never_contacted() {
    let ca = TestCa::new();
    let one = start_federating(&ca, "127.0.0.2", |_| {}).await;
    // The default deny list covers loopback.
    let strict = start_federating(&ca, "127.0.0.3", |config| {
        config.federation.ip_range_allowlist.clear();
    })
    .await;
    let carol = token(&strict.register("carol").await);
    let (status, answer) = strict
        .get(
            &format!("/_matrix/client/v3/profile/@alice:{}", one.server_name()),
            Some(&carol),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("denied IP range"), "{error}");
}

#[tokio::test]
async fn aliases_and_public_rooms_of_another_server_are_looked_up() {
    let ca = TestCa::new();
    let (one, two) = two_servers(&ca).await;
    let alice = token(&one.register("alice").await);
    let bob = token(&two.register("bob").await);
    let room_id = one
        .create_room(
            &alice,
            json!({ "visibility": "public", "room_alias_name": "lounge", "name": "The Lounge" }),
        )
        .await;
    one.create_room(
        &alice,
        json!({ "visibility": "public", "name": "Workshop" }),
    )
    .await;
    let one_name = one.server_name();

    let alias = format!("%23lounge:{one_name}");
    let (status, resolved) = two
        .get(
            &format!("/_matrix/client/v3/directory/room/{alias}"),
            Some(&bob),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{resolved}");
    assert_eq!(resolved["room_id"], room_id.as_str());
    assert_eq!(resolved["servers"], json!([one_name]));
    let missing = two
        .get(
            &format!("/_matrix/client/v3/directory/room/%23nothing:{one_name}"),
            Some(&bob),
        )
        .await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    let (status, listed) = two
        .get(
            &format!("/_matrix/client/v3/publicRooms?server={one_name}&limit=1"),
            Some(&bob),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["chunk"].as_array().unwrap().len(), 1);
    assert_eq!(listed["total_room_count_estimate"], 2);
    assert!(listed["next_batch"].is_string());

    let (status, found) = two
        .post(
            &format!("/_matrix/client/v3/publicRooms?server={one_name}"),
            Some(&bob),
            json!({ "filter": { "generic_search_term": "lounge" } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    let chunk = found["chunk"].as_array().unwrap();
    assert_eq!(chunk.len(), 1, "{found}");
    assert_eq!(chunk[0]["room_id"], room_id.as_str());
}
