//! The WebSocket push extension:
//! `GET /_matrix/client/unstable/org.myelin.ws/connect` (the protocol is
//! specified in `docs/websocket.md`).
//!
//! A request frame is carried out by the HTTP API itself: it becomes the
//! request its HTTP equivalent is and goes through the router, so it obeys
//! exactly the rules, errors and rate limits of that endpoint. Pushes are
//! `/sync` answers ([`sync::look`]) cut into frames, with the gaps of
//! limited timelines filled through `/messages`. The connection holds a
//! cursor (the position pushed up to); the device's acknowledgements are
//! stored, and a new connection resumes from the last one.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;

use crate::front::ClientAddr;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::SinkExt;
use http_body_util::BodyExt;
use ruma::OwnedUserId;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use super::membership::parse_user;
use super::sync::{look, register_known, set_presence, KnownRooms, Shape, SyncToken};
use crate::api::error::MatrixError;
use crate::api::AppState;
use crate::services::accounts::{Authed, TokenCheck};
use crate::services::connections::Session;
use crate::services::filter::Filter;
use crate::services::stream::Registration;

/// Where clients connect.
pub const PATH: &str = "/_matrix/client/unstable/org.myelin.ws/connect";

/// Bytes the connection reads into at once: small, so that an idle
/// connection costs little; a larger frame grows it while it is read.
const READ_BUFFER_BYTES: usize = 1024;
/// Bytes of frames gathered before they are written: the frames of one
/// push go out in as few writes as this allows (an event's frame and the
/// `synced` after it in one).
const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// Timeline events per room in one push before the gap is filled.
const PUSH_TIMELINE_LIMIT: u32 = 100;
/// Most events of one room's gap fetched through `/messages`; past that a
/// `gap` frame tells the client to page back itself.
const MAX_GAP_EVENTS: usize = 5_000;
/// Events per `/messages` page when filling a gap.
const GAP_PAGE: usize = 500;

/// What the WebSocket route needs: the services, and the HTTP API that
/// carries out requests.
#[derive(Clone)]
pub struct WsState {
    pub state: AppState,
    pub api: Router,
}

/// `GET /_matrix/client/unstable/org.myelin.ws/connect`
pub async fn connect(State(ws): State<WsState>, request: Request) -> Response {
    match accept(ws, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn accept(ws: WsState, request: Request) -> Result<Response, MatrixError> {
    let (mut parts, _) = request.into_parts();
    let in_url = parts.uri.query().is_some_and(|query| {
        form_urlencoded::parse(query.as_bytes()).any(|(name, _)| name == "access_token")
    });
    if in_url {
        return Err(MatrixError::invalid_param(
            "the access token goes in the Authorization header or the auth frame, never in the URL",
        ));
    }
    // With a header, the token is checked before the upgrade: a bad one
    // is an ordinary HTTP 401.
    let token = match parts.headers.get(header::AUTHORIZATION) {
        Some(value) => {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim().to_owned())
                .ok_or_else(MatrixError::missing_token)?;
            let authed = ws.state.accounts.authenticate(&token)?;
            Some((authed, token))
        }
        None => None,
    };
    let peer = parts
        .extensions
        .get::<ConnectInfo<ClientAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &())
        .await
        .map_err(|rejection| {
            MatrixError::invalid_param(format!(
                "this endpoint takes a WebSocket upgrade: {}",
                rejection.body_text()
            ))
        })?;
    let config = ws.state.config.websocket.clone();
    Ok(upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(config.max_frame_bytes)
        .max_frame_size(config.max_frame_bytes)
        .on_upgrade(move |socket| async move {
            let mut socket = socket;
            match Box::pin(authenticate(&ws, &mut socket, token)).await {
                Ok((authed, token)) => {
                    let session = ws
                        .state
                        .connections
                        .open(&authed.user_id.to_string(), &authed.device_id);
                    let caller = Caller {
                        state: ws.state.clone(),
                        api: ws.api.clone(),
                        user: authed.user_id.to_string(),
                        device_id: authed.device_id.clone(),
                        token,
                        peer,
                    };
                    let state = ws.state.clone();
                    drop(ws);
                    let session = run(state, socket, authed, caller, session).await;
                    // Last: the server waits for every session to end
                    // before it closes the database, so nothing of this
                    // connection may still hold the services then.
                    drop(session);
                }
                Err(end) => Box::pin(close(socket, &end)).await,
            }
        }))
}

/// Why a connection ends: the close code and reason sent.
#[derive(Debug)]
struct End {
    code: u16,
    reason: String,
}

impl End {
    fn new(code: u16, reason: impl Into<String>) -> End {
        End {
            code,
            reason: reason.into(),
        }
    }
}

