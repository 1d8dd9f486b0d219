"""loraxfer's output against PEFT and transformers: every transferred adapter loads into the target
with PeftModel.from_pretrained without a word about missing or unexpected keys, PEFT's forward pass
equals the target with W + s·B·A merged in numpy from the output files, and the adapter changes
what the target computes. Exact cases (--mode copy onto the same function) must reproduce the
source model + source adapter."""

import json
import math
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import interop_util as iu
from interop_util import LAYERS

RANK = ("--rank", "16")
TOL_F32 = 1e-4  # max |PEFT - merged| / max |logits|, f32 weights
TOL_BF16 = 1e-3  # the same with bf16 factors
MIN_CHANGE = 1e-2  # the adapter must move the logits by at least 1% of their scale


def read_json(path):
    return json.loads(path.read_text())


def check_config(out, adapter, target):
    """adapter_config.json keeps the source's r, alpha and options and names the target."""
    cfg = read_json(out / "adapter_config.json")
    src = read_json(adapter / "adapter_config.json")
    assert cfg["base_model_name_or_path"] == str(target)
    assert cfg["peft_type"] == "LORA"
    assert (cfg["r"], cfg["lora_alpha"]) == (src["r"], src["lora_alpha"])
    assert bool(cfg.get("use_rslora")) == bool(src.get("use_rslora"))
    return cfg


def check_report(out, mode, target_layers):
    """Every target module got an update, by `mode`, and every target layer is in the layer map."""
    report = read_json(out / "transfer_report.json")
    rows = report["modules"]
    assert rows, "empty report"
    assert {r["mode"] for r in rows} == {mode}
    assert all(r["transferred"] for r in rows), [r["target_key"] for r in rows if not r["transferred"]]
    assert report["summary"]["skipped"] == 0
    assert sorted(int(j) for j in report["layer_map"]) == list(range(target_layers))
    return report


def check_merge(target, out, tol):
    """PEFT's forward with the adapter equals the numpy merge, and differs from the bare target."""
    bare = iu.logits(iu.load_model(target))
    with_adapter = iu.logits(iu.load_peft_strict(iu.load_model(target), out))
    merged = iu.logits(iu.merged_model(target, out))
    err = iu.max_rel_diff(with_adapter, merged)
    change = iu.max_rel_diff(with_adapter, bare)
    assert err < tol, f"PEFT forward vs numpy merge: relative error {err:.3g} >= {tol}"
    assert change > MIN_CHANGE, f"the adapter barely changes the target's logits ({change:.3g})"
    return with_adapter


def source_logits(zoo, arch, variant):
    """The source model with its PEFT adapter, as PEFT saved it."""
    model = iu.load_model(zoo.base(arch))
    return iu.logits(iu.load_peft_strict(model, zoo.adapter(arch, variant)))


def same_arch_output(zoo, arch):
    """The plain adapter of `arch`, transferred (auto) onto the drifted derivative."""
    return zoo.transfer(zoo.adapter(arch), zoo.base(arch), zoo.derived(arch), *RANK)


def cross_output(zoo, src, dst, mode):
    return zoo.transfer(zoo.adapter(src), zoo.base(src), zoo.base(dst), "--mode", mode, *RANK)


def adapter_modules(out):
    keys = iu.read_tensors(out / "adapter_model.safetensors")
    return {k[len(iu.PEFT_PREFIX) : -len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight")}


def expected_modules(arch, layers):
    block = {"o_proj": "self_attn", "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
             "qkv_proj": "self_attn"}
    return {f"model.layers.{i}.{block.get(t, 'mlp')}.{t}"
            for i in range(layers) for t in iu.TARGET_MODULES[arch]}


# --------------------------------------------------------------------------------------------
# The oracle itself: on PEFT's own files the numpy merge must agree with PEFT.


@pytest.mark.parametrize("variant", ["plain", "bf16", "patterns"])
def test_numpy_merge_matches_peft_on_peft_adapters(zoo, variant):
    tol = TOL_BF16 if variant == "bf16" else TOL_F32
    check_merge(zoo.base("qwen2"), zoo.adapter("qwen2", variant), tol)


# --------------------------------------------------------------------------------------------
# Same architecture, a 5%-drifted "next release": auto means rotate everywhere.


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3", "phi3", "smollm3", "olmo2", "granite", "glm4",
                                  "glm", "seed_oss", "ernie4_5", "hunyuan_v1_dense", "exaone4"])
