"""A test pair for the map mode's per-layer residual maps, whose true map is known.

    rotated_pair.py make SRC OUT
        OUT: a copy of the Llama-shaped checkpoint SRC whose layer l lives in its own residual
        basis, turned by a random rotation R_l = exp(θK) (about half a radian in every
        direction): its reads become W diag(g) R_lᵀ with a unit norm gain, its writes R_l W;
        embeddings and the final norm are unchanged. Each layer then needs its own residual map.
    rotated_pair.py check SRC SRC_ADAPTER OUT_ADAPTER...
        For each adapter transferred onto the rotated copy, the relative error of each module's
        update against the exact one (reads ΔW diag(g) R_lᵀ, writes R_l ΔW), averaged per module
        type. SRC is the checkpoint `make` rotated; the adapter's own base may differ from it by
        a small drift.

docs/PERFORMANCE.md ("Map mode layer by layer") gives the commands and the figures.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

READS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WRITES = ("o_proj", "down_proj")


def shards(src):
    return [os.path.join(src, f) for f in sorted(os.listdir(src)) if f.endswith(".safetensors")]


def layer_of(name):
    return int(name.split(".layers.")[1].split(".")[0])


def rotations(src):
    """R_l per layer, drawn in the order the layers first appear in the shards (seeded)."""
    d = json.load(open(os.path.join(src, "config.json")))["hidden_size"]
    g = torch.Generator().manual_seed(7)
    rots = {}
    for f in shards(src):
        for name in load_file(f).keys():
            if ".layers." in name and layer_of(name) not in rots:
                a = torch.randn(d, d, generator=g) / d ** 0.5
                rots[layer_of(name)] = torch.linalg.matrix_exp(0.5 * (a - a.T) / 2 ** 0.5)
    return rots


def norm_gains(src):
    gains = {}
    for f in shards(src):
        gains.update({n: w.float() for n, w in load_file(f).items() if "layernorm" in n})
    return gains


def read_gain(gains, name):
    """The gain of the norm before the module `name` reads the residual."""
    if ".self_attn." in name:
        return gains[name.split(".self_attn.")[0] + ".input_layernorm.weight"]
    return gains[name.split(".mlp.")[0] + ".post_attention_layernorm.weight"]


def make(src, out):
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(src, f), out)
    rots, gains = rotations(src), norm_gains(src)
    for f in shards(src):
        t = load_file(f)
        for name, w in t.items():
            if ".layers." not in name:
                continue
            r, w32 = rots[layer_of(name)], w.float()
            if any(k in name for k in READS):
                w32 = (w32 * read_gain(gains, name)) @ r.T
            elif any(k in name for k in WRITES):
                w32 = r @ w32
            elif "layernorm" in name:
                w32 = torch.ones_like(w32)
            t[name] = w32.to(w.dtype).contiguous()
        save_file(t, os.path.join(out, os.path.basename(f)), metadata={"format": "pt"})
    print("wrote", out)


def updates(adapter):
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    t = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    out = {}
    for k in t:
        if k.endswith(".lora_A.weight"):
            m = k[: -len(".lora_A.weight")]
            a, b = t[k].float(), t[m + ".lora_B.weight"].float()
            short = m.split("base_model.model.")[-1]
            alpha = cfg.get("alpha_pattern", {}).get(short, cfg["lora_alpha"])
            r = cfg.get("rank_pattern", {}).get(short, a.shape[0])
            out[short] = b @ a * (alpha / r)
    return out


def check(src, source_adapter, adapters):
    rots, gains = rotations(src), norm_gains(src)
    source = updates(source_adapter)
    for adapter in adapters:
        got = updates(adapter)
        errors = {}
        for m, dw in source.items():
            r = rots[layer_of(m)]
            if any(k in m for k in READS):
                exact = (dw * read_gain(gains, m)) @ r.T
            else:
                exact = r @ dw
            e = ((got[m] - exact).norm() / exact.norm()).item()
            errors.setdefault(m.rsplit(".", 1)[1], []).append(e)
        print(adapter, {k: round(sum(v) / len(v), 3) for k, v in sorted(errors.items())})


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 5 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)
