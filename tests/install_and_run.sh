#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine, then runs it (CPU only; GPU tests skip).
# torch comes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
