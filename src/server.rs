//! Starting and stopping the server: storage, services, listener, signals.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api;
use crate::config::Config;
use crate::services::clock::{Clock, SystemClock};
use crate::services::Services;
use crate::storage::{Storage, StorageError};

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
    let (services, listener) = prepare(config, clock).await?;
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, services.clone(), async {
        let _ = shutdown_rx.await;
    }));
    Ok(RunningServer {
        addr,
        services,
        shutdown: Some(shutdown_tx),
        task,
    })
}

/// Runs the server until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run(config: Config) -> Result<(), ServerError> {
    let shutdown = shutdown_signal()?;
    let (services, listener) = prepare(config, Arc::new(SystemClock)).await?;
    serve(listener, services, shutdown).await
}

async fn prepare(
    config: Config,
    clock: Arc<dyn Clock>,
) -> Result<(Arc<Services>, TcpListener), ServerError> {
    let storage = Storage::open(&config.data_dir.join("db"), config.storage.sync_writes)?;
    if !config.storage.sync_writes {
        tracing::warn!("storage.sync_writes is off: a crash may lose acknowledged writes");
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let services = Services::new(Arc::new(config), storage, clock)
        .map_err(|e| ServerError::Start(e.to_string()))?;
    let services = Arc::new(services);
    Ok((services, listener))
}

async fn serve(
    listener: TcpListener,
    services: Arc<Services>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let addr = listener.local_addr().map_err(ServerError::Serve)?;
    tracing::info!(
        %addr,
        server_name = %services.config.server_name,
        registration = ?services.config.registration,
        "listening on {addr}"
    );
    let app = api::router(services.clone());
    let connections = services.connections.clone();
    let shutdown = async move {
        shutdown.await;
        // WebSocket sessions outlive their HTTP connection: tell them.
        connections.stop_all().await;
    };
    // Small writes (WebSocket frames) go out at once, not held back by
    // Nagle's algorithm until the previous one is acknowledged.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "could not set TCP_NODELAY");
        }
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(ServerError::Serve)?;
    services.connections.stop_all().await;
    // Every request has finished, so every write it made is committed; the
    // services (and with them the database) close when dropped here.
    tracing::info!("stopped");
    Ok(())
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
