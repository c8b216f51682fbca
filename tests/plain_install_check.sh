#!/usr/bin/env bash
# Plain-install check: does the README's first command work from a fresh virtual environment that
# holds only torch and `pip install -e ".[eval]"` (what examples/quickstart.sh installs)?
# The test suite's environment has the `test` extra, which pulls in packages that a plain install
# lacks; an undeclared runtime dependency therefore only shows up here (megatron-core's checkpoint
# writer without psutil hung import-hf forever, silently).
#
#   bash tests/plain_install_check.sh [VENV_DIR]      (default VENV_DIR: .venv-plain/ in the repo)
#
# Steps, each under `timeout` (STEP_TIMEOUT seconds, default 600) so that a hang fails the check:
#   install-torch, install-package (torch==2.13.0 first, then -e ".[eval]" and nothing else),
#   check-isolation (the package, torch and megatron-core come from VENV_DIR, not another env),
#   tiny-data (synthetic data + tiny HF decoder, the quickstart's helpers),
#   import-hf, train (examples/pretrain_nvembed.sh --recipe tiny --train-iters 2 under torchrun
#   with 2 processes), export-hf, evaluate (tools/evaluate_mteb.py on the export: the `eval`
#   extra), check-outputs.
# On failure: the step's name, its exit status and the tail of its log; exit status 1.
#
# Reuse: VENV_DIR/.plain-install-stamp records the sha256 of setup.py and the torch pin after a
# complete install; when it matches, both install steps are skipped (the package is installed
# editable, so source changes need no reinstall). A changed setup.py, a missing stamp or
# PLAIN_INSTALL_FRESH=1 recreates the venv from scratch. CI runs on a fresh clone: no stamp, so
# the first run always installs everything.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="$(realpath -m "${1:-$ROOT/.venv-plain}")"
STEP_TIMEOUT="${STEP_TIMEOUT:-600}"
TORCH_PIN="torch==2.13.0"
STAMP="$VENV/.plain-install-stamp"
WANT_STAMP="$(sha256sum setup.py | cut -d' ' -f1) $TORCH_PIN"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/plain_install_check.XXXXXX")"
mkdir -p "$WORK/logs"
KEEP_WORK=0
cleanup() { if [[ "$KEEP_WORK" == 0 ]]; then rm -rf "$WORK"; fi; }
trap cleanup EXIT

# Nothing from the calling environment may leak into the venv's Python.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PIP_USER PIP_TARGET PIP_PREFIX VIRTUAL_ENV CONDA_PREFIX
export PYTHONNOUSERSITE=1

