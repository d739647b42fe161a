//! The Matrix calls the scenarios make, over plain HTTP.

use std::time::Duration;

use serde_json::{json, Value};

const PASSWORD: &str = "bench password";

/// A homeserver and one HTTP client for it.
#[derive(Clone)]
pub struct Server {
    pub base: String,
    pub http: reqwest::Client,
    /// Makes user names unique per run.
    pub run: String,
}

impl Server {
    pub fn new(base: &str) -> Server {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(20_000)
            .timeout(Duration::from_secs(900))
            .build()
            .expect("HTTP client");
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        Server {
            base: base.trim_end_matches('/').to_owned(),
            http,
            run: format!("b{stamp}"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Registers `{run}{name}`; answers the access token.
    pub async fn register(&self, name: &str) -> String {
        let url = self.url("/_matrix/client/v3/register");
        let mut body = json!({
            "username": format!("{}{name}", self.run),
            "password": PASSWORD,
            "auth": { "type": "m.login.dummy" },
        });
        for _ in 0..2 {
            let answer = self.retrying_post(&url, None, &body).await;
            if let Some(token) = answer["access_token"].as_str() {
                return token.to_owned();
            }
            // A server that wants a session first: answer the challenge.
            body["auth"]["session"] = answer["session"].clone();
        }
        panic!("registration of {name} refused");
    }

    /// Registers many users, 32 at a time; shows progress.
    pub async fn register_many(&self, prefix: &str, count: usize) -> Vec<String> {
        let mut tokens = Vec::with_capacity(count);
        let names: Vec<usize> = (0..count).collect();
        for chunk in names.chunks(32) {
            let tasks: Vec<_> = chunk
                .iter()
                .map(|n| {
                    let server = self.clone();
                    let name = format!("{prefix}{n}");
                    tokio::spawn(async move { server.register(&name).await })
                })
                .collect();
            for task in tasks {
                tokens.push(task.await.expect("registration task"));
            }
            eprint!("\r  {} of {count} registered", tokens.len());
        }
        eprintln!();
        tokens
    }

    /// Logs in again as `{run}{name}`: a new device; answers its token.
    pub async fn login(&self, name: &str) -> String {
        let body = json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": format!("{}{name}", self.run) },
            "password": PASSWORD,
        });
        let answer = self
            .retrying_post(&self.url("/_matrix/client/v3/login"), None, &body)
            .await;
        answer["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("login refused: {answer}"))
            .to_owned()
    }

    /// A POST that waits out `M_LIMIT_EXCEEDED` and connection errors.
    pub async fn retrying_post(&self, url: &str, token: Option<&str>, body: &Value) -> Value {
        for attempt in 0..20 {
            let mut request = self.http.post(url).json(body);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            match request.send().await {
                Ok(response) => {
                    let answer: Value = response.json().await.unwrap_or(Value::Null);
                    if answer["errcode"] != "M_LIMIT_EXCEEDED" {
                        return answer;
                    }
                    let wait = answer["retry_after_ms"].as_u64().unwrap_or(500);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(error) if attempt < 19 => {
                    eprintln!("  retrying {url}: {error}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("{url}: {error}"),
            }
        }
        panic!("{url}: rate limited throughout");
    }

    pub async fn create_room(&self, token: &str, body: Value) -> String {
        let answer = self
            .retrying_post(
                &self.url("/_matrix/client/v3/createRoom"),
                Some(token),
                &body,
            )
            .await;
        answer["room_id"]
            .as_str()
            .unwrap_or_else(|| panic!("createRoom refused: {answer}"))
            .to_owned()
    }

    pub async fn join(&self, token: &str, room_id: &str) {
        let url = self.url(&format!("/_matrix/client/v3/rooms/{room_id}/join"));
        let answer = self.retrying_post(&url, Some(token), &json!({})).await;
        assert!(answer["room_id"].is_string(), "join refused: {answer}");
    }

    /// The server name in the user ID of `token`'s user.
    pub async fn server_name_of(&self, token: &str) -> String {
        let answer: Value = self
            .http
            .get(self.url("/_matrix/client/v3/account/whoami"))
            .bearer_auth(token)
            .send()
            .await
            .expect("whoami")
            .json()
            .await
            .expect("whoami answers JSON");
        let user_id = answer["user_id"].as_str().expect("a user ID");
        user_id
            .split_once(':')
            .map(|(_, server)| server.to_owned())
            .expect("a server name")
    }

    /// Joins a room of another server through `via`.
    pub async fn join_via(&self, token: &str, room_id: &str, via: &str) {
        let url = self.url(&format!(
            "/_matrix/client/v3/join/{}?via={via}",
            room_id.replace('!', "%21")
        ));
        let answer = self.retrying_post(&url, Some(token), &json!({})).await;
        assert!(answer["room_id"].is_string(), "join refused: {answer}");
    }

    /// Sends a text message; true once the server acknowledged it.
    pub async fn send(&self, token: &str, room_id: &str, txn: &str, body: &str) -> bool {
        let url = self.url(&format!(
            "/_matrix/client/v3/rooms/{room_id}/send/m.room.message/{txn}"
        ));
        let content = json!({ "msgtype": "m.text", "body": body });
        match self
            .http
            .put(url)
            .bearer_auth(token)
            .json(&content)
            .send()
            .await
        {
            Ok(response) => response.status().is_success(),
            Err(_) => false,
        }
    }

    /// Sends a text message; its event ID once the server acknowledged it.
    pub async fn send_event(
        &self,
        token: &str,
        room_id: &str,
        txn: &str,
        body: &str,
    ) -> Option<String> {
        let content = json!({ "msgtype": "m.text", "body": body });
        self.send_content(token, room_id, "m.room.message", txn, &content)
            .await
    }

    /// Sends an event of any type; its event ID once the server
    /// acknowledged it.
    pub async fn send_content(
        &self,
        token: &str,
        room_id: &str,
        kind: &str,
        txn: &str,
        content: &Value,
    ) -> Option<String> {
        let url = self.url(&format!(
            "/_matrix/client/v3/rooms/{room_id}/send/{kind}/{txn}"
        ));
        let response = self
            .http
            .put(url)
            .bearer_auth(token)
            .json(content)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let answer: Value = response.json().await.ok()?;
        answer["event_id"].as_str().map(str::to_owned)
    }

    /// `GET /sync`; the answer, or `None` on a failed request.
    pub async fn sync(&self, token: &str, since: Option<&str>, timeout_ms: u64) -> Option<Value> {
        let mut url = format!("{}/_matrix/client/v3/sync?timeout={timeout_ms}", self.base);
        if let Some(since) = since {
            url += &format!("&since={since}");
        }
        let response = self.http.get(url).bearer_auth(token).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// `GET /sync` with a timeline long enough for a burst (1,000 events
    /// a room); the answer, or `None` on a failed request.
    pub async fn sync_all(&self, token: &str, since: &str, timeout_ms: u64) -> Option<Value> {
        let filter = "%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A1000%7D%7D%7D";
        let url = format!(
            "{}/_matrix/client/v3/sync?timeout={timeout_ms}&since={since}&filter={filter}",
            self.base
        );
        let response = self.http.get(url).bearer_auth(token).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// The WebSocket URL of Myelin's push extension.
    pub fn ws_url(&self) -> String {
        format!(
            "{}/_matrix/client/unstable/org.myelin.ws/connect",
            self.base.replacen("http", "ws", 1)
        )
    }
}

/// Bodies of the timeline messages in a `/sync` answer.
pub fn message_bodies(answer: &Value) -> Vec<String> {
    let mut bodies = Vec::new();
    for room in answer["rooms"]["join"].as_object().into_iter().flatten() {
        for event in room.1["timeline"]["events"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(body) = event["content"]["body"].as_str() {
                bodies.push(body.to_owned());
            }
        }
    }
    bodies
}

/// Resident memory of a process, in bytes (`VmRSS` of `/proc/PID/status`).
pub fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read the status of process {pid}: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .expect("VmRSS in /proc/PID/status")
}

/// Raises the open-file limit to its hard maximum (10,000 connections
/// need more than the usual soft limit); answers (limit now, wanted).
pub fn raise_file_limit() -> (u64, u64) {
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
    (limit.rlim_cur, 10_500)
}

/// Bytes under a directory (or of a file), and of a file's SQLite
/// write-ahead log beside it.
pub fn disk_bytes(path: &std::path::Path) -> u64 {
    fn walk(path: &std::path::Path) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return 0;
        };
        if meta.is_dir() {
            std::fs::read_dir(path)
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| walk(&entry.path()))
                .sum()
        } else {
            meta.len()
        }
    }
    let mut total = walk(path);
    if path.is_file() {
        for suffix in ["-wal", "-journal"] {
            let mut side = path.as_os_str().to_owned();
            side.push(suffix);
            total += walk(std::path::Path::new(&side));
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_come_from_every_joined_room_timeline() {
        let answer = json!({ "rooms": { "join": {
            "!a:x": { "timeline": { "events": [{ "content": { "body": "one" } }, { "content": {} }] } },
            "!b:x": { "timeline": { "events": [{ "content": { "body": "two" } }] } },
        } } });
        assert_eq!(message_bodies(&answer), vec!["one", "two"]);
    }

    #[test]
    fn resident_memory_and_disk_use_are_read() {
        assert!(resident_bytes(std::process::id()) > 0);
        let dir = std::env::temp_dir().join(format!("bench-disk-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/file"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.join("db"), vec![0u8; 10]).unwrap();
        std::fs::write(dir.join("db-wal"), vec![0u8; 5]).unwrap();
        assert_eq!(disk_bytes(&dir.join("db")), 15);
        assert_eq!(disk_bytes(&dir), 1015);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
