"""Llama 4 through transformers and PEFT: a mixture of experts whose checkpoints store each layer's
experts fused and the other way round from transformers 5's other families
(`feed_forward.experts.gate_up_proj` `[E, hidden, 2·width]`, the gate's outputs then the up
projection's; `feed_forward.experts.down_proj` `[E, width, hidden]`), beside a shared expert in
every MoE layer and dense layers of another width (`intermediate_size_mlp`) where
`interleave_moe_layer_step` leaves them. PEFT adapts the experts through `target_parameters`, and
takes their last dimension for the input: its A is `[r·E, out]` and its B `[in, r·E]`. loraxfer
reads each expert's weight and update out of the fused tensors and writes its output in PEFT's
own fused form."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import interop_util as iu
from test_experts import MIN_CHANGE
from test_gpt_oss import assert_top_pairs_survive

EXPERTS, WIDTH, DENSE_WIDTH, LAYERS = 4, 24, 48, 4
HIDDEN = iu.COMMON["hidden_size"]
MOE_LAYERS = [1, 3]  # interleave_moe_layer_step 2
PARAMS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
BY_NAME = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# PEFT 0.21 checks rank and alpha patterns against module names only, so it warns that a pattern
# for a parameter matched nothing, and then applies it (the logits below would differ if not).
_KEY = r"'[^']*\.(?:feed_forward\.experts\.(?:gate_up_proj|down_proj)|weight)'"
PATTERN_NOTES = tuple(
    f"RuntimeWarning: The following {kind}_pattern keys did not match any targeted module and were "
    f"ignored: \\[{_KEY}(?:, {_KEY})*\\]\\."
    for kind in ("rank", "alpha")
)


def build(seed: int):
    import transformers as tf

    config = tf.Llama4TextConfig(
        vocab_size=iu.COMMON["vocab_size"], hidden_size=HIDDEN, intermediate_size=WIDTH,
        intermediate_size_mlp=DENSE_WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=EXPERTS, num_experts_per_tok=1,
        interleave_moe_layer_step=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return tf.Llama4ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama4(tmp_path_factory, binary):
    """(base, next release, PEFT's LoRA on the base: attention, dense MLPs and shared experts by
    name, the experts through their fused parameters)."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("llama4")
    base = iu.save_model(build(51), root / "base")
    assert json.loads((base / "config.json").read_text())["moe_layers"] == MOE_LAYERS
    release = root / "release"
    iu.loraxfer(binary, "synth", "model", "--derive-from", base, "--drift", "0.05", "--seed", "3",
                "--out", release)
    lora = root / "lora"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=BY_NAME, target_parameters=PARAMS)
    iu.random_peft(iu.load_model(base), config, 31, 0.1).save_pretrained(str(lora))
    return root, base, release, lora


def transfer(binary, base, target, adapter, out, *extra):
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", adapter,
                "--out", out, *extra)
    return json.loads((out / "transfer_report.json").read_text())


def peft_logits(base, adapter):
    return iu.logits(iu.load_peft_strict(iu.load_model(base), adapter, allow=PATTERN_NOTES))


