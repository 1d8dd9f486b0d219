"""MLX checkpoints, as mlx-lm writes them (`mlx_lm.convert -q`, the mlx-community releases): a
tiny Qwen2 loaded by mlx-lm, cast to bf16, quantized by mlx-lm's own `quantize_model` in each of
MLX's modes (affine at 3, 4 and 6 bits, mxfp4, nvfp4, mxfp8; a mixed recipe with 8-bit value
projections) and saved by its `save_model` and `save_config`. loraxfer reads each weight as MLX
dequantizes it in f32, bit for bit, so a transfer between such bases is the transfer between
their dequantizations."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import interop_util as iu

# {kind: (mode, group size, bits)}
KINDS = {"affine4": ("affine", 64, 4), "affine3": ("affine", 32, 3), "affine6": ("affine", 32, 6),
         "mxfp4": ("mxfp4", 32, 4), "nvfp4": ("nvfp4", 16, 4), "mxfp8": ("mxfp8", 32, 8)}


def mlx_checkpoint(hf_dir, out, kind: str, mixed: bool = False) -> dict:
    """{"mlx": `hf_dir` converted by mlx-lm in `kind` (`mixed`: value projections in 8 bits, as
    mlx-lm's mixed recipes write a module's own entry), "values": an f32 checkpoint of what MLX
    dequantizes each quantized weight to, the other tensors as mlx-lm saved them}."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    mode, group, bits = KINDS[kind]
    model, config = load_model(hf_dir)
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))

    def predicate(path, module):
        return {"group_size": 32, "bits": 8} if mixed and path.endswith("v_proj") else True

    model, config = quantize_model(model, config, group, bits, mode=mode, quant_predicate=predicate)
    d = out / f"{kind}-mlx"
    save_model(d, model)
    save_config(config, d / "config.json")
    (d / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())

    values = {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
    quantized = 0
    for path, m in model.named_modules():
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        # In f32: the affine scales and biases cast first, so that MLX computes in f32 too.
        biases = m.get("biases")
        scales = m.scales.astype(mx.float32) if biases is not None else m.scales
        if biases is not None:
            biases = biases.astype(mx.float32)
        w = mx.dequantize(m.weight, scales, biases, group_size=m.group_size, bits=m.bits, mode=m.mode,
                          dtype=mx.float32)
        values[f"{path}.weight"] = torch.from_numpy(np.array(w))
        for part in ("scales", "biases"):
            values.pop(f"{path}.{part}", None)
        quantized += 1
    assert quantized >= 2 * 6 + 1, quantized  # every projection the group size divides, and the embeddings
    dirs = iu.save_variants(hf_dir, out, {f"{kind}-values": (values, None)})
    return {"mlx": d, "values": dirs[f"{kind}-values"]}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two releases of a tiny Qwen2 (the second drifted) and a PEFT LoRA on the first."""
    root = tmp_path_factory.mktemp("mlx")
    return (root, *iu.two_releases(root, "qwen2", 2, 73))


@pytest.mark.parametrize("kind,mixed", [(k, False) for k in KINDS] + [("affine4", True)])
def test_mlx_weights_read_as_mlx_dequantizes_them(binary, pair, tmp_path, kind, mixed):
    _, first, _, _ = pair
    dirs = mlx_checkpoint(first, tmp_path, kind, mixed)
    config = json.loads((dirs["mlx"] / "config.json").read_text())
    assert config["quantization"]["mode"] == KINDS[kind][0]
    if mixed:
        assert config["quantization"]["model.layers.1.self_attn.v_proj"]["bits"] == 8
    read = tmp_path / "read"
    iu.loraxfer(binary, "synth", "model", "--derive-from", dirs["mlx"], "--drift", "0", "--out", read)
    got = load_file(str(read / "model.safetensors"))
    want = load_file(str(dirs["values"] / "model.safetensors"))
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k in want:
        assert torch.equal(got[k].float(), want[k].float()), k
    written = json.loads((read / "config.json").read_text())
    assert "quantization" not in written and "quantization_config" not in written


@pytest.mark.parametrize("kind", ["affine4", "mxfp4"])
def test_a_transfer_between_mlx_bases_is_the_transfer_between_their_dequantizations(binary, pair, tmp_path,
                                                                                    kind):
    _, first, second, lora = pair
    source = mlx_checkpoint(first, tmp_path / "first", kind)
    target = mlx_checkpoint(second, tmp_path / "second", kind)
    iu.assert_same_transfers(binary, {label: (source[label], target[label]) for label in ("mlx", "values")},
                             lora, tmp_path, 2 * 7)


# MLX adapters: mlx-lm's own LoRA layers read, and written for mlx-lm to load.

def mlx_updates(model_dir, adapter_dir) -> dict:
    """{module: ΔW in float64} of every LoRA layer mlx-lm puts on the model in `model_dir` when
    it loads the adapter in `adapter_dir` (`load_adapters`, which refuses a name or shape it does
    not expect): `scale · lora_bᵀ · lora_aᵀ`, as its `LoRALinear.fuse` adds it; the layers the
    file leaves at zero (their lora_b as made) left out."""
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    load_adapters(model, str(adapter_dir))
    updates = {}
    for name, m in model.named_modules():
        if not isinstance(m, (LoRALinear, LoRASwitchLinear)):
            continue
        a, b = (np.array(p.astype(mx.float32)).astype(np.float64) for p in (m.lora_a, m.lora_b))
        if isinstance(m, LoRALinear):
            if np.any(b):
                updates[name] = m.scale * (b.T @ a.T)
        else:
            # Expert e adds scale · lora_b[e] · lora_a[e], as its `fuse` does.
            for e in range(a.shape[0]):
                if np.any(b[e]):
                    updates[hf_expert(name, e)] = m.scale * (b[e] @ a[e])
    return updates


def hf_expert(stack: str, e: int) -> str:
    """The Hugging Face module of expert `e` of mlx-lm's stack `<parent>.switch_mlp.<proj>`
    (Mixtral's `w1`, `w3`, `w2`), or GPT-OSS's `<parent>.experts.<proj>`."""
    if ".switch_mlp." not in stack:
        parent, proj = stack.rsplit(".experts.", 1)
        return f"{parent}.experts.{e}.{proj}"
    parent, proj = stack.split(".switch_mlp.")
    if parent.endswith("block_sparse_moe"):
        proj = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
    return f"{parent}.experts.{e}.{proj}"


def mlx_lora(model_dir, out, rank: int, scale: float, seed: int):
    """An adapter made by mlx-lm itself on the model in `model_dir`: its LoRA layers on every
    projection of every layer (`linear_to_lora_layers`), lora_b drawn at random (mlx-lm starts it
    at zero), saved as its trainer saves the trainable parameters, with the config its
    `mlx_lm.lora` writes."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    linear_to_lora_layers(model, len(model.layers), params)
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.02 * mx.random.normal(m.lora_b.shape)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps({
        "model": str(model_dir), "fine_tune_type": "lora", "num_layers": len(model.layers),
        "lora_parameters": params, "batch_size": 4, "iters": 100, "learning_rate": 1e-5}))
    return out


def as_peft(mlx_dir, out, leave_out=()):
    """The PEFT adapter of an MLX adapter's update, written in numpy: A = lora_aᵀ, B = lora_bᵀ,
    lora_alpha = scale · rank; a stack of experts' (LoRASwitchLinear) expert e's A = lora_a[e]
    and B = lora_b[e], under its Hugging Face name. Modules ending in `leave_out` are left out."""
    from safetensors.numpy import load_file as np_load, save_file

    config = json.loads((mlx_dir / "adapter_config.json").read_text())["lora_parameters"]
    tensors = {}
    for key, v in np_load(str(mlx_dir / "adapters.safetensors")).items():
        module, part = key.rsplit(".", 1)
        name = {"lora_a": "lora_A", "lora_b": "lora_B"}[part]
        if module.endswith(tuple(leave_out)):
            continue
        if v.ndim == 3:
            for e in range(v.shape[0]):
                tensors[f"{iu.PEFT_PREFIX}{hf_expert(module, e)}.{name}.weight"] = np.ascontiguousarray(v[e])
            continue
        tensors[f"{iu.PEFT_PREFIX}{module}.{name}.weight"] = np.ascontiguousarray(v.T)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": config["rank"], "lora_alpha": config["scale"] * config["rank"],
        "target_modules": iu.SEPARATE}))
    return out


