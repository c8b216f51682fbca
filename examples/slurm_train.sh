#!/usr/bin/env bash
# Runs examples/pretrain_nvembed.sh on every node of a SLURM allocation (from inside an sbatch
# script: examples/pretrain_nvembed.slurm, and the cell jobs of tools/ablate.py --run slurm).
# Every argument is forwarded to the launcher.
#
#   bash examples/slurm_train.sh --recipe tiny --train-data data.jsonl --save ckpt --load ckpt
#
# - MASTER_ADDR: the allocation's first node; MASTER_PORT: 20000 + job id % 40000, so jobs that
#   share a node never listen on one port; NNODES: the allocation's node count.
# - Processes per node: the GPUs SLURM gave the job, read from SLURM_GPUS_PER_NODE in any of its
#   forms ("8", "gpu:8", "h100:8", "gpu:h100:8") or SLURM_GPUS_ON_NODE; with none (unset or 0: a
#   CPU node) the launcher's own choice (NPROC_PER_NODE, else every local GPU, else 2 gloo
#   processes on the CPU).
# - A job that stopped before its last iteration on a signal (SLURM's --signal=TERM@N before the
#   time limit, or a SIGTERM during the launcher's checks) has saved a checkpoint: it is requeued
#   (scontrol requeue) and the requeued run resumes from that checkpoint through --load. Without
#   --requeue (or where requeueing is refused) it ends with exit code 75 (EX_TEMPFAIL): resubmit.
# Exit codes: 0 training finished, 2 bad input, 3 a checkpoint save failed, 75 stopped and saved
# but not requeued, other: a failure (the log says which).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "error: slurm_train.sh runs inside a SLURM job (sbatch); on one machine use examples/pretrain_nvembed.sh" >&2
  exit 2
fi

export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="$((20000 + SLURM_JOB_ID % 40000))"
export NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
GPUS="${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
GPUS="${GPUS##*:}"
if [[ -n "$GPUS" && ! "$GPUS" =~ ^[0-9]+$ ]]; then
  echo "error: cannot read a GPU count from SLURM_GPUS_PER_NODE='${SLURM_GPUS_PER_NODE:-}' SLURM_GPUS_ON_NODE='${SLURM_GPUS_ON_NODE:-}'" >&2
  exit 2
fi
if [[ -n "$GPUS" && "$GPUS" != 0 ]]; then
  export GPUS_PER_NODE="$GPUS"
else
  unset GPUS_PER_NODE
fi
# The launchers exit 75 when a signal stopped training after a save (or before it started).
export NVEMBED_SIGNAL_EXIT=75
# SLURM kills a step KillWait seconds after signalling it (scancel, preemption: GraceTime);
# torchrun's shutdown timeout is kept inside that budget and the --signal lead.
KILL_WAIT="$(scontrol show config 2>/dev/null | awk '$1 == "KillWait" {print $3}')"
echo "slurm_train: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), $NNODES node(s), master $MASTER_ADDR:$MASTER_PORT, GPUs per node ${GPUS_PER_NODE:-none}, KillWait ${KILL_WAIT:-?} s" >&2

status=0
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  bash -c 'NODE_RANK=$SLURM_NODEID exec bash "$0" "$@"' "$HERE/pretrain_nvembed.sh" "$@" || status=$?
if [[ "$status" == 75 ]]; then
  if [[ "${SLURM_JOB_REQUEUE:-1}" != 0 ]] && scontrol requeue "$SLURM_JOB_ID"; then
    echo "slurm_train: stopped on a signal after saving; job $SLURM_JOB_ID requeued, it resumes from the checkpoint" >&2
    sleep 60  # the requeue ends this script; nothing after it runs
  fi
  echo "slurm_train: stopped on a signal after saving, not requeued: resubmit the same command to resume" >&2
fi
exit "$status"
