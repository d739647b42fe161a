//! The application service API without a bridge framework: tokens,
//! masquerading, exclusive namespaces, `ts`, the login and registration
//! types, queries, third-party look-ups, retries and a service that hangs,
//! against a service played by an HTTP server in the test (which sees and
//! answers every request Myelin makes).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use common::{assert_error, send_text, test_config, token, TestServer};
use myelin::config::Config;
use myelin_testkit::ca::free_port;
use reqwest::StatusCode;
use serde_json::{json, Value};

const IRC_AS: &str = "irc-as-token";
const IRC_HS: &str = "irc-hs-token";
const SLOW_AS: &str = "slow-as-token";

fn registration(id: &str, url: Option<u16>, as_token: &str, hs_token: &str, body: &str) -> String {
    let url = match url {
        Some(port) => format!("\"http://127.0.0.1:{port}\""),
        None => "null".to_owned(),
    };
    format!(
        "id: {id}\nurl: {url}\nas_token: {as_token}\nhs_token: {hs_token}\nsender_localpart: {id}_bot\n{body}"
    )
}

const IRC_NAMESPACES: &str = r#"rate_limited: false
protocols: ["irc"]
namespaces:
  users:
    - exclusive: true
      regex: '@irc_.*:localhost'
  aliases:
    - exclusive: true
      regex: '#irc_.*:localhost'
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

async fn start(files: Vec<PathBuf>, dir: tempfile::TempDir) -> TestServer {
    let mut config = test_config(&dir);
    config.appservices.registration_files = files;
    config.appservices.retry_base_ms = 100;
    config.appservices.retry_max_ms = 400;
    config.appservices.request_timeout_ms = 2_000;
    TestServer::start_in(dir, config, None).await
}

