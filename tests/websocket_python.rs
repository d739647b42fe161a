//! The WebSocket extension with Python's `websockets` from PyPI: the
//! scenario in `tests/python/ws_scenario.py`, against a real server.
//!
//! The interpreter is `$MYELIN_TEST_PYTHON` when set, else the one of a
//! virtual environment with `websockets` that the test provisions on first
//! use (`myelin-testkit`). An interpreter or package that cannot be had
//! fails the test: it is never skipped.

mod common;

use common::{token, TestServer};
use myelin_testkit::python_for_tests;

/// The PyPI package the scenario needs, pinned so the environment is the
/// same everywhere.
const WEBSOCKETS: &str = "websockets==17.4";

#[tokio::test]
async fn python_websockets_client_chats_acknowledges_and_resumes() {
    // Before the server starts, so blocking this thread holds nothing up.
    let python = python_for_tests(&[WEBSOCKETS]);
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/ws_scenario.py");
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .arg(&server.base)
        .arg(&alice)
        .arg(&bob)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
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
