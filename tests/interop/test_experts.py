"""Mixture-of-experts models (Qwen3-MoE, Mixtral, OLMoE) through transformers and PEFT.

The adapters have one module per expert (`mlp.experts.3.up_proj`, `block_sparse_moe.experts.3.w3`):
the names of the checkpoints on disk, which PEFT loads onto transformers' fused expert parameters
by converting them. Each test judges PEFT's forward pass against an independent merge: W + s·B·A
added in numpy to the per-expert tensors of the checkpoint file, the merged file loaded by
transformers."""

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import interop_util as iu

EXPERTS, WIDTH, LAYERS, R, ALPHA = 4, 32, 2, 4, 8
FAMILIES = ["qwen3_moe", "mixtral", "olmoe"]
MIN_CHANGE = 1e-2


def build(family: str, seed: int):
    import transformers as tf

    common = {k: v for k, v in iu.COMMON.items() if k != "intermediate_size"}
    common.update(num_hidden_layers=LAYERS, num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(num_experts=EXPERTS, moe_intermediate_size=WIDTH, intermediate_size=96,
                                   head_dim=16, **common)
        cls = tf.Qwen3MoeForCausalLM
    elif family == "mixtral":
        config = tf.MixtralConfig(num_local_experts=EXPERTS, intermediate_size=WIDTH, head_dim=16, **common)
        cls = tf.MixtralForCausalLM
    else:
        config = tf.OlmoeConfig(num_experts=EXPERTS, intermediate_size=WIDTH, **common)
        cls = tf.OlmoeForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cls(config).eval()


def expert_names(family: str) -> list:
    if family == "mixtral":
        return [("block_sparse_moe", "w1", (WIDTH, 64)), ("block_sparse_moe", "w3", (WIDTH, 64)),
                ("block_sparse_moe", "w2", (64, WIDTH))]
    return [("mlp", "gate_proj", (WIDTH, 64)), ("mlp", "up_proj", (WIDTH, 64)), ("mlp", "down_proj", (64, WIDTH))]


def write_adapter(family: str, base, out):
    """Random factors for every attention module and every expert's modules, in PEFT's per-module
    format, each expert's its own."""
    rng = np.random.default_rng(5)
    tensors, types = {}, {"q_proj", "k_proj", "v_proj", "o_proj"}
    for layer in range(LAYERS):
        modules = [(f"self_attn.{p}", shape) for p, shape in
                   [("q_proj", (64, 64)), ("k_proj", (32, 64)), ("v_proj", (32, 64)), ("o_proj", (64, 64))]]
        for e in range(EXPERTS):
            for block, name, shape in expert_names(family):
                modules.append((f"{block}.experts.{e}.{name}", shape))
                types.add(name)
        for key, (rows, cols) in modules:
            prefix = f"{iu.PEFT_PREFIX}model.layers.{layer}.{key}"
            tensors[prefix + ".lora_A.weight"] = rng.normal(0, 0.3, (R, cols)).astype(np.float32)
            tensors[prefix + ".lora_B.weight"] = rng.normal(0, 0.1, (rows, R)).astype(np.float32)
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base), r=R,
                  lora_alpha=ALPHA, target_modules=sorted(types), lora_dropout=0.0, bias="none")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def merged(base, adapter, tmp):
    """The base with every adapter update added to its per-expert tensors in numpy, loaded."""
    out = Path(tempfile.mkdtemp(prefix="merged-", dir=tmp))
    shutil.copytree(base, out, dirs_exist_ok=True)
    weights = load_file(str(base / "model.safetensors"))
    updates = iu.module_updates(adapter)
    for module, delta in updates.items():
        w = weights[module + ".weight"]
        assert w.shape == delta.shape, (module, w.shape, delta.shape)
        weights[module + ".weight"] = (w.astype(np.float64) + delta).astype(np.float32)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return iu.logits(iu.load_model(out))


# PEFT's conversion of per-expert modules onto the fused `gate_up_proj` sets a rank and alpha
# pattern for it and then warns, before converting, that the pattern matches no module yet.
FUSED_PATTERN = [r".*\.gate_up_proj"]
CONVERSION_NOTES = tuple(
    re.escape(f"RuntimeWarning: The following {kind}_pattern keys did not match any targeted module and "
              f"were ignored: {FUSED_PATTERN}.")
    for kind in ("rank", "alpha")
)


