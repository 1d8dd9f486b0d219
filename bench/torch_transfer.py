#!/usr/bin/env python3
"""PyTorch baseline of `loraxfer transfer`: the same LoRA transfer, written as a careful user would
write it with torch, to benchmark loraxfer against and to cross-check its numbers.

It mirrors docs/METHOD.md and src/{backend/cpu,plan,transfer}/ of loraxfer:
- k_eff = min(k, m, n, m', n') per module pair; sketch width l = min(k_eff + p, m, n);
- the truncated SVD of each base weight: `--svd lowrank` is torch.svd_lowrank(W, q=l, niter=q)
  (torch's `q` is the sketch width, its `niter` the power iterations; its Gaussian test matrix is
  not loraxfer's Philox one, so the two agree only up to the accuracy of the subspaces);
  `--svd full` is torch.linalg.svd(W, full_matrices=False) truncated to k_eff (the seed experiment);
- sign canonicalization: (u_i, v_i) is flipped so that the largest-|.| entry of u_i is positive;
- similarity ‖X_sᵀX_t‖_F² / k_eff, clamped to [0, 1]: φ_U when the output sizes match, φ_V when
  the input sizes match, `similarity` their mean when both exist, else null; `--threshold` gives
  B = 0 (and transferred = false) to modules whose similarity is below it;
- the modes project, align, procrustes (polar factors), rotate (the direct rotation between the
  source's and the target's top-k subspaces, keeping the whole update), copy, resample (nearest
  index round(i·(m−1)/(m'−1))) and auto, all in factored form (the rank stays r); auto chooses for
  the whole pair as loraxfer does: rotate when the depths and every adapted module's shapes are
  equal, else align (where loraxfer would choose map, which this baseline does not implement, it
  stops and asks for a --mode);
- energy_kept = ‖B_tA_t‖_F / ‖B_sA_s‖_F from r × r Gram matrices (the scale s cancels);
- depth map: target layer j takes source layer round(j·(L_s−1)/(L_t−1)), half away from zero;
- mixtures of experts stored one module per expert (Qwen3-MoE, OLMoE, Qwen2-MoE with its shared
  expert): each target expert takes the source expert whose router row (`mlp.gate`) has the
  highest cosine with its own (a tie keeps its own index), in the layers the depth map pairs;
- PEFT conventions: keys base_model.model.<module>.lora_{A,B}.weight, A [r, in], B [out, r];
  each module keeps its rank, alpha and dtype; the output config is the source's with
  base_model_name_or_path = the target, rank/alpha patterns regenerated as exact module names.
Output: adapter_model.safetensors, adapter_config.json and transfer_report.json (loraxfer's field
names; timings_ms has plan, load, svd, similarity, project, write and total: wall times).

Limits: only architectures whose seven projections are unfused under `model.layers.N.` (the
llama, qwen2, qwen3, mistral, gemma and gemma2 tables, and the mixtures above); no fused Phi-3
projections or fused experts, no Gemma 3 prefixes, no --modules or --layer-map, no dense MLP
against experts, and only light adapter checks (loraxfer is the validator).
Weights are read one tensor at a time through safetensors.safe_open(framework="pt") (mmap),
converted to f32 and processed on --device, one module pair at a time.
"""
import argparse
import json
import math
import os
import re
import shutil
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PREFIX = "base_model.model."
MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "qwen3_moe", "olmoe", "qwen2_moe"}
# Keys under model.layers.N, in the architecture tables' order; `{e}` stands for an expert's index.
KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
         "mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj",
         "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"]
MODULE_RE = re.compile(r"^model\.layers\.(\d+)\.(" + "|".join(
    re.escape(k).replace(re.escape("{e}"), r"\d+") for k in KINDS) + r")$")
ROUTER = "mlp.gate.weight"
SAME_SHAPE = {"copy", "project", "procrustes", "rotate"}
DECOMPOSING = {"project", "align", "procrustes", "rotate"}


def die(msg):
    sys.exit(f"torch_transfer: error: {msg}")


def round_half_away(x):
    return int(math.floor(x + 0.5))  # x >= 0 here; Python's round() would round half to even


