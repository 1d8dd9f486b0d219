"""GGUF base models: files of every tensor type this reader dequantizes, written by the `gguf`
package (llama.cpp's own Python reader and writer), read back bit for bit as `gguf.quants`
dequantizes them; a transfer read straight from the GGUF equal to one from its converted
safetensors; bad files refused with the file and the reason named."""

import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file

import interop_util as iu

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, LAYERS = 256, 512, 4, 2, 512, 2
HEAD_DIM = HIDDEN // HEADS

# One type per weight, so one small file covers every type: (layer, GGUF module) -> type.
TYPES = {
    (0, "attn_q"): T.Q4_0, (0, "attn_k"): T.Q4_1, (0, "attn_v"): T.Q5_0,
    (0, "attn_output"): T.Q5_1, (0, "ffn_gate"): T.Q8_0, (0, "ffn_up"): T.Q2_K,
    (0, "ffn_down"): T.Q3_K,
    (1, "attn_q"): T.Q4_K, (1, "attn_k"): T.Q5_K, (1, "attn_v"): T.Q6_K,
    (1, "attn_output"): T.BF16, (1, "ffn_gate"): T.F16, (1, "ffn_up"): T.F32,
    (1, "ffn_down"): T.Q4_K,
}
SHAPES = {  # Hugging Face (rows, cols)
    "attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
    "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
}
HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Byte offsets of the f16 scales in a K-quant block (random bytes elsewhere are valid quants).
K_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def encode(values: np.ndarray, qtype, rng) -> np.ndarray:
    """`values` (rows × cols, f32) stored as `qtype`: quantized by the package where it can,
    random blocks with small finite scales for the K-quants (the package only reads those)."""
    if qtype == T.F32:
        return values
    if qtype not in K_SCALES:
        return quantize(values, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = values.shape
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for at in K_SCALES[qtype]:
        scale = rng.uniform(1e-3, 2e-2, size=(rows, cols // block)).astype(np.float16)
        raw[:, :, at:at + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<|endoftext|>"] + [f"t{i}" for i in range(VOCAB - 1)])
    w.add_token_types([3] + [1] * (VOCAB - 1))

    def add(name, values, qtype):
        data = encode(values.astype(np.float32), qtype, rng)
        w.add_tensor(name, data, raw_dtype=None if qtype == T.F32 else qtype)

    add("token_embd.weight", rng.normal(0, 0.05, (VOCAB, HIDDEN)), T.Q8_0)
    add("output_norm.weight", 1 + rng.normal(0, 0.1, HIDDEN), T.F32)
    for layer in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            add(f"blk.{layer}.{norm}.weight", 1 + rng.normal(0, 0.1, HIDDEN), T.F32)
        for module, shape in SHAPES.items():
            scale = 1 / np.sqrt(shape[1])
            add(f"blk.{layer}.{module}.weight", rng.normal(0, scale, shape), TYPES[layer, module])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, layer, module, kind = gguf_name.split(".")
    return f"model.layers.{layer}.{HF[module]}.{kind}"


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of llama.cpp's Q/K permutation (reshape(h, 2, d/2).swapaxes(1, 2))."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def model_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def test_every_type_reads_as_the_reference_dequantizes_it(binary, model_gguf, tmp_path):
    out = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", model_gguf, "--out", out)
    ours = load_file(str(out / "model.safetensors"))
    reader = gguf.GGUFReader(str(model_gguf))
    seen = set()
    for t in reader.tensors:
        want = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        want = want.astype(np.float32)
        name = hf_name(t.name)
        if name.endswith("q_proj.weight"):
            want = unpermute(want, HEADS)
        elif name.endswith("k_proj.weight"):
            want = unpermute(want, KV_HEADS)
        got = ours.pop(name)
        assert got.shape == want.shape, name
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (
            f"{t.name} ({t.tensor_type.name}): max diff {np.abs(got - want).max()}"
        )
        seen.add(t.tensor_type)
    assert not ours, f"tensors the file does not hold: {sorted(ours)}"
    assert seen >= set(TYPES.values()) | {T.F32, T.Q8_0}


def test_transfer_from_gguf_equals_transfer_from_its_safetensors(binary, model_gguf, tmp_path):
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", model_gguf, "--out", converted)
    adapter = tmp_path / "adapter"
    iu.loraxfer(binary, "synth", "adapter", "--base", converted, "--out", adapter, "--r", "8")
    for mode in ("rotate", "map"):
        a, b = tmp_path / f"from-gguf-{mode}", tmp_path / f"from-st-{mode}"
        common = ["--adapter", adapter, "--mode", mode, "--rank", "32"]
        ran = iu.loraxfer(binary, "transfer", "--source-base", model_gguf, "--target-base",
                          model_gguf.parent, "--out", a, *common)
        assert "--gguf-adapter also writes" in ran.stdout, ran.stdout
        iu.loraxfer(binary, "transfer", "--source-base", converted, "--target-base", converted,
                    "--out", b, *common)
        ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
        assert ta.keys() == tb.keys() and len(ta) > 0
        for k in ta:
            assert np.array_equal(ta[k], tb[k]), f"{mode}: {k} differs"


def test_a_lora_for_a_gguf_base_follows_the_rows_it_stores(binary, model_gguf, tmp_path):
    """export-gguf onto the GGUF itself equals export-gguf onto its conversion, and the LoRA's B
    rows of Q and K sit where the base GGUF stores the weight's rows (the converter's permutation,
    found here from the dequantized rows themselves)."""
    converted = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", model_gguf, "--out", converted)
    adapter = tmp_path / "adapter"
    iu.loraxfer(binary, "synth", "adapter", "--base", converted, "--out", adapter, "--r", "4")
    for_gguf, for_st = tmp_path / "for-gguf.gguf", tmp_path / "for-st.gguf"
    iu.loraxfer(binary, "export-gguf", "--adapter", adapter, "--base", model_gguf, "--out", for_gguf)
    iu.loraxfer(binary, "export-gguf", "--adapter", adapter, "--base", converted, "--out", for_st)
    assert for_gguf.read_bytes() == for_st.read_bytes()

    base = {t.name: t for t in gguf.GGUFReader(str(model_gguf)).tensors}
    lora = {t.name: t for t in gguf.GGUFReader(str(for_gguf)).tensors}
    weights = load_file(str(converted / "model.safetensors"))
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    for layer, kind in [(0, "attn_q"), (1, "attn_q"), (0, "attn_k"), (1, "attn_k"), (1, "attn_v")]:
        t = base[f"blk.{layer}.{kind}.weight"]
        stored = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        hf = weights[f"model.layers.{layer}.{HF[kind]}.weight"]
        rows = {row.astype(np.float32).tobytes(): i for i, row in enumerate(hf)}
        assert len(rows) == len(hf), "rows are distinct"
        perm = [rows[row.astype(np.float32).tobytes()] for row in stored]
        b_hf = peft[f"base_model.model.model.layers.{layer}.{HF[kind]}.lora_B.weight"]
        b = lora[f"blk.{layer}.{kind}.weight.lora_b"]
        b_gguf = np.array(b.data).reshape([int(d) for d in reversed(b.shape)])
        assert np.array_equal(b_gguf, b_hf[perm]), f"blk.{layer}.{kind}"
        assert (perm != list(range(len(perm)))) == (kind != "attn_v"), kind


def test_bad_gguf_names_the_file_and_the_fault(binary, model_gguf, tmp_path):
    data = model_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    proc = subprocess.run([str(binary), "convert", "--gguf", str(cut), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "cut.gguf" in proc.stderr and "extends past the end" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_gguf_repository_in_the_hub_cache_resolves_by_name(binary, model_gguf, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-gguf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "tiny-llama.gguf").write_bytes(model_gguf.read_bytes())
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([str(binary), "inspect", "--source-base", "org/tiny-gguf",
                           "--target-base", str(model_gguf), "--json", "--rank", "16"],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert str(snapshot) in proc.stdout


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K permutation (LlamaModel.permute), the inverse of `unpermute`."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# (zoo architecture, GGUF architecture, Q/K permuted by llama.cpp's converter)
FAMILIES = [("olmo2", gguf.MODEL_ARCH.OLMO2, False), ("granite", gguf.MODEL_ARCH.GRANITE, True),
            ("seed_oss", gguf.MODEL_ARCH.SEED_OSS, False), ("ernie4_5", gguf.MODEL_ARCH.ERNIE4_5, False),
            ("hunyuan_v1_dense", gguf.MODEL_ARCH.HUNYUAN_DENSE, False), ("exaone4", gguf.MODEL_ARCH.EXAONE4, False),
            ("glm4", gguf.MODEL_ARCH.GLM4, False), ("glm", gguf.MODEL_ARCH.CHATGLM, False)]


@pytest.mark.parametrize("arch,gguf_arch,permuted", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_a_gguf_of_another_family_reads_as_its_hugging_face_model(binary, zoo, tmp_path, arch, gguf_arch,
                                                                  permuted):
    """OLMo 2 stores its norms after the blocks and its query/key norms across heads; Granite is a
    Llama (Q and K permuted) with multipliers in the metadata; Seed-OSS has q, k and v biases,
    Hunyuan query and key norms of its own names, EXAONE 4 norms after the blocks, GLM-4 a fused
    `gate_up_proj` and norms after the blocks of its own names. Written under llama.cpp's own
    names (the `gguf` package's tensor map) and conventions, converted back, every tensor is the
    Hugging Face model's, and the config carries the multipliers."""
    base = zoo.base(arch)
    weights = load_file(str(base / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    names = gguf.get_tensor_name_map(gguf_arch, layers)
    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf_arch])
    w.add_block_count(layers)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    multipliers = {"attention_multiplier": w.add_attention_scale, "embedding_multiplier": w.add_embedding_scale,
                   "residual_multiplier": w.add_residual_scale, "logits_scaling": w.add_logit_scale}
    for field, add in multipliers.items():
        if field in config:
            add(config[field])
    for name, value in weights.items():
        value = value.astype(np.float32)
        if permuted and name.endswith("q_proj.weight"):
            value = permute(value, heads)
        elif permuted and name.endswith("k_proj.weight"):
            value = permute(value, config["num_key_value_heads"])
        stem, kind = name.rsplit(".", 1)  # Seed-OSS has biases on q, k and v
        w.add_tensor(f"{names.get_name(stem)}.{kind}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    out = tmp_path / "converted"
    iu.loraxfer(binary, "convert", "--gguf", path, "--out", out)
    ours = load_file(str(out / "model.safetensors"))
    assert sorted(ours) == sorted(weights)
    for name, want in weights.items():
        assert np.array_equal(ours[name], want.astype(np.float32)), name
    got = json.loads((out / "config.json").read_text())
    assert got["model_type"] == arch
    for field in multipliers:
        if field in config:
            assert got[field] == pytest.approx(config[field], rel=1e-6), field
    if arch == "granite":
        assert all(field in config and field in got for field in multipliers), sorted(got)
