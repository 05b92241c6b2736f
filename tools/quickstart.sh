#!/usr/bin/env bash
# See davit_mm work end to end in a few minutes, on a CPU, without downloads:
# set up (if needed), generate a small COCO-layout dataset, train a small DaViT detector with the real
# tools/train.py, evaluate it with tools/test.py (COCO mAP), draw its predictions on the validation
# images and plot its loss curve, all into one output folder.
#
#   bash tools/quickstart.sh [--iters N] [--out-dir DIR] [--model maskrcnn|retinanet]
#
#   --iters N      training iterations (default 320: 20 epochs of 64 images at batch 4); rounded up
#                  to whole epochs; 1 to 100000 (this is a demo of a few minutes: longer runs
#                  belong to tools/train.py)
#   --out-dir DIR  where everything goes, created if needed; a non-empty path, not a file (default:
#                  outputs/quickstart in the repository)
#   --model NAME   maskrcnn (boxes and masks, default) or retinanet (boxes)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
root=$DAVIT_MM_ROOT
py=$DAVIT_MM_PYTHON

iters=320
out="$root/outputs/quickstart"
model=maskrcnn
num_train=64
num_val=16
batch=4  # the quickstart configs' train_dataloader.batch_size

usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --iters) [ $# -ge 2 ] || die "--iters needs a value"; iters=$2; shift 2 ;;
    --out-dir) [ $# -ge 2 ] || die "--out-dir needs a value"; out=$2; shift 2 ;;
    --model) [ $# -ge 2 ] || die "--model needs a value"; model=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
max_iters=100000  # a demo of a few minutes (320 by default); the --help text says so
davit_mm_is_integer_in "$iters" 1 "$max_iters" ||
  die "--iters must be a positive integer from 1 to $max_iters written without leading zeros (a demo of a few minutes; longer runs: tools/train.py), got '$iters'"
[ -n "$out" ] || die "--out-dir must name a folder, got ''"
[ ! -e "$out" ] || [ -d "$out" ] || die "--out-dir '$out' is a file, not a folder"
case "$model" in
  maskrcnn) config="$root/configs/quickstart/davit_mini_maskrcnn_synthetic_coco.py" ;;
  retinanet) config="$root/configs/quickstart/davit_mini_retinanet_synthetic_coco.py" ;;
  *) die "--model must be maskrcnn or retinanet, got '$model'" ;;
esac

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

created=$(mkdir -p -- "$out" 2>&1) || die "--out-dir '$out' cannot be created: ${created##*: }"

step "1/6 environment"
bash "$root/tools/setup_env.sh"

out=$(cd "$out" && pwd)
data="$out/data/synthetic_coco"
step "2/6 dataset: $data"
if [ -f "$data/annotations/instances_val2017.json" ]; then
  echo "already there"
else
  "$py" "$root/tools/dataset/make_synthetic_coco.py" "$data" --num-train "$num_train" --num-val "$num_val"
fi

# Whole epochs; the lr drops by 10x at 75% and again at 92% of them, as in the 1x schedule.
read -r epochs step1 step2 < <("$py" -c "
import math; e = math.ceil($iters / math.ceil($num_train / $batch))
print(e, max(1, round(0.75 * e)), max(1, round(0.92 * e)))")
step "3/6 train ($model, mini DaViT, $epochs epochs = $((epochs * (num_train / batch))) iterations)"
cd "$out"  # the quickstart configs find their data under ./data
"$py" "$root/tools/train.py" "$config" --work-dir "$out/train" --cfg-options \
  train_cfg.max_epochs="$epochs" train_cfg.val_interval="$epochs" param_scheduler.1.end="$epochs" \
  param_scheduler.1.milestones="[$step1,$step2]" default_hooks.checkpoint.interval="$epochs"
checkpoint="$out/train/epoch_$epochs.pth"

step "4/6 evaluate on the validation images"
"$py" "$root/tools/test.py" "$config" "$checkpoint" --work-dir "$out/test" 2>&1 | tee "$out/test.log"

step "5/6 draw predictions"
rm -rf "$out/predictions"
"$py" "$root/demo/image_demo.py" "$data/val2017" "$config" "$checkpoint" --out-dir "$out/demo"
mv "$out/demo/vis" "$out/predictions"

step "6/6 loss curve"
"$py" "$root/tools/analysis/plot_loss.py" "$out/train" --out "$out/loss_curve.png"

step "done"
grep -Eo 'coco/(bbox|segm)_mAP(_50)?: [0-9.]+' "$out/test.log" | tail -n 4 | sed 's/^/  /'
cat <<EOF

Everything is in $out:
  predictions/     validation images with the predicted boxes$( [ "$model" = maskrcnn ] && echo ' and masks')
  demo/preds/      the same predictions as JSON, one file per image
  loss_curve.png   the training losses
  train/           config, logs and checkpoint ($(basename "$checkpoint"))
  test.log         the COCO evaluation (test/: its log and metrics as mmengine writes them)
  data/            the generated dataset
Next: docs/getting_started.md (train the paper's models on COCO and ADE20K).
EOF
