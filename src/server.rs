//! Starting and stopping the server: storage, services, listener, signals.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use tokio_util::sync::CancellationToken;

use crate::api;
use crate::config::Config;
use crate::front::{ClientAddr, FrontListener};
use crate::services::clock::{Clock, SystemClock};
use crate::services::Services;
use crate::storage::{Storage, StorageError};
use crate::tls;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot start: {0}")]
    Start(String),
}

/// A server running in the background, for tests and embedding.
pub struct RunningServer {
    /// The address actually bound (useful when the config said port 0).
    pub addr: SocketAddr,
    /// The federation listener's address, when it has one of its own.
    pub federation_addr: Option<SocketAddr>,
    /// The metrics listener's address, when `metrics.listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub services: Arc<Services>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// Stops accepting requests, finishes those in flight, closes storage.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.task
            .await
            .map_err(|e| ServerError::Serve(std::io::Error::other(e)))?
    }
}

/// Opens storage, binds the listener and serves in a background task.
pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

/// [`start`] with an injected clock.
pub async fn start_with_clock(
    config: Config,
    clock: Arc<dyn Clock>,
) -> Result<RunningServer, ServerError> {
    let (services, listeners) = prepare(config, clock).await?;
    let addr = listeners.main.local_addr().map_err(ServerError::Serve)?;
    let federation_addr = listeners.federation.as_ref().map(|f| f.addr);
    let metrics_addr = match &listeners.metrics {
        Some(listener) => Some(listener.local_addr().map_err(ServerError::Serve)?),
        None => None,
    };
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listeners, services.clone(), async {
        let _ = shutdown_rx.await;
    }));
    Ok(RunningServer {
        addr,
        federation_addr,
        metrics_addr,
        services,
        shutdown: Some(shutdown_tx),
        task,
    })
}

/// Runs the server until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run(config: Config) -> Result<(), ServerError> {
    let shutdown = shutdown_signal()?;
    let (services, listeners) = prepare(config, Arc::new(SystemClock)).await?;
    serve(listeners, services, shutdown).await
}

/// The bound listeners: the main one, and the federation API's own.
struct Listeners {
    main: TcpListener,
    federation: Option<FederationListener>,
    metrics: Option<TcpListener>,
}

struct FederationListener {
    tcp: TcpListener,
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Binds `federation.listen` (with TLS when a certificate is configured).
async fn bind_federation(config: &Config) -> Result<Option<FederationListener>, ServerError> {
    let federation = &config.federation;
    let Some(listen) = federation.listen.filter(|_| federation.enabled) else {
        return Ok(None);
    };
    let tls = match (&federation.tls_certificate, &federation.tls_private_key) {
        (Some(certificate), Some(key)) => {
            Some(tls::acceptor(certificate, key).map_err(ServerError::Start)?)
        }
        _ => None,
    };
    let tcp = TcpListener::bind(listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: listen,
            source,
        })?;
    let addr = tcp.local_addr().map_err(ServerError::Serve)?;
    Ok(Some(FederationListener { tcp, addr, tls }))
}

/// Opens the database under the data directory as the configuration says
/// (the server and the command line alike).
pub fn open_storage(config: &Config) -> Result<Storage, crate::storage::StorageError> {
    Storage::open_with(
        &config.data_dir.join("db"),
        config.storage.sync_writes,
        &archive_files(config),
        crate::storage::MemoryBudget {
            block_cache_bytes: config.storage.block_cache_mb << 20,
            memtable_bytes: config.storage.memtable_mb << 20,
        },
    )
}

/// Where and how the configuration stores the archive tier's tables.
pub fn archive_files(config: &Config) -> crate::storage::ArchiveFiles {
    crate::storage::ArchiveFiles {
        path: config.archive.path.clone(),
        zstd_level: config.archive.zstd_level,
    }
}

async fn prepare(
    config: Config,
    clock: Arc<dyn Clock>,
) -> Result<(Arc<Services>, Listeners), ServerError> {
    let storage = open_storage(&config)?;
    if !config.storage.sync_writes {
        tracing::warn!("storage.sync_writes is off: a crash may lose acknowledged writes");
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let federation = bind_federation(&config).await?;
    let metrics = match config.metrics.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?,
        ),
        None => None,
    };
    let services = Services::new(Arc::new(config), storage, clock)
        .map_err(|e| ServerError::Start(e.to_string()))?;
    let services = Arc::new(services);
    Ok((
        services,
        Listeners {
            main: listener,
            federation,
            metrics,
        },
    ))
}

