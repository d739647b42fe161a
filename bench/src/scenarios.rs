//! The scenarios. Each answers its figures as JSON.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::matrix::{disk_bytes, message_bodies, resident_bytes, Server};
use crate::Transport;

/// Members per room: rooms hold at most 100 by default.
const ROOM_LIMIT: usize = 100;

/// When each tagged message reached a recipient: tag → arrival times.
type Arrivals = Arc<Mutex<HashMap<u64, Vec<Instant>>>>;

fn note_arrivals(arrivals: &Arrivals, prefix: &str, bodies: &[String], at: Instant) {
    let mut arrivals = arrivals.lock().expect("arrivals");
    for body in bodies {
        if let Some(tag) = body.strip_prefix(prefix).and_then(|t| t.parse().ok()) {
            arrivals.entry(tag).or_default().push(at);
        }
    }
}

/// Keeps a client waiting in `/sync`, noting arrivals of `prefix` tags.
fn spawn_sync_reader(
    server: &Server,
    token: String,
    mut since: String,
    prefix: &'static str,
    arrivals: Arrivals,
) -> tokio::task::JoinHandle<()> {
    let server = server.clone();
    tokio::spawn(async move {
        loop {
            let Some(answer) = server.sync(&token, Some(&since), 30_000).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let at = Instant::now();
            note_arrivals(&arrivals, prefix, &message_bodies(&answer), at);
            if let Some(next) = answer["next_batch"].as_str() {
                since = next.to_owned();
            }
        }
    })
}

/// Keeps a client connected to the WebSocket extension, noting arrivals.
async fn spawn_ws_reader(
    server: &Server,
    token: String,
    prefix: &'static str,
    arrivals: Arrivals,
) -> tokio::task::JoinHandle<()> {
    let mut request = server
        .ws_url()
        .into_client_request()
        .expect("WebSocket URL");
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WebSocket connection");
    tokio::spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let at = Instant::now();
            let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if frame["type"] == "event" {
                if let Some(body) = frame["data"]["event"]["content"]["body"].as_str() {
                    note_arrivals(&arrivals, prefix, &[body.to_owned()], at);
                }
            }
        }
    })
}

/// Tags of warm-up messages: above any measured message's.
const WARM_UP_TAGS: u64 = 1 << 40;

