"""Qwen3.5 through transformers and PEFT: a hybrid whose layers have linear attention (Gated
DeltaNet: `linear_attn.in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, `out_proj`) in three
layers of four and softmax attention in the fourth (its `q_proj` twice as tall: each head's query
and its output gate), released as a multimodal checkpoint (`model.language_model.layers`) that
`AutoModelForCausalLM` loads as `model.layers`. loraxfer reads and writes every module of both
kinds, pairs layers of one kind along the depth, and names modules as the causal-LM class does."""

import json
import subprocess

import numpy as np
import pytest
import torch

import interop_util as iu

TEXT = dict(vocab_size=iu.COMMON["vocab_size"], hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=8)
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
              num_position_embeddings=16, patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
LINEAR = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
SOFTMAX = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
MIN_CHANGE = 1e-3


def full(layer: int) -> bool:
    """transformers' default pattern: every fourth layer softmax attention."""
    return (layer + 1) % 4 == 0


def build(layers: int, seed: int, multimodal: bool = False):
    import transformers as tf

    torch.manual_seed(seed)
    if multimodal:
        model = tf.Qwen3_5ForConditionalGeneration(
            tf.Qwen3_5Config(text_config=dict(TEXT, num_hidden_layers=layers), vision_config=VISION))
    else:
        model = tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**TEXT, num_hidden_layers=layers))
    with torch.no_grad():
        # Norms start at zero (the forward multiplies by 1 + w), time-step biases at one; a
        # trained model's are neither.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0, 0.1)
            elif name.endswith("dt_bias"):
                param.normal_(1, 0.3)
    return model.eval()


def lora_config():
    """PEFT's LoRA on every projection of both attention kinds and the MLP."""
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=SOFTMAX + LINEAR + MLP)


def peft_lora(base, out):
    iu.random_peft(iu.load_model(base), lora_config(), 61, 0.1).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory, binary):
    """(root, base, its next release, PEFT's LoRA on the base); the base a multimodal release."""
    root = tmp_path_factory.mktemp("qwen3_5")
    base = iu.save_model(build(4, 51, multimodal=True), root / "base")
    release = root / "release"
    iu.loraxfer(binary, "synth", "model", "--derive-from", base, "--drift", "0.05", "--seed", "3",
                "--out", release)
    return root, base, release, peft_lora(base, root / "lora")


def transfer(binary, base, target, adapter, out, *extra):
    iu.loraxfer(binary, "transfer", "--source-base", base, "--target-base", target, "--adapter", adapter,
                "--out", out, *extra)
    return json.loads((out / "transfer_report.json").read_text())


def peft_logits(base, adapter):
    return iu.logits(iu.load_peft_strict(iu.load_model(base), adapter))


def expected_modules(layers: int) -> list:
    """Every module of a LoRA on all projections, named as `AutoModelForCausalLM` names them."""
    names = []
    for l in range(layers):
        kind = [f"self_attn.{m}" for m in SOFTMAX] if full(l) else [f"linear_attn.{m}" for m in LINEAR]
        names += [f"model.layers.{l}.{m}" for m in kind + [f"mlp.{m}" for m in MLP]]
    return sorted(names)


def test_the_causal_lm_names_every_module_of_both_kinds(qwen35):
    """The release stores `model.language_model.layers`; PEFT's LoRA on the model
    `AutoModelForCausalLM` loads from it names `model.layers`, softmax attention in layer 3 and
    linear attention in 0–2 (the fixture's premise)."""
    _, base, _, lora = qwen35
    keys = iu.read_tensors(base / "model.safetensors")
    assert "model.language_model.layers.3.self_attn.q_proj.weight" in keys
    assert keys["model.language_model.layers.3.self_attn.q_proj.weight"].shape == (2 * 4 * 16, 64)
    assert sorted(iu.module_updates(lora)) == expected_modules(4)