# PEFT 0.21 checks rank and alpha patterns against module names only, so it warns that a pattern
# for a parameter (`<layer>.mlp.experts.gate_up_proj`, `<module>.weight`) matched nothing, and
# then applies it (the shapes and logits below would differ if it did not).
_FUSED_KEY = r"'[^']*\.(?:mlp\.experts\.(?:gate_up_proj|down_proj)|weight)'"
FUSED_PATTERN_NOTES = tuple(
    f"RuntimeWarning: The following {kind}_pattern keys did not match any targeted module and were "
    f"ignored: \\[{_FUSED_KEY}(?:, {_FUSED_KEY})*\\]\\."
    for kind in ("rank", "alpha")
)


def peft_logits(base, adapter):
    from peft import PeftModel

    model = iu.load_model(base)
    with iu.no_key_complaints(f"PeftModel.from_pretrained(<model>, {adapter})", allow=CONVERSION_NOTES):
        peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return iu.logits(peft_model)


@pytest.fixture(scope="module")
def moe(tmp_path_factory, binary):
    root = tmp_path_factory.mktemp("experts")
    made = {}

    def get(family):
        if family not in made:
            base = iu.save_model(build(family, 21), root / f"{family}-base")
            derived = root / f"{family}-derived"
            iu.loraxfer(binary, "synth", "model", "--derive-from", base, "--drift", "0.05", "--seed", "3",
                        "--out", derived)
            made[family] = (base, derived, write_adapter(family, base, root / f"{family}-lora"))
        return made[family]

    return root, get


@pytest.mark.parametrize("family", FAMILIES)
def test_the_per_expert_adapter_is_what_peft_loads(moe, family):
    """The fixture itself: PEFT converts the per-expert adapter onto the fused experts, and its
    forward equals the merge into the file's per-expert tensors."""
    root, get = moe
    base, _, adapter = get(family)
    got, want = peft_logits(base, adapter), merged(base, adapter, root)
    assert iu.max_rel_diff(got, want) < 1e-4
    assert iu.max_rel_diff(got, iu.logits(iu.load_model(base))) > MIN_CHANGE


@pytest.mark.parametrize("family", FAMILIES)
def test_rotate_onto_a_next_release_loads_in_peft(moe, family, binary, tmp_path):
    root, get = moe
    base, derived, adapter = get(family)
    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", derived, "--adapter", adapter,
                "--rank", "16", "--out", out)
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["mode"] == "rotate", report.get("auto_reason")
    rows = report["modules"]
    assert len(rows) == LAYERS * (4 + 3 * EXPERTS) and all(r["transferred"] for r in rows)
    for r in rows:
        expert = [part for part in r["target_key"].split(".experts.")[1:]]
        assert expert == [part for part in r["source_key"].split(".experts.")[1:]], r["target_key"]
    got, want = peft_logits(derived, out), merged(derived, out, root)
    assert iu.max_rel_diff(got, want) < 1e-4
    assert iu.max_rel_diff(got, iu.logits(iu.load_model(derived))) > MIN_CHANGE
    # Every expert's module is named in full, so PEFT adapts those and no others.
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(iu.module_updates(out))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_form_loads_in_peft(moe, family, binary, tmp_path):
    """`--fused-experts` on transformers 5's names for every family (Mixtral's `block_sparse_moe`
    experts under `mlp.experts`): PEFT loads every tensor unchanged, and its logits equal the
    per-expert output's merge."""
    root, get = moe
    base, derived, adapter = get(family)
    per, fused = tmp_path / "per", tmp_path / "fused"
    for out, extra in ((per, ()), (fused, ("--fused-experts",))):
        iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", derived, "--adapter", adapter,
                    "--rank", "16", "--out", out, *extra)
    config = json.loads((fused / "adapter_config.json").read_text())
    assert config["target_parameters"][:2] == ["model.layers.0.mlp.experts.gate_up_proj",
                                                "model.layers.1.mlp.experts.gate_up_proj"]
    model = iu.load_peft_strict(iu.load_model(derived), fused, allow=FUSED_PATTERN_NOTES)
    want = merged(derived, per, root)
    assert iu.max_rel_diff(iu.logits(model), want) < 1e-4
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(derived))) > MIN_CHANGE


@pytest.mark.parametrize("family", FAMILIES)
def test_copy_onto_the_same_model_is_exact(moe, family, binary, tmp_path):
    _, get = moe
    base, _, adapter = get(family)
    target = iu.copy_dir(base, tmp_path / "copy")
    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", adapter,
                "--mode", "copy", "--out", out)
    assert iu.max_rel_diff(peft_logits(target, out), peft_logits(base, adapter)) < 1e-5


