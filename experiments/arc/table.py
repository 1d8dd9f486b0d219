"""Print a markdown table of evaluate.py results, with paired bootstrap intervals.

    python table.py RESULT.json ... [--baseline RESULT.json] [--reference RESULT.json]

Each row after a baseline gets Δ = its accuracy per character minus the baseline's on the same
items, with a 95 % interval from 2000 paired bootstrap resamples of the items: where the interval
excludes 0 the difference is more than the sampling noise of this test set. The margin is the
mean, over items, of the gold choice's log-likelihood per character minus the best wrong
choice's (positive: right with room to spare); it moves with smaller effects than accuracy, and
gets its own paired Δ and interval. With a reference (the LoRA trained directly on the target),
each row also gets the share of the reference's gain it reaches, its agreement with the
reference's predictions, and the mean KL(reference ‖ row) of the choice distributions (the
softmax of the choices' summed log-likelihoods): a transfer can gain for other reasons than the
adapter it carries.
"""

import argparse
import json
import math
import random


def paired_interval(a, b, rounds=2000, seed=0):
    rng = random.Random(seed)
    n = len(a)
    diffs = [x - y for x, y in zip(a, b)]
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return sum(diffs) / n, means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def margins(r):
    """Per item: gold's log-likelihood per character minus the best wrong choice's."""
    out = []
    for lp, ch, g in zip(r["logprobs"], r["chars"], r["gold"]):
        s = [x / c for x, c in zip(lp, ch)]
        out.append(s[g] - max(x for i, x in enumerate(s) if i != g))
    return out


def choice_distribution(lp):
    top = max(lp)
    e = [math.exp(x - top) for x in lp]
    z = sum(e)
    return [x / z for x in e]


def predictions(r):
    return [max(range(len(lp)), key=lambda c: lp[c] / ch[c]) for lp, ch in zip(r["logprobs"], r["chars"])]


def mean_kl(ref, r):
    total = 0.0
    for a, b in zip(ref["logprobs"], r["logprobs"]):
        p, q = choice_distribution(a), choice_distribution(b)
        total += sum(x * (math.log(x) - math.log(max(y, 1e-300))) for x, y in zip(p, q) if x > 0)
    return total / len(ref["logprobs"])


def same_items(a, b):
    if a["ids"] != b["ids"]:
        raise SystemExit(f"table.py: {a['label']} and {b['label']} were evaluated on different items")


def print_table(paths, baseline=None, reference=None):
    results = [json.load(open(p)) for p in paths]
    base = json.load(open(baseline)) if baseline else None
    ref = json.load(open(reference)) if reference else None
    has_lp = all("logprobs" in r for r in results + [x for x in (base, ref) if x])
    head = "| model | items | acc | acc_per_char | Δ per char vs base (95 % CI) | verdict |"
    rule = "|---|---:|---:|---:|---|---|"
    if has_lp:
        head += " margin | Δ margin (95 % CI) |"
        rule += "---:|---|"
    if ref and has_lp:
        head += " share of direct gain | agrees with direct | KL(direct ‖ row) |"
        rule += "---:|---:|---:|"
    print(head)
    print(rule)
    ref_gain = None
    if base and ref:
        same_items(ref, base)
        ref_gain = (ref["acc_per_char"] - base["acc_per_char"])
    for r in results:
        cells = [r["label"], str(r["items"]), f"{r['acc']:.3f}", f"{r['acc_per_char']:.3f}"]
        delta = verdict = ""
        if base and r["label"] != base["label"]:
            same_items(r, base)
            d, lo, hi = paired_interval(r["correct_per_char"], base["correct_per_char"])
            delta = f"{d * 100:+.1f} pt ({lo * 100:+.1f}, {hi * 100:+.1f})"
            verdict = "helped" if lo > 0 else "hurt" if hi < 0 else "no clear change"
        cells += [delta, verdict]
        if has_lp:
            m = margins(r)
            cells.append(f"{sum(m) / len(m):+.4f}")
            dm = ""
            if base and r["label"] != base["label"]:
                d, lo, hi = paired_interval(m, margins(base))
                dm = f"{d:+.4f} ({lo:+.4f}, {hi:+.4f})"
            cells.append(dm)
        if ref and has_lp:
            same_items(r, ref)
            share = ""
            if ref_gain and base and r["label"] != base["label"]:
                share = f"{(r['acc_per_char'] - base['acc_per_char']) / ref_gain * 100:.0f} %"
            agree = sum(a == b for a, b in zip(predictions(r), predictions(ref))) / r["items"]
            cells += [share, f"{agree:.3f}", f"{mean_kl(ref, r):.4f}"]
        print("| " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--baseline")
    ap.add_argument("--reference", help="the direct LoRA's result: gain share, agreement and KL per row")
    args = ap.parse_args()
    print_table(args.results, args.baseline, args.reference)


if __name__ == "__main__":
    main()
