#!/usr/bin/env python3
"""Compares two transferred adapters (e.g. loraxfer's and bench/torch_transfer.py's outputs).

For every module present in either adapter: the relative difference of the updates
    ‖s₁B₁A₁ − s₂B₂A₂‖_F / ‖s₂B₂A₂‖_F     (the second directory is the reference)
computed in factored form, in float64, from r × r products only:
    ‖BA‖² = Σ (BᵀB)∘(AAᵀ),   ⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂)∘(A₁A₂ᵀ),
so no out × in matrix is formed (s = lora_alpha / r, or / √r with rslora, per PEFT's patterns).
From the two transfer_report.json files: the differences of similarity_u, similarity_v,
similarity and energy_kept, and rows whose `transferred` flags disagree.

Prints max and median of each and the worst modules; exits 1 when the largest relative
difference exceeds --tol or a similarity differs by more than --sim-tol, or the adapters do not
hold the same modules. Two randomized SVDs with different test matrices agree only up to the
accuracy of their subspaces (which depends on the spectral gap at k, the oversampling and the
power iterations); with a clear gap they agree closely. Hence the loose default tolerance.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

PREFIX = "base_model.model."
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


def read_safetensors(path):
    """{name: float64 array}; numpy only (bf16 widened by hand), so no torch import is needed."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    out = {}
    for key, t in json.loads(data[8:8 + n]).items():
        if key == "__metadata__":
            continue
        buf = data[8 + n + t["data_offsets"][0]: 8 + n + t["data_offsets"][1]]
        if t["dtype"] == "BF16":
            x = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif t["dtype"] in DTYPES:
            x = np.frombuffer(buf, dtype=DTYPES[t["dtype"]])
        else:
            sys.exit(f"compare.py: {path}: tensor {key} has dtype {t['dtype']}")
        out[key] = x.reshape(t["shape"]).astype(np.float64)
    return out


def load(directory):
    d = Path(directory)
    cfg = json.loads((d / "adapter_config.json").read_text())
    mods = {}
    for key, x in read_safetensors(d / "adapter_model.safetensors").items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m:
            mods.setdefault(m.group(1), {})[m.group(2)] = x
    report_path = d / "transfer_report.json"
    rows = {}
    if report_path.is_file():
        for r in json.loads(report_path.read_text())["modules"]:
            rows[(r["target_key"], r["source_key"], str(r.get("target_rows")))] = r
    return cfg, mods, rows


def scale(cfg, module, r):
    def pattern(patterns, default):
        for k, v in (patterns or {}).items():
            if re.fullmatch(rf"(?:.*\.)?(?:{k})", module):
                return v
        return default
    alpha = pattern(cfg.get("alpha_pattern"), cfg.get("lora_alpha", 8))
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def gram(b1, a1, b2, a2):
    return float(((b1.T @ b2) * (a1 @ a2.T)).sum())


def stats(xs):
    xs = sorted(xs)
    if not xs:
        return None, None
    mid = len(xs) // 2
    return xs[-1], (xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2)


def fmt(x):
    return "n/a" if x is None else f"{x:.3e}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", help="output directory to check")
    p.add_argument("second", help="reference output directory (denominator of the relative difference)")
    p.add_argument("--tol", type=float, default=1e-2, help="largest relative update difference allowed")
    p.add_argument("--sim-tol", type=float, default=None, help="largest similarity difference (default: --tol)")
    p.add_argument("--show", type=int, default=5, help="worst modules to list")
    p.add_argument("--json", help="also write the summary to this file")
    args = p.parse_args()
    sim_tol = args.tol if args.sim_tol is None else args.sim_tol
    cfg1, m1, rows1 = load(args.first)
    cfg2, m2, rows2 = load(args.second)
    problems = []
    only = sorted(set(m1) ^ set(m2))
    if only:
        problems.append(f"{len(only)} modules in only one adapter, e.g. {only[0]}")

    rel = {}
    for name in sorted(set(m1) & set(m2)):
        f1, f2 = m1[name], m2[name]
        if f1["B"].shape[0] != f2["B"].shape[0] or f1["A"].shape[1] != f2["A"].shape[1]:
            problems.append(f"{name}: shapes differ")
            continue
        s1 = scale(cfg1, name, f1["A"].shape[0])
        s2 = scale(cfg2, name, f2["A"].shape[0])
        n11 = s1 * s1 * gram(f1["B"], f1["A"], f1["B"], f1["A"])
        n22 = s2 * s2 * gram(f2["B"], f2["A"], f2["B"], f2["A"])
        n12 = s1 * s2 * gram(f1["B"], f1["A"], f2["B"], f2["A"])
        diff = math.sqrt(max(n11 + n22 - 2 * n12, 0.0))
        rel[name] = 0.0 if diff == 0 else (diff / math.sqrt(n22) if n22 > 0 else math.inf)

    dsim = {"similarity_u": {}, "similarity_v": {}, "similarity": {}, "energy_kept": {}}
    flips = []
    for key in sorted(set(rows1) & set(rows2)):
        r1, r2 = rows1[key], rows2[key]
        if r1["transferred"] != r2["transferred"]:
            flips.append(key[0])
        for field, d in dsim.items():
            x, y = r1.get(field), r2.get(field)
            if (x is None) != (y is None):
                problems.append(f"{key[0]}: {field} is {x} vs {y}")
            elif x is not None:
                d[key[0]] = abs(x - y) if field != "energy_kept" else abs(x - y) / max(abs(y), 1e-30)
    if rows1 and rows2 and set(rows1) != set(rows2):
        problems.append(f"{len(set(rows1) ^ set(rows2))} report rows in only one report")
    if flips:
        problems.append(f"{len(flips)} modules transferred in one and skipped in the other, e.g. {flips[0]}")

    max_rel, med_rel = stats(list(rel.values()))
    print(f"compared {len(rel)} modules: {args.first} vs {args.second} (reference)")
    print(f"  update  ‖Δ(sBA)‖/‖sBA‖   max {fmt(max_rel)}  median {fmt(med_rel)}")
    for name in sorted(rel, key=rel.get, reverse=True)[: args.show]:
        print(f"      {rel[name]:.3e}  {name}")
    summary = {"modules": len(rel), "max_rel": max_rel, "median_rel": med_rel}
    for field, d in dsim.items():
        mx, md = stats(list(d.values()))
        what = "|Δ| (relative)" if field == "energy_kept" else "|Δ|"
        print(f"  {field:<13} {what:<15} max {fmt(mx)}  median {fmt(md)}")
        summary[f"max_d_{field}"] = mx
        if mx is not None and field.startswith("similarity") and mx > sim_tol:
            problems.append(f"{field} differs by up to {mx:.3e} (> {sim_tol:g})")
    if max_rel is not None and max_rel > args.tol:
        problems.append(f"updates differ by up to {max_rel:.3e} (> {args.tol:g})")
    if not rel:
        problems.append("no module to compare")
    summary["problems"] = problems
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    for msg in problems:
        print(f"  DISAGREE: {msg}")
    print("  agree within tolerance" if not problems else "  FAIL")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
