"""Turns the JSON lines of benches/run.sh into the Markdown table of docs/benchmarks.md."""
import glob
import json
import os
import sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    return json.loads(text) if text else None


def ms(run, key):
    return f"{run['latency_us'][key] / 1000:.1f}"


servers = sorted({os.path.basename(p).split("-idle")[0] for p in glob.glob(os.path.join(out, "*-idle.json"))})
print("| server | idle RSS / connection (10k) | 2k room: offered → delivered/s, ratio, p50 / p99 ms, server CPU | 10k room, 100k deliveries/s: p50 / p99 ms |")
print("|---|---|---|---|")
for server in servers:
    idle = load(f"{server}-idle.json")
    per_conn = f"{idle['server']['rss_per_conn_kib']:.2f} KiB" if idle and idle['server'].get('rss_per_conn_kib') else "–"
    sweep = []
    for path in sorted(glob.glob(os.path.join(out, f"{server}-room2k-*.json")), key=lambda p: int(p.rsplit("-", 1)[1][:-5])):
        run = load(os.path.basename(path))
        if not run:
            continue
        sweep.append(
            f"{run['offered_deliveries_per_s'] / 1e6:.2f}M → {run['delivered_per_s'] / 1e6:.2f}M, "
            f"{run['delivery_ratio']:.3f}, {ms(run, 'p50')} / {ms(run, 'p99')}, {run['server']['cpu_pct']:.0f} %"
        )
    room = load(f"{server}-room10k.json")
    big = f"{ms(room, 'p50')} / {ms(room, 'p99')} (ratio {room['delivery_ratio']:.3f})" if room else "–"
    print(f"| {server} | {per_conn} | {'<br>'.join(sweep) or '–'} | {big} |")
