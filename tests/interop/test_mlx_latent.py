"""Latent attention as mlx-lm holds it (its DeepSeek-V3 port, which Kimi K2 shares, and
GLM-4.7-Flash's): each layer's `kv_b_proj` split per head into two MultiLinear weights,
`embed_q` `[heads, kv_lora_rank, qk_nope]` (the head's key rows, transposed) and `unembed_out`
`[heads, v_head, kv_lora_rank]` (its value rows), quantized like the rest. loraxfer rebuilds
`kv_b_proj` from them, so a transfer between two MLX releases is the one between their values,
bit for bit; mlx-lm's LoRA layers do not adapt the halves, so export-mlx refuses a LoRA on it."""

import pytest
from safetensors.numpy import load_file as np_load
from safetensors.torch import load_file

import interop_util as iu
import test_experts_layers as tel
from test_mlx import mlx_moe_checkpoint, rotated_alike, subprocess_run

# Widths the group size (32, MXFP4's) divides, so that mlx-lm quantizes both halves too.
LATENT = dict(kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=4, v_head_dim=32)


def build(family: str, seed: int):
    """A two-layer `family` model with the latent widths above, layer 0 dense."""
    kept, tel.LATENT = tel.LATENT, LATENT
    try:
        return tel.build(family, seed, dense=True)
    finally:
        tel.LATENT = kept


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe_lite"])
def test_latent_attention_moves_between_mlx_releases_as_between_their_values(binary, tmp_path, family):
    first = iu.save_model(build(family, 7), tmp_path / "first")
    (first / "tokenizer.json").write_text("{}")
    second = tmp_path / "second"
    iu.loraxfer(binary, "synth", "model", "--derive-from", first, "--drift", "0.05", "--seed", "3", "--out", second)
    lora = tel.write_adapter(first, tmp_path / "lora")
    assert any(".kv_b_proj." in k for k in np_load(str(lora / "adapter_model.safetensors")))
    pair = {label: mlx_moe_checkpoint(hf, tmp_path / label, "mxfp4", stacks=3)
            for label, hf in (("first", first), ("second", second))}
    stored = load_file(str(pair["first"]["mlx"] / "model.safetensors"))
    assert "model.layers.1.self_attn.embed_q.scales" in stored and "model.layers.1.self_attn.unembed_out.scales" in stored
    assert not any("kv_b_proj" in k for k in stored)
    assert any(".kv_b_proj." in k for k in rotated_alike(binary, pair, lora, tmp_path))
    # mlx-lm has no Linear for kv_b_proj to put a LoRA layer on.
    proc = subprocess_run(binary, "export-mlx", "--adapter", tmp_path / "rotate-mlx", "--base", pair["second"]["mlx"],
                          "--out", tmp_path / "exported")
    assert proc.returncode != 0 and "kv_b_proj` split per head" in proc.stderr, proc.stderr
    assert not (tmp_path / "exported").exists()
