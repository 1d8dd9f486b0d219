"""Fixtures of the PEFT interoperability suite: the loraxfer binary, and a session-wide "zoo" of
tiny models and PEFT adapters built on demand (each once) in a temporary directory."""

import os

# Everything is built locally: never reach for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import interop_util as iu  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

torch.set_num_threads(min(2, os.cpu_count() or 1))

LAYERS, SEEDS = iu.LAYERS, iu.SEEDS


def adapter_variant(arch: str, variant: str) -> dict:
    """LoraConfig arguments of an adapter variant for `arch`."""
    types = iu.TARGET_MODULES[arch]
    kwargs = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=types)
    if variant == "patterns":
        # Rank and alpha per module, PEFT's regex rule, and rsLoRA's alpha / sqrt(r) scale: the
        # first module type (q_proj / qkv_proj) gets rank 4, one exact down_proj rank 12, and the
        # third type (v_proj / gate_up_proj) alpha 32.
        kwargs.update(
            use_rslora=True,
            rank_pattern={types[0]: 4, r"model\.layers\.1\.mlp\.down_proj": 12},
            alpha_pattern={types[2]: 32},
        )
    return kwargs


class Zoo:
    """Models and adapters, each written once per session under `root`."""

    def __init__(self, root: Path, binary: Path):
        self.root = root
        self.binary = binary
        self._cache = {}

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def base(self, arch: str) -> Path:
        def make():
            model = iu.build_model(arch, LAYERS[arch], SEEDS[arch])
            return iu.save_model(model, self.root / f"{arch}-base")

        return self._once(("base", arch), make)

    def derived(self, arch: str) -> Path:
        """The base with every tensor drifted by 5% (a "next release"), written by loraxfer."""

        def make():
            out = self.root / f"{arch}-derived"
            iu.loraxfer(self.binary, "synth", "model", "--derive-from", self.base(arch),
                        "--drift", "0.05", "--seed", "3", "--out", out)
            config = json.loads((out / "config.json").read_text())
            assert config["model_type"] == iu.MODEL_TYPE[arch]
            return out

        return self._once(("derived", arch), make)

    def twin(self, src: str, dst: str) -> Path:
        """A `dst`-architecture model with `src`'s base weights (fused or split): the same function."""

        def make():
            source = iu.load_model(self.base(src))
            for name, value in source.state_dict().items():
                assert not name.endswith(".bias") or not value.any(), f"{name} is not zero"
            model = iu.build_model(dst, LAYERS[src], seed=0)
            state = iu.twin_state_dict(source.state_dict(), model.state_dict())
            model.load_state_dict(state, strict=True)
            return iu.save_model(model, self.root / f"{dst}-twin-of-{src}")

        return self._once(("twin", src, dst), make)

    def adapter(self, arch: str, variant: str = "plain") -> Path:
        """A LoRA adapter on base(arch), created and saved by PEFT, with non-zero random B."""

        def make():
            from peft import LoraConfig

            config = LoraConfig(**adapter_variant(arch, variant))
            peft_model = iu.random_peft(iu.load_model(self.base(arch)), config, SEEDS[arch] + 100, 0.02)
            if variant == "bf16":
                peft_model = peft_model.to(torch.bfloat16)
            out = self.root / f"{arch}-{variant}-lora"
            peft_model.save_pretrained(str(out))
            return out

        return self._once(("adapter", arch, variant), make)

    def transfer(self, adapter: Path, source: Path, target: Path, *extra) -> Path:
        """`loraxfer transfer` (once per distinct command line); the output directory."""
        args = ("--source-base", source, "--target-base", target, "--adapter", adapter, *extra)

        def make():
            out = self.root / "out" / f"{len(self._cache):03d}-{target.name}"
            iu.loraxfer(self.binary, "transfer", *args, "--out", out)
            return out

        return self._once(("transfer", *map(str, args)), make)


@pytest.fixture(scope="session")
def binary() -> Path:
    value = os.environ.get("LORAXFER_BIN", "target/debug/loraxfer")
    path = Path(value)
    if not path.is_absolute():
        path = ROOT / path
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.exit(f"LORAXFER_BIN={value}: no executable at {path} (cargo build first)", returncode=2)
    return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, binary) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("interop"), binary)