/// The closing handshake: the close frame, then the client's answer to
/// it, for a moment, so that the connection ends cleanly (a socket closed
/// with unread data in it would be reset, and the client could lose the
/// close frame).
async fn close(mut socket: WebSocket, end: &End) {
    let frame = CloseFrame {
        code: end.code,
        reason: end.reason.clone().into(),
    };
    let sent = tokio::time::timeout(
        Duration::from_secs(1),
        socket.send(Message::Close(Some(frame))),
    )
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// The token of the `Authorization` header, or the one the first frame
/// (`auth`) brings.
async fn authenticate(
    ws: &WsState,
    socket: &mut WebSocket,
    from_header: Option<(Authed, String)>,
) -> Result<(Authed, String), End> {
    if let Some(found) = from_header {
        return Ok(found);
    }
    let wait = Duration::from_millis(ws.state.config.websocket.auth_timeout_ms);
    let first = match tokio::time::timeout(wait, socket.recv()).await {
        Err(_) => return Err(End::new(4401, "no auth frame in time")),
        Ok(None | Some(Err(_))) => return Err(End::new(1000, "")),
        Ok(Some(Ok(message))) => message,
    };
    let text = match first {
        Message::Text(text) => text,
        _ => return Err(End::new(4401, "the first frame must be an auth frame")),
    };
    let (id, kind, data) = match parse_frame(&text) {
        Ok(parsed) => parsed,
        Err(answer) => {
            let _ = socket.send(Message::text(answer.to_string())).await;
            return Err(End::new(4401, "the first frame must be an auth frame"));
        }
    };
    let token = data.get("access_token").and_then(Value::as_str);
    let outcome = match (kind.as_str(), token) {
        ("auth", Some(token)) => ws
            .state
            .accounts
            .authenticate(token)
            .map(|authed| (authed, token.to_owned()))
            .map_err(MatrixError::from),
        ("auth", None) => Err(MatrixError::missing_param("auth needs data.access_token")),
        _ => Err(MatrixError::missing_token()),
    };
    match outcome {
        Ok((authed, token)) => {
            let answer = success(
                &id,
                json!({ "user_id": authed.user_id.to_string(), "device_id": authed.device_id }),
            );
            socket
                .send(Message::text(answer.to_string()))
                .await
                .map_err(|_| End::new(1000, ""))?;
            Ok((authed, token))
        }
        Err(error) => {
            let (errcode, message) = error.parts();
            let answer = failure(&id, &errcode, &message);
            let _ = socket.send(Message::text(answer.to_string())).await;
            Err(End::new(4401, errcode))
        }
    }
}

/// One authenticated connection.
struct Connection {
    state: AppState,
    socket: WebSocket,
    authed: Authed,
    user: OwnedUserId,
    filter: Box<Filter>,
    /// Everything up to here was pushed.
    cursor: SyncToken,
    caller: Caller,
    send_timeout: Duration,
    /// The last check of the token, repeated before each push.
    token_check: Option<TokenCheck>,
    /// The user's memberships from the last push: a push reads them again
    /// only when a membership was written since (a waiting `/sync` keeps
    /// them the same way).
    known: Option<KnownRooms>,
}

type Pending = Pin<Box<dyn Future<Output = Value> + Send>>;

/// A step of a connection, boxed: the connection's own future lives as
/// long as the connection, and holds only a pointer to the step under way
/// instead of room for the largest one.
type Step<'a, T> = Pin<Box<dyn Future<Output = Result<T, End>> + Send + 'a>>;

/// Serves an authenticated connection until it ends; hands the session
/// back once everything else of the connection is gone. Not an `async fn`:
/// what is worked out here is not kept beside the connection for its life.
fn run(
    state: AppState,
    socket: WebSocket,
    authed: Authed,
    caller: Caller,
    session: Session,
) -> Pin<Box<dyn Future<Output = Session> + Send>> {
    let refuse =
        |socket, session, reason: &'static str| -> Pin<Box<dyn Future<Output = Session> + Send>> {
            Box::pin(async move {
                close(socket, &End::new(1011, reason)).await;
                session
            })
        };
    let Ok(user) = parse_user(&authed.user_id.to_string()) else {
        return refuse(socket, session, "bad user ID");
    };
    let filter_json = format!(r#"{{"room":{{"timeline":{{"limit":{PUSH_TIMELINE_LIMIT}}}}}}}"#);
    let Ok(filter) = state.filters.resolve(&user, Some(&filter_json)) else {
        return refuse(socket, session, "no filter");
    };
    let resumed = state
        .delivered_upto(&user, &authed.device_id)
        .ok()
        .flatten();
    let cursor = SyncToken {
        stream: resumed.unwrap_or_else(|| state.sync.current()),
        typing: 0,
    };
    let send_timeout = Duration::from_millis(state.config.websocket.send_timeout_ms);
    let connection = Connection {
        state,
        socket,
        authed,
        user,
        filter: Box::new(filter),
        cursor,
        caller,
        send_timeout,
        token_check: None,
        known: None,
    };
    Box::pin(connection.serve(session, resumed.is_some()))
}

impl Connection {
    async fn serve(mut self, mut session: Session, resumed: bool) -> Session {
        let end = match Box::pin(self.serve_inner(&mut session, resumed)).await {
            Ok(()) => End::new(1000, ""),
            Err(end) => end,
        };
        Box::pin(close(self.socket, &end)).await;
        session
    }

    async fn serve_inner(&mut self, session: &mut Session, resumed: bool) -> Result<(), End> {
        let config = self.state.config.websocket.clone();
        if self.state.connections.stopping() {
            return Err(End::new(1001, "the server is stopping"));
        }
        let _ = Box::pin(set_presence(&self.state, &self.user, None)).await;
        let ready = json!({
            "type": "ready",
            "pos": self.cursor.render(),
            "data": {
                "user_id": self.authed.user_id.to_string(),
                "device_id": self.authed.device_id,
                "resumed": resumed,
            },
        });
        self.send(ready).await?;
        let mut queue: VecDeque<(Value, String, Value)> = VecDeque::new();
        let mut running: Option<Pending> = None;
        let mut ping = tokio::time::interval(Duration::from_millis(config.ping_interval_ms));
        ping.tick().await;
        let idle_timeout = Duration::from_millis(config.idle_timeout_ms);
        let mut last_heard = tokio::time::Instant::now();
        let (mut registration, mut again) = self.look_and_push(None).await?;
        loop {
            if running.is_none() {
                if let Some((id, kind, data)) = queue.pop_front() {
                    running = Some(Box::pin(self.caller.clone().perform(id, kind, data)));
                }
            }
            if again {
                (registration, again) = self.look_and_push(Some(registration)).await?;
                continue;
            }
            tokio::select! {
                () = registration.notified() => {
                    (registration, again) = self.look_and_push(Some(registration)).await?;
                }
                answer = async { running.as_mut().expect("guarded").await }, if running.is_some() => {
                    running = None;
                    self.send(answer).await?;
                }
                message = self.socket.recv() => {
                    last_heard = tokio::time::Instant::now();
                    let text = match message {
                        None => return Ok(()),
                        Some(Err(error)) => {
                            return Err(End::new(1009, format!("unreadable frame: {error}")));
                        }
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) => return Ok(()),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Binary(_))) => {
                            let answer = failure(&Value::Null, "M_BAD_JSON", "frames are JSON text");
                            self.send(answer).await?;
                            continue;
                        }
                    };
                    let (id, kind, data) = match parse_frame(&text) {
                        Ok(parsed) => parsed,
                        Err(answer) => {
                            self.send(answer).await?;
                            continue;
                        }
                    };
                    match kind.as_str() {
                        "ping" => self.send(success(&id, json!({}))).await?,
                        "sync" => {
                            let answer = self.resume_from(&id, &data);
                            let moved = answer["ok"] == true;
                            self.send(answer).await?;
                            if moved {
                                (registration, again) = self.look_and_push(Some(registration)).await?;
                            }
                        }
                        "auth" => {
                            let answer = failure(&id, "M_INVALID_PARAM", "this connection is already authenticated");
                            self.send(answer).await?;
                        }
                        _ if queue.len() + usize::from(running.is_some()) >= config.max_requests_in_flight => {
                            let answer = failure(
                                &id,
                                "M_LIMIT_EXCEEDED",
                                &format!("at most {} requests may be in flight", config.max_requests_in_flight),
                            );
                            self.send(answer).await?;
                        }
                        _ => queue.push_back((id, kind, data)),
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() >= idle_timeout {
                        return Err(End::new(4408, "idle: nothing heard within the idle timeout"));
                    }
                    self.send_message(Message::Ping(Default::default())).await?;
                }
                () = session.replaced.notified() => {
                    return Err(End::new(4000, "replaced by a newer connection of this device"));
                }
                _ = session.stopping.changed() => {
                    return Err(End::new(1001, "the server is stopping"));
                }
            }
        }
    }

    /// `sync`: moves the cursor to the token given (or to now).
    fn resume_from(&mut self, id: &Value, data: &Value) -> Value {
        let since = match data.get("since") {
            None | Some(Value::Null) => SyncToken::now(&self.state),
            Some(Value::String(text)) => match SyncToken::parse(text) {
                Ok(token) => token,
                Err(error) => {
                    let (errcode, message) = error.parts();
                    return failure(id, &errcode, &message);
                }
            },
            Some(_) => return failure(id, "M_INVALID_PARAM", "since must be a sync token"),
        };
        if since.stream > self.state.sync.current() {
            return failure(
                id,
                "M_INVALID_PARAM",
                "the token is past the stream's current position",
            );
        }
        self.cursor = since;
        success(id, json!({ "pos": since.render() }))
    }

    /// Pushes everything after the cursor, registered for wake-ups before
    /// it looks: with the registration kept from the last push, or with a
    /// new one. Hands back the registration to wait on, and whether to look
    /// again at once: when more is waiting than one push carries, or when
    /// the push names a room the registration does not wake for (a room
    /// joined or invited to), which a new registration now covers.
    fn look_and_push(&mut self, kept: Option<Registration>) -> Step<'_, (Registration, bool)> {
        Box::pin(self.look_and_push_now(kept))
    }

    async fn look_and_push_now(
        &mut self,
        kept: Option<Registration>,
    ) -> Result<(Registration, bool), End> {
        let checked = self
            .state
            .accounts
            .recheck(&self.caller.token, self.token_check);
        self.token_check = Some(checked.map_err(|_| End::new(4401, "M_UNKNOWN_TOKEN"))?);
        let unreadable = |_| End::new(1011, "cannot read the stream");
        // The memberships of the last push, brought up to date by the look
        // when one was written since; read here only for the first push.
        let mut known = match self.known.take() {
            Some(known) => known,
            None => KnownRooms::read(&self.state, &self.user).map_err(unreadable)?,
        };
        let mut registration = match kept {
            Some(registration) => registration,
            None => register_known(&self.state, &self.user, &known),
        };
        let (answer, empty) = look(
            &self.state,
            &self.authed,
            &self.user,
            &self.filter,
            Some(self.cursor),
            Shape::Push,
            &mut known,
        )
        .map_err(unreadable)?;
        let next = answer["next_batch"]
            .as_str()
            .and_then(|text| SyncToken::parse(text).ok())
            .ok_or_else(|| End::new(1011, "no position"))?;
        let capped = answer["to_device"]["events"]
            .as_array()
            .is_some_and(|events| events.len() >= crate::services::e2ee::MAX_TO_DEVICE_PER_SYNC);
        let uncovered = ["join", "invite", "leave", "knock"].iter().any(|section| {
            answer["rooms"][section]
                .as_object()
                .is_some_and(|rooms| rooms.keys().any(|room| !registration.covers(room)))
        });
        if !empty {
            let frames = Box::pin(frames(&self.caller, self.cursor, answer, next)).await;
            self.send_all(frames).await?;
        }
        self.cursor = next;
        if uncovered {
            // Writes to the new rooms since the look are caught by looking
            // again under the new registration.
            known = KnownRooms::read(&self.state, &self.user).map_err(unreadable)?;
            registration = register_known(&self.state, &self.user, &known);
        }
        self.known = Some(known);
        Ok((registration, capped || uncovered))
    }

    fn send(&mut self, frame: Value) -> Step<'_, ()> {
        self.send_message(Message::text(frame.to_string()))
    }

    /// Sends the frames of one push, written to the socket together (as
    /// few writes as the write buffer allows), within the send timeout.
    fn send_all(&mut self, frames: Vec<String>) -> Step<'_, ()> {
        Box::pin(async move {
            let wait = self.send_timeout;
            let socket = &mut self.socket;
            let written = tokio::time::timeout(wait, async move {
                for frame in frames {
                    socket.feed(Message::text(frame)).await?;
                }
                socket.flush().await
            });
            sent(written.await)
        })
    }

    /// Sends one message; a client that leaves it unread past the send
    /// timeout is disconnected.
    fn send_message(&mut self, message: Message) -> Step<'_, ()> {
        Box::pin(async move {
            sent(tokio::time::timeout(self.send_timeout, self.socket.send(message)).await)
        })
    }
}