def assert_updates_close(got: dict, want: dict):
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert iu.max_rel_diff(got[k], want[k]) < 1e-6, k


def test_mlx_lm_loads_an_exported_adapter_with_the_peft_adapters_update(binary, pair, tmp_path):
    """Per-module ranks and alphas (PEFT's rank_pattern and alpha_pattern) become mlx-lm's one
    rank and scale: smaller ranks padded with zeros, other scales folded into lora_b."""
    from peft import LoraConfig

    _, first, _, lora = pair
    model = iu.load_model(first)
    patterned = tmp_path / "patterned"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=iu.SEPARATE, rank_pattern={"q_proj": 2},
                        alpha_pattern={"down_proj": 3})
    iu.random_peft(model, config, 9, 0.02).save_pretrained(patterned)
    for adapter in (lora, patterned):
        out = tmp_path / f"mlx-{adapter.name}"
        iu.loraxfer(binary, "export-mlx", "--adapter", adapter, "--out", out)
        written = json.loads((out / "adapter_config.json").read_text())
        assert written["lora_parameters"]["rank"] == 4 and written["lora_parameters"]["scale"] == 2.0
        assert written["num_layers"] == -1 and written["fine_tune_type"] == "lora"
        assert_updates_close(mlx_updates(first, out), iu.module_updates(adapter))
    # One layer of two: -1 (all layers) without the base, counted from layer 1 with it; a base
    # without a module's weight is refused, naming it.
    one_layer = tmp_path / "one-layer"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=iu.SEPARATE, layers_to_transform=[1])
    iu.random_peft(iu.load_model(first), config, 10, 0.02).save_pretrained(one_layer)
    for base, num_layers in ((None, -1), (first, 1)):
        out = tmp_path / f"one-layer-{num_layers}"
        iu.loraxfer(binary, "export-mlx", "--adapter", one_layer, "--out", out,
                    *(["--base", base] if base else []))
        assert json.loads((out / "adapter_config.json").read_text())["num_layers"] == num_layers
        assert_updates_close(mlx_updates(first, out), iu.module_updates(one_layer))
    tensors = {k: v for k, v in load_file(str(first / "model.safetensors")).items()
               if k != "model.layers.1.self_attn.q_proj.weight"}
    cut = iu.save_variants(first, tmp_path, {"cut": (tensors, None)})["cut"]
    proc = subprocess_run(binary, "export-mlx", "--adapter", one_layer, "--base", cut, "--out", tmp_path / "x")
    assert proc.returncode != 0 and "no `model.layers.1.self_attn.q_proj.weight`" in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()
    # A base that keeps its language model under `language_model`, as mlx-lm's multimodal ports
    # do: the modules are found there and written under that name.
    renamed = {k.replace("model.layers.", "language_model.model.layers.", 1): v
               for k, v in load_file(str(first / "model.safetensors")).items()}
    multimodal = iu.save_variants(first, tmp_path, {"multimodal": (renamed, None)})["multimodal"]
    out = tmp_path / "mlx-multimodal"
    iu.loraxfer(binary, "export-mlx", "--adapter", lora, "--base", multimodal, "--out", out)
    keys = list(load_file(str(out / "adapters.safetensors")))
    assert keys and all(k.startswith("language_model.model.layers.") for k in keys), keys[:3]
    assert json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["keys"] == sorted(
        {k.split(".", 4)[-1].rsplit(".", 1)[0] for k in keys})
    # An earlier output is replaced only with --force.
    proc = subprocess_run(binary, "export-mlx", "--adapter", lora, "--out", tmp_path / "mlx-lora")
    assert proc.returncode != 0 and "exists" in proc.stderr, proc.stderr
    iu.loraxfer(binary, "export-mlx", "--adapter", lora, "--out", tmp_path / "mlx-lora", "--force")


