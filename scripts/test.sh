#!/usr/bin/env bash
# The test command: every Rust test (unit, known answers, architectures, bad inputs, CLI, memory,
# reliability, properties), then the PEFT/transformers interoperability tests against the binary
# those tests built. The first run installs the Python side into .venv/ (a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test
LORAXFER_BIN=target/debug/loraxfer tests/interop/run.sh
