#!/usr/bin/env bash
# The one script for a GPU machine (it needs no cargo: build with nvcc on any machine, then carry
# the binary).
#
#   Build (with nvcc; no debug info, stripped, so the binary is small to carry):
#     NVCC=$(scripts/setup-cuda.sh | sed -n 's/^NVCC=//p') CARGO_PROFILE_RELEASE_DEBUG=0 \
#       cargo build --release && strip target/release/loraxfer
#   Run (on the GPU machine, in the repository root, with target/release/loraxfer carried):
#     OUT=/some/dir scripts/gpu-check.sh [--quick]
#   Rehearse (without a GPU: the --quick run with every device step on the kernel emulator and
#   PyTorch on the CPU, so the script itself, its comparisons and the baseline are exercised
#   before a GPU run; PYTHON names an interpreter with torch and safetensors):
#     PYTHON=.venv/bin/python OUT=/some/dir scripts/gpu-check.sh --rehearse
#
# Every step runs under `timeout` and a failing step does not stop the others. The whole run keeps
# to a deadline (BUDGET seconds, default 400; 240 with --quick): each step's limit is cut to what
# is left of it and a step with under 5 s left is skipped, the most telling steps first. The logs
# are packed after every step, so a run killed from outside still brings back all it finished.
# Typically far less on an H100/H200 with 16 cores; a failing selftest adds two reruns of at most
# 45 s. --quick: 1-layer models; no kernel timings, k = 256 transfers, racecheck or nsys.
#  1. probe (uname, glibc, nvidia-smi: the card and driver, tools, torch) and loraxfer info:
#     driver, GPU, memory path, and one kernel run against the CPU
#  2. selftest --device cuda: every kernel against the CPU reference, fresh seed, including the
#     production-size SVD; on a failure it is rerun with the same seed, with CUDA_LAUNCH_BLOCKING=1
#     (so the failing kernel is named) and once with LORAXFER_NO_TENSOR_CORES=1
#  3. Qwen2.5-1.5B -> Llama-3.2-3B-shaped synthetic transfers (4 layers, --quick 1): pass/fail of
#     GPU (with and without tensor cores) against CPU at k = 16, q = 12, where the subspaces are
#     resolved. The PyTorch baseline (bench/torch_transfer.py, torch and safetensors only) runs on
#     the same GPU and inputs, side by side.
#  4. selftest --quick --no-production --bench: kernel timings on Qwen2.5-1.5B-shaped batches
#  5. the same at k = 256 (no gap in synthetic spectra: differences of 1e-3..1e-1 are expected, so
#     the comparisons are informative only), then nsys on the k = 256 GPU transfer
#  6. compute-sanitizer synccheck and racecheck on selftest --quick --no-production, when installed
# Exits 1 when a selftest or a pass/fail comparison failed (every step still ran).
# $OUT gets 6 files: summary.txt, probe.txt, info.txt, selftest.txt, bench.txt,
# logs.tar.gz (all other logs and reports). Models and transfer outputs go to $WORK (a temporary
# directory).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${LORAXFER_BIN:-$root/target/release/loraxfer}"
OUT="${OUT:-$root/gpu-check-out}"
TOL="${TOL:-1e-3}"
PY="${PYTHON:-python3}"
quick=0 rehearse=0
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    --rehearse) quick=1 rehearse=1 ;;
    *) echo "usage: scripts/gpu-check.sh [--quick | --rehearse]" >&2; exit 2 ;;
  esac
