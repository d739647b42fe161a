//! The client listener's front (`src/front.rs`) over raw TCP: long-polls
//! served on a kept-alive connection, pipelined requests, `Connection:
//! close`, a connection handed to hyper by its first request that is not a
//! sync, and a client that leaves while its sync waits.

mod common;

use std::time::Duration;

use common::{send_text, token, TestServer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 answer read off the socket: status, headers (lower-case
/// names), body. Bodies are sized by `content-length`.
async fn read_answer(
    socket: &mut TcpStream,
    pending: &mut Vec<u8>,
) -> (u16, Vec<(String, String)>, Value) {
    let head_end = loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(30), socket.read(&mut chunk))
            .await
            .expect("an answer within 30 s")
            .unwrap();
        assert!(n > 0, "the connection closed before an answer");
        pending.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(pending[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map(|(_, value)| value.parse().unwrap())
        .expect("a content-length");
    let body_start = head_end + 4;
    while pending.len() < body_start + length {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed inside a body");
        pending.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&pending[body_start..body_start + length]).unwrap();
    pending.drain(..body_start + length);
    (status, headers, body)
}

fn sync_request(token: &str, query: &str, extra: &str) -> String {
    format!(
        "GET /_matrix/client/v3/sync{query} HTTP/1.1\r\nHost: myelin\r\n\
         Authorization: Bearer {token}\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn long_polls_on_one_connection_and_a_handover() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    common::join(&server, &bob, &room).await;
    let address = server.server.as_ref().unwrap().addr;
    let mut socket = TcpStream::connect(address).await.unwrap();
    let mut pending = Vec::new();

    // An initial sync, then a long-poll on the same connection that a
    // message wakes.
    socket
        .write_all(sync_request(&bob, "", "").as_bytes())
        .await
        .unwrap();
    let (status, headers, first) = read_answer(&mut socket, &mut pending).await;
    assert_eq!(status, 200, "{first}");
    assert!(headers
        .iter()
        .any(|(name, value)| name == "content-type" && value == "application/json"));
    assert!(headers.iter().any(|(name, _)| name == "date"));
    assert!(first["rooms"]["join"][&room].is_object(), "{first}");
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let query = format!("?since={since}&timeout=20000");
    socket
        .write_all(sync_request(&bob, &query, "").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let event_id = send_text(&server, &alice, &room, "t1", "over the front").await;
    let (status, _, woken) = read_answer(&mut socket, &mut pending).await;
    assert_eq!(status, 200);
    let events = &woken["rooms"]["join"][&room]["timeline"]["events"];
    assert_eq!(events[0]["event_id"], event_id.as_str(), "{woken}");

    // Two syncs pipelined in one write: two answers, in order.
    let since = woken["next_batch"].as_str().unwrap().to_owned();
    let twice = sync_request(&bob, &format!("?since={since}&timeout=0"), "").repeat(2);
    socket.write_all(twice.as_bytes()).await.unwrap();
    for _ in 0..2 {
        let (status, _, answer) = read_answer(&mut socket, &mut pending).await;
        assert_eq!(status, 200);
        assert_eq!(answer["next_batch"], since.as_str());
    }

    // A request that is not a sync hands the connection to hyper, which
    // serves it and the syncs after it.
    let body = r#"{"msgtype":"m.text","body":"hi"}"#;
    let send = format!(
        "PUT /_matrix/client/v3/rooms/{room}/send/m.room.message/t2 HTTP/1.1\r\n\
         Host: myelin\r\nAuthorization: Bearer {bob}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(send.as_bytes()).await.unwrap();
    let (status, _, sent) = read_answer(&mut socket, &mut pending).await;
    assert_eq!(status, 200, "{sent}");
    socket
        .write_all(sync_request(&bob, &format!("?since={since}&timeout=0"), "").as_bytes())
        .await
        .unwrap();
    let (status, _, after) = read_answer(&mut socket, &mut pending).await;
    assert_eq!(status, 200);
    let events = &after["rooms"]["join"][&room]["timeline"]["events"];
    assert_eq!(events[0]["event_id"], sent["event_id"], "{after}");

    // A bad token gets the client API's error through the front too.
    let mut other = TcpStream::connect(address).await.unwrap();
    let mut other_pending = Vec::new();
    other
        .write_all(sync_request("nonsense", "", "").as_bytes())
        .await
        .unwrap();
    let (status, _, refused) = read_answer(&mut other, &mut other_pending).await;
    assert_eq!(status, 401);
    assert_eq!(refused["errcode"], "M_UNKNOWN_TOKEN");

    // `Connection: close`: the answer, then the end of the connection.
    other
        .write_all(sync_request(&bob, "?timeout=0", "Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let (status, headers, _) = read_answer(&mut other, &mut other_pending).await;
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(name, value)| name == "connection" && value == "close"));
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), other.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "the server closed the connection"
    );
}

#[tokio::test]
async fn a_client_that_leaves_ends_its_wait() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let (_, first) = server.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let services = server.server.as_ref().unwrap().services.clone();
    let address = server.server.as_ref().unwrap().addr;
    let mut socket = TcpStream::connect(address).await.unwrap();
    let query = format!("?since={since}&timeout=60000");
    socket
        .write_all(sync_request(&alice, &query, "").as_bytes())
        .await
        .unwrap();
    let waits = |wanted: u64| {
        let services = services.clone();
        async move {
            for _ in 0..100 {
                if services.sync.waiting() == wanted {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };
    assert!(waits(1).await, "the sync waits");
    drop(socket);
    assert!(waits(0).await, "the wait ended with the connection");
}