def nearest_index(j, length, new_length):
    if new_length <= 1 or length <= 1:
        return 0
    return round_half_away(j * (length - 1) / (new_length - 1))


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def fnv1a(name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


class Timer:
    """Wall time per phase; synchronizes CUDA so that asynchronous kernels are charged correctly."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.ms = {k: 0.0 for k in ("plan", "load", "svd", "similarity", "project", "write")}

    @contextmanager
    def __call__(self, phase):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.ms[phase] += (time.perf_counter() - t0) * 1e3


class Checkpoint:
    """A Hugging Face directory: config.json and model.safetensors or a sharded index."""

    def __init__(self, path):
        self.dir = Path(path)
        self.config = json.loads((self.dir / "config.json").read_text())
        if self.config.get("model_type") not in MODEL_TYPES:
            die(f"{self.dir}: model_type {self.config.get('model_type')!r} is not one of "
                f"{sorted(MODEL_TYPES)} (this baseline handles unfused architectures only)")
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: self.dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            single = self.dir / "model.safetensors"
            with safe_open(single, framework="pt") as f:
                self.where = {k: single for k in f.keys()}
        self.files = {}

    @property
    def layers(self):
        return self.config["num_hidden_layers"]

    def _file(self, name):
        if name not in self.where:
            die(f"{self.dir}: no tensor {name}")
        path = self.where[name]
        if path not in self.files:
            self.files[path] = safe_open(path, framework="pt")
        return self.files[path]

    def shape(self, name):
        return tuple(self._file(name).get_slice(name).get_shape())

    def read(self, name, device):
        return self._file(name).get_tensor(name).to(device=device, dtype=torch.float32)


def read_adapter(path):
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("fan_in_fan_out"):
        die(f"{path}: only plain LoRA adapters (no DoRA, no fan_in_fan_out)")
    factors = {}
    with safe_open(path / "adapter_model.safetensors", framework="pt") as f:
        for key in f.keys():
            m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if not m:
                die(f"{path}: `{key}` is not a lora_A/lora_B weight")
            factors.setdefault(m.group(1), {})[m.group(2)] = f.get_tensor(key)
    for name, ab in factors.items():
        if set(ab) != {"A", "B"}:
            die(f"{path}: module {name} lacks lora_A or lora_B")
    return config, factors


def pattern_value(patterns, module, default):
    """PEFT's rule: the first key k such that the module name matches (.*\\.)?k$."""
    for k, v in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{k})", module):
            return v
    return default


def truncated_svd(w, k, args, name):
    m, n = w.shape
    if args.svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, v = u[:, :k], vh[:k].T
    else:
        torch.manual_seed((args.seed ^ fnv1a(name)) & 0x7FFFFFFFFFFFFFFF)  # Ω per tensor, order-free
        l = min(k + args.oversample, m, n)
        u, s, v = torch.svd_lowrank(w, q=l, niter=args.power_iters)
        u, v = u[:, :k], v[:, :k]
    # Flip (u_i, v_i) so that the largest-magnitude entry of u_i is positive (first one on ties).
    idx = u.abs().argmax(dim=0)
    signs = torch.where(u.gather(0, idx[None, :])[0] < 0, -1.0, 1.0).to(u.dtype)
    return u.contiguous() * signs, v.contiguous() * signs


def similarity(x, y):
    k = min(x.shape[1], y.shape[1])
    return min(max((x.T @ y).double().square().sum().item() / k, 0.0), 1.0)


def polar(m):
    x, _, yh = torch.linalg.svd(m)
    return x @ yh


def direct_rotation(us, ut, m):
    """R·m for the direct rotation R taking span(us) onto span(ut) (Davis–Kahan): each source
    principal vector a_i turns into its target partner b_i inside the plane the two span, and
    whatever is orthogonal to both subspaces stays. With usᵀut = X·diag(c)·Yᵀ, α = XᵀusᵀM and
    δ = YᵀutᵀM − cα: R·M = M + us·X·(M₁ − c·M₂) + ut·Y·M₂, M₁ = (c − 1)α − δ, M₂ = α − δ/(1 + c)
    ((c − 1)/sin²θ = −1/(1 + c) removes every division by sin θ). The k × k steps run in f64."""
    x, c, yh = torch.linalg.svd((us.T @ ut).double())
    c = c.clamp(0.0, 1.0)[:, None]
    y = yh.T
    alpha = x.T @ (us.T @ m).double()
    delta = y.T @ (ut.T @ m).double() - c * alpha
    m2 = alpha - delta / (1.0 + c)
    m1 = (c - 1.0) * alpha - delta
    return m + us @ (x @ (m1 - c * m2)).to(m.dtype) + ut @ (y @ m2).to(m.dtype)


