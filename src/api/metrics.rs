//! `GET /metrics` in the Prometheus text format, on the metrics listener
//! (`metrics.listen`) alone; and the middleware that times every request
//! of the Matrix API.

use std::fmt::Write;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::metrics::{family, single};

/// The metrics listener's application.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(state)
}

/// Times a request and counts it under its route's template.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().clone();
    let response = next.run(request).await;
    state.requests.observe(
        &endpoint,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

async fn scrape(State(state): State<AppState>) -> impl IntoResponse {
    let body = tokio::task::spawn_blocking(move || render(&state))
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// Every family, in the text format.
fn render(state: &AppState) -> String {
    let mut out = String::with_capacity(16 * 1024);
    state.requests.render(&mut out);
    single(
        &mut out,
        "myelin_sync_waiting",
        "gauge",
        "Long-polling /sync and sliding sync requests waiting for news.",
        state.sync.waiting() as f64,
    );
    single(
        &mut out,
        "myelin_websocket_connections",
        "gauge",
        "Open WebSocket push sessions.",
        state.connections.count() as f64,
    );
    single(
        &mut out,
        "myelin_stream_position",
        "gauge",
        "The latest position of the event stream.",
        state.rooms.current_stream_position() as f64,
    );
    let commits = state.commit_stats();
    family(
        &mut out,
        "myelin_storage_commit_duration_seconds",
        "histogram",
        "Time of a durable commit, the log's sync included.",
    );
    commits
        .seconds
        .render(&mut out, "myelin_storage_commit_duration_seconds", "");
    family(
        &mut out,
        "myelin_storage_commit_operations",
        "histogram",
        "Writes and deletes in one committed batch.",
    );
    commits
        .operations
        .render(&mut out, "myelin_storage_commit_operations", "");
    family(
        &mut out,
        "myelin_queue_items",
        "gauge",
        "Items waiting in a durable queue (the engine's estimate).",
    );
    for (queue, rows) in state.queue_depths().unwrap_or_default() {
        let _ = writeln!(out, "myelin_queue_items{{queue=\"{queue}\"}} {rows}");
    }
    if let Ok(archive) = state.archive.status() {
        family(
            &mut out,
            "myelin_events",
            "gauge",
            "Stored events by tier (the engine's estimate).",
        );
        let _ = writeln!(out, "myelin_events{{tier=\"hot\"}} {}", archive.hot.rows);
        let _ = writeln!(
            out,
            "myelin_events{{tier=\"archived\"}} {}",
            archive.archived.rows
        );
    }
    if let Some(engine) = state.engine_stats() {
        let figures: [(&str, &str, &str, f64); 10] = [
            (
                "myelin_rocksdb_memtable_bytes",
                "gauge",
                "Bytes in RocksDB's memtables.",
                engine.memtable_bytes as f64,
            ),
            (
                "myelin_rocksdb_block_cache_bytes",
                "gauge",
                "Bytes in use in RocksDB's block cache (one for every table).",
                engine.block_cache_bytes as f64,
            ),
            (
                "myelin_rocksdb_table_readers_bytes",
                "gauge",
                "Bytes of open table files' indexes and filters (estimate).",
                engine.table_readers_bytes as f64,
            ),
            (
                "myelin_rocksdb_sst_bytes",
                "gauge",
                "Bytes of RocksDB's table files.",
                engine.sst_bytes as f64,
            ),
            (
                "myelin_rocksdb_running_compactions",
                "gauge",
                "Compactions running now.",
                engine.running_compactions as f64,
            ),
            (
                "myelin_rocksdb_running_flushes",
                "gauge",
                "Memtable flushes running now.",
                engine.running_flushes as f64,
            ),
            (
                "myelin_rocksdb_pending_compaction_bytes",
                "gauge",
                "Bytes compactions still have to rewrite (estimate).",
                engine.pending_compaction_bytes as f64,
            ),
            (
                "myelin_rocksdb_write_stopped",
                "gauge",
                "1 while writes are stopped until compactions catch up.",
                engine.write_stopped as f64,
            ),
            (
                "myelin_rocksdb_delayed_write_rate_bytes",
                "gauge",
                "The rate writes are slowed to, bytes a second (0: not slowed).",
                engine.delayed_write_rate as f64,
            ),
            (
                "myelin_rocksdb_stall_seconds_total",
                "counter",
                "Seconds writers stalled since the database opened.",
                engine.stall_seconds,
            ),
        ];
        for (name, kind, help, value) in figures {
            single(&mut out, name, kind, help, value);
        }
    }
    render_allocator(&mut out);
    render_process(&mut out);
    out
}

/// The allocator's figures. jemalloc serves every allocation of the
/// server's own code; RocksDB's C++ allocates apart from it, through the
/// C library, so these leave out the memtables and the block cache.
fn render_allocator(out: &mut String) {
    use tikv_jemalloc_ctl::{epoch, stats};
    // The statistics are a snapshot taken when the epoch advances.
    if epoch::advance().is_err() {
        return;
    }
    if let Ok(allocated) = stats::allocated::read() {
        single(
            out,
            "myelin_allocator_allocated_bytes",
            "gauge",
            "Bytes the server's own code holds allocated (jemalloc).",
            allocated as f64,
        );
    }
    if let Ok(resident) = stats::resident::read() {
        single(
            out,
            "myelin_allocator_resident_bytes",
            "gauge",
            "Bytes of resident pages jemalloc maps, its free ones included.",
            resident as f64,
        );
    }
}

/// The standard process families, from `/proc/self`.
fn render_process(out: &mut String) {
    let page = page_size();
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        let mut fields = statm
            .split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0));
        let virtual_pages = fields.next().unwrap_or(0);
        let resident_pages = fields.next().unwrap_or(0);
        single(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            (resident_pages * page) as f64,
        );
        single(
            out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            (virtual_pages * page) as f64,
        );
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        single(
            out,
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            entries.count() as f64,
        );
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        single(
            out,
            "process_max_fds",
            "gauge",
            "The most open file descriptors allowed.",
            limit.rlim_cur as f64,
        );
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // The fields after the command name (which may hold spaces), from
        // the state (field 3): utime and stime are fields 14 and 15.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            // SAFETY: sysconf only reads a constant.
            let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            let cpu = (ticks(11) + ticks(12)) / per_second;
            single(
                out,
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time, in seconds.",
                cpu,
            );
        }
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}