/// How a write within the send timeout ended: a client that left its
/// frames unread past the timeout is disconnected.
fn sent(outcome: Result<Result<(), axum::Error>, tokio::time::error::Elapsed>) -> Result<(), End> {
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::new(1000, "")),
        Err(_) => Err(End::new(
            4429,
            "too slow: a frame waited past the send timeout",
        )),
    }
}

/// A push frame as it is written.
#[derive(Serialize)]
struct Frame<'a, D> {
    #[serde(rename = "type")]
    kind: &'a str,
    pos: &'a str,
    data: D,
}

/// The data of a frame about one event of a room.
#[derive(Serialize)]
struct RoomEvent<'a> {
    room_id: &'a str,
    event: &'a Value,
}

/// The frames of one push, as text, all at one position.
struct Frames {
    pos: String,
    texts: Vec<String>,
}

impl Frames {
    fn push(&mut self, kind: &str, data: impl Serialize) {
        let frame = Frame {
            kind,
            pos: &self.pos,
            data,
        };
        let text = serde_json::to_string(&frame).expect("JSON values always serialize");
        self.texts.push(text);
    }
}

/// Cuts a `/sync` answer after `cursor` into push frames, each carrying
/// the position `next`, and ends them with a `synced` frame: the text of
/// each, written straight from the answer's parts.
async fn frames(
    caller: &Caller,
    cursor: SyncToken,
    mut answer: Value,
    next: SyncToken,
) -> Vec<String> {
    let mut frames = Frames {
        pos: next.render(),
        texts: Vec::new(),
    };
    let mut rooms = answer["rooms"].take();
    for section in ["join", "leave"] {
        let Some(entries) = rooms.get_mut(section).and_then(Value::as_object_mut) else {
            continue;
        };
        for (room_id, body) in entries.iter_mut() {
            let mut timeline = events(taken(body, &["timeline", "events"]));
            if body["timeline"]["limited"] == true {
                let prev_batch = &body["timeline"]["prev_batch"];
                match fill_gap(caller, cursor, room_id, prev_batch).await {
                    Some(mut earlier) => {
                        earlier.append(&mut timeline);
                        timeline = earlier;
                    }
                    None => frames.push(
                        "gap",
                        json!({ "room_id": room_id, "prev_batch": prev_batch }),
                    ),
                }
            }
            let in_timeline: BTreeSet<&str> = timeline
                .iter()
                .filter_map(|event| event["event_id"].as_str())
                .collect();
            for event in events(taken(body, &["state", "events"])) {
                let id = event["event_id"].as_str().unwrap_or_default();
                if !in_timeline.contains(id) {
                    frames.push(
                        "state",
                        RoomEvent {
                            room_id,
                            event: &event,
                        },
                    );
                }
            }
            for event in &timeline {
                frames.push("event", RoomEvent { room_id, event });
            }
            for event in events(taken(body, &["account_data", "events"])) {
                frames.push(
                    "account_data",
                    RoomEvent {
                        room_id,
                        event: &event,
                    },
                );
            }
            for mut event in events(taken(body, &["ephemeral", "events"])) {
                let content = taken(&mut event, &["content"]);
                match event["type"].as_str() {
                    Some("m.typing") => frames.push(
                        "typing",
                        json!({ "room_id": room_id, "user_ids": content["user_ids"] }),
                    ),
                    Some("m.receipt") => {
                        frames.push("receipt", json!({ "room_id": room_id, "content": content }))
                    }
                    _ => {}
                }
            }
        }
    }
    for (section, field) in [("invite", "invite_state"), ("knock", "knock_state")] {
        let entries = rooms.get_mut(section).and_then(Value::as_object_mut);
        for (room_id, body) in entries.into_iter().flatten() {
            let stripped = taken(body, &[field, "events"]);
            frames.push(section, json!({ "room_id": room_id, field: stripped }));
        }
    }
    for event in events(taken(&mut answer, &["account_data", "events"])) {
        frames.push("account_data", json!({ "event": event }));
    }
    for event in events(taken(&mut answer, &["presence", "events"])) {
        frames.push("presence", json!({ "event": event }));
    }
    for event in events(taken(&mut answer, &["to_device", "events"])) {
        frames.push("to_device", json!({ "event": event }));
    }
    let lists = &answer["device_lists"];
    let nonempty = |v: &Value| v.as_array().is_some_and(|a| !a.is_empty());
    if nonempty(&lists["changed"]) || nonempty(&lists["left"]) {
        frames.push(
            "device_lists",
            json!({ "changed": lists["changed"], "left": lists["left"] }),
        );
    }
    frames.push("synced", json!({}));
    frames.texts
}

