//! A full room of 100 members, concurrent retries, and random event JSON.

mod common;

use common::{token, TestServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Map, Value};

#[tokio::test]
async fn a_hundred_members_each_read_every_message_and_the_next_is_refused() {
    let server = TestServer::start().await;
    let owner = token(&server.register("owner").await);
    let room_id = server
        .create_room(&owner, json!({ "preset": "public_chat" }))
        .await;
    let join = format!("/_matrix/client/v3/rooms/{room_id}/join");
    let mut members = vec![owner.clone()];
    for i in 1..100 {
        let member = token(&server.register(&format!("member{i}")).await);
        let (status, answer) = server.post(&join, Some(&member), json!({})).await;
        assert_eq!(status, StatusCode::OK, "member {i}: {answer}");
        members.push(member);
    }
    let late = token(&server.register("member100").await);
    let (status, refused) = server.post(&join, Some(&late), json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(refused["errcode"], "M_FORBIDDEN");
    assert!(
        refused["error"].as_str().unwrap().contains("100"),
        "{refused}"
    );

    // Five members speak; every one of the hundred reads all five.
    let mut sent = Vec::new();
    for (i, sender) in members.iter().enumerate().step_by(20) {
        let path = format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/x");
        let (status, answer) = server
            .put(
                &path,
                Some(sender),
                json!({ "msgtype": "m.text", "body": format!("from {i}") }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        sent.push(answer["event_id"].as_str().unwrap().to_owned());
    }
    let messages = format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=5");
    for member in &members {
        let (status, page) = server.get(&messages, Some(member)).await;
        assert_eq!(status, StatusCode::OK);
        let mut seen: Vec<String> = page["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect();
        seen.reverse();
        assert_eq!(seen, sent);
    }
    let (_, joined) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/joined_members"),
            Some(&owner),
        )
        .await;
    assert_eq!(joined["joined"].as_object().unwrap().len(), 100);
}

#[tokio::test]
async fn concurrent_retries_of_one_transaction_store_one_event() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let room_id = server.create_room(&alice, json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/same-txn");
    let attempts: Vec<_> = (0..16)
        .map(|_| {
            let request = server
                .http
                .put(server.url(&path))
                .bearer_auth(&alice)
                .json(&json!({ "msgtype": "m.text", "body": "once" }));
            tokio::spawn(
                async move { request.send().await.unwrap().json::<Value>().await.unwrap() },
            )
        })
        .collect();
    let mut answers = Vec::new();
    for attempt in attempts {
        answers.push(attempt.await.unwrap());
    }
    let first = answers[0]["event_id"].as_str().unwrap();
    assert!(
        answers.iter().all(|a| a["event_id"] == first),
        "{answers:?}"
    );
    let (_, page) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=50"),
            Some(&alice),
        )
        .await;
    let copies = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["content"]["body"] == "once")
        .count();
    assert_eq!(copies, 1);
}

/// A random JSON value, deep and awkward: floats, huge and negative
/// integers, control characters, long strings, nested containers.
fn random_json(rng: &mut StdRng, depth: u32) -> Value {
    match rng.gen_range(0..if depth > 3 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.gen::<bool>()),
        2 => json!(rng.gen::<i64>()),
        3 => json!(rng.gen::<f64>() * 1e6),
        4 => json!(random_string(rng)),
        5 => json!(rng.gen_range(-(1i64 << 53)..(1i64 << 53))),
        6 => Value::Array(
            (0..rng.gen_range(0..4))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut map = Map::new();
            for _ in 0..rng.gen_range(0..5) {
                map.insert(random_string(rng), random_json(rng, depth + 1));
            }
            Value::Object(map)
        }
    }
}

fn random_string(rng: &mut StdRng) -> String {
    let pool = [
        "m.room.member",
        "membership",
        "join",
        "ban",
        "users",
        "m.relates_to",
        "rel_type",
        "m.thread",
        "event_id",
        "$x",
        "redacts",
        "\u{0}",
        "🦀",
        "m.room.power_levels",
        "state_default",
        "join_rule",
        "public",
        "@a:localhost",
        "alias",
        "body",
        "",
        "m.replace",
    ];
    match rng.gen_range(0..4) {
        0 => "x".repeat(rng.gen_range(0..3000)),
        1 => (0..rng.gen_range(0..20))
            .map(|_| char::from(rng.gen_range(0u8..128)))
            .collect(),
        _ => pool[rng.gen_range(0..pool.len())].to_owned(),
    }
}

#[tokio::test]
async fn no_event_json_makes_the_server_fail() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let kinds = [
        "m.room.message",
        "m.room.member",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.create",
        "m.room.redaction",
        "m.room.name",
        "m.reaction",
        "org.example.x",
    ];
    let mut rng = StdRng::seed_from_u64(0x6d79656c696e);
    let mut accepted = 0;
    for i in 0..400 {
        let kind = kinds[rng.gen_range(0..kinds.len())];
        let content = match random_json(&mut rng, 0) {
            Value::Object(map) => Value::Object(map),
            other => json!({ "value": other }),
        };
        let path = if rng.gen::<bool>() {
            format!("/_matrix/client/v3/rooms/{room_id}/send/{kind}/f{i}")
        } else {
            let key = urlencode(&random_string(&mut rng));
            format!("/_matrix/client/v3/rooms/{room_id}/state/{kind}/{key}")
        };
        let response = server
            .http
            .put(server.url(&path))
            .bearer_auth(&alice)
            .json(&content)
            .send()
            .await
            .expect("the server answers");
        let status = response.status();
        let body: Value = response.json().await.expect("every answer is JSON");
        assert!(
            !status.is_server_error(),
            "{path} {content}: {status} {body}"
        );
        if status.is_success() {
            assert!(body["event_id"].is_string(), "{body}");
            accepted += 1;
        } else {
            assert!(
                body["errcode"].as_str().unwrap().starts_with("M_"),
                "{body}"
            );
        }
    }
    assert!(
        accepted > 50,
        "the generator must also make valid events: {accepted}"
    );
    // The room still works.
    let (status, _) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/after"),
            Some(&alice),
            json!({ "msgtype": "m.text", "body": "still here" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