def update_norm(b, a):
    return math.sqrt(max(((b.T @ b) * (a @ a.T)).double().sum().item(), 0.0))


def transfer(mode, b, a, bs, bt, target_shape):
    (mt, nt), (ms, ns) = target_shape, (b.shape[0], a.shape[1])
    if mode == "copy":
        return b, a
    if mode == "project":
        ut, vt = bt
        return ut @ (ut.T @ b), (a @ vt) @ vt.T
    if mode == "align":
        (us, vs), (ut, vt) = bs, bt
        return ut @ (us.T @ b), (a @ vs) @ vt.T
    if mode == "procrustes":
        (us, vs), (ut, vt) = bs, bt
        o_u, o_v = polar(us.T @ ut), polar(vs.T @ vt)
        return ut @ (o_u.T @ (us.T @ b)), ((a @ vs) @ o_v) @ vt.T
    if mode == "rotate":
        (us, vs), (ut, vt) = bs, bt
        return direct_rotation(us, ut, b), direct_rotation(vs, vt, a.T).T
    if mode == "resample":
        rows = torch.tensor([nearest_index(i, ms, mt) for i in range(mt)], device=b.device)
        cols = torch.tensor([nearest_index(j, ns, nt) for j in range(nt)], device=a.device)
        return b[rows], a[:, cols]
    raise ValueError(mode)


def kind_of(key):
    """The KINDS entry of a key under a layer (`mlp.experts.5.up_proj` -> `mlp.experts.{e}.up_proj`)."""
    return re.sub(r"\.experts\.\d+\.", ".experts.{e}.", key)


def pair_experts(src, tgt, layer_map, device):
    """{target layer: (source expert of each target expert, its router cosine)}: the source expert
    whose router row points the closest way (the highest cosine; a tie keeps its own index)."""
    out = {}
    for j, i in layer_map.items():
        names = (f"model.layers.{i}.{ROUTER}", f"model.layers.{j}.{ROUTER}")
        if not all(n in ckpt.where for n, ckpt in zip(names, (src, tgt))):
            die(f"source layer {i} or target layer {j} has no router ({ROUTER}): this baseline does "
                f"not pair a dense MLP with experts")
        s, t = (torch.nn.functional.normalize(ckpt.read(n, device), dim=1) for n, ckpt in zip(names, (src, tgt)))
        if s.shape[1] != t.shape[1]:
            die(f"the routers of layers {i} and {j} read hidden states of other sizes")
        cos = (t @ s.T).double()
        best, pick = cos.max(dim=1)
        experts = []
        for e, (b, p) in enumerate(zip(best.tolist(), pick.tolist())):
            experts.append(e if e < s.shape[0] and cos[e, e].item() >= b else p)
        out[j] = (experts, [cos[e, p].item() for e, p in enumerate(experts)])
    return out


