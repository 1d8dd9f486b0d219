#!/usr/bin/env bash
# The one script for a GPU machine (no cargo there: build here with NVCC set, carry the binary).
#
#   NVCC=$(scripts/setup-cuda.sh | sed -n 's/^NVCC=//p') cargo build --release
#   # on the GPU machine, in the repository root, with target/release/loraxfer carried:
#   OUT=/some/dir scripts/gpu-check.sh [--full]
#
# 1. loraxfer info (driver, GPU, kernels)
# 2. loraxfer selftest --device cuda --bench: every kernel against the CPU reference on fresh
#    random inputs, then kernel timings on Qwen2.5-1.5B-shaped batches
# 3. a transfer between Qwen2.5-1.5B- and Llama-3.2-3B-shaped synthetic checkpoints (4 layers;
#    --full: all 28) on CPU, on GPU, and on GPU without tensor cores, comparing reports and adapters
# 4. the same GPU transfer under nsys, when nsys is installed
# Everything goes under $OUT (default ./gpu-check-out); a short table is printed last.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${LORAXFER_BIN:-$root/target/release/loraxfer}"
OUT="${OUT:-$root/gpu-check-out}"
layers=4
[[ ${1:-} == --full ]] && layers=28
mkdir -p "$OUT"
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
summary="$OUT/summary.txt"
: >"$summary"
note() { printf '%-44s %s\n' "$1" "$2" | tee -a "$summary" >/dev/null; }
[[ -x $BIN ]] || { echo "gpu-check.sh: no binary at $BIN" >&2; exit 2; }

"$BIN" info >"$OUT/info.txt" 2>&1
note "info" "$(grep -E '^gpu 0|driver' "$OUT/info.txt" | head -1)"
grep -q "auto picks: cuda" "$OUT/info.txt" && note "--device auto" "cuda" || note "--device auto" "NOT cuda: $(grep 'auto picks' "$OUT/info.txt")"

start=$(date +%s)
"$BIN" selftest --device cuda --bench >"$OUT/selftest.txt" 2>&1
rc=$?
note "selftest (cuda, fresh seed)" "$(grep '^selftest:' "$OUT/selftest.txt" | tail -1) rc=$rc, $(( $(date +%s) - start )) s"

"$BIN" synth model --like qwen2.5-1.5b --layers $layers --out "$W/src" >/dev/null
"$BIN" synth model --like llama-3.2-3b --layers $layers --out "$W/tgt" --seed 1 >/dev/null
"$BIN" synth adapter --base "$W/src" --out "$W/ad" >/dev/null
# Wall time and peak RSS: /usr/bin/time when the machine has it, else the wall time alone.
TIME_BIN="${TIME_BIN:-/usr/bin/time}"
measured() {
  local log=$1; shift
  if [[ -x $TIME_BIN ]]; then
    "$TIME_BIN" -v "$@" >"$log" 2>&1
  else
    local t0 rc
    t0=$(date +%s%N)
    "$@" >"$log" 2>&1; rc=$?
    local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    printf 'Elapsed (wall clock) time: %d.%03ds\n' $((ms / 1000)) $((ms % 1000)) >>"$log"
    return $rc
  fi
}
for run in cpu cuda cuda-no-tc; do
  dev=${run%%-*}
  settings=()
  [[ $run == cuda-no-tc ]] && settings=(LORAXFER_NO_TENSOR_CORES=1)
  measured "$OUT/transfer-$run.txt" env "${settings[@]}" "$BIN" transfer --source-base "$W/src" \
    --target-base "$W/tgt" --adapter "$W/ad" --out "$OUT/transfer-$run" --device $dev --mode align \
    --rank 256 --timings --force
  note "transfer $run (${layers} layers, align, k=256)" "rc=$? $(grep -E 'Elapsed \(wall' "$OUT/transfer-$run.txt" | awk '{print $NF}') wall, peak RSS $(grep 'Maximum resident' "$OUT/transfer-$run.txt" | awk '{print $NF}') KiB"
done
cat >"$W/compare.py" <<'PY'
import json, sys
from safetensors.numpy import load_file
a, b = (load_file(f"{d}/adapter_model.safetensors") for d in sys.argv[1:3])
ra, rb = (json.load(open(f"{d}/transfer_report.json")) for d in sys.argv[1:3])
worst = max((abs(a[k].astype("f8") - b[k].astype("f8")).max() / (abs(a[k].astype("f8")).max() + 1e-30), k) for k in a)
gaps = [abs((x["gap_target"] or 0) - (y["gap_target"] or 0)) for x, y in zip(ra["modules"], rb["modules"])]
print(f"tensors {len(a)} (same keys: {sorted(a) == sorted(b)}); worst relative difference {worst[0]:.2e} ({worst[1]})")
print(f"report rows {len(ra['modules'])}; largest |gap_target difference| {max(gaps):.2e}")
print("timings_ms", sys.argv[1], ra["timings_ms"]); print("timings_ms", sys.argv[2], rb["timings_ms"])
PY
python3 "$W/compare.py" "$OUT/transfer-cpu" "$OUT/transfer-cuda" >"$OUT/compare.txt" 2>&1
python3 "$W/compare.py" "$OUT/transfer-cpu" "$OUT/transfer-cuda-no-tc" >"$OUT/compare-no-tc.txt" 2>&1
note "cpu vs cuda adapters" "$(head -1 "$OUT/compare.txt")"
note "cpu vs cuda (no tensor cores) adapters" "$(head -1 "$OUT/compare-no-tc.txt")"

if command -v nsys >/dev/null; then
  nsys profile -o "$OUT/transfer-cuda" --trace cuda,nvtx --force-overwrite true \
    "$BIN" transfer --source-base "$W/src" --target-base "$W/tgt" --adapter "$W/ad" \
    --out "$W/nsys-out" --device cuda --mode align --rank 256 >"$OUT/nsys.txt" 2>&1
  note "nsys profile" "rc=$? -> transfer-cuda.nsys-rep"
else
  note "nsys profile" "nsys not installed"
fi
echo "== gpu-check summary (details under $OUT) =="
cat "$summary"
sed -n '/^kernel .*TFLOP/,$p' "$OUT/selftest.txt"
