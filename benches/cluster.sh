#!/usr/bin/env bash
# Cross-node delivery, side by side (docs/benchmarks.md, "Two nodes"): the
# same load against
#   sqlite     one node, the embedded SQLite store (the default)
#   postgres   one node, the PostgreSQL store
#   cluster    two nodes over Redis, sharing the PostgreSQL store; odd-numbered
#              clients on the second node, so every message crosses nodes
# 200 clients in 2 rooms, 20 senders, every sender waiting for its acks
# (`--ack`), at each rate of $RATES messages/s. Needs Redis on 127.0.0.1:6379
# and PostgreSQL on 127.0.0.1:5432 (database `test`). Loopback only; every run
# stops by itself. Nothing is pinned: the nodes, Redis, PostgreSQL and the
# generator share the machine's cores.
#
#   benches/cluster.sh
#   RATES="2000" SETUPS="cluster" benches/cluster.sh
#
# Results: target/bench/cluster-*.txt (the generator's report of each run).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=target/bench
RATES=${RATES:-"2000 5000"}
SETUPS=${SETUPS:-"sqlite postgres cluster"}
PG=${PG:-postgres://postgres@127.0.0.1:5432/test}
SCHEMA=wardroom_bench
PREFIX=wardroom-bench
DIR=/tmp/wardroom-cluster-bench
mkdir -p "$OUT"

cargo build --release -q -p wardroom -p wardroom-loadgen

reset_shared_state() {
  psql -q "$PG" -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE; CREATE SCHEMA $SCHEMA;" >/dev/null
  redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "$PREFIX:*" | xargs -r redis-cli -h 127.0.0.1 -p 6379 del >/dev/null
}

# config PORT STORE_TOML CLUSTER_TOML
config() {
  cat <<EOF
[server]
bind = "127.0.0.1:$1"
workers = 1
max_connections = 19000
max_connections_per_ip = 19000

[rooms]
max_members = 20000
history_on_join = 0

[limits]
outbound_queue = 4096

[store]
$2

[log]
level = "warn"
$3
EOF
}

PIDS=()
start_node() { # PORT STORE CLUSTER
  config "$1" "$2" "$3" >"$DIR/node-$1.toml"
  target/release/wardroom --config "$DIR/node-$1.toml" >"$DIR/node-$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/readyz")" = 200 ]; then return; fi
    sleep 0.1
  done
  echo "node on port $1 did not become ready; see $DIR/node-$1.log" >&2
  exit 1
}
stop_nodes() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
  sleep 1
}
trap stop_nodes EXIT

pg_url="$PG?options=-csearch_path%3D$SCHEMA"
for setup in $SETUPS; do
  for rate in $RATES; do
    rm -rf "$DIR" && mkdir -p "$DIR"
    reset_shared_state
    also=()
    case "$setup" in
      sqlite)
        start_node 8081 "path = \"$DIR/wardroom.db\"
synchronous = \"normal\"" "" ;;
      postgres)
        start_node 8081 "url = \"$pg_url\"" "" ;;
      cluster)
        cluster="[cluster]
broker = \"redis://127.0.0.1:6379\"
prefix = \"$PREFIX\""
        start_node 8081 "url = \"$pg_url\"" "$cluster"
        start_node 8082 "url = \"$pg_url\"" "$cluster"
        also=(--also-port 8082) ;;
    esac
    echo "== $setup: 200 clients in 2 rooms, 20 senders, $rate msg/s, acks"
    target/release/wardroom-loadgen --port 8081 "${also[@]}" --clients 200 --rooms 2 --senders 20 \
      --rate "$rate" --size 64 --warmup 3 --duration 10 --ack --server-pid "${PIDS[0]}" \
      | tee "$OUT/cluster-$setup-$rate.txt"
    stop_nodes
  done
done
psql -q "$PG" -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE;" >/dev/null