done
# The device the steps run on, PyTorch's, and how much longer than on a GPU each step may take.
dev=cuda torch_dev=cuda slow=1 source_like=qwen2.5-1.5b target_like=llama-3.2-3b
# The emulator computes a GPU's work on one core (each tensor-core tile 32 times over): tiny
# models, so the rehearsal exercises the script, not the speed.
((rehearse)) && dev=emulator torch_dev=cpu slow=4 source_like=tiny-qwen2 target_like=tiny-llama
layers=$((quick ? 1 : 4))
budget="${BUDGET:-$((quick ? 240 : 400))}"
# compute-sanitizer and nsys live beside nvcc when the toolkit's bin is not on PATH.
nvcc_bin="$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")"
PATH="$PATH:$nvcc_bin:${CUDA_HOME:-/usr/local/cuda}/bin"
mkdir -p "$OUT"
W="${WORK:-$(mktemp -d)}"
[[ -n ${WORK:-} ]] || trap 'rm -rf "$W"' EXIT
L="$W/logs"
mkdir -p "$L"
summary="$OUT/summary.txt"
: >"$summary"
note() { printf '%-46s %s\n' "$1" "$2" | tee -a "$summary"; }
# A carried binary may have lost its executable bit on the way.
[[ -f $BIN && ! -x $BIN ]] && chmod +x "$BIN" 2>/dev/null
[[ -x $BIN ]] || { echo "gpu-check.sh: no binary at $BIN" >&2; exit 2; }
t_start=$(date +%s)
deadline=$((t_start + budget * slow))
failed_checks=0  # failed selftests and pass/fail comparisons: the exit status

# Everything but the profile itself, into $OUT: after every step, so nothing finished is lost.
# Written aside and renamed, so a run killed mid-tar still leaves the previous whole archive.
pack() {
  tar -czf "$OUT/.logs.tar.gz.part" --exclude='*.nsys-rep' --exclude='*.sqlite' -C "$W" logs 2>/dev/null &&
    mv -f "$OUT/.logs.tar.gz.part" "$OUT/logs.tar.gz"
}
# step SECONDS LOG CMD...: runs CMD under timeout into LOG, the limit cut to what is left of the
# deadline (skipped, rc 125, when under 5 s are); sets $rc and $secs.
step() {
  local limit=$(($1 * slow)) log=$2; shift 2
  local left=$((deadline - $(date +%s) - 5))
  ((left < limit)) && limit=$left
  skipped=0
  if ((limit < 5)); then
    echo "gpu-check.sh: skipped, the run's ${budget}s budget is spent" >"$log"
    rc=125 secs=0 skipped=1
    return $rc
  fi
  local t0; t0=$(date +%s%N)
  timeout -k 5 "$limit" "$@" >"$log" 2>&1; rc=$?
  secs=$(awk -v n="$(( $(date +%s%N) - t0 ))" 'BEGIN { printf "%.1f", n / 1e9 }')
  [[ $rc == 124 || $rc == 137 ]] && echo "gpu-check.sh: timed out after ${limit}s" >>"$log"
  pack
  return $rc
}
status() {
  ((skipped)) && { echo "SKIPPED (budget)"; return; }
  case $rc in 0) echo ok;; 124|137) echo "TIMEOUT";; *) echo "FAILED rc=$rc";; esac
}

# What machine this is: the card and its driver (the kernels are built by nvcc 13.0 and need a
# driver that runs CUDA 13), the C library the binary needs (glibc 2.34 or later), the tools.
step 30 "$OUT/probe.txt" bash -c "uname -a; nproc; ldd --version | head -1; nvidia-smi;
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  command -v nvcc compute-sanitizer nsys; '$PY' -c 'import torch, safetensors; print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.is_available())'"
note "probe ($(status), ${secs}s)" "$(grep -A1 '^name, driver_version' "$OUT/probe.txt" | tail -1)"

step 20 "$OUT/info.txt" "$BIN" info
note "info ($(status), ${secs}s)" "$(grep -E '^gpu 0|cuda driver|^error:' "$OUT/info.txt" | head -1)"
note "first kernel" "$(grep '^first kernel' "$OUT/info.txt" | sed 's/^first kernel on the gpu: //')"
note "memory" "$(grep -E '^device memory|^weight uploads' "$OUT/info.txt" | tr '\n' ';')"

