"""Qwen3.5 and its mixtures of experts as mlx-lm converts them: the language model of a
(multimodal) release under `language_model.model.layers`, the vision tower left behind, the
experts stacked (`switch_mlp`), and the norm weights, which the Hugging Face forward uses as
1 + w, shifted by 1, as mlx-lm's forward uses them. loraxfer reads them as such: a transfer
between two MLX releases is the one between their values as transformers stores them."""

import json

import pytest
import torch
from safetensors.torch import load_file

import interop_util as iu
from test_mlx import assert_updates_close, mlx_checkpoint, mlx_lora, mlx_updates
from test_qwen3_5 import hybrid_moe  # noqa: F401 (a fixture)


QWEN35_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                ".q_norm.weight", ".k_norm.weight")


@pytest.fixture(scope="module")
def qwen35_mlx(tmp_path_factory, binary):
    """{"first"/"second": {"mlx": a 4-bit MLX conversion, "values": its dequantized values with
    the norms as Hugging Face stores them}}, of a tiny Qwen3.5 release and the next, and "lora":
    a PEFT LoRA on the first (every projection of both attention kinds and the MLP)."""
    import test_qwen3_5 as q

    root = tmp_path_factory.mktemp("mlx-qwen3_5")
    base = iu.save_model(q.build(4, 51, multimodal=True), root / "base")
    # A word-level vocabulary (the same in both) for the map mode to pair tokens through.
    vocab = {f"w{i}": i for i in range(iu.COMMON["vocab_size"])}
    (base / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab,
                                                               "unk_token": "w0"}}))
    release = root / "release"
    iu.loraxfer(binary, "synth", "model", "--derive-from", base, "--drift", "0.05", "--seed", "3",
                "--out", release)
    made = {"lora": q.peft_lora(base, root / "lora")}
    for label, hf in (("first", base), ("second", release)):
        dirs = mlx_checkpoint(hf, root / label, "affine4")
        stored = load_file(str(dirs["mlx"] / "model.safetensors"))
        assert "language_model.model.layers.3.self_attn.q_proj.weight" in stored
        assert not any("visual" in k or "vision" in k for k in stored)
        hf_norm = load_file(str(hf / "model.safetensors"))["model.language_model.layers.0.input_layernorm.weight"]
        shifted = stored["language_model.model.layers.0.input_layernorm.weight"].float()
        assert torch.allclose(shifted, hf_norm.float() + 1, atol=1e-2)
        values = load_file(str(dirs["values"] / "model.safetensors"))
        unshifted = {k: (v - 1 if k.endswith(QWEN35_NORMS) else v) for k, v in values.items()}
        dirs["values"] = iu.save_variants(dirs["values"], root / label, {"hf-values": (unshifted, None)})["hf-values"]
        made[label] = dirs
    return made


def test_transfers_between_mlx_qwen3_5_bases_are_those_between_their_values(binary, qwen35_mlx, tmp_path):
    """Rotate and map mode between two MLX Qwen3.5 releases give the adapter they give between
    the releases' values with the norms as Hugging Face stores them, bit for bit: the layers are
    found under `language_model.model.layers`, and the map takes mlx-lm's shift off the gains."""
    pairs = {label: (qwen35_mlx["first"][label], qwen35_mlx["second"][label]) for label in ("mlx", "values")}
    iu.assert_same_transfers(binary, pairs, qwen35_mlx["lora"], tmp_path, 4 * 3 + 3 * 5 + 4)
    # A copy derived from the MLX release keeps mlx-lm's conventions and says so (`format: mlx`):
    # read as such, it gives the same adapter.
    derived = tmp_path / "derived"
    iu.loraxfer(binary, "synth", "model", "--derive-from", qwen35_mlx["first"]["mlx"], "--drift", "0",
                "--out", derived)
    from safetensors import safe_open
    with safe_open(str(derived / "model.safetensors"), "np") as f:
        assert f.metadata()["format"] == "mlx"
    pairs = {"derived": (derived, qwen35_mlx["second"]["mlx"]), "mlx": pairs["mlx"]}
    iu.assert_same_transfers(binary, pairs, qwen35_mlx["lora"], tmp_path / "again", 4 * 3 + 3 * 5 + 4)


