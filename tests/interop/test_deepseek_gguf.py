"""DeepSeek-V3, DeepSeek-V2 (one `q_proj`, as V2-Lite) and GLM-4.7-Flash as llama.cpp stores them:
GGUF files written by llama.cpp's own `convert_hf_to_gguf.py` (`deepseek2`) from the two-layer
models of `test_experts_layers.py` (a dense layer, then experts with a shared expert). The
converter writes latent attention for its absorbed kernel: each layer's `kv_b_proj` split into
`attn_k_b` (every head's key rows transposed) and `attn_v_b`, the heads' sizes under `*_mla` keys,
`head_count_kv` 1. loraxfer joins `kv_b_proj` back on read, rebuilds the config transformers loads,
and transfers onto the GGUF exactly as onto the checkpoint."""

import json
import subprocess

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize
from safetensors.numpy import load_file

import interop_util as iu
from test_experts_layers import layered, projections, transfer, write_adapter
from test_gguf_lora import assert_same_lora, reference
from test_gpt_oss_gguf import llama_cpp_gguf

__all__ = ["layered"]  # the fixture, shared with test_experts_layers.py

FAMILIES = ["deepseek_v3", "deepseek_v2", "glm4_moe_lite"]
# What the converted config says of each: its model, and its query latent (None: one q_proj).
MODEL = {"deepseek_v3": ("deepseek_v3", 24), "deepseek_v2": ("deepseek_v2", None),
         "glm4_moe_lite": ("deepseek_v3", 24)}


@pytest.fixture(scope="module")
def ggufs(layered, tmp_path_factory):
    """(family, outtype) → (base checkpoint, llama.cpp's GGUF of it)."""
    root, get = layered
    made = {}

    def one(family, outtype):
        if (family, outtype) not in made:
            base = get(family)[0]
            out = tmp_path_factory.mktemp("deepseek-gguf") / f"{family}-{outtype}.gguf"
            made[(family, outtype)] = (base, llama_cpp_gguf(base, out, outtype))
        return made[(family, outtype)]

    return one


def joined_kv_b(path) -> dict:
    """{layer: kv_b_proj} rebuilt in numpy from the file's `attn_k_b` and `attn_v_b`, as the `gguf`
    package dequantizes them: each head's key rows (its `attn_k_b` block transposed), then its
    value rows."""
    stored = {t.name: dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
              for t in gguf.GGUFReader(str(path)).tensors}
    out = {}
    for name, k_b in stored.items():
        if name.endswith(".attn_k_b.weight"):
            layer = int(name.split(".")[1])
            v_b = stored[f"blk.{layer}.attn_v_b.weight"]
            out[layer] = np.concatenate([np.concatenate([k.T, v]) for k, v in zip(k_b, v_b)])
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_llama_cpps_gguf_reads_as_the_checkpoint_it_came_from(ggufs, family, outtype, binary, tmp_path):
    """Converted back, every tensor is the checkpoint's (in bf16, as the file rounds it), the
    joined `kv_b_proj` is the one numpy joins from the stored halves, bit for bit, and the config
    is one transformers loads into the checkpoint's model: the same logits."""
    base, path = ggufs(family, outtype)
    stored = gguf.GGUFReader(str(path))
    kinds = {t.name: t.tensor_type for t in stored.tensors}
    assert "blk.0.attn_kv_b.weight" not in kinds and "blk.1.attn_k_b.weight" in kinds
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", converted)
    ours = load_file(str(converted / "model.safetensors"))
    weights = load_file(str(base / "model.safetensors"))
    assert sorted(ours) == sorted(weights)
    for name, want in weights.items():
        tol = 0 if outtype == "f32" or ours[name].dtype == np.float32 and want.ndim == 1 else 2 ** -8
        got = ours[name].astype(np.float32)
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), (name, outtype)
    for layer, kv_b in joined_kv_b(path).items():
        got = ours[f"model.layers.{layer}.self_attn.kv_b_proj.weight"].astype(np.float32)
        assert np.array_equal(got, kv_b.astype(np.float32)), layer
    config = json.loads((converted / "config.json").read_text())
    want = json.loads((base / "config.json").read_text())
    model_type, q_lora_rank = MODEL[family]
    assert (config["model_type"], config["q_lora_rank"]) == (model_type, q_lora_rank)
    for key in ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_key_value_heads",
                "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_hidden_layers"]:
        assert config[key] == want[key], key
    if outtype == "f32":
        got = iu.logits(iu.load_model(converted))
        assert iu.max_rel_diff(got, iu.logits(iu.load_model(base))) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_transfer_onto_the_gguf_is_the_transfer_onto_the_checkpoint(layered, ggufs, family, binary, tmp_path):
    """The adapter on every projection, `kv_b_proj` included, rotated onto the GGUF (f32 and bf16)
    and onto the checkpoint it came from: the same updates, bit for bit from f32; from bf16 within
    3 % of each update's largest entry (the rounding moves the weights' subspaces a little: about
    1 % here)."""
    _, get = layered
    base, _, full, _ = get(family)
    onto = {"hf": tmp_path / "onto-hf"}
    transfer(binary, base, base, full, onto["hf"], "--mode", "rotate", "--rank", "16")
    want = iu.module_updates(onto["hf"])
    assert any("kv_b_proj" in m for m in want)
    for outtype in ["f32", "bf16"]:
        onto[outtype] = tmp_path / f"onto-{outtype}"
        transfer(binary, base, ggufs(family, outtype)[1], full, onto[outtype], "--mode", "rotate", "--rank", "16")
        got = iu.module_updates(onto[outtype])
        assert sorted(got) == sorted(want)
        for module, delta in want.items():
            err = np.abs(got[module] - delta).max() / np.abs(delta).max()
            assert err <= (0 if outtype == "f32" else 0.03), (outtype, module, err)


