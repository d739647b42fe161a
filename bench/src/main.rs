//! `bench`: a load generator that measures any Matrix homeserver over plain
//! HTTP (and Myelin's WebSocket extension), one scenario per run.
//!
//! Each scenario shows its progress on stderr and ends with one line on
//! stdout, `RESULT {json}`, which `bench/compare.sh` gathers into a table.
//! The server needs open registration and no rate limits; `--pid` lets the
//! memory scenario read its resident memory, `--data-dir` lets the storage
//! scenario measure its database.

mod archive;
mod matrix;
mod scenarios;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(about = "Measures a Matrix homeserver over plain HTTP")]
struct Cli {
    /// The homeserver's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8008")]
    url: String,
    /// The server's process ID, for `memory`.
    #[arg(long)]
    pid: Option<u32>,
    /// The server's data directory (or database file), for `storage`.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// Long-polling `GET /sync`.
    Sync,
    /// Myelin's WebSocket push extension.
    Ws,
}

impl Transport {
    /// The transport's name in scenario names.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Sync => "sync",
            Transport::Ws => "ws",
        }
    }
}

#[derive(Subcommand)]
enum Scenario {
    /// (a) Send → delivery latency with N waiting clients, open loop.
    Latency {
        #[arg(long, default_value_t = 100)]
        clients: usize,
        #[arg(long, default_value_t = 200)]
        messages: u64,
        /// Messages per second, sent on schedule whether or not earlier
        /// sends were answered.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long, default_value_t = 1)]
        senders: usize,
        #[arg(long, value_enum, default_value_t = Transport::Sync)]
        transport: Transport,
        /// First one unmeasured message into each room, delivered to all
        /// before the measured ones start: the steady state, without each
        /// recipient's first look at its room after connecting.
        #[arg(long)]
        warm_up: bool,
    },
    /// (b) Acknowledged sends per second with C concurrent senders.
    Throughput {
        #[arg(long, default_value_t = 16)]
        senders: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// (c) One message into a room of M members: time until the last
    /// member has it.
    Fanout {
        #[arg(long, default_value_t = 100)]
        members: usize,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// (d) Resident memory of the server per idle waiting connection.
    Memory {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, value_enum, default_value_t = Transport::Sync)]
        transport: Transport,
        /// Access tokens of the devices to connect (one per line, from
        /// `devices`), so that making them is not part of the measurement.
        #[arg(long)]
        tokens_file: Option<std::path::PathBuf>,
    },
    /// Makes N devices (logins) and writes their access tokens to a file,
    /// for `memory --transport ws` on a freshly started server.
    Devices {
        #[arg(long, default_value_t = 10000)]
        count: usize,
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// (e) Initial sync time of an account in N rooms.
    InitialSync {
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        /// Initial syncs measured, each from a new device.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// (g) Federation: events a second from the `--url` server to
    /// `--peer-url`'s, and send → remote `/sync` latency.
    Federation {
        /// The receiving server's base URL.
        #[arg(long)]
        peer_url: String,
        #[arg(long, default_value_t = 2000)]
        messages: u64,
        #[arg(long, default_value_t = 16)]
        senders: usize,
        #[arg(long, default_value_t = 200)]
        latency_messages: u64,
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
    },
    /// (h) Push: from a send to the push gateway's request, with R rooms
    /// of a sender and a recipient whose pusher points at a gateway this
    /// process runs on loopback (the server must allow pushing there).
    Push {
        #[arg(long, default_value_t = 20)]
        rooms: usize,
        #[arg(long, default_value_t = 500)]
        messages: u64,
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
    },
    /// (i) A soak: steady sends to waiting clients for a long while, the
    /// server's resident memory read every 10 s (needs `--pid`).
    Soak {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long, value_enum, default_value_t = Transport::Ws)]
        transport: Transport,
        /// Messages sent (and read back) first, as fast as they go, into
        /// a room of their own, so that the server's memos of the newest
        /// events are full before the minutes are measured.
        #[arg(long, default_value_t = 0)]
        fill: u64,
        /// Seconds of the same load before the measured `seconds`.
        #[arg(long, default_value_t = 0)]
        settle_seconds: u64,
        /// Myelin's metrics listener (`http://host:port`): RocksDB's
        /// memtables, block cache and table indexes, and the bytes the
        /// server's own code holds, are read with each reading.
        #[arg(long)]
        metrics_url: Option<String>,
    },
    /// (f) Database bytes per stored message.
    Storage {
        #[arg(long, default_value_t = 5000)]
        messages: usize,
    },
    /// (j) The archive tier: a history of realistic chat (messages,
    /// replies, edits, reactions) in rooms of five, its rooms written to
    /// `--state` for `archive-read` (see `bench/archive.sh`).
    ArchiveFill {
        #[arg(long, default_value_t = 10)]
        rooms: usize,
        #[arg(long, default_value_t = 20000)]
        messages: usize,
        #[arg(long)]
        state: std::path::PathBuf,
    },
    /// Every `/messages` page of the rooms `archive-fill` made, newest to
    /// oldest, each timed.
    ArchiveRead {
        #[arg(long)]
        state: std::path::PathBuf,
    },
    /// Steady sends, open loop, each acknowledgement timed.
    ArchiveLive {
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let (limit, wanted) = matrix::raise_file_limit();
    if limit < wanted {
        eprintln!("bench: open files limited to {limit}; large runs may fail");
    }
    let server = matrix::Server::new(&cli.url);
    let result = match cli.scenario {
        Scenario::Latency {
            clients,
            messages,
            rate,
            senders,
            transport,
            warm_up,
        } => {
            scenarios::latency(
                &server, clients, messages, rate, senders, transport, warm_up,
            )
            .await
        }
        Scenario::Throughput { senders, seconds } => {
            scenarios::throughput(&server, senders, seconds).await
        }
        Scenario::Fanout { members, rounds } => scenarios::fanout(&server, members, rounds).await,
        Scenario::Memory {
            connections,
            transport,
            tokens_file,
        } => {
            let pid = cli.pid.expect("memory needs --pid");
            let tokens = tokens_file.map(|file| {
                std::fs::read_to_string(file)
                    .expect("the tokens file")
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            });
            scenarios::memory(&server, pid, connections, transport, tokens).await
        }
        Scenario::Devices { count, file } => {
            let tokens = scenarios::devices(&server, count).await;
            std::fs::write(&file, tokens.join("\n")).expect("the tokens file");
            serde_json::json!({ "scenario": "devices", "count": tokens.len() })
        }
        Scenario::Federation {
            peer_url,
            messages,
            senders,
            latency_messages,
            rate,
        } => {
            let peer = matrix::Server::new(&peer_url);
            scenarios::federation(&server, &peer, messages, senders, latency_messages, rate).await
        }
        Scenario::InitialSync { rooms, rounds } => {
            scenarios::initial_sync(&server, rooms, rounds).await
        }
        Scenario::Push {
            rooms,
            messages,
            rate,
        } => scenarios::push(&server, rooms, messages, rate).await,
        Scenario::Soak {
            clients,
            seconds,
            rate,
            transport,
            fill,
            settle_seconds,
            metrics_url,
        } => {
            let pid = cli.pid.expect("soak needs --pid");
            let load = scenarios::SoakLoad {
                clients,
                seconds,
                rate,
                fill,
                settle: settle_seconds,
            };
            scenarios::soak(&server, pid, load, transport, metrics_url).await
        }
        Scenario::ArchiveFill {
            rooms,
            messages,
            state,
        } => archive::fill(&server, rooms, messages, &state).await,
        Scenario::ArchiveRead { state } => archive::read(&server, &state).await,
        Scenario::ArchiveLive { seconds, rate } => archive::live(&server, seconds, rate).await,
        Scenario::Storage { messages } => {
            let dir = cli.data_dir.expect("storage needs --data-dir");
            scenarios::storage(&server, &dir, messages).await
        }
    };
    println!("RESULT {result}");
}
