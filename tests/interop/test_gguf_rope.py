"""Rotary scaling through a GGUF: tiny models with the long-context settings of the releases
(Llama 3.1/3.2's and Llama 4's `llama3` scaling, linear scaling, Qwen's YaRN, Phi-3's LongRoPE,
DeepSeek's YaRN with its softmax scale, EXAONE 4's `llama3`), converted by llama.cpp's own
`convert_hf_to_gguf.py` — which keeps Llama 3's parameters only as the per-frequency factors of
`rope_freqs.weight` and Phi-3's as two factor tensors — and back by `convert --gguf`. The
converted model turns queries and keys at the checkpoint's frequencies and gives its logits."""

import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import interop_util as iu
from test_experts_layers import build as build_experts
from test_gpt_oss_gguf import llama_cpp_gguf

LLAMA3 = dict(rope_type="llama3", low_freq_factor=1.0, original_max_position_embeddings=8192)
# Wide heads, as the releases' (64 and 32 dimensions: several or one frequency between the
# bands that `llama3` scales by 1 and by the whole factor).
WIDE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
NARROW = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
LONG = dict(max_position_embeddings=131072)

# name → (config class, its fields, rope parameters)
CASES = {
    "llama-3.1": ("LlamaConfig", WIDE, dict(LLAMA3, factor=8.0, high_freq_factor=4.0, rope_theta=500000.0)),
    "llama-3.2-narrow": ("LlamaConfig", NARROW, dict(LLAMA3, factor=32.0, high_freq_factor=4.0,
                                                      rope_theta=500000.0)),
    "llama-4-bands": ("LlamaConfig", WIDE, dict(LLAMA3, factor=16.0, high_freq_factor=1.0, rope_theta=500000.0)),
    "llama-linear": ("LlamaConfig", {}, dict(rope_type="linear", factor=4.0, rope_theta=10000.0)),
    "exaone4-llama3": ("Exaone4Config", WIDE, dict(LLAMA3, factor=8.0, high_freq_factor=4.0, rope_theta=500000.0)),
    "qwen2-yarn": ("Qwen2Config", {}, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768,
                                           rope_theta=1000000.0)),
    "qwen2-yarn-tuned": ("Qwen2Config", {}, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096,
                                                 beta_fast=16.0, beta_slow=2.0, attention_factor=1.25,
                                                 rope_theta=10000.0)),
    "phi3-longrope": ("Phi3Config", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                         original_max_position_embeddings=4096),
                      dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=4096,
                           partial_rotary_factor=1.0,
                           long_factor=list(np.linspace(1.0, 40.0, 32)), short_factor=list(np.linspace(1.0, 3.0, 32)))),
    "deepseek-v3-yarn": (None, {}, dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                                        beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707,
                                        rope_theta=10000.0)),
}


def checkpoint(name: str, out: Path) -> Path:
    """The tiny model of case `name`, saved with its rope parameters."""
    import transformers as tf

    cls, fields, rope = CASES[name]
    if cls is None:  # DeepSeek-V3 with a dense layer and one of experts
        model = build_experts("deepseek_v3", 31, True)
    else:
        config = getattr(tf, cls)(**{**iu.COMMON, "num_hidden_layers": 2, "tie_word_embeddings": False,
                                     **LONG, **fields})
        config.rope_parameters = dict(rope)
        torch.manual_seed(31)
        model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.config.rope_parameters = dict(rope)
    return iu.save_model(model, out)


def rotary(model) -> dict:
    """The rotary embedding's frequencies and scale (every rotary module of the model)."""
    found = {}
    for path, module in model.named_modules():
        if hasattr(module, "inv_freq"):
            found[f"{path}.inv_freq"] = module.inv_freq.double().numpy()
            found[f"{path}.attention_scaling"] = np.float64(module.attention_scaling)
    assert found, "no rotary embedding"
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_rotary_scaling_comes_back_through_llama_cpps_gguf(binary, tmp_path, name):
    original = checkpoint(name, tmp_path / "checkpoint")
    path = llama_cpp_gguf(original, tmp_path / "model.gguf")
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", converted)
    want_model, got_model = iu.load_model(original), iu.load_model(converted)
    want_rope, got_rope = want_model.config.rope_parameters, got_model.config.rope_parameters
    for key, value in want_rope.items():
        assert key in got_rope, (key, got_rope)
        if isinstance(value, str):
            assert got_rope[key] == value, (key, got_rope[key])
        else:
            assert np.allclose(got_rope[key], value, rtol=1e-6, atol=0), (key, got_rope[key], value)
    want, got = rotary(want_model), rotary(got_model)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert np.allclose(got[key], value, rtol=1e-6, atol=0), key
    # The scaling matters: unscaled frequencies are others.
    inv_freq = next(v for k, v in want.items() if k.endswith("inv_freq"))
    dims = 2 * inv_freq.size
    unscaled = 1.0 / want_rope["rope_theta"] ** (np.arange(0, dims, 2) / dims)
    assert not np.allclose(inv_freq, unscaled, rtol=1e-3), "the case scales nothing"
    assert iu.max_rel_diff(iu.logits(got_model), iu.logits(want_model)) < 1e-5


def test_factors_no_scaling_gives_are_refused_with_the_file_and_tensor(binary, tmp_path):
    """A `rope_freqs.weight` that no Llama 3 parameters give stops `convert --gguf` before it
    writes anything: the weights would be right and the model's positions wrong."""
    original = checkpoint("llama-3.1", tmp_path / "checkpoint")
    path = llama_cpp_gguf(original, tmp_path / "model.gguf")
    bad = tmp_path / "bad.gguf"
    shutil.copy(path, bad)
    reader = gguf.GGUFReader(str(bad), "r+")
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    factors[: factors.size // 2] = 2.0  # the high frequencies scaled as much as the lowest
    reader.data.flush()
    del reader
    out = tmp_path / "converted"
    proc = subprocess.run([str(binary), "convert", "--gguf", str(bad), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "bad.gguf" in proc.stderr and "rope_freqs.weight" in proc.stderr, proc.stderr
    assert "not Llama 3's" in proc.stderr, proc.stderr
    assert not out.exists()
