#!/usr/bin/env bash
# Launches examples/pretrain_nvembed.py under torchrun; every argument is forwarded to it.
#
# One machine (all local GPUs; 2 gloo processes on a machine without GPUs):
#   bash examples/pretrain_nvembed.sh --recipe tiny --train-data data/train.jsonl --tokenizer tok/
# Several machines: run the same command on each with
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0 host> MASTER_PORT=6000 GPUS_PER_NODE=8
# (SLURM: examples/pretrain_nvembed.slurm sets these from the allocation.)
#
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500; one node
# without it: torchrun --standalone on a free port),
# GPUS_PER_NODE or NPROC_PER_NODE (local GPU count, or 2 without GPUs), PYTHON (python3: runs the
# flag check and the launcher), TORCHRUN ($PYTHON -m megatron_nvembed.training.torchrun: torchrun
# that turns bad input or a failed save found after the start into one error line and exit code
# 2 or 3, without its failure traceback, and exits 0 when a SIGTERM's save succeeded on every
# worker), TORCH_ELASTIC_SHUTDOWN_TIMEOUT (240: seconds from SIGTERM to SIGKILL of the workers),
# NVEMBED_SIGNAL_EXIT (unset: a SIGTERM before torchrun ends this script with 143, and a
# SIGTERM's successful save with 0; set, e.g. to 75 by examples/slurm_train.sh: the exit code of
# both, "stopped on a signal, nothing lost: run again to resume").
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python3}"

# --help, bad flags and missing input paths are answered here, once, before torchrun starts (the
# check imports no torch): one usage or one "error: ..." line and the exit code (2: bad input),
# not one per rank plus a launcher traceback.
for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
    exec $PYTHON "$HERE/pretrain_nvembed.py" "$@"
  fi
done
# A SIGTERM during the checks (a job preempted as it starts) stops before torchrun: nothing ran.
SIGNALLED=0
trap 'SIGNALLED=1' TERM
stop_if_signalled() {
  if [[ "$SIGNALLED" == 1 ]]; then
    echo "SIGTERM before training started: nothing to save" >&2
    exit "${NVEMBED_SIGNAL_EXIT:-143}"
  fi
}
status=0
$PYTHON "$HERE/pretrain_nvembed.py" --check-args "$@" || status=$?
stop_if_signalled
[[ "$status" == 0 ]] || exit "$status"

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
# One node without an explicit MASTER_PORT: torchrun --standalone picks a free port.
STANDALONE=0
if [[ "$NNODES" == "1" && -z "${MASTER_PORT:-}" ]]; then
  STANDALONE=1
fi
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -n "${GPUS_PER_NODE:-}" ]]; then
  NPROC="$GPUS_PER_NODE"
elif [[ -n "${NPROC_PER_NODE:-}" ]]; then
  NPROC="$NPROC_PER_NODE"
else
  NPROC="$($PYTHON -c 'import torch; print(torch.cuda.device_count() or 2)')" || NPROC=""
fi
stop_if_signalled
for name in NNODES NODE_RANK MASTER_PORT NPROC; do
  if ! [[ "${!name}" =~ ^[0-9]+$ ]]; then
    echo "error: $name must be a non-negative integer, got '${!name}'" >&2
    exit 2
  fi
done
if [[ "$NPROC" == 0 || "$NNODES" == 0 ]]; then
  echo "error: processes per node (GPUS_PER_NODE / NPROC_PER_NODE) and NNODES must be at least 1, got $NPROC and $NNODES" >&2
  exit 2
fi

# gloo on CPU: one thread per process, the cores are shared.
if ! $PYTHON -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# On SIGTERM (preemption) torchrun forwards the signal and kills the workers this many seconds
# later: the iteration in progress and the checkpoint save must fit (SLURM's --signal=TERM@300).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}"
TORCHRUN="${TORCHRUN:-$PYTHON -m megatron_nvembed.training.torchrun}"

stop_if_signalled
trap - TERM  # from here torchrun (exec'd below) handles it
if [[ "$STANDALONE" == "1" ]]; then
  echo "launching 1 node x $NPROC process(es) (torchrun --standalone: a free local port)" >&2
  exec $TORCHRUN --standalone --nnodes 1 --nproc_per_node "$NPROC" \
    "$HERE/pretrain_nvembed.py" "$@"
fi
echo "launching $NNODES node(s) x $NPROC process(es), node rank $NODE_RANK, master $MASTER_ADDR:$MASTER_PORT" >&2
exec $TORCHRUN \
  --nnodes "$NNODES" \
  --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" \
  "$HERE/pretrain_nvembed.py" "$@"
