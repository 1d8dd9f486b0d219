"""Every family a GGUF is read for, as llama.cpp stores it: tiny transformers models converted by
llama.cpp's own `convert_hf_to_gguf.py` (f32) and back by `convert --gguf` load with no key
missing or unexpected and give the checkpoint's logits — the config rebuilt from the metadata
(head width, norms, multipliers, windows, experts) is the model's. GPT-OSS, Llama 4, DeepSeek,
Qwen3.5 and Qwen3-Next have files of their own; rotary scaling is `test_gguf_rope.py`'s."""

import json

import pytest

import interop_util as iu
from test_experts import build as build_experts
from test_experts_layers import build as build_layered
from test_gpt_oss_gguf import llama_cpp_gguf

DENSE = list(iu.MODEL_TYPE)
# Experts in every layer: llama.cpp's converter cannot write a Qwen MoE with a dense layer.
EXPERTS = {"qwen3_moe": lambda: build_experts("qwen3_moe", 41), "mixtral": lambda: build_experts("mixtral", 42),
           "olmoe": lambda: build_experts("olmoe", 43), "qwen2_moe": lambda: build_layered("qwen2_moe", 44, False),
           "glm4_moe": lambda: build_layered("glm4_moe", 45, True)}
# Converters that write their own norm epsilon whatever the config says (OLMoE's 1e-5; the
# `chatglm` converter reads ChatGLM's `layernorm_epsilon`, which transformers' GLM does not
# have): the tiny models use it.
LLAMA_CPP_EPS = {"olmoe": 1e-5, "glm": 1e-5}


def checkpoint(name: str, out):
    model = EXPERTS[name]() if name in EXPERTS else iu.build_model(name, 2, 40)
    if name in LLAMA_CPP_EPS:
        model.config.rms_norm_eps = LLAMA_CPP_EPS[name]
    iu.save_model(model, out)
    if name == "gemma3":
        # Gemma 3's converter trims the embedding to the tokenizer's vocabulary.
        vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
        (out / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    return out


@pytest.mark.parametrize("name", DENSE + list(EXPERTS))
def test_llama_cpps_gguf_converts_back_to_the_model_it_came_from(binary, tmp_path, name):
    from transformers import AutoModelForCausalLM

    original = checkpoint(name, tmp_path / "checkpoint")
    path = llama_cpp_gguf(original, tmp_path / "model.gguf")
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", converted)
    with iu.quiet():
        _, info = AutoModelForCausalLM.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    got, want = iu.load_model(converted), iu.load_model(original)
    assert got.config.model_type == want.config.model_type
    assert iu.max_rel_diff(iu.logits(got), iu.logits(want)) < 1e-6


def test_a_large_model_is_written_in_shards_transformers_loads(binary, tmp_path):
    """Past `--max-shard-size` the weights are shards with `save_pretrained`'s names and index,
    and the model loads from them as from one file."""
    import json as json_

    from safetensors.numpy import load_file

    original = checkpoint("llama", tmp_path / "checkpoint")
    path = llama_cpp_gguf(original, tmp_path / "model.gguf")
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", one)
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", sharded, "--max-shard-size", "100KB")
    index = json_.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors", files
    assert not (sharded / "model.safetensors").exists()
    whole = load_file(str(one / "model.safetensors"))
    parts = {}
    for f in files:
        part = load_file(str(sharded / f))
        assert sum(v.nbytes for v in part.values()) <= 100_000 or len(part) == 1, f
        assert all(index["weight_map"][k] == f for k in part), f
        parts.update(part)
    assert sorted(parts) == sorted(whole) and index["metadata"]["total_size"] == sum(v.nbytes for v in whole.values())
    for name, value in whole.items():
        assert (parts[name] == value).all(), name
    got, want = iu.load_model(sharded), iu.load_model(original)
    assert iu.max_rel_diff(iu.logits(got), iu.logits(want)) < 1e-6
