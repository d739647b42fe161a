//! The `myelin` binary as an operator runs it: command line, configuration
//! errors, signals, and a crash (SIGKILL) in the middle of writes.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::PASSWORD;
use reqwest::StatusCode;
use serde_json::{json, Value};

const BINARY: &str = env!("CARGO_BIN_EXE_myelin");

/// The binary with a clean environment and a cheap, test-only setup.
fn myelin(data_dir: &Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .env("MYELIN_DATA_DIR", data_dir)
        .env("MYELIN_LISTEN", "127.0.0.1:0")
        .env("MYELIN_REGISTRATION", "open")
        .env("MYELIN_RATE_LIMITS", "false")
        .env("MYELIN_PASSWORD_HASHING__MEMORY_KIB", "64")
        .env("MYELIN_PASSWORD_HASHING__ITERATIONS", "1")
        .stdin(Stdio::null());
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A server process whose log is read until it says where it listens.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl ServerProcess {
    fn start(mut command: Command) -> Self {
        let mut child = command
            .arg("serve")
            .stderr(Stdio::piped())
            .spawn()
            .expect("server starts");
        let stderr = child.stderr.take().unwrap();
        let (lines_tx, lines_rx) = mpsc::channel();
        // Keep draining the log so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let addr = loop {
            let line = lines_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the server logs its address");
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_hexdigit() || ".:[]".contains(*c))
                    .collect();
                break addr.parse().expect("a socket address");
            }
        };
        ServerProcess {
            child,
            addr,
            log: lines_rx,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn help_lists_the_commands() {
    let output = run(Command::new(BINARY).arg("--help"));
    assert!(output.status.success());
    let help = text(&output.stdout);
    for word in ["serve", "user", "--config"] {
        assert!(help.contains(word), "{help}");
    }
    let output = run(Command::new(BINARY).args(["user", "--help"]));
    let help = text(&output.stdout);
    assert!(
        help.contains("add") && help.contains("reset-password"),
        "{help}"
    );
}

#[test]
fn a_bad_configuration_stops_before_anything_is_written() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let output = run(myelin(&data).env("MYELIN_LISTEN", "nowhere").arg("serve"));
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("listen"), "{stderr}");
    assert!(!data.exists(), "nothing may be written");

    let file = root.path().join("myelin.toml");
    std::fs::write(
        &file,
        "server_name = \"example.org\"\nfavourite_colour = \"blue\"\n",
    )
    .unwrap();
    let output = run(myelin(&data).arg("--config").arg(&file).arg("serve"));
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("favourite_colour"), "{stderr}");
    assert!(!data.exists(), "nothing may be written");

    let missing = root.path().join("missing.toml");
    let output = run(myelin(&data).arg("--config").arg(&missing));
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("missing.toml"));
}

