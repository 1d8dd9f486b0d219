"""A mixture-of-experts pair at Qwen3-30B-A3B's widths, to time and size transfers of MoE adapters.

    moe_pair.py OUT [--layers N] [--experts E] [--r R]

writes into OUT:
    base/     a Qwen3-MoE checkpoint (bf16) with Qwen3-30B-A3B's shapes: hidden 2048, 32 query and
              4 key/value heads of 128, E experts (128) of width 768 per layer, N layers (1), a
              small vocabulary (the embedding is not what is measured);
    release/  the same, every tensor drifted by 5% (routers too): a "next release";
    lora/     a PEFT adapter of rank R (16) on every attention projection and every expert's gate,
              up and down, one module per expert (as PEFT writes them for transformers 4).

docs/PERFORMANCE.md ("Mixture of experts") gives the commands and the figures.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, WIDTH, VOCAB = 2048, 32, 4, 128, 768, 1024


def config(layers: int, experts: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": HIDDEN,
        "intermediate_size": 6144, "moe_intermediate_size": WIDTH, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "num_experts": experts, "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def shapes(layers: int, experts: int) -> dict:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
           "lm_head.weight": (VOCAB, HIDDEN)}
    for l in range(layers):
        p = f"model.layers.{l}."
        out.update({
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": (HEAD_DIM,), p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate.weight": (experts, HIDDEN),
        })
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            out.update({q + "gate_proj.weight": (WIDTH, HIDDEN), q + "up_proj.weight": (WIDTH, HIDDEN),
                        q + "down_proj.weight": (HIDDEN, WIDTH)})
    return out


def write_model(path: str, tensors: dict, cfg: dict):
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    cfg = config(args.layers, args.experts)
    base, release = {}, {}
    for name, shape in shapes(args.layers, args.experts).items():
        if len(shape) == 1:
            w = torch.ones(shape)
        else:
            w = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        base[name] = w.to(torch.bfloat16)
        release[name] = (w * (1 + 0.05 * torch.randn(shape, generator=gen))).to(torch.bfloat16)
    write_model(os.path.join(args.out, "base"), base, cfg)
    write_model(os.path.join(args.out, "release"), release, cfg)
    lora = {}
    for name, shape in shapes(args.layers, args.experts).items():
        if len(shape) == 2 and (".self_attn." in name or ".experts." in name):
            module = "base_model.model." + name[: -len(".weight")]
            lora[module + ".lora_A.weight"] = (torch.randn(args.r, shape[1], generator=gen) * 0.02).to(torch.bfloat16)
            lora[module + ".lora_B.weight"] = (torch.randn(shape[0], args.r, generator=gen) * 0.02).to(torch.bfloat16)
    os.makedirs(os.path.join(args.out, "lora"), exist_ok=True)
    save_file(lora, os.path.join(args.out, "lora", "adapter_model.safetensors"))
    with open(os.path.join(args.out, "lora", "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": args.r, "lora_alpha": 2 * args.r,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                   "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": "base"}, f, indent=2)


if __name__ == "__main__":
    main()
