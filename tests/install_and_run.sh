#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine, then runs it (CPU only; GPU tests skip).
# torch comes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"

# The compatibility tests (tests/compat/) load exports in NV-Embed's released model code, which
# imports only under transformers 4.42.4 / tokenizers 0.19.1: a second venv, .venv-ref/, holds
# that client (never this package). Built once, reused while its requirements are unchanged.
REF_VENV=".venv-ref"
REF_REQS=(transformers==4.42.4 tokenizers==0.19.1 "numpy<2" einops safetensors sentencepiece
          protobuf datasets==2.21.0 pyarrow==17.0.0)
if [[ -z "${NVEMBED_REFERENCE_PYTHON:-}" ]]; then
  if [[ "$(cat "$REF_VENV/.requirements" 2>/dev/null)" != "${REF_REQS[*]}" ]]; then
    rm -rf "$REF_VENV"
    python3 -m venv "$REF_VENV"
    "$REF_VENV/bin/python" -m pip install -q torch==2.13.0
    "$REF_VENV/bin/python" -m pip install -q "${REF_REQS[@]}"
    echo "${REF_REQS[*]}" > "$REF_VENV/.requirements"
  fi
  export NVEMBED_REFERENCE_PYTHON="$PWD/$REF_VENV/bin/python"
fi

# The README's first command from a plain install (only the extras it names), on a short path:
# an undeclared dependency fails here, not on a user's machine. SKIP_PLAIN_INSTALL=1 skips it.
if [[ "${SKIP_PLAIN_INSTALL:-0}" != 1 ]]; then
  bash tests/plain_install_check.sh
fi

# The slurm tests (tests/slurm/) start a one-node SLURM from Debian's packages: installed here
# where this is a root Debian machine (they skip elsewhere, and fail under CI=true).
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  bash tests/slurm/cluster.sh install "${TMPDIR:-/tmp}/nvembed-slurm-install"
fi

# Two workers (-n 2), each taking whole test modules (--dist loadfile), so a module-scoped
# fixture (a training run several tests read) runs once. Most tests wait on subprocesses
# (megatron-core imports, torchrun, gloo), so two workers halve the wall time on 2 cores.
# Arguments go to pytest (e.g. -n 0 to run serially, or a test path), all in one run.
if [[ $# -gt 0 ]]; then
  exec python3 -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 tests "$@"
fi
# Without arguments the slurm tests, which mostly wait on the scheduler and on requeues, run in a
# pytest of their own beside the rest from the start; their report follows the main one.
SLURM_REPORT="$(mktemp)"
SLURM_TMP="$(mktemp -d)"
python3 -m pytest -q -p no:cacheprovider --durations=8 --basetemp="$SLURM_TMP/t" tests/slurm \
  >"$SLURM_REPORT" 2>&1 &
SLURM_PID=$!
status=0
python3 -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 tests \
  --ignore=tests/slurm || status=$?
slurm_status=0
wait "$SLURM_PID" || slurm_status=$?
echo "== tests/slurm (run beside the rest)"
cat "$SLURM_REPORT"
rm -rf "$SLURM_REPORT" "$SLURM_TMP"
if [[ "$status" != 0 ]]; then exit "$status"; fi
exit "$slurm_status"
