#!/bin/sh
# The entry point of Myelin's Complement image (complement/Dockerfile).
#
# Complement starts every homeserver container with SERVER_NAME set (hs1,
# hs2, ...), after copying its certificate authority into the container
# (ca/ca.crt and ca/ca.key) and, for tests with application services,
# their registration files (appservice/*.yaml). It may start one container
# several times: a blueprint's container is committed to an image and
# started again. So at each start this script makes everything anew but
# the database: a key and a certificate for SERVER_NAME signed by
# Complement's authority, and Myelin's configuration file. Then Myelin
# takes its place (exec), so that it receives the container's signals.
#
# The configuration is what Complement's tests rely on: the client API on
# plain HTTP, the federation API on HTTPS, open registration, the shared
# secret "complement" for /_synapse/admin/v1/register, no rate limits,
# Complement's authority trusted for outbound federation, and private
# addresses reachable (the other containers and Complement's own servers
# are on a private network).
#
# Environment:
#   SERVER_NAME      required: the server name Complement gives.
# The rest default to what Complement expects; they exist so that a test
# can run this script without Docker (tests/complement.rs):
#   COMPLEMENT_DIR   where Complement's files are (/complement)
#   DATA_DIR         where the configuration, the TLS files and the
#                    database go (/data)
#   SERVER_BINARY    the Myelin binary (myelin, found on PATH)
#   LISTEN_ADDRESS   the address both listeners bind (0.0.0.0; an IPv6
#                    address goes in brackets: [::])
#   CLIENT_PORT      the client API's port (8008)
#   FEDERATION_PORT  the federation API's port (8448)
# Myelin reads MYELIN_* variables too, over the file written here.
set -eu

fail() {
    echo "complement-entrypoint: $*" >&2
    exit 1
}

# A value that goes into the configuration file between double quotes:
# only the characters of server names, addresses and ports.
check_plain() {
    case $2 in
        '') fail "$1 is empty" ;;
    esac
    rest=$(printf '%s' "$2" | tr -d 'A-Za-z0-9.:\133\135-')
    [ -z "$rest" ] || fail "$1 ($2) has characters it cannot have"
}

check_port() {
    case $2 in
        '' | *[!0-9]*) fail "$1 ($2) is not a port number" ;;
    esac
}

# A path that goes into the configuration file between single quotes.
check_path() {
    case $2 in
        '') fail "$1 is empty" ;;
        *\'*) fail "$1 ($2) has a ' in it" ;;
    esac
}

[ -n "${SERVER_NAME:-}" ] || fail "SERVER_NAME is not set"
complement_dir=${COMPLEMENT_DIR:-/complement}
data_dir=${DATA_DIR:-/data}
binary=${SERVER_BINARY:-myelin}
listen_address=${LISTEN_ADDRESS:-0.0.0.0}
client_port=${CLIENT_PORT:-8008}
federation_port=${FEDERATION_PORT:-8448}

check_plain SERVER_NAME "$SERVER_NAME"
check_plain LISTEN_ADDRESS "$listen_address"
check_port CLIENT_PORT "$client_port"
check_port FEDERATION_PORT "$federation_port"
check_path COMPLEMENT_DIR "$complement_dir"
check_path DATA_DIR "$data_dir"

ca_certificate=$complement_dir/ca/ca.crt
ca_key=$complement_dir/ca/ca.key
[ -r "$ca_certificate" ] && [ -r "$ca_key" ] ||
    fail "Complement's certificate authority is missing: $ca_certificate, $ca_key"

# The certificate names the host of SERVER_NAME (without its port, if it
# has one): a DNS name, or an IP address for an IP literal. It names
# localhost too, for a client that reaches the port from the same host.
case $SERVER_NAME in
    \[*)
        host=${SERVER_NAME#\[}
        host=${host%%\]*}
        ;;
    *:*) host=${SERVER_NAME%:*} ;;
    *) host=$SERVER_NAME ;;
esac
case $host in
    *:*) names="IP:$host" ;;
    *[!0-9.]*) names="DNS:$host" ;;
    *) names="IP:$host" ;;
esac
[ "$host" = localhost ] || names="$names, DNS:localhost"

tls_dir=$data_dir/tls
mkdir -p "$tls_dir"
cat >"$tls_dir/openssl.cnf" <<EOF
[req]
prompt = no
distinguished_name = subject

[subject]
CN = $host

[server]
basicConstraints = critical, CA:FALSE
extendedKeyUsage = serverAuth
subjectAltName = $names
EOF
(
    umask 077
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
        -out "$tls_dir/server.key"
)
openssl req -new -config "$tls_dir/openssl.cnf" -key "$tls_dir/server.key" \
    -out "$tls_dir/server.csr"
# A random serial number: every start signs a new certificate.
openssl x509 -req -in "$tls_dir/server.csr" \
    -CA "$ca_certificate" -CAkey "$ca_key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 30 -sha256 \
    -extfile "$tls_dir/openssl.cnf" -extensions server \
    -out "$tls_dir/server.crt"
rm -f "$tls_dir/server.csr"

# Complement's application services, when the test has any.
registration_files=""
for file in "$complement_dir"/appservice/*.yaml; do
    # Without a match the pattern stays as it is.
    [ -f "$file" ] || continue
    check_path "an application service registration file" "$file"
    registration_files="$registration_files${registration_files:+, }'$file'"
done

config=$data_dir/myelin.toml
cat >"$config" <<EOF
# Written by complement/entrypoint.sh at every start of the container.
server_name = "$SERVER_NAME"
listen = "$listen_address:$client_port"
data_dir = '$data_dir/server'
registration = "open"
# Complement registers its admin users with this secret.
registration_shared_secret = "complement"
# Complement's tests register, log in and fail to log in in quick bursts.
rate_limits = false

[server_notices]
# Complement's server notice tests expect the sender @_server:SERVER_NAME.
enabled = true
localpart = "_server"

[password_hashing]
# Cheap hashes: the accounts live as long as one test, and Complement
# makes hundreds of them (Synapse's Complement image lowers its bcrypt
# rounds likewise).
memory_kib = 64
iterations = 1

[media]
# Complement's web servers for previews are on the host, a private address.
url_previews = true
url_preview_private_addresses = true

[federation]
listen = "$listen_address:$federation_port"
tls_certificate = '$tls_dir/server.crt'
tls_private_key = '$tls_dir/server.key'
# The other homeservers, and Complement's own servers, have certificates
# of Complement's authority.
ca_certificates = '$ca_certificate'
# They are all on private addresses (Docker's networks and its host).
# Push gateways are allowed by the same (empty) list.
ip_range_denylist = []

[appservices]
registration_files = [$registration_files]
EOF

echo "complement-entrypoint: starting Myelin as $SERVER_NAME" \
    "(client API on port $client_port, federation on port $federation_port)" >&2
exec "$binary" serve --config "$config"
