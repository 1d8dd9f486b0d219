"""GPT-OSS as mlx-lm holds it: each layer's experts in a SwitchGLU named `experts`
(`mlp.experts.gate_proj`, `up_proj` and `down_proj`, each `[E, out, in]`: the gate's and the up
projection's outputs, which the Hugging Face checkpoint alternates in `gate_up_proj`, split
apart), quantized by mlx-lm's own `quantize_model`. loraxfer reads each expert's weight out of
those stacks under the names its GPT-OSS table gives them, so a transfer between MLX releases is
the one between their values in the Hugging Face layout; mlx-lm's own LoRA (its router's update
left out) moves between them and, exported, loads onto the target as its stacks."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as torch_load

import interop_util as iu
import test_gpt_oss as g
from test_mlx import KINDS, assert_updates_close, mlx_lora, mlx_updates, subprocess_run


def mlx_layout(hf: dict) -> dict:
    """The Hugging Face GPT-OSS tensors in mlx-lm's layout: `gate_up_proj` `[E, hidden, 2·width]`
    split into `gate_proj` (even outputs) and `up_proj` (odd), `down_proj` `[E, width, hidden]`,
    each turned to `[E, out, in]`, and their biases beside them."""
    out = {}
    for k, v in hf.items():
        head, _, param = k.rpartition(".experts.")
        if not head:
            out[k] = v
        elif param == "gate_up_proj":
            for name, start in (("gate_proj", 0), ("up_proj", 1)):
                out[f"{head}.experts.{name}.weight"] = np.ascontiguousarray(v[:, :, start::2].transpose(0, 2, 1))
        elif param == "gate_up_proj_bias":
            for name, start in (("gate_proj", 0), ("up_proj", 1)):
                out[f"{head}.experts.{name}.bias"] = np.ascontiguousarray(v[:, start::2])
        elif param == "down_proj":
            out[f"{head}.experts.down_proj.weight"] = np.ascontiguousarray(v.transpose(0, 2, 1))
        elif param == "down_proj_bias":
            out[f"{head}.experts.down_proj.bias"] = v
        else:
            raise AssertionError(k)
    return out


def hf_layout(mlx: dict) -> dict:
    """The inverse of `mlx_layout`."""
    out = {}
    for k, v in mlx.items():
        head, _, param = k.rpartition(".experts.")
        if not head:
            out[k] = v
        elif param == "gate_proj.weight":
            up = mlx[f"{head}.experts.up_proj.weight"]
            fused = np.empty((v.shape[0], v.shape[2], 2 * v.shape[1]), v.dtype)
            fused[:, :, 0::2], fused[:, :, 1::2] = v.transpose(0, 2, 1), up.transpose(0, 2, 1)
            out[f"{head}.experts.gate_up_proj"] = fused
        elif param == "gate_proj.bias":
            up = mlx[f"{head}.experts.up_proj.bias"]
            fused = np.empty((v.shape[0], 2 * v.shape[1]), v.dtype)
            fused[:, 0::2], fused[:, 1::2] = v, up
            out[f"{head}.experts.gate_up_proj_bias"] = fused
        elif param == "down_proj.weight":
            out[f"{head}.experts.down_proj"] = np.ascontiguousarray(v.transpose(0, 2, 1))
        elif param == "down_proj.bias":
            out[f"{head}.experts.down_proj_bias"] = v
    return out


def mlx_gpt_oss(hf_dir, out, kind: str) -> dict:
    """{"mlx": the GPT-OSS checkpoint in `hf_dir` as mlx-lm holds it, cast to bf16 and quantized
    by mlx-lm in `kind`, "values": the Hugging Face checkpoint of what MLX dequantizes (or
    holds) each tensor to, in f32}."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    staged = iu.copy_dir(hf_dir, out / f"{kind}-staged")
    save_file(mlx_layout(load_file(str(hf_dir / "model.safetensors"))), str(staged / "model.safetensors"),
              metadata={"format": "pt"})
    model, config = load_model(staged)
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))
    mode, group, bits = KINDS[kind]
    model, config = quantize_model(model, config, group, bits, mode=mode)
    d = out / f"{kind}-mlx"
    save_model(d, model)
    save_config(config, d / "config.json")
    (d / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    stored = torch_load(str(d / "model.safetensors"))
    assert "model.layers.1.mlp.experts.gate_proj.scales" in stored, sorted(stored)[:8]
    values = {k: v.float().numpy() for k, v in stored.items() if v.is_floating_point()}
    for path, m in model.named_modules():
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
            continue
        biases = m.get("biases")
        scales = m.scales.astype(mx.float32) if biases is not None else m.scales
        w = mx.dequantize(m.weight, scales, None if biases is None else biases.astype(mx.float32),
                          group_size=m.group_size, bits=m.bits, mode=m.mode, dtype=mx.float32)
        values[f"{path}.weight"] = np.array(w)
        for part in ("scales", "biases"):
            values.pop(f"{path}.{part}", None)
    dirs = iu.save_variants(hf_dir, out, {f"{kind}-values": (hf_layout(values), None)})
    return {"mlx": d, "values": dirs[f"{kind}-values"]}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, binary):
    """{"first"/"second": {kind: {"mlx", "values"}}} of a tiny GPT-OSS and its next release, and
    "lora": PEFT's LoRA on the first (attention by name, the experts' fused parameters)."""
    root = tmp_path_factory.mktemp("mlx-gpt-oss")
    base = iu.save_model(g.build(41), root / "base")
    (base / "tokenizer.json").write_text("{}")
    release = root / "release"
    iu.loraxfer(binary, "synth", "model", "--derive-from", base, "--drift", "0.05", "--seed", "3",
                "--out", release)
    made = {"lora": g.fused_adapter("gpt_oss", base, root / "lora", by_name=["q_proj", "k_proj", "v_proj", "o_proj"])}
    for label, hf in (("first", base), ("second", release)):
        made[label] = {kind: mlx_gpt_oss(hf, root / label, kind) for kind in ("affine4", "mxfp4")}
    return made


