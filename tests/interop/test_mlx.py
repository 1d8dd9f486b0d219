"""MLX checkpoints, as mlx-lm writes them (`mlx_lm.convert -q`, the mlx-community releases): a
tiny Qwen2 loaded by mlx-lm, cast to bf16, quantized by mlx-lm's own `quantize_model` in each of
MLX's modes (affine at 3, 4 and 6 bits, mxfp4, nvfp4, mxfp8; a mixed recipe with 8-bit value
projections) and saved by its `save_model` and `save_config`. loraxfer reads each weight as MLX
dequantizes it in f32, bit for bit, so a transfer between such bases is the transfer between
their dequantizations."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import interop_util as iu

# {kind: (mode, group size, bits)}
KINDS = {"affine4": ("affine", 64, 4), "affine3": ("affine", 32, 3), "affine6": ("affine", 32, 6),
         "mxfp4": ("mxfp4", 32, 4), "nvfp4": ("nvfp4", 16, 4), "mxfp8": ("mxfp8", 32, 8)}


def mlx_checkpoint(hf_dir, out, kind: str, mixed: bool = False) -> dict:
    """{"mlx": `hf_dir` converted by mlx-lm in `kind` (`mixed`: value projections in 8 bits, as
    mlx-lm's mixed recipes write a module's own entry), "values": an f32 checkpoint of what MLX
    dequantizes each quantized weight to, the other tensors as mlx-lm saved them}."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    mode, group, bits = KINDS[kind]
    model, config = load_model(hf_dir)
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))

    def predicate(path, module):
        return {"group_size": 32, "bits": 8} if mixed and path.endswith("v_proj") else True

    model, config = quantize_model(model, config, group, bits, mode=mode, quant_predicate=predicate)
    d = out / f"{kind}-mlx"
    save_model(d, model)
    save_config(config, d / "config.json")
    (d / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())

    values = {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
    quantized = 0
    for path, m in model.named_modules():
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        # In f32: the affine scales and biases cast first, so that MLX computes in f32 too.
        biases = m.get("biases")
        scales = m.scales.astype(mx.float32) if biases is not None else m.scales
        if biases is not None:
            biases = biases.astype(mx.float32)
        w = mx.dequantize(m.weight, scales, biases, group_size=m.group_size, bits=m.bits, mode=m.mode,
                          dtype=mx.float32)
        values[f"{path}.weight"] = torch.from_numpy(np.array(w))
        for part in ("scales", "biases"):
            values.pop(f"{path}.{part}", None)
        quantized += 1
    assert quantized >= 2 * 6 + 1, quantized  # every projection the group size divides, and the embeddings
    dirs = iu.save_variants(hf_dir, out, {f"{kind}-values": (values, None)})
    return {"mlx": d, "values": dirs[f"{kind}-values"]}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two releases of a tiny Qwen2 (the second drifted) and a PEFT LoRA on the first."""
    root = tmp_path_factory.mktemp("mlx")
    return (root, *iu.two_releases(root, "qwen2", 2, 73))


@pytest.mark.parametrize("kind,mixed", [(k, False) for k in KINDS] + [("affine4", True)])
def test_mlx_weights_read_as_mlx_dequantizes_them(binary, pair, tmp_path, kind, mixed):
    _, first, _, _ = pair
    dirs = mlx_checkpoint(first, tmp_path, kind, mixed)
    config = json.loads((dirs["mlx"] / "config.json").read_text())
    assert config["quantization"]["mode"] == KINDS[kind][0]
    if mixed:
        assert config["quantization"]["model.layers.1.self_attn.v_proj"]["bits"] == 8
    read = tmp_path / "read"
    iu.loraxfer(binary, "synth", "model", "--derive-from", dirs["mlx"], "--drift", "0", "--out", read)
    got = load_file(str(read / "model.safetensors"))
    want = load_file(str(dirs["values"] / "model.safetensors"))
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k in want:
        assert torch.equal(got[k].float(), want[k].float()), k
    written = json.loads((read / "config.json").read_text())
    assert "quantization" not in written and "quantization_config" not in written


@pytest.mark.parametrize("kind", ["affine4", "mxfp4"])
def test_a_transfer_between_mlx_bases_is_the_transfer_between_their_dequantizations(binary, pair, tmp_path,
                                                                                    kind):
    _, first, second, lora = pair
    source = mlx_checkpoint(first, tmp_path / "first", kind)
    target = mlx_checkpoint(second, tmp_path / "second", kind)
    iu.assert_same_transfers(binary, {label: (source[label], target[label]) for label in ("mlx", "values")},
                             lora, tmp_path, 2 * 7)