/// The value at `path` in `value`, taken out of it (`null` where there is
/// none).
fn taken(value: &mut Value, path: &[&str]) -> Value {
    path.iter()
        .try_fold(value, |value, key| value.get_mut(*key))
        .map(Value::take)
        .unwrap_or(Value::Null)
}

/// The events of a list of them; none when it is not a list.
fn events(list: Value) -> Vec<Value> {
    match list {
        Value::Array(events) => events,
        _ => Vec::new(),
    }
}

/// The events of a limited timeline between the cursor and the timeline's
/// start, oldest first, through `/messages`; `None` when there are more
/// than [`MAX_GAP_EVENTS`].
async fn fill_gap(
    caller: &Caller,
    cursor: SyncToken,
    room_id: &str,
    prev_batch: &Value,
) -> Option<Vec<Value>> {
    let mut from = prev_batch.as_str()?.to_owned();
    let to = cursor.render();
    let mut earlier = Vec::new();
    loop {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit={GAP_PAGE}&from={}&to={}",
            segment(room_id),
            segment(&from),
            segment(&to)
        );
        let page = caller.call(Method::GET, &path, None).await.ok()?;
        let chunk = page["chunk"].as_array().cloned().unwrap_or_default();
        let done = chunk.is_empty() || page["end"].as_str().is_none();
        earlier.extend(chunk);
        if earlier.len() > MAX_GAP_EVENTS {
            return None;
        }
        if done {
            break;
        }
        from = page["end"].as_str()?.to_owned();
    }
    earlier.reverse();
    Some(earlier)
}