START=$SECONDS
# step NAME CMD...: runs CMD under timeout with its output in $WORK/logs/NAME.log.
step() {
  local name="$1" t0=$SECONDS rc=0
  shift
  echo "== $name"
  timeout --kill-after=20 "$STEP_TIMEOUT" "$@" >"$WORK/logs/$name.log" 2>&1 || rc=$?
  if [[ "$rc" != 0 ]]; then
    KEEP_WORK=1
    echo "---- last 40 lines of $WORK/logs/$name.log" >&2
    tail -n 40 "$WORK/logs/$name.log" >&2
    if [[ "$rc" == 124 || "$rc" == 137 ]]; then
      echo "plain_install_check: FAILED at step '$name': no exit within ${STEP_TIMEOUT}s" \
        "(hung; killed). Logs kept in $WORK/logs" >&2
    else
      echo "plain_install_check: FAILED at step '$name' (exit $rc). Logs kept in $WORK/logs" >&2
    fi
    exit 1
  fi
  echo "   ok ($((SECONDS - t0))s)"
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" && "${PLAIN_INSTALL_FRESH:-0}" != 1 ]]; then
  echo "== reusing $VENV (setup.py and torch pin unchanged; PLAIN_INSTALL_FRESH=1 to rebuild)"
else
  # Only ever clear a directory that is absent, empty or already a venv.
  if [[ -e "$VENV" && ! -f "$VENV/pyvenv.cfg" && -n "$(ls -A "$VENV" 2>/dev/null)" ]]; then
    echo "plain_install_check: $VENV exists and is not a venv; refusing to clear it" >&2
    exit 1
  fi
  echo "== creating $VENV"
  python3 -m venv --clear "$VENV"
  step install-torch "$VENV/bin/python" -m pip install -q "$TORCH_PIN"
  step install-package "$VENV/bin/python" -m pip install -q -e ".[eval]"
  echo "$WANT_STAMP" >"$STAMP"
fi

export PATH="$VENV/bin:$PATH"  # python3 / torchrun inside examples/pretrain_nvembed.sh
PY="$VENV/bin/python"
export PYTHON="$PY" NPROC_PER_NODE=2  # examples/pretrain_nvembed.sh's flag check and launcher
unset TORCHRUN

step check-isolation "$PY" - "$VENV" "$ROOT" <<'EOF'
import os, site, sys
venv, root = (os.path.realpath(p) for p in sys.argv[1:3])
assert not site.ENABLE_USER_SITE, "user site-packages enabled"
assert os.path.realpath(sys.prefix) == venv, f"sys.prefix {sys.prefix} is not {venv}"
import megatron.core, megatron_nvembed, torch
for mod, where in [(torch, venv), (megatron.core, venv), (megatron_nvembed, root)]:
    path = os.path.realpath(mod.__file__)
    assert path.startswith(where + os.sep), f"{mod.__name__} imported from {path}, not {where}"
print("torch", torch.__version__, "| megatron-core", megatron.core.__version__)
EOF

OUT="$WORK/out"
step tiny-data "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from transformers import AutoTokenizer
from megatron_nvembed.testing import save_tiny_hf_decoder, write_synthetic_retrieval

out = Path(sys.argv[1])
data = write_synthetic_retrieval(out / "data")
save_tiny_hf_decoder(out / "hf_base", AutoTokenizer.from_pretrained(data["tokenizer"]))
(out / "data.json").write_text(json.dumps({k: str(v) for k, v in data.items()}))
EOF
data() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$OUT/data.json" "$1"; }
TRAIN_DATA="$(data train)"

step import-hf "$PY" tools/convert_checkpoint.py import-hf --hf-dir "$OUT/hf_base" \
  --save "$OUT/ckpt/base" --pooling latent
step train bash examples/pretrain_nvembed.sh --recipe tiny \
  --pretrained-checkpoint "$OUT/ckpt/base" --train-data "$TRAIN_DATA" \
  --train-iters 2 --lr-warmup-iters 1 --save "$OUT/ckpt/stage1" --log-json "$OUT/stage1.jsonl"
step export-hf "$PY" tools/convert_checkpoint.py export-hf --load "$OUT/ckpt/stage1" \
  --hf-dir "$OUT/hf_final" --dtype float32
step evaluate "$PY" tools/evaluate_mteb.py --model "$OUT/hf_final" --beir-dir "$(data eval)" \
  --instruction "$(data instruction)" --output "$OUT/eval"
step check-outputs "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "stage1.jsonl").read_text().splitlines() if l.strip()]
iters = [r["iteration"] for r in rows if "loss" in r]
assert iters and max(iters) == 2, f"training log has loss rows for iterations {iters}, want up to 2"
assert (out / "hf_final" / "config.json").is_file(), "export-hf wrote no config.json"
assert list((out / "hf_final").glob("*.safetensors")), "export-hf wrote no safetensors"
score = json.loads((out / "eval" / "summary.json").read_text())["tasks"]["eval"]["ndcg_at_10"]
assert 0.0 <= score <= 1.0, f"evaluation nDCG@10 {score} outside [0, 1]"
EOF
echo "plain_install_check: ok in $((SECONDS - START))s (venv: $VENV)"
