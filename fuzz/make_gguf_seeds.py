"""Writes the seeds of the gguf_header fuzz target into fuzz/seeds/gguf_header/: small but whole
GGUF models (each under libFuzzer's 64 KB max_len), written by the `gguf` package (llama.cpp's
own writer), so the fuzzer starts from files the engine reads through to the end:

- llama.gguf: a one-layer Llama (permuted Q/K rows, a llama tokenizer), its weights in Q4_0,
  Q4_1, Q5_0, Q5_1, Q8_0 and F16, its norms in F32;
- gemma3.gguf: a one-layer Gemma 3 (head norms, the converter's norm shift, a gpt2 tokenizer),
  its weights in Q8_0 and BF16;
- kquants.gguf: one 256-wide row of each K-quant (Q2_K to Q6_K), without a model around it.

tests/fuzz_regressions.rs runs every seed through the check on each `cargo test`;
scripts/fuzz.sh copies them into the corpus. Rerun after changing the reader's input format:

    .venv/bin/python fuzz/make_gguf_seeds.py
"""

import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "gguf_header")
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 1, 48
HEAD_DIM = HIDDEN // HEADS
SHAPES = {  # Hugging Face (rows, cols)
    "attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
    "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
}
TYPES = {"attn_q": T.Q4_0, "attn_k": T.Q8_0, "attn_v": T.Q5_1, "attn_output": T.F16,
         "ffn_gate": T.Q4_1, "ffn_up": T.Q5_0, "ffn_down": T.Q8_0}


def tensor(w, name, values, qtype):
    values = values.astype(np.float32)
    if qtype == T.F32:
        w.add_tensor(name, values)
    elif qtype == T.F16:
        w.add_tensor(name, values.astype(np.float16))
    else:
        w.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)


def model(path, arch, rng, tokenizer):
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(["<s>", "</s>"] + [f"t{i}" for i in range(VOCAB - 2)])
    w.add_token_types([3, 3] + [1] * (VOCAB - 2))
    tensor(w, "token_embd.weight", rng.normal(0, 0.05, (VOCAB, HIDDEN)), T.Q8_0)
    norms = ["attn_norm", "ffn_norm"]
    if arch == "gemma3":
        norms += ["post_attention_norm", "post_ffw_norm"]
        for n in ("attn_q_norm", "attn_k_norm"):
            tensor(w, f"blk.0.{n}.weight", 1 + rng.normal(0, 0.1, HEAD_DIM), T.F32)
    for n in norms:
        tensor(w, f"blk.0.{n}.weight", 1 + rng.normal(0, 0.1, HIDDEN), T.F32)
    tensor(w, "output_norm.weight", 1 + rng.normal(0, 0.1, HIDDEN), T.F32)
    for module, shape in SHAPES.items():
        qtype = TYPES[module] if arch == "llama" else T.BF16 if module == "ffn_up" else T.Q8_0
        tensor(w, f"blk.0.{module}.weight", rng.normal(0, 1 / np.sqrt(shape[1]), shape), qtype)
    close(w)


def kquants(path, rng):
    w = gguf.GGUFWriter(path, "llama")
    for qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K):
        _, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(1, size), dtype=np.uint8)
        w.add_tensor(f"{qtype.name.lower()}.weight", raw, raw_dtype=qtype)
    close(w)


def close(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)
    model(os.path.join(OUT, "llama.gguf"), "llama", rng, "llama")
    model(os.path.join(OUT, "gemma3.gguf"), "gemma3", rng, "gpt2")
    kquants(os.path.join(OUT, "kquants.gguf"), rng)
    for name in sorted(os.listdir(OUT)):
        size = os.path.getsize(os.path.join(OUT, name))
        assert size <= 65536, f"{name}: {size} bytes, over libFuzzer's max_len"
        print(f"{name}: {size} bytes")


if __name__ == "__main__":
    main()