def choose_auto(src, tgt, present):
    """(mode, reason) as loraxfer's `--mode auto` chooses for the whole pair
    (src/transfer/auto.rs): rotate when the depths and every adapted module's shapes are equal;
    else map when both models ship a tokenizer.json (not implemented here: stop); else align."""
    ls, lt = src.layers, tgt.layers
    tensors = [f"model.layers.{i}.{key}.weight" for i, key in present]
    if ls == lt and all(n in tgt.where and src.shape(n) == tgt.shape(n) for n in tensors):
        return "rotate", f"equal depths ({ls} layers) and equal module shapes: rotate keeps the whole update"
    differs = f"depths differ ({ls} and {lt} layers)" if ls != lt else "module shapes differ"
    if all((d.dir / "tokenizer.json").is_file() for d in (src, tgt)):
        die(f"{differs}, and both models ship a tokenizer.json, so loraxfer's auto may choose map "
            f"(where the vocabularies share enough tokens), which this baseline does not implement: "
            f"name a --mode (align crosses shapes)")
    return "align", f"{differs}, and a tokenizer.json is missing: align"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-base", required=True)
    p.add_argument("--target-base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="auto",
                   choices=["auto", "project", "align", "procrustes", "rotate", "copy", "resample"])
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--oversample", type=int, default=16)
    p.add_argument("--power-iters", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--svd", default="lowrank", choices=["lowrank", "full"])
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args()
    if args.rank < 1:
        die("--rank must be at least 1")
    if not 0.0 <= args.threshold <= 1.0:
        die(f"--threshold {args.threshold} is outside [0, 1]")
    out = Path(args.out)
    if out.exists() and not args.force:
        die(f"{out} exists (use --force to replace it)")
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)
    wall = time.perf_counter()
    timer = Timer(device)

    with timer("plan"):
        src, tgt = Checkpoint(args.source_base), Checkpoint(args.target_base)
        config, factors = read_adapter(args.adapter)
        present = {}  # (layer, key under the layer) -> adapter module name
        for name in factors:
            m = MODULE_RE.match(name)
            if not m or int(m.group(1)) >= src.layers:
                die(f"{args.adapter}: module `{name}` is not an adaptable projection of the source")
            present[(int(m.group(1)), m.group(2))] = name
        kinds = [k for k in KINDS if any(kind_of(key) == k for _, key in present)]
        ls, lt = src.layers, tgt.layers
        layer_map = {j: 0 if lt <= 1 or ls <= 1 else round_half_away(j * (ls - 1) / (lt - 1))
                     for j in range(lt)}
        expert_map = pair_experts(src, tgt, layer_map, device) if any("{e}" in k for k in kinds) else {}
        first = factors[sorted(factors)[0]]["A"].dtype
        auto_reason = None
        if args.mode == "auto":
            args.mode, auto_reason = choose_auto(src, tgt, present)
            print(f"auto: {args.mode} ({auto_reason})")

    rows, out_tensors, out_r, out_alpha = [], {}, {}, {}

    def run_pair(i, j, s_key, t_key):
        """Source layer i's module `s_key` onto target layer j's `t_key`."""
        mtype = s_key.rsplit(".", 1)[1]
        s_tensor, t_tensor = f"model.layers.{i}.{s_key}.weight", f"model.layers.{j}.{t_key}.weight"
        t_module = f"model.layers.{j}.{t_key}"
        (ms, ns), (mt, nt) = src.shape(s_tensor), tgt.shape(t_tensor)
        mode = args.mode
        if mode in SAME_SHAPE and (ms, ns) != (mt, nt):
            die(f"--mode {mode} needs equal shapes, but {mtype} is {ms}x{ns} and {mt}x{nt}")
        k = min(args.rank, ms, ns, mt, nt)
        # As loraxfer reports it: capping counts only where bases are computed (copy and
        # resample compute them only to filter on similarity, on a side of equal size).
        decomposes = mode not in ("copy", "resample") or (
            args.threshold > 0 and (ms == mt or ns == nt))
        s_module = present.get((i, s_key))
        row = dict(source_key=s_tensor, target_key=t_tensor, source_shape=[ms, ns],
                   target_shape=[mt, nt], mode=mode, similarity_u=None, similarity_v=None,
                   similarity=None, transferred=False, energy_kept=None, module=mtype,
                   target_module=t_module, source_module=s_module, source_layer=i,
                   target_layer=j, rank=k, rank_capped=decomposes and k < args.rank)
        rows.append(row)
        if s_module is None:
            row["reason"] = f"the adapter has no {mtype} in source layer {i}"
            r, dtype = config["r"], first
            b_t, a_t = torch.zeros(mt, r), torch.zeros(r, nt)
            out_r[t_module], out_alpha[t_module] = r, config.get("lora_alpha", 8)
        else:
            fa, fb = factors[s_module]["A"], factors[s_module]["B"]
            if tuple(fb.shape) != (ms, fa.shape[0]) or fa.shape[1] != ns:
                die(f"{args.adapter}: {s_module} is {fb.shape[0]}x{fa.shape[1]}, "
                    f"but the source base's {s_tensor} is {ms}x{ns}")
            dtype = fa.dtype
            out_r[t_module] = fa.shape[0]
            out_alpha[t_module] = pattern_value(config.get("alpha_pattern"), s_module,
                                                config.get("lora_alpha", 8))
            with timer("load"):
                b = fb.to(device=device, dtype=torch.float32)
                a = fa.to(device=device, dtype=torch.float32)
            comparable = ms == mt or ns == nt
            bs = bt = None
            if mode in DECOMPOSING or (args.threshold > 0 and comparable):
                bases = []
                for ckpt, name in ((src, s_tensor), (tgt, t_tensor)):
                    with timer("load"):
                        w = ckpt.read(name, device)
                    with timer("svd"):
                        bases.append(truncated_svd(w, k, args, name))
                    del w
                bs, bt = bases
                with timer("similarity"):
                    if ms == mt:
                        row["similarity_u"] = similarity(bs[0], bt[0])
                    if ns == nt:
                        row["similarity_v"] = similarity(bs[1], bt[1])
            with timer("project"):
                b_t, a_t = transfer(mode, b, a, bs, bt, (mt, nt))
                su, sv = row["similarity_u"], row["similarity_v"]
                sim = (su + sv) / 2 if su is not None and sv is not None else None
                row["similarity"], row["transferred"] = sim, True
                if sim is not None and args.threshold > 0 and f32(sim) < f32(args.threshold):
                    b_t = torch.zeros_like(b_t)
                    row["transferred"] = False
                    row["reason"] = f"similarity {sim:.4f} below threshold {args.threshold}"
                elif sim is None and args.threshold > 0:
                    row["reason"] = "threshold not applied: shapes differ, so similarity is undefined"
                before = update_norm(b, a)
                row["energy_kept"] = update_norm(b_t, a_t) / before if before > 0 else None
        out_tensors[f"{PREFIX}{t_module}.lora_A.weight"] = a_t.to(dtype).cpu().contiguous()
        out_tensors[f"{PREFIX}{t_module}.lora_B.weight"] = b_t.to(dtype).cpu().contiguous()

    for j, i in layer_map.items():
        for kind in kinds:
            pairs = [(kind, kind)] if "{e}" not in kind else [
                (kind.format(e=es), kind.format(e=et)) for et, es in enumerate(expert_map[j][0])]
            for s_key, t_key in pairs:
                run_pair(i, j, s_key, t_key)

    with timer("write"):
        cfg = dict(config, base_model_name_or_path=args.target_base)
        cfg.setdefault("target_modules", sorted({k.rsplit(".", 1)[1] for k in kinds}))
        for key in ("layers_to_transform", "layers_pattern"):
            if key in cfg:
                cfg[key] = None
        cfg["rank_pattern"] = {re.escape(mod): r for mod, r in sorted(out_r.items()) if r != config["r"]}
        cfg["alpha_pattern"] = {re.escape(mod): a for mod, a in sorted(out_alpha.items())
                                if a != config.get("lora_alpha", 8)}
        staged = Path(f"{out}.tmp-{os.getpid()}")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        save_file(dict(sorted(out_tensors.items())), staged / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        (staged / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    report = dict(
        source_base=args.source_base, target_base=args.target_base, adapter=args.adapter,
        mode=args.mode, rank=args.rank, oversample=args.oversample, power_iters=args.power_iters,
        seed=args.seed, threshold=args.threshold,
        device=f"torch {torch.__version__} {device.type} ({dev}), svd {args.svd}",
        layer_map={str(j): i for j, i in layer_map.items()},
        expert_map={str(j): dict(source_layer=layer_map[j], source_experts=e, router_cosine=c)
                    for j, (e, c) in expert_map.items()},
        timings_ms={k: round(v, 3) for k, v in timer.ms.items()},
        summary=dict(
            transferred=sum(r["transferred"] for r in rows),
            skipped=sum(not r["transferred"] for r in rows),
            mean_similarity=mean([r["similarity"] for r in rows if r["similarity"] is not None]),
            mean_energy_kept=mean([r["energy_kept"] for r in rows
                                   if r["transferred"] and r["energy_kept"] is not None]),
            rank_capped=sum(r["rank_capped"] for r in rows),
            emptied=sum(r["transferred"] and r["energy_kept"] is not None
                        and r["energy_kept"] < 1e-6 for r in rows)),
        modules=rows)
    if auto_reason is not None:  # as loraxfer's report: only where auto chose
        report["auto_reason"] = auto_reason
    report["timings_ms"]["total"] = round((time.perf_counter() - wall) * 1e3, 3)
    (staged / "transfer_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    s = report["summary"]
    print(f"transferred {s['transferred']} of {len(rows)} modules, mean similarity "
          f"{s['mean_similarity']}, mean energy kept {s['mean_energy_kept']}, "
          f"{report['timings_ms']['total'] / 1e3:.2f} s -> {out}")


if __name__ == "__main__":
    main()
