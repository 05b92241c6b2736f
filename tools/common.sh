# Sourced by the tools/*.sh scripts: the repository root and the Python interpreter they all use.
# PYTHON wins; otherwise an active virtualenv's python; otherwise python3.
DAVIT_MM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PYTHON:-}" ]; then
  DAVIT_MM_PYTHON=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  DAVIT_MM_PYTHON="$VIRTUAL_ENV/bin/python"
else
  DAVIT_MM_PYTHON=python3
fi
export DAVIT_MM_ROOT DAVIT_MM_PYTHON
