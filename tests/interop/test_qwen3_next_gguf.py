"""Qwen3-Next as llama.cpp stores it: GGUF files written by llama.cpp's own `convert_hf_to_gguf.py`
from a tiny Qwen3-Next with experts in every layer (llama.cpp's `qwen3next` has no dense MLP
tensors). The converter regroups linear attention's fused `in_proj_qkvz` (per key head its query,
key, value and gate rows) into `attn_qkv` (every query row, every key row, every value row) and
`attn_gate` (every gate row), keeps `in_proj_ba` as `ssm_ba`, and adds 1 to the norms. loraxfer
joins `in_proj_qkvz` back as it reads it, quantized or not, and transfers onto the GGUF exactly as
onto the checkpoint; a LoRA GGUF holds every module but `in_proj_qkvz`, which llama.cpp's LoRA
converter cannot regroup either."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from safetensors.numpy import load_file, save_file

import interop_util as iu
from test_gguf_lora import CONVERTER, assert_same_lora
from test_gpt_oss_gguf import llama_cpp_gguf
from test_qwen3_5 import MOE

R, ALPHA = 4, 8
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj", "gate_proj",
           "up_proj", "down_proj")


def adapter(base, out, keep=lambda module: True):
    """Random factors for every projection of the checkpoint `keep` accepts, one PEFT module each."""
    rng = np.random.default_rng(8)
    tensors = {}
    for name, w in sorted(load_file(str(base / "model.safetensors")).items()):
        module = name.removesuffix(".weight")
        if w.ndim == 2 and module.endswith(ADAPTED) and keep(module):
            tensors[f"{iu.PEFT_PREFIX}{module}.lora_A.weight"] = rng.normal(0, 0.3, (R, w.shape[1])).astype(np.float32)
            tensors[f"{iu.PEFT_PREFIX}{module}.lora_B.weight"] = rng.normal(0, 0.1, (w.shape[0], R)).astype(np.float32)
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    names = sorted({k.split(".lora_")[0].rsplit(".", 1)[1] for k in tensors})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base), r=R,
                  lora_alpha=ALPHA, target_modules=names, lora_dropout=0.0, bias="none")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def reference(adapter_dir, base, out):
    """llama.cpp's `convert_lora_to_gguf.py` of `adapter_dir`, with its model class told that the
    checkpoint has no prediction layer (as `convert_hf_to_gguf.py --no-mtp` tells it; the LoRA
    converter has no such flag, and Qwen3-Next's class asserts one otherwise)."""
    code = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); from conversion.base import ModelBase; "
            "ModelBase.no_mtp = True; sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    subprocess.run([sys.executable, "-c", code, str(CONVERTER.parent), str(CONVERTER), "--base", str(base),
                    "--outtype", "f32", "--outfile", str(out), str(adapter_dir)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    """(root, base, {outtype: llama.cpp's GGUF of it}, adapter on every projection)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("qwen3-next-gguf")
    torch.manual_seed(71)
    model = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**MOE, intermediate_size=80, num_hidden_layers=4)).eval()
    base = iu.save_model(model, root / "base")
    ggufs = {outtype: llama_cpp_gguf(base, root / f"base-{outtype}.gguf", outtype, "--no-mtp")
             for outtype in ("f32", "q8_0")}
    return root, base, ggufs, adapter(base, root / "lora")


def joined_qkvz(path) -> dict:
    """{layer: in_proj_qkvz} rebuilt in numpy from the file's `attn_qkv` and `attn_gate`, as the
    `gguf` package dequantizes them: per key head its query, key, value and gate rows."""
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    kh, hk = fields["qwen3next.ssm.group_count"], fields["qwen3next.ssm.state_size"]
    vr = fields["qwen3next.ssm.inner_size"] // kh
    stored = {t.name: dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
              for t in reader.tensors}
    out = {}
    for name, qkv in stored.items():
        if name.endswith(".attn_qkv.weight"):
            layer = int(name.split(".")[1])
            z = stored[f"blk.{layer}.attn_gate.weight"]
            q, k, v = np.split(qkv, [kh * hk, 2 * kh * hk])
            heads = [np.concatenate([q[h * hk:(h + 1) * hk], k[h * hk:(h + 1) * hk], v[h * vr:(h + 1) * vr],
                                     z[h * vr:(h + 1) * vr]]) for h in range(kh)]
            out[layer] = np.concatenate(heads)
    return out


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpps_gguf_reads_as_the_checkpoint_it_came_from(qwen3_next, outtype, binary, tmp_path):
    """Converted back, every projection, router and norm is the checkpoint's (in Q8_0 within its
    rounding), `in_proj_qkvz` the one numpy joins from the stored halves bit for bit, and only
    linear attention's own state (`A_log`, `dt_bias`, `conv1d`, its gated norm) is left out."""
    _, base, ggufs, _ = qwen3_next
    path = ggufs[outtype]
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    if outtype == "q8_0":
        assert kinds["blk.0.attn_qkv.weight"] == kinds["blk.0.attn_gate.weight"] == gguf.GGMLQuantizationType.Q8_0
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", converted)
    ours = load_file(str(converted / "model.safetensors"))
    weights = load_file(str(base / "model.safetensors"))
    state = (".A_log", ".dt_bias", ".conv1d.weight", "linear_attn.norm.weight")
    assert sorted(ours) == sorted(k for k in weights if not k.endswith(state))
    for name, got in ours.items():
        want = weights[name]
        err = np.abs(got - want).max()
        assert err <= (0 if outtype == "f32" else 1e-2 * np.abs(want).max()), (name, err)
    joined = joined_qkvz(path)
    assert sorted(joined) == [0, 1, 2]
    for layer, qkvz in joined.items():
        assert np.array_equal(ours[f"model.layers.{layer}.linear_attn.in_proj_qkvz.weight"], qkvz), layer
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "qwen3_next" and config["linear_num_value_heads"] == MOE["linear_num_value_heads"]


