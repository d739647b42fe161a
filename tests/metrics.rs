//! `GET /metrics` on the metrics listener, scraped and parsed by the
//! Prometheus project's own text parser (prometheus-client from PyPI).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{send_text, token, TestServer};
use myelin_testkit::python_for_tests;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The parser, pinned.
const PACKAGES: &[&str] = &["prometheus-client==0.26.0"];

/// Reads the text format on stdin with prometheus_client's parser (which
/// raises on anything malformed) and prints each family as JSON: its type
/// and its samples as [name, labels, value].
const PARSE: &str = r#"
import json, math, sys
from prometheus_client.parser import text_string_to_metric_families
families = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    if family.name in families:
        raise SystemExit("family given twice: " + family.name)
    families[family.name] = {
        "type": family.type,
        "samples": [[s.name, s.labels, None if math.isnan(s.value) else s.value] for s in family.samples],
    }
print(json.dumps(families))
"#;

/// Parses a scrape; panics with the parser's complaint.
fn parse(python: &std::path::Path, text: &str) -> BTreeMap<String, Value> {
    let mut child = Command::new(python)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(families: &BTreeMap<String, Value>, family: &str, name: &str, labels: Value) -> f64 {
    let samples = families[family]["samples"].as_array().unwrap();
    samples
        .iter()
        .find(|s| {
            s[0] == name
                && labels
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| &s[1][k] == v)
        })
        .unwrap_or_else(|| panic!("no sample {name} {labels} in {family}: {samples:?}"))[2]
        .as_f64()
        .unwrap()
}

#[tokio::test]
async fn metrics_are_scraped_and_parsed_with_every_family() {
    let python = python_for_tests(PACKAGES);
    let server = TestServer::start_with(|config| {
        config.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let metrics_addr = server.server.as_ref().unwrap().metrics_addr.expect("bound");
    let alice = token(&server.register("alice").await);
    let room = server
        .create_room(&alice, json!({ "preset": "private_chat" }))
        .await;
    for n in 0..3 {
        send_text(&server, &alice, &room, &format!("t{n}"), "hello").await;
    }
    let (_, first) = server.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    // A sync that waits while the scrape is taken.
    let waiting = {
        let http = server.http.clone();
        let url = server.url(&format!(
            "/_matrix/client/v3/sync?since={since}&timeout=30000"
        ));
        let alice = alice.clone();
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(alice)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let scrape_url = format!("http://{metrics_addr}/metrics");
    let mut families = BTreeMap::new();
    for _ in 0..100 {
        let response = server.http.get(&scrape_url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        families = parse(&python, &response.text().await.unwrap());
        if sample(
            &families,
            "myelin_sync_waiting",
            "myelin_sync_waiting",
            json!({}),
        ) == 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let expected = [
        ("myelin_http_requests", "counter"),
        ("myelin_http_request_duration_seconds", "histogram"),
        ("myelin_sync_waiting", "gauge"),
        ("myelin_websocket_connections", "gauge"),
        ("myelin_stream_position", "gauge"),
        ("myelin_storage_commit_duration_seconds", "histogram"),
        ("myelin_storage_commit_operations", "histogram"),
        ("myelin_queue_items", "gauge"),
        ("myelin_events", "gauge"),
        ("myelin_rocksdb_memtable_bytes", "gauge"),
        ("myelin_rocksdb_block_cache_bytes", "gauge"),
        ("myelin_rocksdb_table_readers_bytes", "gauge"),
        ("myelin_rocksdb_sst_bytes", "gauge"),
        ("myelin_rocksdb_running_compactions", "gauge"),
        ("myelin_rocksdb_running_flushes", "gauge"),
        ("myelin_rocksdb_pending_compaction_bytes", "gauge"),
        ("myelin_rocksdb_write_stopped", "gauge"),
        ("myelin_rocksdb_delayed_write_rate_bytes", "gauge"),
        ("myelin_rocksdb_stall_seconds", "counter"),
        ("myelin_allocator_allocated_bytes", "gauge"),
        ("myelin_allocator_resident_bytes", "gauge"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_cpu_seconds", "counter"),
    ];
    for (name, kind) in expected {
        let family = families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name}: {:?}", families.keys()));
        assert_eq!(family["type"], kind, "{name}");
        assert!(!family["samples"].as_array().unwrap().is_empty(), "{name}");
    }

    // The figures say what happened.
    assert_eq!(
        sample(
            &families,
            "myelin_sync_waiting",
            "myelin_sync_waiting",
            json!({})
        ),
        1.0
    );
    let send = json!({
        "endpoint": "/_matrix/client/v3/rooms/{room_id}/send/{kind}/{txn_id}",
        "method": "PUT",
        "status": "200",
    });
    assert_eq!(
        sample(
            &families,
            "myelin_http_requests",
            "myelin_http_requests_total",
            send.clone()
        ),
        3.0
    );
    let mut all_sends = send.clone();
    all_sends["le"] = json!("+Inf");
    assert_eq!(
        sample(
            &families,
            "myelin_http_request_duration_seconds",
            "myelin_http_request_duration_seconds_bucket",
            all_sends
        ),
        3.0
    );
    let unauthorized = json!({ "endpoint": "/_matrix/client/v3/register", "status": "401" });
    assert_eq!(
        sample(
            &families,
            "myelin_http_requests",
            "myelin_http_requests_total",
            unauthorized
        ),
        1.0
    );
    assert!(
        sample(
            &families,
            "myelin_stream_position",
            "myelin_stream_position",
            json!({})
        ) > 3.0
    );
    let commits = sample(
        &families,
        "myelin_storage_commit_duration_seconds",
        "myelin_storage_commit_duration_seconds_count",
        json!({}),
    );
    assert!(commits >= 5.0, "{commits}");
    assert!(
        sample(
            &families,
            "myelin_events",
            "myelin_events",
            json!({ "tier": "hot" })
        ) > 0.0
    );
    assert!(
        sample(
            &families,
            "myelin_rocksdb_memtable_bytes",
            "myelin_rocksdb_memtable_bytes",
            json!({})
        ) > 0.0
    );
    for queue in ["federation", "appservices", "pushers"] {
        sample(
            &families,
            "myelin_queue_items",
            "myelin_queue_items",
            json!({ "queue": queue }),
        );
    }
    assert!(
        sample(
            &families,
            "process_resident_memory_bytes",
            "process_resident_memory_bytes",
            json!({})
        ) > 1e6
    );
    assert!(sample(&families, "process_open_fds", "process_open_fds", json!({})) > 3.0);
    // The allocator maps pages for its own bookkeeping at the least.
    assert!(
        sample(
            &families,
            "myelin_allocator_resident_bytes",
            "myelin_allocator_resident_bytes",
            json!({})
        ) > 0.0
    );

    // Metrics are not on the client listener.
    let (status, _) = server.get("/metrics", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    send_text(&server, &alice, &room, "t9", "wake up").await;
    assert_eq!(waiting.await.unwrap(), StatusCode::OK);
}

#[tokio::test]
async fn the_metrics_listener_is_off_by_default() {
    let server = TestServer::start().await;
    assert!(server.server.as_ref().unwrap().metrics_addr.is_none());
}
