"""Mixture-of-experts models whose layers differ, through transformers, PEFT and llama.cpp: Qwen2-MoE
(a dense layer by `mlp_only_layers`, a shared expert beside the experts), GLM-4.5
(`first_k_dense_replace` dense layers first, `n_shared_experts`), Qwen3-MoE with `mlp_only_layers`,
and DeepSeek-V3 and -V2 (GLM-4.5's layout with latent attention: a query latent in V3, one
`q_proj` in V2-Lite's configuration).

The full adapter adapts every projection the model has: the attention, the dense MLP of layer 0,
and in layer 1 every expert and the shared expert. PEFT 0.21 with transformers 5 cannot load all of
it for these models: for Qwen2-MoE it converts no per-expert module onto the fused experts (its
conversion table lists the families mapped onto Qwen2-MoE's pattern, not Qwen2-MoE itself), and
for the families it converts it retargets every `gate_proj`, `up_proj` and `down_proj` name to the
fused experts, dropping the dense layers' and the shared expert's. So PEFT judges the adapters it
can load (Qwen2-MoE without experts; GLM-4.5 and Qwen3-MoE without dense layers and shared
experts, and the LoRAs PEFT itself makes on fused experts), and the full adapter is judged by
merges into the checkpoint's tensors, loaded by transformers."""

import json
import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import interop_util as iu
from test_experts import ALPHA, FUSED_PATTERN_NOTES, MIN_CHANGE, R, fused_adapter, merged, peft_logits

EXPERTS, WIDTH, SHARED, DENSE = 4, 32, 48, 96
FAMILIES = ["qwen2_moe", "glm4_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2"]
GGUF_FAMILIES = ["qwen2_moe", "glm4_moe", "qwen3_moe"]
# DeepSeek's latent attention: q_lora_rank (None: one q_proj, as V2-Lite), kv_lora_rank, the heads'
# non-rotary and rotary query/key widths, the value width.
LATENT = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12)
# Below the layer: what an adapter on every projection adapts (routers and the shared expert's
# gate are not projections of the residual stream's update).
ADAPTABLE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "gate_proj", "up_proj", "down_proj")


def build(family: str, seed: int, dense: bool):
    """A two-layer model of `family`, layer 0 dense when `dense`, layer 1 with experts."""
    import transformers as tf

    common = {k: v for k, v in iu.COMMON.items() if k != "intermediate_size"}
    common.update(num_hidden_layers=2, num_experts_per_tok=2, tie_word_embeddings=False,
                  intermediate_size=DENSE, moe_intermediate_size=WIDTH)
    if family == "qwen2_moe":
        config = tf.Qwen2MoeConfig(num_experts=EXPERTS, shared_expert_intermediate_size=SHARED,
                                   mlp_only_layers=[0] if dense else [], **common)
    elif family == "glm4_moe":
        config = tf.Glm4MoeConfig(n_routed_experts=EXPERTS, n_shared_experts=1, first_k_dense_replace=int(dense),
                                  n_group=1, topk_group=1, head_dim=16, **common)
    elif family == "glm4_moe_lite":  # GLM-4.7-Flash: DeepSeek-V3's attention, dense layers by type
        common["num_key_value_heads"] = common["num_attention_heads"]
        config = tf.Glm4MoeLiteConfig(n_routed_experts=EXPERTS, n_shared_experts=1, n_group=1, topk_group=1,
                                      q_lora_rank=24, mlp_layer_types=["dense" if dense else "sparse", "sparse"],
                                      **LATENT, **common)
    elif family.startswith("deepseek"):
        cls = tf.DeepseekV3Config if family == "deepseek_v3" else tf.DeepseekV2Config
        common["num_key_value_heads"] = common["num_attention_heads"]  # every head its own keys
        config = cls(n_routed_experts=EXPERTS, n_shared_experts=1, first_k_dense_replace=int(dense), n_group=1,
                     topk_group=1, q_lora_rank=24 if family == "deepseek_v3" else None, **LATENT, **common)
    else:
        config = tf.Qwen3MoeConfig(num_experts=EXPERTS, mlp_only_layers=[0] if dense else [], head_dim=16,
                                   **common)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    # A router bias away from zero (GLM-4.5, DeepSeek-V3), so that the experts chosen depend on it.
    with torch.no_grad():
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0, 0.1)
    return model


def projections(base) -> dict:
    """Every adaptable projection of the checkpoint: module name → (out, in)."""
    weights = load_file(str(base / "model.safetensors"))
    return {name.removesuffix(".weight"): value.shape for name, value in weights.items()
            if name.endswith(".weight") and name.removesuffix(".weight").endswith(ADAPTABLE)}


