//! A sending server killed (SIGKILL) in the middle of a burst: every event
//! and every to-device message it acknowledged reaches the other server
//! once, whether the crash came before, during or after its transaction.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::federation::{free_port, start_federating, TestCa};
use common::PASSWORD;
use reqwest::StatusCode;
use serde_json::{json, Value};

const BINARY: &str = env!("CARGO_BIN_EXE_myelin");

/// The configuration file of a federating server process on `ip`.
fn write_config(dir: &Path, ca: &TestCa, ip: &str, port: u16) -> std::path::PathBuf {
    let (cert, key) = ca.issue(ip.parse().unwrap());
    let config = format!(
        r#"server_name = "{ip}:{port}"
listen = "127.0.0.1:0"
data_dir = "{data}"
registration = "open"
rate_limits = false

[password_hashing]
memory_kib = 64
iterations = 1

[federation]
listen = "{ip}:{port}"
tls_certificate = "{cert}"
tls_private_key = "{key}"
ca_certificates = "{ca}"
ip_range_allowlist = ["127.0.0.0/8"]
retry_base_ms = 200
retry_max_ms = 1000
"#,
        data = dir.join("data").display(),
        cert = cert.display(),
        key = key.display(),
        ca = ca.ca_pem.display(),
    );
    let path = dir.join("myelin.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Starts the binary and waits for the client listener's address.
/// A server process, killed when dropped (also when an assertion fails).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(config: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(BINARY)
        .env_clear()
        .arg("--config")
        .arg(config)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the server starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server logs its address");
        if line.contains("federation listening") {
            continue;
        }
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr: String = rest
                .chars()
                .take_while(|c| c.is_ascii_hexdigit() || ".:[]".contains(*c))
                .collect();
            break addr.parse().expect("a socket address");
        }
    };
    // Keep draining the log so the process never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    (child, addr)
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let mut request = http.request(method, url).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, Value::Null),
    }
}