def test_peft_lora_copies_onto_the_same_model_exactly(qwen35, binary, tmp_path):
    """Copied onto the same model, PEFT's LoRA comes back module for module under the causal-LM
    names, which PEFT loads strictly, computing PEFT's logits with the source LoRA."""
    _, base, _, lora = qwen35
    out = tmp_path / "out"
    transfer(binary, base, iu.copy_dir(base, tmp_path / "copy"), lora, out, "--mode", "copy")
    assert sorted(iu.module_updates(out)) == expected_modules(4)
    want = peft_logits(base, lora)
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(base))) > MIN_CHANGE
    assert iu.max_rel_diff(peft_logits(base, out), want) < 1e-5


def test_rotate_onto_a_release_keeps_each_update(qwen35, binary, tmp_path):
    """Rotated onto the next release (auto picks rotate), every module of either kind keeps its
    update's norm and moves it; PEFT loads the output strictly and its logits equal the numpy
    merge."""
    _, base, release, lora = qwen35
    out = tmp_path / "out"
    report = transfer(binary, base, release, lora, out, "--rank", "16")
    assert report["mode"] == "rotate", report["auto_reason"]
    source, carried = iu.module_updates(lora), iu.module_updates(out)
    assert sorted(carried) == sorted(source) == expected_modules(4)
    for module, delta in source.items():
        norm, got = np.linalg.norm(delta), np.linalg.norm(carried[module])
        assert abs(got - norm) <= 1e-4 * norm, (module, got, norm)
        assert np.linalg.norm(carried[module] - delta) > 1e-3 * norm, module
    weights = {k.replace("model.language_model.", "model."): v
               for k, v in iu.read_tensors(release / "model.safetensors").items()}
    model = iu.load_model(release)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module, delta in carried.items():
            merged = (weights[module + ".weight"].astype(np.float64) + delta).astype(np.float32)
            params[module + ".weight"].copy_(torch.from_numpy(merged))
    want = iu.logits(model)
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(release))) > MIN_CHANGE
    assert iu.max_rel_diff(peft_logits(release, out), want) < 1e-4


def test_a_deeper_model_takes_each_layer_from_one_of_its_kind(qwen35, binary, tmp_path):
    """Onto a deeper Qwen3.5 (8 layers, a text-only checkpoint): each target layer takes a source
    layer of its own attention kind, so every target layer gets its kind's modules (auto picks
    align: neither model has a vocabulary to anchor map on); PEFT loads the output strictly.
    Pairing a softmax layer with a linear one by hand is refused, naming the linear attention."""
    root, base, _, lora = qwen35
    deeper = iu.save_model(build(8, 52), root / "deeper")
    out = tmp_path / "out"
    report = transfer(binary, base, deeper, lora, out, "--rank", "8")
    assert report["mode"] == "align" and "tokenizer.json" in report["auto_reason"], report["auto_reason"]
    pairs = {int(j): i for j, i in report["layer_map"].items()}
    assert sorted(pairs) == list(range(8)) and all(full(j) == full(i) for j, i in pairs.items()), pairs
    assert sorted(iu.module_updates(out)) == expected_modules(8)
    iu.load_peft_strict(iu.load_model(deeper), out)

    layer_map = tmp_path / "map.json"
    layer_map.write_text(json.dumps({"3": 0}))
    cmd = [str(binary), "transfer", "--source-base", str(base), "--target-base", str(deeper), "--adapter",
           str(lora), "--out", str(tmp_path / "bad"), "--layer-map", str(layer_map)]
    err = subprocess.run(cmd, capture_output=True, text=True)
    assert err.returncode != 0 and "linear attention of source layer 0" in err.stderr, err.stderr
    assert "--layer-map" in err.stderr, err.stderr


