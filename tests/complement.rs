//! The entry script of the Complement image (`complement/entrypoint.sh`),
//! run without Docker the way Complement starts a homeserver container:
//! `SERVER_NAME` set, Complement's certificate authority and an
//! application service registration where Complement copies them. Myelin
//! must then be what Complement's tests expect: the client API on plain
//! HTTP, the federation API on HTTPS with a certificate of that authority
//! for the server name, open registration, shared-secret registration
//! with the secret `complement`, no rate limits, the application
//! services, and federation with servers of that authority at private
//! addresses. Everything listens on loopback, on free ports.

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use myelin_testkit::ca::free_port;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha1::Sha1;
use tempfile::TempDir;

const BINARY: &str = env!("CARGO_BIN_EXE_myelin");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/complement/entrypoint.sh");
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The registration shared secret Complement signs with.
const SHARED_SECRET: &str = "complement";
/// The password Complement gives the users it registers.
const PASSWORD: &str = "complement_meets_min_password_req";

/// An application service registration in the form Complement writes
/// (its `generateASRegistrationYaml`): every user in a shared namespace,
/// transactions pushed to `url`.
fn appservice_registration(url: &str) -> String {
    format!(
        "id: my_as_id
hs_token: hs-secret
as_token: as-secret
url: '{url}'
sender_localpart: the-bridge-user
rate_limited: false
de.sorunome.msc2409.push_ephemeral: false
push_ephemeral: false
org.matrix.msc3202: false
namespaces:
  users:
    - exclusive: false
      regex: .*
  rooms: []
  aliases: []
"
    )
}

/// What Complement copies into a homeserver's container: its certificate
/// authority (`ca/ca.crt`, `ca/ca.key`) and the registrations of a test's
/// application services (`appservice/*.yaml`).
struct ComplementFiles {
    dir: TempDir,
    /// The authority's certificate, the only root the test's HTTPS
    /// clients trust.
    ca_certificate: reqwest::Certificate,
}

impl ComplementFiles {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        params
            .distinguished_name
            .push(DnType::CommonName, "Complement Test CA");
        let key = KeyPair::generate().expect("a CA key");
        let certificate = params.self_signed(&key).expect("the CA certificate");
        let ca_dir = dir.path().join("ca");
        std::fs::create_dir(&ca_dir).expect("the CA directory");
        std::fs::write(ca_dir.join("ca.crt"), certificate.pem()).expect("ca.crt");
        std::fs::write(ca_dir.join("ca.key"), key.serialize_pem()).expect("ca.key");
        let ca_certificate = reqwest::Certificate::from_pem(certificate.pem().as_bytes())
            .expect("a PEM certificate");
        ComplementFiles {
            dir,
            ca_certificate,
        }
    }

    /// Adds an application service registration, named as Complement
    /// names it: the service's ID and `.yaml`.
    fn add_appservice(&self, id: &str, registration: &str) {
        let dir = self.dir.path().join("appservice");
        std::fs::create_dir_all(&dir).expect("the appservice directory");
        std::fs::write(dir.join(format!("{id}.yaml")), registration).expect("the registration");
    }

    /// An HTTPS client that trusts this authority alone and finds `host`
    /// and `localhost` on loopback.
    fn https_client(&self, host: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(self.ca_certificate.clone())
            .resolve(host, SocketAddr::new(LOOPBACK, 0))
            .resolve("localhost", SocketAddr::new(LOOPBACK, 0))
            .no_proxy()
            .build()
            .expect("an HTTPS client")
    }
}

/// One start of the entry script, as a container of Complement's runs it.
/// Killed when dropped, also when an assertion fails, and then its log
/// (the script's and Myelin's) is printed.
struct Homeserver {
    child: Child,
    log: Arc<Mutex<String>>,
    client_port: u16,
}

