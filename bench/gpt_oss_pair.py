"""A GPT-OSS pair at gpt-oss-20b's widths, stored both ways, to time what reading experts out of
fused tensors costs against reading them one tensor each.

    gpt_oss_pair.py OUT [--layers N] [--experts E] [--r R] [--mxfp4]

writes into OUT:
    base/            a GPT-OSS checkpoint (bf16) with gpt-oss-20b's shapes: hidden 2880, 64 query
                     and 8 key/value heads of 64, E experts (32) of width 2880 per layer, N layers
                     (1), a small vocabulary; the experts fused as the release stores them
                     (`mlp.experts.gate_up_proj` [E, hidden, 2·width], gate and up outputs
                     alternating; `mlp.experts.down_proj` [E, width, hidden]);
    release/         the same, every tensor drifted by 5 %: a "next release";
    base-split/      base with each expert's weight stored on its own, [out, in], the same values
    release-split/   (loraxfer reads these as stored, the fused ones gathered one expert at a time);
    lora/            PEFT's LoRA of rank R (16) on the fused experts (`target_parameters`) and the
                     attention;
    base-mxfp4/      with --mxfp4: base and release with their experts in MXFP4 (blocks and
    release-mxfp4/   scales, as OpenAI released GPT-OSS), the rest as in base/ and release/.

docs/PERFORMANCE.md ("Experts stored fused") gives the commands and the figures.
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file

HIDDEN, WIDTH, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2880, 2880, 64, 8, 64, 1024


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bits (round to nearest even), as uint16."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def write_bf16(path: str, tensors: dict):
    """A safetensors file of bf16 tensors given as uint16 bits (numpy has no bf16)."""
    header, offset = {}, 0
    for name in sorted(tensors):
        size = tensors[name].nbytes
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name]).tobytes())


def model(rng, layers: int, experts: int) -> dict:
    """float32 weights, GPT-OSS names, experts fused."""
    def g(*shape, std=0.02):
        return rng.standard_normal(shape, dtype=np.float32) * std

    t = {"model.embed_tokens.weight": g(VOCAB, HIDDEN), "lm_head.weight": g(VOCAB, HIDDEN),
         "model.norm.weight": np.ones(HIDDEN, np.float32)}
    for l in range(layers):
        p = f"model.layers.{l}"
        for name, (rows, cols) in {"q_proj": (HEADS * HEAD_DIM, HIDDEN), "k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
                                   "v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "o_proj": (HIDDEN, HEADS * HEAD_DIM)}.items():
            t[f"{p}.self_attn.{name}.weight"], t[f"{p}.self_attn.{name}.bias"] = g(rows, cols), g(rows)
        t[f"{p}.self_attn.sinks"] = g(HEADS)
        t[f"{p}.mlp.router.weight"], t[f"{p}.mlp.router.bias"] = g(experts, HIDDEN), g(experts)
        t[f"{p}.mlp.experts.gate_up_proj"] = g(experts, HIDDEN, 2 * WIDTH)
        t[f"{p}.mlp.experts.gate_up_proj_bias"] = g(experts, 2 * WIDTH)
        t[f"{p}.mlp.experts.down_proj"] = g(experts, WIDTH, HIDDEN)
        t[f"{p}.mlp.experts.down_proj_bias"] = g(experts, HIDDEN)
        t[f"{p}.input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        t[f"{p}.post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    return t


FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
               np.float32)


def mxfp4(linear: np.ndarray):
    """MXFP4 blocks `[E, out, in/32, 16]` and scales `[E, out, in/32]` of `[E, out, in]` weights:
    per 32 inputs one E8M0 scale so that the block's largest value fits FP4's 6, each value the
    nearest FP4 code, two a byte, low nibble first. A band of rows at a time (the search over the
    16 codes would not fit in memory whole)."""
    e, rows, cols = linear.shape
    blocks = np.empty((e, rows, cols // 32, 16), np.uint8)
    scales = np.empty((e, rows, cols // 32), np.uint8)
    band = 256
    for x in range(e):
        for r in range(0, rows, band):
            v = linear[x, r:r + band].reshape(-1, cols // 32, 32)
            exp = np.ceil(np.log2(np.maximum(np.abs(v).max(axis=-1, keepdims=True), 1e-30) / 6.0)).clip(-127, 127)
            codes = np.abs((v / 2.0**exp)[..., None] - FP4).argmin(axis=-1).astype(np.uint8)
            blocks[x, r:r + band] = codes[..., 0::2] | (codes[..., 1::2] << 4)
            scales[x, r:r + band] = (exp[..., 0] + 127).astype(np.uint8)
    return blocks, scales


def with_mxfp4(path: str, fused: dict):
    """The checkpoint with its experts in MXFP4 and the rest in bf16 (a file of mixed types)."""
    header, offset, data = {}, 0, []
    for name in sorted(fused):
        value = fused[name]
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4(np.ascontiguousarray(value.transpose(0, 2, 1)))
            parts = [(f"{name}_blocks", "U8", blocks), (f"{name}_scales", "U8", scales)]
        else:
            parts = [(name, "BF16", bf16_bits(value))]
        for key, dtype, array in parts:
            header[key] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
            offset += array.nbytes
            data.append(np.ascontiguousarray(array).tobytes())
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for chunk in data:
            f.write(chunk)


def split(fused: dict) -> dict:
    """Each expert's weight on its own, [out, in], as GPT-OSS's forward uses it."""
    out = {}
    for name, value in fused.items():
        if name.endswith("experts.gate_up_proj"):
            stem = name[: -len("gate_up_proj")]
            for e in range(value.shape[0]):
                out[f"{stem}{e}.gate_proj.weight"] = value[e][:, 0::2].T
                out[f"{stem}{e}.up_proj.weight"] = value[e][:, 1::2].T
        elif name.endswith("experts.down_proj"):
            stem = name[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{stem}{e}.down_proj.weight"] = value[e].T
        else:
            out[name] = value
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--mxfp4", action="store_true", help="also write base-mxfp4/ and release-mxfp4/")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": HIDDEN,
              "intermediate_size": WIDTH, "num_hidden_layers": args.layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
              "num_local_experts": args.experts, "num_experts_per_tok": 4, "torch_dtype": "bfloat16"}
    base = model(rng, args.layers, args.experts)
    for name, weights in [("base", base), ("release", None)]:
        if weights is None:
            # Drifted by 5 % of each tensor's rms, tensor by tensor, before rounding to bf16.
            weights = {k: v + 0.05 * np.sqrt(np.mean(v * v)) * rng.standard_normal(v.shape, dtype=np.float32)
                       for k, v in base.items()}
        for kind, tensors in [(name, weights), (f"{name}-split", split(weights))]:
            d = os.path.join(args.out, kind)
            os.makedirs(d, exist_ok=True)
            write_bf16(os.path.join(d, "model.safetensors"), {k: bf16_bits(v) for k, v in tensors.items()})
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(config, f, indent=1)
        if args.mxfp4:
            d = os.path.join(args.out, f"{name}-mxfp4")
            os.makedirs(d, exist_ok=True)
            with_mxfp4(os.path.join(d, "model.safetensors"), weights)
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({**config, "quantization_config": {"quant_method": "mxfp4"}}, f, indent=1)
    r, e = args.r, args.experts
    lora = {}
    for l in range(args.layers):
        p = f"base_model.model.model.layers.{l}"
        for name, (rows, cols) in {"q_proj": (HEADS * HEAD_DIM, HIDDEN), "k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
                                   "v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "o_proj": (HIDDEN, HEADS * HEAD_DIM)}.items():
            lora[f"{p}.self_attn.{name}.lora_A.weight"] = (rng.uniform(-1, 1, (r, cols)) / np.sqrt(cols)).astype(np.float32)
            lora[f"{p}.self_attn.{name}.lora_B.weight"] = 0.01 * rng.standard_normal((rows, r), dtype=np.float32)
        # PEFT's wrappers: gate_up_proj innermost (on experts.base_layer), down_proj on experts.
        for wrapper, (rows, cols) in {"mlp.experts.base_layer": (2 * WIDTH, HIDDEN),
                                      "mlp.experts": (HIDDEN, WIDTH)}.items():
            lora[f"{p}.{wrapper}.lora_A.weight"] = (rng.uniform(-1, 1, (r * e, cols)) / np.sqrt(cols)).astype(np.float32)
            lora[f"{p}.{wrapper}.lora_B.weight"] = 0.01 * rng.standard_normal((rows, r * e), dtype=np.float32)
    d = os.path.join(args.out, "lora")
    os.makedirs(d, exist_ok=True)
    save_file(lora, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                   "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                   "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": "base"}, f, indent=1)


if __name__ == "__main__":
    main()
