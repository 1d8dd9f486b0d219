"""Integer-packed checkpoints, as the quantized releases most served models come in: every
projection of a tiny Qwen2 rounded here to a few bits per group of inputs and packed as GPTQ
(AutoGPTQ's `pack`, with activation order), AWQ (AutoAWQ's GEMM `from_linear`) or
compressed-tensors' `pack-quantized` lays it out. loraxfer reads each weight as its integer levels
times their scales, which is what llama.cpp's own converter dequantizes GPTQ and compressed-tensors
checkpoints to (the reference here; it reads no AWQ, whose values are checked against the levels
packed), so a transfer between packed bases is the transfer between their dequantizations, bit
for bit."""

import json
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import interop_util as iu
from test_gpt_oss_gguf import llama_cpp_gguf

GROUP = 16  # the MLP's 176 inputs are 11 groups
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
# Layout: (bits, symmetric, activation order).
LAYOUTS = {"gptq": (4, False, True), "gptq_v2": (8, False, True), "awq": (4, False, False),
           "ct4": (4, False, False), "ct8": (8, True, False)}


def levels(w: np.ndarray, bits: int, symmetric: bool, g_idx: np.ndarray, min_zero: int):
    """(codes [out, in], zero points and f16 scales [out, groups]): `w` rounded to `bits`-bit
    levels per group of inputs (`g_idx`: each input's group), as unsigned stored values, the zero
    points at least `min_zero`."""
    out, inn = w.shape
    groups = int(g_idx.max()) + 1
    top = (1 << bits) - 1
    codes = np.zeros((out, inn), np.int64)
    zeros = np.zeros((out, groups), np.int64)
    scales = np.ones((out, groups), np.float16)
    for g in range(groups):
        x = w[:, g_idx == g]
        if symmetric:
            s = (np.abs(x).max(axis=1) / (top // 2)).astype(np.float16)
            z = np.full(out, 1 << (bits - 1))
        else:
            lo, hi = np.minimum(x.min(axis=1), 0), np.maximum(x.max(axis=1), 0)
            s = ((hi - lo) / top).astype(np.float16)
        s = np.where(s == 0, np.float16(1), s)
        if not symmetric:
            z = np.clip(np.round(-lo / s.astype(np.float32)), min_zero, top).astype(np.int64)
        codes[:, g_idx == g] = np.clip(np.round(x / s.astype(np.float32)[:, None]) + z[:, None], 0, top)
        zeros[:, g], scales[:, g] = z, s
    return codes, zeros, scales


def pack_words(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """`values` packed `32/bits` to an int32 word along `axis`, the first in the low bits."""
    per = 32 // bits
    v = np.moveaxis(values.astype(np.uint64), axis, 0)
    v = v.reshape(v.shape[0] // per, per, *v.shape[1:])
    shifts = (bits * np.arange(per, dtype=np.uint64)).reshape(per, *([1] * (v.ndim - 2)))
    words = (v << shifts).sum(axis=1).astype(np.uint32)
    return np.ascontiguousarray(np.moveaxis(words, 0, axis)).view(np.int32)


def packed_tensors(layout: str, module: str, w: np.ndarray, seed: int):
    """The tensors that stand for `<module>.weight` in `layout`, and the values they hold."""
    bits, symmetric, act_order = LAYOUTS[layout]
    g_idx = np.arange(w.shape[1]) // GROUP
    if act_order:
        g_idx = np.random.default_rng(seed).permutation(g_idx)
    # The `gptq` format stores a zero point less one, so it cannot store a zero point of 0.
    codes, zeros, scales = levels(w, bits, symmetric, g_idx, 1 if layout == "gptq" else 0)
    values = (codes - zeros[:, g_idx]).astype(np.float32) * scales[:, g_idx].astype(np.float32)
    if layout.startswith("gptq"):
        # AutoGPTQ: codes packed down the inputs, zero points (less one in the `gptq` format)
        # along the outputs, scales [groups, out], each input's group in g_idx.
        stored_zeros = zeros - 1 if layout == "gptq" else zeros
        t = {".qweight": pack_words(codes.T, bits, 0), ".qzeros": pack_words(stored_zeros.T, bits, 1),
             ".scales": scales.T.copy(), ".g_idx": g_idx.astype(np.int32)}
    elif layout == "awq":
        # AutoAWQ's from_linear: word c of an input's row holds output 8c + AWQ_ORDER[k] at nibble k.
        order = np.array([c * 8 + o for c in range(w.shape[0] // 8) for o in AWQ_ORDER])
        t = {".qweight": pack_words(codes.T[:, order], 4, 1), ".qzeros": pack_words(zeros.T[:, order], 4, 1),
             ".scales": scales.T.copy()}
    else:
        # compressed-tensors: codes and zero points stored plus 2^(bits-1) (a symmetric scheme's
        # zero point is that offset and is not stored), each row's codes packed along it, the
        # zero points down the outputs, scales [out, groups] in the model's dtype.
        t = {".weight_packed": pack_words(codes, bits, 1), ".weight_shape": np.array(w.shape, np.int64),
             ".weight_scale": scales.astype(np.float32)}
        if not symmetric:
            t[".weight_zero_point"] = pack_words(zeros, bits, 0)
    return {module + k: v for k, v in t.items()}, values


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def nvfp4_tensors(layout: str, module: str, w: np.ndarray):
    """NVFP4 as compressed-tensors (`nvfp4-ct`) or ModelOpt (`nvfp4-modelopt`) stores it: E2M1
    codes two a byte, an F8_E4M3 scale per 16 inputs relative to a tensor-wide scale
    `g = 448·6 / amax`; and the values they hold (compressed-tensors divides the group's scale
    by `g`, ModelOpt multiplies the product by `1/g`)."""
    x = torch.from_numpy(w)
    out, inn = x.shape
    g = torch.tensor([448.0 * 6.0]) / x.abs().max()
    groups = x.reshape(out, inn // 16, 16)
    scale = (groups.abs().amax(dim=2) / 6.0 * g).clamp(min=2.0 ** -6).to(torch.float8_e4m3fn)
    step = (scale.float() / g).unsqueeze(-1)
    codes = (groups / step).unsqueeze(-1).sub(E2M1).abs().argmin(dim=-1).reshape(out, inn)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    levels = E2M1[codes]
    if layout == "nvfp4-ct":
        values = levels * (scale.float() / g).repeat_interleave(16, dim=1)
        t = {".weight_packed": packed, ".weight_scale": scale, ".weight_global_scale": g}
    else:
        values = (levels * scale.float().repeat_interleave(16, dim=1)) * (1.0 / g)
        t = {".weight": packed, ".weight_scale": scale, ".weight_scale_2": 1.0 / g, ".input_scale": torch.ones(1)}
    return {module + k: v for k, v in t.items()}, values.numpy()


def quantization_config(layout: str) -> dict:
    if layout == "nvfp4-ct":
        weights = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16}
        return {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": "nvfp4-pack-quantized"}}}
    if layout == "nvfp4-modelopt":
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "ignore": ["lm_head"]}
    bits, symmetric, act_order = LAYOUTS[layout]
    if layout.startswith("gptq"):
        return {"quant_method": "gptq", "bits": bits, "group_size": GROUP, "desc_act": act_order, "sym": symmetric,
                "checkpoint_format": layout}
    if layout == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True}
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": GROUP}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}


def packed_checkpoint(base, out, layout: str, keep: str = "-"):
    """{"packed": `base` with its projections packed in `layout` (but those whose names hold
    `keep`), "values": the f32 checkpoint of the values they hold}."""
    weights = load_file(str(base / "model.safetensors"))
    stored, values = {}, {}
    for k, (name, w) in enumerate(sorted(weights.items())):
        if name.endswith("_proj.weight") and keep not in name:
            module = name.removesuffix(".weight")
            if layout.startswith("nvfp4"):
                parts, v = nvfp4_tensors(layout, module, w.astype(np.float32))
            else:
                parts, v = packed_tensors(layout, module, w.astype(np.float32), k)
            stored.update(parts)
            values[name] = v
        else:
            stored[name] = values[name] = w
    dirs = iu.save_variants(base, out, {f"{layout}-packed": (stored, quantization_config(layout)),
                                        f"{layout}-values": (values, None)})
    return {"packed": dirs[f"{layout}-packed"], "values": dirs[f"{layout}-values"]}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two releases of a tiny Qwen2 (the second drifted) and a PEFT LoRA on the first."""
    root = tmp_path_factory.mktemp("packed")
    return (root, *iu.two_releases(root, "qwen2", 2, 71))


def read_as_values(binary, base, out, layout):
    """`base` packed in `layout` as loraxfer reads it, checked against the values packed; both."""
    dirs = packed_checkpoint(base, out, layout)
    got = read_back(binary, dirs["packed"], out / "read")
    want = load_file(str(dirs["values"] / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    return got, want


def read_back(binary, model, out):
    """The checkpoint as loraxfer reads it: `synth model --derive-from` with no drift writes every
    weight's values."""
    iu.loraxfer(binary, "synth", "model", "--derive-from", model, "--drift", "0", "--out", out)
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_weights_read_as_their_levels_times_their_scales(binary, pair, tmp_path, layout):
    """Every weight reads as the levels packed times their scales; where llama.cpp's converter
    reads the layout (GPTQ, compressed-tensors), as it dequantizes them too."""
    _, first, _, _ = pair
    got, want = read_as_values(binary, first, tmp_path, layout)
    if layout == "awq":
        return
    gguf = llama_cpp_gguf(tmp_path / f"{layout}-packed", tmp_path / "model.gguf")
    iu.loraxfer(binary, "convert", "--gguf", gguf, "--out", tmp_path / "llama-cpp")
    reference = load_file(str(tmp_path / "llama-cpp" / "model.safetensors"))
    assert reference.keys() == want.keys()
    for k in reference:
        assert np.array_equal(got[k], reference[k]), k


@pytest.mark.parametrize("layout", ["gptq", "awq", "ct4", "nvfp4-ct"])
def test_a_transfer_between_packed_bases_is_the_transfer_between_their_values(binary, pair, tmp_path, layout):
    _, first, second, lora = pair
    source = packed_checkpoint(first, tmp_path / "first", layout)
    target = packed_checkpoint(second, tmp_path / "second", layout)
    iu.assert_same_transfers(binary, {label: (source[label], target[label]) for label in ("packed", "values")},
                             lora, tmp_path, 2 * 7)


def test_a_packed_weight_without_its_scales_is_refused_by_name(binary, pair, tmp_path):
    _, first, _, lora = pair
    packed = packed_checkpoint(first, tmp_path, "gptq")["packed"]
    tensors = load_file(str(packed / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.scales"]
    save_file(tensors, str(packed / "model.safetensors"))
    proc = subprocess.run([str(binary), "transfer", "--source-base", str(packed), "--target-base", str(packed),
                           "--adapter", str(lora), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "model.layers.1.mlp.down_proj.qweight" in proc.stderr and "down_proj.scales" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_derived_from_a_packed_checkpoint_loads_in_transformers(binary, pair, tmp_path):
    """`synth model --derive-from` writes a packed checkpoint's weights as their values, without
    the packed parts or the `quantization_config`, and transformers loads the copy."""
    _, first, _, _ = pair
    packed = packed_checkpoint(first, tmp_path, "ct4")["packed"]
    derived = tmp_path / "derived"
    iu.loraxfer(binary, "synth", "model", "--derive-from", packed, "--drift", "0.01", "--seed", "2", "--out", derived)
    tensors = load_file(str(derived / "model.safetensors"))
    assert not [k for k in tensors if "weight_" in k]
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == np.float32
    assert "quantization_config" not in json.loads((derived / "config.json").read_text())
    iu.load_model(derived)


# llama.cpp's names of a Qwen2 layer's projections.
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


@pytest.mark.parametrize("layout", ["nvfp4-ct", "nvfp4-modelopt"])
def test_nvfp4_weights_read_as_llama_cpp_repacks_them(binary, pair, tmp_path, layout):
    """NVFP4 weights read as the values their codes and scales hold, and as llama.cpp's
    converter repacks them into its NVFP4 type with the tensor's scale beside (the `gguf`
    package's dequantization times that scale; equal for ModelOpt, whose product llama.cpp
    forms in the same order, within an f32 rounding for compressed-tensors, which divides the
    group's scale first). The converter's blocks hold 64 inputs, so the MLP's 176-input down
    projection is left to the first check (and unquantized in the file it converts)."""
    import gguf
    from gguf.quants import dequantize

    _, first, _, _ = pair
    got, want = read_as_values(binary, first, tmp_path, layout)
    kept = packed_checkpoint(first, tmp_path / "kept", layout, keep="down_proj")
    path = llama_cpp_gguf(kept["packed"], tmp_path / "model.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    checked = 0
    for name, values in got.items():
        parts = name.split(".")
        if len(parts) != 6 or not name.endswith("_proj.weight") or values.shape[1] % 64:
            continue
        blk = f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:5])]}"
        t = tensors[blk + ".weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.NVFP4, blk
        reference = dequantize(t.data, t.tensor_type).reshape(values.shape)
        if blk + ".scale" in tensors:
            reference = reference * np.asarray(tensors[blk + ".scale"].data, np.float32)[0]
        if layout == "nvfp4-modelopt":
            assert np.array_equal(values, reference), name
        else:
            np.testing.assert_allclose(values, reference, rtol=2e-7, atol=0, err_msg=name)
        checked += 1
    assert checked == 2 * 6
