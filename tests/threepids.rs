//! Email addresses of accounts, validated through a real SMTP server
//! (aiosmtpd from PyPI, on loopback): adding one, signing in with it,
//! resetting a forgotten password, registering with one, removing it; the
//! same over STARTTLS with authentication; the spec's errors without SMTP;
//! binds on an identity server.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::federation::{start_federating, TestCa};
use common::{assert_error, token, TestServer, PASSWORD};
use myelin::config::{Config, SmtpSecurity};
use myelin_testkit::python_for_tests;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

const AIOSMTPD: &str = "aiosmtpd==1.4.6";
/// Where the links in emails point in these tests.
const PUBLIC_BASE: &str = "https://chat.example.org";

/// The SMTP sink, and the messages it printed.
struct Sink {
    port: u16,
    lines: Lines<BufReader<ChildStdout>>,
    _child: Child,
}

/// One email as the sink received it.
#[derive(Debug)]
struct Mail {
    to: Vec<String>,
    user: Value,
    data: String,
}

impl Mail {
    /// The validation link in the text.
    fn link(&self) -> String {
        self.data
            .lines()
            .find(|line| line.starts_with(PUBLIC_BASE))
            .unwrap_or_else(|| panic!("no link in {}", self.data))
            .trim()
            .to_owned()
    }

    /// The code, as the link carries it.
    fn code(&self) -> String {
        let link = self.link();
        let query = link.split_once('?').unwrap().1;
        form_value(query, "token")
    }

    fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}: ");
        self.data
            .lines()
            .take_while(|line| !line.is_empty())
            .find_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
    }
}

fn form_value(query: &str, name: &str) -> String {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
        .unwrap_or_else(|| panic!("no {name} in {query}"))
}

impl Sink {
    /// A plain sink, or with STARTTLS and AUTH when `tls` gives the
    /// certificate, key, user and password.
    async fn start(tls: Option<[String; 4]>) -> Sink {
        let python = python_for_tests(&[AIOSMTPD]);
        let port = common::federation::free_port("127.0.0.1".parse().unwrap());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/smtp_sink.py");
        let mut command = Command::new(python);
        command.arg(script).arg(port.to_string());
        if let Some(args) = tls {
            command.args(args);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the SMTP sink starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the sink is ready in time")
            .unwrap();
        assert_eq!(ready.as_deref(), Some("ready"));
        Sink {
            port,
            lines,
            _child: child,
        }
    }

    async fn next(&mut self) -> Mail {
        let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .expect("an email arrives")
            .unwrap()
            .expect("the sink runs");
        let value: Value = serde_json::from_str(&line).unwrap();
        Mail {
            to: serde_json::from_value(value["to"].clone()).unwrap(),
            user: value["user"].clone(),
            data: value["data"].as_str().unwrap().replace("\r\n", "\n"),
        }
    }
}

fn email_config(config: &mut Config, port: u16) {
    config.email.smtp_host = Some("127.0.0.1".to_owned());
    config.email.smtp_port = port;
    config.email.security = SmtpSecurity::None;
    config.email.from = Some("Myelin <noreply@example.org>".to_owned());
    config.email.public_base_url = Some(PUBLIC_BASE.to_owned());
}

/// Asks for a validation email; returns the session ID.
async fn request_token(
    server: &TestServer,
    endpoint: &str,
    secret: &str,
    email: &str,
    attempt: u64,
) -> String {
    let (status, answer) = server
        .post(
            endpoint,
            None,
            json!({ "client_secret": secret, "email": email, "send_attempt": attempt }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["submit_url"],
        format!("{PUBLIC_BASE}/_matrix/client/unstable/add_threepid/email/submit_token")
    );
    answer["sid"].as_str().unwrap().to_owned()
}

/// `POST /account/3pid/add` through the password stage.
async fn add_threepid(
    server: &TestServer,
    token: &str,
    user: &str,
    secret: &str,
    sid: &str,
) -> (StatusCode, Value) {
    let path = "/_matrix/client/v3/account/3pid/add";
    let body = json!({ "client_secret": secret, "sid": sid });
    let (status, challenge) = server.post(path, Some(token), body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    assert_eq!(challenge["flows"][0]["stages"], json!(["m.login.password"]));
    let mut body = body;
    body["auth"] = json!({
        "type": "m.login.password",
        "session": challenge["session"],
        "identifier": { "type": "m.id.user", "user": user },
        "password": PASSWORD,
    });
    server.post(path, Some(token), body).await
}

async fn login_by_email(server: &TestServer, email: &str, password: &str) -> (StatusCode, Value) {
    let body = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.thirdparty", "medium": "email", "address": email },
        "password": password,
    });
    server.post("/_matrix/client/v3/login", None, body).await
}

#[tokio::test]
async fn an_email_is_validated_added_signed_in_with_used_to_reset_the_password_and_removed() {
    let mut sink = Sink::start(None).await;
    let port = sink.port;
    let server = TestServer::start_with(|config| email_config(config, port)).await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let add_token = "/_matrix/client/v3/account/3pid/email/requestToken";

    let (status, caps) = server
        .get("/_matrix/client/v3/capabilities", Some(&alice))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(caps["capabilities"]["m.3pid_changes"]["enabled"], true);

    // Bad input changes nothing and sends nothing.
    let bad = [
        (
            json!({ "email": "a@example.org", "send_attempt": 1 }),
            "M_MISSING_PARAM",
        ),
        (
            json!({ "client_secret": "s", "email": "not an address", "send_attempt": 1 }),
            "M_INVALID_PARAM",
        ),
        (
            json!({ "client_secret": "no spaces", "email": "a@example.org", "send_attempt": 1 }),
            "M_INVALID_PARAM",
        ),
        (
            json!({ "client_secret": "s", "email": "a@example.org\r\nRCPT TO:<x@y>", "send_attempt": 1 }),
            "M_INVALID_PARAM",
        ),
    ];
    for (body, errcode) in bad {
        let answer = server.post(add_token, None, body).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, errcode);
    }

