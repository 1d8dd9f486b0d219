"""FP8 checkpoints, as the releases that ship only in FP8 store them: every projection's weight
as float8_e4m3fn beside a scale it is multiplied by — one per block of
`quantization_config.weight_block_size` in `weight_scale_inv` (DeepSeek-V3, Qwen3-FP8), one per
block of its config groups' `block_structure` in `weight_scale` (compressed-tensors' FP8-block), or
one per output row in `weight_scale` (compressed-tensors) — quantized here by torch. loraxfer reads each
weight as torch dequantizes it (`w.float() * scale`), so a transfer between FP8 bases is the
transfer between their f32 dequantizations, bit for bit, in rotate and in map mode."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file

import interop_util as iu

BLOCK = [16, 32]  # the MLP's 176 columns end in a partial block
# DeepSeek's form; compressed-tensors' FP8-block scheme (its block in the config groups); and
# compressed-tensors' FP8 per row.
QUANTIZATION_CONFIG = {
    "block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": BLOCK},
    "ct-block": {"quant_method": "compressed-tensors", "format": "float-quantized",
                 "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                     "num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                     "block_structure": BLOCK}}}},
    "row": {"quant_method": "compressed-tensors"},
}


def quantize(w: torch.Tensor, block, scale_dtype):
    """(codes, scale, dequantized): `block` rows × columns share a scale, amax / 448, stored as
    `scale_dtype`."""
    out, inn = w.shape
    br, bc = block
    rows, cols = -(-out // br), -(-inn // bc)
    padded = torch.zeros(rows * br, cols * bc)
    padded[:out, :inn] = w
    amax = padded.reshape(rows, br, cols, bc).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)).to(scale_dtype)
    full = scale.float().repeat_interleave(br, 0).repeat_interleave(bc, 1)[:out, :inn]
    codes = (w / full).to(torch.float8_e4m3fn)
    return codes, scale, codes.to(torch.float32) * full


def fp8_checkpoint(base, out, kind: str):
    """`base` with its projections in FP8 (`kind`: "block" or "row"), and the f32 checkpoint of
    the values torch dequantizes them to."""
    weights = load_torch(str(base / "model.safetensors"))
    stored, dequantized = {}, {}
    for name, w in weights.items():
        if name.endswith("_proj.weight"):
            if kind == "block":
                codes, scale, values = quantize(w.float(), BLOCK, torch.float32)
                stored[name + "_scale_inv"] = scale
            elif kind == "ct-block":
                codes, scale, values = quantize(w.float(), BLOCK, torch.bfloat16)
                stored[name + "_scale"] = scale
            else:
                codes, scale, values = quantize(w.float(), [1, w.shape[1]], torch.bfloat16)
                stored[name + "_scale"] = scale
            stored[name] = codes
            dequantized[name] = values
        else:
            stored[name] = dequantized[name] = w
    dirs = iu.save_variants(base, out, {f"{kind}-fp8": (stored, QUANTIZATION_CONFIG[kind]),
                                        f"{kind}-dequantized": (dequantized, None)})
    return {"fp8": dirs[f"{kind}-fp8"], "dequantized": dirs[f"{kind}-dequantized"]}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two releases of a tiny Llama (the second drifted) and a PEFT LoRA on the first."""
    root = tmp_path_factory.mktemp("fp8")
    return (root, *iu.two_releases(root, "llama", 3, 61))


@pytest.mark.parametrize("kind", list(QUANTIZATION_CONFIG))
def test_a_transfer_between_fp8_bases_is_the_transfer_between_their_dequantizations(binary, pair, tmp_path,
                                                                                   kind):
    root, first, second, lora = pair
    source, target = fp8_checkpoint(first, tmp_path / "first", kind), fp8_checkpoint(second, tmp_path / "second", kind)
    stored = load_torch(str(source["fp8"] / "model.safetensors"))
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    iu.assert_same_transfers(binary, {label: (source[label], target[label]) for label in ("fp8", "dequantized")},
                             lora, tmp_path, 3 * 7)


def test_an_fp8_weight_without_its_scale_is_refused_by_name(binary, pair, tmp_path):
    _, first, _, lora = pair
    fp8 = fp8_checkpoint(first, tmp_path, "block")["fp8"]
    tensors = load_torch(str(fp8 / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight_scale_inv"]
    save_file(tensors, str(fp8 / "model.safetensors"))
    proc = subprocess.run([str(binary), "transfer", "--source-base", str(fp8), "--target-base", str(fp8),
                           "--adapter", str(lora), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "model.layers.1.self_attn.k_proj.weight" in proc.stderr and "without its scale" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
    shutil.rmtree(fp8)


def test_a_model_derived_from_an_fp8_checkpoint_holds_its_values_without_scales(binary, pair, tmp_path):
    """`synth model --derive-from` writes an FP8 checkpoint's weights as their values: no scale
    tensors, no FP8 `quantization_config`, and transformers loads the copy."""
    _, first, _, _ = pair
    fp8 = fp8_checkpoint(first, tmp_path / "first", "block")["fp8"]
    derived = tmp_path / "derived"
    iu.loraxfer(binary, "synth", "model", "--derive-from", fp8, "--drift", "0.01", "--seed", "2", "--out", derived)
    tensors = load_file(str(derived / "model.safetensors"))
    assert not [k for k in tensors if "_scale" in k]
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == np.float32
    assert "quantization_config" not in json.loads((derived / "config.json").read_text())
    iu.load_model(derived)
