#!/usr/bin/env bash
# Reproduces the comparison table of docs/benchmarks.md: Wardroom, a peer
# server on npm's `ws`, and the floor peer (one `write` per delivery and
# nothing else, benches/peers/floor), run one after the other on this machine
# with the same load generator, payload and CPU pinning (server on CPU 0,
# generator on CPU 1). Loopback only; every run stops by itself.
#
#   benches/run.sh            # everything (~8 minutes)
#   SERVERS=wardroom benches/run.sh
#   BUSY_POLL=0 benches/run.sh   # generator sleeps in epoll (see docs/benchmarks.md)
#
# Results: target/bench/*.json (one per run) and target/bench/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=target/bench
SERVERS=${SERVERS:-"wardroom node-ws floor"}
RATES=${RATES:-"125 250 500 1000"}
BUSY_POLL=${BUSY_POLL:-1}
POLL=()
if [ "$BUSY_POLL" = 1 ]; then POLL=(--busy-poll); fi
mkdir -p "$OUT"

cargo build --release -q -p wardroom -p wardroom-loadgen -p wardroom-benches --bin wardroom --bin wardroom-loadgen --bin floor-peer
if [[ " $SERVERS " == *" node-ws "* ]]; then
  (cd benches/peers/node-ws && npm ci --silent --no-audit --no-fund)
fi

PID=""
start() {
  case "$1" in
    wardroom)
      rm -rf /tmp/wardroom-bench && mkdir -p /tmp/wardroom-bench
      taskset -c 0 target/release/wardroom --config benches/bench.toml >"$OUT/$1.log" 2>&1 &
      PID=$! URL=ws://127.0.0.1:8080/ws ;;
    node-ws)
      PORT=8090 taskset -c 0 node benches/peers/node-ws/server.js >"$OUT/$1.log" 2>&1 &
      PID=$! URL=ws://127.0.0.1:8090/ws ;;
    floor)
      taskset -c 0 target/release/floor-peer 127.0.0.1:8091 >"$OUT/$1.log" 2>&1 &
      PID=$! URL=ws://127.0.0.1:8091/ws ;;
  esac
  for _ in $(seq 50); do
    if curl -s -o /dev/null "http://${URL#ws://}" 2>/dev/null || [ "$?" = 52 ]; then break; fi
    sleep 0.1
  done
  sleep 0.5
}
stop() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; sleep 1; }
loadgen() { taskset -c 1 target/release/wardroom-loadgen --url "$URL" --server-pid "$PID" --json "${POLL[@]}" "$@" | tail -n 1; }

for server in $SERVERS; do
  echo "== $server: 10,000 idle connections"
  start "$server"; loadgen --idle --clients 10000 --rooms 500 --duration 5 --connect-rate 4000 >"$OUT/$server-idle.json"; stop
  for rate in $RATES; do
    echo "== $server: 2,000 clients in one room, 10 senders, $rate msg/s"
    start "$server"
    loadgen --clients 2000 --rooms 1 --senders 10 --rate "$rate" --size 64 --warmup 3 --duration 10 \
      >"$OUT/$server-room2k-$rate.json"
    stop
  done
  echo "== $server: 10,000 clients in one room, 10 msg/s"
  start "$server"
  loadgen --clients 10000 --rooms 1 --senders 10 --rate 10 --size 64 --warmup 3 --duration 10 --connect-rate 4000 \
    >"$OUT/$server-room10k.json"
  stop
done

python3 benches/table.py "$OUT" | tee "$OUT/table.md"
