//! Media over HTTP: uploads, authenticated downloads, the frozen legacy
//! endpoints, byte ranges, size limits, asynchronous uploads and storage
//! by content hash.

mod common;

use common::{assert_error, token, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Files with the real leading bytes of each format, then filler.
fn sample(kind: &str) -> Vec<u8> {
    let magic: &[u8] = match kind {
        "image/png" => b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
        "image/jpeg" => b"\xff\xd8\xff\xe0\0\x10JFIF\0",
        "image/webp" => b"RIFF\0\0\0\0WEBPVP8 ",
        "image/gif" => b"GIF89a\x01\0\x01\0",
        "video/mp4" => b"\0\0\0\x18ftypmp42\0\0\0\0",
        _ => b"",
    };
    let mut bytes = magic.to_vec();
    bytes.extend((0..5000u32).map(|n| (n * 7 % 251) as u8));
    bytes
}

async fn upload(server: &TestServer, token: &str, kind: &str, body: Vec<u8>, name: &str) -> String {
    let response = server
        .http
        .post(server.url(&format!("/_matrix/media/v3/upload?filename={name}")))
        .bearer_auth(token)
        .header("Content-Type", kind)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    answer["content_uri"].as_str().unwrap().to_owned()
}

fn download_path(uri: &str) -> String {
    let rest = uri.strip_prefix("mxc://").unwrap();
    format!("/_matrix/client/v1/media/download/{rest}")
}

async fn get(
    server: &TestServer,
    path: &str,
    token: Option<&str>,
    range: Option<&str>,
) -> reqwest::Response {
    let mut request = server.http.get(server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(range) = range {
        request = request.header("Range", range);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn files_round_trip_byte_for_byte_with_safe_headers() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    for kind in [
        "image/png",
        "image/jpeg",
        "image/webp",
        "image/gif",
        "video/mp4",
    ] {
        let bytes = sample(kind);
        let uri = upload(&server, &alice, kind, bytes.clone(), "file").await;
        assert!(uri.starts_with("mxc://localhost/"), "{uri}");
        let response = get(&server, &download_path(&uri), Some(&alice), None).await;
        assert_eq!(response.status(), StatusCode::OK, "{kind}");
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], kind);
        assert!(headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("inline"));
        assert!(headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("sandbox"));
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert!(headers["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age"));
        assert_eq!(response.bytes().await.unwrap().to_vec(), bytes, "{kind}");
    }
    // A type a browser could run is never shown inline; the file name in
    // the path is the one given.
    let uri = upload(
        &server,
        &alice,
        "text/html",
        b"<script>alert(1)</script>".to_vec(),
        "x.html",
    )
    .await;
    let response = get(
        &server,
        &format!("{}/page.html", download_path(&uri)),
        Some(&alice),
        None,
    )
    .await;
    let disposition = response.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(disposition.starts_with("attachment"), "{disposition}");
    assert!(disposition.contains("page.html"), "{disposition}");

    let (status, config) = server
        .get("/_matrix/client/v1/media/config", Some(&alice))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(config["m.upload.size"], 100 * 1024 * 1024);
}

#[tokio::test]
async fn downloads_need_a_token_and_the_legacy_endpoints_are_frozen() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let uri = upload(&server, &alice, "image/png", sample("image/png"), "a.png").await;
    let response = get(&server, &download_path(&uri), None, None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errcode"], "M_MISSING_TOKEN");
    let legacy = download_path(&uri).replace("/_matrix/client/v1/media/", "/_matrix/media/v3/");
    let response = get(&server, &legacy, None, None).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let missing = get(
        &server,
        "/_matrix/client/v1/media/download/localhost/nope",
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["errcode"], "M_NOT_FOUND");

    // Configured to serve them, the legacy endpoints answer without a token.
    let open = TestServer::start_with(|c| c.media.legacy_unauthenticated_downloads = true).await;
    let bob = token(&open.register("bob").await);
    let uri = upload(&open, &bob, "image/png", sample("image/png"), "b.png").await;
    let legacy = download_path(&uri).replace("/_matrix/client/v1/media/", "/_matrix/media/v3/");
    let response = get(&open, &legacy, None, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.bytes().await.unwrap().to_vec(),
        sample("image/png")
    );
}

#[tokio::test]
async fn byte_ranges_let_video_stream_and_seek() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let video = sample("video/mp4");
    let size = video.len();
    let path = download_path(&upload(&server, &alice, "video/mp4", video.clone(), "v.mp4").await);
    let response = get(&server, &path, Some(&alice), Some("bytes=0-99")).await;
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        response.headers()["content-range"],
        format!("bytes 0-99/{size}").as_str()
    );
    assert_eq!(response.bytes().await.unwrap().to_vec(), video[..100]);
    let response = get(&server, &path, Some(&alice), Some("bytes=1000-")).await;
    assert_eq!(response.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(response.bytes().await.unwrap().to_vec(), video[1000..]);
    let response = get(&server, &path, Some(&alice), Some("bytes=-16")).await;
    assert_eq!(response.bytes().await.unwrap().to_vec(), video[size - 16..]);
    let response = get(
        &server,
        &path,
        Some(&alice),
        Some(&format!("bytes={size}-")),
    )
    .await;
    assert_eq!(response.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        response.headers()["content-range"],
        format!("bytes */{size}").as_str()
    );
    let whole = get(&server, &path, Some(&alice), None).await;
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
}