def test_a_lora_on_the_multimodal_model_is_read_too(qwen35, binary, tmp_path):
    """A LoRA made on the multimodal model (`model.language_model.layers`) carries the same
    updates as the one on the causal LM: its output is the same, named as the multimodal model
    names the layers, and PEFT loads it strictly onto that model."""
    import transformers as tf

    _, base, release, lora = qwen35
    with iu.quiet():
        model = tf.Qwen3_5ForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    peft_model = iu.random_peft(model, lora_config(), 62, 0.1)
    # The causal LM's LoRA, moved onto the multimodal model's modules.
    state = {k.replace("base_model.model.model.layers.", "base_model.model.model.language_model.layers."): v
             for k, v in iu.read_tensors(lora / "adapter_model.safetensors").items()}
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            params[key.removesuffix(".weight") + ".default.weight"].copy_(torch.from_numpy(value))
    multimodal = tmp_path / "multimodal-lora"
    peft_model.save_pretrained(str(multimodal))
    names = iu.module_updates(multimodal)
    assert all(n.startswith("model.language_model.layers.") for n in names) and len(names) == len(state) // 2
    outs = {}
    for kind, adapter in [("causal", lora), ("multimodal", multimodal)]:
        outs[kind] = tmp_path / f"out-{kind}"
        transfer(binary, base, release, adapter, outs[kind], "--rank", "16")
    got, want = iu.module_updates(outs["multimodal"]), iu.module_updates(outs["causal"])
    assert sorted(want) == expected_modules(4)
    got = {k.replace("model.language_model.layers.", "model.layers."): v for k, v in got.items()}
    assert sorted(got) == sorted(want)
    for module in want:
        assert np.allclose(got[module], want[module], rtol=0, atol=1e-6 * np.abs(want[module]).max()), module
    with iu.quiet():
        model = tf.Qwen3_5ForConditionalGeneration.from_pretrained(release, dtype=torch.float32)
    iu.load_peft_strict(model, outs["multimodal"])


# Qwen3.5-MoE: the same attention, experts (one tensor per expert on disk, fused by transformers 5
# when loaded) and a shared expert in every layer, and no dense `intermediate_size`. Qwen3-Next:
# its linear attention in two fused projections (`in_proj_qkvz`, `in_proj_ba`, each interleaved
# per key head and taken whole), a dense layer among the expert layers.
EXPERTS = 4
MOE = dict({k: v for k, v in TEXT.items() if k != "intermediate_size"}, moe_intermediate_size=32,
           shared_expert_intermediate_size=48, num_experts=EXPERTS, num_experts_per_tok=2)
FUSED_LINEAR = ["in_proj_qkvz", "in_proj_ba", "out_proj"]


def build_moe(family: str):
    import transformers as tf

    torch.manual_seed(53)
    if family == "qwen3_next":
        config = tf.Qwen3NextConfig(**MOE, intermediate_size=80, mlp_only_layers=[0], num_hidden_layers=4)
        return tf.Qwen3NextForCausalLM(config).eval()
    return tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(**MOE, num_hidden_layers=4)).eval()


