#!/usr/bin/env bash
# Measures Synapse and Myelin side by side on this machine, in one run, with
# the same `bench` scenarios, and prints one table of both and their ratio.
#
#   bench/compare.sh            # the full run (about an hour on 2 cores)
#   QUICK=1 bench/compare.sh    # smaller sizes, to try the setup
#
# Synapse comes from PyPI into a virtual environment, configured on loopback
# with SQLite, open registration and no rate limits. Myelin runs its release
# build with the same. Each server runs alone; the server is pinned to one
# core and the load generator to the other (taskset) when there are two.
# Everything is written under $BENCH_DIR (a new temporary directory by
# default); the results of each server are in $BENCH_DIR/<server>.results.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/myelin-target}"
work="${BENCH_DIR:-$(mktemp -d)}"
mkdir -p "$work"
quick="${QUICK:-0}"
synapse_venv="${SYNAPSE_VENV:-$HOME/.cache/myelin-synapse-venv}"

echo "bench: building the release binaries"
cargo build --release --workspace --bins
myelin_bin="$CARGO_TARGET_DIR/release/myelin"
bench_bin="$CARGO_TARGET_DIR/release/bench"

if ! "$synapse_venv/bin/python" -c "import synapse" 2>/dev/null; then
    echo "bench: installing Synapse from PyPI into $synapse_venv"
    python3 -m venv "$synapse_venv"
    "$synapse_venv/bin/pip" install -q matrix-synapse
fi
synapse_version=$("$synapse_venv/bin/python" -c "import synapse; print(synapse.__version__)")
sqlite_sync=$("$synapse_venv/bin/python" -c \
    "import sqlite3; print(sqlite3.connect(':memory:').execute('pragma synchronous').fetchone()[0])")

# 10,000 connections need more descriptors than the usual soft limit.
ulimit -n "$(ulimit -Hn)" || true
if [ "$(nproc)" -ge 2 ]; then
    server_cpu=(taskset -c 0)
    load_cpu=(taskset -c 1)
else
    server_cpu=()
    load_cpu=()
fi