def test_an_expert_pruned_model_takes_each_kept_experts_update(moe, binary, tmp_path):
    """Experts 3, 0 and 2 of four kept, renumbered, with their router rows (as REAP-style pruning
    leaves them): each finds its original by its router and takes exactly its update."""
    import transformers as tf

    _, get = moe
    base, _, adapter = get("qwen3_moe")
    kept = [3, 0, 2]
    weights = load_file(str(base / "model.safetensors"))
    pruned = {}
    for name, value in weights.items():
        if ".mlp.experts." in name:
            head, rest = name.split(".mlp.experts.")
            e, tail = rest.split(".", 1)
            if int(e) in kept:
                pruned[f"{head}.mlp.experts.{kept.index(int(e))}.{tail}"] = value
        elif name.endswith(".mlp.gate.weight"):
            pruned[name] = value[kept]
        else:
            pruned[name] = value
    target = tmp_path / "pruned"
    target.mkdir()
    config = json.loads((base / "config.json").read_text())
    # transformers 5 writes `num_local_experts` for every family; earlier ones `num_experts` here.
    config["num_local_experts" if "num_local_experts" in config else "num_experts"] = len(kept)
    (target / "config.json").write_text(json.dumps(config))
    save_file(pruned, str(target / "model.safetensors"), metadata={"format": "pt"})
    assert isinstance(iu.load_model(target), tf.Qwen3MoeForCausalLM)

    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", adapter,
                "--out", out)
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["mode"] == "rotate", report["auto_reason"]  # every module's shape agrees
    for layer in map(str, range(LAYERS)):
        assert report["expert_map"][layer]["source_experts"] == kept
        assert np.allclose(report["expert_map"][layer]["router_cosine"], 1.0)
    want, got = iu.module_updates(adapter), iu.module_updates(out)
    for layer in range(LAYERS):
        for k, e in enumerate(kept):
            for p in ("gate_proj", "up_proj", "down_proj"):
                a = want[f"model.layers.{layer}.mlp.experts.{e}.{p}"]
                b = got[f"model.layers.{layer}.mlp.experts.{k}.{p}"]
                assert np.abs(b - a).max() < 1e-4 * np.abs(a).max(), (layer, k, p)
    logits = peft_logits(target, out)
    assert iu.max_rel_diff(logits, merged(target, out, tmp_path)) < 1e-4
    assert iu.max_rel_diff(logits, iu.logits(iu.load_model(target))) > MIN_CHANGE


