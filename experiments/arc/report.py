"""The tables of docs/EXPERIMENTS.md, from the per-item results in experiments/arc/results.

    python report.py --results DIR [--transfers DIR] [--times FILE]

Per target model: the headline table on all 1172 ARC-Challenge items (the rows evaluated on
all of them) and the table of every row on the seeded 500-item sample (rows evaluated on all
items enter it restricted to the sample's items), each against the base and the LoRA trained
directly on that target; then each row's per-module-type summary beside its accuracy, and for
the pruned sibling how much of the true correspondence each map transfer recovered; where a
second direct LoRA (another seed) was evaluated, each row's agreement and KL with the direct
LoRA against that seed's: the noise floor of "closer to the direct LoRA". Transfer
reports are read from --transfers when they are there; what is computed from them is kept in
the results folder, so the tables can be printed again without them.
"""

import argparse
import glob
import json
import math
import os
import sys
import tempfile

from table import choice_distribution, paired_interval, predictions, print_table

ROWS_FIRST = ("direct", "copy", "rotate", "map")


def load(path):
    return json.load(open(path))


def restrict(result, ids):
    """The result on a subset of its items, in the subset's order."""
    where = {i: n for n, i in enumerate(result["ids"])}
    missing = [i for i in ids if i not in where]
    if missing:
        raise SystemExit(f"report.py: {result['label']}: {len(missing)} items of the sample were not evaluated")
    pick = [where[i] for i in ids]
    out = dict(result)
    for key in ("correct_per_char", "correct_raw", "ids", "logprobs", "chars", "gold"):
        out[key] = [result[key][n] for n in pick]
    out["items"] = len(ids)
    out["acc"] = sum(out["correct_raw"]) / len(ids)
    out["acc_per_char"] = sum(out["correct_per_char"]) / len(ids)
    return out


def rows_of(folder):
    return {os.path.basename(p)[:-5]: p for p in sorted(glob.glob(os.path.join(folder, "*.json")))}


def order(names, model):
    def key(name):
        label = name.split("+", 1)[1] if "+" in name else ""
        first = [i for i, w in enumerate(ROWS_FIRST) if label.endswith(w)]
        return (name != model, not label == "direct", first[0] if first else len(ROWS_FIRST), label)
    return sorted(names, key=key)


def table(model, rows, tmp):
    """rows: name → result (same items). Written to temporary files for table.print_table."""
    paths = []
    for name in order(rows, model):
        p = os.path.join(tmp, name + ".json")
        with open(p, "w") as f:
            json.dump(rows[name], f)
        paths.append(p)
    base = os.path.join(tmp, model + ".json") if model in rows else None
    ref = os.path.join(tmp, model + "+direct.json") if model + "+direct" in rows else None
    print_table(paths, baseline=base, reference=ref)


def item_kl(ref, r):
    """Per item: KL(reference ‖ row) of the choice distributions."""
    out = []
    for a, b in zip(ref["logprobs"], r["logprobs"]):
        p, q = choice_distribution(a), choice_distribution(b)
        out.append(sum(x * (math.log(x) - math.log(max(y, 1e-300))) for x, y in zip(p, q) if x > 0))
    return out