/// Splits a request frame into its ID, type and data; an answer for a
/// frame that is not a request.
fn parse_frame(text: &str) -> Result<(Value, String, Value), Value> {
    let frame: Value = serde_json::from_str(text)
        .map_err(|e| failure(&Value::Null, "M_NOT_JSON", &format!("not JSON: {e}")))?;
    let Some(object) = frame.as_object() else {
        return Err(failure(
            &Value::Null,
            "M_BAD_JSON",
            "a request is a JSON object",
        ));
    };
    let id = object.get("id").cloned().unwrap_or(Value::Null);
    if !(id.is_string() || id.is_number()) {
        return Err(failure(
            &Value::Null,
            "M_BAD_JSON",
            "a request needs an id, a string or a number",
        ));
    }
    let Some(kind) = object.get("type").and_then(Value::as_str) else {
        return Err(failure(&id, "M_BAD_JSON", "a request needs a type"));
    };
    let data = object.get("data").cloned().unwrap_or_else(|| json!({}));
    if !data.is_object() {
        return Err(failure(&id, "M_BAD_JSON", "data must be an object"));
    }
    Ok((id, kind.to_owned(), data))
}

fn success(id: &Value, data: Value) -> Value {
    json!({ "id": id, "ok": true, "data": data })
}

fn failure(id: &Value, errcode: &str, error: &str) -> Value {
    json!({ "id": id, "ok": false, "errcode": errcode, "error": error })
}