def fused_adapter(family: str, base, out, by_name=("q_proj", "o_proj")):
    """A LoRA on transformers' fused expert parameters (PEFT's `target_parameters`) and on the
    modules `by_name`, made and saved by PEFT, with random B."""
    from peft import LoraConfig

    if not out.exists():
        config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(by_name),
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        iu.random_peft(iu.load_model(base), config, 31, 0.1).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_on_fused_experts_is_read_one_module_per_expert(moe, family, binary, tmp_path):
    """PEFT's LoRA over all of a layer's experts at once: copied onto the same model, written one
    module per expert, it computes what PEFT computes with the fused LoRA; rotated onto a next
    release, it loads and equals its merge."""
    root, get = moe
    base, derived, _ = get(family)
    adapter = fused_adapter(family, base, root / f"{family}-fused-lora")
    keys = iu.read_tensors(adapter / "adapter_model.safetensors")
    assert any(".experts.base_layer.lora_A" in k for k in keys), sorted(keys)[:6]

    target = iu.copy_dir(base, tmp_path / "copy")
    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", adapter,
                "--mode", "copy", "--out", out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config.get("target_parameters") is None
    updates = iu.module_updates(out)
    assert len(updates) == LAYERS * (2 + 3 * EXPERTS), sorted(updates)[:8]
    want = peft_logits(base, adapter)
    assert iu.max_rel_diff(peft_logits(target, out), want) < 1e-5
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(base))) > MIN_CHANGE

    out = tmp_path / "rotated"
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", derived, "--adapter", adapter,
                "--out", out)
    assert json.loads((out / "transfer_report.json").read_text())["mode"] == "rotate"
    got = peft_logits(derived, out)
    assert iu.max_rel_diff(got, merged(derived, out, tmp_path)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_gguf_for_an_moe_base_equals_llama_cpp_conversion(moe, family, binary, tmp_path):
    """llama.cpp's `convert_lora_to_gguf.py` stacks each layer's experts into one tensor per
    projection: loraxfer's export holds the same tensors, names, shapes, types and values."""
    from test_gguf_lora import assert_same_lora, reference, tensors

    _, get = moe
    base, _, adapter = get(family)
    got = tmp_path / "got.gguf"
    iu.loraxfer(binary, "export-gguf", "--adapter", adapter, "--base", base, "--out", got)
    assert_same_lora(got, reference(adapter, base, tmp_path / "want.gguf"))
    shapes = {name: shape for name, (_, shape, _) in tensors(got).items()}
    assert shapes["blk.0.ffn_up_exps.weight.lora_a"] == [64, R, EXPERTS]
    assert shapes["blk.1.ffn_down_exps.weight.lora_b"] == [R, 64, EXPERTS]


GGUF_ARCH = {"qwen3_moe": "QWEN3MOE", "mixtral": "LLAMA", "olmoe": "OLMOE"}


def write_moe_gguf(base, path, qtype_name: str):
    """The Hugging Face checkpoint in `base` as llama.cpp converts it: each layer's experts stacked
    into `ffn_{gate,up,down}_exps` ([experts, out, in]), the router as `ffn_gate_inp`, Mixtral as a
    `llama` with its Q and K rows permuted; the stacks stored as `qtype_name`."""
    import gguf
    from gguf.quants import quantize
    from test_gguf import permute

    config = json.loads((base / "config.json").read_text())
    mixtral = config["model_type"] == "mixtral"
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[config["model_type"]])
    layers, heads, kv = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    names = gguf.get_tensor_name_map(arch, layers)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(layers)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(2)
    if "moe_intermediate_size" in config:
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    weights = load_file(str(base / "model.safetensors"))
    block = "block_sparse_moe" if mixtral else "mlp"
    parts = {"w1": "gate", "w3": "up", "w2": "down"} if mixtral else \
        {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    for layer in range(layers):
        prefix = f"model.layers.{layer}.{block}"
        for hf, kind in parts.items():
            stack = np.stack([weights.pop(f"{prefix}.experts.{e}.{hf}.weight") for e in range(EXPERTS)])
            if qtype_name != "F32":
                stack = quantize(stack.reshape(-1, stack.shape[-1]), qtype).reshape(*stack.shape[:2], -1)
            w.add_tensor(f"blk.{layer}.ffn_{kind}_exps.weight", stack,
                         raw_dtype=None if qtype_name == "F32" else qtype)
        w.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", weights.pop(f"{prefix}.gate.weight"))
    for name, value in weights.items():
        value = value.astype(np.float32)
        if mixtral and name.endswith("q_proj.weight"):
            value = permute(value, heads)
        elif mixtral and name.endswith("k_proj.weight"):
            value = permute(value, kv)
        w.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_a_moe_gguf_reads_one_tensor_per_expert(moe, family, binary, tmp_path):
    """A GGUF whose experts llama.cpp stacked, f32 and Q8_0: converted back, each expert's weight
    is the checkpoint's (Q8_0: as the `gguf` package dequantizes its slice of the stack), the
    config names the experts; and a transfer onto the f32 GGUF equals the transfer onto the
    checkpoint it came from."""
    import gguf
    from gguf.quants import dequantize

    _, get = moe
    base, _, adapter = get(family)
    weights = load_file(str(base / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    for qtype in ("F32", "Q8_0"):
        path = write_moe_gguf(base, tmp_path / f"{family}-{qtype}.gguf", qtype)
        out = tmp_path / f"converted-{qtype}"
        iu.loraxfer(binary, "convert", "--gguf", path, "--out", out)
        ours = load_file(str(out / "model.safetensors"))
        assert sorted(ours) == sorted(weights)
        for name, want in weights.items():
            if qtype == "Q8_0" and ".experts." in name:
                q = gguf.quants.quantize(want.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
                want = dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            assert np.array_equal(ours[name], want.astype(np.float32)), (qtype, name)
        got = json.loads((out / "config.json").read_text())
        assert got["model_type"] == family
        count = "num_local_experts" if family == "mixtral" else "num_experts"
        assert got[count] == EXPERTS
        if "moe_intermediate_size" in config:
            assert got["moe_intermediate_size"] == config["moe_intermediate_size"]

    onto = {}
    for name, target in [("gguf", tmp_path / f"{family}-F32.gguf"), ("hf", base)]:
        onto[name] = tmp_path / f"onto-{name}"
        iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", adapter,
                    "--mode", "rotate", "--rank", "16", "--out", onto[name])
    got, want = iu.module_updates(onto["gguf"]), iu.module_updates(onto["hf"])
    assert sorted(got) == sorted(want)
    for module in want:
        assert np.abs(got[module] - want[module]).max() <= 1e-6 * np.abs(want[module]).max(), module
