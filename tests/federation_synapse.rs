//! Interoperability with Synapse (PyPI `matrix-synapse`, provisioned by
//! the test on first use): each server checks the other's key document and
//! `X-Matrix` signatures, over HTTPS with certificates of a CA the test
//! makes.

mod common;

use std::net::IpAddr;

use common::federation::{free_port, start_federating, TestCa};
use common::PASSWORD;
use myelin_testkit::synapse::{Synapse, SynapseSetup};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Starts Synapse on `ip` with a certificate of `ca`.
async fn start_synapse(ca: &TestCa, ip: &str) -> (Synapse, tempfile::TempDir) {
    let ip: IpAddr = ip.parse().unwrap();
    let (tls_certificate, tls_private_key) = ca.issue(ip);
    let setup = SynapseSetup {
        ip,
        federation_port: free_port(ip),
        client_port: free_port(ip),
        tls_certificate,
        tls_private_key,
        ca_certificates: ca.ca_pem.clone(),
    };
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