def updates(adapter_dir) -> dict:
    """{module or `<experts>.<e>.<gate_proj|up_proj|down_proj>`: s·B·A as `[out, in]`}, from the
    files, the fused wrappers expanded as PEFT's ParamWrapper computes them for a parameter it
    takes as `[E, out, in]` (A `(E, r, ·)`, B `(·, r, E)`: the delta has the parameter's own
    `[E, in, out]` shape) and gate_up's outputs split the way Llama 4's forward splits them."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = iu.read_tensors(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(iu.PEFT_PREFIX):-len(".lora_A.weight")]
        a = tensors[key].astype(np.float64)
        b = tensors[f"{iu.PEFT_PREFIX}{module}.lora_B.weight"].astype(np.float64)
        if not re.search(r"\.experts(\.base_layer)?$", module):
            # By name, or through `<module>.weight` in target_parameters: a module's LoRA either way.
            name = module if module in config["target_modules"] else f"{module}.weight"
            r = iu.pattern_value(config["rank_pattern"], name, config["r"])
            alpha = iu.pattern_value(config["alpha_pattern"], name, config["lora_alpha"])
            out[module] = alpha / r * (b @ a)
            continue
        experts = module.split(".experts")[0] + ".experts"
        # A reads the parameter's last dimension: gate_up's 2·width outputs, down's hidden ones.
        param = "gate_up_proj" if a.shape[1] == 2 * WIDTH else "down_proj"
        assert a.shape[1] == (2 * WIDTH if param == "gate_up_proj" else HIDDEN), (module, a.shape)
        full = f"{experts}.{param}"
        assert any(full == t or full.endswith("." + t) for t in config["target_parameters"]), (module, config)
        r = iu.pattern_value(config["rank_pattern"], full, config["r"])
        alpha = iu.pattern_value(config["alpha_pattern"], full, config["lora_alpha"])
        assert a.shape[0] == r * EXPERTS, (module, a.shape, r)
        delta = np.einsum("ore,eri->eoi", b.reshape(b.shape[0], r, EXPERTS), a.reshape(EXPERTS, r, -1)) * alpha / r
        for e in range(EXPERTS):
            if param == "gate_up_proj":
                out[f"{experts}.{e}.gate_proj"] = delta[e][:, :WIDTH].T
                out[f"{experts}.{e}.up_proj"] = delta[e][:, WIDTH:].T
            else:
                out[f"{experts}.{e}.down_proj"] = delta[e].T
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
            columns = slice(0, WIDTH) if part == "gate_proj" else slice(WIDTH, 2 * WIDTH)
            weights[f"{experts}.gate_up_proj"][e][:, columns] += delta.T.astype(np.float32)
    out = iu.copy_dir(base, tmp / "merged")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return iu.logits(iu.load_model(out))


def expected_modules() -> set:
    attention = {f"model.layers.{l}.self_attn.{p}" for l in range(LAYERS) for p in BY_NAME[:4]}
    dense = {f"model.layers.{l}.feed_forward.{p}" for l in range(LAYERS) if l not in MOE_LAYERS for p in BY_NAME[4:]}
    shared = {f"model.layers.{l}.feed_forward.shared_expert.{p}" for l in MOE_LAYERS for p in BY_NAME[4:]}
    experts = {f"model.layers.{l}.feed_forward.experts.{e}.{p}" for l in MOE_LAYERS for e in range(EXPERTS)
               for p in BY_NAME[4:]}
    return attention | dense | shared | experts


def test_peft_lora_copies_onto_the_same_model_exactly(llama4, binary, tmp_path):
    """Copied onto the same model, PEFT's LoRA (attention, dense MLPs and shared experts by name,
    experts fused) comes back in PEFT's fused form, which PEFT loads strictly and which computes
    PEFT's logits with the source LoRA; every update is the source's."""
    _, base, _, lora = llama4
    out = tmp_path / "out"
    transfer(binary, base, iu.copy_dir(base, tmp_path / "copy"), lora, out, "--mode", "copy")
    config = json.loads((out / "adapter_config.json").read_text())
    fused = sorted(f"model.layers.{l}.{p}" for l in MOE_LAYERS for p in PARAMS)
    assert sorted(p for p in config["target_parameters"] if ".experts." in p) == fused
    assert all(".self_attn." in m for m in config["target_modules"]), config["target_modules"]
    source, carried = updates(lora), updates(out)
    assert set(source) == set(carried) == expected_modules()
    for module, delta in source.items():
        assert np.allclose(carried[module], delta, rtol=1e-5, atol=1e-7 * np.abs(delta).max()), module
    want = peft_logits(base, lora)
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(base))) > MIN_CHANGE
    assert iu.max_rel_diff(peft_logits(base, out), want) < 1e-5


def test_rotate_onto_a_release_keeps_each_experts_update(llama4, binary, tmp_path):
    """Rotated onto the next release (auto picks rotate), the experts keep their indices, each
    expert's gate, up and down update keeps its norm (the rotation is orthogonal, so the file's
    columns hold each part's own), and PEFT's logits equal the numpy merge."""
    _, base, release, lora = llama4
    out = tmp_path / "out"
    report = transfer(binary, base, release, lora, out, "--rank", "16")
    assert report["mode"] == "rotate", report["auto_reason"]
    assert sorted(report["expert_map"]) == [str(l) for l in MOE_LAYERS]
    for layer, m in report["expert_map"].items():
        assert m["source_experts"] == list(range(EXPERTS)), (layer, m)
    source, carried = updates(lora), updates(out)
    assert set(source) == set(carried) == expected_modules()
    for module, delta in source.items():
        norm, got = np.linalg.norm(delta), np.linalg.norm(carried[module])
        assert abs(got - norm) <= 1e-4 * norm, (module, got, norm)
        assert np.linalg.norm(carried[module] - delta) > 1e-3 * norm, module
    want = merged_logits(release, out, tmp_path)
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(release))) > MIN_CHANGE
    assert iu.max_rel_diff(peft_logits(release, out), want) < 1e-4


def expert_weights(base) -> dict:
    """{`<experts>.<e>.<part>`: `[out, in]`} as Llama 4's forward uses them (`x @ gate_up_proj[e]`,
    then `chunk(2, dim=-1)`: gate first)."""
    weights = load_file(str(base / "model.safetensors"))
    out = {}
    for l in MOE_LAYERS:
        experts = f"model.layers.{l}.feed_forward.experts"
        for e in range(EXPERTS):
            gate_up = weights[f"{experts}.gate_up_proj"][e]
            out[f"{experts}.{e}.gate_proj"] = gate_up[:, :WIDTH].T
            out[f"{experts}.{e}.up_proj"] = gate_up[:, WIDTH:].T
            out[f"{experts}.{e}.down_proj"] = weights[f"{experts}.down_proj"][e].T
    return out


def test_the_experts_are_read_as_the_forward_uses_them(llama4, binary, tmp_path):
    """Each expert's update set to its weight's top singular pair (from the slices the forward
    uses) survives a projection onto the model's own top-4 subspaces whole: it would not, were
    the expert's weight read from other rows or columns of the fused tensors."""
    _, base, _, _ = llama4
    out = assert_top_pairs_survive(binary, base, expert_weights(base), updates, tmp_path)
    iu.load_peft_strict(iu.load_model(base), out, allow=PATTERN_NOTES)


