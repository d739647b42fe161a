//! Test-only peers and clients from package registries (Python packages
//! from PyPI, Node.js packages from npm), provisioned by the tests that need
//! them, so that `cargo test --workspace` passes on a fresh machine.
//!
//! Each set of packages gets one environment in a cache directory: a Python
//! virtual environment or an npm prefix. The first test to ask makes it,
//! under a file lock, so that tests running in parallel (threads of one test
//! binary, or several binaries) never race; a finished environment carries a
//! marker file and is reused by every later call. An environment left half
//! made by an interrupted install has no marker and is made again.
//!
//! The cache directory is `$MYELIN_TEST_CACHE`, else
//! `$XDG_CACHE_HOME/myelin-test`, else `$HOME/.cache/myelin-test`.

pub mod ca;
pub mod synapse;

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The marker a finished environment carries; it lists the packages.
const READY_MARKER: &str = ".myelin-ready";

/// A provisioned environment.
#[derive(Debug, Clone)]
pub struct Environment {
    /// The virtual environment or npm prefix.
    pub root: PathBuf,
    /// Whether this call installed it (false: it was already there).
    pub installed: bool,
}

impl Environment {
    /// The Python interpreter of a virtual environment.
    pub fn python(&self) -> PathBuf {
        self.root.join("bin").join("python")
    }

    /// The `node_modules` folder of an npm prefix.
    pub fn node_modules(&self) -> PathBuf {
        self.root.join("node_modules")
    }
}

/// Why an environment could not be made. Its `Display` is one line that says
/// what could not be installed and how to provide it by hand.
#[derive(Debug)]
pub struct ProvisionError {
    what: String,
    cause: String,
    by_hand: String,
}

impl fmt::Display for ProvisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "could not install {} ({}); provide it by hand: {}",
            self.what, self.cause, self.by_hand
        )
    }
}

impl std::error::Error for ProvisionError {}

/// Makes and reuses environments in one cache directory.
#[derive(Debug, Clone)]
pub struct Provisioner {
    cache_dir: PathBuf,
    pip_index_url: Option<String>,
    npm_registry: Option<String>,
}

impl Provisioner {
    /// A provisioner over `cache_dir`, which is created when needed.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            pip_index_url: None,
            npm_registry: None,
        }
    }

    /// The provisioner of the default cache directory (see the module doc).
    pub fn from_environment() -> Self {
        Self::new(default_cache_dir())
    }

    /// Installs Python packages from this index instead of pip's default.
    pub fn with_pip_index_url(mut self, url: impl Into<String>) -> Self {
        self.pip_index_url = Some(url.into());
        self
    }

    /// Installs npm packages from this registry instead of npm's default.
    pub fn with_npm_registry(mut self, url: impl Into<String>) -> Self {
        self.npm_registry = Some(url.into());
        self
    }

    /// A Python virtual environment with `packages` (pip requirement
    /// specifiers, for example `websockets==17.4`).
    pub fn python(&self, packages: &[&str]) -> Result<Environment, ProvisionError> {
        self.provision("python", packages, |root| self.make_python(root, packages))
    }

    /// An npm prefix with `packages` (npm specifiers, for example
    /// `matrix-js-sdk@39`) in its `node_modules`.
    pub fn npm(&self, packages: &[&str]) -> Result<Environment, ProvisionError> {
        self.provision("npm", packages, |root| self.make_npm(root, packages))
    }

    /// Returns the environment for `packages`, making it under the lock when
    /// it is missing or unfinished.
    fn provision(
        &self,
        kind: &str,
        packages: &[&str],
        make: impl FnOnce(&Path) -> Result<(), ProvisionError>,
    ) -> Result<Environment, ProvisionError> {
        let root = self.cache_dir.join(environment_name(kind, packages));
        let cache_error = |cause: io::Error| ProvisionError {
            what: format!("{} ({kind})", packages.join(" ")),
            cause: format!("cache directory {}: {cause}", self.cache_dir.display()),
            by_hand: "set MYELIN_TEST_CACHE to a writable directory".to_owned(),
        };
        fs::create_dir_all(&self.cache_dir).map_err(cache_error)?;
        let lock = File::create(root.with_extension("lock")).map_err(cache_error)?;
        // Held until `lock` drops at the end of this function; another
        // process or thread asking for the same environment waits here.
        lock.lock().map_err(cache_error)?;
        let marker = root.join(READY_MARKER);
        if marker.is_file() {
            return Ok(Environment {
                root,
                installed: false,
            });
        }
        if root.exists() {
            fs::remove_dir_all(&root).map_err(cache_error)?;
        }
        make(&root)?;
        fs::write(&marker, packages.join("\n")).map_err(cache_error)?;
        Ok(Environment {
            root,
            installed: true,
        })
    }

    fn make_python(&self, root: &Path, packages: &[&str]) -> Result<(), ProvisionError> {
        let root_shown = root.display();
        let error = |cause: String| ProvisionError {
            what: format!("{} from PyPI", packages.join(" ")),
            cause,
            by_hand: format!(
                "python3 -m venv {root_shown} && {root_shown}/bin/pip install {}, \
                 then set MYELIN_TEST_PYTHON={root_shown}/bin/python",
                packages.join(" ")
            ),
        };
        run(Command::new("python3").args(["-m", "venv"]).arg(root))
            .map_err(|cause| error(format!("python3 -m venv: {cause}")))?;
        let mut install = Command::new(root.join("bin").join("pip"));
        install.args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--retries",
            "2",
            "--timeout",
            "30",
        ]);
        if let Some(url) = &self.pip_index_url {
            install.args(["--index-url", url]);
        }
        install.args(packages);
        run(&mut install).map_err(|cause| error(format!("pip install: {cause}")))
    }

    fn make_npm(&self, root: &Path, packages: &[&str]) -> Result<(), ProvisionError> {
        let root_shown = root.display();
        let error = |cause: String| ProvisionError {
            what: format!("{} from npm", packages.join(" ")),
            cause,
            by_hand: format!(
                "npm install --prefix {root_shown} {}, then touch {root_shown}/{READY_MARKER}",
                packages.join(" ")
            ),
        };
        fs::create_dir_all(root).map_err(|e| error(e.to_string()))?;
        let mut install = Command::new("npm");
        install
            .args(["install", "--prefix"])
            .arg(root)
            .args(["--no-audit", "--no-fund", "--loglevel=error"])
            .args(["--fetch-retries", "2", "--fetch-retry-mintimeout", "2000"]);
        if let Some(url) = &self.npm_registry {
            install.args(["--registry", url]);
        }
        install.args(packages);
        run(&mut install).map_err(|cause| error(format!("npm install: {cause}")))
    }
}