@pytest.fixture(scope="module")
def hybrid_moe(tmp_path_factory, binary):
    """family → (root, base, its next release, PEFT's LoRA on the fused experts and every
    projection by name)."""
    from peft import LoraConfig

    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            base = iu.save_model(build_moe(family), root / "base")
            release = root / "release"
            iu.loraxfer(binary, "synth", "model", "--derive-from", base, "--drift", "0.05", "--seed", "3",
                        "--out", release)
            linear = FUSED_LINEAR if family == "qwen3_next" else LINEAR
            config = LoraConfig(r=8, lora_alpha=16, target_modules=SOFTMAX + linear + MLP,
                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
            lora = root / "lora"
            iu.random_peft(iu.load_model(base), config, 63, 0.1).save_pretrained(str(lora))
            made[family] = (root, base, release, lora)
        return made[family]

    return get


@pytest.fixture(scope="module")
def qwen35_moe(hybrid_moe):
    return hybrid_moe("qwen3_5_moe")


def moe_modules(layers: int, family: str = "qwen3_5_moe") -> list:
    """Per-expert names of every module of the output of the fixture's LoRA. PEFT moves
    Qwen3-Next's by-name MLP targets onto its fused experts, so its LoRA has no shared expert;
    its dense layer 0 gets modules of the types the LoRA adapts (with no update)."""
    names = []
    experts = [f"mlp.experts.{e}.{m}" for e in range(EXPERTS) for m in MLP]
    for l in range(layers):
        linear = FUSED_LINEAR if family == "qwen3_next" else LINEAR
        kind = [f"self_attn.{m}" for m in SOFTMAX] if full(l) else [f"linear_attn.{m}" for m in linear]
        if family == "qwen3_next":
            mlp = [f"mlp.{m}" for m in MLP] if l == 0 else experts
        else:
            mlp = [f"mlp.shared_expert.{m}" for m in MLP] + experts
        names += [f"model.layers.{l}.{m}" for m in kind + mlp]
    return sorted(names)


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_next"])
def test_moe_lora_copies_and_rotates_in_both_forms(hybrid_moe, family, binary, tmp_path):
    """PEFT's LoRA on Qwen3.5-MoE and Qwen3-Next (both attention kinds by name, the shared expert
    and a dense layer by name, the experts on their fused parameters) copied onto the same model
    in the fused form (`--fused-experts`) computes PEFT's logits; rotated onto the next release,
    each module keeps its update's norm, and the fused form loads in PEFT strictly with the
    logits of the per-expert output merged in numpy."""
    from test_experts import CONVERSION_NOTES, FUSED_PATTERN_NOTES, merged

    root, base, release, lora = hybrid_moe(family)
    copy = tmp_path / "copy"
    transfer(binary, base, iu.copy_dir(base, tmp_path / "copy-base"), lora, copy, "--mode", "copy",
             "--fused-experts")
    # PEFT's own LoRA: where a dense layer's projections are adapted by name (Qwen3-Next's layer 0),
    # PEFT also notes the gate_up_proj patterns it set for converting them, and loads it whole.
    notes = FUSED_PATTERN_NOTES + CONVERSION_NOTES
    want = iu.logits(iu.load_peft_strict(iu.load_model(base), lora, allow=notes))
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(base))) > MIN_CHANGE
    got = iu.logits(iu.load_peft_strict(iu.load_model(base), copy, allow=FUSED_PATTERN_NOTES))
    assert iu.max_rel_diff(got, want) < 1e-5

    per, fused = tmp_path / "per", tmp_path / "fused"
    report = transfer(binary, base, release, lora, per, "--rank", "8")
    assert report["mode"] == "rotate", report["auto_reason"]
    transfer(binary, base, release, lora, fused, "--rank", "8", "--fused-experts")
    carried = iu.module_updates(per)
    assert sorted(carried) == moe_modules(4, family)
    again = tmp_path / "again"  # the source LoRA one module per expert: the norms to keep
    transfer(binary, base, iu.copy_dir(base, tmp_path / "again-base"), lora, again, "--mode", "copy")
    for module, delta in iu.module_updates(again).items():
        norm, got_norm = np.linalg.norm(delta), np.linalg.norm(carried[module])
        assert abs(got_norm - norm) <= 1e-4 * norm, (module, got_norm, norm)
    want = merged(release, per, root)
    assert iu.max_rel_diff(want, iu.logits(iu.load_model(release))) > MIN_CHANGE
    got = iu.logits(iu.load_peft_strict(iu.load_model(release), fused, allow=FUSED_PATTERN_NOTES))
    assert iu.max_rel_diff(got, want) < 1e-4


