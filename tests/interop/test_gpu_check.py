"""scripts/gpu-check.sh, the one script run on a GPU machine, rehearsed here: `--rehearse` runs
its quick path with every device step on the kernel emulator and PyTorch on the CPU, so the
script's steps, its adapter comparisons (the pass/fail ones and the one against the PyTorch
baseline) and what it leaves in $OUT are exercised before any GPU time is spent on them."""

import os
import subprocess
import sys
import tarfile

from conftest import ROOT


def test_the_gpu_check_rehearses_on_the_emulator(binary, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), WORK=str(work), LORAXFER_BIN=str(binary),
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu-check.sh"), "--rehearse"], env=env,
                          capture_output=True, text=True, timeout=300)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split("  ")[0].strip(): line for line in summary.splitlines()}
    # Every step ran and passed; both GPU adapters (tensor cores on and off) agree with the CPU's.
    for step in ["selftest (ok", "synthetic models (ok", "transfer k16-cpu (ok)",
                 "transfer k16-cuda (ok)", "transfer k16-cuda-no-tc (ok)",
                 "torch baseline k16, cpu (ok)"]:
        assert any(k.startswith(step) for k in lines), (step, summary)
    assert "0 mismatched" in next(v for k, v in lines.items() if k.startswith("selftest"))
    for pair in ["transfer-k16-cpu vs transfer-k16-cuda:", "transfer-k16-cpu vs transfer-k16-cuda-no-tc:"]:
        line = next(v for k, v in lines.items() if k.startswith(pair))
        assert "PASS" in line and "same keys True" in line, line
    # The baseline comparison ran to its figures (it once died on the baseline's report).
    line = next(v for k, v in lines.items() if k.startswith("transfer-k16-cuda vs torch-k16"))
    assert "worst relative difference" in line and "same keys True" in line, line
    # At most 8 files come back from a GPU machine (the script leaves 6); the logs hold every report.
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "logs.tar.gz" in files, files
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/report-transfer-k16-cuda.json" in names and "logs/report-torch-k16.json" in names
