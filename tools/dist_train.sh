#!/usr/bin/env bash
# Distributed training on one or several nodes (torchrun), for mmdet and mmseg configs alike:
#
#   bash tools/dist_train.sh CONFIG GPUS [tools/train.py arguments...]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 PORT=29500 bash tools/dist_train.sh CONFIG 8   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 PORT=29500 bash tools/dist_train.sh CONFIG 8   # node 1
#
# On a machine without CUDA the GPUS processes run on CPU over gloo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ $# -lt 2 ]; then
  echo "usage: bash tools/dist_train.sh CONFIG GPUS [train.py arguments...]" >&2
  exit 2
fi
CONFIG=$1
GPUS=$2
shift 2
exec bash "$DAVIT_MM_ROOT/tools/launch.sh" "$GPUS" "$DAVIT_MM_ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
