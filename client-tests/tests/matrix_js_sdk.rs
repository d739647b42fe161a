//! matrix-js-sdk (npm) with its Rust cryptography against Myelin: two
//! users register and log in through the SDK, sync, chat in a plain room,
//! find the message with server-side search, and each decrypts the
//! other's message in an encrypted room. The scenario is
//! `client-tests/js/matrix_js_sdk.mjs`, run with Node.js.

use myelin_client_tests::{Homeserver, PASSWORD};
use myelin_testkit::Provisioner;
use serde_json::Value;

/// The newest matrix-js-sdk that runs on the Node.js of Debian's
/// packages (20): later ones need Node 22. The crypto module is pinned
/// to what it resolves to, so every machine runs the same code.
const PACKAGES: &[&str] = &[
    "matrix-js-sdk@37.5.0",
    "@matrix-org/matrix-sdk-crypto-wasm@14.2.1",
];

#[tokio::test]
async fn matrix_js_sdk_logs_in_syncs_chats_searches_and_decrypts() {
    // Before the server starts, so blocking this thread holds nothing up.
    let environment = Provisioner::from_environment()
        .npm(PACKAGES)
        .unwrap_or_else(|error| panic!("{error}"));
    let server = Homeserver::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/js/matrix_js_sdk.mjs");
    let output = tokio::process::Command::new("node")
        .arg(script)
        .env("CLIENT_URL", &server.url)
        .env("CLIENT_NODE_MODULES", environment.node_modules())
        .env("CLIENT_ALICE", "alice")
        .env("CLIENT_BOB", "bob")
        .env("CLIENT_PASSWORD", PASSWORD)
        .env("CLIENT_TIMEOUT_MS", "60000")
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run node: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the scenario failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    let report: Value = serde_json::from_str(last)
        .unwrap_or_else(|_| panic!("the scenario's last line is not JSON: {stdout}"));

    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sdk"], "37.5.0");
    assert_eq!(
        report["users"],
        serde_json::json!(["@alice:localhost", "@bob:localhost"])
    );
    assert_eq!(
        report["sync_states"],
        serde_json::json!(["PREPARED", "PREPARED"])
    );
    // Search found the plain message, by its event ID.
    assert_eq!(report["search"]["results"], 1, "{report}");
    // Each way, the message crossed encrypted and was decrypted.
    for direction in ["alice_to_bob", "bob_to_alice"] {
        let exchange = &report["encrypted"][direction];
        assert_eq!(exchange["wire_type"], "m.room.encrypted", "{report}");
        assert_eq!(exchange["algorithm"], "m.megolm.v1.aes-sha2", "{report}");
        assert_eq!(exchange["clear_type"], "m.room.message", "{report}");
        assert!(
            exchange["body"]
                .as_str()
                .is_some_and(|b| b.contains("secret")),
            "{report}"
        );
    }
}
