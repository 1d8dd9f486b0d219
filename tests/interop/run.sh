#!/usr/bin/env bash
# PEFT interoperability tests: loraxfer's adapters against transformers + PEFT on tiny random
# models (CPU only, no hub). Creates or reuses .venv/ (git-ignored) at the repository root,
# installs tests/interop/requirements.txt there unless the stamp says it already is, builds and
# installs the Python module (`pip install .`: maturin, into target/ like every other build;
# cargo rebuilds only what changed), then runs pytest on tests/interop. Extra arguments go to
# pytest (e.g. -k phi3, -x).
#
#   LORAXFER_BIN   the loraxfer binary (default target/debug/loraxfer; relative to the repo root)
#   PYTHON         the interpreter that creates the venv (default python3)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

bin="${LORAXFER_BIN:-target/debug/loraxfer}"
[[ $bin == /* ]] || bin="$root/$bin"
if [[ ! -f $bin || ! -x $bin ]]; then
  echo "tests/interop/run.sh: no loraxfer binary at $bin; build it (cargo build) or set LORAXFER_BIN" >&2
  exit 2
fi

python="${PYTHON:-python3}"
venv="$root/.venv"
req="tests/interop/requirements.txt"
stamp="$venv/.interop-stamp"

if ! "$venv/bin/python" -c '' 2>/dev/null; then
  command -v "$python" >/dev/null || { echo "tests/interop/run.sh: $python not found" >&2; exit 2; }
  "$python" -m venv --clear "$venv"
fi
want="$(sha256sum "$req" | cut -d' ' -f1) $("$venv/bin/python" -c 'import platform; print(platform.python_version())')"
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  echo "tests/interop/run.sh: installing $req into .venv/ (first run: a few minutes)" >&2
  rm -f "$stamp"
  # --no-cache-dir: the wheels (torch's CUDA libraries, ~3 GiB) are not kept a second time.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-cache-dir -r "$req"
  echo "$want" >"$stamp"
fi

# The module as a user installs it, from this tree; maturin comes from the venv (the pinned one
# above) instead of a fresh isolated build environment on every run.
echo "tests/interop/run.sh: building the Python module (pip install .)" >&2
PATH="$venv/bin:$PATH" "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  --no-input --no-cache-dir --no-build-isolation --no-deps --force-reinstall "$root"

export LORAXFER_BIN="$bin" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/interop "$@"
