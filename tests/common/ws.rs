//! A WebSocket client of the push extension, on tokio-tungstenite.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::TestServer;

pub const WS_PATH: &str = "/_matrix/client/unstable/org.myelin.ws/connect";

/// How long a test waits for a frame that must come.
const FRAME_WAIT: Duration = Duration::from_secs(20);

pub struct WsClient {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Push frames read while waiting for an answer.
    pub pushes: VecDeque<Value>,
    next_id: u64,
}

pub fn ws_url(server: &TestServer) -> String {
    format!("{}{WS_PATH}", server.base.replace("http://", "ws://"))
}

impl WsClient {
    /// Connects with the token in the `Authorization` header; the first
    /// frame must be `ready`.
    pub async fn connect(server: &TestServer, token: &str) -> (WsClient, Value) {
        let mut request = ws_url(server).into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut client = WsClient::from_socket(socket);
        let ready = client.next_frame().await.expect("a ready frame");
        assert_eq!(ready["type"], "ready", "{ready}");
        (client, ready)
    }

    pub fn from_socket(socket: WebSocketStream<MaybeTlsStream<TcpStream>>) -> WsClient {
        WsClient {
            socket,
            pushes: VecDeque::new(),
            next_id: 0,
        }
    }

    pub async fn send_text(&mut self, text: String) {
        self.socket.send(Message::text(text)).await.unwrap();
    }

    /// The next text frame, or `None` when the connection ends.
    pub async fn next_frame(&mut self) -> Option<Value> {
        loop {
            let message = tokio::time::timeout(FRAME_WAIT, self.socket.next())
                .await
                .expect("a frame in time")?;
            match message.ok()? {
                Message::Text(text) => return Some(serde_json::from_str(&text).unwrap()),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// How the connection ends: the close code, if the server sent one.
    pub async fn closed(&mut self) -> Option<CloseCode> {
        loop {
            let message = tokio::time::timeout(FRAME_WAIT, self.socket.next())
                .await
                .expect("the connection ends in time");
            match message {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Sends a request and waits for its answer, keeping the pushes that
    /// come meanwhile.
    pub async fn call(&mut self, kind: &str, data: Value) -> Value {
        self.next_id += 1;
        let id = format!("r{}", self.next_id);
        let frame = json!({ "type": kind, "id": id, "data": data });
        self.send_text(frame.to_string()).await;
        self.answer(&json!(id)).await
    }

    /// The answer to request `id`.
    pub async fn answer(&mut self, id: &Value) -> Value {
        loop {
            let frame = self.next_frame().await.expect("an answer");
            if frame.get("ok").is_some() && &frame["id"] == id {
                return frame;
            }
            if frame.get("ok").is_none() {
                self.pushes.push_back(frame);
            }
        }
    }

    /// A request that must succeed; its data.
    pub async fn ok(&mut self, kind: &str, data: Value) -> Value {
        let answer = self.call(kind, data).await;
        assert_eq!(answer["ok"], true, "{kind}: {answer}");
        answer["data"].clone()
    }

    /// A request that must fail with `errcode`.
    pub async fn fails(&mut self, kind: &str, data: Value, errcode: &str) -> Value {
        let answer = self.call(kind, data).await;
        assert_eq!(answer["ok"], false, "{kind}: {answer}");
        assert_eq!(answer["errcode"], errcode, "{kind}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{answer}"
        );
        answer
    }

    /// The next push frame for which `wanted` holds, skipping others.
    pub async fn push_where(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        while let Some(frame) = self.pushes.pop_front() {
            if wanted(&frame) {
                return frame;
            }
        }
        loop {
            let frame = self.next_frame().await.expect("a push frame");
            if frame.get("ok").is_none() && wanted(&frame) {
                return frame;
            }
        }
    }

    /// The next pushed event of `kind` in a room.
    pub async fn event_of(&mut self, kind: &str) -> Value {
        self.push_where(|f| f["type"] == "event" && f["data"]["event"]["type"] == kind)
            .await
    }
}
