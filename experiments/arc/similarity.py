"""Summarize a loraxfer transfer_report.json per module type.

    python similarity.py REPORT.json [--label NAME]

Prints, per module type: how many modules, how many were transferred, and the minimum, median
and maximum of the subspace similarity (where defined: equal shapes) and of the energy of the
source update kept by the transfer, and the median σ_{k+1}/σ_k of the target weights (near 1: the
top-k subspace is weakly determined). For map transfers also the medians of the residual map's
fit on the layer (relative residual; 0 is exact) and of the matched units' similarity.
"""

import argparse
import json
import statistics
from collections import defaultdict


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def median(values):
    values = [v for v in values if v is not None]
    return f"{statistics.median(values):.3f}" if values else "—"


def summarize(path, label=None):
    report = json.load(open(path))
    rows = defaultdict(list)
    for m in report["modules"]:
        rows[m["module"]].append(m)
    title = label or path
    print(f"{title}: mode {report['mode']}, k={report['rank']}, threshold {report['threshold']}, "
          f"{report['summary']['transferred']} transferred, {report['summary']['skipped']} skipped")
    print("| module | n | transferred | similarity min / median / max | energy kept min / median / max "
          "| σ_k+1/σ_k (target) median | residual fit median | matched similarity median |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    for module in sorted(rows):
        ms = rows[module]
        print(f"| {module} | {len(ms)} | {sum(m['transferred'] for m in ms)} | "
              f"{spread(m['similarity'] for m in ms)} | {spread(m['energy_kept'] for m in ms)} | {median(m.get('gap_target') for m in ms)} | "
              f"{median(m.get('residual_fit') for m in ms)} | {median(m.get('matched_similarity') for m in ms)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report")
    ap.add_argument("--label")
    args = ap.parse_args()
    summarize(args.report, args.label)


if __name__ == "__main__":
    main()