def subprocess_run(binary, *args):
    import subprocess

    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=600)


def test_an_mlx_adapter_transfers_as_the_peft_adapter_of_its_update(binary, pair, tmp_path):
    """An adapter mlx-lm made transfers as its PEFT form does, bit for bit, in rotate and in map
    mode; exported back to MLX it is the file mlx-lm saved."""
    from safetensors.numpy import load_file as np_load

    _, first, second, _ = pair
    made = mlx_lora(first, tmp_path / "made", rank=4, scale=10.0, seed=3)
    peft = as_peft(made, tmp_path / "peft")
    assert_updates_close(iu.module_updates(peft), mlx_updates(first, made))
    for mode in ("rotate", "map"):
        outs = {}
        for label, adapter in (("mlx", made), ("peft", peft)):
            outs[label] = tmp_path / f"{mode}-{label}"
            iu.loraxfer(binary, "transfer", "--source-base", first, "--target-base", second, "--adapter", adapter,
                        "--out", outs[label], "--mode", mode, "--rank", "16")
        got, want = (np_load(str(outs[k] / "adapter_model.safetensors")) for k in ("mlx", "peft"))
        assert got.keys() == want.keys() and len(got) == 2 * 2 * 7
        for k in want:
            assert np.array_equal(got[k], want[k]), f"{mode}: {k}"
        assert iu.module_updates(outs["mlx"]).keys() == iu.module_updates(outs["peft"]).keys()
    back = tmp_path / "back"
    iu.loraxfer(binary, "export-mlx", "--adapter", made, "--out", back)
    got, want = (np_load(str(d / "adapters.safetensors")) for d in (back, made))
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_an_mlx_lora_moves_between_mlx_quantized_releases_and_mlx_lm_loads_the_result(binary, pair, tmp_path):
    """The whole MLX path: a LoRA mlx-lm made on a 4-bit MLX release, transferred onto the next
    4-bit release and exported; mlx-lm loads it onto that release with the transferred update."""
    _, first, second, _ = pair
    source = mlx_checkpoint(first, tmp_path / "first", "affine4")["mlx"]
    target = mlx_checkpoint(second, tmp_path / "second", "affine4")["mlx"]
    made = mlx_lora(source, tmp_path / "made", rank=4, scale=20.0, seed=4)
    out = tmp_path / "out"
    iu.loraxfer(binary, "transfer", "--source-base", source, "--target-base", target, "--adapter", made,
                "--out", out, "--mode", "rotate", "--rank", "16")
    exported = tmp_path / "exported"
    iu.loraxfer(binary, "export-mlx", "--adapter", out, "--base", target, "--out", exported)
    assert json.loads((exported / "adapter_config.json").read_text())["num_layers"] == 2
    assert_updates_close(mlx_updates(target, exported), iu.module_updates(out))


