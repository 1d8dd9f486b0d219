#!/usr/bin/env bash
# Fuzzing campaign: seeds each target's corpus with real files written by `loraxfer synth`, the
# built-in tables and the GGUF models in fuzz/seeds/, then runs every target for RUNS executions
# (default 1000000) with libFuzzer.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); stable Rust is used with RUSTC_BOOTSTRAP=1, since
# libFuzzer's instrumentation flags are nightly-only. Crashes land in fuzz/artifacts/<target>/:
# copy each into fuzz/regressions/<target>/ (tests/fuzz_regressions.rs replays them) and fix it.
#   scripts/fuzz.sh [RUNS] [TARGET ...]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-1000000}"; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors_header gguf_header adapter_config model_config checkpoint_index arch_table layer_map tokenizer)
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || { echo "scripts/fuzz.sh: cargo-fuzz not installed (cargo install cargo-fuzz)" >&2; exit 2; }

# Seeds: real files, small enough for libFuzzer's default max_len after truncation.
seed="$(mktemp -d)"; trap 'rm -rf "$seed"' EXIT
cargo build --quiet
bin=target/debug/loraxfer
"$bin" synth model --like tiny-qwen2 --out "$seed/m" --seed 1 >/dev/null
"$bin" synth model --like tiny-llama --out "$seed/l" --seed 2 --dtype f16 >/dev/null
"$bin" synth adapter --base "$seed/m" --out "$seed/a" --r 2 --targets q_proj >/dev/null
mkdir -p fuzz/corpus/{safetensors_header,gguf_header,adapter_config,model_config,checkpoint_index,arch_table,layer_map,tokenizer}
cp fuzz/seeds/gguf_header/*.gguf fuzz/corpus/gguf_header/  # whole small models: fuzz/make_gguf_seeds.py
cp "$seed/a/adapter_model.safetensors" fuzz/corpus/safetensors_header/adapter
head -c 4096 "$seed/m/model.safetensors" > fuzz/corpus/safetensors_header/model-head
cp "$seed/a/adapter_config.json" fuzz/corpus/adapter_config/
cp "$seed/m/config.json" fuzz/corpus/model_config/qwen2.json
cp "$seed/l/config.json" fuzz/corpus/model_config/llama.json
echo '{"metadata": {"total_size": 8}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors", "lm_head.weight": "model-00002-of-00002.safetensors"}}' > fuzz/corpus/checkpoint_index/index.json
cp src/arch/tables/*.json fuzz/corpus/arch_table/
echo '{"0": 3, "5": 27, "23": 0}' > fuzz/corpus/layer_map/map.json
cp "$seed/m/tokenizer.json" fuzz/corpus/tokenizer/word-level.json
echo '{"model": {"type": "BPE", "vocab": {"Ġthe": 0, "cat": 1, "Ċ": 2}}, "added_tokens": [{"id": 3, "content": "<|endoftext|>", "special": true}], "pre_tokenizer": {"type": "ByteLevel"}}' > fuzz/corpus/tokenizer/byte-level.json
echo '{"model": {"type": "Unigram", "vocab": [["<eos>", 0.0], ["▁the", -1.0], ["<0x0A>", -3.0]]}, "added_tokens": [{"id": 0, "content": "<eos>", "special": true}]}' > fuzz/corpus/tokenizer/unigram.json

printf '%-20s %12s %10s %8s %s\n' target executions seconds exec/s result > fuzz/last-campaign.txt
for t in "${targets[@]}"; do
  start=$(date +%s)
  log="$(mktemp)"
  if cargo fuzz run -O -s none "$t" -- -runs="$runs" -max_len=65536 >"$log" 2>&1; then result=ok; else result=CRASH; fi
  secs=$(( $(date +%s) - start ))
  execs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' || echo "?")
  rate=$(grep -o 'exec/s: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
  printf '%-20s %12s %10s %8s %s\n' "$t" "$execs" "$secs" "$rate" "$result" | tee -a fuzz/last-campaign.txt
  [ "$result" = ok ] || tail -30 "$log" >&2
  rm -f "$log"
done
