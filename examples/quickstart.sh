#!/usr/bin/env bash
# Quickstart on a fresh CPU machine: install, then embed texts with a tiny model at TP=2.
# OUT_DIR (default quickstart_out/) receives summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e .
python3 examples/quickstart.py --out-dir "${OUT_DIR:-quickstart_out}"
