#!/usr/bin/env bash
# torchrun wrapper used by dist_train.sh and dist_test.sh: launch.sh NPROC SCRIPT [ARGS...]
# Multi-node through NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1) and PORT (29500).
# NPROC 1..1024, NNODES 1..65536, NODE_RANK 0..NNODES-1, PORT 1..65535: decimal, no leading zeros.
# A MASTER_ADDR that does not resolve, and on node 0 a PORT in use, are refused before torchrun
# starts (davit_mm.cli.rendezvous_problem).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ $# -lt 2 ]; then
  echo "usage: bash tools/launch.sh NPROC SCRIPT [ARGS...] (tools/dist_train.sh and dist_test.sh call it)" >&2
  exit 2
fi
NPROC=$1
shift
# Checked before anything runs (torchrun would fail on each of these with a traceback).
davit_mm_require_integer GPUS "$NPROC" 1 1024 'processes on this node'
davit_mm_require_integer NNODES "${NNODES:-1}" 1 65536
davit_mm_require_integer NODE_RANK "${NODE_RANK:-0}" 0 $((${NNODES:-1} - 1)) "with NNODES=${NNODES:-1}"
davit_mm_require_integer PORT "${PORT:-29500}" 1 65535
if "$DAVIT_MM_PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  available=$("$DAVIT_MM_PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  if [ "${NNODES:-1}" = 1 ] && [ "$NPROC" -gt "$available" ]; then
    echo "error: asked for $NPROC GPUs but this machine has $available" >&2
    exit 2
  fi
fi
export PYTHONPATH="$DAVIT_MM_ROOT${PYTHONPATH:+:$PYTHONPATH}"
# torchrun, except that a user error in the processes exits 2 with their `error: ...` and no
# torchrun traceback (davit_mm.cli.torchrun)
exec "$DAVIT_MM_PYTHON" -c 'import sys; from davit_mm.cli import torchrun; sys.exit(torchrun(sys.argv[1:]))' \
  --nnodes="${NNODES:-1}" \
  --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" \
  --master_port="${PORT:-29500}" \
  --nproc_per_node="$NPROC" \
  "$@"
