//! A server on a free loopback port with its own data directory, and an
//! HTTP client to talk to it.

#![allow(dead_code)]

pub mod federation;
pub mod ws;

use std::sync::Arc;

use myelin::config::{Config, RegistrationMode};
use myelin::server::{self, RunningServer};
use myelin::services::clock::Clock;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

pub const PASSWORD: &str = "correct horse battery staple";

pub struct TestServer {
    pub base: String,
    pub http: reqwest::Client,
    pub server: Option<RunningServer>,
    pub dir: TempDir,
}

/// The configuration tests start from: open registration, no rate limits,
/// cheap password hashing, an ephemeral port.
pub fn test_config(dir: &TempDir) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        registration: RegistrationMode::Open,
        ..Config::default()
    };
    config.rate_limits.enabled = false;
    config.password_hashing.memory_kib = 64;
    config.password_hashing.iterations = 1;
    config
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(&dir);
        adjust(&mut config);
        Self::start_in(dir, config, None).await
    }

    pub async fn start_in(dir: TempDir, config: Config, clock: Option<Arc<dyn Clock>>) -> Self {
        let server = match clock {
            Some(clock) => server::start_with_clock(config, clock).await,
            None => server::start(config).await,
        }
        .expect("server starts");
        TestServer {
            base: format!("http://{}", server.addr),
            http: reqwest::Client::new(),
            server: Some(server),
            dir,
        }
    }

    /// Stops the server and gives back its data directory.
    pub async fn stop(mut self) -> TempDir {
        self.server
            .take()
            .unwrap()
            .stop()
            .await
            .expect("clean stop");
        self.dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request and returns the status and the JSON answer (which
    /// every answer of the client API must be).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{path}: answer is not JSON: {text:?}"));
        (status, value)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.call(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, token, Some(body)).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, path, token, Some(body)).await
    }

    /// Registers through the open (`m.login.dummy`) flow; returns the answer.
    pub async fn register(&self, username: &str) -> Value {
        let body = json!({ "username": username, "password": PASSWORD });
        let (status, challenge) = self
            .post("/_matrix/client/v3/register", None, body.clone())
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
        let mut body = body;
        body["auth"] = json!({ "type": "m.login.dummy", "session": challenge["session"] });
        let (status, answer) = self.post("/_matrix/client/v3/register", None, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer
    }

    /// Registers with a chosen device ID, named "<username>'s phone".
    pub async fn register_device(&self, username: &str, device_id: &str) -> Value {
        let body = json!({
            "username": username,
            "password": PASSWORD,
            "device_id": device_id,
            "initial_device_display_name": format!("{username}'s phone"),
            "auth": { "type": "m.login.dummy" },
        });
        let (status, answer) = self.post("/_matrix/client/v3/register", None, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer
    }

    /// Creates a room (the createRoom body as given); returns its ID.
    pub async fn create_room(&self, token: &str, body: Value) -> String {
        let (status, answer) = self
            .post("/_matrix/client/v3/createRoom", Some(token), body)
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["room_id"].as_str().expect("room_id").to_owned()
    }

    /// Logs in with a password; returns the answer.
    pub async fn login(&self, username: &str, device_id: Option<&str>) -> Value {
        let mut body = json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": username },
            "password": PASSWORD,
        });
        if let Some(device_id) = device_id {
            body["device_id"] = json!(device_id);
        }
        let (status, answer) = self.post("/_matrix/client/v3/login", None, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer
    }
}

/// Asserts a Matrix error answer.
pub fn assert_error(answer: &(StatusCode, Value), status: StatusCode, errcode: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["errcode"], errcode, "{}", answer.1);
    assert!(answer.1["error"].is_string(), "no error text: {}", answer.1);
}

pub fn token(answer: &Value) -> String {
    answer["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

/// Sends a text message; returns its event ID.
pub async fn send_text(
    server: &TestServer,
    token: &str,
    room_id: &str,
    txn: &str,
    body: &str,
) -> String {
    let content = json!({ "msgtype": "m.text", "body": body });
    send_message(server, token, room_id, txn, content).await
}

/// Sends an `m.room.message` with this content; returns its event ID.
pub async fn send_message(
    server: &TestServer,
    token: &str,
    room_id: &str,
    txn: &str,
    content: Value,
) -> String {
    let (status, answer) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/{txn}"),
            Some(token),
            content,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["event_id"].as_str().unwrap().to_owned()
}

/// Joins a room, which must succeed.
pub async fn join(server: &TestServer, token: &str, room_id: &str) {
    let path = format!("/_matrix/client/v3/rooms/{room_id}/join");
    let (status, answer) = server.post(&path, Some(token), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

/// The answer of a waiting request, which a write must have woken: the
/// request waits up to a minute, so an answer only after half a minute
/// means the wake-up was lost and the request ran into its timeout.
pub async fn woken(waiting: tokio::task::JoinHandle<Value>) -> Value {
    tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("woken by the write, not by the timeout")
        .unwrap()
}
