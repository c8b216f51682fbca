#!/usr/bin/env bash
# Quickstart on a fresh CPU machine: install, then import a tiny decoder, train stage 1 and
# stage 2 with 2 processes, export to the HF format and compare held-out retrieval before/after.
# OUT_DIR (default quickstart_out/) receives summary.json, checkpoints, logs and the export.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[eval]"
python3 examples/quickstart.py --out-dir "${OUT_DIR:-quickstart_out}"