def test_map_onto_a_twin_moves_each_head_whole(binary, tmp_path):
    """The map mode, judged by transformers + PEFT: a Qwen3.5 twin (query heads permuted within
    their KV groups, the groups permuted; linear attention's value heads permuted within their key
    heads, the key heads permuted, with their convolution channels, decays and step biases; MLP
    neurons permuted; token ids shuffled) computes with the mapped adapter what the source
    computes with PEFT's LoRA on every projection: each softmax head's query and gate rows move
    together, and each linear head's rows of q, k, v, z, b and a and columns of out_proj, as
    transformers splits them."""
    from peft import LoraConfig

    vocab, hd, heads = TEXT["vocab_size"], TEXT["head_dim"], TEXT["num_attention_heads"]
    per = heads // TEXT["num_key_value_heads"]
    rng = np.random.default_rng(11)
    groups = rng.permutation(TEXT["num_key_value_heads"])
    q_heads = [groups[u // per] * per + w for u in range(0, heads, per) for w in rng.permutation(per)]
    neurons = rng.permutation(TEXT["intermediate_size"])
    kh, vh = TEXT["linear_num_key_heads"], TEXT["linear_num_value_heads"]
    kd, vd, r = TEXT["linear_key_head_dim"], TEXT["linear_value_head_dim"], vh // kh
    key_heads = np.arange(kh)[::-1]  # reversed, so that a key group matched to the wrong one shows
    value_heads = [key_heads[u // r] * r + w for u in range(0, vh, r) for w in rng.permutation(r)]
    tau = rng.permutation(vocab)

    def order(heads, size, start=0):
        return [start + h * size + i for h in heads for i in range(size)]

    qkv = order(key_heads, kd) + order(key_heads, kd, kh * kd) + order(value_heads, vd, 2 * kh * kd)

    def write_vocab(directory, id_of):
        doc = {"model": {"type": "WordLevel", "vocab": {f"w{i}": int(id_of[i]) for i in range(vocab)},
                         "unk_token": "w0"}}
        (directory / "tokenizer.json").write_text(json.dumps(doc))

    def units(w, order, size):
        return torch.cat([w[i * size:(i + 1) * size] for i in order])

    model = build(4, 54)
    source = iu.save_model(model, tmp_path / "source")
    write_vocab(source, np.arange(vocab))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for l in range(4):
        at = f"model.layers.{l}."
        if full(l):
            state[at + "self_attn.q_proj.weight"] = units(state[at + "self_attn.q_proj.weight"], q_heads, 2 * hd)
            for m in ["k_proj", "v_proj"]:
                state[at + f"self_attn.{m}.weight"] = units(state[at + f"self_attn.{m}.weight"], groups, hd)
            state[at + "self_attn.o_proj.weight"] = units(state[at + "self_attn.o_proj.weight"].T, q_heads, hd).T
        else:
            lin = at + "linear_attn."
            for name, index in [("in_proj_qkv.weight", qkv), ("conv1d.weight", qkv),
                                ("in_proj_z.weight", order(value_heads, vd)), ("in_proj_b.weight", value_heads),
                                ("in_proj_a.weight", value_heads), ("A_log", value_heads), ("dt_bias", value_heads)]:
                state[lin + name] = state[lin + name][list(index)]
            state[lin + "out_proj.weight"] = state[lin + "out_proj.weight"][:, order(value_heads, vd)]
        for m in ["gate_proj", "up_proj"]:
            state[at + f"mlp.{m}.weight"] = units(state[at + f"mlp.{m}.weight"], neurons, 1)
        state[at + "mlp.down_proj.weight"] = units(state[at + "mlp.down_proj.weight"].T, neurons, 1).T
    for name in ["model.embed_tokens.weight", "lm_head.weight"]:
        shuffled = torch.empty_like(state[name])
        shuffled[torch.from_numpy(tau)] = state[name]
        state[name] = shuffled
    twin = build(4, 54)
    twin.load_state_dict(state)
    target = iu.save_model(twin, tmp_path / "target")
    write_vocab(target, tau)

    adapter = tmp_path / "adapter"
    config = LoraConfig(r=8, lora_alpha=16, target_modules=SOFTMAX + LINEAR + MLP)
    iu.random_peft(iu.load_model(source), config, 23, 0.05).save_pretrained(str(adapter))
    mapped = tmp_path / "mapped"
    report = transfer(binary, source, target, adapter, mapped, "--mode", "map", "--device", "cpu")
    layers = report["map"]["layers"]
    assert [len(layer["q_heads"]) for layer in layers] == [0, 0, 0, 4]
    assert [layer.get("linear_heads", {}).get("value_heads") for layer in layers] == [value_heads] * 3 + [None]
    iu.assert_mapped_exactly(source, adapter, target, mapped, tau)
