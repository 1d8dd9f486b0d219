"""A packed copy of a checkpoint and the f32 checkpoint of the values it holds, for timing
transfers from quantized bases against transfers from their values.

    packed_pair.py SRC OUT [LAYOUT] [GROUP]
        OUT/packed: SRC with every projection packed in LAYOUT (gptq, the default; gptq_v2, awq,
        ct4, ct8: the layouts of tests/interop/test_packed.py, whose packers this uses; mlx:
        MLX's affine 4 bits, quantized by MLX itself) in groups of GROUP inputs (default 128);
        OUT/values: the f32 values they hold.

docs/PERFORMANCE.md ("Packed bases") gives the commands and the figures.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "interop"))

import interop_util as iu  # noqa: E402
import test_packed as tp  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    layout = sys.argv[3] if len(sys.argv) > 3 else "gptq"
    tp.GROUP = int(sys.argv[4]) if len(sys.argv) > 4 else 128
    stored, values = {}, {}
    for k, (name, w) in enumerate(sorted(load_file(str(src / "model.safetensors")).items())):
        if name.endswith("_proj.weight") and layout == "mlx":
            parts, v = mlx_tensors(name.removesuffix(".weight"), w, tp.GROUP)
            stored.update(parts)
            values[name] = v
        elif name.endswith("_proj.weight"):
            parts, v = tp.packed_tensors(layout, name.removesuffix(".weight"), w.float().numpy(), k)
            stored.update(parts)
            values[name] = v
        else:
            stored[name] = values[name] = w
    if not (src / "tokenizer.json").exists():
        (src / "tokenizer.json").write_text("{}")
    quantization = None if layout == "mlx" else tp.quantization_config(layout)
    dirs = iu.save_variants(src, out, {"packed": (stored, quantization), "values": (values, None)})
    if layout == "mlx":
        config = json.loads((dirs["packed"] / "config.json").read_text())
        config["quantization"] = {"group_size": tp.GROUP, "bits": 4, "mode": "affine"}
        (dirs["packed"] / "config.json").write_text(json.dumps(config))


def mlx_tensors(module: str, w, group: int):
    """MLX's affine 4-bit codes, scales and biases of `w` (quantized by MLX in the weight's own
    type), and the f32 values MLX dequantizes them to."""
    import mlx.core as mx
    import numpy as np
    import torch

    x = mx.array(w.float().numpy()).astype(mx.bfloat16 if w.dtype == torch.bfloat16 else mx.float32)
    q, scales, biases = mx.quantize(x, group_size=group, bits=4)
    values = mx.dequantize(q, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group, bits=4)
    as_torch = lambda a: torch.from_numpy(np.array(a.astype(mx.float32))).to(w.dtype)  # noqa: E731
    parts = {f"{module}.weight": torch.from_numpy(np.array(q, dtype=np.uint32)),
             f"{module}.scales": as_torch(scales), f"{module}.biases": as_torch(biases)}
    return parts, torch.from_numpy(np.array(values))


if __name__ == "__main__":
    main()
