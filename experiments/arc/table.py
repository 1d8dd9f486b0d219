"""Print a markdown table of evaluate.py results, with paired bootstrap intervals.

    python table.py RESULT.json ... [--baseline RESULT.json]

Each row after a baseline gets Δ = its accuracy per character minus the baseline's on the same
items, with a 95 % interval from 2000 paired bootstrap resamples of the items: where the interval
excludes 0 the difference is more than the sampling noise of this test set.
"""

import argparse
import json
import random


def paired_interval(a, b, rounds=2000, seed=0):
    rng = random.Random(seed)
    n = len(a)
    diffs = [x - y for x, y in zip(a, b)]
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return sum(diffs) / n, means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def print_table(paths, baseline=None):
    results = [json.load(open(p)) for p in paths]
    base = json.load(open(baseline)) if baseline else None
    print("| model | items | acc | acc_per_char | Δ per char vs base (95 % CI) | verdict |")
    print("|---|---:|---:|---:|---|---|")
    for r in results:
        delta, verdict = "", ""
        if base and r["label"] != base["label"]:
            if base["ids"] != r["ids"]:
                raise SystemExit(f"table.py: {r['label']} and {base['label']} were evaluated on different items")
            d, lo, hi = paired_interval(r["correct_per_char"], base["correct_per_char"])
            delta = f"{d * 100:+.1f} pt ({lo * 100:+.1f}, {hi * 100:+.1f})"
            verdict = "helped" if lo > 0 else "hurt" if hi < 0 else "no clear change"
        print(f"| {r['label']} | {r['items']} | {r['acc']:.3f} | {r['acc_per_char']:.3f} | {delta} | {verdict} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--baseline")
    args = ap.parse_args()
    print_table(args.results, args.baseline)


if __name__ == "__main__":
    main()