/// The Python interpreter for a test that needs `packages`:
/// `$MYELIN_TEST_PYTHON` when set (an interpreter provided by hand, used as
/// it is), else the one of an environment provisioned in the default cache.
///
/// # Panics
/// When the environment cannot be made, with the one line of
/// [`ProvisionError`], so that the test fails and says why.
pub fn python_for_tests(packages: &[&str]) -> PathBuf {
    if let Some(python) = std::env::var_os("MYELIN_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    match Provisioner::from_environment().python(packages) {
        Ok(environment) => environment.python(),
        Err(error) => panic!("{error}"),
    }
}

/// The cache directory named in the module doc.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MYELIN_TEST_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("myelin-test")
}

/// A directory name that tells the kind and packages apart: a readable
/// prefix and a hash of the exact package list.
fn environment_name(kind: &str, packages: &[&str]) -> String {
    let readable: String = packages
        .first()
        .unwrap_or(&"empty")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(32)
        .collect();
    format!("{kind}-{readable}-{:016x}", fnv1a(&packages.join("\n")))
}

/// FNV-1a, 64 bits: stable across Rust versions, unlike `DefaultHasher`.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Runs a command to its end; an error is the last line it printed.
fn run(command: &mut Command) -> Result<(), String> {
    let output: Output = command.output().map_err(|e| e.to_string())?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Searched from the end: stderr's last line first, else stdout's.
    let last_line = stdout
        .lines()
        .chain(stderr.lines())
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .unwrap_or("no output")
        .to_owned();
    Err(format!("{}: {last_line}", output.status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differ_by_kind_and_packages() {
        let a = environment_name("python", &["websockets==17.4"]);
        assert!(a.starts_with("python-websockets--17-4-"), "{a}");
        assert_ne!(a, environment_name("python", &["websockets==17.3"]));
        assert_ne!(a, environment_name("npm", &["websockets==17.4"]));
        assert_eq!(a, environment_name("python", &["websockets==17.4"]));
    }

    #[test]
    fn a_failed_command_reports_its_last_line() {
        let error = run(Command::new("sh").args(["-c", "echo first >&2; echo last >&2; exit 3"]))
            .unwrap_err();
        assert!(error.ends_with(": last"), "{error}");
    }
}
