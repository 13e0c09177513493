#!/usr/bin/env bash
# Acknowledged throughput through the server ("Through the server" in
# docs/benchmarks.md): 50 clients in one room, all 50 sending, every message
# acknowledged after its commit, SQLite with synchronous = "normal". Nothing
# is pinned: the server and the generator share the machine. Loopback only;
# every run stops by itself.
#
#   benches/acked.sh                              # workers 1 and 2, 10k..50k msg/s
#   WORKERS=1 RATES="40000 50000" benches/acked.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=target/bench
WORKERS=${WORKERS:-"1 2"}
RATES=${RATES:-"10000 20000 30000 40000 50000"}
mkdir -p "$OUT"
cargo build --release -q -p wardroom -p wardroom-loadgen

# CPU time (ticks) of each thread of $1, as "tid name ticks" lines.
thread_ticks() {
  for task in /proc/"$1"/task/*; do
    echo "${task##*/} $(tr ' ' '_' <"$task/comm") $(awk '{print $14 + $15}' "$task/stat")"
  done 2>/dev/null | sort
}

for workers in $WORKERS; do
  sed "s/^workers = 1/workers = $workers/" benches/bench.toml >"$OUT/acked-w$workers.toml"
  for rate in $RATES; do
    rm -rf /tmp/wardroom-bench && mkdir -p /tmp/wardroom-bench
    target/release/wardroom --config "$OUT/acked-w$workers.toml" >"$OUT/acked.log" 2>&1 &
    pid=$!
    for _ in $(seq 50); do
      if curl -s -o /dev/null http://127.0.0.1:8080/healthz; then break; fi
      sleep 0.1
    done
    # Per-thread CPU over 5 s of the measured window (warm-up is 3 s).
    (sleep 6; thread_ticks "$pid" >"$OUT/acked-ticks0"; sleep 5; thread_ticks "$pid" >"$OUT/acked-ticks1") &
    sampler=$!
    echo "== workers = $workers, $rate msg/s"
    target/release/wardroom-loadgen --url ws://127.0.0.1:8080/ws --clients 50 --rooms 1 --senders 50 \
      --rate "$rate" --size 64 --warmup 3 --duration 10 --ack --server-pid "$pid" 2>"$OUT/acked-loadgen.log" |
      grep -E '^(deliveries|latency|acks|server|loadgen|problems)'
    wait "$sampler" || true
    echo "threads      $(join "$OUT/acked-ticks0" "$OUT/acked-ticks1" 2>/dev/null |
      awk '$5 > $3 {printf "%s %d %%  ", $2, ($5 - $3) / 5}')"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
done
