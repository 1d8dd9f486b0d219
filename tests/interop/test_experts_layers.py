"""Mixture-of-experts models whose layers differ, through transformers and PEFT: Qwen2-MoE (a dense
layer by `mlp_only_layers`, a shared expert beside the experts), GLM-4.5 (`first_k_dense_replace`
dense layers first, `n_shared_experts`) and Qwen3-MoE with `mlp_only_layers`.

Each adapter adapts every projection the model has: the attention, the dense MLP of layer 0, and
in layer 1 every expert and the shared expert. As in test_experts.py, PEFT's forward pass is
judged against an independent merge into the checkpoint's tensors."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import interop_util as iu
from test_experts import ALPHA, MIN_CHANGE, R, merged, peft_logits

EXPERTS, WIDTH, SHARED, DENSE = 4, 32, 48, 96
FAMILIES = ["qwen2_moe", "glm4_moe", "qwen3_moe"]
# Below the layer: what an adapter on every projection adapts (routers and the shared expert's
# gate are not projections of the residual stream's update).
ADAPTABLE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "gate_proj", "up_proj", "down_proj")


def build(family: str, seed: int):
    import transformers as tf

    common = {k: v for k, v in iu.COMMON.items() if k != "intermediate_size"}
    common.update(num_hidden_layers=2, num_experts_per_tok=2, tie_word_embeddings=False,
                  intermediate_size=DENSE, moe_intermediate_size=WIDTH)
    if family == "qwen2_moe":
        config = tf.Qwen2MoeConfig(num_experts=EXPERTS, shared_expert_intermediate_size=SHARED,
                                   mlp_only_layers=[0], **common)
    elif family == "glm4_moe":
        config = tf.Glm4MoeConfig(n_routed_experts=EXPERTS, n_shared_experts=1, first_k_dense_replace=1,
                                  n_group=1, topk_group=1, head_dim=16, **common)
    else:
        config = tf.Qwen3MoeConfig(num_experts=EXPERTS, mlp_only_layers=[0], head_dim=16, **common)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    if family == "glm4_moe":
        # A router bias away from zero, so that the experts chosen depend on the weights.
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def projections(base) -> dict:
    """Every adaptable projection of the checkpoint: module name → (out, in)."""
    weights = load_file(str(base / "model.safetensors"))
    return {name.removesuffix(".weight"): value.shape for name, value in weights.items()
            if name.endswith(".weight") and name.removesuffix(".weight").endswith(ADAPTABLE)}


def write_adapter(base, out):
    rng = np.random.default_rng(6)
    tensors = {}
    modules = projections(base)
    for module, (rows, cols) in sorted(modules.items()):
        prefix = f"{iu.PEFT_PREFIX}{module}"
        tensors[prefix + ".lora_A.weight"] = rng.normal(0, 0.3, (R, cols)).astype(np.float32)
        tensors[prefix + ".lora_B.weight"] = rng.normal(0, 0.1, (rows, R)).astype(np.float32)
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base), r=R,
                  lora_alpha=ALPHA, target_modules=sorted(modules), lora_dropout=0.0, bias="none")
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def layered(tmp_path_factory, binary):
    root = tmp_path_factory.mktemp("experts-layers")
    made = {}

    def get(family):
        if family not in made:
            base = iu.save_model(build(family, 23), root / f"{family}-base")
            derived = root / f"{family}-derived"
            iu.loraxfer(binary, "synth", "model", "--derive-from", base, "--drift", "0.05", "--seed", "3",
                        "--out", derived)
            made[family] = (base, derived, write_adapter(base, root / f"{family}-lora"))
        return made[family]

    return root, get


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_covers_every_block_and_is_what_peft_loads(layered, family):
    root, get = layered
    base, _, adapter = get(family)
    modules = iu.module_updates(adapter)
    assert any(".layers.0.mlp.gate_proj" in m for m in modules)
    assert any(".layers.1.mlp.experts.3.down_proj" in m for m in modules)
    assert any(".layers.1.mlp.shared_expert" in m for m in modules) == (family != "qwen3_moe")
    got, want = peft_logits(base, adapter), merged(base, adapter, root)
    assert iu.max_rel_diff(got, want) < 1e-4
    assert iu.max_rel_diff(got, iu.logits(iu.load_model(base))) > MIN_CHANGE


@pytest.mark.parametrize("family", FAMILIES)
def test_rotate_onto_a_next_release_carries_every_block(layered, family, binary, tmp_path):
    root, get = layered
    base, derived, adapter = get(family)
    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", derived, "--adapter", adapter,
                "--rank", "16", "--out", out)
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["mode"] == "rotate", report.get("auto_reason")
    rows = report["modules"]
    assert len(rows) == len(iu.module_updates(adapter)) and all(r["transferred"] for r in rows)
    for r in rows:
        assert r["source_key"] == r["target_key"], r  # each block, and each expert, to itself
    assert list(report["expert_map"]) == ["1"]
    assert sorted(iu.module_updates(out)) == sorted(iu.module_updates(adapter))
    got = peft_logits(derived, out)
    assert iu.max_rel_diff(got, merged(derived, out, root)) < 1e-4
    assert iu.max_rel_diff(got, iu.logits(iu.load_model(derived))) > MIN_CHANGE


@pytest.mark.parametrize("family", FAMILIES)
def test_copy_onto_the_same_model_is_exact(layered, family, binary, tmp_path):
    _, get = layered
    base, _, adapter = get(family)
    target = iu.copy_dir(base, tmp_path / "copy")
    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", adapter,
                "--mode", "copy", "--out", out)
    assert iu.max_rel_diff(peft_logits(target, out), peft_logits(base, adapter)) < 1e-5


@pytest.mark.parametrize("family", ["qwen2_moe", "glm4_moe"])
def test_a_lora_on_fused_experts_with_a_shared_expert_copies_exactly(layered, family, binary, tmp_path):
    """PEFT's LoRA on the fused experts of layer 1 (`target_parameters`) beside the shared expert's
    and layer 0's dense projections (`target_modules`): written one module per expert, it computes
    what PEFT computes with the fused LoRA."""
    from peft import LoraConfig, get_peft_model

    root, get = layered
    base, _, _ = get(family)
    adapter = root / f"{family}-fused-lora"
    model = iu.load_model(base)
    torch.manual_seed(31)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "gate_proj", "down_proj"],
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    with iu.quiet():
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                torch.nn.init.normal_(param, std=0.1)
    peft_model.save_pretrained(str(adapter))
    keys = iu.read_tensors(adapter / "adapter_model.safetensors")
    assert any(".experts.base_layer.lora_A" in k for k in keys), sorted(keys)[:6]
    assert any("shared_expert" in k for k in keys) and any("layers.0.mlp.gate_proj" in k for k in keys)

    target = iu.copy_dir(base, tmp_path / "copy")
    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", adapter,
                "--mode", "copy", "--out", out)
    updates = iu.module_updates(out)
    assert sum(".experts." in m for m in updates) == 3 * EXPERTS, sorted(updates)
    want = peft_logits(base, adapter)
    assert iu.max_rel_diff(peft_logits(target, out), want) < 1e-5
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(base))) > MIN_CHANGE