def test_a_transfer_onto_the_gguf_is_the_transfer_onto_the_checkpoint(qwen3_next, binary, tmp_path):
    """Every projection, `in_proj_qkvz` included, rotated onto the f32 GGUF and onto the checkpoint
    it came from: the same updates, bit for bit."""
    _, base, ggufs, lora = qwen3_next
    outs = {}
    for name, target in [("hf", base), ("gguf", ggufs["f32"])]:
        outs[name] = tmp_path / name
        iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", lora,
                    "--out", outs[name], "--mode", "rotate", "--rank", "16")
    got, want = iu.module_updates(outs["gguf"]), iu.module_updates(outs["hf"])
    assert sorted(got) == sorted(want) and any("in_proj_qkvz" in m for m in want)
    for module, delta in want.items():
        assert np.array_equal(got[module], delta), module


def test_a_lora_gguf_for_qwen3_next_equals_llama_cpp_conversion(qwen3_next, binary, tmp_path):
    """`export-gguf` for the Qwen3-Next GGUF writes what llama.cpp's `convert_lora_to_gguf.py`
    writes (`ssm_ba`, `ssm_out`, stacked experts, the shared expert, the softmax layer's
    attention); an adapter with `in_proj_qkvz` is refused, named, and nothing is written; so is a
    transfer with `--gguf-adapter` carrying one, before any work."""
    root, base, ggufs, full = qwen3_next
    lora = adapter(base, tmp_path / "no-qkvz", lambda m: not m.endswith("in_proj_qkvz"))
    got = tmp_path / "got.gguf"
    iu.loraxfer(binary, "export-gguf", "--adapter", lora, "--base", ggufs["f32"], "--out", got)
    assert_same_lora(got, reference(lora, base, tmp_path / "want.gguf"))
    names = [t.name for t in gguf.GGUFReader(str(got)).tensors]
    for name in ["blk.0.ssm_ba.weight.lora_a", "blk.0.ssm_out.weight.lora_b", "blk.3.attn_q.weight.lora_a",
                 "blk.1.ffn_up_exps.weight.lora_b", "blk.2.ffn_down_shexp.weight.lora_a"]:
        assert name in names, name
    for args in (["export-gguf", "--adapter", str(full), "--base", str(ggufs["f32"]), "--out", str(tmp_path / "no")],
                 ["transfer", "--source-base", str(base), "--target-base", str(ggufs["f32"]), "--adapter",
                  str(full), "--out", str(tmp_path / "no"), "--gguf-adapter"]):
        refused = subprocess.run([str(binary), *args], capture_output=True, text=True)
        assert refused.returncode != 0 and "in_proj_qkvz" in refused.stderr and "attn_gate" in refused.stderr, \
            refused.stderr
        assert "transfer:" not in refused.stderr and not (tmp_path / "no").exists()
