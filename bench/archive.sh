#!/usr/bin/env bash
# Measures Myelin's archive tier on this machine, in one run:
#
#   - bytes per event hot and archived, on a history of realistic chat
#     (`bench archive-fill`), after a full compaction of the event tables
#     (`myelin archive compact`) so that neither figure depends on when
#     RocksDB last compacted;
#   - the mover's throughput (events moved a second, with the default
#     batch size and pause), from the server's "archive pass finished" log;
#   - the latency of every `/messages` page of that history, hot and then
#     archived (`bench archive-read`), each time on a freshly started server;
#   - the p99 of steady live sends, alone and while the mover runs
#     (`bench archive-live`).
#
#   bench/archive.sh              # 50,000 messages in 10 rooms
#   MESSAGES=2000 bench/archive.sh
#
# The server is pinned to one core and the load generator to the other
# (taskset) when there are two. Results are printed as RESULT lines and
# kept in $BENCH_DIR/archive.results.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/myelin-target}"
work="${BENCH_DIR:-$(mktemp -d)}"
mkdir -p "$work"
messages="${MESSAGES:-50000}"
rooms="${ROOMS:-10}"

echo "bench: building the release binaries"
cargo build --release -p myelin --bins -p myelin-bench
myelin_bin="$CARGO_TARGET_DIR/release/myelin"
bench_bin="$CARGO_TARGET_DIR/release/bench"

if [ "$(nproc)" -ge 2 ]; then
    server_cpu=(taskset -c 0)
    load_cpu=(taskset -c 1)
else
    server_cpu=()
    load_cpu=()
fi

data="$work/archive-data"
rm -rf "$data"
results="$work/archive.results"
: >"$results"
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
url="http://127.0.0.1:$port"
export MYELIN_DATA_DIR="$data" MYELIN_LISTEN="127.0.0.1:$port" MYELIN_REGISTRATION=open \
    MYELIN_RATE_LIMITS=false MYELIN_PASSWORD_HASHING__MEMORY_KIB=1024 \
    MYELIN_PASSWORD_HASHING__ITERATIONS=1 MYELIN_LOG__LEVEL=info

server_pid=""
trap '[ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true' EXIT
start() {
    # Extra MYELIN_* settings for this start come as arguments.
    env "$@" "${server_cpu[@]}" "$myelin_bin" serve >>"$work/archive-server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 300); do
        if curl -sf "$url/_matrix/client/versions" >/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    echo "bench: the server did not come up" >&2
    exit 1
}
stop() {
    kill -TERM "$server_pid"
    wait "$server_pid" || true
}
bench() {
    "${load_cpu[@]}" "$bench_bin" --url "$url" "$@" | tee -a "$results" | grep RESULT
}
status() {
    "$myelin_bin" archive compact >/dev/null
    local line
    line=$("$myelin_bin" archive status)
    echo "RESULT {\"scenario\":\"archive-status\",\"when\":\"$1\",\"status\":$line}" | tee -a "$results"
}

echo "bench: $messages messages in $rooms rooms, the mover off"
start MYELIN_ARCHIVE__ENABLED=false
bench archive-fill --rooms "$rooms" --messages "$messages" --state "$work/archive-state.json"
bench archive-live --seconds 5 --rate 100
stop
status before-the-move

echo "bench: hot pages, on a fresh start"
start MYELIN_ARCHIVE__ENABLED=false
bench archive-read --state "$work/archive-state.json"
stop

echo "bench: the mover on (every event old enough), live sends meanwhile"
log_lines=$(wc -l <"$work/archive-server.log")
start MYELIN_ARCHIVE__AFTER_DAYS=0
bench archive-live --seconds 5 --rate 100
for _ in $(seq 1 600); do
    if tail -n +"$((log_lines + 1))" "$work/archive-server.log" | grep -q "archive pass finished"; then
        break
    fi
    sleep 1
done
pass=$(tail -n +"$((log_lines + 1))" "$work/archive-server.log" | grep "archive pass finished" | head -1)
moved=$(echo "$pass" | grep -o 'moved=[0-9]*' | cut -d= -f2)
elapsed=$(echo "$pass" | grep -o 'elapsed_ms=[0-9]*' | cut -d= -f2)
echo "RESULT {\"scenario\":\"archive-mover\",\"moved\":$moved,\"elapsed_ms\":$elapsed,\"events_per_second\":$((moved * 1000 / (elapsed + 1)))}" | tee -a "$results"
stop
status after-the-move

echo "bench: archived pages, on a fresh start"
start MYELIN_ARCHIVE__ENABLED=false
bench archive-read --state "$work/archive-state.json"
stop
echo "bench: results in $results"