def peft_loads(family: str, module: str) -> bool:
    """Whether PEFT 0.21 with transformers 5 loads a per-module LoRA on `module` (see above)."""
    if family == "qwen2_moe":
        return ".experts." not in module
    return "self_attn" in module or ".experts." in module


def write_adapter(base, out, keep=lambda module: True):
    """Random factors for every adaptable projection `keep` accepts, in PEFT's per-module format."""
    rng = np.random.default_rng(6)
    tensors = {}
    modules = projections(base)
    for module, (rows, cols) in sorted(modules.items()):
        a = rng.normal(0, 0.3, (R, cols)).astype(np.float32)
        b = rng.normal(0, 0.1, (rows, R)).astype(np.float32)
        if keep(module):
            tensors[f"{iu.PEFT_PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{iu.PEFT_PREFIX}{module}.lora_B.weight"] = b
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    # Short names, as PEFT's users write them (PEFT converts only those onto fused experts).
    names = {k.removeprefix(iu.PEFT_PREFIX).split(".lora_")[0].rsplit(".", 1)[1] for k in tensors}
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base), r=R,
                  lora_alpha=ALPHA, target_modules=sorted(names), lora_dropout=0.0, bias="none")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def layered(tmp_path_factory, binary):
    """family → (base, next release, full adapter, the part of it PEFT loads); with `dense=False`,
    (base, full adapter) of a model with experts in both layers."""
    root = tmp_path_factory.mktemp("experts-layers")
    made = {}

    def get(family, dense=True):
        key = (family, dense)
        if key not in made:
            name = f"{family}-{'dense' if dense else 'sparse'}"
            base = iu.save_model(build(family, 23, dense), root / f"{name}-base")
            full = write_adapter(base, root / f"{name}-lora")
            if not dense:
                made[key] = (base, full)
                return made[key]
            derived = root / f"{name}-derived"
            iu.loraxfer(binary, "synth", "model", "--derive-from", base, "--drift", "0.05", "--seed", "3",
                        "--out", derived)
            loadable = write_adapter(base, root / f"{name}-peft-lora", lambda m: peft_loads(family, m))
            made[key] = (base, derived, full, loadable)
        return made[key]

    return root, get


