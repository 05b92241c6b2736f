#!/usr/bin/env bash
# Distributed evaluation (torchrun), for mmdet and mmseg configs alike:
#
#   bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py arguments, e.g. --tta]
#
# NNODES, NODE_RANK, MASTER_ADDR and PORT work as for dist_train.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ $# -lt 3 ]; then
  echo "usage: bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py arguments...]" >&2
  exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
exec bash "$DAVIT_MM_ROOT/tools/launch.sh" "$GPUS" "$DAVIT_MM_ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
