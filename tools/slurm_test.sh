#!/usr/bin/env bash
# Evaluation under slurm, one task per GPU:
#
#   GPUS=8 bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py arguments...]
#
# GPUS (8), GPUS_PER_NODE (8), CPUS_PER_TASK (5) and SRUN_ARGS are read from the environment.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py arguments...]" >&2
  exit 2
fi
here=$(dirname "${BASH_SOURCE[0]}")
exec bash "$here/slurm_launch.sh" "$1" "$2" "$here/test.py" "$3" "$4" "${@:5}"
