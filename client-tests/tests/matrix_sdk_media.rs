//! matrix-rust-sdk (crates.io) uploads media to Myelin and downloads it
//! again through the authenticated media endpoints.

use matrix_sdk::media::{MediaFormat, MediaRequestParameters};
use matrix_sdk::ruma::events::room::MediaSource;
use matrix_sdk::Client;
use myelin_client_tests::{Homeserver, PASSWORD};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_uploads_and_downloads_a_file_byte_for_byte() {
    let server = Homeserver::start().await;
    let base = server.url.clone();
    let body = json!({
        "username": "alice",
        "password": PASSWORD,
        "auth": { "type": "m.login.dummy" },
    });
    let answer = reqwest::Client::new()
        .post(format!("{base}/_matrix/client/v3/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());
    let client = Client::builder()
        .homeserver_url(&base)
        .build()
        .await
        .unwrap();
    client
        .matrix_auth()
        .login_username("alice", PASSWORD)
        .send()
        .await
        .expect("login");
    let mut image = b"\x89PNG\r\n\x1a\n".to_vec();
    image.extend((0..70_000u32).map(|n| (n % 253) as u8));
    let uploaded = client
        .media()
        .upload(&mime::IMAGE_PNG, image.clone(), None)
        .await
        .expect("uploaded");
    assert!(uploaded
        .content_uri
        .as_str()
        .starts_with("mxc://localhost/"));
    let request = MediaRequestParameters {
        source: MediaSource::Plain(uploaded.content_uri),
        format: MediaFormat::File,
    };
    let downloaded = client
        .media()
        .get_media_content(&request, false)
        .await
        .expect("downloaded");
    assert!(downloaded == image, "the same bytes back");
}