#[test]
fn operators_manage_users_from_the_command_line() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path();
    let output = run(myelin(data).args(["user", "add", "alice", "--password", "first"]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("created @alice:localhost"));

    let output = run(myelin(data).args(["user", "add", "alice", "--password", "x"]));
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("taken"),
        "{}",
        text(&output.stderr)
    );
    let output = run(myelin(data).args(["user", "add", "Bad Name", "--password", "x"]));
    assert!(!output.status.success());

    // A password from standard input, as scripts give it.
    let mut add = myelin(data)
        .args(["user", "add", "bob", "--admin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    add.stdin
        .take()
        .unwrap()
        .write_all(b"from stdin\n")
        .unwrap();
    let output = add.wait_with_output().unwrap();
    assert!(output.status.success());
    assert!(text(&output.stdout).contains("@bob:localhost (admin)"));

    let output =
        run(myelin(data).args(["user", "reset-password", "alice", "--password", "second"]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let output = run(myelin(data).args(["user", "reset-password", "nobody", "--password", "x"]));
    assert!(!output.status.success());

    let server = ServerProcess::start(myelin(data));
    // The database belongs to the running server now.
    let output = run(myelin(data).args(["user", "add", "carol", "--password", "x"]));
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("in use"),
        "{}",
        text(&output.stderr)
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let http = reqwest::Client::new();
        for (user, password, expected) in [
            ("alice", "first", StatusCode::FORBIDDEN),
            ("alice", "second", StatusCode::OK),
            ("bob", "from stdin", StatusCode::OK),
        ] {
            let body = json!({ "type": "m.login.password", "user": user, "password": password });
            let response = http
                .post(server.url("/_matrix/client/v3/login"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), expected, "{user} with {password}");
        }
        // Alice reports Bob; the report is read from the command line.
        let body = json!({ "type": "m.login.password", "user": "alice", "password": "second" });
        let login: serde_json::Value = http
            .post(server.url("/_matrix/client/v3/login"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let response = http
            .post(server.url("/_matrix/client/v3/users/@bob:localhost/report"))
            .bearer_auth(login["access_token"].as_str().unwrap())
            .json(&json!({ "reason": "spam" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    });
    drop(server);
    let output = run(myelin(data).args(["report", "list"]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let lines: Vec<serde_json::Value> = text(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["kind"], "user");
    assert_eq!(lines[0]["user_id"], "@bob:localhost");
    assert_eq!(lines[0]["reporter"], "@alice:localhost");
    assert_eq!(lines[0]["reason"], "spam");
    let after = lines[0]["id"].as_u64().unwrap().to_string();
    let output = run(myelin(data).args(["report", "list", "--after", &after]));
    assert!(output.status.success());
    assert_eq!(text(&output.stdout), "");
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let root = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(myelin(root.path()));
    let pid = server.child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let log: Vec<String> = server.log.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("SIGTERM")), "{log:?}");
    assert!(log.iter().any(|l| l.contains("stopped")), "{log:?}");
}

#[test]
fn logs_can_be_json_lines() {
    let root = tempfile::tempdir().unwrap();
    let mut command = myelin(root.path());
    command.env("MYELIN_LOG__FORMAT", "json");
    let mut server = ServerProcess::start(command);
    let pid = server.child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    assert!(server.child.wait().unwrap().success());
    let log: Vec<String> = server.log.try_iter().collect();
    assert!(!log.is_empty());
    for line in &log {
        let entry: Value = serde_json::from_str(line).expect("each log line is JSON");
        assert!(entry["level"].is_string(), "{line}");
        assert!(entry["fields"]["message"].is_string(), "{line}");
    }
    assert!(log.iter().any(|l| l.contains("SIGINT")), "{log:?}");
}

/// What one writer saw acknowledged before the crash.
#[derive(Default)]
struct Acknowledged {
    /// (user ID, access token) of every answered registration.
    registrations: Vec<(String, String)>,
    /// The writer's own user, and the last display name number answered.
    profile: Option<(String, String, u64)>,
}

async fn writer(base: String, id: usize) -> Acknowledged {
    let http = reqwest::Client::new();
    let mut seen = Acknowledged::default();
    for i in 0u64.. {
        let username = format!("w{id}n{i}");
        let body = json!({
            "username": username,
            "password": PASSWORD,
            "auth": { "type": "m.login.dummy" },
        });
        let Ok(response) = http
            .post(format!("{base}/_matrix/client/v3/register"))
            .json(&body)
            .send()
            .await
        else {
            break;
        };
        if response.status() != StatusCode::OK {
            break;
        }
        let Ok(answer) = response.json::<Value>().await else {
            break;
        };
        let user_id = answer["user_id"].as_str().unwrap().to_owned();
        let token = answer["access_token"].as_str().unwrap().to_owned();
        seen.registrations.push((user_id.clone(), token.clone()));
        let (owner, owner_token) = match &seen.profile {
            Some((owner, owner_token, _)) => (owner.clone(), owner_token.clone()),
            None => (user_id, token),
        };
        let Ok(response) = http
            .put(format!(
                "{base}/_matrix/client/v3/profile/{owner}/displayname"
            ))
            .bearer_auth(&owner_token)
            .json(&json!({ "displayname": format!("v{i}") }))
            .send()
            .await
        else {
            break;
        };
        if response.status() != StatusCode::OK {
            break;
        }
        seen.profile = Some((owner, owner_token, i));
    }
    seen
}

#[test]
fn a_crash_loses_no_acknowledged_write() {
    stop_during_writes_and_check(libc::SIGKILL);
}

#[test]
fn a_graceful_stop_finishes_in_flight_writes() {
    stop_during_writes_and_check(libc::SIGTERM);
}

/// Stops the server with `signal` while eight clients write, restarts it,
/// and checks that every write that was answered is there.
fn stop_during_writes_and_check(signal: libc::c_int) {
    let root = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut server = ServerProcess::start(myelin(root.path()));
    let base = format!("http://{}", server.addr);
    let writers: Vec<_> = (0..8)
        .map(|id| runtime.spawn(writer(base.clone(), id)))
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    // With SIGKILL the process gets no chance to flush anything.
    let pid = server.child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    let status = server.child.wait().unwrap();
    if signal == libc::SIGTERM {
        assert!(status.success(), "{status:?}");
    }
    let seen: Vec<Acknowledged> = runtime.block_on(async {
        let mut seen = Vec::new();
        for writer in writers {
            seen.push(writer.await.unwrap());
        }
        seen
    });
    drop(server);
    let registrations: usize = seen.iter().map(|s| s.registrations.len()).sum();
    assert!(
        registrations >= 16,
        "too few writes to prove anything: {registrations}"
    );
    eprintln!("{registrations} registrations acknowledged before signal {signal}");

    let server = ServerProcess::start(myelin(root.path()));
    runtime.block_on(async {
        let http = reqwest::Client::new();
        for writer in &seen {
            for (user_id, token) in &writer.registrations {
                let response = http
                    .get(server.url("/_matrix/client/v3/account/whoami"))
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK, "{user_id} was lost");
                let me: Value = response.json().await.unwrap();
                assert_eq!(me["user_id"], user_id.as_str());
            }
            if let Some((owner, _, acknowledged)) = &writer.profile {
                let path = format!("/_matrix/client/v3/profile/{owner}/displayname");
                let answer: Value = http
                    .get(server.url(&path))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let stored: u64 = answer["displayname"].as_str().unwrap()[1..]
                    .parse()
                    .unwrap();
                // A later write may have landed without its answer; an
                // earlier value would mean an acknowledged write was lost.
                assert!(
                    stored >= *acknowledged,
                    "{owner}: {stored} < {acknowledged}"
                );
            }
        }
    });
}

/// Content for upload `n` of uploader `id`: distinct, and long enough that
/// a kill can land in the middle of writing it.
fn media_content(id: usize, n: u64) -> Vec<u8> {
    let size = 64 * 1024 + (n as usize % 7) * 20_000;
    (0..size)
        .map(|i| (i as u64 * 31 + n * 7 + id as u64 * 13) as u8)
        .collect()
}

async fn uploader(base: String, token: String, id: usize) -> Vec<(String, u64)> {
    let http = reqwest::Client::new();
    let mut acknowledged = Vec::new();
    for n in 0u64.. {
        let Ok(response) = http
            .post(format!("{base}/_matrix/media/v3/upload"))
            .bearer_auth(&token)
            .header("Content-Type", "application/octet-stream")
            .body(media_content(id, n))
            .send()
            .await
        else {
            break;
        };
        if response.status() != StatusCode::OK {
            break;
        }
        let Ok(answer) = response.json::<Value>().await else {
            break;
        };
        let uri = answer["content_uri"].as_str().unwrap().to_owned();
        acknowledged.push((uri, n));
    }
    acknowledged
}

#[test]
fn a_crash_during_uploads_loses_no_acknowledged_media() {
    let root = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut server = ServerProcess::start(myelin(root.path()));
    let base = format!("http://{}", server.addr);
    let token = runtime.block_on(async {
        let body = json!({
            "username": "uploader",
            "password": PASSWORD,
            "auth": { "type": "m.login.dummy" },
        });
        let answer: Value = reqwest::Client::new()
            .post(format!("{base}/_matrix/client/v3/register"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["access_token"].as_str().unwrap().to_owned()
    });
    let uploaders: Vec<_> = (0..4)
        .map(|id| runtime.spawn(uploader(base.clone(), token.clone(), id)))
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let pid = server.child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    server.child.wait().unwrap();
    let seen: Vec<Vec<(String, u64)>> = runtime.block_on(async {
        let mut seen = Vec::new();
        for uploader in uploaders {
            seen.push(uploader.await.unwrap());
        }
        seen
    });
    drop(server);
    let total: usize = seen.iter().map(Vec::len).sum();
    assert!(total >= 8, "too few uploads to prove anything: {total}");
    eprintln!("{total} uploads acknowledged before SIGKILL");

    let server = ServerProcess::start(myelin(root.path()));
    runtime.block_on(async {
        let http = reqwest::Client::new();
        for (id, uploads) in seen.iter().enumerate() {
            for (uri, n) in uploads {
                let rest = uri.strip_prefix("mxc://").unwrap();
                let response = http
                    .get(server.url(&format!("/_matrix/client/v1/media/download/{rest}")))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK, "{uri} was lost");
                let bytes = response.bytes().await.unwrap();
                assert!(bytes.to_vec() == media_content(id, *n), "{uri} differs");
            }
        }
    });
}

/// Registers `username` and makes a room: (access token, room ID).
async fn user_with_room(
    http: &reqwest::Client,
    server: &ServerProcess,
    username: &str,
) -> (String, String) {
    let body = json!({
        "username": username, "password": PASSWORD,
        "auth": { "type": "m.login.dummy" },
    });
    let answer: Value = http
        .post(server.url("/_matrix/client/v3/register"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = answer["access_token"].as_str().unwrap().to_owned();
    let room: Value = http
        .post(server.url("/_matrix/client/v3/createRoom"))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (token, room["room_id"].as_str().unwrap().to_owned())
}

/// Sends `body` as message `txn`; its event ID.
async fn send_text(
    http: &reqwest::Client,
    server: &ServerProcess,
    (token, room_id): (&str, &str),
    txn: &str,
    body: &str,
) -> String {
    let path = format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/{txn}");
    let response = http
        .put(server.url(&path))
        .bearer_auth(token)
        .json(&json!({ "msgtype": "m.text", "body": body }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    answer["event_id"].as_str().unwrap().to_owned()
}

/// The room's messages, oldest first, as (event ID, body).
async fn messages(
    http: &reqwest::Client,
    server: &ServerProcess,
    (token, room_id): (&str, &str),
) -> Vec<(String, String)> {
    let path = format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=f&limit=1000");
    let page: Value = http
        .get(server.url(&path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| {
            let body = e["content"]["body"].as_str().unwrap().to_owned();
            (e["event_id"].as_str().unwrap().to_owned(), body)
        })
        .collect()
}

/// Event IDs in the hot and the archived events table, read from the
/// database itself (the server must be stopped).
fn event_tiers(data_dir: &Path) -> (Vec<String>, Vec<String>) {
    use myelin::storage::tables::{ARCHIVED_PDUS, PDUS};
    use myelin::storage::{Direction, KeyRange, Storage};
    let storage = Storage::open(&data_dir.join("db"), true).unwrap();
    let everything = KeyRange::prefix(b"");
    let ids = |table| -> Vec<String> {
        storage
            .scan(table, &everything, Direction::Forward, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    };
    (ids(PDUS), ids(ARCHIVED_PDUS))
}

#[test]
fn a_crash_during_the_archive_mover_loses_and_repeats_nothing() {
    let root = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut command = myelin(root.path());
    command.env("MYELIN_ARCHIVE__ENABLED", "false");
    let mut server = ServerProcess::start(command);
    let http = reqwest::Client::new();
    let (token, room_id) = runtime.block_on(user_with_room(&http, &server, "archivist"));
    let room = (token.as_str(), room_id.as_str());
    let sent: Vec<String> = runtime.block_on(async {
        let mut sent = Vec::new();
        for n in 0..400 {
            let body = format!("message {n}");
            sent.push(send_text(&http, &server, room, &format!("t{n}"), &body).await);
        }
        sent
    });
    let pid = server.child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    server.child.wait().unwrap();
    drop(server);
    let (hot, archived) = event_tiers(root.path());
    assert!(archived.is_empty());
    let all: std::collections::BTreeSet<String> = hot.into_iter().collect();

    // Everything is old enough at once; small batches with pauses, so the
    // kill lands in the middle of the pass.
    let archiving = |command: &mut Command| {
        command
            .env("MYELIN_ARCHIVE__AFTER_DAYS", "0")
            .env("MYELIN_ARCHIVE__BATCH_SIZE", "10")
            .env("MYELIN_ARCHIVE__PAUSE_MS", "40");
    };
    let mut command = myelin(root.path());
    archiving(&mut command);
    let mut server = ServerProcess::start(command);
    std::thread::sleep(Duration::from_millis(600));
    let pid = server.child.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    server.child.wait().unwrap();
    drop(server);

    let (hot, archived) = event_tiers(root.path());
    assert!(
        !archived.is_empty() && archived.len() < sent.len(),
        "the kill must land in the middle of the pass: {} archived",
        archived.len()
    );
    let check = |hot: &[String], archived: &[String]| {
        let hot: std::collections::BTreeSet<&String> = hot.iter().collect();
        for id in archived {
            assert!(!hot.contains(id), "{id} is in both tiers");
        }
        let union: std::collections::BTreeSet<String> =
            hot.into_iter().chain(archived).cloned().collect();
        assert_eq!(union, all, "events lost or made up");
    };
    check(&hot, &archived);

    // The pass resumes where it stopped and finishes.
    let mut command = myelin(root.path());
    archiving(&mut command);
    let output = run(command.args(["archive", "run"]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let status: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["pass_under_way"], false, "{status}");
    let (hot, archived) = event_tiers(root.path());
    check(&hot, &archived);
    for id in &sent {
        assert!(archived.contains(id), "{id} was not archived");
    }

    // Every message reads back exactly once, in order.
    let mut command = myelin(root.path());
    command.env("MYELIN_ARCHIVE__ENABLED", "false");
    let server = ServerProcess::start(command);
    let read = runtime.block_on(messages(&http, &server, room));
    let expected: Vec<(String, String)> = sent
        .iter()
        .enumerate()
        .map(|(n, id)| (id.clone(), format!("message {n}")))
        .collect();
    assert_eq!(read, expected);
}

#[test]
fn the_archive_lives_where_configured_and_its_status_reads_while_serving() {
    let root = tempfile::tempdir().unwrap();
    let cold = root.path().join("cold");
    let data = root.path().join("data");
    let configured = |command: &mut Command| {
        command
            .env("MYELIN_ARCHIVE__PATH", &cold)
            .env("MYELIN_ARCHIVE__AFTER_DAYS", "0");
    };
    let mut command = myelin(&data);
    configured(&mut command);
    let server = ServerProcess::start(command);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let (token, room_id) = runtime.block_on(user_with_room(&http, &server, "mover"));
    let room = (token.as_str(), room_id.as_str());
    runtime.block_on(async {
        for n in 0..30 {
            send_text(&http, &server, room, &format!("m{n}"), &format!("cold {n}")).await;
        }
    });

    // The server holds the database; the status reads it anyway.
    let mut command = myelin(&data);
    configured(&mut command);
    let output = run(command.args(["archive", "status"]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let status: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(status["hot"]["events"].as_u64().unwrap() >= 30, "{status}");
    // Moving needs the database to itself.
    let mut command = myelin(&data);
    configured(&mut command);
    let output = run(command.args(["archive", "run"]));
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("in use"),
        "{}",
        text(&output.stderr)
    );
    drop(server);

    for action in ["run", "compact"] {
        let mut command = myelin(&data);
        configured(&mut command);
        let output = run(command.args(["archive", action]));
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    let mut command = myelin(&data);
    configured(&mut command);
    let status: Value =
        serde_json::from_slice(&run(command.args(["archive", "status"])).stdout).unwrap();
    assert!(
        status["archived"]["events"].as_u64().unwrap() >= 30,
        "{status}"
    );
    let files: Vec<String> = std::fs::read_dir(&cold)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.iter().any(|name| name.ends_with(".sst")), "{files:?}");

    let mut command = myelin(&data);
    configured(&mut command);
    let server = ServerProcess::start(command);
    let bodies: Vec<String> = runtime
        .block_on(messages(&http, &server, room))
        .into_iter()
        .map(|(_, body)| body)
        .collect();
    let expected: Vec<String> = (0..30).map(|n| format!("cold {n}")).collect();
    assert_eq!(bodies, expected);

    // A backup taken while this server runs restores into another data
    // directory whose archive lives elsewhere again.
    let backup = root.path().join("backup");
    let mut command = myelin(&data);
    configured(&mut command);
    let output = run(command.arg("backup").arg(&backup));
    assert!(output.status.success(), "{}", text(&output.stderr));
    drop(server);
    let cold_again = root.path().join("cold-again");
    let data_again = root.path().join("data-again");
    let mut command = myelin(&data_again);
    command
        .env("MYELIN_ARCHIVE__PATH", &cold_again)
        .env("MYELIN_ARCHIVE__AFTER_DAYS", "0");
    let output = run(command.arg("restore").arg(&backup));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let moved: Vec<String> = std::fs::read_dir(&cold_again)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(moved.iter().any(|name| name.ends_with(".sst")), "{moved:?}");
    let mut command = myelin(&data_again);
    command
        .env("MYELIN_ARCHIVE__PATH", &cold_again)
        .env("MYELIN_ARCHIVE__AFTER_DAYS", "0");
    let server = ServerProcess::start(command);
    let bodies: Vec<String> = runtime
        .block_on(messages(&http, &server, room))
        .into_iter()
        .map(|(_, body)| body)
        .collect();
    assert_eq!(bodies, expected);
}