def transfer(binary, base, target, adapter, out, *extra):
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", adapter,
                "--out", out, *extra)
    return json.loads((out / "transfer_report.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapters_cover_every_block_and_peft_loads_its_part(layered, family):
    root, get = layered
    base, _, full, loadable = get(family)
    modules = iu.module_updates(full)
    assert any(".layers.0.mlp.gate_proj" in m for m in modules)
    assert any(".layers.1.mlp.experts.3.down_proj" in m for m in modules)
    assert any(".layers.1.mlp.shared_expert" in m for m in modules) == (family != "qwen3_moe")
    got, want = peft_logits(base, loadable), merged(base, loadable, root)
    assert iu.max_rel_diff(got, want) < 1e-4
    assert iu.max_rel_diff(got, iu.logits(iu.load_model(base))) > MIN_CHANGE


@pytest.mark.parametrize("family", FAMILIES)
def test_rotate_onto_a_next_release_carries_every_block(layered, family, binary, tmp_path):
    """Every module goes to its own counterpart (each expert to itself: the routers match), keeps
    most of its update on a release that drifted 5 %, and loads: the part PEFT loads equals its
    merge."""
    root, get = layered
    base, derived, full, loadable = get(family)
    out = tmp_path / "out"
    report = transfer(binary, base, derived, full, out, "--rank", "16")
    assert report["mode"] == "rotate", report.get("auto_reason")
    rows = report["modules"]
    assert len(rows) == len(iu.module_updates(full)) and all(r["transferred"] for r in rows)
    for r in rows:
        assert r["source_key"] == r["target_key"], r
    assert list(report["expert_map"]) == ["1"]
    source, rotated = iu.module_updates(full), iu.module_updates(out)
    assert sorted(rotated) == sorted(source)
    for module, want in source.items():
        assert np.linalg.norm(rotated[module] - want) < 0.5 * np.linalg.norm(want), module
    assert iu.max_rel_diff(merged(derived, out, root), iu.logits(iu.load_model(derived))) > MIN_CHANGE

    out = tmp_path / "loadable"
    transfer(binary, base, derived, loadable, out, "--rank", "16")
    got = peft_logits(derived, out)
    assert iu.max_rel_diff(got, merged(derived, out, root)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_copy_onto_the_same_model_is_exact(layered, family, binary, tmp_path):
    _, get = layered
    base, _, full, loadable = get(family)
    target = iu.copy_dir(base, tmp_path / "copy")
    out = tmp_path / "out"
    transfer(binary, base, target, full, out, "--mode", "copy")
    source, copied = iu.module_updates(full), iu.module_updates(out)
    assert sorted(copied) == sorted(source)
    for module, want in source.items():
        assert np.abs(copied[module] - want).max() <= 1e-6 * np.abs(want).max(), module
    out = tmp_path / "loadable"
    transfer(binary, base, target, loadable, out, "--mode", "copy")
    assert iu.max_rel_diff(peft_logits(target, out), peft_logits(base, loadable)) < 1e-5


@pytest.mark.parametrize("family", ["qwen2_moe", "glm4_moe", "deepseek_v3"])
def test_a_lora_on_fused_experts_copies_exactly(layered, family, binary, tmp_path):
    """PEFT's own LoRA on the fused experts (`target_parameters`), beside the projections PEFT
    adapts by name (Qwen2-MoE: the dense layer's and the shared expert's too), written one module
    per expert: its merge computes what PEFT computes with the fused LoRA."""
    root, get = layered
    base, _, _, _ = get(family)
    by_name = {"qwen2_moe": ["q_proj", "gate_proj", "up_proj", "down_proj"], "glm4_moe": ["q_proj", "o_proj"],
               "deepseek_v3": ["q_b_proj", "kv_a_proj_with_mqa", "o_proj"]}[family]
    adapter = fused_adapter(family, base, tmp_path / "fused-lora", by_name)
    keys = iu.read_tensors(adapter / "adapter_model.safetensors")
    assert any(".experts.base_layer.lora_A" in k for k in keys), sorted(keys)[:6]

    target = iu.copy_dir(base, tmp_path / "copy")
    out = tmp_path / "out"
    transfer(binary, base, target, adapter, out, "--mode", "copy")
    updates = iu.module_updates(out)
    assert sum(".experts." in m for m in updates) == 3 * EXPERTS, sorted(updates)
    if family == "qwen2_moe":
        assert any("layers.0.mlp.gate_proj" in m for m in updates)
        assert any("shared_expert.down_proj" in m for m in updates)
    want = peft_logits(base, adapter)
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(base))) > MIN_CHANGE
    assert iu.max_rel_diff(merged(target, out, root), want) < 1e-4


@pytest.mark.parametrize("family", FAMILIES + ["glm4_moe_lite"])
def test_the_fused_form_loads_every_block_in_peft(layered, family, binary, tmp_path):
    """`--fused-experts`: the full adapter rotated onto the release and written on transformers 5's
    fused expert parameters (`target_parameters`; dense MLPs and shared experts through their
    weights), which PEFT 0.21 loads whole: every tensor lands unchanged, and the logits equal the
    merge of the per-expert output, every block of it."""
    root, get = layered
    base, derived, full, _ = get(family)
    per, fused = tmp_path / "per", tmp_path / "fused"
    transfer(binary, base, derived, full, per, "--rank", "16")
    transfer(binary, base, derived, full, fused, "--rank", "16", "--fused-experts")
    config = json.loads((fused / "adapter_config.json").read_text())
    assert config["target_parameters"][:2] == ["model.layers.1.mlp.experts.gate_up_proj",
                                                "model.layers.1.mlp.experts.down_proj"]
    attention = sorted(m for m in projections(derived) if ".self_attn." in m)
    assert sorted(config["target_modules"]) == attention, config["target_modules"]
    want = merged(derived, per, root)
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(derived))) > MIN_CHANGE
    model = iu.load_peft_strict(iu.load_model(derived), fused, allow=FUSED_PATTERN_NOTES)
    assert iu.max_rel_diff(iu.logits(model), want) < 1e-4
    # Read back (as a transfer's input), it is the per-expert output.
    again = tmp_path / "again"
    transfer(binary, derived, iu.copy_dir(derived, tmp_path / "copy"), fused, again, "--mode", "copy")
    a, b = iu.module_updates(per), iu.module_updates(again)
    assert sorted(a) == sorted(b)
    for module, delta in a.items():
        assert np.abs(b[module] - delta).max() <= 1e-5 * max(np.abs(delta).max(), 1e-30), module