/// A path segment, percent-encoded.
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Calls the HTTP API as the connection's device.
#[derive(Clone)]
struct Caller {
    state: AppState,
    api: Router,
    user: String,
    device_id: String,
    token: String,
    peer: Option<ClientAddr>,
}

/// A failed call: the Matrix error of the HTTP answer.
#[derive(Debug)]
struct Failure {
    errcode: String,
    error: String,
}

impl Failure {
    fn new(errcode: &str, error: impl Into<String>) -> Failure {
        Failure {
            errcode: errcode.to_owned(),
            error: error.into(),
        }
    }
}

/// A request's data, read into `T`; a bad one is a Matrix error.
fn read<T: serde::de::DeserializeOwned>(data: Value) -> Result<T, Failure> {
    serde_json::from_value(data).map_err(|e| {
        let text = e.to_string();
        if text.starts_with("missing field") {
            Failure::new("M_MISSING_PARAM", text)
        } else {
            Failure::new("M_BAD_JSON", text)
        }
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateChat {
    participants: Vec<String>,
    chat_name: Option<String>,
    #[serde(default)]
    direct: bool,
    #[serde(default)]
    encrypted: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMessage {
    chat_id: String,
    txn_id: String,
    text: Option<String>,
    event_type: Option<String>,
    content: Option<Map<String, Value>>,
    attachment: Option<Attachment>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Attachment {
    url: String,
    mimetype: Option<String>,
    name: Option<String>,
    size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateParticipants {
    chat_id: String,
    action: String,
    user_ids: Vec<String>,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckMessage {
    pos: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Typing {
    chat_id: String,
    typing: bool,
    timeout: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadReceipt {
    chat_id: String,
    event_id: String,
    receipt_type: Option<String>,
    thread_id: Option<String>,
}

impl Caller {
    /// Carries out one request; answers its answer frame.
    async fn perform(self, id: Value, kind: String, data: Value) -> Value {
        let outcome = match kind.as_str() {
            "create_chat" => self.create_chat(data).await,
            "send_message" => self.send_message(data).await,
            "update_participants" => {
                return self.update_participants(&id, data).await;
            }
            "ack_message" => self.ack_message(data).await,
            "typing" => self.typing(data).await,
            "read_receipt" => self.read_receipt(data).await,
            other => Err(Failure::new(
                "M_UNRECOGNIZED",
                format!("unknown request type {other:?}"),
            )),
        };
        match outcome {
            Ok(data) => success(&id, data),
            Err(failed) => failure(&id, &failed.errcode, &failed.error),
        }
    }

    async fn create_chat(&self, data: Value) -> Result<Value, Failure> {
        let request: CreateChat = read(data)?;
        let mut body = json!({
            "preset": "private_chat",
            "invite": request.participants,
            "is_direct": request.direct,
        });
        if let Some(name) = request.chat_name {
            body["name"] = json!(name);
        }
        if request.encrypted {
            body["initial_state"] = json!([{
                "type": "m.room.encryption",
                "state_key": "",
                "content": { "algorithm": "m.megolm.v1.aes-sha2" },
            }]);
        }
        let answer = self
            .call(Method::POST, "/_matrix/client/v3/createRoom", Some(body))
            .await?;
        Ok(json!({ "room_id": answer["room_id"] }))
    }

    async fn send_message(&self, data: Value) -> Result<Value, Failure> {
        let request: SendMessage = read(data)?;
        let (event_type, content) = match request.content {
            Some(content) => {
                if request.text.is_some() || request.attachment.is_some() {
                    return Err(Failure::new(
                        "M_INVALID_PARAM",
                        "give either content, or text and an attachment",
                    ));
                }
                let kind = request
                    .event_type
                    .unwrap_or_else(|| "m.room.message".to_owned());
                (kind, Value::Object(content))
            }
            None => {
                if request.event_type.is_some() {
                    return Err(Failure::new(
                        "M_INVALID_PARAM",
                        "event_type goes with content",
                    ));
                }
                let content = message_content(request.text, request.attachment)?;
                ("m.room.message".to_owned(), content)
            }
        };
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/{}/{}",
            segment(&request.chat_id),
            segment(&event_type),
            segment(&request.txn_id)
        );
        let answer = self.call(Method::PUT, &path, Some(content)).await?;
        Ok(json!({ "event_id": answer["event_id"] }))
    }

    async fn update_participants(&self, id: &Value, data: Value) -> Value {
        let request: UpdateParticipants = match read(data) {
            Ok(request) => request,
            Err(failed) => return failure(id, &failed.errcode, &failed.error),
        };
        let verb = match request.action.as_str() {
            "ADD" => "invite",
            "REMOVE" => "kick",
            other => {
                return failure(
                    id,
                    "M_INVALID_PARAM",
                    &format!("action must be ADD or REMOVE, not {other:?}"),
                )
            }
        };
        if request.user_ids.is_empty() {
            return failure(id, "M_INVALID_PARAM", "user_ids is empty");
        }
        let path = format!(
            "/_matrix/client/v3/rooms/{}/{verb}",
            segment(&request.chat_id)
        );
        let mut done = Vec::new();
        let mut failed = Map::new();
        let mut first_failure = None;
        for user_id in request.user_ids {
            let mut body = json!({ "user_id": user_id });
            if let Some(reason) = &request.reason {
                body["reason"] = json!(reason);
            }
            match self.call(Method::POST, &path, Some(body)).await {
                Ok(_) => done.push(user_id),
                Err(error) => {
                    failed.insert(
                        user_id,
                        json!({ "errcode": error.errcode, "error": error.error }),
                    );
                    first_failure.get_or_insert(error);
                }
            }
        }
        match first_failure {
            None => success(id, json!({ "done": done })),
            Some(error) => {
                let mut answer = failure(id, &error.errcode, &error.error);
                answer["data"] = json!({ "done": done, "failed": failed });
                answer
            }
        }
    }

    async fn ack_message(&self, data: Value) -> Result<Value, Failure> {
        let request: AckMessage = read(data)?;
        let position = SyncToken::parse(&request.pos).map_err(|error| {
            let (errcode, message) = error.parts();
            Failure::new(&errcode, message)
        })?;
        let user = parse_user(&self.user).map_err(|e| {
            let (errcode, message) = e.parts();
            Failure::new(&errcode, message)
        })?;
        self.state
            .acknowledge_delivery(&user, &self.device_id, position.stream)
            .await
            .map_err(|error| {
                let (errcode, message) = MatrixError::from(error).parts();
                Failure::new(&errcode, message)
            })?;
        Ok(json!({ "pos": request.pos }))
    }

    async fn typing(&self, data: Value) -> Result<Value, Failure> {
        let request: Typing = read(data)?;
        let path = format!(
            "/_matrix/client/v3/rooms/{}/typing/{}",
            segment(&request.chat_id),
            segment(&self.user)
        );
        let mut body = json!({ "typing": request.typing });
        if request.typing {
            body["timeout"] = json!(request.timeout.unwrap_or(30_000));
        }
        self.call(Method::PUT, &path, Some(body)).await?;
        Ok(json!({}))
    }

    async fn read_receipt(&self, data: Value) -> Result<Value, Failure> {
        let request: ReadReceipt = read(data)?;
        let receipt_type = request.receipt_type.as_deref().unwrap_or("m.read");
        let path = format!(
            "/_matrix/client/v3/rooms/{}/receipt/{}/{}",
            segment(&request.chat_id),
            segment(receipt_type),
            segment(&request.event_id)
        );
        let mut body = json!({});
        if let Some(thread) = request.thread_id {
            body["thread_id"] = json!(thread);
        }
        self.call(Method::POST, &path, Some(body)).await?;
        Ok(json!({}))
    }

    /// One request through the HTTP API, authenticated as this device.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let mut request = request
            .body(body)
            .map_err(|e| Failure::new("M_UNKNOWN", e.to_string()))?;
        if let Some(peer) = self.peer {
            request.extensions_mut().insert(ConnectInfo(peer));
        }
        let response = self
            .api
            .clone()
            .oneshot(request)
            .await
            .map_err(|e| Failure::new("M_UNKNOWN", e.to_string()))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure::new("M_UNKNOWN", e.to_string()))?
            .to_bytes();
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(answer);
        }
        let errcode = answer["errcode"].as_str().unwrap_or("M_UNKNOWN");
        let error = answer["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| status_text(status));
        Err(Failure::new(errcode, error))
    }
}

fn status_text(status: StatusCode) -> String {
    status
        .canonical_reason()
        .unwrap_or("request failed")
        .to_owned()
}

/// The content of a message of text, an attachment, or both (the text is
/// then the attachment's caption).
fn message_content(text: Option<String>, attachment: Option<Attachment>) -> Result<Value, Failure> {
    let Some(attachment) = attachment else {
        let text = text.ok_or_else(|| {
            Failure::new(
                "M_MISSING_PARAM",
                "send_message needs text, content or an attachment",
            )
        })?;
        return Ok(json!({ "msgtype": "m.text", "body": text }));
    };
    let valid = attachment
        .url
        .strip_prefix("mxc://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(server, media)| !server.is_empty() && !media.is_empty());
    if !valid {
        return Err(Failure::new(
            "M_INVALID_PARAM",
            "attachment.url must be an mxc:// URI",
        ));
    }
    let mimetype = attachment.mimetype.clone().unwrap_or_default();
    let msgtype = match mimetype.split('/').next() {
        Some("image") => "m.image",
        Some("video") => "m.video",
        Some("audio") => "m.audio",
        _ => "m.file",
    };
    let name = attachment
        .name
        .clone()
        .unwrap_or_else(|| "attachment".to_owned());
    let mut content = json!({ "msgtype": msgtype, "url": attachment.url });
    let mut info = Map::new();
    if let Some(mimetype) = attachment.mimetype {
        info.insert("mimetype".to_owned(), json!(mimetype));
    }
    if let Some(size) = attachment.size {
        info.insert("size".to_owned(), json!(size));
    }
    if !info.is_empty() {
        content["info"] = Value::Object(info);
    }
    match text {
        Some(caption) => {
            content["body"] = json!(caption);
            content["filename"] = json!(name);
        }
        None => content["body"] = json!(name),
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_that_are_not_requests_get_errors() {
        let code = |text: &str| parse_frame(text).unwrap_err()["errcode"].clone();
        assert_eq!(code("{"), "M_NOT_JSON");
        assert_eq!(code("[1]"), "M_BAD_JSON");
        assert_eq!(code(r#"{"type":"ping"}"#), "M_BAD_JSON");
        assert_eq!(code(r#"{"id":1}"#), "M_BAD_JSON");
        assert_eq!(code(r#"{"id":1,"type":"ping","data":3}"#), "M_BAD_JSON");
        let (id, kind, data) = parse_frame(r#"{"id":"a","type":"ping"}"#).unwrap();
        assert_eq!((id, kind.as_str(), data), (json!("a"), "ping", json!({})));
    }

    #[test]
    fn attachments_become_media_messages() {
        let attachment = Attachment {
            url: "mxc://example.org/abc".to_owned(),
            mimetype: Some("image/png".to_owned()),
            name: Some("cat.png".to_owned()),
            size: Some(42),
        };
        let content = message_content(Some("my cat".to_owned()), Some(attachment)).unwrap();
        assert_eq!(content["msgtype"], "m.image");
        assert_eq!(content["body"], "my cat");
        assert_eq!(content["filename"], "cat.png");
        assert_eq!(content["info"]["size"], 42);
        let bad = Attachment {
            url: "https://example.org/x".to_owned(),
            mimetype: None,
            name: None,
            size: None,
        };
        let refused = message_content(None, Some(bad)).unwrap_err();
        assert_eq!(refused.errcode, "M_INVALID_PARAM");
        assert_eq!(
            message_content(None, None).unwrap_err().errcode,
            "M_MISSING_PARAM"
        );
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(segment("!a:b.c"), "%21a%3Ab.c");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
