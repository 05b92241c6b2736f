#!/usr/bin/env bash
# srun wrapper used by slurm_train.sh and slurm_test.sh: slurm_launch.sh PARTITION JOB_NAME SCRIPT [ARGS...]
# One task per GPU; GPUS (8), GPUS_PER_NODE (8), CPUS_PER_TASK (5) and SRUN_ARGS from the environment.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PARTITION=$1
JOB_NAME=$2
shift 2
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
export PYTHONPATH="$DAVIT_MM_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2086
exec srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" \
  --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" \
  --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
  "$DAVIT_MM_PYTHON" -u "$@" --launcher slurm
