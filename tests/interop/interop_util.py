"""Helpers of the PEFT interoperability suite: tiny Hugging Face models built from configs, PEFT
adapters saved by PEFT itself, the loraxfer command line, a strict PEFT loader, and a merge of an
adapter into its base computed in numpy from the files alone (independent of PEFT and loraxfer)."""

import contextlib
import json
import logging
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as np_load_file

PEFT_PREFIX = "base_model.model."

# Shapes shared by every tiny model: hidden 64, 4 heads / 2 kv heads of 16, MLP 176, vocab 256.
COMMON = dict(
    hidden_size=64,
    intermediate_size=176,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Depths differ so that cross-architecture transfers exercise the layer map.
LAYERS = {"qwen2": 2, "llama": 3, "gemma3": 2, "phi3": 2, "smollm3": 2, "olmo2": 2, "granite": 2, "glm4": 2,
          "glm": 2, "seed_oss": 2, "ernie4_5": 2, "hunyuan_v1_dense": 2, "exaone4": 2}
SEEDS = {"qwen2": 11, "llama": 12, "gemma3": 13, "phi3": 14, "smollm3": 15, "olmo2": 16, "granite": 17,
         "glm4": 18, "glm": 19, "seed_oss": 20, "ernie4_5": 21, "hunyuan_v1_dense": 22, "exaone4": 23}

SEPARATE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
FUSED_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def _config(arch: str, layers: int):
    import transformers as tf

    if arch == "qwen2":
        return tf.Qwen2Config(num_hidden_layers=layers, head_dim=16, tie_word_embeddings=False, **COMMON)
    if arch == "llama":
        return tf.LlamaConfig(num_hidden_layers=layers, head_dim=16, tie_word_embeddings=False, **COMMON)
    if arch == "gemma3":
        # Gemma 3 ties its embeddings (no lm_head.weight on disk), like the real checkpoints.
        return tf.Gemma3TextConfig(
            num_hidden_layers=layers, head_dim=16, sliding_window=32, query_pre_attn_scalar=16, **COMMON
        )
    if arch == "smollm3":
        return tf.SmolLM3Config(num_hidden_layers=layers, tie_word_embeddings=False, **COMMON)
    if arch == "phi3":
        return tf.Phi3Config(num_hidden_layers=layers, tie_word_embeddings=False, **COMMON)
    if arch == "olmo2":
        # No norm before the blocks, one after each; query/key norms across all heads.
        return tf.Olmo2Config(num_hidden_layers=layers, tie_word_embeddings=False, **COMMON)
    if arch == "glm":
        return tf.GlmConfig(num_hidden_layers=layers, head_dim=16, tie_word_embeddings=False, **COMMON)
    if arch == "glm4":
        # gate_up_proj fused, q/k/v separate (with biases), norms before and after each block.
        return tf.Glm4Config(num_hidden_layers=layers, head_dim=16, tie_word_embeddings=False, **COMMON)
    if arch == "granite":
        # Multipliers unlike the defaults, so that carrying them matters.
        return tf.GraniteConfig(
            num_hidden_layers=layers, tie_word_embeddings=False, embedding_multiplier=12.0,
            residual_multiplier=0.22, attention_multiplier=1 / 32, logits_scaling=8.0, **COMMON
        )
    if arch == "seed_oss":
        # Biases on q, k and v, as the releases have.
        return tf.SeedOssConfig(num_hidden_layers=layers, head_dim=16, tie_word_embeddings=False, **COMMON)
    if arch == "ernie4_5":
        return tf.Ernie4_5Config(num_hidden_layers=layers, head_dim=16, tie_word_embeddings=False, **COMMON)
    if arch == "hunyuan_v1_dense":
        # Per-head query and key norms (`query_layernorm`, `key_layernorm`).
        return tf.HunYuanDenseV1Config(num_hidden_layers=layers, head_dim=16, tie_word_embeddings=False, **COMMON)
    if arch == "exaone4":
        # Norms after each block only, as OLMo 2's; per-head query and key norms.
        return tf.Exaone4Config(num_hidden_layers=layers, head_dim=16, tie_word_embeddings=False, **COMMON)
    raise ValueError(arch)


MODEL_CLASS = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "granite": "GraniteForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "glm": "GlmForCausalLM",
    "seed_oss": "SeedOssForCausalLM",
    "ernie4_5": "Ernie4_5ForCausalLM",
    "hunyuan_v1_dense": "HunYuanDenseV1ForCausalLM",
    "exaone4": "Exaone4ForCausalLM",
}
TARGET_MODULES = {"qwen2": SEPARATE, "llama": SEPARATE, "gemma3": SEPARATE, "phi3": FUSED, "smollm3": SEPARATE,
                  "olmo2": SEPARATE, "granite": SEPARATE, "glm4": FUSED_MLP,
                  "glm": FUSED_MLP, "seed_oss": SEPARATE, "ernie4_5": SEPARATE, "hunyuan_v1_dense": SEPARATE,
                  "exaone4": SEPARATE}