st_args=(selftest --device "$dev"); ((quick)) && st_args+=(--quick)
step 65 "$OUT/selftest.txt" "$BIN" "${st_args[@]}"
note "selftest ($(status), ${secs}s)" "$(grep -E '^selftest:|^error:' "$OUT/selftest.txt" | tail -1)"
if [[ $rc != 0 ]]; then
  failed_checks=$((failed_checks + 1))
  grep -E 'MISMATCH|failed:' "$OUT/selftest.txt" | head -5 | while read -r line; do note "  mismatch" "$line"; done
  # The same inputs again: a mismatch that depends on the seed must show again.
  seed=$(sed -n 's/.*(seed \([0-9]*\).*/\1/p' "$OUT/selftest.txt" | head -1)
  # The same checks too (the first run's flags): a failure only the full run has must show again.
  step 45 "$L/selftest-blocking.txt" env CUDA_LAUNCH_BLOCKING=1 "$BIN" "${st_args[@]}" ${seed:+--seed "$seed"}
  note "  rerun CUDA_LAUNCH_BLOCKING=1 ($(status))" "$(grep -E 'MISMATCH|failed:|^Error|error:' "$L/selftest-blocking.txt" | head -1)"
  step 45 "$L/selftest-no-tc.txt" env LORAXFER_NO_TENSOR_CORES=1 "$BIN" "${st_args[@]}" ${seed:+--seed "$seed"}
  note "  rerun LORAXFER_NO_TENSOR_CORES=1 ($(status))" "$(grep -E '^selftest:|^error:' "$L/selftest-no-tc.txt" | tail -1)"
fi

step 40 "$L/synth.txt" bash -c "'$BIN' synth model --like $source_like --layers $layers --out '$W/src' &&
  '$BIN' synth model --like $target_like --layers $layers --out '$W/tgt' --seed 1 &&
  '$BIN' synth adapter --base '$W/src' --out '$W/ad'"
note "synthetic models ($(status), ${secs}s)" "$source_like -> $target_like, $layers layers"

cat >"$W/compare.py" <<'PY'
import json, sys
from safetensors.torch import load_file
a, b = (load_file(f"{d}/adapter_model.safetensors") for d in sys.argv[1:3])
ra, rb = (json.load(open(f"{d}/transfer_report.json")) for d in sys.argv[1:3])
def rel(k):
    x, y = a[k].double(), b[k].double()
    return ((x - y).abs().max() / (x.abs().max() + 1e-30)).item()
worst = max((rel(k), k) for k in a if k in b)
# The PyTorch baseline's report has no gap_target: gaps are compared where both reports have one.
gaps = [abs(x["gap_target"] - y["gap_target"]) for x, y in zip(ra["modules"], rb["modules"])
        if x.get("gap_target") is not None and y.get("gap_target") is not None]
gap = f"{max(gaps):.2e}" if gaps else "n/a"
print(f"worst relative difference {worst[0]:.2e} ({worst[1]}); tensors {len(a)}, same keys {sorted(a) == sorted(b)}; largest gap_target difference {gap}")
print("timings_ms", sys.argv[1], ra.get("timings_ms")); print("timings_ms", sys.argv[2], rb.get("timings_ms"))
sys.exit(0 if sorted(a) == sorted(b) and worst[0] <= float(sys.argv[3]) else 1)
PY
# transfer NAME DEVICE RANK POWER_ITERS SECONDS [ENV...]
transfer() {
  local name=$1 dev=$2 rank=$3 q=$4 limit=$5; shift 5
  step "$limit" "$L/transfer-$name.txt" env "$@" "$BIN" transfer --source-base "$W/src" \
    --target-base "$W/tgt" --adapter "$W/ad" --out "$W/transfer-$name" --device "$dev" \
    --mode align --rank "$rank" --power-iters "$q" --timings --force
  note "transfer $name ($(status))" "${secs}s wall"
}
torch_baseline() {
  local name=$1 rank=$2 q=$3 limit=$4
  step "$limit" "$L/torch-$name.txt" "$PY" "$root/bench/torch_transfer.py" --source-base "$W/src" \
    --target-base "$W/tgt" --adapter "$W/ad" --out "$W/torch-$name" --device "$torch_dev" --mode align \
    --rank "$rank" --power-iters "$q" --force
  note "torch baseline $name, $torch_dev ($(status))" "${secs}s wall"
}
compare() {
  local a=$1 b=$2 tol=$3 what=$4
  # A missing output (its log is $L/<name>.txt): skipped for the budget, nothing to compare;
  # otherwise its step failed, and a pass/fail comparison fails with it.
  local x
  for x in "$a" "$b"; do
    [[ -f $W/$x/adapter_model.safetensors ]] && continue
    if grep -q "budget is spent" "$L/$x.txt" 2>/dev/null || [[ $what != pass/fail ]]; then
      note "$a vs $b: not compared" "no $x output (see its step)"
    else
      failed_checks=$((failed_checks + 1))
      note "$a vs $b: FAIL" "no $x output (see its step)"
    fi
    return
  done
  timeout -k 5 60 "$PY" "$W/compare.py" "$W/$a" "$W/$b" "$tol" >"$L/compare-$a-$b.txt" 2>&1; local r=$?
  local verdict="informative"
  if [[ $what == pass/fail ]]; then
    verdict=PASS
    [[ $r == 0 ]] || { verdict="FAIL (tol $tol)"; failed_checks=$((failed_checks + 1)); }
  fi
  # The figures when it ran, else the error it ended with.
  note "$a vs $b: $verdict" "$(if grep -q '^worst' "$L/compare-$a-$b.txt"; then head -1 "$L/compare-$a-$b.txt"; else tail -1 "$L/compare-$a-$b.txt"; fi)"
}
transfer k16-cpu cpu 16 12 25
transfer k16-cuda "$dev" 16 12 15
transfer k16-cuda-no-tc "$dev" 16 12 15 LORAXFER_NO_TENSOR_CORES=1
compare transfer-k16-cpu transfer-k16-cuda "$TOL" pass/fail
compare transfer-k16-cpu transfer-k16-cuda-no-tc "$TOL" pass/fail
torch_baseline k16 16 12 30
compare transfer-k16-cuda torch-k16 "$TOL" informative

