#!/usr/bin/env bash
# srun wrapper used by slurm_train.sh and slurm_test.sh: slurm_launch.sh PARTITION JOB_NAME SCRIPT [ARGS...]
# One task per GPU; GPUS (8), GPUS_PER_NODE (8), CPUS_PER_TASK (5) and SRUN_ARGS from the environment.
# GPUS 1..65536, GPUS_PER_NODE and CPUS_PER_TASK 1..1024, MASTER_PORT (if set) 1..65535: decimal, no
# leading zeros.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ $# -lt 3 ]; then
  echo "usage: bash tools/slurm_launch.sh PARTITION JOB_NAME SCRIPT [ARGS...] (tools/slurm_train.sh and slurm_test.sh call it)" >&2
  exit 2
fi
PARTITION=$1
JOB_NAME=$2
shift 2
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
# Checked before srun queues anything; MASTER_PORT, when set, is the port mmengine's slurm launcher takes.
davit_mm_require_integer GPUS "$GPUS" 1 65536 'tasks, one per GPU, over all nodes'
davit_mm_require_integer GPUS_PER_NODE "$GPUS_PER_NODE" 1 1024
davit_mm_require_integer CPUS_PER_TASK "$CPUS_PER_TASK" 1 1024
if [ -n "${MASTER_PORT:-}" ]; then davit_mm_require_integer MASTER_PORT "$MASTER_PORT" 1 65535; fi
# Fewer tasks than a node's GPUs (GPUS=2 with the default GPUS_PER_NODE=8): one node, with as many
# GPUs as tasks (--gres=gpu:8 held 8 GPUs for 2 tasks).
if [ "$GPUS" -lt "$GPUS_PER_NODE" ]; then GPUS_PER_NODE=$GPUS; fi
export PYTHONPATH="$DAVIT_MM_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2086
exec srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" \
  --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" \
  --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
  "$DAVIT_MM_PYTHON" -u "$@" --launcher slurm
