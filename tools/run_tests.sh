#!/usr/bin/env bash
# Set up the environment if needed (tools/setup_env.sh), then run the whole test suite with pytest.
#
#   bash tools/run_tests.sh [pytest arguments...]
#
# DAVIT_MM_WHEELHOUSE is passed through to setup_env.sh (see there).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

bash "$DAVIT_MM_ROOT/tools/setup_env.sh"
cd "$DAVIT_MM_ROOT"
exec "$DAVIT_MM_PYTHON" -m pytest tests -p no:cacheprovider -W 'ignore:pkg_resources is deprecated' "$@"