async fn serve(
    listeners: Listeners,
    services: Arc<Services>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let listener = listeners.main;
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    let stop_federation = CancellationToken::new();
    let federation_task = listeners.federation.map(|federation| {
        tokio::spawn(serve_federation(
            federation,
            services.clone(),
            stop_federation.clone(),
        ))
    });
    let control_task = tokio::spawn(serve_control(
        control_socket(&services.config),
        services.clone(),
        stop_federation.clone(),
    ));
    let metrics_task = listeners.metrics.map(|listener| {
        tokio::spawn(serve_metrics(
            listener,
            services.clone(),
            stop_federation.clone(),
        ))
    });
    let sender_task = services.federation.enabled().then(|| {
        tokio::spawn(crate::services::federation::sender::run(
            services.clone(),
            stop_federation.clone(),
        ))
    });
    let indexer_task = tokio::spawn(crate::services::search::run(
        services.clone(),
        stop_federation.clone(),
    ));
    let notifier_task = tokio::spawn(crate::services::notifier::run_notifier(
        services.clone(),
        stop_federation.clone(),
    ));
    let push_sender_task = tokio::spawn(crate::services::notifier::run_sender(
        services.clone(),
        stop_federation.clone(),
    ));
    let archiving = services.config.archive.enabled || services.config.retention.enabled;
    let archive_task =
        archiving.then(|| tokio::spawn(services.archive.clone().run(stop_federation.clone())));
    let sweeper_task = tokio::spawn(sweep_threepid_sessions(
        services.clone(),
        stop_federation.clone(),
    ));
    services
        .register_appservice_senders()
        .await
        .map_err(|e| ServerError::Start(e.to_string()))?;
    let appservice_sender_task = tokio::spawn(crate::services::appservices::sender::run(
        services.clone(),
        stop_federation.clone(),
    ));
    let appservice_ephemeral_task = tokio::spawn(crate::services::appservices::ephemeral::run(
        services.clone(),
        stop_federation.clone(),
    ));
    let announcer_task = services.federation.enabled().then(|| {
        tokio::spawn(crate::services::federation::announce::run(
            services.clone(),
            stop_federation.clone(),
        ))
    });
    tracing::info!(
        %addr,
        server_name = %services.config.server_name,
        registration = ?services.config.registration,
        "listening on {addr}"
    );
    let app = api::router(services.clone());
    let connections = services.connections.clone();
    let stopping_federation = stop_federation.clone();
    let shutdown = async move {
        shutdown.await;
        stopping_federation.cancel();
        // WebSocket sessions outlive their HTTP connection: tell them.
        connections.stop_all().await;
    };
    // Long-polls are served by the front; every other connection by
    // axum and hyper.
    let listener = FrontListener::new(listener, app.clone());
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<ClientAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(ServerError::Serve)?;
    stop_federation.cancel();
    for task in [
        sender_task,
        announcer_task,
        Some(indexer_task),
        Some(sweeper_task),
        archive_task,
        Some(notifier_task),
        Some(push_sender_task),
        Some(appservice_sender_task),
        Some(appservice_ephemeral_task),
        metrics_task,
        Some(control_task),
    ]
    .into_iter()
    .flatten()
    {
        let _ = task.await;
    }
    if let Some(task) = federation_task {
        task.await
            .map_err(|e| ServerError::Serve(std::io::Error::other(e)))??;
    }
    services.connections.stop_all().await;
    // Every request has finished, so every write it made is committed; the
    // services (and with them the database) close when dropped here.
    tracing::info!("stopped");
    Ok(())
}

/// The control socket in the data directory, through which the command
/// line asks the running server for what needs it (`myelin backup`).
pub fn control_socket(config: &Config) -> std::path::PathBuf {
    config.data_dir.join("control").join("socket")
}

/// A request on the control socket: one JSON line, answered by one.
#[derive(serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum ControlRequest {
    /// Take a backup into this (absolute) directory.
    Backup(std::path::PathBuf),
}

/// Serves the control socket until `stop`. Only the server's own user
/// can connect: the socket is made in a directory of mode 0700.
async fn serve_control(path: std::path::PathBuf, services: Arc<Services>, stop: CancellationToken) {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let Some(dir) = path.parent() else {
        return;
    };
    let private = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)));
    if let Err(error) = private {
        tracing::warn!(%error, dir = %dir.display(), "no control socket");
        return;
    }
    // A socket left by a server that did not stop cleanly.
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "no control socket");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(%error, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let services = services.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(64 * 1024));
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let answer = match serde_json::from_str::<ControlRequest>(&line) {
                Ok(ControlRequest::Backup(dest)) if dest.is_absolute() => {
                    tracing::info!(dest = %dest.display(), "backup asked on the control socket");
                    match services.backup(dest).await {
                        Ok(manifest) => serde_json::json!({ "ok": manifest }),
                        Err(error) => serde_json::json!({ "error": error }),
                    }
                }
                Ok(ControlRequest::Backup(_)) => {
                    serde_json::json!({ "error": "the backup directory must be an absolute path" })
                }
                Err(error) => serde_json::json!({ "error": format!("bad request: {error}") }),
            };
            let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Serves `GET /metrics` on the metrics listener until `stop`.
async fn serve_metrics(listener: TcpListener, services: Arc<Services>, stop: CancellationToken) {
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "metrics listening");
    let app = api::metrics::router(services);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "the metrics listener failed");
    }
}

/// Serves the federation API on its own listener until `stop`.
async fn serve_federation(
    listener: FederationListener,
    services: Arc<Services>,
    stop: CancellationToken,
) -> Result<(), ServerError> {
    // No federation handler asks for the peer's address, so the plain
    // make-service serves both the TCP and the TLS listener.
    let app = api::federation_router(services).into_make_service();
    let addr = listener.addr;
    let shutdown = async move { stop.cancelled().await };
    match listener.tls {
        Some(acceptor) => {
            tracing::info!(%addr, "federation listening on {addr} (HTTPS)");
            let listener = tls::TlsListener::new(listener.tcp, acceptor);
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            tracing::info!(%addr, "federation listening on {addr} (plain HTTP)");
            axum::serve(listener.tcp, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
    .map_err(ServerError::Serve)
}

/// Installs the SIGINT and SIGTERM handlers now (before the server says it
/// listens, so that no early signal kills it unhandled) and returns a future
/// that resolves when either arrives.
fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, ServerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).map_err(ServerError::Serve)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(ServerError::Serve)?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received, shutting down"),
            _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
        }
    })
}

/// Deletes expired email validation sessions once an hour, until `stop`.
async fn sweep_threepid_sessions(services: Arc<Services>, stop: CancellationToken) {
    let mut every_hour = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every_hour.tick() => {}
        }
        match services.threepids.sweep().await {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "expired email validation sessions deleted"),
            Err(error) => tracing::warn!(%error, "could not delete expired validation sessions"),
        }
    }
}