port_free() {
    python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

wait_for() {
    local url=$1
    for _ in $(seq 1 600); do
        if curl -sf "$url/_matrix/client/versions" >/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    echo "bench: $url did not come up" >&2
    return 1
}

start_synapse() {
    local dir="$work/synapse" port=$1
    rm -rf "$dir" && mkdir -p "$dir"
    (cd "$dir" && "$synapse_venv/bin/python" -m synapse.app.homeserver \
        --server-name localhost --config-path "$dir/homeserver.yaml" \
        --generate-config --report-stats=no >/dev/null)
    "$synapse_venv/bin/python" - "$dir" "$port" <<'EOF'
import sys, yaml
directory, port = sys.argv[1], int(sys.argv[2])
path = f"{directory}/homeserver.yaml"
config = yaml.safe_load(open(path))
config["listeners"] = [{
    "port": port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
    "x_forwarded": False, "resources": [{"names": ["client"], "compress": False}],
}]
config["enable_registration"] = True
config["enable_registration_without_verification"] = True
# Registration speed is not measured: cheap hashing, as Myelin's run has.
config["bcrypt_rounds"] = 4
unlimited = {"per_second": 1000000, "burst_count": 1000000}
for key in ["rc_message", "rc_registration", "rc_joins_per_room", "rc_invites",
            "rc_3pid_validation", "rc_presence", "rc_delayed_event_mgmt", "rc_room_creation"]:
    config[key] = dict(unlimited)
config["rc_login"] = {k: dict(unlimited) for k in ["address", "account", "failed_attempts"]}
config["rc_joins"] = {k: dict(unlimited) for k in ["local", "remote"]}
config["rc_invites"] = {k: dict(unlimited) for k in ["per_room", "per_user", "per_issuer"]}
config["trusted_key_servers"] = []
config["suppress_key_server_warning"] = True
config["report_stats"] = False
# The push scenario's gateway runs on loopback.
config["ip_range_whitelist"] = ["127.0.0.0/8"]
yaml.safe_dump(config, open(path, "w"))
log = f"{directory}/localhost.log.config"
text = open(log).read().replace("level: INFO", "level: WARNING")
open(log, "w").write(text)
EOF
    (cd "$dir" && exec "${server_cpu[@]}" "$synapse_venv/bin/python" -m synapse.app.homeserver \
        --config-path "$dir/homeserver.yaml" >"$dir/stdout.log" 2>&1) &
    server_pid=$!
    data_path="$dir/homeserver.db"
}

start_myelin() {
    local dir="$work/myelin" port=$1
    if [ "${keep_data:-0}" != 1 ]; then
        rm -rf "$dir" && mkdir -p "$dir"
    fi
    # The soak reads RocksDB's buffers from a metrics listener; the other
    # phases run without one, as by default.
    local metrics=()
    if [ "${with_metrics:-0}" = 1 ]; then
        local metrics_port
        metrics_port=$(port_free)
        metrics_url="http://127.0.0.1:$metrics_port"
        metrics=(MYELIN_METRICS__LISTEN="127.0.0.1:$metrics_port")
    fi
    env "${metrics[@]}" MYELIN_LISTEN="127.0.0.1:$port" MYELIN_DATA_DIR="$dir/data" \
        MYELIN_REGISTRATION=open MYELIN_RATE_LIMITS=false \
        MYELIN_PASSWORD_HASHING__MEMORY_KIB=1024 MYELIN_PASSWORD_HASHING__ITERATIONS=1 \
        MYELIN_LOG__LEVEL=warn MYELIN_PUSH__IP_RANGE_ALLOWLIST='["127.0.0.0/8"]' \
        "${server_cpu[@]}" "$myelin_bin" serve >"$dir/stdout.log" 2>&1 &
    server_pid=$!
    data_path="$dir/data"
}

stop_server() {
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
}

# One phase of scenarios against a freshly started server. Memory is
# measured on a fresh server of its own: after the other scenarios, freed
# memory the allocator keeps would hide what connections cost.
run_server() {
    local name=$1 phase=$2 port url results
    # The soak is Myelin's alone.
    if [ "$phase" = soak ] && [ "$name" != myelin ]; then
        return 0
    fi
    port=$(port_free)
    url="http://127.0.0.1:$port"
    results="$work/$name.results"
    if [ "$phase" = first ]; then
        : >"$results"
    fi
    with_metrics=0
    [ "$phase" = soak ] && with_metrics=1
    "start_$name" "$port"
    wait_for "$url"
    echo "bench: $name is up on $url (pid $server_pid)"
    scenario() {
        echo "bench: $name: $*"
        "${load_cpu[@]}" "$bench_bin" --url "$url" --pid "$server_pid" --data-dir "$data_path" "$@" \
            | grep '^RESULT ' | sed 's/^RESULT //' >>"$results"
    }
    # The server again, on new data.
    fresh_server() {
        stop_server
        "start_$name" "$port"
        wait_for "$url"
    }
    if [ "$phase" = memory ]; then
        # WebSocket connections are of as many devices, made first; the
        # server then starts afresh on the same data, so that neither
        # logging in nor the memory it leaves behind is measured.
        local sizes="1000 10000"
        [ "$quick" = 1 ] && sizes="1000"
        for connections in $sizes; do
            scenario memory --connections "$connections"
        done
        if [ "$name" = myelin ]; then
            local most=${sizes##* }
            scenario devices --count "$most" --file "$work/devices.txt"
            for connections in $sizes; do
                stop_server
                keep_data=1 "start_$name" "$port"
                wait_for "$url"
                scenario memory --connections "$connections" --transport ws --tokens-file "$work/devices.txt"
            done
        fi
    elif [ "$phase" = soak ]; then
        # Ten minutes of steady load, memory read every 10 s, after
        # 40,000 messages that fill the memos of the newest events (16,384
        # parsed events, 32,768 stream entries) and two minutes of the same
        # load that settle what each connection and room sets up at its
        # first deliveries.
        if [ "$quick" = 1 ]; then
            scenario soak --clients 100 --seconds 60 --rate 10 --fill 2000 --settle-seconds 20 \
                --metrics-url "$metrics_url"
        else
            scenario soak --clients 1000 --seconds 600 --rate 10 --fill 40000 --settle-seconds 120 \
                --metrics-url "$metrics_url"
        fi
    elif [ "$quick" = 1 ]; then
        scenario storage --messages 500
        scenario initial-sync --rooms 10
        for senders in 1 16; do
            scenario throughput --senders "$senders" --seconds 5
        done
        scenario fanout --members 100 --rounds 5
        scenario latency --clients 100 --messages 50 --rate 10 --warm-up
        scenario push --rooms 10 --messages 100 --rate 20
        [ "$name" = myelin ] && scenario latency --clients 100 --messages 50 --rate 10 --transport ws --warm-up
    else
        scenario storage --messages 5000
        for rooms in 10 100 1000; do
            scenario initial-sync --rooms "$rooms"
        done
        for senders in 1 4 16 64; do
            scenario throughput --senders "$senders" --seconds 20
        done
        scenario fanout --members 100 --rounds 20
        scenario push --rooms 50 --messages 1000 --rate 20
        # How latency grows with waiting clients: 100 and 1,000 on both
        # servers, 10,000 on Myelin (Synapse needs many minutes to join
        # 10,000 users to rooms). Each in the steady state (--warm-up), and
        # 1,000 also from cold: the first message each recipient sees
        # after connecting.
        if [ "$name" = myelin ]; then
            # Each latency run on a fresh server, so that the two
            # transports are compared on the same server state.
            for clients in 100 1000 10000; do
                for transport in sync ws; do
                    fresh_server
                    scenario latency --clients "$clients" --messages 200 --rate 10 \
                        --transport "$transport" --warm-up
                done
            done
            for transport in sync ws; do
                fresh_server
                scenario latency --clients 1000 --messages 200 --rate 10 --transport "$transport"
            done
            fresh_server
            scenario latency --clients 1000 --messages 200 --rate 10 --senders 4 --warm-up
        else
            scenario latency --clients 100 --messages 200 --rate 10 --warm-up
            scenario latency --clients 1000 --messages 200 --rate 10 --warm-up
            scenario latency --clients 1000 --messages 200 --rate 10
            scenario latency --clients 1000 --messages 200 --rate 10 --senders 4 --warm-up
        fi
    fi
    stop_server
}

# SERVERS and PHASES pick what runs: the servers, and the phases "first"
# (every scenario but memory and the soak), "memory" and "soak"; the table
# is made of whatever the results files hold.
for server in ${SERVERS:-synapse myelin}; do
    for phase in ${PHASES:-first memory soak}; do
        run_server "$server" "$phase"
    done
done

"$synapse_venv/bin/python" - "$work" "$synapse_version" "$sqlite_sync" <<'EOF'
import json, os, sys
work, version, sqlite_sync = sys.argv[1], sys.argv[2], sys.argv[3]
def load(name):
    rows = [json.loads(line) for line in open(f"{work}/{name}.results") if line.strip()]
    rows = [row for row in rows if row["scenario"] != "devices"]
    out = {}
    for row in rows:
        key = row["scenario"]
        if row["scenario"].startswith("latency"):
            key += f" {row['clients']} clients"
            if row.get("senders", 1) > 1:
                key += f", {row['senders']} senders"
            key += ", steady" if row.get("warm_up") else ", cold"
        if row["scenario"].startswith("soak"):
            key += f" {row['clients']} clients, {row['seconds']} s at {row['rate']}/s"
        if row["scenario"] == "throughput":
            key += f" {row['senders']} senders"
        if row["scenario"].startswith("memory"):
            key += f" {row['connections']}"
        while key in out:
            key += "'"
        out[key] = row
    return out
synapse, myelin = load("synapse"), load("myelin")
figures = {
    "latency": ["p50_ms", "p95_ms", "p99_ms", "max_ms"],
    "throughput": ["messages_per_s"],
    "fanout": ["p50_ms", "max_ms"],
    "memory": ["bytes_per_connection"],
    "initial-sync": ["median_ms"],
    "storage": ["bytes_per_message"],
    "push": ["p50_ms", "p95_ms", "p99_ms", "max_ms"],
    "soak": ["p99_ms", "rss_first_minute_mb", "rss_last_minute_mb", "rss_growth_percent",
             "rss_max_mb", "rocksdb_last_minute_mb", "rocksdb_max_mb",
             "outside_rocksdb_first_minute_mb", "outside_rocksdb_last_minute_mb",
             "outside_rocksdb_growth_percent", "heap_first_minute_mb", "heap_last_minute_mb",
             "heap_growth_percent"],
}
print(f"Synapse {version} (SQLite, WAL, synchronous={sqlite_sync}); Myelin (RocksDB, WAL synced before every answer)")
print()
print("| scenario | figure | Synapse | Myelin | Myelin/Synapse |")
print("|---|---|---:|---:|---:|")
for key in list(synapse) + [k for k in myelin if k not in synapse]:
    kind = next(k for k in figures if key.startswith(k))
    for figure in figures[kind]:
        s = synapse.get(key, {}).get(figure)
        m = myelin.get(key, {}).get(figure)
        ratio = f"{m / s:.2f}" if isinstance(s, (int, float)) and isinstance(m, (int, float)) and s else "—"
        show = lambda v: "—" if v is None else (f"{v:,.2f}" if isinstance(v, float) else f"{v:,}")
        print(f"| {key} | {figure} | {show(s)} | {show(m)} | {ratio} |")
print()
for name, rows in [("Synapse", synapse), ("Myelin", myelin)]:
    for key, row in rows.items():
        if "expected" in row:
            print(f"{name} {key}: {row['delivered']} of {row['expected']} deliveries, {row['acknowledged']} of {row['messages']} sends acknowledged")
        if "incomplete_rounds" in row and row["incomplete_rounds"]:
            print(f"{name} {key}: {row['incomplete_rounds']} incomplete rounds")
EOF
echo "bench: results in $work"
