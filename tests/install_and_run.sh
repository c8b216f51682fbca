#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine, then runs it (CPU only; GPU tests skip).
# torch comes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
# Two workers (-n 2), each taking whole test modules (--dist loadfile), so a module-scoped
# fixture (a training run several tests read) runs once. Most tests wait on subprocesses
# (megatron-core imports, torchrun, gloo), so two workers halve the wall time on 2 cores.
# Pass -n 0 to run serially (e.g. to read one test's output in order).
python3 -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 tests "$@"
