#!/usr/bin/env bash
# One GPU session: install this checkout on a CUDA machine without registry access, run the GPU
# tests and the training-step benchmarks, and leave everything under $OUT (default bench/out).
#
# Prepare on a machine with registry access (wheels/ is git-ignored; the GPU machine's Python is
# 3.12 and it already has a CUDA torch, transformers and peft):
#   pip download --no-deps --python-version 3.12 --only-binary=:all: \
#       megatron-core==0.16.1 einops tqdm safetensors sentence-transformers -d wheels/
# (sentence-transformers: the baseline of `encode`; without it that step is skipped.)
# Then, on the GPU machine, from the repository root:
#   bash bench/gpu_session.sh [quick|full]
# quick: GPU tests + tiny and 2-layer Mistral-7B-width benchmarks (a few minutes);
# full: adds 8 layers, the packing comparison, the corpus-encoder and the long-input benchmarks at
# Mistral-7B width; encode: quick + the corpus-encoder benchmark only; long: quick + the
# long-input benchmark only (bench/long_context.py at 8k and 32k tokens).
set -euo pipefail

MODE="${1:-quick}"
OUT="${OUT:-bench/out}"
STAMP="$(date -u +%Y%m%d)"
mkdir -p "$OUT"

if ! python -c "import megatron.core" 2>/dev/null; then
  if ! ls wheels/*.whl >/dev/null 2>&1; then
    echo "megatron-core is not installed and wheels/ is empty: see the header of $0" >&2
    exit 2
  fi
  python -m pip install -q --no-index --no-deps wheels/*.whl
fi
python -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null \
  || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/gpu.txt"
# e.g. nvidia-h100-80gb-hbm3: result names say which GPU they come from
TAG="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')"

echo "== GPU tests"
python -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.txt" || true

run_bench() {  # name, then bench/train_step.py arguments
  local name="$1"
  shift
  echo "== bench $name"
  python bench/train_step.py --device cuda "$@" --output "$OUT/$TAG-$name-$STAMP.json" \
    2>&1 | tee "$OUT/$TAG-$name-$STAMP.log" || true
}

run_bench tiny --preset tiny --repeats 3
run_bench mistral-2l --preset mistral-7b-width --layers 2 --repeats 3
if [[ "$MODE" == "full" ]]; then
  run_bench mistral-8l --preset mistral-7b-width --layers 8 --repeats 2
  run_bench mistral-2l-layouts --preset mistral-7b-width --layers 2 --compare-layouts
fi
if [[ "$MODE" == "encode" || "$MODE" == "full" ]]; then
  # corpus encoder vs sentence-transformers on one export: Mistral-7B width, 4 layers, bf16
  echo "== bench encode"
  python bench/encode.py throughput --device cuda --hidden-size 4096 --layers 4 --heads 32 \
    --kv-heads 8 --intermediate-size 14336 --passages 4000 --rounds 3 --st-batch-sizes 32 128 \
    --output "$OUT/$TAG-encode-mistral-4l-$STAMP.json" 2>&1 \
    | tee "$OUT/$TAG-encode-mistral-4l-$STAMP.log" || true
fi
if [[ "$MODE" == "long" || "$MODE" == "full" ]]; then
  # long inputs: one training step at 8k and 32k tokens, Mistral-7B width, 4 layers, bf16, TP=1
  # (one GPU: sequence parallelism has nothing to split), recompute off / on
  echo "== bench long_context"
  python bench/long_context.py --device cuda --tp 1 --hidden-size 4096 --ffn-hidden-size 14336 \
    --heads 32 --kv-heads 8 --layers 4 --latents 512 --pool-heads 8 --bf16 --lengths 8192 32768 \
    --modes none recompute --output "$OUT/$TAG-long-context-mistral-4l-$STAMP.json" 2>&1 \
    | tee "$OUT/$TAG-long-context-mistral-4l-$STAMP.log" || true
fi
echo "results in $OUT"
