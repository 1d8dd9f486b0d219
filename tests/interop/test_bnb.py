"""bitsandbytes checkpoints, as transformers saves a model loaded in 4 or 8 bits (the
`-bnb-4bit` releases many LoRAs are trained on): every projection of a tiny Qwen2 quantized by
bitsandbytes itself (NF4 with double quantization, FP4, LLM.int8()) and stored with its quant
state as `Params4bit` / `Int8Params` save it. loraxfer reads each weight as bitsandbytes
dequantizes it (in f32), bit for bit, so a transfer between such bases is the transfer between
their dequantizations."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import interop_util as iu

KINDS = {"nf4": ("nf4", True), "fp4": ("fp4", False), "int8": (None, None)}


def quantized(kind: str, name: str, w: torch.Tensor):
    """The tensors bitsandbytes stores for `name` (`<module>.weight`) in `kind`, and the values
    it dequantizes them to."""
    import bitsandbytes.functional as F

    quant_type, nested = KINDS[kind]
    if quant_type is None:
        codes, scb, _ = F.int8_vectorwise_quant(w)
        module = name.removesuffix(".weight")
        return ({name: codes, f"{module}.SCB": scb, f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)},
                F.int8_vectorwise_dequant(codes, scb))
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type,
                                    quant_storage=torch.uint8)
    tensors = {name: packed}
    tensors.update({f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()})
    # bitsandbytes' PyTorch reference of its dequantization, whose blocks run over the whole
    # tensor as its quantizer's (and CUDA's) do: its CPU kernel blocks each row apart, which
    # differs where a row is not whole blocks (the MLP's 176 inputs).
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code(quant_type, packed.device)
    return tensors, _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), code, 64, state.shape, torch.float32)


def quantization_config(kind: str) -> dict:
    quant_type, nested = KINDS[kind]
    if quant_type is None:
        return {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": nested,
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"}


def bnb_checkpoint(base, out, kind: str):
    """{"bnb": `base` with its projections in `kind`, "values": the f32 checkpoint of the values
    bitsandbytes dequantizes them to}."""
    from safetensors.torch import load_file as load_torch

    stored, values = {}, {}
    for name, w in load_torch(str(base / "model.safetensors")).items():
        if name.endswith("_proj.weight"):
            tensors, v = quantized(kind, name, w.float())
            stored.update(tensors)
            values[name] = v.float()
        else:
            stored[name] = values[name] = w
    dirs = iu.save_variants(base, out, {f"{kind}-bnb": (stored, quantization_config(kind)),
                                        f"{kind}-values": (values, None)})
    return {"bnb": dirs[f"{kind}-bnb"], "values": dirs[f"{kind}-values"]}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two releases of a tiny Qwen2 (the second drifted) and a PEFT LoRA on the first."""
    root = tmp_path_factory.mktemp("bnb")
    return (root, *iu.two_releases(root, "qwen2", 2, 72))


@pytest.mark.parametrize("kind", list(KINDS))
def test_bnb_weights_read_as_bitsandbytes_dequantizes_them(binary, pair, tmp_path, kind):
    _, first, _, _ = pair
    dirs = bnb_checkpoint(first, tmp_path, kind)
    read = tmp_path / "read"
    iu.loraxfer(binary, "synth", "model", "--derive-from", dirs["bnb"], "--drift", "0", "--out", read)
    got = load_file(str(read / "model.safetensors"))
    want = load_file(str(dirs["values"] / "model.safetensors"))
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    assert "quantization_config" not in json.loads((read / "config.json").read_text())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_transfer_between_bnb_bases_is_the_transfer_between_their_dequantizations(binary, pair, tmp_path,
                                                                                    kind):
    _, first, second, lora = pair
    source = bnb_checkpoint(first, tmp_path / "first", kind)
    target = bnb_checkpoint(second, tmp_path / "second", kind)
    iu.assert_same_transfers(binary, {label: (source[label], target[label]) for label in ("bnb", "values")},
                             lora, tmp_path, 2 * 7)


def test_peft_loads_an_adapter_transferred_onto_a_bnb_base_on_that_base(binary, pair, tmp_path):
    """transformers loads the 4-bit checkpoint into bitsandbytes' `Linear4bit` layers (on its
    CPU backend), and PEFT puts the transferred adapter on them with no key missing or
    unexpected and every factor as the file holds it."""
    from transformers import AutoModelForCausalLM

    _, first, second, lora = pair
    target = bnb_checkpoint(second, tmp_path / "second", "nf4")["bnb"]
    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", first, "--target-base", target, "--adapter", lora,
                "--out", out, "--mode", "rotate", "--rank", "16")
    with iu.quiet():
        model, info = AutoModelForCausalLM.from_pretrained(target, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    peft_model = iu.load_peft_strict(model, out)
    q = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    assert type(q.base_layer).__name__ == "Linear4bit"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(target)
