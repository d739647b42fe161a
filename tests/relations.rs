//! Edits, threads, relations, context and timestamp look-ups, over HTTP.

mod common;

use std::sync::Arc;

use common::{assert_error, token, TestServer};
use myelin::services::clock::ManualClock;
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Room<'a> {
    server: &'a TestServer,
    token: String,
    id: String,
    txn: std::cell::Cell<u32>,
}

impl Room<'_> {
    async fn send(&self, content: Value) -> String {
        self.txn.set(self.txn.get() + 1);
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/t{}",
            self.id,
            self.txn.get()
        );
        let (status, answer) = self.server.put(&path, Some(&self.token), content).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["event_id"].as_str().unwrap().to_owned()
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.server.get(path, Some(&self.token)).await
    }
}

async fn room(server: &TestServer) -> Room<'_> {
    let token = token(&server.register("alice").await);
    let (_, created) = server
        .post("/_matrix/client/v3/createRoom", Some(&token), json!({}))
        .await;
    Room {
        server,
        id: created["room_id"].as_str().unwrap().to_owned(),
        token,
        txn: std::cell::Cell::new(0),
    }
}

fn text(body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body })
}

#[tokio::test]
async fn edits_and_threads_are_bundled_and_listed() {
    let server = TestServer::start().await;
    let room = room(&server).await;
    let original = room.send(text("helo")).await;
    // Read before it has relations (remembered as having nothing to
    // bundle), and again after each kind of relation below.
    let event_path = |id: &str| format!("/_matrix/client/v3/rooms/{}/event/{id}", room.id);
    let (_, before) = room.get(&event_path(&original)).await;
    assert_eq!(before["event_id"], original.as_str());
    assert!(before["unsigned"].get("m.relations").is_none());
    for fix in ["hello", "hello!"] {
        room.send(json!({
            "msgtype": "m.text",
            "body": format!("* {fix}"),
            "m.new_content": text(fix),
            "m.relates_to": { "rel_type": "m.replace", "event_id": original },
        }))
        .await;
    }
    let root = room.send(text("thread root")).await;
    let (_, before) = room.get(&event_path(&root)).await;
    assert!(before["unsigned"].get("m.relations").is_none());
    let mut replies = Vec::new();
    for i in 0..3 {
        let reply = json!({
            "msgtype": "m.text",
            "body": format!("reply {i}"),
            "m.relates_to": { "rel_type": "m.thread", "event_id": root },
        });
        replies.push(room.send(reply).await);
    }
    // A reaction to a reply, to test recursion.
    let reaction = json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": replies[0], "key": "👍" } });
    room.send(reaction).await;

    let (_, event) = room
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/event/{original}",
            room.id
        ))
        .await;
    let edit = &event["unsigned"]["m.relations"]["m.replace"];
    assert_eq!(edit["content"]["m.new_content"]["body"], "hello!");
    let (_, root_event) = room
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/event/{root}",
            room.id
        ))
        .await;
    let thread = &root_event["unsigned"]["m.relations"]["m.thread"];
    assert_eq!(thread["count"], 3);
    assert_eq!(thread["latest_event"]["event_id"], replies[2].as_str());
    assert_eq!(thread["current_user_participated"], true);

    let base = format!("/_matrix/client/v1/rooms/{}/relations/{root}", room.id);
    let (status, all) = room.get(&base).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let ids: Vec<&str> = all["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            replies[2].as_str(),
            replies[1].as_str(),
            replies[0].as_str()
        ]
    );
    let (_, paged) = room.get(&format!("{base}/m.thread?limit=2&dir=f")).await;
    assert_eq!(paged["chunk"].as_array().unwrap().len(), 2);
    assert_eq!(paged["chunk"][0]["event_id"], replies[0].as_str());
    let next = paged["next_batch"].as_str().unwrap();
    let (_, rest) = room
        .get(&format!("{base}/m.thread?limit=2&dir=f&from={next}"))
        .await;
    assert_eq!(rest["chunk"].as_array().unwrap().len(), 1);
    assert_eq!(rest["chunk"][0]["event_id"], replies[2].as_str());
    assert!(rest.get("next_batch").is_none());
    let (_, none) = room.get(&format!("{base}/m.replace")).await;
    assert_eq!(none["chunk"], json!([]));
    let (_, typed) = room.get(&format!("{base}/m.thread/m.room.message")).await;
    assert_eq!(typed["chunk"].as_array().unwrap().len(), 3);
    let (_, deep) = room.get(&format!("{base}?recurse=true")).await;
    assert_eq!(deep["chunk"].as_array().unwrap().len(), 4, "{deep}");
    assert_eq!(deep["recursion_depth"], 3);

    let (_, threads) = room
        .get(&format!("/_matrix/client/v1/rooms/{}/threads", room.id))
        .await;
    assert_eq!(threads["chunk"].as_array().unwrap().len(), 1);
    assert_eq!(threads["chunk"][0]["event_id"], root.as_str());
    let (_, mine) = room
        .get(&format!(
            "/_matrix/client/v1/rooms/{}/threads?include=participated",
            room.id
        ))
        .await;
    assert_eq!(mine["chunk"].as_array().unwrap().len(), 1);
    let missing = room
        .get(&format!(
            "/_matrix/client/v1/rooms/{}/relations/$nope",
            room.id
        ))
        .await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
}

