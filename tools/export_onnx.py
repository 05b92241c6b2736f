"""Export a trained davit_mm detector or segmentor to ONNX with mmdeploy, post-processing included.

    python tools/export_onnx.py DEPLOY_CFG MODEL_CFG CHECKPOINT IMAGE [--work-dir DIR] [--device cpu]

DEPLOY_CFG is one of mmdeploy's deploy configs (the configs/ folder of its repository, e.g.
``configs/mmdet/detection/detection_onnxruntime_dynamic.py``), MODEL_CFG the davit_mm config the
model was trained with, IMAGE an image the export runs the model on. Writes
``WORK_DIR/end2end.onnx`` (default ``work_dirs/onnx``), as mmdeploy's ``tools/deploy.py`` does
up to its ONNX graph (mmdeploy's ``torch2onnx``), and besides:

- the checkpoint is checked against MODEL_CFG's model before anything runs, all or nothing
  (mmdeploy loads what fits and goes on); a whole model released with the official DaViT code is
  converted first, into ``WORK_DIR/checkpoint_davit_mm.pth``;
- runner checkpoints are read under torch >= 2.6 (``davit_mm.compat.runner_checkpoints_readable``);
- mmdeploy 1.3.1 exports under torch >= 2.9 (``davit_mm.compat.torchscript_onnx_export``), and
  two-stage detectors (RoIAlign) under a torch without ``_cast_Long``
  (``davit_mm.compat.onnx_cast_long``).

Backends other than ONNX Runtime (TensorRT, OpenVINO, ...) build from this graph with mmdeploy's
own tools. docs/getting_started.md (Deploy) says what was checked.
"""
import argparse
import os
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from davit_mm.checkpoint import (adapt_model_checkpoint, check_checkpoint_fits,  # noqa: E402
                                 read_training_checkpoint)
from davit_mm.cli import (build_model, check_device, check_output_path,  # noqa: E402
                          library_of, load_config, read_config, run_tool)
from davit_mm.compat import (onnx_cast_long, runner_checkpoints_readable,  # noqa: E402
                             torchscript_onnx_export)
from davit_mm.fileio import atomic_file  # noqa: E402

INSTALL = 'pip install --no-deps mmdeploy==1.3.1 aenum multiprocess dill'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('deploy_cfg', help="one of mmdeploy's deploy configs")
    parser.add_argument('model_cfg', help='the davit_mm config the model was trained with')
    parser.add_argument('checkpoint', help='the trained model (a runner checkpoint, or a whole '
                                           'model released with the official DaViT code)')
    parser.add_argument('image', help='an image the export runs the model on')
    parser.add_argument('--work-dir', default=osp.join('work_dirs', 'onnx'),
                        help='where end2end.onnx goes (default: work_dirs/onnx)')
    parser.add_argument('--device', default='cpu', help='cpu (default), cuda or cuda:N')
    return parser.parse_args(argv)


def import_torch2onnx():
    """mmdeploy's ``torch2onnx``, or a user error naming how to install mmdeploy (its declared
    ``protobuf<=3.20.2`` would downgrade onnx and protobuf: installed without dependencies)."""
    try:
        from mmdeploy.apis import torch2onnx
    except ImportError as exc:
        raise ValueError(f'mmdeploy cannot be imported ({exc}); install it with: {INSTALL}') from None
    return torch2onnx


def check_deploy_cfg(path: str, library: str) -> None:
    """DEPLOY_CFG exists and is a config of MODEL_CFG's library (mmdeploy's ``codebase_config``)."""
    codebase = read_config(path, 'deploy_cfg').get('codebase_config', {}).get('type')
    if codebase != library:
        raise ValueError(f"deploy_cfg {path!r} is a deploy config for {codebase!r}, the model "
                         f"config's library is {library!r}")


def checked_checkpoint(cfg, path: str, work_dir: str) -> str:
    """The checkpoint mmdeploy is to load: ``path`` when it fits the config's model, key by key
    and shape by shape; an official whole model converted into ``work_dir``; anything else is
    refused (:class:`davit_mm.checkpoint.CheckpointError`)."""
    model = build_model(cfg)
    converted, note = adapt_model_checkpoint(model, read_training_checkpoint(path), path)
    check_checkpoint_fits(model, path, checkpoint=converted)
    if not note:
        return path
    print(f'davit_mm: {note}')
    out = osp.join(work_dir, 'checkpoint_davit_mm.pth')
    with atomic_file(out) as f:
        torch.save(converted, f)
    return out


def main(argv=None):
    args = parse_args(argv)
    for label, path in (('checkpoint', args.checkpoint), ('image', args.image)):
        if not osp.isfile(path):
            raise ValueError(f'{label}={path!r}: no such file')
    cfg = load_config(args.model_cfg)
    check_deploy_cfg(args.deploy_cfg, library_of(cfg))
    check_device(args.device)
    check_output_path('--work-dir', args.work_dir, folder=True)
    torch2onnx = import_torch2onnx()
    os.makedirs(args.work_dir, exist_ok=True)
    checkpoint = checked_checkpoint(cfg, args.checkpoint, args.work_dir)
    with torchscript_onnx_export(), onnx_cast_long(), runner_checkpoints_readable():
        torch2onnx(args.image, args.work_dir, 'end2end.onnx', args.deploy_cfg, args.model_cfg,
                   checkpoint, device=args.device)
    out = osp.join(args.work_dir, 'end2end.onnx')
    if not osp.isfile(out):
        raise RuntimeError(f'mmdeploy returned without writing {out}')
    print(f'wrote {out}')
    return out


if __name__ == '__main__':
    sys.exit(run_tool(main))