#[tokio::test]
async fn oversized_uploads_are_refused_and_leave_nothing() {
    let server = TestServer::start_with(|c| c.media.max_upload_bytes = 4096).await;
    let alice = token(&server.register("alice").await);
    let response = server
        .http
        .post(server.url("/_matrix/media/v3/upload"))
        .bearer_auth(&alice)
        .body(vec![1u8; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errcode"], "M_TOO_LARGE");
    // Without a declared length (a chunked body), refused while reading.
    let status_line = chunked_upload(&server, &alice, &[vec![2u8; 3000], vec![3u8; 3000]]).await;
    assert!(status_line.contains(" 413 "), "{status_line}");
    let media_dir = server.dir.path().join("media");
    let leftovers: Vec<_> = walk(&media_dir).into_iter().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Every file under a directory.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Uploads with `Transfer-Encoding: chunked` (no declared length) over a
/// plain socket; returns the answer's status line.
async fn chunked_upload(server: &TestServer, token: &str, chunks: &[Vec<u8>]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = server.base.strip_prefix("http://").unwrap();
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {address}\r\n\
         Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    for chunk in chunks {
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(chunk);
        frame.extend_from_slice(b"\r\n");
        // The server may answer and close before reading everything.
        if socket.write_all(&frame).await.is_err() {
            break;
        }
    }
    let _ = socket.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn asynchronous_uploads_fill_a_reserved_media_id_once() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let (status, created) = server
        .post("/_matrix/media/v1/create", Some(&alice), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let uri = created["content_uri"].as_str().unwrap().to_owned();
    assert!(created["unused_expires_at"].is_u64());
    // Not downloadable before its content arrives.
    let early = get(&server, &download_path(&uri), Some(&alice), None).await;
    assert_eq!(early.status(), StatusCode::NOT_FOUND);
    let put_path = format!(
        "/_matrix/media/v3/upload/{}",
        uri.strip_prefix("mxc://").unwrap()
    );
    let put = |token: String, body: Vec<u8>| {
        let url = server.url(&put_path);
        let http = server.http.clone();
        async move {
            let response = http
                .put(url)
                .bearer_auth(token)
                .header("Content-Type", "image/gif")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let other = put(bob.clone(), sample("image/gif")).await;
    assert_error(&other, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, _) = put(alice.clone(), sample("image/gif")).await;
    assert_eq!(status, StatusCode::OK);
    let again = put(alice.clone(), b"other".to_vec()).await;
    assert_error(&again, StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA");
    let response = get(&server, &download_path(&uri), Some(&bob), None).await;
    assert_eq!(response.headers()["content-type"], "image/gif");
    assert_eq!(
        response.bytes().await.unwrap().to_vec(),
        sample("image/gif")
    );
    let unknown = put_path.rsplit_once('/').unwrap().0.to_owned() + "/unknown";
    let (status, _) = server.put(&unknown, Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn identical_files_are_stored_once() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let first = upload(&server, &alice, "image/png", sample("image/png"), "one.png").await;
    let second = upload(&server, &alice, "image/png", sample("image/png"), "two.png").await;
    assert_ne!(first, second, "two media IDs");
    let files: Vec<_> = walk(&server.dir.path().join("media"))
        .into_iter()
        .filter(|p| p.parent().is_some_and(|dir| !dir.ends_with("tmp")))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    for uri in [first, second] {
        let response = get(&server, &download_path(&uri), Some(&alice), None).await;
        assert_eq!(
            response.bytes().await.unwrap().to_vec(),
            sample("image/png")
        );
    }
}

/// A one-page web server on loopback: `/` redirects to `/page`, which has
/// OpenGraph tags. Returns its base URL.
async fn web_page() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let read = socket.read(&mut request).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&request[..read]).to_string();
                let answer = if request.starts_with("GET /page") {
                    let body = r#"<html><head><title>Fallback</title>
                        <meta property="og:title" content="Myelin news">
                        <meta property="og:description" content="Sync is fast">
                        </head><body>hi</body></html>"#;
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 302 Found\r\nLocation: /page\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_owned()
                };
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{address}")
}

#[tokio::test]
async fn url_previews_are_off_by_default_and_never_reach_private_addresses() {
    let page = web_page().await;
    let path = |url: &str| {
        let encoded: String = form_urlencoded::byte_serialize(url.as_bytes()).collect();
        format!("/_matrix/client/v1/media/preview_url?url={encoded}")
    };
    let off = TestServer::start().await;
    let alice = token(&off.register("alice").await);
    assert_error(
        &off.get(&path(&page), Some(&alice)).await,
        StatusCode::NOT_FOUND,
        "M_UNRECOGNIZED",
    );

    let guarded = TestServer::start_with(|c| c.media.url_previews = true).await;
    let bob = token(&guarded.register("bob").await);
    for private in [
        page.clone(),
        page.replace("127.0.0.1", "localhost"),
        "http://[::1]:9/".to_owned(),
    ] {
        let answer = guarded.get(&path(&private), Some(&bob)).await;
        assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    }
    let not_a_url = guarded.get(&path("no url"), Some(&bob)).await;
    assert_error(&not_a_url, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let scheme = guarded.get(&path("file:///etc/passwd"), Some(&bob)).await;
    assert_error(&scheme, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // Allowed by configuration (as here, where every test server is on
    // loopback), a page is fetched through its redirect and read.
    let open = TestServer::start_with(|c| {
        c.media.url_previews = true;
        c.media.url_preview_private_addresses = true;
    })
    .await;
    let carol = token(&open.register("carol").await);
    let (status, preview) = open.get(&path(&page), Some(&carol)).await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert_eq!(preview["og:title"], "Myelin news");
    assert_eq!(preview["og:description"], "Sync is fast");
}