MODEL_TYPE = {"qwen2": "qwen2", "llama": "llama", "gemma3": "gemma3_text", "phi3": "phi3", "smollm3": "smollm3",
              "olmo2": "olmo2", "granite": "granite", "glm4": "glm4", "glm": "glm", "seed_oss": "seed_oss",
              "ernie4_5": "ernie4_5", "hunyuan_v1_dense": "hunyuan_v1_dense", "exaone4": "exaone4"}


def build_model(arch: str, layers: int, seed: int):
    """A randomly initialized tiny model of `arch` (f32, eager attention, eval mode)."""
    import transformers as tf

    config = _config(arch, layers)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(tf, MODEL_CLASS[arch])(config).eval()
    assert model.config.model_type == MODEL_TYPE[arch]
    return model


def save_model(model, out: Path) -> Path:
    with quiet():
        model.save_pretrained(out)
    assert (out / "model.safetensors").is_file(), sorted(p.name for p in out.iterdir())
    return out


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def twin_state_dict(src_sd: dict, dst_sd: dict) -> dict:
    """`dst_sd` with every projection replaced by the same weights from `src_sd`, fused or split as
    the destination stores them, and the embeddings, norms and head copied, so that the two models
    compute the same function (q/k/v biases of the source must be zero)."""
    out = {}
    for key, value in dst_sd.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight", key)
        if m is None:
            out[key] = src_sd[key].clone()
            continue
        layer, block, proj = m.groups()
        base = f"model.layers.{layer}.{block}."
        if proj == "qkv_proj":
            parts = [src_sd[base + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj")]
            out[key] = torch.cat(parts, 0).clone()
        elif proj == "gate_up_proj":
            parts = [src_sd[base + p + ".weight"] for p in ("gate_proj", "up_proj")]
            out[key] = torch.cat(parts, 0).clone()
        elif base + proj + ".weight" in src_sd:
            out[key] = src_sd[base + proj + ".weight"].clone()
        else:  # split a fused source projection
            q, kv = COMMON["num_attention_heads"] * 16, COMMON["num_key_value_heads"] * 16
            ff = COMMON["intermediate_size"]
            rows = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, q + kv),
                    "v_proj": ("qkv_proj", q + kv, q + 2 * kv),
                    "gate_proj": ("gate_up_proj", 0, ff), "up_proj": ("gate_up_proj", ff, 2 * ff)}
            fused, lo, hi = rows[proj]
            out[key] = src_sd[base + fused + ".weight"][lo:hi].clone()
        assert out[key].shape == value.shape, (key, out[key].shape, value.shape)
    return out


# --------------------------------------------------------------------------------------------
# Quiet and strict loading


@contextlib.contextmanager
def quiet():
    """Silences the progress bars and info logs of transformers while loading."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)


def random_peft(model, config, seed: int, std: float):
    """PEFT's LoRA `config` on `model`, made by PEFT itself, with B drawn from N(0, std²) (PEFT
    starts B at zero, which would carry nothing)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecations
        peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                torch.nn.init.normal_(param, std=std)
    return peft_model


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


KEY_PROBLEM = re.compile(r"missing|unexpected|not initiali[sz]ed|mismatch|not used|ignored", re.I)


