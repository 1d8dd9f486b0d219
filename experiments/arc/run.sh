#!/usr/bin/env bash
# Transfer a LoRA with loraxfer and measure it on ARC-Challenge, against the target base alone
# and (when given) a LoRA trained directly on the target, all on the same items.
#
#   experiments/arc/run.sh --source DIR --target DIR --adapter DIR [--direct DIR]
#                          [--mode auto|copy|project|align|procrustes|rotate|map|resample] [--rank K]
#                          [--threshold T] [--limit N] [--name NAME]
#
# --limit N evaluates a seeded sample of N of the 1172 test items (0, the default, means all).
# Results (adapter, transfer report, one JSON per evaluation, the table) go to
# $ARC_WORK/runs/NAME (ARC_WORK defaults to experiments/arc/work).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n 2,11p "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
source_dir= target_dir= adapter= direct= mode=auto rank=256 threshold=0 limit=0 name=
while [[ $# -gt 0 ]]; do
  case $1 in
    --source) source_dir=$2; shift 2 ;;
    --target) target_dir=$2; shift 2 ;;
    --adapter) adapter=$2; shift 2 ;;
    --direct) direct=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --rank) rank=$2; shift 2 ;;
    --threshold) threshold=$2; shift 2 ;;
    --limit) limit=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "run.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ -n $source_dir && -n $target_dir && -n $adapter ]] || usage
for d in "$source_dir" "$target_dir"; do
  [[ -f $d/config.json ]] || { echo "run.sh: $d: no config.json (want a Hugging Face model folder)" >&2; exit 2; }
done
[[ -f $adapter/adapter_config.json ]] || { echo "run.sh: $adapter: no adapter_config.json" >&2; exit 2; }
# Absolute paths: the evaluation runs from experiments/arc.
source_dir="$(cd "$source_dir" && pwd)" target_dir="$(cd "$target_dir" && pwd)" adapter="$(cd "$adapter" && pwd)"
[[ -z $direct ]] || direct="$(cd "$direct" && pwd)"

arc_python
arc_loraxfer
arc_data
name="${name:-$(basename "$target_dir")-$mode-k$rank}"
out="$ARC_WORK/runs/$name"
mkdir -p "$out"

say "loraxfer transfer --mode $mode --rank $rank --threshold $threshold -> $out/adapter"
"$LORAXFER" transfer --source-base "$source_dir" --target-base "$target_dir" --adapter "$adapter" \
  --out "$out/adapter" --mode "$mode" --rank "$rank" --threshold "$threshold" --force --timings
"$PY" "$arc_dir/similarity.py" "$out/adapter/transfer_report.json" --label "$name" | tee "$out/similarity.md"

adapters=(--adapter "transferred-$mode-k$rank=$out/adapter")
[[ -n $direct ]] && adapters+=(--adapter "direct=$direct")
say "evaluating on ARC-Challenge test (limit $limit)"
(cd "$arc_dir" && "$PY" evaluate.py --model "$target_dir" "${adapters[@]}" --data "$DATA" \
  --limit "$limit" --results "$out/results") | tee "$out/table.md"
