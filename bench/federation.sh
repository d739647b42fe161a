#!/usr/bin/env bash
# Federation figures, in one run on this machine: events a second from one
# Myelin server to another and from Myelin to Synapse, each read by a user
# of the receiving server through long-polling /sync, and the latency from
# an acknowledged send to that /sync (p50, p99).
#
#   bench/federation.sh                 # 2,000 messages, then 200 at 10/s
#   MESSAGES=500 LATENCY_MESSAGES=50 bench/federation.sh
#
# Every server runs on loopback with its own address (127.0.0.2, .3, .4),
# HTTPS federation with certificates of a CA made here (openssl), release
# builds of Myelin, Synapse from PyPI (SQLite). Two servers and the load
# generator share the machine's cores; nothing is pinned. Everything is
# written under $BENCH_DIR (a new temporary directory by default); the
# results are in $BENCH_DIR/federation.results.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/myelin-target}"
work="${BENCH_DIR:-$(mktemp -d)}"
mkdir -p "$work"
messages="${MESSAGES:-2000}"
latency_messages="${LATENCY_MESSAGES:-200}"
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

port_free() {
    python3 -c "import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])" "$1"
}

wait_for() {
    for _ in $(seq 1 600); do
        if curl -sf "$1/_matrix/client/versions" >/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    echo "bench: $1 did not come up" >&2
    return 1
}

# A CA and a certificate for each address.
certs="$work/certs"
mkdir -p "$certs"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout "$certs/ca.key" -out "$certs/ca.pem" 2>/dev/null
for ip in 127.0.0.2 127.0.0.3 127.0.0.4; do
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$ip" \
        -keyout "$certs/$ip.key" -out "$certs/$ip.csr" 2>/dev/null
    printf 'subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' "$ip" >"$certs/$ip.ext"
    openssl x509 -req -in "$certs/$ip.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca.key" \
        -CAcreateserial -days 2 -extfile "$certs/$ip.ext" -out "$certs/$ip.pem" 2>/dev/null
done

pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# start_myelin IP: starts Myelin federating on IP; sets $url.
start_myelin() {
    local ip=$1 dir="$work/myelin-$1" port fport
    rm -rf "$dir" && mkdir -p "$dir"
    port=$(port_free 127.0.0.1)
    fport=$(port_free "$ip")
    cat >"$dir/myelin.toml" <<TOML
server_name = "$ip:$fport"
listen = "127.0.0.1:$port"
data_dir = "$dir/data"
registration = "open"
rate_limits = false

[password_hashing]
memory_kib = 1024
iterations = 1

[log]
level = "warn"

[federation]
listen = "$ip:$fport"
tls_certificate = "$certs/$ip.pem"
tls_private_key = "$certs/$ip.key"
ca_certificates = "$certs/ca.pem"
ip_range_allowlist = ["127.0.0.0/8"]
TOML
    "$myelin_bin" --config "$dir/myelin.toml" serve >"$dir/stdout.log" 2>&1 &
    pids+=($!)
    url="http://127.0.0.1:$port"
    wait_for "$url"
}

# start_synapse IP: starts Synapse federating on IP; sets $url.
start_synapse() {
    local ip=$1 dir="$work/synapse-$1" port fport
    rm -rf "$dir" && mkdir -p "$dir"
    port=$(port_free "$ip")
    fport=$(port_free "$ip")
    local rate="{per_second: 100000, burst_count: 100000}"
    cat >"$dir/homeserver.yaml" <<YAML
server_name: "$ip:$fport"
pid_file: $dir/homeserver.pid
listeners:
  - {port: $port, bind_addresses: ['$ip'], type: http, tls: false, x_forwarded: false, resources: [{names: [client], compress: false}]}
  - {port: $fport, bind_addresses: ['$ip'], type: http, tls: true, resources: [{names: [federation], compress: false}]}
tls_certificate_path: $certs/$ip.pem
tls_private_key_path: $certs/$ip.key
database: {name: sqlite3, args: {database: $dir/homeserver.db}}
media_store_path: $dir/media_store
signing_key_path: $dir/signing.key
macaroon_secret_key: "bench-macaroon-secret"
form_secret: "bench-form-secret"
report_stats: false
enable_registration: true
enable_registration_without_verification: true
bcrypt_rounds: 4
trusted_key_servers: []
suppress_key_server_warning: true
federation_custom_ca_list: [$certs/ca.pem]
federation_ip_range_blacklist: []
ip_range_whitelist: ['127.0.0.0/8']
rc_message: $rate
rc_registration: $rate
rc_login: {address: $rate, account: $rate, failed_attempts: $rate}
rc_joins: {local: $rate, remote: $rate}
rc_federation: {window_size: 1000, sleep_limit: 100000, sleep_delay: 0, reject_limit: 100000, concurrent: 1000}
YAML
    "$synapse_venv/bin/python" -m synapse.app.homeserver --generate-keys -c "$dir/homeserver.yaml" >/dev/null
    "$synapse_venv/bin/python" -m synapse.app.homeserver -c "$dir/homeserver.yaml" >"$dir/stdout.log" 2>&1 &
    pids+=($!)
    url="http://$ip:$port"
    wait_for "$url"
}

results="$work/federation.results"
: >"$results"
run() {
    local label=$1 origin=$2 peer=$3
    echo "bench: federation $label"
    "$bench_bin" --url "$origin" federation --peer-url "$peer" \
        --messages "$messages" --latency-messages "$latency_messages" \
        | grep '^RESULT ' | sed "s/^RESULT {/{\"pair\": \"$label\", /" >>"$results"
}

start_myelin 127.0.0.2
myelin_a=$url
start_myelin 127.0.0.3
myelin_b=$url
start_synapse 127.0.0.4
synapse=$url

run "Myelin → Myelin" "$myelin_a" "$myelin_b"
run "Myelin → Synapse" "$myelin_a" "$synapse"
run "Synapse → Myelin" "$synapse" "$myelin_b"

python3 - "$results" <<'PY'
import json, sys
print(f"| pair | events/s | send → remote /sync p50 | p99 |")
print(f"|---|---:|---:|---:|")
for line in open(sys.argv[1]):
    row = json.loads(line)
    lat = row["latency"]
    print(f"| {row['pair']} | {row['events_per_second']:,} | {lat['p50_ms']} ms | {lat['p99_ms']} ms |")
PY
echo "bench: results in $results"
