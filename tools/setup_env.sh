#!/usr/bin/env bash
# Install davit_mm and the tested OpenMMLab 2.0 stack into the active Python environment (a venv or not).
#
#   bash tools/setup_env.sh [--check]
#
# Idempotent: a second run with everything in place only verifies it (seconds).
#
#   --check   only verify the environment, never install: prints "already set up: torch ..." and
#             exits 0 when everything is in place, otherwise names each missing or broken piece
#             (and unmet requirement) on stderr and exits 1 without calling pip.
#
# Environment variables:
#   PYTHON                 interpreter to install into (default: python3, or python in an active venv)
#   DAVIT_MM_WHEELHOUSE    a folder of prebuilt wheels pip looks in first (e.g. one holding an mmcv 2.1.0
#                          wheel built for your Python and torch: seconds instead of ~18 min on 2 cores)
#   DAVIT_MM_TORCH         torch requirement used only when torch is missing (default: torch==2.13.0)
#
# A torch that is already installed is never replaced: every pip call runs with a constraint pinning
# it, plus requirements/torch_before_2.3.txt (numpy < 2, opencv-python < 5) for torch < 2.3. A torch
# older than 2.1 is refused. Against a torch whose headers need C++20 (2.14 and newer), or on
# Python >= 3.13, mmcv 2.1.0 is built from its sdist with the lines that fail there changed. The
# final check trains one step of a tiny DaViT RetinaNet through mmdet.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
repo=$DAVIT_MM_ROOT
py=$DAVIT_MM_PYTHON
torch_req=${DAVIT_MM_TORCH:-torch==2.13.0}

say() { printf '[setup_env] %s\n' "$*"; }
die() { printf '[setup_env] ERROR: %s\n' "$*" >&2; exit 1; }

check_only=0
for arg in "$@"; do
  case "$arg" in
    --check) check_only=1 ;;
    *) printf '[setup_env] ERROR: unknown argument %s (usage: bash tools/setup_env.sh [--check])\n' \
         "'$arg'" >&2; exit 2 ;;
  esac
done

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
def detector_step():
    # The stack end to end: an image as numpy (cv2/mmcv), mmdet's packing (torch.from_numpy: fails
    # for a numpy the torch build does not support), a DaViT RetinaNet's forward and backward.
    import numpy as np
    import torch
    import mmcv
    import davit_mm  # noqa: F401  (registers DaViT)
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS, TRANSFORMS
    init_default_scope('mmdet')
    image = mmcv.imresize(np.random.RandomState(0).randint(0, 255, (40, 50, 3), dtype=np.uint8), (64, 48))
    pack = TRANSFORMS.build(dict(type='PackDetInputs'))
    sample = pack(dict(img=image, img_shape=(48, 64), ori_shape=(40, 50), scale_factor=(1.28, 1.2),
                       gt_bboxes=np.array([[4., 4., 30., 30.]], dtype=np.float32),
                       gt_bboxes_labels=np.array([0]), gt_ignore_flags=np.array([False])))
    model = MODELS.build(dict(
        type='RetinaNet',
        data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32),
        backbone=dict(type='DaViT', arch=dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
                      out_indices=(1, 2, 3)),
        neck=dict(type='FPN', in_channels=[32, 64, 128], out_channels=16, start_level=0,
                  add_extra_convs='on_input', num_outs=5),
        bbox_head=dict(type='RetinaHead', num_classes=2, in_channels=16, feat_channels=16, stacked_convs=1,
                       anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4,
                                             scales_per_octave=3, ratios=[0.5, 1.0, 2.0],
                                             strides=[8, 16, 32, 64, 128]),
                       bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0],
                                       target_stds=[1.0, 1.0, 1.0, 1.0]),
                       loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                                     loss_weight=1.0),
                       loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        train_cfg=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4,
                                     min_pos_iou=0, ignore_iof_thr=-1),
                       sampler=dict(type='PseudoSampler'), allowed_border=-1, pos_weight=-1,
                       debug=False)))
    data = model.data_preprocessor(dict(inputs=[sample['inputs']], data_samples=[sample['data_samples']]),
                                   True)
    losses = model.loss(data['inputs'], data['data_samples'])
    total = sum(sum(v) if isinstance(v, list) else v for k, v in losses.items() if 'loss' in k)
    total.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    if not (torch.isfinite(total) and grads and all(torch.isfinite(g).all() for g in grads)):
        raise RuntimeError(f'loss {total} or backbone gradients not finite')
if not problems:  # it needs every import above
    check('one training step of a tiny DaViT RetinaNet through mmdet', detector_step)
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
                if req.marker is not None and not req.marker.evaluate():
                    continue  # not for this platform
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
if [ "$check_only" = 1 ]; then
  die "not set up (--check installs nothing):
$report"
fi

say "installing into $("$py" -c 'import sys; print(sys.prefix)') ($("$py" --version 2>&1))"

# 1. torch first: anything installed later must find it satisfied, or pip pulls a CUDA build (gigabytes).
if ! torch_error=$("$py" -c 'import torch' 2>&1); then
  if installed=$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null); then
    die "torch $installed is installed but does not import (${torch_error##*$'\n'}); repair it yourself: this script does not replace a torch it finds"
  fi
  say "torch missing: installing $torch_req"
  pip install "$torch_req"