#[tokio::test]
async fn tokens_masquerading_and_exclusive_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "irc.yaml",
        &registration("irc", None, IRC_AS, IRC_HS, IRC_NAMESPACES),
    );
    let server = start(vec![file], dir).await;
    let alice = token(&server.register("alice").await);
    let register = |username: &str, kind: Option<&str>| {
        let mut body = json!({ "username": username, "inhibit_login": true });
        if let Some(kind) = kind {
            body["type"] = json!(kind);
        }
        body
    };
    let as_type = Some("m.login.application_service");

    // The namespace is the service's alone.
    let (status, answer) = server
        .post(
            "/_matrix/client/v3/register",
            None,
            register("irc_bob", None),
        )
        .await;
    assert_error(&(status, answer), StatusCode::BAD_REQUEST, "M_EXCLUSIVE");
    let answer = server
        .get(
            "/_matrix/client/v3/register/available?username=irc_bob",
            None,
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_EXCLUSIVE");
    // The service registers in it, and only in it; underscores allowed.
    let answer = server
        .post(
            "/_matrix/client/v3/register",
            Some(IRC_AS),
            register("irc_bob", as_type),
        )
        .await;
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
    assert_eq!(answer.1["user_id"], "@irc_bob:localhost");
    let answer = server
        .post(
            "/_matrix/client/v3/register",
            Some(IRC_AS),
            register("carol", as_type),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_EXCLUSIVE");
    // Wrong or missing tokens.
    let answer = server
        .post(
            "/_matrix/client/v3/register",
            Some("nope"),
            register("irc_x", as_type),
        )
        .await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    let answer = server
        .post(
            "/_matrix/client/v3/register",
            None,
            register("irc_x", as_type),
        )
        .await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    let answer = server
        .get("/_matrix/client/v3/account/whoami", Some("nope"))
        .await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");

    // The token acts as the sender, or as a registered user of the namespace.
    let (_, me) = server
        .get("/_matrix/client/v3/account/whoami", Some(IRC_AS))
        .await;
    assert_eq!(me["user_id"], "@irc_bot:localhost");
    let whoami = |user: &str| format!("/_matrix/client/v3/account/whoami?user_id={user}");
    let (_, me) = server
        .get(&whoami("@irc_bob:localhost"), Some(IRC_AS))
        .await;
    assert_eq!(me["user_id"], "@irc_bob:localhost");
    let answer = server.get(&whoami("@alice:localhost"), Some(IRC_AS)).await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let answer = server
        .get(&whoami("@irc_nobody:localhost"), Some(IRC_AS))
        .await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // A user's own token cannot masquerade.
    let (_, me) = server
        .get(&whoami("@irc_bob:localhost"), Some(&alice))
        .await;
    assert_eq!(me["user_id"], "@alice:localhost");

    // A bridged message keeps the time it was sent elsewhere (`ts`).
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let as_bob = |path: String| format!("{path}?user_id=@irc_bob:localhost&ts=1234567890123");
    let (status, _) = server
        .post(
            &as_bob(format!("/_matrix/client/v3/rooms/{room_id}/join")),
            Some(IRC_AS),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let path = as_bob(format!(
        "/_matrix/client/v3/rooms/{room_id}/send/m.room.message/b1"
    ));
    let (status, sent) = server
        .put(
            &path,
            Some(IRC_AS),
            json!({ "msgtype": "m.text", "body": "from irc" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    let event_id = sent["event_id"].as_str().unwrap();
    let (_, event) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/event/{event_id}"),
            Some(&alice),
        )
        .await;
    assert_eq!(event["sender"], "@irc_bob:localhost");
    assert_eq!(event["origin_server_ts"], 1234567890123u64);
    // A user's `ts` is ignored.
    let path = format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/c1?ts=5");
    let (_, sent) = server
        .put(
            &path,
            Some(&alice),
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
        .await;
    let event_id = sent["event_id"].as_str().unwrap();
    let (_, event) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/event/{event_id}"),
            Some(&alice),
        )
        .await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ts = event["origin_server_ts"].as_u64().unwrap();
    assert!(now_ms.abs_diff(ts) < 60_000, "now, not 5: {ts}");

    // Aliases of the namespace are the service's alone, and it has no others.
    let alias_path = |alias: &str| format!("/_matrix/client/v3/directory/room/{alias}");
    let body = json!({ "room_id": room_id });
    let answer = server
        .put(
            &alias_path("%23irc_chan:localhost"),
            Some(&alice),
            body.clone(),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_EXCLUSIVE");
    let answer = server
        .put(
            &alias_path("%23other:localhost"),
            Some(IRC_AS),
            body.clone(),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_EXCLUSIVE");
    let answer = server
        .put(
            &alias_path("%23irc_chan:localhost"),
            Some(IRC_AS),
            body.clone(),
        )
        .await;
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
    let answer = server
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            json!({ "room_alias_name": "irc_two" }),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_EXCLUSIVE");

    // Login for the service's users, and no one else's.
    let (_, flows) = server.get("/_matrix/client/v3/login", None).await;
    assert!(flows["flows"]
        .as_array()
        .unwrap()
        .contains(&json!({ "type": "m.login.application_service" })));
    let login = |user: &str| json!({ "type": "m.login.application_service", "identifier": { "type": "m.id.user", "user": user } });
    let (status, logged_in) = server
        .post("/_matrix/client/v3/login", Some(IRC_AS), login("irc_bob"))
        .await;
    assert_eq!(status, StatusCode::OK, "{logged_in}");
    let (_, me) = server
        .get(
            "/_matrix/client/v3/account/whoami",
            Some(logged_in["access_token"].as_str().unwrap()),
        )
        .await;
    assert_eq!(me["user_id"], "@irc_bob:localhost");
    let answer = server
        .post("/_matrix/client/v3/login", Some(IRC_AS), login("alice"))
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_EXCLUSIVE");
    let answer = server
        .post("/_matrix/client/v3/login", Some(&alice), login("irc_bob"))
        .await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");

    // Ping: only for its own ID, and a service with no URL cannot be pinged.
    let answer = server
        .post(
            "/_matrix/client/v1/appservice/irc/ping",
            Some(IRC_AS),
            json!({}),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_URL_NOT_SET");
    let answer = server
        .post(
            "/_matrix/client/v1/appservice/other/ping",
            Some(IRC_AS),
            json!({}),
        )
        .await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let answer = server
        .post(
            "/_matrix/client/v1/appservice/irc/ping",
            Some(&alice),
            json!({}),
        )
        .await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
}

#[test]
fn bad_registration_files_stop_the_server_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = registration("irc", None, IRC_AS, IRC_HS, IRC_NAMESPACES);
    let check = |files: Vec<PathBuf>, expected: &[&str]| {
        let list: Vec<String> = files
            .iter()
            .map(|f| format!("{:?}", f.display().to_string()))
            .collect();
        let toml = format!(
            "[appservices]\nregistration_files = [{}]\n",
            list.join(", ")
        );
        let config = write(dir.path(), "myelin.toml", &toml);
        let error = Config::load(Some(&config), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(!error.contains('\n'), "one line: {error}");
        for part in expected {
            assert!(error.contains(part), "{error:?} should say {part:?}");
        }
    };
    let good_file = write(dir.path(), "irc.yaml", &good);
    let broken = write(
        dir.path(),
        "broken.yaml",
        &good.replace("regex: '@irc_.*:localhost'", "regex: '@irc_(('"),
    );
    check(
        vec![broken.clone()],
        &["broken.yaml", "namespaces.users[0]", "invalid regex"],
    );
    let no_token = write(
        dir.path(),
        "no-token.yaml",
        &good.replace("as_token: irc-as-token\n", ""),
    );
    check(vec![no_token], &["no-token.yaml", "as_token is missing"]);
    let same_token = write(
        dir.path(),
        "same.yaml",
        &registration("other", None, IRC_AS, "x", "namespaces: {}\n"),
    );
    check(
        vec![good_file.clone(), same_token],
        &["same.yaml", "as_token is used elsewhere"],
    );
    let same_id = write(
        dir.path(),
        "same-id.yaml",
        &registration("irc", None, "a", "b", "namespaces: {}\n").replace("irc_bot", "second_bot"),
    );
    check(
        vec![good_file.clone(), same_id],
        &["same-id.yaml", "the id \"irc\""],
    );
    check(vec![dir.path().join("missing.yaml")], &["missing.yaml"]);
}

/// What the played service saw, and how it answers.
#[derive(Default)]
struct Seen {
    /// (transaction ID, body) of every transaction request, retries included.
    transactions: Vec<(String, Value)>,
    /// Transactions still to refuse with a 500.
    failures_left: usize,
    queries: Vec<String>,
    authorization_ok: bool,
}

type Shared = Arc<Mutex<Seen>>;

#[derive(Clone)]
struct Played {
    seen: Shared,
    homeserver: String,
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {IRC_HS}"))
}

async fn transaction(
    State(played): State<Played>,
    headers: HeaderMap,
    UrlPath(txn_id): UrlPath<String>,
    Json(body): Json<Value>,
) -> (AxumStatus, Json<Value>) {
    let mut seen = played.seen.lock().unwrap();
    seen.authorization_ok = authorized(&headers);
    seen.transactions.push((txn_id, body));
    if seen.failures_left > 0 {
        seen.failures_left -= 1;
        return (AxumStatus::INTERNAL_SERVER_ERROR, Json(json!({})));
    }
    (AxumStatus::OK, Json(json!({})))
}

async fn query_user(
    State(played): State<Played>,
    UrlPath(user_id): UrlPath<String>,
) -> (AxumStatus, Json<Value>) {
    played.seen.lock().unwrap().queries.push(user_id.clone());
    match user_id.starts_with("@irc_known") {
        true => (AxumStatus::OK, Json(json!({}))),
        false => (
            AxumStatus::NOT_FOUND,
            Json(json!({ "errcode": "M_NOT_FOUND" })),
        ),
    }
}

/// The service makes the room (with its alias) before it answers.
async fn query_alias(
    State(played): State<Played>,
    UrlPath(alias): UrlPath<String>,
) -> (AxumStatus, Json<Value>) {
    played.seen.lock().unwrap().queries.push(alias.clone());
    let name = alias
        .trim_start_matches('#')
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let created = reqwest::Client::new()
        .post(format!(
            "{}/_matrix/client/v3/createRoom",
            played.homeserver
        ))
        .bearer_auth(IRC_AS)
        .json(&json!({ "room_alias_name": name, "preset": "public_chat" }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::OK);
    (AxumStatus::OK, Json(json!({})))
}

async fn protocol(UrlPath(name): UrlPath<String>) -> Json<Value> {
    Json(json!({
        "user_fields": ["network", "nickname"],
        "location_fields": ["network", "channel"],
        "icon": "mxc://localhost/irc",
        "field_types": {},
        "instances": [{ "network_id": "libera", "desc": format!("{name} on Libera"), "fields": {} }],
    }))
}

async fn locations() -> Json<Value> {
    Json(
        json!([{ "alias": "#irc_libera_matrix:localhost", "protocol": "irc", "fields": { "channel": "#matrix" } }]),
    )
}

/// Serves the played service on `port` until the test ends.
async fn play_service(port: u16, seen: Shared, homeserver: String) {
    let app = Router::new()
        .route("/_matrix/app/v1/transactions/{txn_id}", put(transaction))
        .route("/_matrix/app/v1/users/{user_id}", get(query_user))
        .route("/_matrix/app/v1/rooms/{alias}", get(query_alias))
        .route("/_matrix/app/v1/thirdparty/protocol/{name}", get(protocol))
        .route("/_matrix/app/v1/thirdparty/location/{name}", get(locations))
        .route("/_matrix/app/v1/ping", post(|| async { Json(json!({})) }))
        .with_state(Played { seen, homeserver });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

/// A service that accepts connections and never answers.
async fn play_hanging_service(port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen in 10 s");
}

#[tokio::test]
async fn delivery_retries_queries_and_a_hanging_service() {
    let dir = tempfile::tempdir().unwrap();
    let (port, slow_port) = (
        free_port(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        free_port(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    );
    let irc = write(
        dir.path(),
        "irc.yaml",
        &registration("irc", Some(port), IRC_AS, IRC_HS, IRC_NAMESPACES),
    );
    // The hanging service wants every room.
    let slow_namespaces = "namespaces:\n  rooms:\n    - exclusive: false\n      regex: '!.*'\n";
    let slow = write(
        dir.path(),
        "slow.yaml",
        &registration("slow", Some(slow_port), SLOW_AS, "slow-hs", slow_namespaces),
    );
    let server = start(vec![irc, slow], dir).await;
    let seen: Shared = Arc::default();
    seen.lock().unwrap().failures_left = 2;
    play_service(port, seen.clone(), server.base.clone()).await;
    play_hanging_service(slow_port).await;
    let alice = token(&server.register("alice").await);

    // An unknown user of the namespace is asked about when invited, and
    // made when the service vouches for it; one it does not know is not.
    let room_id = server.create_room(&alice, json!({})).await;
    let invite = |user: &str| json!({ "user_id": user });
    let path = format!("/_matrix/client/v3/rooms/{room_id}/invite");
    let (status, answer) = server
        .post(&path, Some(&alice), invite("@irc_known:localhost"))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    server
        .post(&path, Some(&alice), invite("@irc_stranger:localhost"))
        .await;
    let whoami = "/_matrix/client/v3/account/whoami?user_id=";
    let (status, _) = server
        .get(&format!("{whoami}@irc_known:localhost"), Some(IRC_AS))
        .await;
    assert_eq!(status, StatusCode::OK, "vouched for, so made");
    let answer = server
        .get(&format!("{whoami}@irc_stranger:localhost"), Some(IRC_AS))
        .await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.queries,
            ["@irc_known:localhost", "@irc_stranger:localhost"]
        );
    }

    let join = format!("/_matrix/client/v3/rooms/{room_id}/join?user_id=@irc_known:localhost");
    let (status, answer) = server.post(&join, Some(IRC_AS), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // A user of the service is in the room: its events reach it, in
    // order, through two failed attempts that keep the ID and the body,
    // while the hanging service holds up nothing but its own queue.
    let first = send_text(&server, &alice, &room_id, "m1", "one").await;
    let second = send_text(&server, &alice, &room_id, "m2", "two").await;
    let delivered = |seen: &Seen, event_id: &str| {
        seen.transactions.iter().any(|(_, body)| {
            body["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["event_id"] == event_id)
        })
    };
    eventually("delivery of both messages", || {
        let seen = seen.lock().unwrap();
        delivered(&seen, &first) && delivered(&seen, &second)
    })
    .await;
    {
        let seen_now = seen.lock().unwrap();
        assert!(seen_now.authorization_ok, "the hs_token is sent");
        let (failed_id, failed_body) = seen_now.transactions[0].clone();
        assert_eq!(
            seen_now.transactions[1],
            (failed_id.clone(), failed_body.clone())
        );
        assert_eq!(seen_now.transactions[2], (failed_id, failed_body));
        let ids: Vec<String> = seen_now
            .transactions
            .iter()
            .flat_map(|(_, body)| body["events"].as_array().unwrap().clone())
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect();
        let (a, b) = (
            ids.iter().position(|id| *id == first).unwrap(),
            ids.iter().position(|id| *id == second).unwrap(),
        );
        assert!(a < b, "in order");
    }

    // Once its last user left, the room's messages no longer reach it
    // (the leave itself does: it is about its user).
    let leave = format!("/_matrix/client/v3/rooms/{room_id}/leave?user_id=@irc_known:localhost");
    let (status, _) = server.post(&leave, Some(IRC_AS), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let unheard = send_text(&server, &alice, &room_id, "m3", "three").await;
    // A message in a room it is in, sent after: once that arrives, the
    // other would have too.
    let other_room = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    let join = format!("/_matrix/client/v3/rooms/{other_room}/join?user_id=@irc_known:localhost");
    let (status, _) = server.post(&join, Some(IRC_AS), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let heard = send_text(&server, &alice, &other_room, "m4", "four").await;
    eventually("the message of the other room", || {
        delivered(&seen.lock().unwrap(), &heard)
    })
    .await;
    assert!(
        !delivered(&seen.lock().unwrap(), &unheard),
        "a room it left"
    );

    // An unknown alias of the namespace: the service makes it on demand.
    let (status, answer) = server
        .get(
            "/_matrix/client/v3/directory/room/%23irc_fresh:localhost",
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["room_id"].as_str().unwrap().starts_with('!'));
    let answer = server
        .get(
            "/_matrix/client/v3/directory/room/%23unclaimed:localhost",
            Some(&alice),
        )
        .await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Third-party look-ups go to the bridge of the protocol.
    let (status, protocols) = server
        .get("/_matrix/client/v3/thirdparty/protocols", Some(&alice))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(protocols["irc"]["instances"][0]["network_id"], "libera");
    let (_, found) = server
        .get(
            "/_matrix/client/v3/thirdparty/location/irc?channel=%23matrix",
            Some(&alice),
        )
        .await;
    assert_eq!(found[0]["alias"], "#irc_libera_matrix:localhost");
    let answer = server
        .get("/_matrix/client/v3/thirdparty/protocol/xmpp", Some(&alice))
        .await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // The ping reaches the service; the hanging one times out.
    let (status, pong) = server
        .post(
            "/_matrix/client/v1/appservice/irc/ping",
            Some(IRC_AS),
            json!({ "transaction_id": "p" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{pong}");
    assert!(pong["duration_ms"].is_u64());
    let answer = server
        .post(
            "/_matrix/client/v1/appservice/slow/ping",
            Some(SLOW_AS),
            json!({}),
        )
        .await;
    assert_error(&answer, StatusCode::GATEWAY_TIMEOUT, "M_CONNECTION_TIMEOUT");
}

const BRIDGE_AS: &str = "bridge-as-token";
const BRIDGE_NAMESPACES: &str = r#"rate_limited: false
receive_ephemeral: true
org.matrix.msc3202: true
io.element.msc4190: true
namespaces:
  users:
    - exclusive: true
      regex: '@br_.*:localhost'
"#;

/// Every transaction body the played service took so far, merged.
fn taken(seen: &Shared, key: &str) -> Vec<Value> {
    let seen = seen.lock().unwrap();
    seen.transactions
        .iter()
        .flat_map(|(_, body)| body[key].as_array().cloned().unwrap_or_default())
        .collect()
}

fn device_lists(seen: &Shared, part: &str) -> Vec<String> {
    let seen = seen.lock().unwrap();
    seen.transactions
        .iter()
        .flat_map(|(_, body)| {
            body["org.matrix.msc3202.device_lists"][part]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|user| user.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn ephemeral_data_device_extensions_and_rate_limits() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let file = write(
        dir.path(),
        "bridge.yaml",
        &registration("bridge", Some(port), BRIDGE_AS, IRC_HS, BRIDGE_NAMESPACES),
    );
    let mut config = test_config(&dir);
    config.appservices.registration_files = vec![file];
    config.appservices.retry_base_ms = 100;
    config.rate_limits.enabled = true;
    config.rate_limits.registration.burst = 2;
    config.rate_limits.registration.per_second = 0.001;
    let server = TestServer::start_in(dir, config, None).await;
    let seen: Shared = Arc::default();
    play_service(port, seen.clone(), server.base.clone()).await;

    // Two users exhaust the registration budget of this address; the
    // service, not rate-limited, registers as many as it needs.
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let third = json!({ "username": "carol", "password": "a long enough password" });
    let answer = server
        .post("/_matrix/client/v3/register", None, third)
        .await;
    assert_error(&answer, StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED");
    for name in ["br_a", "br_b", "br_c"] {
        let body = json!({ "type": "m.login.application_service", "username": name, "inhibit_login": true });
        let (status, answer) = server
            .post("/_matrix/client/v3/register", Some(BRIDGE_AS), body)
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }

    // MSC4190: devices are made with PUT, never by logging in.
    let body = json!({ "type": "m.login.application_service", "username": "br_d" });
    let answer = server
        .post("/_matrix/client/v3/register", Some(BRIDGE_AS), body)
        .await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "M_APPSERVICE_LOGIN_UNSUPPORTED",
    );
    let login = json!({ "type": "m.login.application_service", "identifier": { "type": "m.id.user", "user": "br_a" } });
    let answer = server
        .post("/_matrix/client/v3/login", Some(BRIDGE_AS), login)
        .await;
    assert_error(
        &answer,
        StatusCode::BAD_REQUEST,
        "M_APPSERVICE_LOGIN_UNSUPPORTED",
    );
    let as_a = "user_id=@br_a:localhost";
    let device_path = format!("/_matrix/client/v3/devices/BRDEV?{as_a}");
    let (status, _) = server
        .put(
            &device_path,
            Some(BRIDGE_AS),
            json!({ "display_name": "bridged" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = server
        .put(
            &device_path,
            Some(BRIDGE_AS),
            json!({ "display_name": "renamed" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // MSC3202: the service acts as one of its users' devices.
    let with_device = format!("{as_a}&org.matrix.msc3202.device_id=BRDEV");
    let (_, me) = server
        .get(
            &format!("/_matrix/client/v3/account/whoami?{with_device}"),
            Some(BRIDGE_AS),
        )
        .await;
    assert_eq!(me["device_id"], "BRDEV");
    let answer = server
        .get(
            &format!("/_matrix/client/v3/account/whoami?{as_a}&org.matrix.msc3202.device_id=NOPE"),
            Some(BRIDGE_AS),
        )
        .await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let keys = json!({ "one_time_keys": {
        "signed_curve25519:AAAAAQ": { "key": "a", "signatures": {} },
        "signed_curve25519:AAAAAg": { "key": "b", "signatures": {} },
    } });
    let (status, answer) = server
        .post(
            &format!("/_matrix/client/v3/keys/upload?{with_device}"),
            Some(BRIDGE_AS),
            keys,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // The service's user joins a room of Alice's and Bob's.
    let room_id = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    common::join(&server, &bob, &room_id).await;
    let join = format!("/_matrix/client/v3/rooms/{room_id}/join?{as_a}");
    let (status, _) = server.post(&join, Some(BRIDGE_AS), json!({})).await;
    assert_eq!(status, StatusCode::OK);

    // Typing, a receipt and presence reach it.
    let typing = format!("/_matrix/client/v3/rooms/{room_id}/typing/@alice:localhost");
    let (status, _) = server
        .put(
            &typing,
            Some(&alice),
            json!({ "typing": true, "timeout": 30000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let sent = send_text(&server, &alice, &room_id, "e1", "hello").await;
    let receipt = format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{sent}");
    let (status, _) = server.post(&receipt, Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let presence = "/_matrix/client/v3/presence/@alice:localhost/status";
    let (status, _) = server
        .put(presence, Some(&alice), json!({ "presence": "online" }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let has = |kind: &str, room: bool| {
        taken(&seen, "ephemeral")
            .iter()
            .any(|e| e["type"] == kind && (!room || e["room_id"] == room_id.as_str()))
    };
    eventually("typing, a receipt and presence", || {
        has("m.typing", true) && has("m.receipt", true) && has("m.presence", false)
    })
    .await;
    let ephemeral = taken(&seen, "ephemeral");
    let typing = ephemeral.iter().find(|e| e["type"] == "m.typing").unwrap();
    assert_eq!(typing["content"]["user_ids"], json!(["@alice:localhost"]));
    let read = ephemeral.iter().find(|e| e["type"] == "m.receipt").unwrap();
    assert!(read["content"][&sent]["m.read"]["@alice:localhost"]["ts"].is_u64());
    let status = ephemeral
        .iter()
        .find(|e| e["type"] == "m.presence")
        .unwrap();
    assert_eq!(status["sender"], "@alice:localhost");
    assert_eq!(status["content"]["presence"], "online");

    // A to-device message for the service's device, with its key counts.
    let message = json!({ "messages": { "@br_a:localhost": { "BRDEV": { "hello": "there" } } } });
    let (status, _) = server
        .put(
            "/_matrix/client/v3/sendToDevice/m.test/td1",
            Some(&alice),
            message,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("the to-device message", || {
        !taken(&seen, "de.sorunome.msc2409.to_device").is_empty()
    })
    .await;
    let to_device = taken(&seen, "de.sorunome.msc2409.to_device");
    assert_eq!(to_device[0]["to_user_id"], "@br_a:localhost");
    assert_eq!(to_device[0]["to_device_id"], "BRDEV");
    assert_eq!(to_device[0]["sender"], "@alice:localhost");
    assert_eq!(to_device[0]["content"]["hello"], "there");
    let counts = {
        let seen = seen.lock().unwrap();
        seen.transactions
            .iter()
            .find_map(|(_, body)| {
                body.get("org.matrix.msc3202.device_one_time_keys_count")
                    .cloned()
            })
            .unwrap()
    };
    assert_eq!(counts["@br_a:localhost"]["BRDEV"]["signed_curve25519"], 2);

    // Device lists: Alice's new device; Bob, gone from the only room he
    // shared with the service's users.
    server.login("alice", Some("SECOND")).await;
    let leave = format!("/_matrix/client/v3/rooms/{room_id}/leave");
    let (status, _) = server.post(&leave, Some(&bob), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    eventually("device list changes", || {
        device_lists(&seen, "changed").contains(&"@alice:localhost".to_owned())
            && device_lists(&seen, "left").contains(&"@bob:localhost".to_owned())
    })
    .await;

    // MSC4190: the service deletes its device without authentication.
    let (status, answer) = server
        .call(
            reqwest::Method::DELETE,
            &device_path,
            Some(BRIDGE_AS),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let answer = server
        .get(
            &format!("/_matrix/client/v3/account/whoami?{with_device}"),
            Some(BRIDGE_AS),
        )
        .await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn a_room_interests_a_service_through_its_alias() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let namespaces =
        "namespaces:\n  aliases:\n    - exclusive: false\n      regex: '#watched_.*:localhost'\n";
    let file = write(
        dir.path(),
        "watch.yaml",
        &registration("watch", Some(port), "watch-as", IRC_HS, namespaces),
    );
    let server = start(vec![file], dir).await;
    let seen: Shared = Arc::default();
    play_service(port, seen.clone(), server.base.clone()).await;
    let alice = token(&server.register("alice").await);
    let room_id = server.create_room(&alice, json!({})).await;
    let before = send_text(&server, &alice, &room_id, "w1", "before the alias").await;
    let path = "/_matrix/client/v3/directory/room/%23watched_room:localhost";
    let (status, _) = server
        .put(path, Some(&alice), json!({ "room_id": room_id }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let after = send_text(&server, &alice, &room_id, "w2", "after the alias").await;
    let events = || taken(&seen, "events");
    eventually("the message after the alias", || {
        events().iter().any(|e| e["event_id"] == after.as_str())
    })
    .await;
    assert!(!events().iter().any(|e| e["event_id"] == before.as_str()));
    // Without the alias, the room is of no interest again.
    let (status, _) = server
        .call(reqwest::Method::DELETE, path, Some(&alice), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let gone = send_text(&server, &alice, &room_id, "w3", "alias gone").await;
    let elsewhere = server
        .create_room(&alice, json!({ "room_alias_name": "watched_two" }))
        .await;
    let marker = send_text(&server, &alice, &elsewhere, "w4", "marker").await;
    eventually("the marker", || {
        events().iter().any(|e| e["event_id"] == marker.as_str())
    })
    .await;
    assert!(!events().iter().any(|e| e["event_id"] == gone.as_str()));
    // A room created with such an alias: its creation reaches it too.
    assert!(events()
        .iter()
        .any(|e| e["type"] == "m.room.create" && e["room_id"] == elsewhere.as_str()));
}

#[tokio::test]
async fn a_bridge_hears_the_users_of_other_servers() {
    use common::federation::{start_federating, TestCa};
    let ca = TestCa::new();
    let port = free_port(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("irc.yaml");
    let one = start_federating(&ca, "127.0.0.2", |config| {
        let name = config.server_name.replace('.', "\\.");
        let namespaces = format!(
            "namespaces:\n  users:\n    - exclusive: true\n      regex: '@irc_.*:{name}'\n"
        );
        std::fs::write(
            &file,
            registration("irc", Some(port), IRC_AS, IRC_HS, &namespaces),
        )
        .unwrap();
        config.appservices.registration_files = vec![file.clone()];
        config.appservices.retry_base_ms = 100;
    })
    .await;
    let two = start_federating(&ca, "127.0.0.3", |_| {}).await;
    let seen: Shared = Arc::default();
    play_service(port, seen.clone(), one.base.clone()).await;
    let (bob, _) = two.register_named("bob", "Bob").await;
    let room_id = two
        .create_room(&bob, json!({ "preset": "public_chat" }))
        .await;

    // Bob invites a bridged user that does not exist yet: the service is
    // asked, the user made, and the invite pushed to the service.
    let ghost = format!("@irc_known:{}", one.server_name());
    let path = format!("/_matrix/client/v3/rooms/{room_id}/invite");
    let (status, answer) = two
        .post(&path, Some(&bob), json!({ "user_id": ghost }))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let invited = || {
        taken(&seen, "events")
            .iter()
            .any(|e| e["state_key"] == ghost.as_str() && e["content"]["membership"] == "invite")
    };
    eventually("the invite reaching the service", invited).await;

    // The service joins its user, and Bob's messages reach it.
    let join = format!("/_matrix/client/v3/rooms/{room_id}/join?user_id={ghost}");
    let (status, answer) = one.post(&join, Some(IRC_AS), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let sent = send_text(&two, &bob, &room_id, "f1", "hello bridge from afar").await;
    eventually("Bob's message reaching the service", || {
        taken(&seen, "events")
            .iter()
            .any(|e| e["event_id"] == sent.as_str())
    })
    .await;
}
