"""GPT-OSS through transformers and PEFT: a family that stores each layer's experts fused
(`mlp.experts.gate_up_proj` `[E, hidden, 2·width]`, the gate's and the up projection's outputs
alternating; `mlp.experts.down_proj` `[E, width, hidden]`; in bf16, or as MXFP4 blocks and scales in
OpenAI's release), and whose LoRAs PEFT makes on those parameters (`target_parameters`). loraxfer
reads each expert's weight out of the fused tensors and writes its output in the same fused form,
the only one PEFT loads for this family."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import interop_util as iu
from test_experts import FUSED_PATTERN_NOTES, MIN_CHANGE, fused_adapter

EXPERTS, WIDTH = 4, 32
HIDDEN = iu.COMMON["hidden_size"]
PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def build(seed: int):
    import transformers as tf

    config = tf.GptOssConfig(
        vocab_size=iu.COMMON["vocab_size"], hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=EXPERTS,
        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        # transformers starts biases and attention sinks at zero; a trained model's are not.
        for name, param in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                param.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory, binary):
    """(base, next release, PEFT's LoRA on the base) and the directory they are in."""
    root = tmp_path_factory.mktemp("gpt-oss")
    base = iu.save_model(build(41), root / "base")
    release = root / "release"
    iu.loraxfer(binary, "synth", "model", "--derive-from", base, "--drift", "0.05", "--seed", "3",
                "--out", release)
    lora = fused_adapter("gpt_oss", base, root / "lora", by_name=["q_proj", "k_proj", "v_proj", "o_proj"])
    return root, base, release, lora


def transfer(binary, base, target, adapter, out, *extra):
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", adapter,
                "--out", out, *extra)
    return json.loads((out / "transfer_report.json").read_text())


def peft_logits(base, adapter):
    return iu.logits(iu.load_peft_strict(iu.load_model(base), adapter, allow=FUSED_PATTERN_NOTES))


def updates(adapter_dir) -> dict:
    """{module or `<experts>.<e>.<gate_proj|up_proj|down_proj>`: s·B·A as `[out, in]`}, from the
    files, the fused wrappers expanded as PEFT's ParamWrapper computes them (A `(E, r, in)`, B
    `(out, r, E)`) and gate_up's outputs split the way GPT-OSS's forward splits them (even: gate)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = iu.read_tensors(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(iu.PEFT_PREFIX):-len(".lora_A.weight")]
        a = tensors[key].astype(np.float64)
        b = tensors[f"{iu.PEFT_PREFIX}{module}.lora_B.weight"].astype(np.float64)
        if ".experts" not in module:
            r = iu.pattern_value(config["rank_pattern"], module, config["r"])
            alpha = iu.pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
            out[module] = alpha / r * (b @ a)
            continue
        experts = module.split(".experts")[0] + ".experts"
        param = "gate_up_proj" if a.shape[1] == HIDDEN else "down_proj"
        # PEFT's match of a target_parameters entry.
        full = f"{experts}.{param}"
        assert any(full == t or full.endswith("." + t) for t in config["target_parameters"]), (module, config)
        r = iu.pattern_value(config["rank_pattern"], f"{experts}.{param}", config["r"])
        alpha = iu.pattern_value(config["alpha_pattern"], f"{experts}.{param}", config["lora_alpha"])
        assert a.shape[0] == r * EXPERTS, (module, a.shape, r)
        delta = np.einsum("ore,eri->eoi", b.reshape(b.shape[0], r, EXPERTS), a.reshape(EXPERTS, r, -1)) * alpha / r
        for e in range(EXPERTS):
            if param == "gate_up_proj":
                out[f"{experts}.{e}.gate_proj"] = delta[e, 0::2]
                out[f"{experts}.{e}.up_proj"] = delta[e, 1::2]
            else:
                out[f"{experts}.{e}.down_proj"] = delta[e]
    return out


def merged_logits(base, adapter_dir, tmp):
    """The base with the adapter's updates added in numpy (each expert's into its slice of the
    fused tensors), loaded by transformers."""
    weights = load_file(str(base / "model.safetensors"))
    for module, delta in updates(adapter_dir).items():
        if ".experts." not in module:
            weights[module + ".weight"] = (weights[module + ".weight"] + delta).astype(np.float32)
            continue
        experts, e, part = module.rsplit(".", 2)
        e = int(e)
        if part == "down_proj":
            weights[f"{experts}.down_proj"][e] += delta.T.astype(np.float32)
        else:
            weights[f"{experts}.gate_up_proj"][e][:, part == "up_proj"::2] += delta.T.astype(np.float32)
    out = iu.copy_dir(base, tmp / "merged")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return iu.logits(iu.load_model(out))


def test_peft_lora_copies_onto_the_same_model_exactly(gpt_oss, binary, tmp_path):
    """Copied onto the same model, PEFT's LoRA comes back in its own fused form, which PEFT loads
    strictly and which computes PEFT's logits with the source LoRA."""
    _, base, _, lora = gpt_oss
    out = tmp_path / "out"
    transfer(binary, base, iu.copy_dir(base, tmp_path / "copy"), lora, out, "--mode", "copy")
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(f"model.layers.{l}.{p}" for l in range(2) for p in PARAMS)
    assert all(".self_attn." in m for m in config["target_modules"]), config["target_modules"]
    want = peft_logits(base, lora)
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(base))) > MIN_CHANGE
    assert iu.max_rel_diff(peft_logits(base, out), want) < 1e-5