fi
# The torch found (or just installed) stays: each pip call below is constrained to it, so a
# requirement it does not satisfy stops pip instead of replacing it.
torch_version=$("$py" -c 'import torch; print(torch.__version__)')
torch_line=$("$py" -c '
import sys
major, minor = (int(x) for x in sys.argv[1].split("+")[0].split(".")[:2])
print("too-old" if (major, minor) < (2, 1) else "before-2.3" if (major, minor) < (2, 3) else "ok")
' "$torch_version")
if [ "$torch_line" = too-old ]; then
  die "torch $torch_version is installed; davit_mm needs torch >= 2.1. Install a newer torch (and an mmcv 2.1.0 built for it) first; this script does not replace a torch it finds"
fi
# pip matches the pin against the installed distribution's version, which is not always
# torch.__version__: PyPI's CUDA builds say 2.11.0+cu130 there but are torch 2.11.0 to pip.
torch_pin=$("$py" -c '
import importlib.metadata as m, sys
try:
    print(m.version("torch"))
except m.PackageNotFoundError:
    print(sys.argv[1])
' "$torch_version")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_pin" >"$constraints"
say "every pip call below keeps torch==$torch_pin"
if [ "$torch_line" = before-2.3 ]; then
  say "torch $torch_version < 2.3: adding the constraints of requirements/torch_before_2.3.txt (numpy < 2, opencv-python < 5)"
  cat "$repo/requirements/torch_before_2.3.txt" >>"$constraints"
fi
export PIP_CONSTRAINT="$constraints"

# 2. What mmcv's setup.py needs in the environment itself (it is built with --no-build-isolation).
pip install -r "$repo/requirements/build.txt"

# 3. mmcv with compiled ops against the installed torch (a matching wheel in the wheelhouse is taken
#    as is), then the rest of the stack.
mmcv_req=$(grep -E '^mmcv==' "$repo/requirements/openmmlab.txt")
export MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
# mmcv 2.1.0's source distribution does not build as published where
# - torch's headers need C++20 (torch >= 2.14): its setup.py compiles the ops with -std=c++17 (for
#   every torch newer than 1.12.1);
# - Python >= 3.13: its setup.py's get_version() exec()s mmcv/version.py and reads __version__ back
#   from locals(), which PEP 667 made a snapshot that exec() does not write to (KeyError).
# There, unless mmcv 2.1.0 is installed or a wheel of it is found (the wheelhouse), it is built from
# that source with just those lines changed: -std=c++20, and version.py executed into globals().
torch_cxx=$("$py" -c '
import os, torch
header = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
print("c++20" if os.path.exists(header) and "C++20" in open(header).read() else "older")')
python_313=$("$py" -c 'import sys; print(int(sys.version_info >= (3, 13)))')
mmcv_fixes=()
if [ "$torch_cxx" = c++20 ]; then
  mmcv_fixes+=("-std=c++20 (torch $torch_version needs C++20, mmcv asks for C++17)")
fi
if [ "$python_313" = 1 ]; then
  mmcv_fixes+=("its version read from globals() (Python >= 3.13 does not let exec() write locals())")
fi
if [ ${#mmcv_fixes[@]} -gt 0 ] \
    && ! "$py" -c 'import importlib.metadata as m, sys; sys.exit(m.version("mmcv") != sys.argv[1])' \
         "${mmcv_req#mmcv==}" 2>/dev/null \
    && ! pip install --no-build-isolation --only-binary mmcv "$mmcv_req" >/dev/null 2>&1; then
  fixes=$(printf '; %s' "${mmcv_fixes[@]}")
  say "no $mmcv_req wheel found: building it from source with ${fixes:2}"
  mmcv_src=$(mktemp -d)
  trap 'rm -f "$constraints"; rm -rf "$mmcv_src"' EXIT
  # pip fetches and unpacks the source (the index, proxies and find-links as configured), and
  # --no-clean leaves the unpacked tree in its temporary folder. Its metadata step, which runs
  # setup.py, fails on Python >= 3.13 at the very line changed below: what counts is the tree.
  TMPDIR=$mmcv_src pip download --no-clean --no-deps --no-binary :all: --no-build-isolation \
    -d "$mmcv_src/sdist" "$mmcv_req" >"$mmcv_src/download.log" 2>&1 || true
  mmcv_setup=$(find "$mmcv_src" -mindepth 3 -maxdepth 3 -name setup.py | head -n 1)
  [ -n "$mmcv_setup" ] || die "pip could not fetch the source of $mmcv_req:
$(tail -n 5 "$mmcv_src/download.log")"
  edit_mmcv_setup() {  # every $1 in mmcv's setup.py becomes $2; $1 must be there
    "$py" -c '
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
if old not in text:
    sys.exit(1)
open(path, "w").write(text.replace(old, new))' \
      "$mmcv_setup" "$1" "$2" || die "$mmcv_setup has no \"$1\" to change: not the mmcv this script knows"
  }
  if [ "$torch_cxx" = c++20 ]; then
    edit_mmcv_setup '-std=c++17' '-std=c++20'
  fi
  if [ "$python_313" = 1 ]; then
    edit_mmcv_setup "exec(compile(f.read(), version_file, 'exec'))" \
                    "exec(compile(f.read(), version_file, 'exec'), globals())"
    edit_mmcv_setup "return locals()['__version__']" "return globals()['__version__']"
  fi
  pip install --no-build-isolation "$(dirname "$mmcv_setup")"
fi
pip install --no-build-isolation -r "$repo/requirements/openmmlab.txt"

# 4. davit_mm itself, editable, with its test extras.
pip install --no-build-isolation -e "$repo[tests]"

if ! report=$(verify 2>&1); then
  die "the environment is still broken after installing:
$report"
fi
say "ready: $report"
