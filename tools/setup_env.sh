#!/usr/bin/env bash
# Install davit_mm and the tested OpenMMLab 2.0 stack into the active Python environment (a venv or not).
#
#   bash tools/setup_env.sh
#
# Idempotent: a second run with everything in place only verifies it (seconds).
#
# Environment variables:
#   PYTHON                 interpreter to install into (default: python3, or python in an active venv)
#   DAVIT_MM_WHEELHOUSE    a folder of prebuilt wheels pip looks in first (e.g. ../shared/wheelhouse, which
#                          holds mmcv 2.1.0 built for cp311 + torch 2.13.0 CPU: seconds instead of ~18 min)
#   DAVIT_MM_TORCH         torch requirement used only when torch is missing (default: torch==2.13.0)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
repo=$DAVIT_MM_ROOT
py=$DAVIT_MM_PYTHON
torch_req=${DAVIT_MM_TORCH:-torch==2.13.0}

say() { printf '[setup_env] %s\n' "$*"; }
die() { printf '[setup_env] ERROR: %s\n' "$*" >&2; exit 1; }

command -v "$py" >/dev/null 2>&1 || die "no Python interpreter '$py' (set PYTHON=/path/to/python)"

if [ -n "${DAVIT_MM_WHEELHOUSE:-}" ]; then
  [ -d "$DAVIT_MM_WHEELHOUSE" ] || die "DAVIT_MM_WHEELHOUSE='$DAVIT_MM_WHEELHOUSE' is not a directory"
  wheelhouse=$(cd "$DAVIT_MM_WHEELHOUSE" && pwd)
  # Prepend rather than replace: pip's own find-links (e.g. a local torch wheel) must stay visible.
  export PIP_FIND_LINKS="$wheelhouse${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}"
  say "looking for wheels in $wheelhouse first"
fi

pip() { "$py" -m pip "$@"; }

# The checks that decide whether anything needs doing; also the final verification.
verify() {
  # From / so that the current directory (often the checkout itself) cannot stand in for the
  # installed davit_mm.
  (cd / && "$py" - "$repo") <<'EOF'
import os, sys, warnings
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
repo = os.path.realpath(sys.argv[1])
problems = []
def check(what, fn):
    try:
        fn()
    except Exception as exc:  # report every failing piece, not just the first
        problems.append(f'{what}: {type(exc).__name__}: {exc}')
def mmcv_ops():
    import mmcv.ops  # noqa: F401  (mmdet and mmseg import it at load time)
def davit_mm_here():
    import davit_mm
    where = os.path.realpath(os.path.dirname(os.path.dirname(davit_mm.__file__)))
    if where != repo:
        raise RuntimeError(f'imports from {where}, not from this checkout {repo}')
check('torch', lambda: __import__('torch'))
check('mmcv.ops', mmcv_ops)
check('mmdet', lambda: __import__('mmdet.models'))
check('mmseg', lambda: __import__('mmseg.models'))
check('pkg_resources (setuptools<82)', lambda: __import__('pkg_resources'))
check('davit_mm', davit_mm_here)
def requirements_met():
    # Every requirement file line must be satisfied, so a requirement added later is installed
    # on machines that were set up before it existed.
    from importlib.metadata import PackageNotFoundError, version
    from packaging.requirements import Requirement
    unmet = []
    for name in ('runtime', 'tests', 'det', 'seg', 'openmmlab'):
        with open(os.path.join(repo, 'requirements', f'{name}.txt')) as f:
            for line in f:
                line = line.split('#', 1)[0].strip()
                if not line:
                    continue
                req = Requirement(line)
                try:
                    installed = version(req.name)
                except PackageNotFoundError:
                    unmet.append(f'{line} (not installed)')
                    continue
                if not req.specifier.contains(installed, prereleases=True):
                    unmet.append(f'{line} (have {installed})')
    if unmet:
        raise RuntimeError('unmet requirements: ' + ', '.join(unmet))
check('requirements', requirements_met)
if problems:
    print('\n'.join(problems))
    sys.exit(1)
import torch, mmcv, mmengine, mmdet, mmseg, davit_mm
print(f'torch {torch.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, '
      f'mmdet {mmdet.__version__}, mmseg {mmseg.__version__}, davit_mm {davit_mm.__version__}')
EOF
}

if report=$(verify 2>/dev/null); then
  say "already set up: $report"
  exit 0
fi

say "installing into $("$py" -c 'import sys; print(sys.prefix)') ($("$py" --version 2>&1))"

# 1. torch first: anything installed later must find it satisfied, or pip pulls a CUDA build (gigabytes).
if ! "$py" -c 'import torch' >/dev/null 2>&1; then
  say "torch missing: installing $torch_req"
  pip install "$torch_req"
fi

# 2. What mmcv's setup.py needs in the environment itself (it is built with --no-build-isolation).
pip install -r "$repo/requirements/build.txt"

# 3. mmcv with compiled ops against the installed torch (a matching wheel in the wheelhouse is taken
#    as is), then the rest of the stack.
MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} pip install --no-build-isolation -r "$repo/requirements/openmmlab.txt"

# 4. davit_mm itself, editable, with its test extras.
pip install --no-build-isolation -e "$repo[tests]"

if ! report=$(verify 2>&1); then
  die "the environment is still broken after installing:
$report"
fi
say "ready: $report"