@pytest.mark.parametrize("kind", ["affine4", "mxfp4"])
def test_a_lora_moves_between_mlx_gpt_oss_releases_as_between_their_values(binary, pair, tmp_path, kind):
    """PEFT's LoRA on the fused experts, rotated (and copied) between two MLX releases, is the
    adapter the same transfer gives between their values in the Hugging Face layout, bit for bit:
    each expert's gate, up and down read out of mlx-lm's stacks are the rows the Hugging Face
    `gate_up_proj` alternates."""
    for mode in ("rotate", "copy"):
        got = {}
        for label in ("mlx", "values"):
            out = tmp_path / f"{mode}-{label}"
            iu.loraxfer(binary, "transfer", "--source-base", pair["first"][kind][label], "--target-base",
                        pair["second"][kind][label], "--adapter", pair["lora"], "--out", out, "--mode", mode,
                        "--rank", "16")
            got[label] = load_file(str(out / "adapter_model.safetensors"))
        assert got["mlx"].keys() == got["values"].keys() and any("experts" in k for k in got["mlx"])
        for k in got["values"]:
            assert np.array_equal(got["mlx"][k], got["values"][k]), f"{mode}: {k}"


def test_an_mlx_lm_lora_on_gpt_oss_moves_and_loads_as_its_stacks(binary, pair, tmp_path):
    """mlx-lm's own LoRA on the MLX GPT-OSS adapts attention, the router (`mlp.router`) and the
    experts' stacks (LoRASwitchLinear on `mlp.experts.gate_proj`, …). The router's update is
    refused by name; with --drop-router the rest moves to the next release (written as PEFT's
    LoRA on the fused parameters, the only form for GPT-OSS), and export-mlx with the target
    writes the experts back as `mlp.experts` stacks, which mlx-lm loads with the transferred
    update."""
    source, target = pair["first"]["mxfp4"]["mlx"], pair["second"]["mxfp4"]["mlx"]
    made = mlx_lora(source, tmp_path / "made", rank=4, scale=10.0, seed=8)
    stored = load_file(str(made / "adapters.safetensors"))
    assert stored["model.layers.1.mlp.experts.down_proj.lora_a"].shape == (g.EXPERTS, 4, g.WIDTH)
    assert "model.layers.1.mlp.router.lora_a" in stored
    # Exported back without a base, each stack goes where it was read from: the file mlx-lm saved.
    back = tmp_path / "back"
    iu.loraxfer(binary, "export-mlx", "--adapter", made, "--out", back)
    again = load_file(str(back / "adapters.safetensors"))
    assert again.keys() == stored.keys()
    for k in stored:
        assert np.array_equal(again[k], stored[k]), k
    proc = subprocess_run(binary, "transfer", "--source-base", source, "--target-base", target, "--adapter", made,
                          "--out", tmp_path / "refused", "--mode", "rotate")
    assert proc.returncode != 0 and "`model.layers.0.mlp.router` (and 1 more) adapts a routing gate" in proc.stderr, \
        proc.stderr
    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", source, "--target-base", target, "--adapter", made,
                "--out", out, "--mode", "rotate", "--rank", "16", "--drop-router")
    transferred = g.updates(out)
    assert sum(".experts." in k for k in transferred) == 2 * g.EXPERTS * 3
    # Without the base, a LoRA on fused parameters cannot be read: their layout is the family's.
    proc = subprocess_run(binary, "export-mlx", "--adapter", out, "--out", tmp_path / "no-base")
    assert proc.returncode != 0 and "give --base" in proc.stderr, proc.stderr
    exported = tmp_path / "exported"
    iu.loraxfer(binary, "export-mlx", "--adapter", out, "--base", target, "--out", exported)
    written = load_file(str(exported / "adapters.safetensors"))
    params = json.loads((exported / "adapter_config.json").read_text())["lora_parameters"]
    # (The fused form gives gate and up one wrapper: each expert's gate reads back at its rank.)
    rank = params["rank"]
    assert written["model.layers.0.mlp.experts.gate_proj.lora_a"].shape == (g.EXPERTS, rank, g.HIDDEN)
    assert "mlp.experts.gate_proj" in params["keys"] and not any("switch_mlp" in k for k in params["keys"])
    assert_updates_close(mlx_updates(target, exported), transferred)
