//! Delivery latency through long-polling `/sync`: N clients wait in
//! `/sync`, one sender sends messages, and each delivery is timed from the
//! moment the sender has its answer (the message is durable) to the moment
//! the recipient's `/sync` answer carrying it has been read.
//!
//! Speaks plain Matrix HTTP to any homeserver with open registration and
//! no rate limits:
//!
//! ```sh
//! cargo run --release --example sync_latency -- http://127.0.0.1:8008 1000 60
//! ```
//!
//! Arguments: server URL, number of waiting clients (default 100), number
//! of messages (default 50). Rooms hold at most 100 members, so the clients
//! are spread over rooms of 99 plus the sender, and each message goes to
//! the next room in turn.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const PASSWORD: &str = "bench password";
const ROOM_SIZE: usize = 99;
/// Time between two sends: long enough for every woken recipient to be
/// back in `/sync` before the next message.
const SEND_INTERVAL: Duration = Duration::from_millis(150);

type Deliveries = Arc<Mutex<HashMap<u64, Vec<Instant>>>>;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .get(1)
        .cloned()
        .unwrap_or("http://127.0.0.1:8008".into());
    let clients: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100);
    let messages: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(50);
    raise_file_limit();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients + 16)
        .build()
        .expect("HTTP client");
    let run = format!("b{}", std::process::id());
    eprintln!("registering {clients} clients and a sender on {base}");
    let sender = register(&http, &base, &format!("{run}sender")).await;
    let mut tokens = Vec::with_capacity(clients);
    for chunk in (0..clients).collect::<Vec<_>>().chunks(32) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|n| {
                let (http, base, name) = (http.clone(), base.clone(), format!("{run}u{n}"));
                tokio::spawn(async move { register(&http, &base, &name).await })
            })
            .collect();
        for registration in batch {
            tokens.push(registration.await.expect("registration task"));
        }
        eprint!("\r  {} registered", tokens.len());
    }
    eprintln!();
    let rooms = make_rooms(&http, &base, &sender, &tokens).await;
    let deliveries: Deliveries = Arc::default();
    let mut tasks = Vec::new();
    for (index, token) in tokens.iter().enumerate() {
        let since = initial_sync(&http, &base, token).await;
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        let deliveries = deliveries.clone();
        tasks.push(tokio::spawn(async move {
            sync_loop(http, base, token, since, deliveries).await
        }));
        if index % 100 == 99 {
            eprint!("\r  {} clients waiting in /sync", index + 1);
        }
    }
    eprintln!("\r  {clients} clients waiting in /sync");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut sent: HashMap<u64, (Instant, usize)> = HashMap::new();
    for seq in 0..messages {
        let room = seq as usize % rooms.len();
        let (room_id, members) = &rooms[room];
        let url =
            format!("{base}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/{run}-{seq}");
        let answer = http
            .put(url)
            .bearer_auth(&sender)
            .json(&json!({ "msgtype": "m.text", "body": format!("bench:{seq}") }))
            .send()
            .await
            .expect("send");
        assert!(answer.status().is_success(), "send: {}", answer.status());
        sent.insert(seq, (Instant::now(), *members));
        eprint!("\r  {} of {messages} sent", seq + 1);
        tokio::time::sleep(SEND_INTERVAL).await;
    }
    eprintln!();
    tokio::time::sleep(Duration::from_secs(2)).await;
    report(clients, &sent, &deliveries.lock().unwrap());
    for task in tasks {
        task.abort();
    }
}

