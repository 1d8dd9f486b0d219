"""loraxfer: transfer a PEFT LoRA adapter from one base model to another, without training.

    import loraxfer
    report = loraxfer.transfer("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-0.5B", "my-lora", "out")
    print(report["mode"], report["summary"])

`transfer` and `inspect` are the command line's `loraxfer transfer` and `loraxfer inspect`:
the same options (flags with underscores: `--power-iters` is `power_iters`), the same defaults,
the same checks and the same error messages, raised as `LoraxferError` (or one of its
subclasses). Models are directories, `.gguf` files, or hub names (`org/name`,
`org/name@revision`) already in the local Hugging Face cache; adapters are PEFT directories (or
hub names of them). The engine runs with the GIL
released; `progress(stage, done, total)`, if given, is called on the calling thread after each
unit of a stage (stages, in map mode: `residual`, counting the residual map's steps, then `depth`
and `map`, counting layers, the modules of `transfer` running a layer at a time as `map` builds
each; else `transfer` or `inspect`, counting modules), and a callback that raises (or Ctrl-C) stops the job with nothing
written to `out` (a cache directory keeps the decompositions finished before the stop).
`export_gguf` is `loraxfer export-gguf`: a PEFT adapter as a llama.cpp LoRA GGUF for its base;
`export_mlx` is `loraxfer export-mlx`: an adapter as one mlx-lm loads onto the same base.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Callable, Iterable, Optional, Union

from . import _native
from ._errors import (
    InputError,
    InvalidArgumentError,
    LoraxferError,
    OutputExistsError,
)

__all__ = [
    "transfer",
    "inspect",
    "export_gguf",
    "export_mlx",
    "options",
    "LoraxferError",
    "InvalidArgumentError",
    "OutputExistsError",
    "InputError",
]
__version__ = _native.__version__

PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[str, int, int], object]


def transfer(
    source_base: PathLike,
    target_base: PathLike,
    adapter: PathLike,
    out: PathLike,
    mode: str = "auto",
    rank: int = 256,
    *,
    oversample: int = 16,
    power_iters: int = 2,
    seed: int = 0,
    device: str = "auto",
    cache_dir: Optional[PathLike] = None,
    no_cache: bool = False,
    threshold: float = 0.0,
    modules: Optional[Iterable[str]] = None,
    layer_map: Optional[PathLike] = None,
    force: bool = False,
    gguf_adapter: bool = False,
    fused_experts: bool = False,
    drop_router: bool = False,
    map_residual: str = "layers",
    no_norm_fold: bool = False,
    map_gain_floor: float = 0.1,
    map_inner: str = "match",
    map_depth: str = "similarity",
    progress: Optional[ProgressCallback] = None,
) -> dict:
    """Transfers `adapter` (trained on `source_base`) onto `target_base` and writes the new
    adapter and its transfer_report.json to `out` (atomically; an existing `out` only with
    `force=True`). Returns the report as a dict. gguf_adapter=True also writes the adapter as a
    llama.cpp LoRA, `out/adapter_model.gguf`, for the target base. fused_experts=True writes a
    mixture-of-experts target's adapter as PEFT's LoRA on transformers 5's fused expert
    parameters (`target_parameters`) instead of one module per expert (always so for a GPT-OSS
    target, whose experts are fused on disk). drop_router=True leaves out the adapter's updates
    to a mixture of experts' routing gates (the router, a shared expert's gate), which are not
    transferred; without it such an adapter is refused.

    mode: auto, copy, project, align, procrustes, rotate, map or resample (`loraxfer
    transfer --help` says what each does; auto picks rotate for equal shapes, else map,
    else align).
    rank, oversample, power_iters, seed: the randomized truncated SVD.
    device: auto, cpu or cuda. cache_dir: keep and reuse base-model SVDs there (the
    LORAXFER_CACHE_DIR environment variable, as on the command line, when None); no_cache=True
    uses none, whatever the environment says.
    threshold, modules, layer_map, map_*: as the command line's flags of the same names
    (`modules`: any iterable of module types). `--timings` is the command line's only: the
    report's `timings_ms` has the same figures.
    progress: called as progress(stage, done, total) on this thread after each unit: the
    steps of the map stage `residual`, the layers of `depth` (map mode), then the modules of
    `transfer`; in map mode interleaved with the layers of `map`, a layer's modules running
    once its map is built.
    A warning (UserWarning) says when modules came out zero from a non-zero update (the
    report's summary `emptied`), as the command line does.
    """
    values = dict(locals())
    callback = values.pop("progress")
    report = json.loads(_native.transfer(_flags(values), callback))
    emptied = report.get("summary", {}).get("emptied", 0)
    if emptied:
        warnings.warn(
            f"{emptied} transferred modules came out zero from a non-zero source update "
            "(energy_kept near 0 in the report): the target's weights (or the map between the "
            "models) give them no direction to carry it",
            stacklevel=2,
        )
    return report


def inspect(
    source_base: PathLike,
    target_base: PathLike,
    rank: int = 256,
    *,
    oversample: int = 16,
    power_iters: int = 2,
    seed: int = 0,
    device: str = "auto",
    cache_dir: Optional[PathLike] = None,
    no_cache: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> dict:
    """The subspace similarity of every module pair of two models and their layer map (what
    `loraxfer inspect --json` prints), as a dict. Options as `transfer`'s."""
    values = dict(locals())
    callback = values.pop("progress")
    return json.loads(_native.inspect(_flags(values), callback))


def export_gguf(adapter: PathLike, base: PathLike, out: PathLike, *, force: bool = False) -> dict:
    """Writes the PEFT adapter `adapter` (a directory or a cached hub name) as a llama.cpp LoRA
    GGUF for `base` (a directory, a GGUF file or a cached hub name) at `out`, atomically (an
    existing `out` only with `force=True`, and only when it is a LoRA GGUF), as `loraxfer
    export-gguf` does. Returns what was written: path, architecture, modules, lora_alpha."""
    paths = _export_paths(force, adapter=adapter, base=base, out=out)
    return json.loads(_native.export_gguf(*paths, force))


def export_mlx(adapter: PathLike, out: PathLike, *, base: Optional[PathLike] = None,
               force: bool = False) -> dict:
    """Writes the adapter `adapter` (a PEFT or MLX directory, or a cached hub name) at `out` as
    an MLX adapter for the same base, atomically (an existing `out` only with `force=True`, and
    only when it is an earlier output), as `loraxfer export-mlx` does; `base`, the MLX model it
    is for, has every module checked against its weights, says how many experts a stack holds
    and where mlx-lm keeps it, and is needed for a LoRA on fused expert parameters (whose layout
    is its family's). Returns what was written: path, modules, rank, scale, num_layers, keys."""
    paths = _export_paths(force, adapter=adapter, out=out)
    base_path = None if base is None else _export_paths(force, base=base)[0]
    return json.loads(_native.export_mlx(*paths, base_path, force))


def _export_paths(force, **paths: PathLike) -> list:
    """An export's paths, in order, as text with `~` expanded; TypeError for a `force` that is
    not a bool or a path that is not a str or os.PathLike."""
    if not isinstance(force, bool):
        raise TypeError(f"force must be a bool, not {type(force).__name__}")
    out = []
    for name, value in paths.items():
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a str or os.PathLike, not {type(value).__name__}")
        out.append(os.path.expanduser(os.fsdecode(value)))
    return out


def options(command: str) -> list:
    """The options of `transfer` or `inspect` as the command line defines them: name, default
    (as the command line prints it; None for a switch and for an option without a default),
    switch, required, choices and help. `timings` and `json` are the command line's alone."""
    return json.loads(_native.options(command))


# The switches (flags without a value) and the options whose default is "not given" (None), as
# the command line defines them; and the options that name files.
_SPECS = [o for command in ("transfer", "inspect") for o in json.loads(_native.options(command))]
_SWITCHES = {o["name"] for o in _SPECS if o["switch"]}
_OPTIONAL = {o["name"] for o in _SPECS if not o["switch"] and not o["required"] and o["default"] is None}
_PATHS = {"source_base", "target_base", "adapter", "out", "cache_dir", "layer_map"}


def _flags(values: dict) -> list:
    """Keyword arguments as command-line flags: `rank=16` is `--rank=16`, `force=True` is
    `--force`, `modules` (any iterable of names) is comma-joined, paths are str or os.PathLike
    (`~` expanded, as a shell would). None leaves out an option whose default is None and is an
    error elsewhere, as is a bool given for a value (`rank=False` is not a rank)."""
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            if name in _OPTIONAL:
                continue
            raise TypeError(f"{name}=None: give a value, or leave {name} out for its default")
        if name in _SWITCHES:
            if isinstance(value, (str, bytes, os.PathLike)):
                raise TypeError(f"{name} is a switch: give True or False, not {value!r}")
            if value:
                flags.append(flag)
            continue
        if isinstance(value, bool):
            raise TypeError(f"{name}={value}: {name} takes a value, not a bool")
        if name in _PATHS:
            if isinstance(value, bytes):
                value = os.fsdecode(value)
            if not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a str or os.PathLike, not {type(value).__name__}")
            flags.append(f"{flag}={os.path.expanduser(os.fspath(value))}")
        elif name == "modules":
            if isinstance(value, (str, bytes)):
                value = [value] if isinstance(value, str) else [os.fsdecode(value)]
            names = [str(v) for v in value]
            if not isinstance(value, Sequence):
                names.sort()  # a set has no order: the report lists them the same every run
            if not names:
                raise ValueError("modules=[] names no module: leave modules out for all")
            flags.append(f"{flag}={','.join(names)}")
        else:
            flags.append(f"{flag}={value}")
    return flags
