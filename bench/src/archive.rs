//! The archive tier's scenarios: a history of chat messages, the reading
//! of every page of it, and steady sends while something else runs (the
//! archive mover). `bench/archive.sh` runs them around the server's
//! archive commands.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::matrix::Server;
use crate::scenarios::{histogram, quantiles};

/// Words of everyday chat, the most common first: picked with a skew
/// towards the front, as in real text.
const WORDS: &[&str] = &[
    "the",
    "i",
    "to",
    "a",
    "you",
    "it",
    "and",
    "is",
    "that",
    "we",
    "of",
    "in",
    "for",
    "on",
    "this",
    "just",
    "so",
    "be",
    "have",
    "was",
    "yes",
    "no",
    "ok",
    "but",
    "not",
    "do",
    "can",
    "are",
    "with",
    "at",
    "what",
    "if",
    "me",
    "think",
    "will",
    "get",
    "now",
    "go",
    "they",
    "there",
    "all",
    "know",
    "about",
    "like",
    "one",
    "up",
    "out",
    "good",
    "time",
    "would",
    "should",
    "see",
    "tomorrow",
    "today",
    "meeting",
    "thanks",
    "sure",
    "then",
    "when",
    "it's",
    "i'm",
    "don't",
    "maybe",
    "later",
    "sounds",
    "great",
    "let",
    "me",
    "check",
    "send",
    "file",
    "link",
    "call",
    "lunch",
    "office",
    "home",
    "work",
    "done",
    "fixed",
    "bug",
    "release",
    "build",
    "test",
    "review",
    "please",
    "could",
    "someone",
    "look",
    "into",
    "again",
    "still",
    "broken",
    "works",
    "morning",
    "night",
    "weekend",
    "week",
    "next",
    "last",
    "hour",
    "minutes",
    "back",
    "soon",
    "sorry",
    "late",
    "train",
    "coffee",
    "team",
    "plan",
    "idea",
    "agree",
    "problem",
    "question",
    "answer",
    "update",
    "change",
    "issue",
    "server",
    "phone",
    "photo",
    "picture",
    "video",
    "share",
    "sent",
    "read",
    "later",
    "happy",
    "birthday",
    "haha",
    "lol",
    "nice",
    "cool",
    "awesome",
    "exactly",
    "right",
    "wrong",
    "probably",
    "definitely",
    "really",
    "need",
    "want",
    "going",
    "coming",
    "here",
    "where",
    "who",
    "how",
    "why",
    "because",
    "anyway",
    "btw",
    "also",
    "too",
    "very",
    "much",
    "more",
    "less",
    "first",
    "before",
    "after",
];
const ENDINGS: &[&str] = &[".", ".", ".", "!", "?", "", "", " 🙂", " 👍", " :)", "..."];

/// A small deterministic generator, so that every run sends the same text.
struct Words(u64);