#[tokio::test]
async fn context_surrounds_an_event() {
    let server = TestServer::start().await;
    let room = room(&server).await;
    let mut ids = Vec::new();
    for i in 0..9 {
        ids.push(room.send(text(&i.to_string())).await);
    }
    let (status, context) = room
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/context/{}?limit=4",
            room.id, ids[4]
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{context}");
    assert_eq!(context["event"]["event_id"], ids[4].as_str());
    let before: Vec<&str> = context["events_before"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    let after: Vec<&str> = context["events_after"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(before, [ids[3].as_str(), ids[2].as_str()]);
    assert_eq!(after, [ids[5].as_str(), ids[6].as_str()]);
    let state = context["state"].as_array().unwrap();
    assert!(state.iter().any(|e| e["type"] == "m.room.create"));
    assert!(state.iter().any(|e| e["type"] == "m.room.member"));

    // The tokens continue where the context ends.
    let end = context["end"].as_str().unwrap();
    let (_, forward) = room
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=f&limit=1&from={end}",
            room.id
        ))
        .await;
    assert_eq!(forward["chunk"][0]["event_id"], ids[7].as_str());
    let start = context["start"].as_str().unwrap();
    let (_, backward) = room
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1&from={start}",
            room.id
        ))
        .await;
    assert_eq!(backward["chunk"][0]["event_id"], ids[1].as_str());
}

#[tokio::test]
async fn timestamps_lead_to_the_nearest_event() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::test_config(&dir);
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let server = TestServer::start_in(dir, config, Some(clock.clone())).await;
    let room = room(&server).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        clock.advance_ms(1000);
        let id = room.send(text(&i.to_string())).await;
        let (_, event) = room
            .get(&format!("/_matrix/client/v3/rooms/{}/event/{id}", room.id))
            .await;
        sent.push((id, event["origin_server_ts"].as_u64().unwrap()));
        // Other writes take stream positions too: the room's have gaps.
        for n in 0..i + 1 {
            let path = format!("/_matrix/client/v3/user/@alice:localhost/account_data/x.{n}");
            room.server.put(&path, Some(&room.token), json!({})).await;
        }
    }
    let path = |ts: u64, dir: &str| {
        format!(
            "/_matrix/client/v1/rooms/{}/timestamp_to_event?ts={ts}&dir={dir}",
            room.id
        )
    };
    let (status, found) = room.get(&path(sent[2].1, "f")).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["event_id"], sent[2].0.as_str());
    let (_, found) = room.get(&path(sent[2].1 + 1, "f")).await;
    assert_eq!(found["event_id"], sent[3].0.as_str());
    let (_, found) = room.get(&path(sent[3].1 - 1, "b")).await;
    assert_eq!(found["event_id"], sent[2].0.as_str());
    for (i, (id, ts)) in sent.iter().enumerate() {
        let (_, back) = room.get(&path(*ts + 500, "b")).await;
        assert_eq!(back["event_id"], id.as_str(), "backward from event {i}");
        let (_, forward) = room.get(&path(ts - 500, "f")).await;
        assert_eq!(forward["event_id"], id.as_str(), "forward to event {i}");
    }
    let none = room.get(&path(sent[4].1 + 10_000, "f")).await;
    assert_error(&none, StatusCode::NOT_FOUND, "M_NOT_FOUND");
}