def test_fused_patterns_and_rslora_reach_peft(layered, binary, tmp_path):
    """rsLoRA, and alphas of their own for a dense layer's projection and for one expert's, through
    `--fused-experts` onto Qwen3-MoE (whose per-expert form PEFT converts, dropping the dense
    layer): the dense weight's alpha is keyed by `<module>.weight`, the expert's folded into its
    B, and PEFT's logits equal the per-expert output's merge."""
    root, get = layered
    base, derived, full, _ = get("qwen3_moe")
    adapter = iu.copy_dir(full, tmp_path / "patterned")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(use_rslora=True, alpha_pattern={"model.layers.0.mlp.gate_proj": 2 * ALPHA,
                                                  "model.layers.1.mlp.experts.2.up_proj": 3 * ALPHA})
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    per, fused = tmp_path / "per", tmp_path / "fused"
    transfer(binary, base, derived, adapter, per, "--rank", "16")
    transfer(binary, base, derived, adapter, fused, "--rank", "16", "--fused-experts")
    written = json.loads((fused / "adapter_config.json").read_text())
    assert written["alpha_pattern"]["model.layers.0.mlp.gate_proj.weight"] == 2 * ALPHA
    want = merged(derived, per, root)
    plain = tmp_path / "plain"
    transfer(binary, base, derived, full, plain, "--rank", "16")
    assert iu.max_rel_diff(want, merged(derived, plain, root)) > 1e-3  # the patterns matter
    model = iu.load_peft_strict(iu.load_model(derived), fused, allow=FUSED_PATTERN_NOTES)
    assert iu.max_rel_diff(iu.logits(model), want) < 1e-4