#[tokio::test]
async fn every_acknowledged_event_and_to_device_message_reaches_the_peer_once_across_a_crash() {
    let ca = TestCa::new();
    let receiver = start_federating(&ca, "127.0.0.3", |config| {
        config.federation.retry_base_ms = 200;
        config.federation.retry_max_ms = 1_000;
    })
    .await;
    let (bob, bob_id) = receiver.register_named("bob", "Bob").await;

    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.0.6";
    let port = free_port(ip.parse().unwrap());
    let config = write_config(dir.path(), &ca, ip, port);
    let (mut child, addr) = spawn(&config);
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let (status, registered) = call(
        &http,
        reqwest::Method::POST,
        format!("{base}/_matrix/client/v3/register"),
        None,
        json!({ "username": "alice", "password": PASSWORD, "auth": { "type": "m.login.dummy" } }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{registered}");
    let alice = registered["access_token"].as_str().unwrap().to_owned();
    let (status, room) = call(
        &http,
        reqwest::Method::POST,
        format!("{base}/_matrix/client/v3/createRoom"),
        Some(&alice),
        json!({ "preset": "public_chat" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{room}");
    let room_id = room["room_id"].as_str().unwrap().to_owned();
    let (status, answer) = receiver
        .post(
            &format!(
                "/_matrix/client/v3/join/{}?via={ip}:{port}",
                room_id.replace('!', "%21")
            ),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // A burst of sends, each a to-device message to Bob's devices and a
    // room message, one after another; the process is killed while they
    // run. Whatever was answered 200 was acknowledged.
    let sender = {
        let (http, base, alice, room_id, bob_id) = (
            http.clone(),
            base.clone(),
            alice.clone(),
            room_id.clone(),
            bob_id.clone(),
        );
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..2000 {
                let url = format!("{base}/_matrix/client/v3/sendToDevice/org.example.burst/td{i}");
                let body = json!({ "messages": { &bob_id: { "*": { "n": i } } } });
                let (status, _) = call(&http, reqwest::Method::PUT, url, Some(&alice), body).await;
                if status != StatusCode::OK {
                    break;
                }
                let url = format!(
                    "{base}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/burst{i}"
                );
                let body = json!({ "msgtype": "m.text", "body": format!("burst {i}") });
                let (status, answer) =
                    call(&http, reqwest::Method::PUT, url, Some(&alice), body).await;
                if status != StatusCode::OK {
                    break;
                }
                acknowledged.push(answer["event_id"].as_str().unwrap().to_owned());
            }
            acknowledged
        })
    };
    // Kill once the receiver has seen some of the burst: transactions are
    // in flight.
    let mut seen_before_kill = 0;
    for _ in 0..600 {
        seen_before_kill = burst_bodies(&receiver, &bob, &room_id).await.len();
        if seen_before_kill >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen_before_kill >= 20, "the receiver saw the burst start");
    child.kill().unwrap();
    child.wait().unwrap();
    let acknowledged = sender.await.unwrap();
    assert!(acknowledged.len() < 2000, "the kill came during the burst");

    // Restarted, the sender finishes delivering from its durable queue.
    let restarted = Running(spawn(&config).0);
    let expected: Vec<String> = (0..acknowledged.len())
        .map(|i| format!("burst {i}"))
        .collect();
    let mut got = Vec::new();
    for _ in 0..300 {
        got = burst_bodies(&receiver, &bob, &room_id).await;
        if got.len() >= expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{} acknowledged, {} seen before the kill, {} arrived",
        expected.len(),
        seen_before_kill,
        got.len()
    );
    // Every acknowledged event arrived, once, in order. (An event written
    // but not yet answered when the process died may arrive too, after
    // them: it was stored, just never acknowledged.)
    assert!(
        got.len() >= expected.len(),
        "{} of {} arrived",
        got.len(),
        expected.len()
    );
    assert_eq!(got[..expected.len()], expected[..]);
    assert!(got.len() <= expected.len() + 1, "{got:?}");
    let mut unique = got.clone();
    unique.dedup();
    assert_eq!(unique, got, "no event arrived twice");

    // Each acknowledged to-device message came once (the one sent before
    // an unanswered room message was acknowledged too).
    let mut numbers = Vec::new();
    let mut since: Option<String> = None;
    for _ in 0..100 {
        let path = match &since {
            Some(since) => format!("/_matrix/client/v3/sync?timeout=0&since={since}"),
            None => "/_matrix/client/v3/sync?timeout=0".to_owned(),
        };
        let (status, sync) = receiver.get(&path, Some(&bob)).await;
        assert_eq!(status, StatusCode::OK, "{sync}");
        let events = sync["to_device"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        numbers.extend(events.iter().filter_map(|e| e["content"]["n"].as_u64()));
        since = sync["next_batch"].as_str().map(str::to_owned);
        if events.is_empty() && numbers.len() >= expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The restarted sender keeps running until both checks are done: a
    // to-device message queued behind the last room event may still be
    // on its way when that event has arrived.
    drop(restarted);
    let wanted: Vec<u64> = (0..expected.len() as u64).collect();
    assert!(
        numbers.len() >= wanted.len(),
        "{} of {} to-device messages",
        numbers.len(),
        wanted.len()
    );
    assert_eq!(numbers[..wanted.len()], wanted[..]);
    assert!(
        numbers.len() <= wanted.len() + 1,
        "a to-device message came twice: {numbers:?}"
    );
}

/// The burst messages in the receiver's timeline, oldest first.
async fn burst_bodies(server: &common::TestServer, token: &str, room_id: &str) -> Vec<String> {
    let (_, page) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=1000"),
            Some(token),
        )
        .await;
    let mut bodies: Vec<String> = page["chunk"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["content"]["body"].as_str())
        .filter(|body| body.starts_with("burst "))
        .map(str::to_owned)
        .collect();
    bodies.reverse();
    bodies
}
