//! A real bridge framework against Myelin: mautrix-python from PyPI runs
//! the echo bridge of `tests/python/bridge.py` (its transaction server,
//! its intents for the bot and a ghost user), registered with Myelin by a
//! registration file.
//!
//! The interpreter is `$MYELIN_TEST_PYTHON` when set, else that of a
//! virtual environment with the pinned packages below, provisioned on
//! first use (`myelin-testkit`). A package that cannot be had fails the
//! test: it is never skipped.

mod common;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{send_text, test_config, token, TestServer};
use myelin::config::Config;
use myelin_testkit::ca::free_port;
use myelin_testkit::python_for_tests;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The bridge framework and the packages it pulls, pinned.
const PACKAGES: &[&str] = &["mautrix==0.21.1", "aiohttp==3.14.5", "yarl==1.25.1"];
const AS_TOKEN: &str = "as-secret-for-the-echo-bridge";
const HS_TOKEN: &str = "hs-secret-for-the-echo-bridge";
const BOT: &str = "_echo_bot";

/// Writes the bridge's registration file; returns its path.
fn write_registration(dir: &Path, port: u16) -> PathBuf {
    let yaml = format!(
        r#"id: echo
url: "http://127.0.0.1:{port}"
as_token: {AS_TOKEN}
hs_token: {HS_TOKEN}
sender_localpart: {BOT}
rate_limited: false
receive_ephemeral: true
namespaces:
  users:
    - exclusive: true
      regex: '@_echo_.*:localhost'
  aliases: []
  rooms: []
"#
    );
    let path = dir.join("echo-registration.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn bridge_config(dir: &tempfile::TempDir, registration: PathBuf) -> Config {
    let mut config = test_config(dir);
    config.appservices.registration_files = vec![registration];
    // A bridge that is back is reached soon.
    config.appservices.retry_base_ms = 100;
    config.appservices.retry_max_ms = 1_000;
    config
}

/// The bridge process and its line-by-line output.
struct Bridge {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    /// Every event line seen, in order.
    events: Vec<Value>,
}

impl Bridge {
    async fn start(python: &Path, server: &TestServer, port: u16, echo: bool) -> Bridge {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/bridge.py");
        let mut child = tokio::process::Command::new(python)
            .arg(script)
            .env("BRIDGE_HS_URL", &server.base)
            .env("BRIDGE_SERVER_NAME", "localhost")
            .env("BRIDGE_PORT", port.to_string())
            .env("BRIDGE_AS_ID", "echo")
            .env("BRIDGE_AS_TOKEN", AS_TOKEN)
            .env("BRIDGE_HS_TOKEN", HS_TOKEN)
            .env("BRIDGE_BOT_LOCALPART", BOT)
            .env("BRIDGE_GHOST_PREFIX", "_echo_")
            .env("BRIDGE_ECHO", if echo { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut bridge = Bridge {
            child,
            stdin,
            lines,
            events: Vec::new(),
        };
        bridge.wait_for(|line| line.get("ready").is_some()).await;
        bridge
    }

    /// Reads lines until one matches (event lines are kept on the way).
    async fn wait_for(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| {
                    panic!("the bridge did not say it in time; saw {:?}", self.events)
                })
                .expect("the bridge's output")
                .unwrap_or_else(|| panic!("the bridge exited; saw {:?}", self.events));
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| panic!("not a JSON line from the bridge: {line}"));
            if let Some(error) = value.get("echo_error") {
                panic!("the bridge failed to answer: {error}");
            }
            if let Some(event) = value.get("event") {
                self.events.push(event.clone());
            }
            if wanted(&value) {
                return value;
            }
        }
    }

    async fn command(&mut self, command: Value) {
        let line = format!("{command}\n");
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn quit(mut self) {
        self.command(json!({ "quit": true })).await;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the bridge stops")
            .unwrap();
        assert!(status.success(), "the bridge exited with {status}");
    }
}

/// The user's room with the bridge's bot in it: created by the user, the
/// bot invited, and joined by the bridge when the invite reached it.
async fn room_with_bot(server: &TestServer, bridge: &mut Bridge, user: &str) -> String {
    let bot = format!("@{BOT}:localhost");
    let room_id = server
        .create_room(user, json!({ "invite": [bot], "name": "bridged" }))
        .await;
    bridge
        .wait_for(|line| {
            line["event"]["state_key"] == bot.as_str() && line["event"]["membership"] == "join"
        })
        .await;
    room_id
}

/// Syncs until a message with this body is in the room; its event.
async fn synced_message(server: &TestServer, user: &str, room_id: &str, body: &str) -> Value {
    let mut since: Option<String> = None;
    for _ in 0..30 {
        let path = match &since {
            Some(since) => format!("/_matrix/client/v3/sync?timeout=2000&since={since}"),
            None => "/_matrix/client/v3/sync?timeout=0".to_owned(),
        };
        let (status, answer) = server.get(&path, Some(user)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let events = answer["rooms"]["join"][room_id]["timeline"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(found) = events.into_iter().find(|e| e["content"]["body"] == body) {
            return found;
        }
        since = answer["next_batch"].as_str().map(str::to_owned);
    }
    panic!("{body:?} never reached the user's /sync");
}

#[tokio::test]
async fn a_mautrix_bridge_answers_as_a_ghost_and_pings() {
    // Before the server starts, so blocking this thread holds nothing up.
    let python = python_for_tests(PACKAGES);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let config = bridge_config(&dir, write_registration(dir.path(), port));
    let server = TestServer::start_in(dir, config, None).await;
    let mut bridge = Bridge::start(&python, &server, port, true).await;
    let alice = token(&server.register("alice").await);
    let room_id = room_with_bot(&server, &mut bridge, &alice).await;

    let sent = send_text(&server, &alice, &room_id, "t1", "hello bridge").await;
    bridge
        .wait_for(|line| line["event"]["event_id"] == sent.as_str())
        .await;
    let answered = bridge.wait_for(|line| line.get("answered").is_some()).await;
    let echo = synced_message(&server, &alice, &room_id, "echo: hello bridge").await;
    assert_eq!(echo["sender"], "@_echo_echo:localhost");
    assert_eq!(echo["event_id"], answered["answered"]["event_id"]);
    // The ghost was made by the bridge through Myelin, profile included.
    let (status, profile) = server
        .get(
            "/_matrix/client/v3/profile/@_echo_echo:localhost",
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(profile["displayname"], "Echo");
    // The bridge heard its own ghost's answer too: it is in its namespace.
    bridge
        .wait_for(|line| line["event"]["body"] == "echo: hello bridge")
        .await;

    // Ephemeral data reaches it when asked for: a read receipt here.
    let path = format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{sent}");
    let (status, _) = server.post(&path, Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    bridge
        .wait_for(|line| line["ephemeral"]["type"] == "m.receipt")
        .await;

    // The ping goes bridge -> Myelin -> bridge and back.
    bridge.command(json!({ "ping": "ping-1" })).await;
    let pong = bridge
        .wait_for(|line| line.get("pong").is_some() || line.get("ping_error").is_some())
        .await;
    assert!(pong.get("pong").is_some(), "{pong}");
    bridge.quit().await;
}

#[tokio::test]
async fn a_stopped_bridge_gets_every_message_once_and_in_order() {
    let python = python_for_tests(PACKAGES);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let registration = write_registration(dir.path(), port);
    let config = bridge_config(&dir, registration.clone());
    let server = TestServer::start_in(dir, config, None).await;
    let mut bridge = Bridge::start(&python, &server, port, true).await;
    let alice = token(&server.register("alice").await);
    let room_id = room_with_bot(&server, &mut bridge, &alice).await;
    bridge.quit().await;

    // The bridge is down for all 50, and Myelin restarts once among them.
    let mut sent = Vec::new();
    for index in 0..25 {
        let body = format!("message {index}");
        sent.push(send_text(&server, &alice, &room_id, &format!("a{index}"), &body).await);
    }
    let dir = server.stop().await;
    let config = bridge_config(&dir, registration);
    let server = TestServer::start_in(dir, config, None).await;
    for index in 25..50 {
        let body = format!("message {index}");
        sent.push(send_text(&server, &alice, &room_id, &format!("a{index}"), &body).await);
    }

    let mut bridge = Bridge::start(&python, &server, port, false).await;
    let last = sent.last().unwrap().clone();
    bridge
        .wait_for(|line| line["event"]["event_id"] == last.as_str())
        .await;
    // Anything sent twice would come within the next transactions.
    bridge.command(json!({ "ping": "settle" })).await;
    bridge.wait_for(|line| line.get("pong").is_some()).await;
    let received: Vec<String> = bridge
        .events
        .iter()
        .filter(|event| event["type"] == "m.room.message")
        .map(|event| event["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(received, sent, "every message once, in the order sent");
    let unique: HashSet<&String> = received.iter().collect();
    assert_eq!(unique.len(), 50);
    bridge.quit().await;
}