def test_same_architecture_derived_target(zoo, arch):
    adapter, target = zoo.adapter(arch), zoo.derived(arch)
    out = same_arch_output(zoo, arch)
    check_config(out, adapter, target)
    report = check_report(out, "rotate", LAYERS[arch])
    assert report["mode"] == "rotate"
    assert "equal depths" in report["auto_reason"], report["auto_reason"]
    # A 5% drift leaves the top subspaces nearly where they were.
    assert report["summary"]["mean_similarity"] > 0.8, report["summary"]
    assert adapter_modules(out) == expected_modules(arch, LAYERS[arch])
    check_merge(target, out, TOL_F32)


# --------------------------------------------------------------------------------------------
# Across architectures (independent random targets). Where depth and shapes match, auto rotates;
# elsewhere the zoo's models have no tokenizer.json for map's residual map, so auto aligns.

CROSS = [
    ("qwen2", "llama", "auto", "align"),
    ("llama", "gemma3", "align", "align"),
    ("qwen2", "phi3", "auto", "rotate"),  # q/k/v and gate/up re-fused; same depth and shapes
    ("phi3", "llama", "procrustes", "procrustes"),  # qkv_proj and gate_up_proj split
]


@pytest.mark.parametrize("src,dst,mode,row_mode", CROSS, ids=[f"{s}-{d}" for s, d, *_ in CROSS])
def test_cross_architecture(zoo, src, dst, mode, row_mode):
    adapter, target = zoo.adapter(src), zoo.base(dst)
    out = cross_output(zoo, src, dst, mode)
    cfg = check_config(out, adapter, target)
    check_report(out, row_mode, LAYERS[dst])
    assert adapter_modules(out) == expected_modules(dst, LAYERS[dst])
    # The modules written, by full name: PEFT targets exactly those.
    assert set(cfg["target_modules"]) == set(adapter_modules(out))
    assert {m.rsplit(".", 1)[1] for m in cfg["target_modules"]} == set(iu.TARGET_MODULES[dst])
    if dst == "phi3":
        # Re-fused: rank 8 + 8 + 8 for qkv_proj, 8 + 8 for gate_up_proj, and the same scale.
        ranks = {m: iu.pattern_value(cfg["rank_pattern"], m, cfg["r"]) for m in adapter_modules(out)}
        for module, r in ranks.items():
            assert r == {"qkv_proj": 24, "gate_up_proj": 16}.get(module.rsplit(".", 1)[1], 8), module
        for module in ranks:
            alpha = iu.pattern_value(cfg["alpha_pattern"], module, cfg["lora_alpha"])
            assert alpha / ranks[module] == pytest.approx(cfg["lora_alpha"] / cfg["r"]), module
    else:
        assert not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    check_merge(target, out, TOL_F32)


# --------------------------------------------------------------------------------------------
# Exact cases: copying onto a model that computes the same function reproduces the source.


def test_copy_onto_identical_model_is_exact(zoo, tmp_path):
    adapter = zoo.adapter("qwen2")
    target = iu.copy_dir(zoo.base("qwen2"), tmp_path / "qwen2-copy")
    out = zoo.transfer(adapter, zoo.base("qwen2"), target, "--mode", "copy", *RANK)
    check_config(out, adapter, target)
    check_report(out, "copy", LAYERS["qwen2"])
    src = iu.read_tensors(adapter / "adapter_model.safetensors")
    got = iu.read_tensors(out / "adapter_model.safetensors")
    assert sorted(got) == sorted(src)
    for key in src:
        assert np.array_equal(got[key], src[key]), key
    want = source_logits(zoo, "qwen2", "plain")
    have = iu.logits(iu.load_peft_strict(iu.load_model(target), out))
    assert np.abs(have - want).max() < 1e-6


TWINS = [("qwen2", "phi3", "plain"), ("qwen2", "phi3", "patterns"),
         ("phi3", "llama", "plain"), ("phi3", "llama", "patterns")]


