"""FP8 checkpoints, as the releases that ship only in FP8 store them: every projection's weight
as float8_e4m3fn beside a scale it is multiplied by — one per block of
`quantization_config.weight_block_size` in `weight_scale_inv` (DeepSeek-V3, Qwen3-FP8), or one per
output row in `weight_scale` (compressed-tensors) — quantized here by torch. loraxfer reads each
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
            else:
                codes, scale, values = quantize(w.float(), [1, w.shape[1]], torch.bfloat16)
                stored[name + "_scale"] = scale
            stored[name] = codes
            dequantized[name] = values
        else:
            stored[name] = dequantized[name] = w
    config = json.loads((base / "config.json").read_text())
    dirs = {}
    for label, tensors, quant in [("fp8", stored, True), ("dequantized", dequantized, False)]:
        d = out / f"{kind}-{label}"
        d.mkdir(parents=True)
        c = dict(config)
        if quant:
            c["quantization_config"] = ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": BLOCK} if kind == "block"
                                        else {"quant_method": "compressed-tensors"})
        (d / "config.json").write_text(json.dumps(c))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        shutil.copy(base / "tokenizer.json", d / "tokenizer.json")
        dirs[label] = d
    return dirs


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two releases of a tiny Llama (the second drifted) and a PEFT LoRA on the first."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("fp8")
    first = iu.build_model("llama", 3, 61)
    second = iu.build_model("llama", 3, 61)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    a, b = iu.save_model(first, root / "first"), iu.save_model(second, root / "second")
    # A vocabulary for the map mode to pair the models' tokens through (the same in both).
    vocab = {f"w{i}": i for i in range(iu.COMMON["vocab_size"])}
    for d in (a, b):
        (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab,
                                                               "unk_token": "w0"}}))
    lora = iu.random_peft(first, LoraConfig(r=4, lora_alpha=8, target_modules=iu.TARGET_MODULES["llama"]), 5, 0.02)
    lora.save_pretrained(root / "lora")
    return root, a, b, root / "lora"


@pytest.mark.parametrize("kind", ["block", "row"])
def test_a_transfer_between_fp8_bases_is_the_transfer_between_their_dequantizations(binary, pair, tmp_path,
                                                                                   kind):
    root, first, second, lora = pair
    source, target = fp8_checkpoint(first, tmp_path / "first", kind), fp8_checkpoint(second, tmp_path / "second", kind)
    stored = load_torch(str(source["fp8"] / "model.safetensors"))
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    for mode in ("rotate", "map"):
        outs = {}
        for label in ("fp8", "dequantized"):
            outs[label] = tmp_path / f"{mode}-{label}"
            iu.loraxfer(binary, "transfer", "--source-base", source[label], "--target-base", target[label],
                        "--adapter", lora, "--out", outs[label], "--mode", mode, "--rank", "16")
        got = load_file(str(outs["fp8"] / "adapter_model.safetensors"))
        want = load_file(str(outs["dequantized"] / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and len(got) == 2 * 3 * 7, sorted(got)
        for k in got:
            assert np.array_equal(got[k], want[k]), f"{mode}: {k}"


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