impl Homeserver {
    /// Runs the script as `server_name`, with data in `data_dir` and the
    /// federation API on `federation_port`, and waits until Myelin answers.
    async fn start(
        server_name: &str,
        complement: &ComplementFiles,
        data_dir: &Path,
        federation_port: u16,
    ) -> Self {
        let client_port = free_port(LOOPBACK);
        // Nothing of the test's own environment may reach Myelin, which
        // reads every MYELIN_* variable as configuration.
        let mut child = Command::new(SCRIPT)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SERVER_NAME", server_name)
            .env("COMPLEMENT_DIR", complement.dir.path())
            .env("DATA_DIR", data_dir)
            .env("SERVER_BINARY", BINARY)
            .env("LISTEN_ADDRESS", LOOPBACK.to_string())
            .env("CLIENT_PORT", client_port.to_string())
            .env("FEDERATION_PORT", federation_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the entry script starts (is it executable?)");
        let log = Arc::new(Mutex::new(String::new()));
        collect(child.stdout.take().expect("its output"), log.clone());
        collect(child.stderr.take().expect("its errors"), log.clone());
        let mut server = Homeserver {
            child,
            log,
            client_port,
        };
        server.wait_until_answering().await;
        server
    }

    fn client_url(&self, path: &str) -> String {
        format!("http://{LOOPBACK}:{}{path}", self.client_port)
    }

    /// Waits, as Complement does before a test, until
    /// `GET /_matrix/client/versions` answers 200.
    async fn wait_until_answering(&mut self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("the script's status") {
                panic!("the entry script ended ({status}) before Myelin answered");
            }
            let answer = http
                .get(self.client_url("/_matrix/client/versions"))
                .send()
                .await;
            if answer.is_ok_and(|response| response.status() == StatusCode::OK) {
                return;
            }
            assert!(Instant::now() < deadline, "no answer in a minute");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Homeserver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!("the entry script's and Myelin's log:\n{log}");
        }
    }
}

/// Keeps reading `pipe` into `log`, so that the process never blocks on a
/// full pipe and a failed test can show what it said.
fn collect(pipe: impl Read + Send + 'static, log: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            log.push_str(&line);
            log.push('\n');
        }
    });
}

/// Sends a request and returns the status and the JSON answer.
async fn call(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = http.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e:?}"));
    let status = response.status();
    let text = response.text().await.expect("the answer's body");
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{url}: the answer is not JSON: {text:?}"));
    (status, value)
}

/// Registers `username` as Complement does (`RegisterUser`): one request
/// with the `m.login.dummy` stage. Returns the answer.
async fn register(http: &reqwest::Client, server: &Homeserver, username: &str) -> Value {
    let body = json!({
        "auth": { "type": "m.login.dummy" },
        "username": username,
        "password": PASSWORD,
    });
    let url = server.client_url("/_matrix/client/v3/register");
    let (status, registered) = call(http, Method::POST, &url, None, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{username}: {registered}");
    // Complement reads all three, and fails the test without one.
    for field in ["user_id", "access_token", "device_id"] {
        assert!(registered[field].is_string(), "{field}: {registered}");
    }
    registered
}

/// Logs in with a password; returns the status and the answer.
async fn log_in(
    http: &reqwest::Client,
    server: &Homeserver,
    user: &str,
    password: &str,
) -> (StatusCode, Value) {
    let body = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": user },
        "password": password,
    });
    let url = server.client_url("/_matrix/client/v3/login");
    call(http, Method::POST, &url, None, Some(body)).await
}

