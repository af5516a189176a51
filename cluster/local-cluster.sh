#!/usr/bin/env bash
# A whole Beseda cluster on this machine, with one command:
#   3 registry voters (Raft), 2 routing nodes, 1 bots node and 2 gateways,
#   each its own `beseda serve --role …` process, on loopback, against the
#   local PostgreSQL and Redis.
# Ctrl-C (or SIGTERM) stops every process gracefully. See docs/deploy.md.
#
# Settings (environment):
#   BESEDA_POSTGRES_URL   default postgres://postgres@127.0.0.1:5432/test
#   BESEDA_REDIS_URL      default redis://127.0.0.1:6379
#   CLUSTER_SCHEMA        PostgreSQL schema for this cluster (default beseda_local)
#   CLUSTER_DATA          logs, Raft logs, mail outbox (default ./data/local-cluster)
#   CLUSTER_BUILD=0       use the existing target/release/beseda instead of building
set -euo pipefail
cd "$(dirname "$0")/.."

postgres_url="${BESEDA_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
redis_url="${BESEDA_REDIS_URL:-redis://127.0.0.1:6379}"
schema="${CLUSTER_SCHEMA:-beseda_local}"
data="${CLUSTER_DATA:-./data/local-cluster}"
binary=target/release/beseda

fail() { echo "local-cluster: $*" >&2; exit 1; }

command -v psql >/dev/null && { psql "$postgres_url" -qAtc 'select 1' >/dev/null 2>&1 \
    || fail "PostgreSQL at $postgres_url does not answer; start it or set BESEDA_POSTGRES_URL"; }
command -v redis-cli >/dev/null && { redis-cli -u "$redis_url" ping >/dev/null 2>&1 \
    || fail "Redis at $redis_url does not answer; start it or set BESEDA_REDIS_URL"; }

if [[ "${CLUSTER_BUILD:-1}" != 0 ]]; then
    cargo build --release -p beseda
fi
[[ -x "$binary" ]] || fail "$binary is missing; build it with cargo build --release -p beseda"

mkdir -p "$data"
token="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
pids=()
names=()

# stop_all STATUS: stops everything, then exits with STATUS (0 after Ctrl-C,
# the failure's own status after fail() or a process that exited by itself).
stop_all() {
    local status=$1
    trap - INT TERM EXIT
    echo
    echo "stopping: gateways first (clients are told to reconnect), then the rest"
    local index
    for index in "${!pids[@]}"; do
        if [[ "${names[$index]}" == gateway-* ]]; then kill -TERM "${pids[$index]}" 2>/dev/null || true; fi
    done
    for index in "${!pids[@]}"; do
        if [[ "${names[$index]}" == gateway-* ]]; then wait "${pids[$index]}" 2>/dev/null || true; fi
    done
    for index in "${!pids[@]}"; do
        kill -TERM "${pids[$index]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    echo "stopped; logs are in $data"
    exit "$status"
}
trap 'stop_all 0' INT TERM
trap 'stop_all $?' EXIT

# start NAME HTTP_PORT GRPC_PORT VAR=VALUE...
start() {
    local name=$1 http=$2 grpc=$3
    shift 3
    env -i PATH="$PATH" HOME="${HOME:-/tmp}" \
        BESEDA_NODE_ID="$name" \
        BESEDA_LISTEN="127.0.0.1:$http" \
        BESEDA_GRPC_LISTEN="127.0.0.1:$grpc" \
        BESEDA_DATA_DIR="$data/$name" \
        BESEDA_CLUSTER_TOKEN="$token" \
        BESEDA_LOG="${BESEDA_LOG:-info}" \
        "$@" "$binary" serve >>"$data/$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
}

wait_healthy() {
    local name=$1 http=$2
    for _ in $(seq 1 300); do
        if curl -fsS "http://127.0.0.1:$http/rs/health" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    fail "$name did not become healthy; see $data/$name.log"
}

peers="1=http://127.0.0.1:9191,2=http://127.0.0.1:9192,3=http://127.0.0.1:9193"
for id in 1 2 3; do
    start "registry-$id" "819$id" "919$id" BESEDA_ROLES=registry BESEDA_REGISTRY_ID="$id" \
        BESEDA_REGISTRY_PEERS="$peers" BESEDA_REDIS_URL="$redis_url"
done

store=(BESEDA_POSTGRES_URL="$postgres_url" BESEDA_POSTGRES_SCHEMA="$schema" BESEDA_REDIS_URL="$redis_url"
    BESEDA_OUTBOX_DIR="$data/outbox" BESEDA_PUBLIC_URL="http://127.0.0.1:8087")
# The first routing node creates the schema; the second waits for it.
start routing-1 8201 9201 BESEDA_ROLES=routing "${store[@]}"
wait_healthy routing-1 8201
start routing-2 8202 9202 BESEDA_ROLES=routing "${store[@]}"

routing_endpoints="http://127.0.0.1:9201,http://127.0.0.1:9202"
start bots-1 8211 9211 BESEDA_ROLES=bots BESEDA_ROUTING_ENDPOINTS="$routing_endpoints" "${store[@]}"

for index in 1 2; do
    http=$((8086 + index))
    start "gateway-$index" "$http" "922$index" BESEDA_ROLES=gateway \
        BESEDA_REDIS_URL="$redis_url" \
        BESEDA_ROUTING_ENDPOINTS="$routing_endpoints" \
        BESEDA_BOTS_ENDPOINTS="http://127.0.0.1:9211" \
        BESEDA_REGISTRY_ENDPOINTS="http://127.0.0.1:9191,http://127.0.0.1:9192,http://127.0.0.1:9193"
done

wait_healthy registry-1 8191
wait_healthy registry-2 8192
wait_healthy registry-3 8193
wait_healthy routing-2 8202
wait_healthy bots-1 8211
wait_healthy gateway-1 8087
wait_healthy gateway-2 8088

cat <<EOF

Beseda cluster is up (${#pids[@]} processes, PostgreSQL schema "$schema").
  Gateways:   http://127.0.0.1:8087  http://127.0.0.1:8088   (WebSocket: ws://127.0.0.1:8087/ws, ws://127.0.0.1:8088/ws)
  Routing:    gRPC 127.0.0.1:9201, 127.0.0.1:9202   health http://127.0.0.1:8201/rs/health
  Bots:       gRPC 127.0.0.1:9211                   health http://127.0.0.1:8211/rs/health
  Registry:   gRPC 127.0.0.1:9191-9193              status: $binary ctl registry status --endpoint http://127.0.0.1:9191
  Mail:       $data/outbox     Logs: $data/*.log
Press Ctrl-C to stop everything.
EOF

# Runs until Ctrl-C, or until a process exits on its own.
wait -n "${pids[@]}" || true
for index in "${!pids[@]}"; do
    if ! kill -0 "${pids[$index]}" 2>/dev/null; then
        echo "local-cluster: ${names[$index]} exited; see $data/${names[$index]}.log" >&2
    fi
done
exit 1
