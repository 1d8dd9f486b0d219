"""Qwen3-Next as llama.cpp stores it: GGUF files written by llama.cpp's own `convert_hf_to_gguf.py`
from a tiny Qwen3-Next with experts in every layer (llama.cpp's `qwen3next` has no dense MLP
tensors). The converter regroups linear attention's fused `in_proj_qkvz` (per key head its query,
key, value and gate rows) into `attn_qkv` (every query row, every key row, every value row) and
`attn_gate` (every gate row), keeps `in_proj_ba` as `ssm_ba`, and adds 1 to the norms. loraxfer
joins `in_proj_qkvz` back as it reads it, quantized or not, and transfers onto the GGUF exactly as
onto the checkpoint; a LoRA GGUF splits an `in_proj_qkvz` LoRA as the converter splits the weight
(B's rows into the two tensors, A whole for each), which llama.cpp's own LoRA converter cannot."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from safetensors.numpy import load_file, save_file

import interop_util as iu
from test_gguf_lora import CONVERTER, assert_same_lora
from test_gpt_oss_gguf import llama_cpp_gguf
from test_qwen3_5 import MOE
from test_qwen3_5_gguf import prediction_block, save_file_dir

R, ALPHA = 4, 8
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj", "gate_proj",
           "up_proj", "down_proj")


def adapter(base, out, keep=lambda module: True):
    """Random factors for every projection of the checkpoint `keep` accepts, one PEFT module each."""
    rng = np.random.default_rng(8)
    tensors = {}
    for name, w in sorted(load_file(str(base / "model.safetensors")).items()):
        module = name.removesuffix(".weight")
        if w.ndim == 2 and module.endswith(ADAPTED) and keep(module):
            tensors[f"{iu.PEFT_PREFIX}{module}.lora_A.weight"] = rng.normal(0, 0.3, (R, w.shape[1])).astype(np.float32)
            tensors[f"{iu.PEFT_PREFIX}{module}.lora_B.weight"] = rng.normal(0, 0.1, (w.shape[0], R)).astype(np.float32)
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    names = sorted({k.split(".lora_")[0].rsplit(".", 1)[1] for k in tensors})
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base), r=R,
                  lora_alpha=ALPHA, target_modules=names, lora_dropout=0.0, bias="none")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def reference(adapter_dir, base, out):
    """llama.cpp's `convert_lora_to_gguf.py` of `adapter_dir`, with its model class told that the
    checkpoint has no prediction layer (as `convert_hf_to_gguf.py --no-mtp` tells it; the LoRA
    converter has no such flag, and Qwen3-Next's class asserts one otherwise)."""
    code = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); from conversion.base import ModelBase; "
            "ModelBase.no_mtp = True; sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    subprocess.run([sys.executable, "-c", code, str(CONVERTER.parent), str(CONVERTER), "--base", str(base),
                    "--outtype", "f32", "--outfile", str(out), str(adapter_dir)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    """(root, base, {outtype: llama.cpp's GGUF of it}, adapter on every projection)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("qwen3-next-gguf")
    torch.manual_seed(71)
    model = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**MOE, intermediate_size=80, num_hidden_layers=4)).eval()
    with torch.no_grad():
        # transformers starts every time-step bias at 1; a trained model's differ by head.
        for name, param in model.named_parameters():
            if name.endswith("dt_bias"):
                param.normal_(1, 0.3)
    base = iu.save_model(model, root / "base")
    ggufs = {outtype: llama_cpp_gguf(base, root / f"base-{outtype}.gguf", outtype, "--no-mtp")
             for outtype in ("f32", "q8_0")}
    return root, base, ggufs, adapter(base, root / "lora")


def regrouped(qkvz: np.ndarray, fields: dict):
    """A `[key_heads·(2·hk + 2·vr), ·]` array in Hugging Face's `in_proj_qkvz` row order (per key
    head its query, key, value and gate rows) as the converter stores it: (`attn_qkv`: every
    query row, every key row, every value row; `attn_gate`: every gate row)."""
    kh, hk = fields["qwen3next.ssm.group_count"], fields["qwen3next.ssm.state_size"]
    vr = fields["qwen3next.ssm.inner_size"] // kh
    heads = qkvz.reshape(kh, 2 * hk + 2 * vr, -1)
    q, k, v, z = np.split(heads, [hk, 2 * hk, 2 * hk + vr], axis=1)
    flat = lambda x: x.reshape(-1, qkvz.shape[1])  # noqa: E731
    return np.concatenate([flat(q), flat(k), flat(v)]), flat(z)


def metadata(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


def joined_qkvz(path) -> dict:
    """{layer: in_proj_qkvz} rebuilt in numpy from the file's `attn_qkv` and `attn_gate`, as the
    `gguf` package dequantizes them: the inverse of `regrouped`, checked on a permutation."""
    fields = metadata(path)
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
              for t in reader.tensors}
    out = {}
    for name, qkv in stored.items():
        if name.endswith(".attn_qkv.weight"):
            layer = int(name.split(".")[1])
            z = stored[f"blk.{layer}.attn_gate.weight"]
            rows = np.arange(len(qkv) + len(z))[:, None]
            where = np.concatenate(regrouped(rows, fields))[:, 0]  # stored row → HF row
            joined = np.empty((len(where), qkv.shape[1]), qkv.dtype)
            joined[where] = np.concatenate([qkv, z])
            out[layer] = joined
    return out


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpps_gguf_reads_as_the_checkpoint_it_came_from(qwen3_next, outtype, binary, tmp_path):
    """Converted back, every tensor is the checkpoint's (in Q8_0 within its rounding; the decay
    `A_log`, stored as −exp(A_log), to f32's), `in_proj_qkvz` the one numpy joins from the stored
    halves bit for bit, and transformers loads the f32 conversion into the checkpoint's model:
    the same logits."""
    _, base, ggufs, _ = qwen3_next
    path = ggufs[outtype]
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    if outtype == "q8_0":
        assert kinds["blk.0.attn_qkv.weight"] == kinds["blk.0.attn_gate.weight"] == gguf.GGMLQuantizationType.Q8_0
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", converted)
    ours = load_file(str(converted / "model.safetensors"))
    weights = load_file(str(base / "model.safetensors"))
    assert sorted(ours) == sorted(weights)
    assert any(k.endswith("linear_attn.A_log") for k in ours)
    for name, got in ours.items():
        want = weights[name]
        assert got.shape == want.shape, name
        err = np.abs(got - want).max()
        exact = 1e-6 * np.abs(want).max() if name.endswith(".A_log") else 0
        assert err <= (exact if outtype == "f32" else 1e-2 * np.abs(want).max()), (name, err)
    joined = joined_qkvz(path)
    assert sorted(joined) == [0, 1, 2]
    for layer, qkvz in joined.items():
        assert np.array_equal(ours[f"model.layers.{layer}.linear_attn.in_proj_qkvz.weight"], qkvz), layer
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "qwen3_next" and config["linear_num_value_heads"] == MOE["linear_num_value_heads"]
    # The checkpoint's (transformers' defaults), from the converter's keys.
    assert (config["linear_conv_kernel_dim"], config["partial_rotary_factor"]) == (4, 0.25)
    if outtype == "f32":
        got = iu.logits(iu.load_model(converted))
        assert iu.max_rel_diff(got, iu.logits(iu.load_model(base))) <= 1e-5


def legacy_gguf(path, base, out):
    """The file at `path` as conversions before the regrouping wrote it: every metadata field and
    tensor kept, but each layer's `attn_qkv` and `attn_gate` replaced by `ssm_in`, the checkpoint's
    `in_proj_qkvz` whole (which llama.cpp still reads, by its slower path)."""
    reader = gguf.GGUFReader(str(path))
    writer = gguf.GGUFWriter(str(out), "qwen3next")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    weights = load_file(str(base / "model.safetensors"))
    for t in reader.tensors:
        layer, module = t.name.split(".")[1], t.name.split(".")[-2]
        if module == "attn_gate":
            continue
        if module == "attn_qkv":
            writer.add_tensor(f"blk.{layer}.ssm_in.weight", weights[f"model.layers.{layer}.linear_attn.in_proj_qkvz.weight"])
            continue
        data = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        writer.add_tensor(t.name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_a_gguf_from_before_the_regrouping_reads_and_takes_loras_whole(qwen3_next, binary, tmp_path):
    """`ssm_in` is `in_proj_qkvz` as it was; a LoRA GGUF for such a base puts an `in_proj_qkvz`
    LoRA on it whole, in Hugging Face's row order."""
    _, base, ggufs, full = qwen3_next
    path = legacy_gguf(ggufs["f32"], base, tmp_path / "legacy.gguf")
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", converted)
    ours, weights = load_file(str(converted / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert sorted(ours) == sorted(weights)
    for name, got in ours.items():
        tol = 1e-6 * np.abs(weights[name]).max() if name.endswith(".A_log") else 0
        assert np.abs(got - weights[name]).max() <= tol, name
    lora_gguf = tmp_path / "lora.gguf"
    iu.loraxfer(binary, "export-gguf", "--adapter", full, "--base", path, "--out", lora_gguf)
    updates, want = lora_updates(lora_gguf), iu.module_updates(full)
    assert not any("attn_qkv" in n or "attn_gate" in n for n in updates)
    for layer in range(3):
        delta = want[f"model.layers.{layer}.linear_attn.in_proj_qkvz"]
        got = updates[f"blk.{layer}.ssm_in.weight"]
        assert np.abs(got - delta).max() <= 1e-6 * np.abs(delta).max(), layer


def test_a_transfer_onto_the_gguf_is_the_transfer_onto_the_checkpoint(qwen3_next, binary, tmp_path):
    """Every projection, `in_proj_qkvz` included, rotated onto the f32 GGUF and onto the checkpoint
    it came from: the same updates, bit for bit."""
    _, base, ggufs, lora = qwen3_next
    outs = {}
    for name, target in [("hf", base), ("gguf", ggufs["f32"])]:
        outs[name] = tmp_path / name
        iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", lora,
                    "--out", outs[name], "--mode", "rotate", "--rank", "16")
    got, want = iu.module_updates(outs["gguf"]), iu.module_updates(outs["hf"])
    assert sorted(got) == sorted(want) and any("in_proj_qkvz" in m for m in want)
    for module, delta in want.items():
        assert np.array_equal(got[module], delta), module


def test_a_gguf_with_its_prediction_block_reads_as_one_without(qwen3_next, binary, tmp_path):
    """Qwen3-Next's releases carry a multi-token-prediction block (`mtp.*`: a softmax-attention
    layer with its experts and shared expert, and its fusion), which llama.cpp's converter writes
    as one more block (`block_count` 5, `nextn_predict_layers` 1). It is left out of the depth,
    converts back under the checkpoint's names (each expert a tensor of its own, the norms' + 1
    taken off), and a transfer onto the file is the one onto the file without it, bit for bit."""
    _, base, ggufs, lora = qwen3_next
    weights = load_file(str(base / "model.safetensors"))
    mtp = prediction_block(weights, "model.layers.3.", MOE["hidden_size"],
                           lambda rng, n: rng.normal(0, 0.1, n).astype(np.float32))
    assert any(".mlp.experts.1." in k for k in mtp) and any("shared_expert." in k for k in mtp)
    config = json.loads((base / "config.json").read_text())
    with_mtp = save_file_dir(tmp_path / "with-mtp", {**weights, **mtp}, config)
    path = llama_cpp_gguf(with_mtp, tmp_path / "with-mtp.gguf", "f32")
    fields = metadata(path)
    assert (fields["qwen3next.block_count"], fields["qwen3next.nextn_predict_layers"]) == (5, 1)
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", converted)
    config = json.loads((converted / "config.json").read_text())
    assert (config["num_hidden_layers"], config["mtp_num_hidden_layers"]) == (4, 1)
    ours = load_file(str(converted / "model.safetensors"))
    assert sorted(k for k in ours if k.startswith("mtp.")) == sorted(mtp)
    assert not any(k.startswith("model.layers.4.") for k in ours)
    for name, value in mtp.items():
        assert np.allclose(ours[name], value, rtol=0, atol=1e-6), name
    outs = {}
    for name, target in (("with", path), ("without", ggufs["f32"])):
        outs[name] = tmp_path / f"out-{name}"
        iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", lora,
                    "--out", outs[name], "--mode", "rotate", "--rank", "8")
    got, want = iu.module_updates(outs["with"]), iu.module_updates(outs["without"])
    assert sorted(got) == sorted(want)
    for module, delta in want.items():
        assert np.array_equal(got[module], delta), module


