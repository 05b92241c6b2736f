#!/usr/bin/env bash
# Set up the environment if needed (tools/setup_env.sh), then run the test suite with pytest: all of
# tests/, or the files/tests given (paths relative to the repository root).
#
#   bash tools/run_tests.sh [pytest arguments...]       # e.g. -m 'not slow' -x
#   bash tools/run_tests.sh tests/test_backbone.py -q   # one file
#
# The whole suite runs in 2 pytest-xdist worker processes (one where the machine has one core),
# each taking whole test files (--dist loadfile: a file's module fixtures are built once). Given
# test paths run in one process. DAVIT_MM_TEST_WORKERS=N sets the number of workers for either
# (1: no workers); a -n/--numprocesses or -p no:xdist among the arguments wins over both. With
# workers, OMP_NUM_THREADS (unless set) is the cores divided among them.
#
# DAVIT_MM_WHEELHOUSE is passed through to setup_env.sh (see there).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

case "${DAVIT_MM_TEST_WORKERS:-1}" in  # empty: unset
  ''|*[!0-9]*|0) printf 'error: DAVIT_MM_TEST_WORKERS=%s: accepted a positive integer\n' \
                   "'$DAVIT_MM_TEST_WORKERS'" >&2
                 exit 2 ;;
esac
bash "$DAVIT_MM_ROOT/tools/setup_env.sh"
cd "$DAVIT_MM_ROOT"
targets=(tests)  # unless a test path is among the arguments
workers_given=0
for arg in "$@"; do
  case "$arg" in
    -n*|--numprocesses|--numprocesses=*|no:xdist|-pno:xdist) workers_given=1 ;;
    -*) ;;
    *) if [ -e "${arg%%::*}" ]; then targets=(); fi ;;
  esac
done
# (nproc itself answers OMP_NUM_THREADS or OMP_THREAD_LIMIT where they are set: the cores without them)
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)
workers=${DAVIT_MM_TEST_WORKERS:-}
if [ -z "$workers" ]; then  # unset or empty
  workers=1
  if [ ${#targets[@]} -gt 0 ] && [ "$cores" -ge 2 ]; then workers=2; fi
fi
parallel=()
if [ "$workers_given" = 0 ] && [ "$workers" -gt 1 ]; then
  parallel=(-n "$workers" --dist loadfile)
  # The workers share the cores: each (and each tool it starts) gets its part of them as threads,
  # not all of them, which would slow every worker down.
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    export OMP_NUM_THREADS=$(( cores >= workers ? cores / workers : 1 ))
  fi
fi
exec "$DAVIT_MM_PYTHON" -m pytest ${targets[@]+"${targets[@]}"} ${parallel[@]+"${parallel[@]}"} \
  -p no:cacheprovider -W 'ignore:pkg_resources is deprecated' "$@"
