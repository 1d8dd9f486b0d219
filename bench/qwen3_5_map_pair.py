"""A Qwen3.5 pair at Qwen3.5-9B's layer widths with vocabularies, to time the map mode on a
hybrid model (linear attention's heads, the gated query's, the MLP's neurons) against align.

    qwen3_5_map_pair.py OUT [--layers N] [--vocab V]

writes into OUT:
    base/       a Qwen3.5 text checkpoint (bf16) as qwen3_5_gguf_pair.py writes it (hidden 4096,
                MLP 12288; softmax attention of 16 query and 4 key/value heads of 256, the query
                twice as tall; linear attention of 16 key heads of 128 and 32 value heads of 128;
                N layers (4: three linear, one softmax)), with a word-level tokenizer.json of V
                tokens (8192: the map anchors on at least the width's 4096);
    release/    the same, every tensor drifted by 5 % (`loraxfer synth model --derive-from`),
                keeping the vocabulary;
    lora/       `loraxfer synth adapter` of rank 16 on every projection of base/.

Set LORAXFER to the binary (default: target/release/loraxfer). docs/PERFORMANCE.md ("The map mode
on Qwen3.5") gives the commands and the figures.
"""
import argparse
import json
import os
import subprocess

import numpy as np

from gpt_oss_pair import write_bf16  # these scripts' neighbours
from qwen3_5_gguf_pair import config, model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args()
    binary = os.environ.get("LORAXFER", "target/release/loraxfer")
    base = os.path.join(args.out, "base")
    os.makedirs(base, exist_ok=True)
    c = config(args.layers, args.vocab)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(c, f)
    tensors = model(np.random.default_rng(0), args.layers, c["layer_types"], args.vocab)
    write_bf16(os.path.join(base, "model.safetensors"), tensors)
    vocab = {f"w{i}": i for i in range(args.vocab)}
    with open(os.path.join(base, "tokenizer.json"), "w") as f:
        json.dump({"model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}, f)
    run = lambda *a: subprocess.run([str(x) for x in a], check=True)  # noqa: E731
    run(binary, "synth", "model", "--derive-from", base, "--drift", "0.05", "--seed", "1", "--out",
        os.path.join(args.out, "release"), "--force")
    run(binary, "synth", "adapter", "--base", base, "--out", os.path.join(args.out, "lora"), "--r", "16", "--force")


if __name__ == "__main__":
    main()