def noise_floor(model, rows):
    """How far each row is from the direct LoRA, against how far the same training with another
    seed is: per item, agreement with the direct LoRA's prediction and KL(direct ‖ row), each
    row minus the other seed, with paired bootstrap intervals (negative agreement, positive KL:
    farther from the direct LoRA than retraining is)."""
    ref = rows.get(model + "+direct")
    seeds = sorted(n for n in rows if n.startswith(model + "+direct-seed"))
    if ref is None or not seeds:
        return
    floor = rows[seeds[0]]
    agree = lambda r: [float(a == b) for a, b in zip(predictions(r), predictions(ref))]
    floor_agree, floor_kl = agree(floor), item_kl(ref, floor)
    print(f"\n#### {model}: against the noise floor ({seeds[0].split('+', 1)[1]} vs direct)\n")
    print("| row | agrees with direct | − the other seed's (95 % CI) | KL(direct ‖ row) | − the other seed's (95 % CI) |")
    print("|---|---:|---|---:|---|")
    for name in order([n for n in rows if n not in (model, model + "+direct", *seeds)], model):
        r = rows[name]
        a, k = agree(r), item_kl(ref, r)
        da, dk = paired_interval(a, floor_agree), paired_interval(k, floor_kl)
        print(f"| {name} | {sum(a) / len(a):.3f} | {da[0]:+.3f} ({da[1]:+.3f}, {da[2]:+.3f}) "
              f"| {sum(k) / len(k):.4f} | {dk[0]:+.4f} ({dk[1]:+.4f}, {dk[2]:+.4f}) |")


def recovery(report, truth):
    """Shares of the pruned sibling's true correspondence a map transfer found."""
    layers = truth["layers"]
    m = report.get("map") or {}
    pairs = report.get("layer_map") or {}
    found = {"layers": sum(int(pairs.get(str(j), -1)) == i for j, i in enumerate(layers)) / len(layers)}
    hits = {"q_heads": [0, 0], "kv_heads": [0, 0], "neurons": [0, 0]}
    for lay in m.get("layers", []):
        j = lay["target_layer"]
        if lay["source_layer"] != layers[j]:
            continue  # units are compared only where the layer itself was paired right
        for unit, tally in hits.items():
            got, want = lay[unit], truth[unit][j]
            tally[0] += sum(g == w for g, w in zip(got, want))
            tally[1] += len(want)
    found.update({unit: (h / n if n else None) for unit, (h, n) in hits.items()})
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--transfers")
    ap.add_argument("--times")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tables(args, tmp)
    if args.times and os.path.exists(args.times):
        print("\n### wall times (2 cores)\n\n| step | s |\n|---|---:|")
        for line in open(args.times):
            label, secs = line.rstrip("\n").split("\t")
            print(f"| {label} | {secs} |")


def tables(args, tmp):
    for model in sorted(d for d in os.listdir(args.results) if os.path.isdir(os.path.join(args.results, d)) and d[0] != "."):
        folder = os.path.join(args.results, model)
        full = rows_of(os.path.join(folder, "all"))
        sample = rows_of(os.path.join(folder, "limit500"))
        if not full and not sample:
            continue
        if full:
            print(f"\n### {model}: all 1172 ARC-Challenge test items\n")
            table(model, {n: load(p) for n, p in full.items()}, tmp)
            noise_floor(model, {n: load(p) for n, p in full.items()})
        if sample:
            ids = load(next(iter(sample.values())))["ids"]
            rows = {n: restrict(load(p), ids) for n, p in full.items()}
            rows.update({n: load(p) for n, p in sample.items()})
            print(f"\n### {model}: the seeded 500-item sample\n")
            table(model, rows, tmp)
        truth_path = os.path.join(folder, "pruning.json")
        truth = load(truth_path)["truth"] if os.path.exists(truth_path) else None
        sims = sorted(glob.glob(os.path.join(folder, "*.similarity.md")))
        if sims:
            print(f"\n#### {model}: per module type\n")
        for s in sims:
            name = os.path.basename(s)[:-len(".similarity.md")]
            print(open(s).read())
            if truth is None or "map" not in name:
                continue
            cached = os.path.join(folder, name + ".recovery.json")
            rep = os.path.join(args.transfers or "", name, "transfer_report.json")
            if args.transfers and os.path.exists(rep):
                with open(cached, "w") as f:
                    json.dump(recovery(load(rep), truth), f)
            if os.path.exists(cached):
                r = load(cached)
                cells = ", ".join(f"{k} {v * 100:.0f} %" for k, v in r.items() if v is not None)
                print(f"True correspondence recovered ({name}): {cells}\n")


if __name__ == "__main__":
    sys.exit(main())