def test_rotate_onto_a_release_keeps_each_experts_update(gpt_oss, binary, tmp_path):
    """Rotated onto the next release (auto picks rotate), each expert's gate, up and down update
    keeps its norm (the rotation is orthogonal), so the file's alternating rows hold each part's
    own; PEFT loads it strictly and its logits equal the numpy merge."""
    _, base, release, lora = gpt_oss
    out = tmp_path / "out"
    report = transfer(binary, base, release, lora, out, "--rank", "16")
    assert report["mode"] == "rotate", report["auto_reason"]
    for layer, m in report["expert_map"].items():
        assert m["source_experts"] == list(range(EXPERTS)), (layer, m)
    source, carried = updates(lora), updates(out)
    assert sorted(source) == sorted(carried) and len(source) == 8 + 2 * 3 * EXPERTS
    for module, delta in source.items():
        norm, got = np.linalg.norm(delta), np.linalg.norm(carried[module])
        assert abs(got - norm) <= 1e-4 * norm, (module, got, norm)
        assert np.linalg.norm(carried[module] - delta) > 1e-3 * norm, module
    want = merged_logits(release, out, tmp_path)
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(release))) > MIN_CHANGE
    assert iu.max_rel_diff(peft_logits(release, out), want) < 1e-4


def expert_weights(base) -> dict:
    """{`<experts>.<e>.<part>`: `[out, in]`} as GPT-OSS's forward uses them."""
    weights = load_file(str(base / "model.safetensors"))
    out = {}
    for l in range(2):
        experts = f"model.layers.{l}.mlp.experts"
        for e in range(EXPERTS):
            gate_up = weights[f"{experts}.gate_up_proj"][e]
            out[f"{experts}.{e}.gate_proj"] = gate_up[:, 0::2].T
            out[f"{experts}.{e}.up_proj"] = gate_up[:, 1::2].T
            out[f"{experts}.{e}.down_proj"] = weights[f"{experts}.down_proj"][e].T
    return out


def test_the_experts_are_read_as_the_forward_uses_them(gpt_oss, binary, tmp_path):
    """Each expert's update set to its weight's top singular pair (from the slices the forward
    uses) survives a projection onto the model's own top-4 subspaces whole: it would not, were
    the expert's weight read from other rows or columns of the fused tensors."""
    _, base, _, _ = gpt_oss
    out = assert_top_pairs_survive(binary, base, expert_weights(base), updates, tmp_path)
    iu.load_peft_strict(iu.load_model(base), out, allow=FUSED_PATTERN_NOTES)


def assert_top_pairs_survive(binary, base, weights: dict, read_updates, tmp_path):
    """An adapter setting each expert's update to the top singular pair of its `[out, in]` weight
    in `weights` (as the forward uses it), projected onto the model's own top-4 subspaces: every
    update, as `read_updates` reads the output, is the one set. Returns the output."""
    tensors, modules = {}, {}
    for module, w in weights.items():
        u, s, vt = np.linalg.svd(w.astype(np.float64))
        modules[module] = s[0] * np.outer(u[:, 0], vt[0])
        tensors[f"{iu.PEFT_PREFIX}{module}.lora_A.weight"] = vt[:1].astype(np.float32)
        tensors[f"{iu.PEFT_PREFIX}{module}.lora_B.weight"] = (s[0] * u[:, :1]).astype(np.float32)
    adapter = tmp_path / "top-pairs"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    config = dict(peft_type="LORA", r=1, lora_alpha=1, target_modules=["gate_proj", "up_proj", "down_proj"])
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    transfer(binary, base, iu.copy_dir(base, tmp_path / "copy"), adapter, out, "--mode", "project",
             "--rank", "4", "--power-iters", "6")
    carried = read_updates(out)
    for module, delta in modules.items():
        err = np.linalg.norm(carried[module] - delta) / np.linalg.norm(delta)
        assert err < 1e-3, (module, err)
    return out