@contextlib.contextmanager
def no_key_complaints(what: str, allow: tuple = ()):
    """Fails if, inside the block, a warning or a transformers/PEFT log record at WARNING or above
    speaks of missing, unexpected, mismatched or ignored keys (deprecation warnings aside, and the
    messages that match a pattern of `allow` in full)."""
    from transformers.utils import logging as tlog

    handler = _Collect()
    loggers = [tlog.get_logger("transformers"), logging.getLogger("peft")]
    for lg in loggers:
        lg.addHandler(handler)
    level = tlog.get_verbosity()
    tlog.set_verbosity_warning()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        tlog.set_verbosity(level)
        for lg in loggers:
            lg.removeHandler(handler)
    messages = [f"{w.category.__name__}: {w.message}" for w in caught
                if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    messages += handler.messages
    bad = [m for m in messages if KEY_PROBLEM.search(m) and not any(re.fullmatch(a, m) for a in allow)]
    assert not bad, f"complaints while {what}:\n" + "\n".join(bad)


def load_peft_strict(model, adapter_dir: Path, allow: tuple = ()):
    """PeftModel.from_pretrained, failing on any complaint about keys (see no_key_complaints; `allow`
    as there), and unless every adapter tensor landed in the model unchanged and every LoRA
    parameter came from the file (PEFT itself does not warn about unexpected keys)."""
    from peft import PeftModel

    with no_key_complaints(f"PeftModel.from_pretrained(<model>, {adapter_dir})", allow=allow):
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    check_lora_parameters(peft_model, adapter_dir)
    return peft_model


def check_lora_parameters(peft_model, adapter_dir: Path):
    """Every tensor of the file is a LoRA parameter of the loaded model, with the same values, and
    every LoRA parameter of the model comes from the file."""
    params = {n: p for n, p in peft_model.named_parameters() if ".lora_" in n}
    file = read_tensors(adapter_dir / "adapter_model.safetensors")
    expected = {}
    for key, value in file.items():
        assert key.startswith(PEFT_PREFIX) and key.endswith(".weight"), key
        expected[key[: -len(".weight")] + ".default.weight"] = value
    assert sorted(expected) == sorted(params), (
        f"file-only: {sorted(set(expected) - set(params))[:5]}, "
        f"model-only: {sorted(set(params) - set(expected))[:5]}"
    )
    for name, value in expected.items():
        got = params[name].detach().float().numpy()
        assert got.shape == value.shape and np.array_equal(got, value.astype(np.float32)), name


# --------------------------------------------------------------------------------------------
# Files, merges and logits


def read_tensors(path: Path) -> dict:
    """A safetensors file as float numpy arrays: safetensors.numpy for f32/f16, and a direct
    read of the format for bf16 (which numpy lacks): the upper half of an f32."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    dtypes = {v["dtype"] for v in header.values()}
    if "BF16" not in dtypes:
        return {k: v.astype(np.float64 if v.dtype == np.float64 else np.float32)
                for k, v in np_load_file(str(path)).items()}
    assert dtypes == {"BF16"}, dtypes
    out = {}
    for key, info in header.items():
        lo, hi = info["data_offsets"]
        bits = np.frombuffer(raw[8 + n + lo : 8 + n + hi], dtype="<u2").astype(np.uint32) << 16
        out[key] = bits.view(np.float32).reshape(info["shape"]).copy()
    return out


def safetensors_dtypes(path: Path) -> set:
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key k, in order, such that
    re.match(rf"(.*\\.)?({k})$", module) matches."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_updates(adapter_dir: Path) -> dict:
    """{module name: s·B·A in float64}, from adapter_config.json and adapter_model.safetensors."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = read_tensors(adapter_dir / "adapter_model.safetensors")
    updates = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
        a = tensors[key].astype(np.float64)
        b = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"].astype(np.float64)
        r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        assert a.shape[0] == r == b.shape[1], (module, a.shape, b.shape, r)
        scale = alpha / np.sqrt(r) if config.get("use_rslora") else alpha / r
        updates[module] = scale * (b @ a)
    assert len(updates) * 2 == len(tensors), sorted(tensors)[:4]
    return updates


def merged_model(base_dir: Path, adapter_dir: Path):
    """A fresh copy of the model in `base_dir` with W + s·B·A written into every adapted weight,
    the merge computed in numpy from the checkpoint and adapter files."""
    weights = np_load_file(str(base_dir / "model.safetensors"))
    model = load_model(base_dir)
    params = dict(model.named_parameters())
    for module, delta in module_updates(adapter_dir).items():
        w = weights[module + ".weight"]
        assert w.shape == delta.shape, (module, w.shape, delta.shape)
        merged = (w.astype(np.float64) + delta).astype(np.float32)
        with torch.no_grad():
            params[module + ".weight"].copy_(torch.from_numpy(merged))
    return model


INPUT_IDS = torch.randint(3, COMMON["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model) -> np.ndarray:
    return model(input_ids=INPUT_IDS).logits.float().numpy().astype(np.float64)


def assert_mapped_exactly(source: Path, adapter: Path, target: Path, mapped: Path, tau: np.ndarray):
    """The adapter changes the source's logits, and the mapped adapter changes the target's (its
    token ids `tau` of the source's) the same way, to 1e-4."""
    ids = INPUT_IDS
    with torch.no_grad():
        want = load_peft_strict(load_model(source), adapter)(input_ids=ids).logits.double().numpy()
        base = load_model(source)(input_ids=ids).logits.double().numpy()
        got_model = load_peft_strict(load_model(target), mapped)
        got = got_model(input_ids=torch.from_numpy(tau[ids.numpy()])).logits.double().numpy()
    got = got[..., tau]  # back to the source's vocabulary order
    assert max_rel_diff(base, want) > 1e-2
    assert max_rel_diff(got, want) < 1e-4, max_rel_diff(got, want)


def max_rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| over max |want|."""
    return float(np.abs(got - want).max() / np.abs(want).max())


# --------------------------------------------------------------------------------------------
# The command line


def loraxfer(binary: Path, *args) -> subprocess.CompletedProcess:
    cmd = [str(binary), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(
            f"loraxfer failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def two_releases(root: Path, arch: str, layers: int, seed: int):
    """(first, second, lora): two releases of a tiny `arch` model under `root` (the second
    drifted), each with a word-level vocabulary for the map mode to pair tokens through (the same
    in both), and a PEFT LoRA on the first."""
    from peft import LoraConfig

    first, second = build_model(arch, layers, seed), build_model(arch, layers, seed)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.05 * p.std() * torch.randn_like(p))
    a, b = save_model(first, root / "first"), save_model(second, root / "second")
    vocab = {f"w{i}": i for i in range(COMMON["vocab_size"])}
    for d in (a, b):
        (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab,
                                                               "unk_token": "w0"}}))
    lora = random_peft(first, LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES[arch]), 5, 0.02)
    lora.save_pretrained(root / "lora")
    return a, b, root / "lora"


def assert_same_transfers(binary: Path, pairs: dict, lora: Path, out: Path, modules: int):
    """Transfers `lora` in rotate and in map mode between each (source, target) of `pairs`
    ({label: (source, target)}, two labels: bases stored two ways) and checks that both labels
    give the same adapter, bit for bit, of `modules` modules."""
    for mode in ("rotate", "map"):
        got = {}
        for label, (source, target) in pairs.items():
            dst = out / f"{mode}-{label}"
            loraxfer(binary, "transfer", "--source-base", source, "--target-base", target, "--adapter", lora,
                     "--out", dst, "--mode", mode, "--rank", "16")
            got[label] = np_load_file(str(dst / "adapter_model.safetensors"))
            config = json.loads((dst / "adapter_config.json").read_text())
            assert config["base_model_name_or_path"] == str(target)
        first, second = got.values()
        assert first.keys() == second.keys() and len(first) == 2 * modules, sorted(first)
        for k in first:
            assert np.array_equal(first[k], second[k]), f"{mode}: {k}"


def save_variants(base: Path, out: Path, variants: dict) -> dict:
    """Writes each variant of `base` ({dir name: (tensors, quantization_config or None)}: torch
    or numpy tensors) as a model directory under `out` with `base`'s config (plus its
    `quantization_config`) and tokenizer; {dir name: path}."""
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    dirs = {}
    for name, (tensors, quantization) in variants.items():
        d = out / name
        d.mkdir(parents=True)
        c = dict(config, quantization_config=quantization) if quantization else config
        (d / "config.json").write_text(json.dumps(c))
        as_torch = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))).contiguous()
                    for k, v in tensors.items()}
        save_file(as_torch, str(d / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(base / "tokenizer.json", d / "tokenizer.json")
        dirs[name] = d
    return dirs
