"""The map mode, judged by transformers + PEFT: a target (Llama, and OLMo 2 with its norms after
the blocks) that computes what the source computes in other coordinates (norm gains folded into the next weights, the residual stream rotated — or
embedded in a wider one by a semi-orthogonal map, RMSNorm then averaging over the larger width —,
heads permuted within their KV groups, MLP neurons permuted, dead neurons added, token ids
shuffled with the same strings) gets from `loraxfer transfer --mode map` an adapter with which it
computes what source + adapter computes, to float rounding. Granite maps onto its Llama twin
(the twin holds Granite's multipliers in its weights), and every family with fused modules,
norms after the blocks, head norms or multipliers maps onto itself."""

import json

import numpy as np
import pytest
import torch

import interop_util as iu

VOCAB = iu.COMMON["vocab_size"]
HD, HEADS, KV = 16, iu.COMMON["num_attention_heads"], iu.COMMON["num_key_value_heads"]


def write_vocab(directory, id_of):
    vocab = {f"w{i}": int(id_of[i]) for i in range(VOCAB)}
    doc = {"model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}
    (directory / "tokenizer.json").write_text(json.dumps(doc))


def save_with_gains(model, directory, rng, suffix="norm.weight"):
    """`model` with the gains of its norms (names ending in `suffix`) drawn around one, so that
    folding them matters, saved with the identity vocabulary."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(suffix):
                p.copy_(torch.from_numpy(1.0 + 0.3 * rng.standard_normal(p.shape)).float())
    out = iu.save_model(model, directory)
    write_vocab(out, np.arange(VOCAB))
    return out


def test_map_onto_a_model_in_other_coordinates_is_exact(zoo, tmp_path):
    check_twin(zoo, tmp_path, widen=0, dead=0)


def test_map_onto_a_wider_twin_with_dead_neurons_is_exact(zoo, tmp_path):
    check_twin(zoo, tmp_path, widen=16, dead=24)


def test_map_from_granite_onto_a_llama_twin_is_exact(zoo, tmp_path):
    """Granite is a Llama with constant factors the weights do not show (the embedding's, every
    block output's, the attention scores', the logits'): its Llama twin holds them in its
    weights, and the map must carry them from the config."""
    check_twin(zoo, tmp_path, widen=0, dead=0, arch="granite")


def check_twin(zoo, tmp_path, widen, dead, arch="llama"):
    """The source (a tiny Llama, or Granite) and a Llama twin `widen` residual dimensions wider
    with `dead` dead MLP neurons; the mapped adapter must give the source's logits through
    transformers + PEFT."""
    rng = np.random.default_rng(5)
    source = iu.load_model(zoo.base(arch))
    layers = source.config.num_hidden_layers
    # Granite's multipliers, folded into the twin's weights (ones for a Llama).
    cfg = source.config
    em, rho = getattr(cfg, "embedding_multiplier", 1.0), getattr(cfg, "residual_multiplier", 1.0)
    logit_scale = getattr(cfg, "logits_scaling", 1.0)
    score = getattr(cfg, "attention_multiplier", None)
    q_scale = 1.0 if score is None else score * np.sqrt(HD)  # the twin scores with 1/√HD
    src_dir = save_with_gains(source, tmp_path / "source", rng, "layernorm.weight")

    d = source.config.hidden_size
    d_t, inter = d + widen, source.config.intermediate_size
    q = np.linalg.qr(rng.standard_normal((d_t, d)))[0]  # d_t × d, orthonormal columns
    # RMSNorm over d_t dimensions of Q·h is √(d/d_t) times RMSNorm over d of h: constant target
    # gains c = √(d/d_t) undo it.
    c = np.sqrt(d / d_t)
    tau = np.concatenate([[0, 1, 2], 3 + rng.permutation(VOCAB - 3)])  # target id of source id
    groups = rng.permutation(KV)
    per = HEADS // KV
    q_heads = np.concatenate([g * per + rng.permutation(per) for g in groups])
    neurons = rng.permutation(source.config.intermediate_size)

    sd = {k: v.double().numpy() for k, v in source.state_dict().items()}
    out = {}
    inv = np.argsort(tau)
    out["model.embed_tokens.weight"] = (em * sd["model.embed_tokens.weight"] @ q.T)[inv]
    out["lm_head.weight"] = (sd["lm_head.weight"] * sd["model.norm.weight"]) @ q.T / logit_scale
    out["lm_head.weight"] = out["lm_head.weight"][inv]
    out["model.norm.weight"] = np.full(d_t, c)

    def rows(w, order, size):
        return np.concatenate([w[u * size:(u + 1) * size] for u in order])

    for j in range(layers):
        p = f"model.layers.{j}."
        g_attn, g_mlp = sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"]
        out[p + "input_layernorm.weight"] = np.full(d_t, c)
        out[p + "post_attention_layernorm.weight"] = np.full(d_t, c)
        a = p + "self_attn."
        out[a + "q_proj.weight"] = q_scale * rows(sd[a + "q_proj.weight"], q_heads, HD) * g_attn @ q.T
        out[a + "k_proj.weight"] = rows(sd[a + "k_proj.weight"], groups, HD) * g_attn @ q.T
        out[a + "v_proj.weight"] = rows(sd[a + "v_proj.weight"], groups, HD) * g_attn @ q.T
        out[a + "o_proj.weight"] = rho * q @ rows(sd[a + "o_proj.weight"].T, q_heads, HD).T
        m = p + "mlp."
        # Dead neurons: zero rows of gate and up and zero columns of down, after the live ones.
        zeros_in, zeros_out = np.zeros((dead, d_t)), np.zeros((d_t, dead))
        out[m + "gate_proj.weight"] = np.vstack([sd[m + "gate_proj.weight"][neurons] * g_mlp @ q.T, zeros_in])
        out[m + "up_proj.weight"] = np.vstack([sd[m + "up_proj.weight"][neurons] * g_mlp @ q.T, zeros_in])
        out[m + "down_proj.weight"] = np.hstack([rho * q @ sd[m + "down_proj.weight"][:, neurons], zeros_out])
    import transformers as tf

    # RMSNorm's ε is added to the mean square, which the wider stream shrinks by d/d_t: the twin
    # scales ε alike to stay exact.
    eps = iu.COMMON["rms_norm_eps"] * d / d_t
    config = tf.LlamaConfig(
        **{**iu.COMMON, "hidden_size": d_t, "intermediate_size": inter + dead, "rms_norm_eps": eps},
        num_hidden_layers=layers, head_dim=HD, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    target = tf.LlamaForCausalLM(config).eval()
    state = {k: torch.from_numpy(v).float() for k, v in out.items()}
    target.load_state_dict(state, strict=True)
    tgt_dir = iu.save_model(target, tmp_path / "target")
    write_vocab(tgt_dir, tau)

    assert_map_is_exact(zoo, tmp_path, src_dir, tgt_dir, tau)


def test_map_onto_an_olmo2_in_other_coordinates_is_exact(zoo, tmp_path):
    """OLMo 2 reads the residual as it is (no norm before the blocks), normalizes each block's
    output before it joins the residual, and normalizes q and k across all heads with a gain per
    row. Its twin: the residual stream under a signed permutation (which RMSNorm commutes with,
    the output and final norms' gains permuted with it), heads permuted within their KV groups
    with their query/key gains, neurons permuted, token ids shuffled, and q, k, v, o, up and down
    scaled by constants its norms remove."""
    rng = np.random.default_rng(7)
    source = olmo2_model(seed=31)
    src_dir = save_with_gains(source, tmp_path / "source", rng)

    d = source.config.hidden_size
    pi, signs = rng.permutation(d), rng.choice([-1.0, 1.0], d)
    q = np.zeros((d, d))
    q[pi, np.arange(d)] = signs  # (Q h)[pi[c]] = signs[c]·h[c]
    perm = np.abs(q)  # the gains move with the coordinates, without the signs
    tau = np.concatenate([[0, 1, 2], 3 + rng.permutation(VOCAB - 3)])
    inv = np.argsort(tau)
    groups = rng.permutation(KV)
    per = HEADS // KV
    q_heads = np.concatenate([g * per + rng.permutation(per) for g in groups])
    neurons = rng.permutation(source.config.intermediate_size)

    def rows(w, order, size):
        return np.concatenate([w[u * size:(u + 1) * size] for u in order])

    sd = {k: v.double().numpy() for k, v in source.state_dict().items()}
    out = {
        "model.embed_tokens.weight": (sd["model.embed_tokens.weight"] @ q.T)[inv],
        "lm_head.weight": (sd["lm_head.weight"] @ q.T)[inv],
        "model.norm.weight": perm @ sd["model.norm.weight"],
    }
    for j in range(source.config.num_hidden_layers):
        p = f"model.layers.{j}."
        for norm in ("post_attention_layernorm", "post_feedforward_layernorm"):
            out[p + norm + ".weight"] = perm @ sd[p + norm + ".weight"]
        a, m = p + "self_attn.", p + "mlp."
        out[a + "q_norm.weight"] = rows(sd[a + "q_norm.weight"], q_heads, HD)
        out[a + "k_norm.weight"] = rows(sd[a + "k_norm.weight"], groups, HD)
        # q and k are normalized after their projections, and v and up reach a norm linearly:
        # their scales leave the function as it is, and the mapped update must follow them.
        out[a + "q_proj.weight"] = 2.0 * rows(sd[a + "q_proj.weight"], q_heads, HD) @ q.T
        out[a + "k_proj.weight"] = 0.5 * rows(sd[a + "k_proj.weight"], groups, HD) @ q.T
        out[a + "v_proj.weight"] = 3.0 * rows(sd[a + "v_proj.weight"], groups, HD) @ q.T
        out[a + "o_proj.weight"] = 2.5 * q @ rows(sd[a + "o_proj.weight"].T, q_heads, HD).T
        out[m + "gate_proj.weight"] = sd[m + "gate_proj.weight"][neurons] @ q.T
        out[m + "up_proj.weight"] = 0.25 * sd[m + "up_proj.weight"][neurons] @ q.T
        out[m + "down_proj.weight"] = 0.4 * q @ sd[m + "down_proj.weight"][:, neurons]
    target = olmo2_model(seed=32)
    target.load_state_dict({k: torch.from_numpy(v).float() for k, v in out.items()}, strict=True)
    tgt_dir = iu.save_model(target, tmp_path / "target")
    write_vocab(tgt_dir, tau)
    ids = iu.INPUT_IDS
    with torch.no_grad():
        want = iu.load_model(src_dir)(input_ids=ids).logits.double().numpy()
        got = iu.load_model(tgt_dir)(input_ids=torch.from_numpy(tau[ids.numpy()])).logits.double().numpy()
    assert iu.max_rel_diff(got[..., tau], want) < 1e-4, "the twin computes what the source computes"
    assert_map_is_exact(zoo, tmp_path, src_dir, tgt_dir, tau)


def olmo2_model(seed):
    """A tiny OLMo 2 whose RMSNorms' ε is far below its activations' mean squares (the default
    1e-6 is of their order in a randomly initialized model), so that its norms remove scales."""
    model = iu.build_model("olmo2", 2, seed=seed)
    model.config.rms_norm_eps = 1e-12
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-12
    return model


def assert_map_is_exact(zoo, tmp_path, src_dir, tgt_dir, tau, target_modules=iu.SEPARATE):
    """A PEFT adapter on the source, mapped onto the target, must change the target's logits (in
    the shuffled vocabulary `tau`) as it changes the source's."""
    # An adapter on the source, saved by PEFT, with non-zero B.
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=16, target_modules=target_modules)
    adapter = tmp_path / "adapter"
    iu.random_peft(iu.load_model(src_dir), config, 21, 0.05).save_pretrained(str(adapter))

    mapped = tmp_path / "mapped"
    iu.loraxfer(zoo.binary, "transfer", "--source-base", src_dir, "--target-base", tgt_dir,
                "--adapter", adapter, "--out", mapped, "--mode", "map", "--device", "cpu")

    iu.assert_mapped_exactly(src_dir, adapter, tgt_dir, mapped, tau)


@pytest.mark.parametrize("arch", ["glm", "glm4", "phi3", "gemma3", "olmo2", "granite", "seed_oss", "ernie4_5",
                                  "hunyuan_v1_dense", "exaone4"])
def test_map_onto_the_model_itself_is_exact(zoo, tmp_path, arch):
    """Tables with fused modules, norms after the blocks (with or without norms before them),
    head norms or multipliers, through the whole map: a model mapped onto itself takes the
    adapter as it is."""
    rng = np.random.default_rng(3)
    src_dir = save_with_gains(iu.load_model(zoo.base(arch)), tmp_path / "source", rng)
    tgt_dir = iu.copy_dir(src_dir, tmp_path / "target")
    assert_map_is_exact(zoo, tmp_path, src_dir, tgt_dir, np.arange(VOCAB), iu.TARGET_MODULES[arch])
