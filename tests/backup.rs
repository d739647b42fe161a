//! Backups with the real binary: `myelin backup` while the server runs
//! and sends go on (the server takes it through its control socket), and
//! with the server stopped; `myelin restore` makes a data directory from
//! it, and a server on that directory answers as the original did.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{join, send_text, test_config, token, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

const BINARY: &str = env!("CARGO_BIN_EXE_myelin");

/// Runs the binary on a data directory with a clean environment.
async fn myelin(data_dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .env("MYELIN_DATA_DIR", data_dir)
        .args(args)
        .stdin(Stdio::null());
    tokio::task::spawn_blocking(move || command.output().expect("the binary runs"))
        .await
        .unwrap()
}

fn succeeded(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An answer without what depends on the moment it was given (`age`).
fn settled(mut value: Value) -> Value {
    fn strip(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("age");
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut value);
    value
}

/// The room's whole timeline, oldest first.
async fn timeline(server: &TestServer, token: &str, room: &str) -> Vec<Value> {
    let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=f&limit=1000");
    let (status, answer) = server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .cloned()
        .map(settled)
        .collect()
}

async fn answer(server: &TestServer, token: &str, path: &str) -> Value {
    let (status, answer) = server.get(path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{path}: {answer}");
    settled(answer)
}

/// The state as a sorted list, for comparison.
async fn state(server: &TestServer, token: &str, room: &str) -> Vec<Value> {
    let mut events = answer(
        server,
        token,
        &format!("/_matrix/client/v3/rooms/{room}/state"),
    )
    .await
    .as_array()
    .unwrap()
    .clone();
    events.sort_by_key(|e| e["event_id"].as_str().unwrap().to_owned());
    events
}

async fn download(server: &TestServer, token: &str, uri: &str) -> Vec<u8> {
    let path = uri.strip_prefix("mxc://").unwrap();
    let response = server
        .http
        .get(server.url(&format!("/_matrix/client/v1/media/download/{path}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.bytes().await.unwrap().to_vec()
}

/// Restores `backup` into a new data directory and starts a server there.
async fn restored(backup: &Path) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    succeeded(&myelin(dir.path(), &["restore", backup.to_str().unwrap()]).await);
    let config = test_config(&dir);
    TestServer::start_in(dir, config, None).await
}

#[tokio::test]
async fn a_backup_taken_under_sends_restores_to_a_server_that_answers_the_same() {
    let original = TestServer::start().await;
    let alice = token(&original.register("alice").await);
    let bob = token(&original.register("bob").await);
    let room = original
        .create_room(
            &alice,
            json!({ "preset": "public_chat", "name": "Backed up", "topic": "all of it" }),
        )
        .await;
    join(&original, &bob, &room).await;
    let picture: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let response = original
        .http
        .post(original.url("/_matrix/media/v3/upload?filename=picture.bin"))
        .bearer_auth(&alice)
        .header("content-type", "application/octet-stream")
        .body(picture.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let uri = response.json::<Value>().await.unwrap()["content_uri"]
        .as_str()
        .unwrap()
        .to_owned();
    for n in 0..20 {
        send_text(
            &original,
            &alice,
            &room,
            &format!("before-{n}"),
            &format!("message {n}"),
        )
        .await;
    }

    // Bob keeps sending while the backup is taken.
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let http = original.http.clone();
        let base = original.base.clone();
        let (bob, room) = (bob.clone(), room.clone());
        let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let url =
                    format!("{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/during-{n}");
                let body = json!({ "msgtype": "m.text", "body": format!("during {n}") });
                let response = http
                    .put(url)
                    .bearer_auth(&bob)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let event: Value = response.json().await.unwrap();
                acknowledged
                    .lock()
                    .unwrap()
                    .push(event["event_id"].as_str().unwrap().to_owned());
                n += 1;
            }
        })
    };
    while acknowledged.lock().unwrap().len() < 5 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let backup_dir = tempfile::tempdir().unwrap();
    let backup = backup_dir.path().join("online");
    let before_backup: Vec<String> = acknowledged.lock().unwrap().clone();
    let output = myelin(original.dir.path(), &["backup", backup.to_str().unwrap()]).await;
    let manifest: Value = serde_json::from_str(&succeeded(&output)).unwrap();
    let after_backup = acknowledged.lock().unwrap().len();
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    assert_eq!(manifest["server_name"], "localhost");
    assert_eq!(manifest["media_files"], 1, "{manifest}");
    assert_eq!(manifest["media_bytes"], picture.len(), "{manifest}");
    assert!(backup.join("db").is_dir() && backup.join("backup.json").is_file());

    let copy = restored(&backup).await;
    // The same account, device and token.
    let (status, whoami) = copy
        .get("/_matrix/client/v3/account/whoami", Some(&alice))
        .await;
    assert_eq!(status, StatusCode::OK, "{whoami}");
    assert_eq!(whoami["user_id"], "@alice:localhost");

    // The restored timeline is the original's up to the checkpoint: every
    // message acknowledged before the backup began, none invented, none
    // out of order.
    let theirs = timeline(&original, &alice, &room).await;
    let ours = timeline(&copy, &alice, &room).await;
    assert!(ours.len() <= theirs.len());
    assert_eq!(
        ours[..],
        theirs[..ours.len()],
        "the restored timeline is not a prefix"
    );
    let restored_ids: Vec<&str> = ours
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    for event_id in &before_backup {
        assert!(
            restored_ids.contains(&event_id.as_str()),
            "{event_id} acknowledged before the backup is missing"
        );
    }
    let sent_during = restored_ids
        .iter()
        .filter(|id| acknowledged.lock().unwrap().iter().any(|a| a == *id))
        .count();
    assert!(sent_during >= before_backup.len() && sent_during <= after_backup + 1);
    eprintln!(
        "backup under sends: {} sent before it began, {} by its end, {} in the backup",
        before_backup.len(),
        after_backup,
        sent_during
    );

    // Every other answer about the room matches too.
    assert_eq!(
        state(&copy, &alice, &room).await,
        state(&original, &alice, &room).await
    );
    for path in [
        format!("/_matrix/client/v3/rooms/{room}/joined_members"),
        format!("/_matrix/client/v3/rooms/{room}/members"),
        format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/"),
        "/_matrix/client/v3/joined_rooms".to_owned(),
        "/_matrix/client/v3/profile/@bob:localhost".to_owned(),
        "/_matrix/client/v3/devices".to_owned(),
    ] {
        assert_eq!(
            answer(&copy, &alice, &path).await,
            answer(&original, &alice, &path).await,
            "{path}"
        );
    }
    for event_id in restored_ids.iter().step_by(3) {
        for path in [
            format!("/_matrix/client/v3/rooms/{room}/event/{event_id}"),
            format!("/_matrix/client/v3/rooms/{room}/context/{event_id}?limit=2"),
        ] {
            let ours = answer(&copy, &bob, &path).await;
            let theirs = answer(&original, &bob, &path).await;
            if path.contains("/context/") {
                // Later events exist only in the original: compare what
                // comes before.
                assert_eq!(ours["event"], theirs["event"], "{path}");
                assert_eq!(ours["events_before"], theirs["events_before"], "{path}");
                assert_eq!(ours["state"], theirs["state"], "{path}");
            } else {
                assert_eq!(ours, theirs, "{path}");
            }
        }
    }
    assert_eq!(download(&copy, &alice, &uri).await, picture);
    // The restored server takes new writes.
    send_text(&copy, &alice, &room, "after-restore", "still here").await;

    // With the server stopped, the command line takes the backup itself.
    let final_timeline = timeline(&original, &alice, &room).await;
    let data_dir = original.stop().await;
    let offline = backup_dir.path().join("offline");
    succeeded(&myelin(data_dir.path(), &["backup", offline.to_str().unwrap()]).await);
    let second = restored(&offline).await;
    assert_eq!(timeline(&second, &alice, &room).await, final_timeline);

    // Refusals: a restore over an existing database, a backup into a
    // directory in use.
    let output = myelin(data_dir.path(), &["restore", offline.to_str().unwrap()]).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already has a database"));
    let output = myelin(data_dir.path(), &["backup", offline.to_str().unwrap()]).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not empty"));
}

#[tokio::test]
async fn the_command_line_lists_and_deletes_users_and_rooms() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room = server
        .create_room(&alice, json!({ "preset": "public_chat", "name": "Doomed" }))
        .await;
    join(&server, &bob, &room).await;
    send_text(&server, &bob, &room, "t1", "hello").await;
    let dir = server.stop().await;

    let users = succeeded(&myelin(dir.path(), &["user", "list"]).await);
    let users: Vec<Value> = users
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = users
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"@alice:localhost") && names.contains(&"@bob:localhost"));
    let rooms = succeeded(&myelin(dir.path(), &["room", "list"]).await);
    let rooms: Vec<Value> = rooms
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms[0]["room_id"], room.as_str());
    assert_eq!(rooms[0]["name"], "Doomed");
    assert_eq!(rooms[0]["joined_members"], 2);

    succeeded(&myelin(dir.path(), &["user", "deactivate", "bob"]).await);
    let users = succeeded(&myelin(dir.path(), &["user", "list"]).await);
    assert_eq!(users.lines().count(), 1, "{users}");
    let all = succeeded(&myelin(dir.path(), &["user", "list", "--deactivated"]).await);
    assert!(all.contains("\"deactivated\":true"), "{all}");
    let missing = myelin(dir.path(), &["user", "deactivate", "nobody"]).await;
    assert!(!missing.status.success());

    let deleted = succeeded(&myelin(dir.path(), &["room", "delete", &room, "--block"]).await);
    let shutdown: Value = serde_json::from_str(deleted.trim()).unwrap();
    assert_eq!(
        shutdown["kicked_users"],
        json!(["@alice:localhost"]),
        "{shutdown}"
    );
    let rooms = succeeded(&myelin(dir.path(), &["room", "list"]).await);
    assert_eq!(rooms.trim(), "");

    // Back up: the room is gone, bob cannot log in, alice cannot rejoin.
    let config = test_config(&dir);
    let server = TestServer::start_in(dir, config, None).await;
    let (_, joined) = server
        .get("/_matrix/client/v3/joined_rooms", Some(&alice))
        .await;
    assert_eq!(joined["joined_rooms"], json!([]));
    let blocked = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room}/join"),
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(blocked.0, StatusCode::FORBIDDEN, "{}", blocked.1);
    let (status, _) = server
        .get("/_matrix/client/v3/account/whoami", Some(&bob))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