def test_an_experts_only_adapter_loads_in_peft_with_no_target_modules(layered, binary, tmp_path):
    """Only the experts adapted: the fused form has nothing in `target_modules` (an empty list),
    which PEFT accepts beside `target_parameters`, loading every tensor."""
    root, get = layered
    base, derived, _, _ = get("qwen3_moe")
    adapter = write_adapter(base, tmp_path / "experts-only", lambda m: ".experts." in m)
    per, fused = tmp_path / "per", tmp_path / "fused"
    transfer(binary, base, derived, adapter, per, "--rank", "16")
    transfer(binary, base, derived, adapter, fused, "--rank", "16", "--fused-experts")
    config = json.loads((fused / "adapter_config.json").read_text())
    # (layer 0's dense MLP is written too, with B = 0, as every module of an adapted type is)
    assert config["target_modules"] == [] and config["target_parameters"][:2] == [
        "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    model = iu.load_peft_strict(iu.load_model(derived), fused, allow=FUSED_PATTERN_NOTES)
    assert iu.max_rel_diff(iu.logits(model), merged(derived, per, root)) < 1e-4


def test_a_lone_fused_parameter_loads_in_peft(layered, binary, tmp_path):
    """An adapter without down projections: each layer's one fused wrapper (`gate_up_proj`) sits
    where PEFT puts a layer's only fused parameter, so PEFT loads it whole, and its logits equal
    the per-expert output's merge."""
    root, get = layered
    base, derived, _, _ = get("qwen2_moe")
    adapter = write_adapter(base, tmp_path / "no-down", lambda m: not m.endswith("down_proj"))
    per, fused = tmp_path / "per", tmp_path / "fused"
    transfer(binary, base, derived, adapter, per, "--rank", "16")
    transfer(binary, base, derived, adapter, fused, "--rank", "16", "--fused-experts")
    keys = iu.read_tensors(fused / "adapter_model.safetensors")
    assert f"{iu.PEFT_PREFIX}model.layers.1.mlp.experts.lora_B.weight" in keys
    assert not any("base_layer" in k for k in keys)
    model = iu.load_peft_strict(iu.load_model(derived), fused, allow=FUSED_PATTERN_NOTES)
    assert iu.max_rel_diff(iu.logits(model), merged(derived, per, root)) < 1e-4


GGUF_ARCH = {"qwen2_moe": "QWEN2MOE", "glm4_moe": "GLM4_MOE", "qwen3_moe": "QWEN3MOE"}


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_a_lora_gguf_equals_llama_cpp_conversion(layered, family, binary, tmp_path):
    """Experts stacked (`ffn_gate_exps`, …), the shared expert as `ffn_gate_shexp`, …, and GLM-4.5's
    dense layer as `ffn_gate`, …: the same tensors, names, shapes, types and values as llama.cpp's
    `convert_lora_to_gguf.py`. llama.cpp's qwen2moe and qwen3moe have experts in every layer, so a
    dense layer's module is refused for them, named."""
    from test_gguf_lora import assert_same_lora, reference, tensors

    _, get = layered
    dense = family == "glm4_moe"
    base, adapter = get(family, dense)[0], get(family, dense)[-2 if dense else 1]
    got = tmp_path / "got.gguf"
    iu.loraxfer(binary, "export-gguf", "--adapter", adapter, "--base", base, "--out", got)
    assert_same_lora(got, reference(adapter, base, tmp_path / "want.gguf"))
    shapes = {name: shape for name, (_, shape, _) in tensors(got).items()}
    assert shapes["blk.1.ffn_down_exps.weight.lora_b"] == [R, 64, EXPERTS]
    if dense:
        assert shapes["blk.0.ffn_up.weight.lora_a"] == [64, R]
    if family != "qwen3_moe":
        width = SHARED if family == "qwen2_moe" else WIDTH
        assert shapes["blk.1.ffn_gate_shexp.weight.lora_b"] == [R, width]
    else:
        base, _, full, _ = get(family)
        refused = subprocess.run([str(binary), "export-gguf", "--adapter", str(full), "--base", str(base),
                                  "--out", str(tmp_path / "no.gguf")], capture_output=True, text=True)
        assert refused.returncode != 0 and "model.layers.0.mlp." in refused.stderr, refused.stderr
        assert not (tmp_path / "no.gguf").exists()


def write_gguf(family: str, base, path):
    """The checkpoint in `base` as llama.cpp converts it (the `gguf` package's names): each expert
    layer's experts stacked, the router `ffn_gate_inp`, the shared expert `ffn_*_shexp`, dense
    layers `ffn_*`; GLM-4.5 with `leading_dense_block_count` and one multi-token-prediction layer
    counted in `block_count` (its tensors left out, as `--no-mtp` would not count it)."""
    import gguf

    config = json.loads((base / "config.json").read_text())
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[family])
    layers = config["num_hidden_layers"]
    glm = family == "glm4_moe"
    dense_first = glm and config["first_k_dense_replace"] > 0
    names = gguf.get_tensor_name_map(arch, layers + 1)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(layers + 1 if glm else layers)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(2)
    w.add_expert_feed_forward_length(WIDTH)
    if family == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(SHARED)
    if glm:
        w.add_expert_shared_count(1)
        w.add_leading_dense_block_count(int(dense_first))
        w.add_nextn_predict_layers(1)
    weights = load_file(str(base / "model.safetensors"))
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp"
        if f"{prefix}.gate.weight" not in weights:
            continue
        for hf, kind in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            stack = np.stack([weights.pop(f"{prefix}.experts.{e}.{hf}.weight") for e in range(EXPERTS)])
            w.add_tensor(f"blk.{layer}.ffn_{kind}_exps.weight", stack)
        w.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", weights.pop(f"{prefix}.gate.weight"))
    for name, value in weights.items():
        stem, kind = name.rsplit(".", 1)
        mapped = names.get_name(stem)
        if mapped is not None:
            w.add_tensor(f"{mapped}.{kind}", value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_a_gguf_base_reads_back_its_blocks(layered, family, binary, tmp_path):
    """Converted back, a GGUF holds the checkpoint's tensors under their Hugging Face names, its
    config the dense layers (the layers without a router: GLM-4.5's leading one), the shared
    expert, and the depth without the prediction layer; a transfer onto it equals the one onto the
    checkpoint."""
    _, get = layered
    dense = family == "glm4_moe"
    base, adapter = get(family, dense)[0], get(family, dense)[-2 if dense else 1]
    path = write_gguf(family, base, tmp_path / f"{family}.gguf")
    out = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", out)
    ours = load_file(str(out / "model.safetensors"))
    weights = load_file(str(base / "model.safetensors"))
    for module in projections(base):
        assert np.array_equal(ours[module + ".weight"], weights[module + ".weight"]), module
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config.get("mlp_only_layers", []) == ([0] if dense else [])
    if family == "qwen2_moe":
        assert config["shared_expert_intermediate_size"] == SHARED
    if family == "glm4_moe":
        assert (config["n_routed_experts"], config["n_shared_experts"], config["first_k_dense_replace"]) == \
            (EXPERTS, 1, 1)

    onto = {}
    for name, target in [("gguf", path), ("hf", base)]:
        onto[name] = tmp_path / f"onto-{name}"
        transfer(binary, base, target, adapter, onto[name], "--mode", "rotate", "--rank", "16")
    got, want = iu.module_updates(onto["gguf"]), iu.module_updates(onto["hf"])
    assert sorted(got) == sorted(want)
    for module in want:
        assert np.abs(got[module] - want[module]).max() <= 1e-6 * np.abs(want[module]).max(), module