def test_what_mlx_adapters_hold_that_is_not_transferred_is_refused_naming_it(binary, pair, tmp_path):
    from safetensors.numpy import load_file as np_load, save_file

    _, first, second, _ = pair
    made = mlx_lora(first, tmp_path / "made", rank=4, scale=10.0, seed=5)
    tensors = np_load(str(made / "adapters.safetensors"))
    config = json.loads((made / "adapter_config.json").read_text())
    cases = {
        "dora": ({**config, "fine_tune_type": "dora"}, tensors, "DoRA"),
        "full": ({**config, "fine_tune_type": "full"}, tensors, "fine_tune_type \"full\""),
        "magnitude": (config, {**tensors, "model.layers.0.self_attn.q_proj.m": np.ones(64, np.float32)},
                      "DoRA magnitude vector"),
        "embedding": (config, {**tensors, "model.embed_tokens.lora_a": np.ones((256, 4), np.float32),
                               "model.embed_tokens.lora_b": np.ones((4, 64), np.float32)}, "embeddings"),
        "rank": ({**config, "lora_parameters": {**config["lora_parameters"], "rank": 8}}, tensors,
                 "lora_parameters.rank 8"),
        # Stacked experts' LoRA: one expert count, under a `switch_mlp`.
        "stack": (config, {**tensors, "model.layers.0.mlp.switch_mlp.gate_proj.lora_a": np.ones((2, 4, 64), np.float32),
                           "model.layers.0.mlp.switch_mlp.gate_proj.lora_b": np.ones((3, 32, 4), np.float32)},
                  "the expert counts must agree"),
        "stack-elsewhere": (config, {**tensors, "model.layers.0.mlp.experts.lora_a": np.ones((2, 4, 64), np.float32),
                                     "model.layers.0.mlp.experts.lora_b": np.ones((2, 32, 4), np.float32)},
                            "is a stack of experts' LoRA, but not on"),
        # Trained on another model: named as the MLX file has it.
        "shape": (config, {**tensors, "model.layers.0.self_attn.q_proj.lora_b": np.ones((4, 32), np.float32)},
                  "adapters.safetensors: tensor `model.layers.0.self_attn.q_proj.lora_b`"),
    }
    for name, (cfg, ts, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(ts, str(d / "adapters.safetensors"))
        proc = subprocess_run(binary, "transfer", "--source-base", first, "--target-base", second, "--adapter", d,
                              "--out", tmp_path / f"out-{name}")
        assert proc.returncode != 0 and message in proc.stderr, (name, proc.stderr)
        assert not (tmp_path / f"out-{name}").exists()


# Mixtures of experts: mlx-lm stacks a layer's experts (`switch_mlp`), quantized or not.

def mlx_moe_checkpoint(hf_dir, out, kind, stacks: int = 3 * 2):
    """{"mlx": the MoE checkpoint in `hf_dir` converted by mlx-lm (its experts stacked by its
    `sanitize`, `stacks` of them; `kind` None: left in bf16, unquantized), "values": the f32
    checkpoint of what MLX dequantizes (or holds), under the Hugging Face per-expert names, and
    latent attention's `kv_b_proj` rebuilt from the halves mlx-lm splits it into}."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    # transformers 5 writes `num_local_experts` and `rope_parameters` where mlx-lm's ports read
    # the released configs' `num_experts` and `rope_theta`.
    hf = json.loads((hf_dir / "config.json").read_text())
    released = {"num_experts": hf["num_local_experts"], "rope_theta": hf["rope_parameters"]["rope_theta"]} \
        if "num_local_experts" in hf else {}
    model, config = load_model(hf_dir, model_config=released)
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))
    if kind is not None:
        mode, group, bits = KINDS[kind]
        model, config = quantize_model(model, config, group, bits, mode=mode)
    d = out / f"moe-{kind}-mlx"
    save_model(d, model)
    save_config(config, d / "config.json")
    stored = load_file(str(d / "model.safetensors"))
    assert any(".switch_mlp." in k for k in stored), sorted(stored)[:8]
    values = {k: v.float() for k, v in stored.items()}
    found = 0
    halves = {}
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear, QuantizedMultiLinear)):
            biases = m.get("biases")
            scales = m.scales.astype(mx.float32) if biases is not None else m.scales
            w = mx.dequantize(m.weight, scales, None if biases is None else biases.astype(mx.float32),
                              group_size=m.group_size, bits=m.bits, mode=m.mode, dtype=mx.float32)
            for part in ("scales", "biases"):
                values.pop(f"{path}.{part}", None)
        elif isinstance(m, (SwitchLinear, MultiLinear)):
            w = m.weight.astype(mx.float32)
        else:
            continue
        w = np.array(w)
        if path.endswith((".embed_q", ".unembed_out")):
            # Latent attention's kv_b_proj, split per head: rebuilt below.
            del values[f"{path}.weight"]
            halves[path] = w
            continue
        if ".switch_mlp." not in path:
            values[f"{path}.weight"] = torch.from_numpy(w)
            continue
        parent, proj = path.split(".switch_mlp.")
        if parent.endswith("block_sparse_moe"):
            proj = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
        del values[f"{path}.weight"]
        for e in range(w.shape[0]):
            values[f"{parent}.experts.{e}.{proj}.weight"] = torch.from_numpy(np.ascontiguousarray(w[e]))
        found += 1
    assert found == stacks, found
    for path, keys in halves.items():
        if path.endswith(".embed_q"):
            # Each head's key rows ([rank, nope] transposed), then its value rows [v, rank].
            attention = path.removesuffix(".embed_q")
            heads = np.concatenate([keys.transpose(0, 2, 1), halves[f"{attention}.unembed_out"]], axis=1)
            values[f"{attention}.kv_b_proj.weight"] = torch.from_numpy(heads.reshape(-1, heads.shape[-1]).copy())
    dirs = iu.save_variants(hf_dir, out, {f"moe-{kind}-values": (values, None)})
    return {"mlx": d, "values": dirs[f"moe-{kind}-values"]}


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
    """{family: (first, second, lora)}: two releases of a tiny MoE model and a PEFT LoRA on the
    first with every attention module and every expert's projections adapted."""
    import test_experts as te

    root = tmp_path_factory.mktemp("mlx-moe")
    made = {}
    for family in ("qwen3_moe", "mixtral"):
        first, second = te.build(family, 31), te.build(family, 31)
        with torch.no_grad():
            for p in second.parameters():
                p.add_(0.05 * p.std() * torch.randn_like(p))
        a, b = iu.save_model(first, root / f"{family}-first"), iu.save_model(second, root / f"{family}-second")
        for d in (a, b):
            (d / "tokenizer.json").write_text("{}")
        made[family] = (a, b, te.write_adapter(family, a, root / f"{family}-lora"))
    return made


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("kind", ["affine4", "mxfp4", None])
def test_mlx_stacked_experts_read_one_weight_an_expert(binary, moe_pair, tmp_path, family, kind):
    first, _, _ = moe_pair[family]
    dirs = mlx_moe_checkpoint(first, tmp_path, kind)
    read = tmp_path / "read"
    iu.loraxfer(binary, "synth", "model", "--derive-from", dirs["mlx"], "--drift", "0", "--out", read)
    got = load_file(str(read / "model.safetensors"))
    want = load_file(str(dirs["values"] / "model.safetensors"))
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k in want:
        assert torch.equal(got[k].float(), want[k].float()), k
    if kind is None:
        # Left in bf16, each expert is the Hugging Face checkpoint's, rounded: named by the
        # original, not by the mapping the reference above shares with the reader.
        original = load_file(str(first / "model.safetensors"))
        experts = [k for k in original if ".experts." in k]
        assert len(experts) == 2 * 4 * 3
        for k in experts:
            assert torch.equal(got[k].float(), original[k].to(torch.bfloat16).float()), k


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_an_expert_lora_moves_between_mlx_moe_releases_as_between_their_values(binary, moe_pair, tmp_path,
                                                                              family):
    first, second, lora = moe_pair[family]
    source = mlx_moe_checkpoint(first, tmp_path / "first", "affine4")
    target = mlx_moe_checkpoint(second, tmp_path / "second", "affine4")
    got = rotated_alike(binary, {"first": source, "second": target}, lora, tmp_path)
    assert any(".experts.3." in k for k in got)


def rotated_alike(binary, pair: dict, lora, out, mode: str = "rotate") -> dict:
    """Transfers `lora` in `mode` from pair["first"] to pair["second"] stored two ways (each
    {"mlx": …, "values": …}) and checks that both give the same adapter, bit for bit; returns
    its tensors."""
    from safetensors.numpy import load_file as np_load

    got = {}
    for label in ("mlx", "values"):
        dst = out / f"{mode}-{label}"
        iu.loraxfer(binary, "transfer", "--source-base", pair["first"][label], "--target-base",
                    pair["second"][label], "--adapter", lora, "--out", dst, "--mode", mode, "--rank", "16")
        got[label] = np_load(str(dst / "adapter_model.safetensors"))
    assert got["mlx"].keys() == got["values"].keys()
    for k in got["values"]:
        assert np.array_equal(got["mlx"][k], got["values"][k]), f"{mode}: {k}"
    return got["mlx"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_an_mlx_lm_moe_lora_moves_between_mlx_moe_releases(binary, moe_pair, tmp_path, family):
    """mlx-lm's own LoRA on an MLX mixture of experts adapts attention, the stacked experts
    (LoRASwitchLinear, read one module per expert) and the router. The router's update is refused
    by name; with --drop-router the rest transfers as its PEFT form does, bit for bit, and
    export-mlx writes it back as stacks that mlx-lm loads onto the target with the transferred
    update."""
    from safetensors.numpy import load_file as np_load

    first, second, _ = moe_pair[family]
    source = mlx_moe_checkpoint(first, tmp_path / "first", "affine4")["mlx"]
    target = mlx_moe_checkpoint(second, tmp_path / "second", "affine4")["mlx"]
    made = mlx_lora(source, tmp_path / "made", rank=4, scale=10.0, seed=6)
    router = "block_sparse_moe.gate" if family == "mixtral" else "mlp.gate"
    stored = np_load(str(made / "adapters.safetensors"))
    assert f"model.layers.1.{router}.lora_a" in stored
    assert stored[f"model.layers.1.{router.split('.')[0]}.switch_mlp.down_proj.lora_b"].shape == (4, 64, 4)
    proc = subprocess_run(binary, "transfer", "--source-base", source, "--target-base", target, "--adapter", made,
                          "--out", tmp_path / "refused", "--mode", "rotate")
    assert proc.returncode != 0 and f"`model.layers.0.{router}` (and 1 more) adapts a routing gate" in proc.stderr, \
        proc.stderr
    assert not (tmp_path / "refused").exists()
    peft = as_peft(made, tmp_path / "peft", leave_out=[router])
    updates = mlx_updates(source, made)
    assert sum(".experts." in k for k in updates) == 2 * 4 * 3
    assert_updates_close(iu.module_updates(peft), {k: v for k, v in updates.items() if not k.endswith(router)})
    outs = {}
    for label, adapter in (("mlx", made), ("peft", peft)):
        outs[label] = tmp_path / f"out-{label}"
        iu.loraxfer(binary, "transfer", "--source-base", source, "--target-base", target, "--adapter", adapter,
                    "--out", outs[label], "--mode", "rotate", "--rank", "16", "--drop-router")
    got, want = (np_load(str(outs[k] / "adapter_model.safetensors")) for k in ("mlx", "peft"))
    assert got.keys() == want.keys() and any(".experts.3." in k for k in got)
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    report = json.loads((outs["mlx"] / "transfer_report.json").read_text())
    assert report["dropped_router_modules"] == [f"model.layers.{l}.{router}" for l in range(2)]
    exported = tmp_path / "exported"
    iu.loraxfer(binary, "export-mlx", "--adapter", outs["mlx"], "--base", target, "--out", exported)
    written = np_load(str(exported / "adapters.safetensors"))
    assert written[f"model.layers.0.{router.split('.')[0]}.switch_mlp.gate_proj.lora_a"].shape == (4, 4, 64)
    assert_updates_close(mlx_updates(target, exported), iu.module_updates(outs["mlx"]))
