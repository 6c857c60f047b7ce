#!/usr/bin/env bash
# Reproduces the demo figures in PERF.md: runs `ferry demo --json` N times per
# configuration, interleaving the configurations (run 1 of each, then run 2
# of each, ...) so that a machine whose speed drifts affects all alike, and
# prints the median of each figure (and min..max).
# Usage: scripts/perf-demo.sh [RUNS] [FILTER]
#   RUNS   runs per configuration (default 5)
#   FILTER only configurations whose name matches this extended regex
# FERRY_BINS="old/ferry new/ferry" compares builds: each run of each
# configuration runs every binary in turn (an A/B within one session), and
# each figure is printed per binary (name@1, name@2, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
filter=${2:-.}
if [[ -n ${FERRY_BINS:-} ]]; then
  read -r -a bins <<<"$FERRY_BINS"
else
  cargo build --release --quiet
  bins=(target/release/ferry)
fi
all=(
  "syn-idle-1GiB-aead+sha256|--guest synthetic --memory 1GiB --dirty-rate 0 --integrity aead+sha256"
  "syn-idle-1GiB-aead|--guest synthetic --memory 1GiB --dirty-rate 0 --integrity aead"
  "syn-idle-2GiB-aead+sha256|--guest synthetic --memory 2GiB --dirty-rate 0 --integrity aead+sha256"
  "syn-idle-2GiB-aead|--guest synthetic --memory 2GiB --dirty-rate 0 --integrity aead"
  "syn-hot64MiB-20kpps-1GiB|--guest synthetic --memory 1GiB --hot-set 64MiB --dirty-rate 20000"
  "syn-idle-256MiB|--guest synthetic --memory 256MiB --dirty-rate 0"
  "syn-idle-4GiB|--guest synthetic --memory 4GiB --dirty-rate 0"
  "syn-half-zero-1GiB|--guest synthetic --memory 1GiB --dirty-rate 0 --zero-fraction 0.5"
  "kvm-idle-1GiB|--guest kvm --memory 1GiB --dirty-rate 0"
  "kvm-hot64MiB-20kpps-1GiB|--guest kvm --memory 1GiB --hot-set 64MiB --dirty-rate 20000"
  "kvm-idle-1GiB-kick|--guest kvm --memory 1GiB --dirty-rate 0 --kick-pause"
  "kvm-hot64MiB-20kpps-1GiB-kick|--guest kvm --memory 1GiB --hot-set 64MiB --dirty-rate 20000 --kick-pause"
  "syn-heavy-768MiB-400kpps-throttle|--guest synthetic --memory 1GiB --hot-set 768MiB --dirty-rate 400000 --downtime-ms-max 50 --converge throttle"
  "kvm-hot32MiB-flatout-5ms-throttle|--guest kvm --memory 256MiB --hot-set 32MiB --dirty-rate 1000000 --downtime-ms-max 5 --converge throttle"
  "syn-idle-1GiB-cap200MB|--guest synthetic --memory 1GiB --dirty-rate 0 --max-bandwidth 200MB/s"
)
configs=()
for c in "${all[@]}"; do
  if [[ ${c%%|*} =~ $filter ]]; then configs+=("$c"); fi
done
echo "host: $(uname -r), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for _ in $(seq "$runs"); do
  for c in "${configs[@]}"; do
    name=${c%%|*}; args=${c#*|}
    for b in "${!bins[@]}"; do
      out="$dir/$name@$((b + 1))"
      # shellcheck disable=SC2086
      "${bins[$b]}" demo --json $args >>"$out"
      echo >>"$out"
    done
  done
done
for b in "${!bins[@]}"; do
  echo "binary @$((b + 1)): ${bins[$b]}"
done
for c in "${configs[@]}"; do
  for b in "${!bins[@]}"; do
  name="${c%%|*}@$((b + 1))"
  python3 - "$name" "$dir/$name" <<'PY'
import json, sys, statistics
name, path = sys.argv[1], sys.argv[2]
text = open(path).read()
dec = json.JSONDecoder(); runs = []; i = 0
while i < len(text):
    while i < len(text) and text[i].isspace(): i += 1
    if i >= len(text): break
    obj, i = dec.raw_decode(text, i); runs.append(obj)
assert all(r["verified"] for r in runs), "a run did not verify"
def show(v):
    v = sorted(v)
    return f"{statistics.median(v):.3g} ({v[0]:.3g}..{v[-1]:.3g})"
def fig(k, scale=1.0):
    return show([r[k] * scale for r in runs])
live = [x["dirty_scan_ms"] for r in runs for x in r["round_detail"] if not x["is_final"]]
final = [x["dirty_scan_ms"] for r in runs for x in r["round_detail"] if x["is_final"]]
print(f"{name}: n={len(runs)} guest={runs[0]['guest']} throughput_gbps={fig('throughput_gbps')} "
      f"downtime_ms={fig('downtime_ms')} guest_stop_ms={fig('guest_stop_ms')} total_ms={fig('total_ms')} "
      f"rounds={fig('rounds')} dirty_scan_ms(live rounds)={show(live)} dirty_scan_ms(final)={show(final)} "
      f"engine_heap_MiB={fig('engine_heap_peak_bytes', 1/2**20)} wire_GiB={fig('bytes_on_wire', 1/2**30)}")
if "throttle_max" in runs[0]:
    first = [r["round_detail"][0] for r in runs]
    wire_rate = [x["bytes_on_wire"] / (x["duration_ms"] / 1e3) / 1e6 for x in first]
    print(f"  convergence: throttle_max={fig('throttle_max')} expected_downtime_ms={fig('expected_downtime_ms')} "
          f"exceeded={sum(r['downtime_exceeded'] for r in runs)}/{len(runs)} first_round_wire_MB_per_s={show(wire_rate)}")
PY
  done
done