LATENT_INPUTS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "self_attn.q_proj")
UNADAPTED = ("attn_q_a.", "attn_q_b.", "attn_kv_a_mqa.", "attn_k_b.", "attn_v_b.", "attn_q.")


def test_a_lora_gguf_for_deepseek_equals_llama_cpp_conversion(layered, ggufs, binary, tmp_path):
    """`export-gguf` for a DeepSeek-V3 GGUF writes what llama.cpp's `convert_lora_to_gguf.py`
    writes for an adapter of the modules llama.cpp's graph adapts (`o_proj`; stacked experts; the
    shared expert; the dense layer). A LoRA on latent attention's input projections, which the
    graph multiplies without one, is refused, named, and nothing is written; so is a transfer with
    `--gguf-adapter` that would carry one, before any work, and the `--modules` list its message
    gives is taken: a LoRA GGUF of the other modules beside the PEFT adapter."""
    _, get = layered
    base, _, full, _ = get("deepseek_v3")
    _, path = ggufs("deepseek_v3", "f32")
    adapter = write_adapter(base, tmp_path / "taken", lambda m: not m.endswith(LATENT_INPUTS))
    got = tmp_path / "got.gguf"
    iu.loraxfer(binary, "export-gguf", "--adapter", adapter, "--base", path, "--out", got)
    assert_same_lora(got, reference(adapter, base, tmp_path / "want.gguf"))
    names = [t.name for t in gguf.GGUFReader(str(got)).tensors]
    for name in ["blk.1.attn_output.weight.lora_a", "blk.1.ffn_up_exps.weight.lora_a",
                 "blk.1.ffn_down_shexp.weight.lora_b", "blk.0.ffn_gate.weight.lora_a"]:
        assert name in names, name
    assert not any(u in n for n in names for u in UNADAPTED), names
    assert any(m.endswith("q_a_proj") for m in iu.module_updates(full))
    for module in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"):
        one = write_adapter(base, tmp_path / f"only-{module}", lambda m: m.endswith(module))
        refused = subprocess.run([str(binary), "export-gguf", "--adapter", str(one), "--base", str(path),
                                  "--out", str(tmp_path / "no.gguf")], capture_output=True, text=True)
        assert refused.returncode != 0 and module in refused.stderr and "without a LoRA" in refused.stderr, \
            refused.stderr
        assert not (tmp_path / "no.gguf").exists()

    args = [str(binary), "transfer", "--source-base", str(base), "--target-base", str(path), "--adapter",
            str(full), "--out", str(tmp_path / "out"), "--gguf-adapter"]
    refused = subprocess.run(args, capture_output=True, text=True)
    assert refused.returncode != 0 and "without a LoRA" in refused.stderr and "transfer:" not in refused.stderr, \
        refused.stderr
    assert not (tmp_path / "out").exists()
    modules = refused.stderr.split("--modules ")[1].split(")")[0]
    assert not any(m in modules.split(",") for m in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"))
    assert "o_proj" in modules.split(","), modules
    subprocess.run(args + ["--modules", modules], check=True, capture_output=True)
    names = [t.name for t in gguf.GGUFReader(str(tmp_path / "out" / "adapter_model.gguf")).tensors]
    assert "blk.1.attn_output.weight.lora_a" in names and not any(u in n for n in names for u in UNADAPTED)