if ((quick)); then
  echo "not run with --quick" >"$OUT/bench.txt"
else
  step 50 "$OUT/bench.txt" "$BIN" selftest --device cuda --quick --no-production --bench
  note "bench ($(status), ${secs}s)" "$(grep -c '' "$OUT/bench.txt") lines, $(grep -c '^skipped' "$OUT/bench.txt") skipped"
  transfer k256-cpu cpu 256 2 50
  transfer k256-cuda "$dev" 256 2 15
  compare transfer-k256-cpu transfer-k256-cuda 1 informative
  torch_baseline k256 256 2 30
  compare transfer-k256-cuda torch-k256 1 informative
fi

if ((!quick)) && command -v nsys >/dev/null; then
  # One step: the profile and its kernel and copy summaries (the report itself is large and
  # stays behind).
  step 45 "$L/nsys.txt" nsys profile -o "$L/transfer-cuda" --trace cuda,nvtx --force-overwrite true \
    --stats=true "$BIN" transfer --source-base "$W/src" --target-base "$W/tgt" --adapter "$W/ad" \
    --out "$W/nsys-out" --device cuda --mode align --rank 256 --force
  note "nsys profile ($(status), ${secs}s)" "logs/nsys.txt"
else
  note "nsys profile" "not run (--quick, or nsys not found)"
fi
if ((!rehearse)) && command -v compute-sanitizer >/dev/null; then
  # Last: the slowest steps, and the ones the deadline may cut.
  tools=(synccheck racecheck); ((quick)) && tools=(synccheck)  # racecheck is the slow one
  for tool in "${tools[@]}"; do
    step $([[ $tool == racecheck ]] && echo 60 || echo 30) "$L/sanitizer-$tool.txt" \
      compute-sanitizer --tool "$tool" "$BIN" selftest --device cuda --quick --no-production
    note "compute-sanitizer $tool ($(status), ${secs}s)" "$(grep -E 'ERROR SUMMARY|hazard' "$L/sanitizer-$tool.txt" | tail -1)"
  done
else
  note "compute-sanitizer" "not found"
fi

# Reports of every transfer, beside the logs; the adapters themselves stay in $WORK.
for d in "$W"/transfer-* "$W"/torch-*; do
  [[ -f $d/transfer_report.json ]] && cp "$d/transfer_report.json" "$L/report-$(basename "$d").json"
done
note "total" "$(( $(date +%s) - t_start ))s (budget ${budget}s)"
pack
echo "== gpu-check summary (details under $OUT) =="
cat "$summary"
sed -n '/^kernel .*TFLOP/,$p' "$OUT/bench.txt"
exit $((failed_checks > 0))
