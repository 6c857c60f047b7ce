#!/usr/bin/env bash
# Reproduces the demo figures in PERF.md: runs `ferry demo --json` N times per
# configuration and prints the median of each figure (and min..max).
# Usage: scripts/perf-demo.sh [RUNS]   (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --quiet
bin=target/release/ferry
configs=(
  "idle-1GiB-aead+sha256|--memory 1GiB --dirty-rate 0 --integrity aead+sha256"
  "idle-1GiB-aead|--memory 1GiB --dirty-rate 0 --integrity aead"
  "hot64MiB-20kpps-1GiB-aead+sha256|--memory 1GiB --hot-set 64MiB --dirty-rate 20000"
  "idle-256MiB-aead+sha256|--memory 256MiB --dirty-rate 0"
  "idle-4GiB-aead+sha256|--memory 4GiB --dirty-rate 0"
  "half-zero-1GiB-aead+sha256|--memory 1GiB --dirty-rate 0 --zero-fraction 0.5"
)
echo "host: $(uname -r), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for c in "${configs[@]}"; do
  name=${c%%|*}; args=${c#*|}
  out=$(mktemp)
  for _ in $(seq "$runs"); do
    # shellcheck disable=SC2086
    "$bin" demo --json $args >>"$out"
    echo >>"$out"
  done
  python3 - "$name" "$out" <<'PY'
import json, sys, statistics
name, path = sys.argv[1], sys.argv[2]
text = open(path).read()
dec = json.JSONDecoder(); runs = []; i = 0
while i < len(text):
    while i < len(text) and text[i].isspace(): i += 1
    if i >= len(text): break
    obj, i = dec.raw_decode(text, i); runs.append(obj)
assert all(r["verified"] for r in runs), "a run did not verify"
def fig(k, scale=1.0):
    v = sorted(r[k] * scale for r in runs)
    return f"{statistics.median(v):.3g} ({v[0]:.3g}..{v[-1]:.3g})"
print(f"{name}: n={len(runs)} throughput_gbps={fig('throughput_gbps')} downtime_ms={fig('downtime_ms')} "
      f"total_ms={fig('total_ms')} rounds={fig('rounds')} engine_heap_MiB={fig('engine_heap_peak_bytes', 1/2**20)} "
      f"wire_GiB={fig('bytes_on_wire', 1/2**30)}")
PY
  rm -f "$out"
done
