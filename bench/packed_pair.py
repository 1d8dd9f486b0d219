"""A packed copy of a checkpoint and the f32 checkpoint of the values it holds, for timing
transfers from quantized bases against transfers from their values.

    packed_pair.py SRC OUT [LAYOUT] [GROUP]
        OUT/packed: SRC with every projection packed in LAYOUT (gptq, the default; gptq_v2, awq,
        ct4, ct8: the layouts of tests/interop/test_packed.py, whose packers this uses) in
        groups of GROUP inputs (default 128); OUT/values: the f32 values they hold.

docs/PERFORMANCE.md ("Packed bases") gives the commands and the figures.
"""
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
        if name.endswith("_proj.weight"):
            parts, v = tp.packed_tensors(layout, name.removesuffix(".weight"), w.float().numpy(), k)
            stored.update(parts)
            values[name] = v
        else:
            stored[name] = values[name] = w
    if not (src / "tokenizer.json").exists():
        (src / "tokenizer.json").write_text("{}")
    iu.save_variants(src, out, {"packed": (stored, tp.quantization_config(layout)), "values": (values, None)})


if __name__ == "__main__":
    main()