/// Synapse's shared-secret registration MAC as Complement computes it
/// (`RegisterSharedSecret`): HMAC-SHA1 keyed by the secret over the nonce,
/// user name, password and admin flag, each followed by a NUL but the
/// last, in lower-case hex.
fn registration_mac(
    secret: &str,
    nonce: &str,
    username: &str,
    password: &str,
    admin: bool,
) -> String {
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    for part in [nonce, username, password] {
        mac.update(part.as_bytes());
        mac.update(b"\0");
    }
    mac.update(if admin { "admin" } else { "notadmin" }.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A nonce from `GET /_synapse/admin/v1/register`.
async fn shared_secret_nonce(http: &reqwest::Client, server: &Homeserver) -> String {
    let url = server.client_url("/_synapse/admin/v1/register");
    let (status, answer) = call(http, Method::GET, &url, None, None).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["nonce"].as_str().expect("a nonce").to_owned()
}

/// The federation API speaks HTTPS on its port, with a certificate of
/// Complement's authority for the server name's host and for localhost.
async fn check_federation_listener(complement: &ComplementFiles, server_name: &str, port: u16) {
    let named = server_name
        .rsplit_once(':')
        .map_or(server_name, |(host, _port)| host);
    let https = complement.https_client(named);
    for host in [named, "localhost"] {
        let url = format!("https://{host}:{port}/_matrix/key/v2/server");
        let (status, keys) = call(&https, Method::GET, &url, None, None).await;
        assert_eq!(status, StatusCode::OK, "{keys}");
        assert_eq!(keys["server_name"], server_name, "{keys}");
        let verify_keys = keys["verify_keys"].as_object();
        assert!(verify_keys.is_some_and(|found| !found.is_empty()), "{keys}");
    }
}

/// Complement registers its admins with the shared secret `complement`;
/// a MAC made with another secret is refused.
async fn check_shared_secret_registration(
    http: &reqwest::Client,
    server: &Homeserver,
    server_name: &str,
    alice_token: &str,
) {
    let register_url = server.client_url("/_synapse/admin/v1/register");
    let nonce = shared_secret_nonce(http, server).await;
    let body = json!({
        "nonce": nonce,
        "username": "root",
        "password": PASSWORD,
        "admin": true,
        "mac": registration_mac(SHARED_SECRET, &nonce, "root", PASSWORD, true),
    });
    let (status, registered) = call(http, Method::POST, &register_url, None, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{registered}");
    let root_id = format!("@root:{server_name}");
    assert_eq!(registered["user_id"], root_id.as_str(), "{registered}");
    assert!(registered["device_id"].is_string(), "{registered}");
    assert_eq!(registered["home_server"], server_name, "{registered}");
    let root_token = registered["access_token"]
        .as_str()
        .expect("an access token");

    // Only an admin may ask about another user, and root is one.
    let whois = "/_matrix/client/v3/admin/whois";
    let url = server.client_url(&format!("{whois}/@alice:{server_name}"));
    let (status, answer) = call(http, Method::GET, &url, Some(root_token), None).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let url = server.client_url(&format!("{whois}/@root:{server_name}"));
    let (status, answer) = call(http, Method::GET, &url, Some(alice_token), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");

    // Server notices come from @_server, as Complement's tests expect.
    let url = server.client_url("/_synapse/admin/v1/send_server_notice");
    let notice = json!({
        "user_id": format!("@alice:{server_name}"),
        "content": { "msgtype": "m.text", "body": "hello from the server" },
    });
    let (status, answer) = call(http, Method::POST, &url, Some(root_token), Some(notice)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let url = server.client_url("/_matrix/client/v3/sync");
    let (status, sync) = call(http, Method::GET, &url, Some(alice_token), None).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    let notice_sender = format!("@_server:{server_name}");
    let invited_by_notices = sync["rooms"]["invite"]
        .as_object()
        .into_iter()
        .flat_map(|rooms| rooms.values())
        .flat_map(|room| {
            room["invite_state"]["events"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .any(|event| event["type"] == "m.room.member" && event["sender"] == notice_sender.as_str());
    assert!(invited_by_notices, "{sync}");

    let nonce = shared_secret_nonce(http, server).await;
    let body = json!({
        "nonce": nonce,
        "username": "mallory",
        "password": PASSWORD,
        "admin": true,
        "mac": registration_mac("not complement", &nonce, "mallory", PASSWORD, true),
    });
    let (status, refused) = call(http, Method::POST, &register_url, None, Some(body)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert_eq!(refused["errcode"], "M_FORBIDDEN", "{refused}");
}

/// More registrations and failed logins in a burst than the default rate
/// limits let through (three of each): none is answered 429.
async fn check_no_rate_limits(http: &reqwest::Client, server: &Homeserver) {
    for n in 1..=4 {
        register(http, server, &format!("user-{n}")).await;
    }
    for attempt in 1..=5 {
        let (status, answer) = log_in(http, server, "alice", "wrong password").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "attempt {attempt}: {answer}");
        assert_eq!(answer["errcode"], "M_FORBIDDEN", "{answer}");
    }
}

#[tokio::test]
async fn the_entry_script_starts_myelin_as_complement_expects() {
    let complement = ComplementFiles::new();
    // Nothing listens where the service is said to be.
    let service_url = format!("http://{LOOPBACK}:{}", free_port(LOOPBACK));
    complement.add_appservice("my_as_id", &appservice_registration(&service_url));
    let data = tempfile::tempdir().unwrap();
    let federation_port = free_port(LOOPBACK);
    let server = Homeserver::start("hs1", &complement, data.path(), federation_port).await;
    let http = reqwest::Client::new();

    let url = server.client_url("/_matrix/client/versions");
    let (status, versions) = call(&http, Method::GET, &url, None, None).await;
    assert_eq!(status, StatusCode::OK, "{versions}");
    let listed = versions["versions"].as_array();
    assert!(listed.is_some_and(|list| !list.is_empty()), "{versions}");

    check_federation_listener(&complement, "hs1", federation_port).await;
    let alice = register(&http, &server, "alice").await;
    assert_eq!(alice["user_id"], "@alice:hs1", "{alice}");
    let alice_token = alice["access_token"].as_str().expect("an access token");
    check_shared_secret_registration(&http, &server, "hs1", alice_token).await;
    check_no_rate_limits(&http, &server).await;

    // The application service of Complement's registration file acts as
    // its sender.
    let url = server.client_url("/_matrix/client/v3/account/whoami");
    let (status, whoami) = call(&http, Method::GET, &url, Some("as-secret"), None).await;
    assert_eq!(status, StatusCode::OK, "{whoami}");
    assert_eq!(whoami["user_id"], "@the-bridge-user:hs1", "{whoami}");

    // Complement commits a blueprint's running container to an image and
    // starts that image again later: the script runs a second time over
    // data the first Myelin never closed.
    drop(server);
    let federation_port = free_port(LOOPBACK);
    let server = Homeserver::start("hs1", &complement, data.path(), federation_port).await;
    check_federation_listener(&complement, "hs1", federation_port).await;
    let (status, login) = log_in(&http, &server, "alice", PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!(login["user_id"], "@alice:hs1", "{login}");
}

/// Two servers named by loopback address and port: each reaches the other
/// at a private address, checks its certificate against Complement's
/// authority, and verifies its requests with keys fetched the same way.
#[tokio::test]
async fn servers_started_by_the_script_federate_through_complements_authority() {
    let complement = ComplementFiles::new();
    let (one_data, two_data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (one_port, two_port) = (free_port(LOOPBACK), free_port(LOOPBACK));
    let (one_name, two_name) = (
        format!("{LOOPBACK}:{one_port}"),
        format!("{LOOPBACK}:{two_port}"),
    );
    let one = Homeserver::start(&one_name, &complement, one_data.path(), one_port).await;
    let two = Homeserver::start(&two_name, &complement, two_data.path(), two_port).await;
    check_federation_listener(&complement, &one_name, one_port).await;
    let http = reqwest::Client::new();

    let alice = register(&http, &one, "alice").await;
    let alice_id = format!("@alice:{one_name}");
    assert_eq!(alice["user_id"], alice_id.as_str(), "{alice}");
    let profile_path = format!("/_matrix/client/v3/profile/{alice_id}");
    let url = one.client_url(&format!("{profile_path}/displayname"));
    let token = alice["access_token"].as_str();
    let body = json!({ "displayname": "Alice of one" });
    let (status, answer) = call(&http, Method::PUT, &url, token, Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    let bob = register(&http, &two, "bob").await;
    let url = two.client_url(&profile_path);
    let (status, profile) =
        call(&http, Method::GET, &url, bob["access_token"].as_str(), None).await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    assert_eq!(profile["displayname"], "Alice of one", "{profile}");
}