@pytest.mark.parametrize("src,dst,variant", TWINS, ids=["-".join(t) for t in TWINS])
def test_copy_onto_twin_of_other_architecture_is_exact(zoo, src, dst, variant):
    """A `dst` model holding `src`'s weights, fused or split, computes what `src` computes; copying
    the adapter onto it must carry every projection's update exactly, including per-module ranks,
    alphas and rsLoRA scales folded into a re-fused module."""
    adapter, target = zoo.adapter(src, variant), zoo.twin(src, dst)
    out = zoo.transfer(adapter, zoo.base(src), target, "--mode", "copy", *RANK)
    check_config(out, adapter, target)
    check_report(out, "copy", LAYERS[src])
    want = source_logits(zoo, src, variant)
    have = check_merge(target, out, TOL_F32)
    err = iu.max_rel_diff(have, want)
    assert err < 1e-5, f"twin with the copied adapter vs source with its adapter: {err:.3g}"


# --------------------------------------------------------------------------------------------
# Adapters as PEFT writes them with other settings: bf16 factors; rank/alpha patterns + rsLoRA.


@pytest.mark.parametrize("dst", ["qwen2", "phi3"])
def test_bf16_adapter(zoo, dst):
    adapter = zoo.adapter("qwen2", "bf16")
    target = zoo.derived("qwen2") if dst == "qwen2" else zoo.base(dst)
    out = zoo.transfer(adapter, zoo.base("qwen2"), target, *RANK)
    check_config(out, adapter, target)
    check_report(out, "rotate", LAYERS[dst])  # auto: equal depths and shapes
    assert iu.safetensors_dtypes(out / "adapter_model.safetensors") == {"BF16"}
    check_merge(target, out, TOL_BF16)


@pytest.mark.parametrize("dst", ["qwen2", "phi3"])
def test_rank_alpha_patterns_and_rslora(zoo, dst):
    adapter = zoo.adapter("qwen2", "patterns")
    target = zoo.derived("qwen2") if dst == "qwen2" else zoo.base(dst)
    out = zoo.transfer(adapter, zoo.base("qwen2"), target, *RANK)
    cfg = check_config(out, adapter, target)
    assert cfg["use_rslora"] is True
    check_report(out, "rotate", LAYERS[dst])  # auto: equal depths and shapes
    tensors = iu.read_tensors(out / "adapter_model.safetensors")
    ranks = {m: tensors[f"{iu.PEFT_PREFIX}{m}.lora_A.weight"].shape[0] for m in adapter_modules(out)}
    if dst == "qwen2":
        # Same modules: each keeps the rank PEFT gave its source module.
        src_cfg = read_json(adapter / "adapter_config.json")
        for module, r in ranks.items():
            assert r == iu.pattern_value(src_cfg["rank_pattern"], module, src_cfg["r"]), module
        assert ranks["model.layers.1.mlp.down_proj"] == 12
        assert ranks["model.layers.0.self_attn.q_proj"] == 4
    else:
        # Re-fused: q 4 + k 8 + v 8, gate 8 + up 8; down_proj of layer 1 stays 12.
        assert ranks["model.layers.0.self_attn.qkv_proj"] == 20
        assert ranks["model.layers.1.mlp.gate_up_proj"] == 16
        assert ranks["model.layers.1.mlp.down_proj"] == 12
        assert ranks["model.layers.0.mlp.down_proj"] == 8
    check_merge(target, out, TOL_F32)


# --------------------------------------------------------------------------------------------
# The math, checked where it is exact: at full rank (the default --rank 256 is capped at
# min(m, n)) the randomized SVD is exact and project gives ΔW_t = P_U ΔW_s P_V, with P_U, P_V the
# projectors on the column and row spaces of the target weight (of each fused part's rows).

PARTS = {"qkv_proj": [("q_proj", 64), ("k_proj", 32), ("v_proj", 32)],
         "gate_up_proj": [("gate_proj", 176), ("up_proj", 176)]}


def source_layer(j, source_layers, target_layers):
    """README: target layer j takes source layer round(j·(L_s−1)/(L_t−1)), half away from zero."""
    if target_layers == 1:
        return 0
    return math.floor(j * (source_layers - 1) / (target_layers - 1) + 0.5)


