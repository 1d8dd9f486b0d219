"""The map mode, judged by transformers + PEFT: a target that computes what the source computes
in other coordinates (norm gains folded into the next weights, the residual stream rotated — or
embedded in a wider one by a semi-orthogonal map, RMSNorm then averaging over the larger width —,
heads permuted within their KV groups, MLP neurons permuted, dead neurons added, token ids
shuffled with the same strings) gets from `loraxfer transfer --mode map` an adapter with which it
computes what source + adapter computes, to float rounding."""

import json
import warnings

import numpy as np
import torch

import interop_util as iu

VOCAB = iu.COMMON["vocab_size"]
HD, HEADS, KV = 16, iu.COMMON["num_attention_heads"], iu.COMMON["num_key_value_heads"]


def write_vocab(directory, id_of):
    vocab = {f"w{i}": int(id_of[i]) for i in range(VOCAB)}
    doc = {"model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}
    (directory / "tokenizer.json").write_text(json.dumps(doc))


def test_map_onto_a_model_in_other_coordinates_is_exact(zoo, tmp_path):
    check_twin(zoo, tmp_path, widen=0, dead=0)


def test_map_onto_a_wider_twin_with_dead_neurons_is_exact(zoo, tmp_path):
    check_twin(zoo, tmp_path, widen=16, dead=24)


def check_twin(zoo, tmp_path, widen, dead):
    """The source (tiny Llama) and a twin `widen` residual dimensions wider with `dead` dead MLP
    neurons; the mapped adapter must give the source's logits through transformers + PEFT."""
    rng = np.random.default_rng(5)
    source = iu.load_model(zoo.base("llama"))
    layers = source.config.num_hidden_layers
    with torch.no_grad():
        # Gains that are not ones, so that folding them matters.
        for name, p in source.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(torch.from_numpy(1.0 + 0.3 * rng.standard_normal(p.shape)).float())
    src_dir = iu.save_model(source, tmp_path / "source")
    write_vocab(src_dir, np.arange(VOCAB))

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
    out["model.embed_tokens.weight"] = (sd["model.embed_tokens.weight"] @ q.T)[inv]
    out["lm_head.weight"] = (sd["lm_head.weight"] * sd["model.norm.weight"]) @ q.T
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
        out[a + "q_proj.weight"] = rows(sd[a + "q_proj.weight"], q_heads, HD) * g_attn @ q.T
        out[a + "k_proj.weight"] = rows(sd[a + "k_proj.weight"], groups, HD) * g_attn @ q.T
        out[a + "v_proj.weight"] = rows(sd[a + "v_proj.weight"], groups, HD) * g_attn @ q.T
        out[a + "o_proj.weight"] = q @ rows(sd[a + "o_proj.weight"].T, q_heads, HD).T
        m = p + "mlp."
        # Dead neurons: zero rows of gate and up and zero columns of down, after the live ones.
        zeros_in, zeros_out = np.zeros((dead, d_t)), np.zeros((d_t, dead))
        out[m + "gate_proj.weight"] = np.vstack([sd[m + "gate_proj.weight"][neurons] * g_mlp @ q.T, zeros_in])
        out[m + "up_proj.weight"] = np.vstack([sd[m + "up_proj.weight"][neurons] * g_mlp @ q.T, zeros_in])
        out[m + "down_proj.weight"] = np.hstack([q @ sd[m + "down_proj.weight"][:, neurons], zeros_out])
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

    # An adapter on the source, saved by PEFT, with non-zero B.
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(
            iu.load_model(src_dir), LoraConfig(r=8, lora_alpha=16, target_modules=iu.SEPARATE)
        )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                torch.nn.init.normal_(param, std=0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))

    mapped = tmp_path / "mapped"
    iu.loraxfer(zoo.binary, "transfer", "--source-base", src_dir, "--target-base", tgt_dir,
                "--adapter", adapter, "--out", mapped, "--mode", "map", "--device", "cpu")

    ids = iu.INPUT_IDS
    with torch.no_grad():
        want = iu.load_peft_strict(iu.load_model(src_dir), adapter)(input_ids=ids).logits.double().numpy()
        base = iu.load_model(src_dir)(input_ids=ids).logits.double().numpy()
        got_model = iu.load_peft_strict(iu.load_model(tgt_dir), mapped)
        got = got_model(input_ids=torch.from_numpy(tau[ids.numpy()])).logits.double().numpy()
    got = got[..., tau]  # back to the source's vocabulary order
    # The adapter changes the function, and the mapped adapter changes the target the same way.
    assert iu.max_rel_diff(base, want) > 1e-2
    assert iu.max_rel_diff(got, want) < 1e-4, iu.max_rel_diff(got, want)