    // The email: to the address as kept (lower case), with a code and a link.
    let sid = request_token(&server, add_token, "secret-a", " Alice@Example.ORG ", 1).await;
    let first = sink.next().await;
    assert_eq!(first.to, vec!["alice@example.org"]);
    assert_eq!(
        first.header("From").as_deref(),
        Some("Myelin <noreply@example.org>")
    );
    assert!(
        first.header("Subject").unwrap().contains("localhost"),
        "{}",
        first.data
    );
    assert!(first.header("Date").is_some() && first.header("Message-ID").is_some());
    // The same attempt again sends nothing and gives the same session; a
    // new attempt sends a new code (the next email the sink receives).
    assert_eq!(
        request_token(&server, add_token, "secret-a", "alice@example.org", 1).await,
        sid
    );
    assert_eq!(
        request_token(&server, add_token, "secret-a", "alice@example.org", 2).await,
        sid
    );
    let second = sink.next().await;
    assert_ne!(second.code(), first.code());
    let link = second.link();
    assert_eq!(form_value(link.split_once('?').unwrap().1, "sid"), sid);

    // Not validated yet: cannot be added.
    let answer = add_threepid(&server, &alice, "alice", "secret-a", &sid).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_THREEPID_AUTH_FAILED");
    // A wrong code, or the first (replaced) one, is refused.
    let submit = "/_matrix/client/unstable/add_threepid/email/submit_token";
    for code in ["wrong".to_owned(), first.code()] {
        let answer = server
            .post(
                submit,
                None,
                json!({ "sid": sid, "client_secret": "secret-a", "token": code }),
            )
            .await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "M_THREEPID_AUTH_FAILED");
    }
    // The link, opened in a browser, validates.
    let path = link.strip_prefix(PUBLIC_BASE).unwrap();
    let page = server.http.get(server.url(path)).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("confirmed"));

    let (status, answer) = add_threepid(&server, &alice, "alice", "secret-a", &sid).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, listed) = server
        .get("/_matrix/client/v3/account/3pid", Some(&alice))
        .await;
    let threepids = listed["threepids"].as_array().unwrap();
    assert_eq!(threepids.len(), 1, "{listed}");
    assert_eq!(threepids[0]["medium"], "email");
    assert_eq!(threepids[0]["address"], "alice@example.org");
    assert!(threepids[0]["added_at"].as_u64().unwrap() > 0);
    assert!(threepids[0]["validated_at"].as_u64().unwrap() > 0);
    // The session is used up.
    let answer = add_threepid(&server, &alice, "alice", "secret-a", &sid).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_THREEPID_AUTH_FAILED");

    // The address is Alice's: Bob cannot have it.
    let answer = server
        .post(
            add_token,
            None,
            json!({ "client_secret": "secret-b", "email": "ALICE@example.org", "send_attempt": 1 }),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_THREEPID_IN_USE");
    let (_, listed) = server
        .get("/_matrix/client/v3/account/3pid", Some(&bob))
        .await;
    assert_eq!(listed["threepids"], json!([]));

    // Signing in with the address, in any case; an unknown one is refused
    // as a wrong password is.
    let (status, login) = login_by_email(&server, "Alice@example.org", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!(login["user_id"], "@alice:localhost");
    let answer = login_by_email(&server, "nobody@example.org", PASSWORD).await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let answer = login_by_email(&server, "alice@example.org", "wrong").await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // A forgotten password: reset through the address.
    let reset_token = "/_matrix/client/v3/account/password/email/requestToken";
    let answer = server
        .post(
            reset_token,
            None,
            json!({ "client_secret": "r", "email": "nobody@example.org", "send_attempt": 1 }),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_THREEPID_NOT_FOUND");
    let reset_sid = request_token(&server, reset_token, "secret-r", "alice@example.org", 1).await;
    let reset_mail = sink.next().await;
    assert_eq!(reset_mail.to, vec!["alice@example.org"]);
    let creds = json!({ "sid": reset_sid, "client_secret": "secret-r" });
    let reset = json!({
        "new_password": "a new password",
        "auth": { "type": "m.login.email.identity", "threepid_creds": creds },
    });
    // Before the code comes back, the stage fails.
    let (status, answer) = server
        .post("/_matrix/client/v3/account/password", None, reset.clone())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert_eq!(answer["errcode"], "M_FORBIDDEN");
    let (status, answer) = server
        .post(
            submit,
            None,
            json!({ "sid": reset_sid, "client_secret": "secret-r", "token": reset_mail.code() }),
        )
        .await;
    assert_eq!(
        (status, answer),
        (StatusCode::OK, json!({ "success": true }))
    );
    let (status, answer) = server
        .post("/_matrix/client/v3/account/password", None, reset.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // The new password works, the old does not; Alice's sessions ended.
    assert_eq!(
        login_by_email(&server, "alice@example.org", "a new password")
            .await
            .0,
        StatusCode::OK
    );
    assert_error(
        &login_by_email(&server, "alice@example.org", PASSWORD).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    let answer = server
        .get("/_matrix/client/v3/account/whoami", Some(&alice))
        .await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    // The reset session is used up.
    let (status, _) = server
        .post("/_matrix/client/v3/account/password", None, reset)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let alice = token(
        &login_by_email(&server, "alice@example.org", "a new password")
            .await
            .1,
    );

    // Removed: no longer listed nor usable to sign in.
    let (status, answer) = server
        .post(
            "/_matrix/client/v3/account/3pid/delete",
            Some(&alice),
            json!({ "medium": "email", "address": "Alice@Example.org" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["id_server_unbind_result"], "no-support");
    let (_, listed) = server
        .get("/_matrix/client/v3/account/3pid", Some(&alice))
        .await;
    assert_eq!(listed["threepids"], json!([]));
    let answer = login_by_email(&server, "alice@example.org", "a new password").await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // Phone numbers need an SMS service this server does not have.
    for path in [
        "/_matrix/client/v3/account/3pid/msisdn/requestToken",
        "/_matrix/client/v3/register/msisdn/requestToken",
        "/_matrix/client/v3/account/password/msisdn/requestToken",
    ] {
        let body = json!({ "client_secret": "s", "country": "GB", "phone_number": "07700900001", "send_attempt": 1 });
        let answer = server.post(path, None, body).await;
        assert_error(
            &answer,
            StatusCode::BAD_REQUEST,
            "M_THREEPID_MEDIUM_NOT_SUPPORTED",
        );
    }
}

#[tokio::test]
async fn registering_with_a_validated_email_adds_it_to_the_new_account() {
    let mut sink = Sink::start(None).await;
    let port = sink.port;
    let server = TestServer::start_with(|config| {
        email_config(config, port);
        config.email.require_for_registration = true;
    })
    .await;
    let register = "/_matrix/client/v3/register";
    let body = json!({ "username": "carol", "password": PASSWORD });
    let (status, challenge) = server.post(register, None, body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge["flows"],
        json!([{ "stages": ["m.login.email.identity"] }])
    );
    // The dummy stage is not enough when an address is required.
    let mut dummy = body.clone();
    dummy["auth"] = json!({ "type": "m.login.dummy", "session": challenge["session"] });
    assert_error(
        &server.post(register, None, dummy).await,
        StatusCode::BAD_REQUEST,
        "M_UNRECOGNIZED",
    );

    let sid = request_token(
        &server,
        "/_matrix/client/v3/register/email/requestToken",
        "secret-c",
        "carol@example.org",
        1,
    )
    .await;
    let mail = sink.next().await;
    let (status, _) = server
        .post(
            "/_matrix/client/unstable/add_threepid/email/submit_token",
            None,
            json!({ "sid": sid, "client_secret": "secret-c", "token": mail.code() }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut with_email = body;
    with_email["auth"] = json!({
        "type": "m.login.email.identity",
        "session": challenge["session"],
        "threepid_creds": { "sid": sid, "client_secret": "secret-c" },
    });
    let (status, registered) = server.post(register, None, with_email).await;
    assert_eq!(status, StatusCode::OK, "{registered}");
    let carol = token(&registered);
    let (_, listed) = server
        .get("/_matrix/client/v3/account/3pid", Some(&carol))
        .await;
    assert_eq!(
        listed["threepids"][0]["address"], "carol@example.org",
        "{listed}"
    );
    // The address is taken now.
    let answer = server
        .post(
            "/_matrix/client/v3/register/email/requestToken",
            None,
            json!({ "client_secret": "x", "email": "carol@example.org", "send_attempt": 1 }),
        )
        .await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_THREEPID_IN_USE");
    // Deactivation removes it, so it can be registered again.
    let (status, challenge) = server
        .post(
            "/_matrix/client/v3/account/deactivate",
            Some(&carol),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let auth = json!({ "auth": {
        "type": "m.login.password", "session": challenge["session"],
        "identifier": { "type": "m.id.user", "user": "carol" }, "password": PASSWORD,
    }});
    let (status, answer) = server
        .post("/_matrix/client/v3/account/deactivate", Some(&carol), auth)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["id_server_unbind_result"], "success");
    request_token(
        &server,
        "/_matrix/client/v3/register/email/requestToken",
        "secret-d",
        "carol@example.org",
        1,
    )
    .await;
    assert_eq!(sink.next().await.to, vec!["carol@example.org"]);
}

#[tokio::test]
async fn email_goes_over_starttls_with_authentication() {
    let ca = TestCa::new();
    let (cert, key) = ca.issue("127.0.0.1".parse().unwrap());
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let tls = [
        path(&cert),
        path(&key),
        "myelin".to_owned(),
        "smtp secret".to_owned(),
    ];
    let mut sink = Sink::start(Some(tls)).await;
    let port = sink.port;
    let ca_pem = ca.ca_pem.clone();
    let configure = move |config: &mut Config, password: &str| {
        email_config(config, port);
        config.email.security = SmtpSecurity::Starttls;
        config.email.ca_certificates = Some(ca_pem.clone());
        config.email.smtp_user = Some("myelin".to_owned());
        config.email.smtp_password = Some(password.to_owned());
    };
    let server = TestServer::start_with(|config| configure(config, "smtp secret")).await;
    let endpoint = "/_matrix/client/v3/account/3pid/email/requestToken";
    request_token(&server, endpoint, "secret-t", "dave@example.org", 1).await;
    let mail = sink.next().await;
    assert_eq!(mail.to, vec!["dave@example.org"]);
    assert_eq!(mail.user, "myelin");

    // Wrong credentials: the request fails and says the email was not sent.
    let refused = TestServer::start_with(|config| configure(config, "wrong")).await;
    let body =
        json!({ "client_secret": "secret-u", "email": "erin@example.org", "send_attempt": 1 });
    let (status, answer) = refused.post(endpoint, None, body).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("refused the credentials"), "{answer}");
}

#[tokio::test]
async fn without_smtp_addresses_cannot_be_added_and_the_endpoints_say_why() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    for path in [
        "/_matrix/client/v3/account/3pid/email/requestToken",
        "/_matrix/client/v3/register/email/requestToken",
        "/_matrix/client/v3/account/password/email/requestToken",
    ] {
        let body = json!({ "client_secret": "s", "email": "a@example.org", "send_attempt": 1 });
        let answer = server.post(path, None, body).await;
        assert_error(
            &answer,
            StatusCode::BAD_REQUEST,
            "M_THREEPID_MEDIUM_NOT_SUPPORTED",
        );
    }
    let (status, listed) = server
        .get("/_matrix/client/v3/account/3pid", Some(&alice))
        .await;
    assert_eq!(
        (status, listed),
        (StatusCode::OK, json!({ "threepids": [] }))
    );
    let answer = server
        .post(
            "/_matrix/client/v3/account/3pid/add",
            Some(&alice),
            json!({ "client_secret": "s", "sid": "x" }),
        )
        .await;
    assert_eq!(
        answer.0,
        StatusCode::UNAUTHORIZED,
        "UIA first: {}",
        answer.1
    );
    // A password change needs the account's token when no email can reset it.
    let answer = server
        .post(
            "/_matrix/client/v3/account/password",
            None,
            json!({ "new_password": "x" }),
        )
        .await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    // Registration offers only the dummy stage.
    let (_, challenge) = server
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "bob", "password": PASSWORD }),
        )
        .await;
    assert_eq!(challenge["flows"], json!([{ "stages": ["m.login.dummy"] }]));

    // An SMTP server that is down: the request fails, nothing is kept.
    let port = common::federation::free_port("127.0.0.1".parse().unwrap());
    let down = TestServer::start_with(|config| email_config(config, port)).await;
    let body = json!({ "client_secret": "s", "email": "a@example.org", "send_attempt": 1 });
    let (status, answer) = down
        .post(
            "/_matrix/client/v3/account/3pid/email/requestToken",
            None,
            body,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
}

/// An identity server on `ip` over HTTPS: `/3pid/bind` for the access
/// token `is-token` answers a bind of `alice@example.org`; `/3pid/unbind`
/// keeps what it was sent (the `Authorization` header and the body).
async fn identity_server(
    ca: &TestCa,
    ip: &str,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>,
) {
    use axum::http::HeaderMap;
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let port = common::federation::free_port(ip);
    let (cert, key) = ca.issue(ip);
    let acceptor = myelin::tls::acceptor(&cert, &key).unwrap();
    let tcp = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    let unbinds = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = unbinds.clone();
    let app = axum::Router::new()
        .route(
            "/_matrix/identity/v2/3pid/bind",
            axum::routing::post(
                |headers: HeaderMap, axum::Json(body): axum::Json<Value>| async move {
                    let authorized = headers
                        .get("authorization")
                        .is_some_and(|v| v == "Bearer is-token");
                    if !authorized {
                        let error = json!({ "errcode": "M_UNAUTHORIZED", "error": "bad token" });
                        return (StatusCode::UNAUTHORIZED, axum::Json(error));
                    }
                    let answer = json!({
                        "medium": "email", "address": "alice@example.org", "mxid": body["mxid"],
                        "not_before": 0, "not_after": 1, "ts": 0, "signatures": {},
                    });
                    (StatusCode::OK, axum::Json(answer))
                },
            ),
        )
        .route(
            "/_matrix/identity/v2/3pid/unbind",
            axum::routing::post(
                move |headers: HeaderMap, axum::Json(body): axum::Json<Value>| async move {
                    let authorization = headers
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    kept.lock().unwrap().push((authorization, body));
                    axum::Json(json!({}))
                },
            ),
        );
    let listener = myelin::tls::TlsListener::new(tcp, acceptor);
    tokio::spawn(async move { axum::serve(listener, app.into_make_service()).await });
    (format!("{ip}:{port}"), unbinds)
}

#[tokio::test]
async fn binds_on_an_identity_server_are_proxied_remembered_and_undone() {
    let ca = TestCa::new();
    let server = start_federating(&ca, "127.0.0.2", |_| {}).await;
    let (is_name, unbinds) = identity_server(&ca, "127.0.0.6").await;
    let (alice, alice_id) = server.register_named("alice", "Alice").await;
    let bind = "/_matrix/client/v3/account/3pid/bind";
    let body = |token: &str| json!({ "client_secret": "c", "sid": "s", "id_server": is_name, "id_access_token": token });

    // The identity server's refusal is passed on.
    let answer = server.post(bind, Some(&alice), body("wrong")).await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED");
    let answer = server.post(bind, Some(&alice), json!({ "sid": "s" })).await;
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_MISSING_PARAM");
    let (status, answer) = server.post(bind, Some(&alice), body("is-token")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // Bound, not added to the account.
    let (_, listed) = server
        .get("/_matrix/client/v3/account/3pid", Some(&alice))
        .await;
    assert_eq!(listed["threepids"], json!([]));

    // Unbinding asks the server it was bound on, signed by this server.
    let unbind = json!({ "medium": "email", "address": "alice@example.org" });
    let (status, answer) = server
        .post(
            "/_matrix/client/v3/account/3pid/unbind",
            Some(&alice),
            unbind.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["id_server_unbind_result"], "success");
    let seen = unbinds.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let (authorization, sent) = &seen[0];
    assert!(authorization.starts_with("X-Matrix "), "{authorization}");
    assert!(
        authorization.contains(&format!("origin=\"{}\"", server.server_name())),
        "{authorization}"
    );
    assert!(
        authorization.contains(&format!("destination=\"{is_name}\"")),
        "{authorization}"
    );
    assert_eq!(
        sent,
        &json!({ "mxid": alice_id, "threepid": { "medium": "email", "address": "alice@example.org" } })
    );
    // Nothing is bound any more: nothing to ask.
    let (status, answer) = server
        .post(
            "/_matrix/client/v3/account/3pid/unbind",
            Some(&alice),
            unbind,
        )
        .await;
    assert_eq!(
        (status, answer["id_server_unbind_result"].clone()),
        (StatusCode::OK, json!("no-support"))
    );
    assert_eq!(unbinds.lock().unwrap().len(), 1);

    // Bound again, then the account is deactivated: unbound there too.
    assert_eq!(
        server.post(bind, Some(&alice), body("is-token")).await.0,
        StatusCode::OK
    );
    let (_, challenge) = server
        .post(
            "/_matrix/client/v3/account/deactivate",
            Some(&alice),
            json!({}),
        )
        .await;
    let auth = json!({ "auth": {
        "type": "m.login.password", "session": challenge["session"],
        "identifier": { "type": "m.id.user", "user": "alice" }, "password": PASSWORD,
    }});
    let (status, answer) = server
        .post("/_matrix/client/v3/account/deactivate", Some(&alice), auth)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["id_server_unbind_result"], "success");
    assert_eq!(unbinds.lock().unwrap().len(), 2);
}