@pytest.mark.parametrize("dst", ["qwen2", "llama", "phi3"])
def test_full_rank_project_is_the_exact_projection(zoo, dst):
    adapter = zoo.adapter("qwen2")
    target = zoo.derived("qwen2") if dst == "qwen2" else zoo.base(dst)
    out = zoo.transfer(adapter, zoo.base("qwen2"), target, "--mode", "project")
    rows = read_json(out / "transfer_report.json")["modules"]
    assert all(r["rank_capped"] and r["rank"] == min(r["target_shape"]) for r in rows)
    source, got = iu.module_updates(adapter), iu.module_updates(out)
    weights = load_file(str(target / "model.safetensors"))
    assert set(got) == expected_modules(dst, LAYERS[dst])
    for module, delta in got.items():
        layer, block, kind = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(\w+)", module).groups()
        j = source_layer(int(layer), LAYERS["qwen2"], LAYERS[dst])
        start = 0
        for part, size in PARTS.get(kind, [(kind, delta.shape[0])]):
            w = weights[module + ".weight"][start : start + size].astype(np.float64)
            u, _, vh = np.linalg.svd(w, full_matrices=False)
            want = u @ (u.T @ source[f"model.layers.{j}.{block}.{part}"] @ vh.T) @ vh
            have = delta[start : start + size]
            err = np.linalg.norm(have - want) / np.linalg.norm(want)
            assert err < 1e-4, f"{module} ({part} of source layer {j}): relative error {err:.3g}"
            start += size
        assert start == delta.shape[0]


# --------------------------------------------------------------------------------------------
# AutoPeftModel builds the base model from adapter_config.json alone (base_model_name_or_path,
# and, for task_type null as here, the class named by auto_mapping).

AUTO = [("qwen2", "qwen2", None), ("qwen2", "phi3", "auto"), ("phi3", "llama", "procrustes")]


@pytest.mark.parametrize("src,dst,mode", AUTO, ids=[f"{s}-{d}" for s, d, _ in AUTO])
def test_auto_peft_model_builds_the_target(zoo, src, dst, mode):
    from peft import AutoPeftModel

    out = same_arch_output(zoo, src) if mode is None else cross_output(zoo, src, dst, mode)
    target = zoo.derived(src) if mode is None else zoo.base(dst)
    cfg = read_json(out / "adapter_config.json")
    target_class = read_json(target / "config.json")["architectures"][0]
    if cfg.get("task_type") is None and cfg.get("auto_mapping"):
        assert cfg["auto_mapping"]["base_model_class"] == target_class, (
            f"adapter_config.json auto_mapping {cfg['auto_mapping']} still names the source's "
            f"class; AutoPeftModel would build it from {target} (a {target_class})"
        )
    with iu.no_key_complaints(f"AutoPeftModel.from_pretrained({out})"):
        model = AutoPeftModel.from_pretrained(str(out)).eval()
    assert type(model.get_base_model()).__name__ == target_class
    iu.check_lora_parameters(model, out)
    want = iu.logits(iu.load_peft_strict(iu.load_model(target), out))
    assert iu.max_rel_diff(iu.logits(model), want) < 1e-5


# --------------------------------------------------------------------------------------------
# The strict loader of this suite does catch what it is there to catch.


@pytest.mark.parametrize("damage", ["missing", "unexpected"])
def test_strict_loader_catches_key_problems(zoo, tmp_path, damage):
    bad = iu.copy_dir(zoo.adapter("qwen2"), tmp_path / "bad")
    path = bad / "adapter_model.safetensors"
    tensors = load_file(str(path))
    victim = f"{iu.PEFT_PREFIX}model.layers.1.mlp.down_proj"
    if damage == "missing":
        del tensors[victim + ".lora_A.weight"], tensors[victim + ".lora_B.weight"]
    else:
        tensors[victim.replace("down_proj", "side_proj") + ".lora_A.weight"] = np.ones((8, 64), np.float32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(AssertionError, match=damage if damage == "missing" else "file-only"):
        iu.load_peft_strict(iu.load_model(zoo.base("qwen2")), bad)