impl Words {
    fn next(&mut self) -> u64 {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A word, the frequent ones far more often (the product of two
    /// uniform picks favours the front).
    fn word(&mut self) -> &'static str {
        let a = self.below(WORDS.len());
        let b = self.below(WORDS.len());
        WORDS[a * b / WORDS.len()]
    }

    /// A chat line: mostly short, sometimes a paragraph.
    fn line(&mut self) -> String {
        let length = match self.below(20) {
            0 => 25 + self.below(40),
            1..=5 => 10 + self.below(15),
            _ => 2 + self.below(9),
        };
        let mut text = String::new();
        for n in 0..length {
            let word = self.word();
            if n == 0 {
                let mut chars = word.chars();
                if let Some(first) = chars.next() {
                    text.extend(first.to_uppercase());
                    text.push_str(chars.as_str());
                }
            } else {
                text.push(' ');
                text.push_str(word);
            }
        }
        text.push_str(ENDINGS[self.below(ENDINGS.len())]);
        text
    }
}

/// What `archive-fill` leaves for the other scenarios: each room with a
/// member's access token.
pub async fn fill(
    server: &Server,
    rooms: usize,
    messages: usize,
    state: &std::path::Path,
) -> Value {
    eprintln!("archive-fill: {messages} messages in {rooms} rooms");
    let members_per_room = 5;
    let tokens = server
        .register_many("chatter", rooms * members_per_room)
        .await;
    let mut room_ids = Vec::new();
    for room in 0..rooms {
        let members = &tokens[room * members_per_room..(room + 1) * members_per_room];
        let room_id = server
            .create_room(&members[0], json!({ "preset": "public_chat" }))
            .await;
        for member in &members[1..] {
            server.join(member, &room_id).await;
        }
        room_ids.push(room_id);
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for room in 0..rooms {
        let members: Vec<String> =
            tokens[room * members_per_room..(room + 1) * members_per_room].to_vec();
        let (server, room_id, next) = (server.clone(), room_ids[room].clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut words = Words(0x9e37_79b9_7f4a_7c15 ^ (room as u64 + 1));
            let mut sent: Vec<String> = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= messages as u64 {
                    break;
                }
                let sender = &members[words.below(members.len())];
                let content = match (words.below(100), sent.last()) {
                    // A reaction to a recent message.
                    (0..=4, Some(target)) => {
                        let key = ["👍", "😂", "❤️", "🎉"][words.below(4)];
                        send_any(
                            &server,
                            sender,
                            &room_id,
                            "m.reaction",
                            n,
                            json!({ "m.relates_to": {
                                "rel_type": "m.annotation", "event_id": target, "key": key,
                            }}),
                        )
                        .await;
                        continue;
                    }
                    // A reply.
                    (5..=14, Some(target)) => json!({
                        "msgtype": "m.text", "body": words.line(),
                        "m.relates_to": { "m.in_reply_to": { "event_id": target } },
                    }),
                    // An edit.
                    (15..=17, Some(target)) => {
                        let line = words.line();
                        json!({
                            "msgtype": "m.text", "body": format!("* {line}"),
                            "m.new_content": { "msgtype": "m.text", "body": line },
                            "m.relates_to": { "rel_type": "m.replace", "event_id": target },
                        })
                    }
                    _ => json!({ "msgtype": "m.text", "body": words.line() }),
                };
                if let Some(id) =
                    send_any(&server, sender, &room_id, "m.room.message", n, content).await
                {
                    sent.push(id);
                }
                if n % 1000 == 999 {
                    eprint!("\r  {} sent", n + 1);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("sender");
    }
    eprintln!();
    let seconds = started.elapsed().as_secs_f64();
    let rooms_state: Vec<Value> = room_ids
        .iter()
        .enumerate()
        .map(|(n, room_id)| json!({ "room_id": room_id, "token": tokens[n * members_per_room] }))
        .collect();
    std::fs::write(state, json!({ "rooms": rooms_state }).to_string()).expect("the state file");
    json!({
        "scenario": "archive-fill",
        "rooms": rooms,
        "messages": messages,
        "sends_per_second": (messages as f64 / seconds).round(),
    })
}

/// Sends an event of any type; its event ID (a refused send stops the
/// run: the history would not be the one asked for).
async fn send_any(
    server: &Server,
    token: &str,
    room_id: &str,
    kind: &str,
    n: u64,
    content: Value,
) -> Option<String> {
    let txn = format!("{}-a{n}", server.run);
    let id = server
        .send_content(token, room_id, kind, &txn, &content)
        .await;
    assert!(id.is_some(), "send {n} refused");
    id
}

/// Reads every room of `archive-fill` back from its newest page to its
/// oldest (`/messages`, 50 events a page), timing each page.
pub async fn read(server: &Server, state: &std::path::Path) -> Value {
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(state).expect("the state file"))
            .expect("state JSON");
    let mut latencies = histogram();
    let mut pages = 0;
    let mut events = 0;
    for room in state["rooms"].as_array().expect("rooms") {
        let room_id = room["room_id"].as_str().unwrap();
        let token = room["token"].as_str().unwrap();
        let mut from: Option<String> = None;
        loop {
            let mut path = format!("/_matrix/client/v3/rooms/{room_id}/messages?dir=b&limit=50");
            if let Some(from) = &from {
                path.push_str(&format!("&from={from}"));
            }
            let started = Instant::now();
            let response = server
                .http
                .get(server.url(&path))
                .bearer_auth(token)
                .send()
                .await
                .expect("a /messages answer");
            assert!(response.status().is_success(), "{}", response.status());
            let page: Value = response.json().await.expect("JSON");
            latencies
                .record(started.elapsed().as_micros() as u64)
                .expect("in bounds");
            pages += 1;
            events += page["chunk"].as_array().map_or(0, Vec::len);
            match page["end"].as_str() {
                Some(end) => from = Some(end.to_owned()),
                None => break,
            }
        }
    }
    let mut result = quantiles(&latencies);
    result["scenario"] = json!("archive-read");
    result["pages"] = json!(pages);
    result["events"] = json!(events);
    result
}

/// Sends at a steady `rate` for `seconds` into a room of its own, open
/// loop, and times each acknowledgement.
pub async fn live(server: &Server, seconds: u64, rate: f64) -> Value {
    let token = server.register_many("live", 1).await.remove(0);
    let room_id = server.create_room(&token, json!({})).await;
    let total = (seconds as f64 * rate) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for n in 0..total {
        tokio::time::sleep_until(started + interval * n as u32).await;
        let (server, token, room_id) = (server.clone(), token.clone(), room_id.clone());
        tasks.push(tokio::spawn(async move {
            let begun = Instant::now();
            let txn = format!("{}-l{n}", server.run);
            let ok = server
                .send(&token, &room_id, &txn, "a message while the mover runs")
                .await;
            (ok, begun.elapsed().as_micros() as u64)
        }));
    }
    let mut latencies = histogram();
    let mut failed = 0;
    for task in tasks {
        let (ok, micros) = task.await.expect("send");
        if ok {
            latencies.record(micros).expect("in bounds");
        } else {
            failed += 1;
        }
    }
    let mut result = quantiles(&latencies);
    result["scenario"] = json!("archive-live");
    result["sends"] = json!(total);
    result["failed"] = json!(failed);
    result
}