def lora_updates(path) -> dict:
    """{GGUF tensor: (alpha / r)·B·A} of a LoRA GGUF, in the base's stored row order."""
    reader = gguf.GGUFReader(str(path))
    alpha = metadata(path)["adapter.lora.alpha"]
    t = {x.name: dequantize(x.data, x.tensor_type).reshape([int(d) for d in reversed(x.shape)])
         for x in reader.tensors}
    return {name.removesuffix(".lora_a"): alpha / a.shape[0] * (t[name.replace("lora_a", "lora_b")] @ a)
            for name, a in t.items() if name.endswith(".lora_a") and a.ndim == 2}


def test_a_lora_gguf_for_qwen3_next_equals_llama_cpp_conversion(qwen3_next, binary, tmp_path):
    """`export-gguf` for the Qwen3-Next GGUF writes what llama.cpp's `convert_lora_to_gguf.py`
    writes (`ssm_ba`, `ssm_out`, stacked experts, the shared expert, the softmax layer's
    attention), and splits an `in_proj_qkvz` LoRA, which that converter cannot, as its base
    converter splits the weight: `attn_qkv` and `attn_gate`, each B's rows regrouped and A whole,
    their updates the PEFT update's rows; `transfer --gguf-adapter` writes the same."""
    _, base, ggufs, full = qwen3_next
    lora = adapter(base, tmp_path / "no-qkvz", lambda m: not m.endswith("in_proj_qkvz"))
    got = tmp_path / "got.gguf"
    iu.loraxfer(binary, "export-gguf", "--adapter", lora, "--base", ggufs["f32"], "--out", got)
    assert_same_lora(got, reference(lora, base, tmp_path / "want.gguf"))
    names = [t.name for t in gguf.GGUFReader(str(got)).tensors]
    for name in ["blk.0.ssm_ba.weight.lora_a", "blk.0.ssm_out.weight.lora_b", "blk.3.attn_q.weight.lora_a",
                 "blk.1.ffn_up_exps.weight.lora_b", "blk.2.ffn_down_shexp.weight.lora_a"]:
        assert name in names, name
    fields = metadata(ggufs["f32"])
    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", ggufs["f32"], "--adapter", full,
                "--out", out, "--mode", "copy", "--gguf-adapter")
    for source, lora_gguf in [(full, tmp_path / "full.gguf"), (out, out / "adapter_model.gguf")]:
        if source == full:
            iu.loraxfer(binary, "export-gguf", "--adapter", full, "--base", ggufs["f32"], "--out", lora_gguf)
        updates, want = lora_updates(lora_gguf), iu.module_updates(source)
        for layer in range(3):
            qkv, z = regrouped(want[f"model.layers.{layer}.linear_attn.in_proj_qkvz"], fields)
            for tensor, delta in [("attn_qkv", qkv), ("attn_gate", z)]:
                got_delta = updates[f"blk.{layer}.{tensor}.weight"]
                assert np.abs(got_delta - delta).max() <= 1e-6 * np.abs(delta).max(), (source.name, layer, tensor)
