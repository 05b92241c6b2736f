#!/usr/bin/env bash
# Set up the environment if needed (tools/setup_env.sh), then run the test suite with pytest: all of
# tests/, or the files/tests given (paths relative to the repository root).
#
#   bash tools/run_tests.sh [pytest arguments...]       # e.g. -m 'not slow' -x
#   bash tools/run_tests.sh tests/test_backbone.py -q   # one file
#
# DAVIT_MM_WHEELHOUSE is passed through to setup_env.sh (see there).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

bash "$DAVIT_MM_ROOT/tools/setup_env.sh"
cd "$DAVIT_MM_ROOT"
targets=(tests)  # unless a test path is among the arguments
for arg in "$@"; do
  case "$arg" in
    -*) ;;
    *) if [ -e "${arg%%::*}" ]; then targets=(); fi ;;
  esac
done
exec "$DAVIT_MM_PYTHON" -m pytest ${targets[@]+"${targets[@]}"} -p no:cacheprovider -W 'ignore:pkg_resources is deprecated' "$@"
