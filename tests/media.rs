//! Media over HTTP: uploads, authenticated downloads, the frozen legacy
//! endpoints, byte ranges, size limits, asynchronous uploads, storage by
//! content hash and thumbnails.

mod common;

use common::{assert_error, token, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A real file of each kind: a 64×48 image encoded in the format, or an
/// MP4 container (an `ftyp` box, then an `mdat` box of filler).
fn sample(kind: &str) -> Vec<u8> {
    match kind {
        "image/png" => image_file(64, 48, image::ImageFormat::Png),
        "image/jpeg" => image_file(64, 48, image::ImageFormat::Jpeg),
        "image/webp" => image_file(64, 48, image::ImageFormat::WebP),
        "image/gif" => image_file(64, 48, image::ImageFormat::Gif),
        "video/mp4" => {
            let mut bytes = b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom".to_vec();
            let filler: Vec<u8> = (0..5000u32).map(|n| (n * 7 % 251) as u8).collect();
            bytes.extend((filler.len() as u32 + 8).to_be_bytes());
            bytes.extend(b"mdat");
            bytes.extend(filler);
            bytes
        }
        _ => (0..5000u32).map(|n| (n * 7 % 251) as u8).collect(),
    }
}

/// A `width`×`height` gradient encoded as `format`.
fn image_file(width: u32, height: u32, format: image::ImageFormat) -> Vec<u8> {
    let pixels = image::RgbaImage::from_fn(width, height, |x, y| {
        image::Rgba([(x * 255 / width) as u8, (y * 255 / height) as u8, 90, 255])
    });
    let image = if format == image::ImageFormat::Jpeg {
        image::DynamicImage::ImageRgb8(image::DynamicImage::ImageRgba8(pixels).to_rgb8())
    } else {
        image::DynamicImage::ImageRgba8(pixels)
    };
    let mut bytes = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut bytes), format)
        .unwrap();
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
/// OpenGraph tags and names `/cat.png` as its image. Returns its base URL.
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
                let picture = image_file(64, 48, image::ImageFormat::Png);
                let mut request = vec![0u8; 4096];
                let read = socket.read(&mut request).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&request[..read]).to_string();
                let answer = if request.starts_with("GET /page") {
                    let body = r#"<html><head><title>Fallback</title>
                        <meta property="og:title" content="Myelin news">
                        <meta property="og:description" content="Sync is fast">
                        <meta property="og:image" content="/cat.png">
                        </head><body>hi</body></html>"#;
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else if request.starts_with("GET /cat.png") {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        picture.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(&picture).await;
                    return;
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
    // The page's image was fetched and stored as media.
    let picture = image_file(64, 48, image::ImageFormat::Png);
    let uri = preview["og:image"].as_str().unwrap();
    assert!(uri.starts_with("mxc://localhost/"), "{preview}");
    assert_eq!(preview["og:image:type"], "image/png");
    assert_eq!(preview["matrix:image:size"], picture.len());
    assert_eq!(
        (
            preview["og:image:width"].clone(),
            preview["og:image:height"].clone()
        ),
        (json!(64), json!(48))
    );
    let response = get(&open, &download_path(uri), Some(&carol), None).await;
    assert_eq!(response.bytes().await.unwrap().to_vec(), picture);
}

fn thumbnail_path(uri: &str, query: &str) -> String {
    let rest = uri.strip_prefix("mxc://").unwrap();
    format!("/_matrix/client/v1/media/thumbnail/{rest}?{query}")
}

/// Fetches a thumbnail; answers its content type and decoded dimensions.
async fn thumbnail(server: &TestServer, token: &str, uri: &str, query: &str) -> (String, u32, u32) {
    let response = get(server, &thumbnail_path(uri, query), Some(token), None).await;
    assert_eq!(response.status(), StatusCode::OK, "{uri} {query}");
    let kind = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(response.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("inline"));
    let bytes = response.bytes().await.unwrap();
    let decoded = image::load_from_memory(&bytes).unwrap();
    (kind, decoded.width(), decoded.height())
}

#[tokio::test]
async fn thumbnails_scale_and_crop_every_image_format() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let wide_png = image_file(1000, 500, image::ImageFormat::Png);
    let png = upload(&server, &alice, "image/png", wide_png, "wide.png").await;
    // The smallest made size at least as large as asked: 320×240, the
    // image scaled to fit it with its shape kept.
    assert_eq!(
        thumbnail(&server, &alice, &png, "width=100&height=100&method=scale").await,
        ("image/png".to_owned(), 320, 160)
    );
    // Asking for more than the largest size gets the largest.
    assert_eq!(
        thumbnail(&server, &alice, &png, "width=2000&height=2000").await,
        ("image/png".to_owned(), 800, 400)
    );
    assert_eq!(
        thumbnail(&server, &alice, &png, "width=32&height=32&method=crop").await,
        ("image/png".to_owned(), 32, 32)
    );
    let jpeg = image_file(400, 300, image::ImageFormat::Jpeg);
    let jpeg = upload(&server, &alice, "image/jpeg", jpeg, "photo.jpg").await;
    assert_eq!(
        thumbnail(&server, &alice, &jpeg, "width=96&height=96&method=crop").await,
        ("image/jpeg".to_owned(), 96, 96)
    );
    for format in [image::ImageFormat::Gif, image::ImageFormat::WebP] {
        let kind = format.to_mime_type();
        let uri = upload(&server, &alice, kind, image_file(640, 160, format), "i").await;
        assert_eq!(
            thumbnail(&server, &alice, &uri, "width=320&height=240&method=scale").await,
            ("image/png".to_owned(), 320, 80),
            "{kind}"
        );
        assert_eq!(
            thumbnail(&server, &alice, &uri, "width=96&height=96&method=crop").await,
            ("image/png".to_owned(), 96, 96),
            "{kind}"
        );
    }
    // A small image is never enlarged.
    let small = upload(&server, &alice, "image/png", sample("image/png"), "s.png").await;
    assert_eq!(
        thumbnail(&server, &alice, &small, "width=800&height=600").await,
        ("image/png".to_owned(), 64, 48)
    );
}