fn report(clients: usize, sent: &HashMap<u64, (Instant, usize)>, got: &HashMap<u64, Vec<Instant>>) {
    let mut latencies_us = Vec::new();
    let (mut expected, mut early) = (0, 0);
    for (seq, (answered, members)) in sent {
        expected += members;
        for received in got.get(seq).into_iter().flatten() {
            match received.checked_duration_since(*answered) {
                Some(latency) => latencies_us.push(latency.as_micros() as u64),
                // Read by the recipient before the sender had its answer.
                None => {
                    early += 1;
                    latencies_us.push(0);
                }
            }
        }
    }
    latencies_us.sort_unstable();
    let at = |q: f64| {
        let index = ((latencies_us.len() as f64 * q).ceil() as usize).saturating_sub(1);
        latencies_us.get(index).copied().unwrap_or(0) as f64 / 1000.0
    };
    println!(
        "clients={clients} messages={} deliveries={}/{expected} (before the send's answer: {early})",
        sent.len(),
        latencies_us.len(),
    );
    println!(
        "latency ms: p50={:.2} p90={:.2} p99={:.2} max={:.2}",
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0)
    );
}

async fn register(http: &reqwest::Client, base: &str, username: &str) -> String {
    let url = format!("{base}/_matrix/client/v3/register");
    let body = json!({
        "username": username,
        "password": PASSWORD,
        "auth": { "type": "m.login.dummy" },
        "inhibit_login": false,
    });
    let answer: Value = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("register answer");
    if let Some(token) = answer["access_token"].as_str() {
        return token.to_owned();
    }
    // Servers that want a session first: answer the challenge.
    let mut body = body;
    body["auth"]["session"] = answer["session"].clone();
    let answer: Value = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("register answer");
    answer["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("registration refused: {answer}"))
        .to_owned()
}

/// Rooms of up to 99 clients plus the sender: (room ID, recipients).
async fn make_rooms(
    http: &reqwest::Client,
    base: &str,
    sender: &str,
    tokens: &[String],
) -> Vec<(String, usize)> {
    let mut rooms = Vec::new();
    for group in tokens.chunks(ROOM_SIZE) {
        let answer: Value = http
            .post(format!("{base}/_matrix/client/v3/createRoom"))
            .bearer_auth(sender)
            .json(&json!({ "preset": "public_chat" }))
            .send()
            .await
            .expect("createRoom")
            .json()
            .await
            .expect("createRoom answer");
        let room_id = answer["room_id"].as_str().expect("room_id").to_owned();
        for token in group {
            let answer = http
                .post(format!("{base}/_matrix/client/v3/rooms/{room_id}/join"))
                .bearer_auth(token)
                .json(&json!({}))
                .send()
                .await
                .expect("join");
            assert!(answer.status().is_success(), "join: {}", answer.status());
        }
        eprintln!(
            "  room {} with {} members",
            rooms.len() + 1,
            group.len() + 1
        );
        rooms.push((room_id, group.len()));
    }
    rooms
}

async fn initial_sync(http: &reqwest::Client, base: &str, token: &str) -> String {
    let answer: Value = http
        .get(format!("{base}/_matrix/client/v3/sync?timeout=0"))
        .bearer_auth(token)
        .send()
        .await
        .expect("sync")
        .json()
        .await
        .expect("sync answer");
    answer["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned()
}

/// Waits in `/sync` over and over, noting when each message arrives.
async fn sync_loop(
    http: reqwest::Client,
    base: String,
    token: String,
    mut since: String,
    deliveries: Deliveries,
) {
    loop {
        let url = format!("{base}/_matrix/client/v3/sync?timeout=30000&since={since}");
        let Ok(response) = http.get(url).bearer_auth(&token).send().await else {
            continue;
        };
        let Ok(answer) = response.json::<Value>().await else {
            continue;
        };
        let received = Instant::now();
        let rooms = answer["rooms"]["join"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for room in rooms.values() {
            for event in room["timeline"]["events"].as_array().into_iter().flatten() {
                let body = event["content"]["body"].as_str().unwrap_or("");
                if let Some(seq) = body.strip_prefix("bench:").and_then(|s| s.parse().ok()) {
                    deliveries
                        .lock()
                        .unwrap()
                        .entry(seq)
                        .or_default()
                        .push(received);
                }
            }
        }
        if let Some(next) = answer["next_batch"].as_str() {
            since = next.to_owned();
        }
    }
}

/// 1,000 connections need more file descriptors than the usual soft limit.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