def test_a_synthetic_adapter_and_a_drifted_release_are_what_peft_and_transformers_load(llama4, binary, tmp_path):
    """`synth adapter` on Llama 4 writes PEFT's fused form, which PEFT loads strictly; `synth model
    --derive-from` copies the checkpoint as stored (the fused tensors, drifted), which transformers
    loads with no key missing or unexpected."""
    _, base, release, _ = llama4
    adapter = tmp_path / "synth-lora"
    iu.loraxfer(binary, "synth", "adapter", "--base", base, "--out", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    fused = sorted(f"model.layers.{l}.{p}" for l in MOE_LAYERS for p in PARAMS)
    assert sorted(p for p in config["target_parameters"] if ".experts." in p) == fused
    model = iu.load_peft_strict(iu.load_model(base), adapter, allow=PATTERN_NOTES)
    assert iu.max_rel_diff(iu.logits(model), iu.logits(iu.load_model(base))) > MIN_CHANGE
    from transformers import AutoModelForCausalLM

    with iu.quiet():
        _, info = AutoModelForCausalLM.from_pretrained(release, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    stored = set()
    for shard in release.glob("*.safetensors"):
        stored |= set(load_file(str(shard)))
    assert stored == set(load_file(str(base / "model.safetensors"))), sorted(stored)[:8]


def build_multimodal(seed: int):
    """A tiny `Llama4ForConditionalGeneration`, as Scout and Maverick are released: the language
    model's layers under `language_model.model.layers`, beside a vision model."""
    import transformers as tf

    text = build(seed).config.to_dict()
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14, projector_input_dim=64, projector_output_dim=HIDDEN, vision_output_dim=64,
                  pixel_shuffle_ratio=0.5)
    torch.manual_seed(seed)
    return tf.Llama4ForConditionalGeneration(tf.Llama4Config(text_config=text, vision_config=vision)).eval()


def test_a_multimodal_release_takes_the_lora_under_the_adapters_layer_names(binary, tmp_path):
    """On a multimodal checkpoint, PEFT's LoRA on the language model (the experts fused) made on
    `Llama4ForConditionalGeneration` copies onto the same model under
    `language_model.model.layers`, and one made on the same checkpoint loaded by
    `AutoModelForCausalLM` under `model.layers`: each as the class it was trained on names the
    layers, and PEFT loads each strictly onto that class, to its logits with the source LoRA."""
    import transformers as tf
    from peft import LoraConfig

    def load(path):
        with iu.quiet():
            return tf.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()

    base = iu.save_model(build_multimodal(52), tmp_path / "base")
    assert any(k.startswith("language_model.model.layers.1.feed_forward.experts.")
               for k in load_file(str(base / "model.safetensors")))
    lora = tmp_path / "lora"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r"language_model.*\.(q_proj|o_proj|gate_proj)",
                        target_parameters=PARAMS)
    iu.random_peft(load(base), config, 33, 0.1).save_pretrained(str(lora))
    out = tmp_path / "out"
    transfer(binary, base, iu.copy_dir(base, tmp_path / "copy"), lora, out, "--mode", "copy")
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(p for p in config["target_parameters"] if ".experts." in p) == sorted(
        f"language_model.model.layers.{l}.{p}" for l in MOE_LAYERS for p in PARAMS)
    want = text_logits(iu.load_peft_strict(load(base), lora, allow=PATTERN_NOTES))
    assert iu.max_rel_diff(want, text_logits(load(base))) > MIN_CHANGE
    got = text_logits(iu.load_peft_strict(load(base), out, allow=PATTERN_NOTES))
    assert iu.max_rel_diff(got, want) < 1e-5

    # The same checkpoint as its causal-LM class loads it: the layers are `model.layers`.
    lora = tmp_path / "lora-causal"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"], target_parameters=PARAMS)
    iu.random_peft(iu.load_model(base), config, 34, 0.1).save_pretrained(str(lora))
    out = tmp_path / "out-causal"
    transfer(binary, base, iu.copy_dir(base, tmp_path / "copy-causal"), lora, out, "--mode", "copy")
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(p for p in config["target_parameters"] if ".experts." in p) == sorted(
        f"model.layers.{l}.{p}" for l in MOE_LAYERS for p in PARAMS)
    want = peft_logits(base, lora)
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(base))) > MIN_CHANGE
    assert iu.max_rel_diff(peft_logits(base, out), want) < 1e-5


@torch.no_grad()
def text_logits(model) -> np.ndarray:
    """The language model's logits (transformers 5.24's `Llama4ForConditionalGeneration.forward`
    fails without images); PEFT's LoRA layers sit inside it, where PEFT placed them."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.language_model(input_ids=iu.INPUT_IDS).logits.float().numpy().astype(np.float64)