def test_an_mlx_lm_lora_on_qwen3_5_moves_to_the_next_mlx_release(binary, qwen35_mlx, tmp_path):
    """mlx-lm's own LoRA on the MLX Qwen3.5 (its modules under `language_model.model.layers`)
    moves to the next MLX release and, exported, loads there with the transferred update."""
    source, target = qwen35_mlx["first"]["mlx"], qwen35_mlx["second"]["mlx"]
    made = mlx_lora(source, tmp_path / "made", rank=4, scale=10.0, seed=7)
    assert any(k.startswith("language_model.model.layers.0.linear_attn.") for k in
               load_file(str(made / "adapters.safetensors")))
    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", source, "--target-base", target, "--adapter", made,
                "--out", out, "--mode", "rotate", "--rank", "16")
    updates = iu.module_updates(out)
    assert len(updates) == 4 * 3 + 3 * 5 + 4, sorted(updates)[:5]
    exported = tmp_path / "exported"
    iu.loraxfer(binary, "export-mlx", "--adapter", out, "--base", target, "--out", exported)
    got = mlx_updates(target, exported)
    assert_updates_close({k.replace("language_model.model.layers.", "model.layers."): v for k, v in got.items()},
                         {k.replace("language_model.model.layers.", "model.layers.")
                             .replace("model.language_model.layers.", "model.layers."): v for k, v in updates.items()})


def as_released_moe(hf_dir, out):
    """The Qwen3.5-MoE checkpoint in `hf_dir` (transformers' text-only class: one tensor per
    expert) as mlx-lm's port loads a release: its config's `model_type` the release's
    `qwen3_5_moe`, and each layer's experts fused, `mlp.experts.gate_up_proj` `[E, 2·width,
    hidden]` (the gates' rows, then the up projections') and `down_proj` `[E, hidden, width]`."""
    d = iu.copy_dir(hf_dir, out)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, model_type="qwen3_5_moe")))
    tensors = load_file(str(d / "model.safetensors"))
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts"
        count = config["num_experts"]
        take = lambda proj: torch.stack([tensors.pop(f"{p}.{e}.{proj}.weight") for e in range(count)])
        gate, up, down = take("gate_proj"), take("up_proj"), take("down_proj")
        tensors[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1).contiguous()
        tensors[f"{p}.down_proj"] = down.contiguous()
    from safetensors.torch import save_file
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_a_lora_moves_between_mlx_qwen3_5_moe_releases_as_between_their_values(binary, hybrid_moe, tmp_path):
    """Qwen3.5-MoE's MLX releases: the layers under `language_model.model.layers`, the experts in
    `switch_mlp` stacks beside the shared expert and its gate. PEFT's LoRA on the fused experts
    and every projection rotates between two of them as between their values, bit for bit."""
    from test_mlx import mlx_moe_checkpoint, rotated_alike

    _, base, release, lora = hybrid_moe("qwen3_5_moe")
    pairs = {}
    for label, hf in (("first", base), ("second", release)):
        (hf / "tokenizer.json").exists() or (hf / "tokenizer.json").write_text("{}")
        staged = as_released_moe(hf, tmp_path / f"{label}-released")
        dirs = mlx_moe_checkpoint(staged, tmp_path / label, "affine4", stacks=3 * 4)
        stored = load_file(str(dirs["mlx"] / "model.safetensors"))
        assert "language_model.model.layers.0.mlp.switch_mlp.gate_proj.scales" in stored
        assert "language_model.model.layers.0.mlp.shared_expert_gate.weight" in stored
        values = load_file(str(dirs["values"] / "model.safetensors"))
        unshifted = {k: (v - 1 if k.endswith(QWEN35_NORMS) else v) for k, v in values.items()}
        dirs["values"] = iu.save_variants(staged, tmp_path / label, {"hf-values": (unshifted, None)})["hf-values"]
        pairs[label] = dirs
    assert any(".experts.3." in k for k in rotated_alike(binary, pairs, lora, tmp_path))