#[tokio::test]
async fn thumbnails_are_made_once_and_stored() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bytes = image_file(500, 500, image::ImageFormat::Png);
    let first = upload(&server, &alice, "image/png", bytes.clone(), "a.png").await;
    let media_dir = server.dir.path().join("media");
    let before = walk(&media_dir).len();
    let fetch = |uri: String| {
        let server = &server;
        let alice = alice.clone();
        async move {
            let response = get(
                server,
                &thumbnail_path(&uri, "width=96&height=96&method=crop"),
                Some(&alice),
                None,
            )
            .await;
            assert_eq!(response.status(), StatusCode::OK);
            response.bytes().await.unwrap().to_vec()
        }
    };
    // Four requests at once make one thumbnail.
    let answers = futures_util::future::join_all((0..4).map(|_| fetch(first.clone()))).await;
    assert!(answers.iter().all(|a| a == &answers[0]));
    assert_eq!(walk(&media_dir).len(), before + 1);
    // The same content under another media ID shares it; a request for
    // another size that maps to the same made size reuses it too.
    let second = upload(&server, &alice, "image/png", bytes, "b.png").await;
    assert_eq!(fetch(second.clone()).await, answers[0]);
    let response = get(
        &server,
        &thumbnail_path(&second, "width=50&height=60&method=crop"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(response.bytes().await.unwrap().to_vec(), answers[0]);
    assert_eq!(walk(&media_dir).len(), before + 1);
    // After a restart it is read, not made again.
    let dir = server.stop().await;
    let config = common::test_config(&dir);
    let server = TestServer::start_in(dir, config, None).await;
    let media_dir = server.dir.path().join("media");
    let response = get(
        &server,
        &thumbnail_path(&first, "width=96&height=96&method=crop"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(response.bytes().await.unwrap().to_vec(), answers[0]);
    assert_eq!(walk(&media_dir).len(), before + 1);
}

#[tokio::test]
async fn thumbnail_requests_that_cannot_be_answered_get_matrix_errors() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let png = upload(&server, &alice, "image/png", sample("image/png"), "a.png").await;
    let video = upload(&server, &alice, "video/mp4", sample("video/mp4"), "v.mp4").await;
    let call = |path: String, token: Option<String>| {
        let server = &server;
        async move {
            let response = get(server, &path, token.as_deref(), None).await;
            let status = response.status();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let me = Some(alice.clone());
    // Video is stored and streamed, not thumbnailed.
    let answer = call(thumbnail_path(&video, "width=96&height=96"), me.clone()).await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let unknown = "mxc://localhost/nosuchmedia";
    let answer = call(thumbnail_path(unknown, "width=96&height=96"), me.clone()).await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let answer = call(
        thumbnail_path(&png, "width=96&height=96&method=zoom"),
        me.clone(),
    )
    .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let answer = call(thumbnail_path(&png, "width=0&height=96"), me.clone()).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let answer = call(thumbnail_path(&png, "height=96"), me.clone()).await;
    assert_eq!(answer.0, StatusCode::BAD_REQUEST, "{}", answer.1);
    let answer = call(thumbnail_path(&png, "width=96&height=96"), None).await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    // The unauthenticated endpoint is frozen like downloads.
    let rest = png.strip_prefix("mxc://").unwrap();
    let legacy = format!("/_matrix/media/v3/thumbnail/{rest}?width=96&height=96");
    let answer = call(legacy, None).await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");
}

/// A valid PNG of `side`×`side` black 1-bit pixels whose image data is a
/// deflate stream of runs: a few hundred kilobytes that decode to
/// `side * (side / 8 + 1)` bytes.
fn png_bomb(side: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let mut crc_input = kind.to_vec();
        crc_input.extend(data);
        out.extend(&crc_input);
        out.extend(crc32(&crc_input).to_be_bytes());
    }
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    // Every row is a filter byte (0) and side/8 bytes of zeros.
    let raw_len = u64::from(side) * (u64::from(side) / 8 + 1);
    // One fixed-Huffman block: a literal zero, then copies of 258 bytes at
    // distance 1 (length code 285, distance code 0), then shorter ones.
    let mut bits = BitWriter::default();
    bits.put(1, 1); // final block
    bits.put(1, 2); // fixed Huffman codes
    bits.put_code(0b0011_0000, 8); // literal 0
    let mut left = raw_len - 1;
    while left >= 258 {
        bits.put_code(0b1100_0101, 8); // length 258
        bits.put_code(0, 5); // distance 1
        left -= 258;
    }
    while left > 0 {
        bits.put_code(0b0011_0000, 8);
        left -= 1;
    }
    bits.put_code(0, 7); // end of block
    let mut zlib = vec![0x78, 0x01];
    zlib.extend(bits.finish());
    // Adler-32 of zeros: a stays 1, b adds 1 per byte.
    let adler = ((raw_len % 65521) as u32) << 16 | 1;
    zlib.extend(adler.to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = side.to_be_bytes().to_vec();
    header.extend(side.to_be_bytes());
    header.extend([1, 0, 0, 0, 0]); // 1-bit greyscale
    chunk(&mut png, b"IHDR", &header);
    chunk(&mut png, b"IDAT", &zlib);
    chunk(&mut png, b"IEND", &[]);
    png
}

#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    current: u8,
    used: u8,
}

impl BitWriter {
    /// Puts a value least significant bit first (header fields).
    fn put(&mut self, value: u32, count: u8) {
        for i in 0..count {
            self.bit((value >> i) & 1 == 1);
        }
    }

    /// Puts a Huffman code most significant bit first.
    fn put_code(&mut self, code: u32, count: u8) {
        for i in (0..count).rev() {
            self.bit((code >> i) & 1 == 1);
        }
    }

    fn bit(&mut self, set: bool) {
        if set {
            self.current |= 1 << self.used;
        }
        self.used += 1;
        if self.used == 8 {
            self.bytes.push(self.current);
            self.current = 0;
            self.used = 0;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.used > 0 {
            self.bytes.push(self.current);
        }
        self.bytes
    }
}

#[tokio::test]
async fn a_decompression_bomb_is_refused_without_decoding() {
    // The bomb is valid: below the limit it decodes to its full size.
    let small = png_bomb(1000);
    let decoded = image::load_from_memory(&small).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (1000, 1000));

    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    // 60,000² pixels: 450 MB of 1-bit rows in a file of about 2.8 MB,
    // 14 GB once decoded to 8-bit RGBA.
    let bomb = png_bomb(60_000);
    assert!(bomb.len() < 3 << 20, "{}", bomb.len());
    let uri = upload(&server, &alice, "image/png", bomb.clone(), "bomb.png").await;
    let response = get(
        &server,
        &thumbnail_path(&uri, "width=96&height=96"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["errcode"], "M_TOO_LARGE");
    assert!(
        body["error"].as_str().unwrap().contains("60000x60000"),
        "{body}"
    );
    // The file itself is still stored and served as uploaded, and the
    // server goes on making thumbnails of other images.
    let response = get(&server, &download_path(&uri), Some(&alice), None).await;
    assert_eq!(response.bytes().await.unwrap().len(), bomb.len());
    let png = upload(&server, &alice, "image/png", sample("image/png"), "a.png").await;
    assert_eq!(
        thumbnail(&server, &alice, &png, "width=32&height=32&method=crop").await,
        ("image/png".to_owned(), 32, 32)
    );

    // The limit is the configured one.
    let strict = TestServer::start_with(|c| c.media.max_image_pixels = 1000).await;
    let bob = token(&strict.register("bob").await);
    let png = upload(&strict, &bob, "image/png", sample("image/png"), "a.png").await;
    let response = get(
        &strict,
        &thumbnail_path(&png, "width=32&height=32"),
        Some(&bob),
        None,
    )
    .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
}
