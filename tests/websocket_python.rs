//! The WebSocket extension with Python's `websockets` from PyPI: the
//! scenario in `tests/python/ws_scenario.py`, against a real server.
//!
//! The interpreter is `$MYELIN_TEST_PYTHON` (`.ci/run` points it at a
//! virtual environment with `websockets`), or `python3`. A missing
//! interpreter or package fails the test: it is never skipped.

mod common;

use common::{token, TestServer};

#[tokio::test]
async fn python_websockets_client_chats_acknowledges_and_resumes() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let python = std::env::var("MYELIN_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/ws_scenario.py");
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .arg(&server.base)
        .arg(&alice)
        .arg(&bob)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the scenario failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("20 pushed, 5 resumed, errors checked"),
        "{stdout}"
    );
}