/// One message into each room, waited for until every recipient has it
/// (or 30 s), and not measured: the cost of a recipient's first look at a
/// room after connecting is left out of the steady state's figures.
async fn warm_up_rooms(
    server: &Server,
    sender: &str,
    rooms: &[(String, usize)],
    arrivals: &Arrivals,
) {
    let expected: usize = rooms.iter().map(|(_, recipients)| recipients).sum();
    for (n, (room_id, _)) in rooms.iter().enumerate() {
        let tag = WARM_UP_TAGS + n as u64;
        let txn = format!("{}-warm-{n}", server.run);
        server
            .send(sender, room_id, &txn, &format!("bench:{tag}"))
            .await;
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        let got: usize = arrivals
            .lock()
            .expect("arrivals")
            .iter()
            .filter(|(tag, _)| **tag >= WARM_UP_TAGS)
            .map(|(_, times)| times.len())
            .sum();
        if got >= expected || Instant::now() > deadline {
            eprintln!(
                "  warm-up: {got} of {expected} deliveries in {:?}",
                started.elapsed()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    arrivals
        .lock()
        .expect("arrivals")
        .retain(|tag, _| *tag < WARM_UP_TAGS);
}

async fn initial_since(server: &Server, token: &str) -> String {
    let answer = server.sync(token, None, 0).await.expect("an initial sync");
    answer["next_batch"]
        .as_str()
        .expect("next_batch")
        .to_owned()
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn ms(micros: u64) -> f64 {
    (micros as f64 / 1000.0 * 100.0).round() / 100.0
}

pub fn quantiles(histogram: &Histogram<u64>) -> Value {
    json!({
        "p50_ms": ms(histogram.value_at_quantile(0.50)),
        "p95_ms": ms(histogram.value_at_quantile(0.95)),
        "p99_ms": ms(histogram.value_at_quantile(0.99)),
        "max_ms": ms(histogram.max()),
    })
}

/// Rooms of the senders plus up to `ROOM_LIMIT - senders` recipients
/// each: (room ID, recipients in it).
async fn make_rooms(
    server: &Server,
    senders: &[String],
    recipients: &[String],
) -> Vec<(String, usize)> {
    let per_room = ROOM_LIMIT - senders.len();
    let mut rooms = Vec::new();
    for group in recipients.chunks(per_room) {
        let room_id = server
            .create_room(&senders[0], json!({ "preset": "public_chat" }))
            .await;
        for token in senders[1..].iter().chain(group) {
            server.join(token, &room_id).await;
        }
        rooms.push((room_id, group.len()));
        eprint!("\r  {} rooms made", rooms.len());
    }
    eprintln!();
    rooms
}

/// (a) Delivery latency: from the sender's acknowledged send to the
/// recipient reading it, with `clients` recipients waiting.
pub async fn latency(
    server: &Server,
    clients: usize,
    messages: u64,
    rate: f64,
    senders: usize,
    transport: Transport,
    warm_up: bool,
) -> Value {
    eprintln!("latency: {clients} clients over {transport:?}, {messages} messages at {rate}/s from {senders} senders");
    let sender_tokens = server.register_many("sender", senders.max(1)).await;
    let tokens = server.register_many("client", clients).await;
    let rooms = make_rooms(server, &sender_tokens, &tokens).await;
    let arrivals: Arrivals = Arc::default();
    let mut readers = Vec::new();
    for (n, token) in tokens.iter().enumerate() {
        let reader = match transport {
            Transport::Sync => {
                let since = initial_since(server, token).await;
                spawn_sync_reader(server, token.clone(), since, "bench:", arrivals.clone())
            }
            Transport::Ws => {
                spawn_ws_reader(server, token.clone(), "bench:", arrivals.clone()).await
            }
        };
        readers.push(reader);
        if n % 100 == 99 {
            eprint!("\r  {} clients waiting", n + 1);
        }
    }
    eprintln!("\r  {clients} clients waiting");
    tokio::time::sleep(Duration::from_secs(2)).await;
    if warm_up {
        warm_up_rooms(server, &sender_tokens[0], &rooms, &arrivals).await;
    }

    // Open loop: each send starts on schedule, answered or not.
    let answered: Arc<Mutex<HashMap<u64, (Instant, usize)>>> = Arc::default();
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut ticker = tokio::time::interval(interval);
    let mut sends = Vec::new();
    for seq in 0..messages {
        ticker.tick().await;
        let (room_id, recipients) = rooms[seq as usize % rooms.len()].clone();
        let token = sender_tokens[seq as usize % sender_tokens.len()].clone();
        let (server, answered) = (server.clone(), answered.clone());
        sends.push(tokio::spawn(async move {
            let txn = format!("{}-{seq}", server.run);
            if server
                .send(&token, &room_id, &txn, &format!("bench:{seq}"))
                .await
            {
                answered
                    .lock()
                    .expect("answered")
                    .insert(seq, (Instant::now(), recipients));
            }
        }));
        if seq % 10 == 9 {
            eprint!("\r  {} of {messages} sent", seq + 1);
        }
    }
    for send in sends {
        let _ = send.await;
    }
    eprintln!();
    let expected: usize = answered
        .lock()
        .expect("answered")
        .values()
        .map(|(_, r)| r)
        .sum();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got: usize = arrivals
            .lock()
            .expect("arrivals")
            .values()
            .map(Vec::len)
            .sum();
        eprint!("\r  {got} of {expected} deliveries");
        if got >= expected || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!();
    for reader in readers {
        reader.abort();
    }
    let mut histogram = histogram();
    let (mut delivered, mut early) = (0u64, 0u64);
    let answered = answered.lock().expect("answered");
    for (seq, times) in arrivals.lock().expect("arrivals").iter() {
        let Some((sent_at, _)) = answered.get(seq) else {
            continue;
        };
        for at in times {
            delivered += 1;
            let micros = match at.checked_duration_since(*sent_at) {
                Some(latency) => latency.as_micros() as u64,
                None => {
                    early += 1;
                    0
                }
            };
            histogram.record(micros.max(1)).expect("in bounds");
        }
    }
    let mut result = quantiles(&histogram);
    result["scenario"] = json!(format!("latency-{}", transport.name()));
    result["clients"] = json!(clients);
    result["senders"] = json!(senders);
    result["warm_up"] = json!(warm_up);
    result["messages"] = json!(messages);
    result["acknowledged"] = json!(answered.len());
    result["expected"] = json!(expected);
    result["delivered"] = json!(delivered);
    result["read_before_send_answer"] = json!(early);
    result
}

/// (b) Acknowledged sends per second: `senders` senders, each in its own
/// room, each sending the next message when the last is answered.
pub async fn throughput(server: &Server, senders: usize, seconds: u64) -> Value {
    eprintln!("throughput: {senders} senders for {seconds} s");
    let tokens = server.register_many("writer", senders).await;
    let mut rooms = Vec::new();
    for token in &tokens {
        rooms.push(server.create_room(token, json!({})).await);
    }
    let total = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (n, (token, room_id)) in tokens.into_iter().zip(rooms).enumerate() {
        let (server, total, failed) = (server.clone(), total.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while Instant::now() < until {
                let txn = format!("{}-w{n}-{seq}", server.run);
                if server.send(&token, &room_id, &txn, "throughput").await {
                    total.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
            }
        }));
    }
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        eprint!("\r  {} acknowledged", total.load(Ordering::Relaxed));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    eprintln!();
    let count = total.load(Ordering::Relaxed);
    json!({
        "scenario": "throughput",
        "senders": senders,
        "acknowledged": count,
        "failed": failed.load(Ordering::Relaxed),
        "seconds": (elapsed * 100.0).round() / 100.0,
        "messages_per_s": ((count as f64 / elapsed) * 10.0).round() / 10.0,
    })
}

/// (c) Fan-out: one message into a room of `members` (the sender among
/// them), all waiting in `/sync`: time from the acknowledged send until
/// the last member has read it.
pub async fn fanout(server: &Server, members: usize, rounds: usize) -> Value {
    eprintln!("fanout: {members} members, {rounds} rounds");
    let sender = server.register_many("fansender", 1).await;
    let tokens = server
        .register_many("member", members.saturating_sub(1))
        .await;
    let rooms = make_rooms(server, &sender, &tokens).await;
    let (room_id, recipients) = rooms[0].clone();
    let arrivals: Arrivals = Arc::default();
    let mut readers = Vec::new();
    for token in &tokens {
        let since = initial_since(server, token).await;
        readers.push(spawn_sync_reader(
            server,
            token.clone(),
            since,
            "fan:",
            arrivals.clone(),
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut histogram = histogram();
    let mut incomplete = 0;
    // Each round's time in order (null for one that did not complete), so
    // that a slow round can be told from a slow first one.
    let mut round_ms = Vec::with_capacity(rounds);
    for round in 0..rounds as u64 {
        let txn = format!("{}-fan{round}", server.run);
        if !server
            .send(&sender[0], &room_id, &txn, &format!("fan:{round}"))
            .await
        {
            incomplete += 1;
            round_ms.push(Value::Null);
            continue;
        }
        let sent_at = Instant::now();
        let deadline = sent_at + Duration::from_secs(10);
        let last = loop {
            let times = arrivals
                .lock()
                .expect("arrivals")
                .get(&round)
                .cloned()
                .unwrap_or_default();
            if times.len() >= recipients {
                break times.into_iter().max();
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        match last {
            Some(last) => {
                let micros = last
                    .checked_duration_since(sent_at)
                    .map_or(0, |d| d.as_micros() as u64);
                histogram.record(micros.max(1)).expect("in bounds");
                round_ms.push(json!(micros as f64 / 1000.0));
            }
            None => {
                incomplete += 1;
                round_ms.push(Value::Null);
            }
        }
        eprint!("\r  {} of {rounds} rounds", round + 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!();
    for reader in readers {
        reader.abort();
    }
    let mut result = quantiles(&histogram);
    result["scenario"] = json!("fanout");
    result["members"] = json!(recipients + 1);
    result["rounds"] = json!(rounds);
    result["incomplete_rounds"] = json!(incomplete);
    result["round_ms"] = Value::Array(round_ms);
    result
}

/// (d) The server's resident memory per idle waiting connection: long-
/// polling `/sync` requests, or WebSocket connections of as many devices.
pub async fn memory(
    server: &Server,
    pid: u32,
    connections: usize,
    transport: Transport,
    given: Option<Vec<String>>,
) -> Value {
    eprintln!("memory: {connections} idle {transport:?} connections");
    let users = match (&given, transport) {
        // Made earlier by `devices`; one of them stands in for the users.
        (Some(tokens), Transport::Ws) => tokens[..1].to_vec(),
        _ => {
            server
                .register_many("idle", 10.min(connections).max(1))
                .await
        }
    };
    let tokens: Vec<String> = match (transport, given) {
        (Transport::Sync, _) => users.clone(),
        (Transport::Ws, Some(tokens)) => {
            assert!(tokens.len() >= connections, "too few tokens in the file");
            tokens
        }
        // One device per connection: a device has one session.
        (Transport::Ws, None) => devices(server, connections).await,
    };
    let mut sinces = Vec::new();
    for token in &users {
        sinces.push(initial_since(server, token).await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = settled_resident(pid).await;
    let open = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(connections);
    for n in 0..connections {
        let task = match transport {
            Transport::Sync => {
                let (server, token) = (server.clone(), users[n % users.len()].clone());
                let mut since = sinces[n % users.len()].clone();
                let open = open.clone();
                tokio::spawn(async move {
                    open.fetch_add(1, Ordering::Relaxed);
                    loop {
                        let url = format!(
                            "{}/_matrix/client/v3/sync?timeout=3600000&set_presence=offline&since={since}",
                            server.base
                        );
                        let Ok(response) = server.http.get(url).bearer_auth(&token).send().await
                        else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        if let Ok(answer) = response.json::<Value>().await {
                            if let Some(next) = answer["next_batch"].as_str() {
                                since = next.to_owned();
                            }
                        }
                    }
                })
            }
            Transport::Ws => {
                let mut request = server
                    .ws_url()
                    .into_client_request()
                    .expect("WebSocket URL");
                request.headers_mut().insert(
                    "Authorization",
                    format!("Bearer {}", tokens[n]).parse().expect("header"),
                );
                let (mut socket, _) = tokio_tungstenite::connect_async(request)
                    .await
                    .expect("WebSocket connection");
                open.fetch_add(1, Ordering::Relaxed);
                // Reading answers the server's pings.
                tokio::spawn(async move { while let Some(Ok(_)) = socket.next().await {} })
            }
        };
        tasks.push(task);
        if n % 500 == 499 {
            eprint!("\r  {} connections", n + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("\r  {connections} connections; settling");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = settled_resident(pid).await;
    // The connections really are open: this process's sockets.
    let sockets = std::fs::read_dir("/proc/self/fd")
        .map(|fds| {
            fds.flatten()
                .filter(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0);
    for task in tasks {
        task.abort();
    }
    let per = after.saturating_sub(before) as f64 / connections as f64;
    json!({
        "scenario": format!("memory-{}", transport.name()),
        "connections": connections,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "client_sockets": sockets,
        "bytes_per_connection": per.round(),
    })
}

/// Logs in `count` devices of ten users; answers their access tokens.
pub async fn devices(server: &Server, count: usize) -> Vec<String> {
    let users = server
        .register_many("idle", 10.min(count).max(1))
        .await
        .len();
    let mut tokens = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(32) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|n| {
                let server = server.clone();
                let name = format!("idle{}", n % users);
                tokio::spawn(async move { server.login(&name).await })
            })
            .collect();
        for task in tasks {
            tokens.push(task.await.expect("login task"));
        }
        eprint!("\r  {} of {count} devices", tokens.len());
    }
    eprintln!();
    tokens
}

/// The median of three readings a second apart.
async fn settled_resident(pid: u32) -> u64 {
    let mut readings = Vec::new();
    for _ in 0..3 {
        readings.push(resident_bytes(pid));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    readings.sort_unstable();
    readings[1]
}

/// (e) How long the first sync of a new device takes for an account in
/// `rooms` rooms: the median of three devices, each syncing once (so no
/// server can answer from a cache of an earlier identical sync).
pub async fn initial_sync(server: &Server, rooms: usize, rounds: usize) -> Value {
    eprintln!("initial sync: an account in {rooms} rooms");
    let token = server.register_many("member", 1).await.remove(0);
    for n in 0..rooms {
        server
            .create_room(&token, json!({ "name": format!("room {n}") }))
            .await;
        if n % 10 == 9 {
            eprint!("\r  {} of {rooms} rooms", n + 1);
        }
    }
    eprintln!();
    // The server's work after the set-up (indexing the rooms for search,
    // flushing) is not part of an initial sync: let it finish first.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut timings = Vec::new();
    let mut listed = Vec::new();
    for _ in 0..rounds.max(1) {
        let device = server.login("member0").await;
        let start = Instant::now();
        let answer = server
            .sync(&device, None, 0)
            .await
            .expect("an initial sync");
        timings.push(start.elapsed().as_micros() as u64);
        // Reported, not asserted: a server that leaves rooms out shows it
        // in the results instead of ending the run.
        listed.push(answer["rooms"]["join"].as_object().map_or(0, |r| r.len()));
    }
    timings.sort_unstable();
    json!({
        "scenario": format!("initial-sync-{rooms}"),
        "rooms": rooms,
        "rooms_listed": listed,
        "median_ms": ms(timings[timings.len() / 2]),
        "min_ms": ms(timings[0]),
        "max_ms": ms(timings[timings.len() - 1]),
    })
}

/// (f) Bytes the database grows by per stored message: `messages`
/// messages of about 100 bytes of text, sent 8 at a time into one room.
pub async fn storage(server: &Server, dir: &std::path::Path, messages: usize) -> Value {
    eprintln!("storage: {messages} messages");
    let token = server.register_many("writer", 1).await.remove(0);
    let room_id = server.create_room(&token, json!({})).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = disk_bytes(dir);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (server, token, room_id, next) =
            (server.clone(), token.clone(), room_id.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= messages as u64 {
                    break;
                }
                let body = format!("message {n:06} of the storage benchmark, about one hundred bytes of plain text.");
                let txn = format!("{}-s{n}", server.run);
                assert!(server.send(&token, &room_id, &txn, &body).await, "send {n}");
                if n % 500 == 499 {
                    eprint!("\r  {} sent", n + 1);
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("sender");
    }
    eprintln!();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = disk_bytes(dir);
    json!({
        "scenario": "storage",
        "messages": messages,
        "bytes_before": before,
        "bytes_after": after,
        "bytes_per_message": (after.saturating_sub(before) as f64 / messages as f64).round(),
    })
}

/// (g) Federation: events a second from a server (`origin`) to another
/// (`peer`) whose user reads them through `/sync`, and the latency from
/// the send's acknowledgement to the peer's `/sync`.
///
/// A user of `origin` makes a public room and a user of `peer` joins it
/// through `origin`'s server name. Throughput: `messages` sends from
/// `senders` concurrent senders as fast as they are answered, timed from
/// the first send to the last arrival on `peer`. Latency: then
/// `latency_messages` more, open loop at `rate` a second.
pub async fn federation(
    origin: &Server,
    peer: &Server,
    messages: u64,
    senders: usize,
    latency_messages: u64,
    rate: f64,
) -> Value {
    eprintln!("federation: {messages} messages from {senders} senders, then {latency_messages} at {rate}/s");
    let alice = origin.register("fedsender").await;
    let bob = peer.register("fedreader").await;
    let origin_name = origin.server_name_of(&alice).await;
    let room_id = origin
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    peer.join_via(&bob, &room_id, &origin_name).await;
    let since = initial_since(peer, &bob).await;
    let arrivals: Arrivals = Arc::default();
    // A burst is more than a default sync timeline holds (a server then
    // answers only the latest events, `limited`): ask for all of them.
    let reader = {
        let (peer, bob, arrivals) = (peer.clone(), bob.clone(), arrivals.clone());
        tokio::spawn(async move {
            let mut since = since;
            loop {
                let Some(answer) = peer.sync_all(&bob, &since, 30_000).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                note_arrivals(&arrivals, "fed:", &message_bodies(&answer), Instant::now());
                if let Some(next) = answer["next_batch"].as_str() {
                    since = next.to_owned();
                }
            }
        })
    };
    let wait_for = |count: usize, seconds: u64| {
        let arrivals = arrivals.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let mut shown = usize::MAX;
            loop {
                let got = arrivals.lock().expect("arrivals").len();
                if got != shown {
                    eprint!("\r  {got} of {count} arrived");
                    shown = got;
                }
                if got >= count || Instant::now() > deadline {
                    eprintln!();
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Throughput.
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..senders.max(1) {
        let (origin, alice, room_id, next) =
            (origin.clone(), alice.clone(), room_id.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let seq = next.fetch_add(1, Ordering::SeqCst);
                if seq >= messages {
                    return;
                }
                let txn = format!("{}-fed-{seq}", origin.run);
                while !origin
                    .send(&alice, &room_id, &txn, &format!("fed:{seq}"))
                    .await
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let sent_in = started.elapsed();
    let arrived = wait_for(messages as usize, 300).await;
    let last_arrival = arrivals
        .lock()
        .expect("arrivals")
        .values()
        .flatten()
        .max()
        .copied()
        .unwrap_or_else(Instant::now);
    let delivered_in = last_arrival.duration_since(started);
    let events_per_second = arrived as f64 / delivered_in.as_secs_f64();

    // Latency, open loop.
    let answered: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    let mut sends = Vec::new();
    let base = 1_000_000;
    for seq in base..base + latency_messages {
        ticker.tick().await;
        let (origin, alice, room_id, answered) = (
            origin.clone(),
            alice.clone(),
            room_id.clone(),
            answered.clone(),
        );
        sends.push(tokio::spawn(async move {
            let txn = format!("{}-fed-{seq}", origin.run);
            if origin
                .send(&alice, &room_id, &txn, &format!("fed:{seq}"))
                .await
            {
                answered
                    .lock()
                    .expect("answered")
                    .insert(seq, Instant::now());
            }
        }));
    }
    for send in sends {
        let _ = send.await;
    }
    wait_for(arrived + latency_messages as usize, 60).await;
    reader.abort();
    let mut latency = histogram();
    let arrivals = arrivals.lock().expect("arrivals");
    for (seq, sent) in answered.lock().expect("answered").iter() {
        if let Some(at) = arrivals.get(seq).and_then(|times| times.first()) {
            let micros = at.saturating_duration_since(*sent).as_micros() as u64;
            latency.record(micros.max(1)).expect("in bounds");
        }
    }
    json!({
        "scenario": "federation",
        "messages": messages,
        "senders": senders,
        "arrived": arrived,
        "sent_seconds": sent_in.as_secs_f64(),
        "events_per_second": (events_per_second * 10.0).round() / 10.0,
        "latency_messages": latency_messages,
        "latency_delivered": latency.len(),
        "latency": quantiles(&latency),
    })
}

/// A push gateway on loopback: answers every notification `200` and
/// notes when each event ID arrived. HTTP/1.1 with keep-alive, just
/// enough for the push gateway API.
async fn push_gateway(arrivals: Arc<Mutex<HashMap<String, Instant>>>) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a gateway port");
    let url = format!(
        "http://{}/_matrix/push/v1/notify",
        listener.local_addr().expect("its address")
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let arrivals = arrivals.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0;
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let header = line.trim_end().to_ascii_lowercase();
                        if header.is_empty() {
                            break;
                        }
                        if let Some(value) = header.strip_prefix("content-length:") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let at = Instant::now();
                    if let Ok(value) = serde_json::from_slice::<Value>(&body) {
                        if let Some(id) = value["notification"]["event_id"].as_str() {
                            arrivals.lock().unwrap().entry(id.to_owned()).or_insert(at);
                        }
                    }
                    let answer = "{\"rejected\":[]}";
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if reader
                        .get_mut()
                        .write_all(response.as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// (h) Push latency: from the start of a send to the push gateway's
/// request for that event, `messages` sent at `rate` a second over
/// `rooms` rooms, each with a recipient whose pusher is the gateway.
pub async fn push(server: &Server, rooms: usize, messages: u64, rate: f64) -> Value {
    eprintln!("push: {rooms} rooms, {messages} messages at {rate}/s");
    let arrivals = Arc::new(Mutex::new(HashMap::new()));
    let url = push_gateway(arrivals.clone()).await;
    let senders = server.register_many("pushsender", rooms).await;
    let recipients = server.register_many("pushed", rooms).await;
    let mut room_ids = Vec::new();
    for (n, (sender, recipient)) in senders.iter().zip(&recipients).enumerate() {
        let room_id = server
            .create_room(sender, json!({ "preset": "public_chat" }))
            .await;
        server.join(recipient, &room_id).await;
        let pusher = json!({
            "kind": "http", "app_id": "org.myelin.bench", "pushkey": format!("{}-key{n}", server.run),
            "app_display_name": "bench", "device_display_name": "bench", "lang": "en",
            "data": { "url": url },
        });
        let answer = server
            .http
            .post(server.url("/_matrix/client/v3/pushers/set"))
            .bearer_auth(recipient)
            .json(&pusher)
            .send()
            .await
            .expect("pushers/set");
        assert!(
            answer.status().is_success(),
            "the server refused the pusher ({}): it must allow pushing to loopback",
            answer.status()
        );
        room_ids.push(room_id);
    }
    let started: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let begin = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..messages {
        tokio::time::sleep_until((begin + interval * n as u32).into()).await;
        let which = n as usize % rooms;
        let (server, token, room_id) = (
            server.clone(),
            senders[which].clone(),
            room_ids[which].clone(),
        );
        let (started, failed) = (started.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let at = Instant::now();
            let txn = format!("{}-push{n}", server.run);
            match server.send_event(&token, &room_id, &txn, "pushed").await {
                Some(event_id) => {
                    started.lock().unwrap().insert(event_id, at);
                }
                None => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let sent = started.lock().unwrap().len();
    while arrivals.lock().unwrap().len() < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies = histogram();
    let arrivals = arrivals.lock().unwrap();
    let mut missing = 0;
    for (event_id, at) in started.lock().unwrap().iter() {
        match arrivals.get(event_id) {
            Some(arrived) => {
                let micros = arrived.saturating_duration_since(*at).as_micros() as u64;
                latencies.record(micros.max(1)).expect("a latency in range");
            }
            None => missing += 1,
        }
    }
    let mut result = quantiles(&latencies);
    result["scenario"] = json!("push");
    result["rooms"] = json!(rooms);
    result["sent"] = json!(sent);
    result["failed_sends"] = json!(failed.load(Ordering::Relaxed));
    result["not_pushed"] = json!(missing);
    result
}

/// (i) A soak: `clients` waiting, one sender at `rate` messages a second
/// for `settle` and then `seconds` more, the server's resident memory read
/// every 10 s. Memory that keeps growing shows as the last minute's median
/// above the first minute's (of the `seconds` after `settle`); the
/// deliveries are measured as in `latency`, over the whole sending.
///
/// Two kinds of memory rightly grow for a while under steady load, and
/// `fill` and `metrics` keep them apart from a leak:
/// - the server's memos of the newest events, stream entries and
///   decisions for each member (tens of thousands of entries) fill over
///   hours at a low rate: `fill` messages, sent first as fast as the
///   server takes them into rooms of their own with no one waiting, fill
///   them before the minutes begin (see `fill_memos`);
/// - RocksDB's memtables and block cache fill up to their configured
///   bounds: with `metrics` (the URL of Myelin's metrics listener) they
///   are read with each reading, and so is the allocator's count of the
///   bytes the server's own code holds, which must not grow.
pub async fn soak(
    server: &Server,
    pid: u32,
    soak: SoakLoad,
    transport: Transport,
    metrics: Option<String>,
) -> Value {
    let SoakLoad {
        clients,
        seconds,
        rate,
        fill,
        settle,
    } = soak;
    if fill > 0 {
        fill_memos(server, fill).await;
    }
    let samples: Arc<Mutex<Vec<Reading>>> = Arc::default();
    let started = Instant::now();
    let sampler = {
        let samples = samples.clone();
        let http = server.http.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs(10));
            loop {
                ticker.tick().await;
                let reading = Reading {
                    at: started.elapsed().as_secs_f64(),
                    resident: resident_bytes(pid),
                    server: match &metrics {
                        Some(url) => server_memory(&http, url).await,
                        None => None,
                    },
                };
                samples.lock().expect("samples").push(reading);
            }
        })
    };
    // The same load for `settle` seconds first, outside the minutes.
    let messages = ((seconds + settle) as f64 * rate).round() as u64;
    let mut result = latency(server, clients, messages, rate, 1, transport, true).await;
    sampler.abort();
    let samples = samples.lock().expect("samples").clone();
    // The sending minutes are the last `seconds` before the end of sending;
    // the deliveries' wait after it (at most 15 s) is left out too.
    let end = started.elapsed().as_secs_f64();
    let sending: Vec<Reading> = samples
        .into_iter()
        .filter(|reading| reading.at >= end - seconds as f64 - 15.0)
        .collect();
    // A minute of readings at each end, never overlapping.
    let minute = 6.min(sending.len() / 2).max(1).min(sending.len());
    let (head, tail) = (&sending[..minute], &sending[sending.len() - minute..]);
    result["scenario"] = json!(format!("soak-{}", transport.name()));
    result["seconds"] = json!(seconds);
    result["rate"] = json!(rate);
    result["fill"] = json!(fill);
    result["settle_seconds"] = json!(settle);
    let resident = |reading: &Reading| Some(reading.resident);
    compare_minutes(&mut result, "rss", head, tail, resident);
    result["rss_max_mb"] = json!(mb(sending.iter().map(|r| r.resident).max().unwrap_or(0)));
    result["rss_samples"] = json!(sending.len());
    let rocksdb = |reading: &Reading| reading.server.map(|server| server.rocksdb);
    let heap = |reading: &Reading| reading.server.map(|server| server.heap);
    // Every reading of the minutes, so that a median can be checked
    // against the readings it came from.
    let readings: Vec<Value> = sending
        .iter()
        .map(|reading| {
            json!({
                "at_s": reading.at.round(),
                "rss_mb": mb(reading.resident),
                "rocksdb_mb": rocksdb(reading).map(mb),
                "heap_mb": heap(reading).map(mb),
            })
        })
        .collect();
    result["readings"] = json!(readings);
    if tail.iter().all(|reading| reading.server.is_some()) {
        let outside = |reading: &Reading| {
            let server = reading.server?;
            Some(reading.resident.saturating_sub(server.rocksdb))
        };
        result["rocksdb_last_minute_mb"] = json!(mb(median(tail, rocksdb)));
        result["rocksdb_max_mb"] = json!(mb(sending.iter().filter_map(rocksdb).max().unwrap_or(0)));
        compare_minutes(&mut result, "outside_rocksdb", head, tail, outside);
        compare_minutes(&mut result, "heap", head, tail, heap);
    }
    result
}

/// The load of a soak.
pub struct SoakLoad {
    pub clients: usize,
    pub seconds: u64,
    /// Messages a second.
    pub rate: f64,
    /// Messages sent first, to fill the server's memos.
    pub fill: u64,
    /// Seconds of the same load before the measured `seconds`, for what
    /// each connection and room sets up at its first deliveries.
    pub settle: u64,
}

/// Fills the server's memos before a soak's minutes begin: `count`
/// messages, sent as fast as 16 concurrent sends go into a room of one
/// member and read back, fill those of the newest events and stream
/// entries; then 2,000 more into a room of a hundred members (who never
/// read) fill the memo of the newest events' decisions for each member.
async fn fill_memos(server: &Server, count: u64) {
    eprintln!("soak: {count} messages to fill the memos");
    let token = server.register_many("filler", 1).await.remove(0);
    let alone = server.create_room(&token, json!({})).await;
    send_fast(server, &token, &alone, "alone", count).await;
    // Back through the room, a thousand events a page.
    let mut from: Option<String> = None;
    let mut read = 0;
    loop {
        let mut url = server.url(&format!(
            "/_matrix/client/v3/rooms/{alone}/messages?dir=b&limit=1000"
        ));
        if let Some(from) = &from {
            url += &format!("&from={from}");
        }
        let Ok(response) = server.http.get(url).bearer_auth(&token).send().await else {
            break;
        };
        let Ok(page) = response.json::<Value>().await else {
            break;
        };
        let events = page["chunk"].as_array().map_or(0, Vec::len);
        read += events;
        match page["end"].as_str() {
            Some(end) if events > 0 => from = Some(end.to_owned()),
            _ => break,
        }
    }
    eprintln!("  {read} events read back");
    let members = server.register_many("fillmember", ROOM_LIMIT - 1).await;
    let crowded = server
        .create_room(&token, json!({ "preset": "public_chat" }))
        .await;
    for member in &members {
        server.join(member, &crowded).await;
    }
    send_fast(server, &token, &crowded, "crowded", 2000).await;
}

/// Sends `count` messages into a room with 16 sends at a time (`label`
/// keeps their transaction IDs apart from other rooms').
async fn send_fast(server: &Server, token: &str, room_id: &str, label: &str, count: u64) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (server, token, room_id, label, next) = (
            server.clone(),
            token.to_owned(),
            room_id.to_owned(),
            label.to_owned(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= count {
                    break;
                }
                let txn = format!("{}-fill-{label}-{seq}", server.run);
                server.send(&token, &room_id, &txn, "fill").await;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// The median of the readings' figure (`figure` answers None for a reading
/// without it).
fn median(readings: &[Reading], figure: impl Fn(&Reading) -> Option<u64>) -> u64 {
    let mut values: Vec<u64> = readings.iter().filter_map(figure).collect();
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

/// Bytes in MB, to a tenth.
fn mb(bytes: u64) -> f64 {
    (bytes as f64 / 1_048_576.0 * 10.0).round() / 10.0
}

/// `<name>_first_minute_mb`, `<name>_last_minute_mb` and
/// `<name>_growth_percent`: the medians of a figure over the first and the
/// last minute, and how much the second is above the first.
fn compare_minutes(
    result: &mut Value,
    name: &str,
    head: &[Reading],
    tail: &[Reading],
    figure: impl Fn(&Reading) -> Option<u64> + Copy,
) {
    let (first, last) = (median(head, figure), median(tail, figure));
    let growth = if first > 0 {
        ((last as f64 - first as f64) / first as f64 * 1000.0).round() / 10.0
    } else {
        0.0
    };
    result[format!("{name}_first_minute_mb")] = json!(mb(first));
    result[format!("{name}_last_minute_mb")] = json!(mb(last));
    result[format!("{name}_growth_percent")] = json!(growth);
}

/// A soak's reading of the server's memory.
#[derive(Clone, Copy)]
struct Reading {
    /// Seconds since the start.
    at: f64,
    /// Resident bytes.
    resident: u64,
    /// What the server's metrics say of its memory, when they are read.
    server: Option<ServerMemory>,
}

/// The server's memory as its metrics tell it.
#[derive(Clone, Copy)]
struct ServerMemory {
    /// Bytes RocksDB holds within its bounds: memtables, block cache, and
    /// the open table files' indexes and filters.
    rocksdb: u64,
    /// Bytes the server's own code holds allocated.
    heap: u64,
}

/// The server's memory from Myelin's metrics listener at `url`.
async fn server_memory(http: &reqwest::Client, url: &str) -> Option<ServerMemory> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|number| number.trim().parse().ok())
    };
    let rocksdb = value("myelin_rocksdb_memtable_bytes")?
        + value("myelin_rocksdb_block_cache_bytes")?
        + value("myelin_rocksdb_table_readers_bytes")?;
    Some(ServerMemory {
        rocksdb: rocksdb as u64,
        heap: value("myelin_allocator_allocated_bytes")? as u64,
    })
}
