//! The provisioning helper against the real registries (PyPI, npm): an
//! empty cache is provisioned once, even by racing callers, and reused
//! after; an unreachable registry gives one line saying what to do.

use std::net::TcpListener;
use std::process::Command;
use std::thread;

use myelin_testkit::{Environment, Provisioner};

/// A loopback URL where nothing listens.
fn closed_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/")
}

/// Three callers race on an empty cache: exactly one installs.
fn race(provision: impl Fn() -> Environment + Sync) -> Vec<Environment> {
    thread::scope(|scope| {
        let handles: Vec<_> = (0..3).map(|_| scope.spawn(&provision)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn python_environment_is_made_once_and_reused() {
    let cache = tempfile::tempdir().unwrap();
    let provisioner = Provisioner::new(cache.path());
    let first = race(|| provisioner.python(&["six==1.16.0"]).unwrap());
    assert_eq!(first.iter().filter(|e| e.installed).count(), 1);
    assert!(first.iter().all(|e| e.root == first[0].root));

    let output = Command::new(first[0].python())
        .args(["-c", "import six; print(six.__version__)"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "1.16.0");

    let again = provisioner.python(&["six==1.16.0"]).unwrap();
    assert!(!again.installed);
    assert_eq!(again.root, first[0].root);
}

#[test]
fn unfinished_python_environment_is_made_again() {
    let cache = tempfile::tempdir().unwrap();
    let provisioner = Provisioner::new(cache.path());
    let made = provisioner.python(&["six==1.16.0"]).unwrap();
    // An install interrupted before its end leaves no marker.
    std::fs::remove_file(made.root.join(".myelin-ready")).unwrap();
    let again = provisioner.python(&["six==1.16.0"]).unwrap();
    assert!(again.installed);
}

#[test]
fn unreachable_pypi_fails_with_one_clear_line() {
    let cache = tempfile::tempdir().unwrap();
    let provisioner = Provisioner::new(cache.path()).with_pip_index_url(closed_url());
    let error = provisioner
        .python(&["six==1.16.0"])
        .unwrap_err()
        .to_string();
    assert!(!error.contains('\n'), "{error}");
    assert!(
        error.starts_with("could not install six==1.16.0 from PyPI"),
        "{error}"
    );
    assert!(
        error.contains("provide it by hand: python3 -m venv"),
        "{error}"
    );
    assert!(error.contains("MYELIN_TEST_PYTHON="), "{error}");
}

#[test]
fn npm_prefix_is_made_once_and_reused() {
    let cache = tempfile::tempdir().unwrap();
    let provisioner = Provisioner::new(cache.path());
    let first = race(|| provisioner.npm(&["is-number@7.0.0"]).unwrap());
    assert_eq!(first.iter().filter(|e| e.installed).count(), 1);

    let output = Command::new("node")
        .args(["-e", "console.log(require('is-number')(5))"])
        .env("NODE_PATH", first[0].node_modules())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "true");

    assert!(!provisioner.npm(&["is-number@7.0.0"]).unwrap().installed);
}

#[test]
fn unreachable_npm_registry_fails_with_one_clear_line() {
    let cache = tempfile::tempdir().unwrap();
    let provisioner = Provisioner::new(cache.path()).with_npm_registry(closed_url());
    let error = provisioner
        .npm(&["is-number@7.0.0"])
        .unwrap_err()
        .to_string();
    assert!(!error.contains('\n'), "{error}");
    assert!(
        error.starts_with("could not install is-number@7.0.0 from npm"),
        "{error}"
    );
    assert!(error.contains("provide it by hand: npm install"), "{error}");
}