def mxfp4(linear: np.ndarray):
    """MXFP4 blocks and scales of `[E, out, in]` weights, OpenAI's layout: per 32 inputs one scale
    2^(byte − 127) so that the block's largest value fits FP4's 6, and each value the nearest FP4
    code, two per byte, low nibble first."""
    e, rows, cols = linear.shape
    x = linear.reshape(e, rows, cols // 32, 32).astype(np.float64)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    exp = np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)).clip(-127, 127)
    codes = np.abs((x / 2.0**exp)[..., None] - FP4).argmin(axis=-1).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    # Contiguous: safetensors.numpy writes an array's buffer as it lies.
    return np.ascontiguousarray(blocks, np.uint8), np.ascontiguousarray(exp[..., 0] + 127, np.uint8)


def quantized_experts(base) -> tuple:
    """The base's tensors with the experts in MXFP4 (blocks and scales, as OpenAI released
    GPT-OSS), and with the same MXFP4 experts dequantized by transformers' own
    `convert_moe_packed_tensors`."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    weights = load_file(str(base / "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, value in weights.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            quantized[name] = dequantized[name] = value
            continue
        blocks, scales = mxfp4(value.transpose(0, 2, 1))
        quantized[f"{name}_blocks"], quantized[f"{name}_scales"] = blocks, scales
        back = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
        dequantized[name] = back.numpy()
        assert back.shape == value.shape
        assert 0 < np.abs(back.numpy() - value).max() < 0.2 * np.abs(value).max(), name
    return quantized, dequantized


def save_checkpoint(base, tensors: dict, out, mxfp4: bool = False):
    """`tensors` saved as a copy of `base` at `out`, its config saying MXFP4 where they are."""
    d = iu.copy_dir(base, out)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    if mxfp4:
        config = json.loads((d / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "mxfp4"}
        (d / "config.json").write_text(json.dumps(config))
    return d


def test_an_mxfp4_checkpoint_reads_as_transformers_dequantizes_it(gpt_oss, binary, tmp_path):
    """The base with its experts in MXFP4 (blocks and scales, as OpenAI released GPT-OSS) gives the
    transfer that the same base gives with the experts dequantized by transformers' own
    `convert_moe_packed_tensors`, to the bit."""
    _, base, _, lora = gpt_oss
    quantized, dequantized = quantized_experts(base)
    dirs = {"mxfp4": save_checkpoint(base, quantized, tmp_path / "mxfp4", mxfp4=True),
            "dequantized": save_checkpoint(base, dequantized, tmp_path / "dequantized")}
    outs = {}
    for kind, d in dirs.items():
        outs[kind] = tmp_path / f"out-{kind}"
        transfer(binary, base, d, lora, outs[kind], "--mode", "rotate", "--rank", "16")
    got = iu.read_tensors(outs["mxfp4"] / "adapter_model.safetensors")
    want = iu.read_tensors(outs["dequantized"] / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key


def test_a_synthetic_adapter_and_a_drifted_release_are_what_peft_and_transformers_load(gpt_oss, binary, tmp_path):
    """`synth adapter` on GPT-OSS writes PEFT's fused form, which PEFT loads strictly; `synth model
    --derive-from` copies the checkpoint as stored (the fused tensors, drifted), which transformers
    loads with no key missing or unexpected."""
    _, base, release, _ = gpt_oss
    adapter = tmp_path / "synth-lora"
    iu.loraxfer(binary, "synth", "adapter", "--base", base, "--out", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(f"model.layers.{l}.{p}" for l in range(2) for p in PARAMS)
    model = iu.load_peft_strict(iu.load_model(base), adapter, allow=FUSED_PATTERN_NOTES)
    assert iu.max_rel_diff(iu.logits(model), iu.logits(iu.load_model(base))) > MIN_CHANGE
    from transformers import AutoModelForCausalLM

    with iu.quiet():
        _, info = AutoModelForCausalLM.from_pretrained(release, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    stored = set()
    for shard in release.glob("*.safetensors"):
        stored |= set(load_file(str(shard)))
    assert stored == set(load_file(str(base / "model.safetensors"))), sorted(stored)[:8]
