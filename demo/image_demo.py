"""Run a davit_mm detector or segmentor on images and save the drawn predictions.

    python demo/image_demo.py IMAGE CONFIG CHECKPOINT [--out-dir outputs/demo] [--device cpu]
                              [--score-thr 0.3] [--show]

IMAGE is an image file or a folder of images. Detection configs draw boxes and masks (mmdet's
DetInferencer), segmentation configs draw the label map (mmseg's MMSegInferencer); the library is
picked from the config's default_scope. Drawn images go to OUT_DIR/vis/, raw predictions to
OUT_DIR/preds/ (detection, IMAGE.json) or OUT_DIR/pred/ (segmentation, IMAGE_pred.png label
maps), each named after its image. ``--show`` also displays each drawing in a window until a key
is pressed (needs a display).
"""
import argparse
import os
import os.path as osp
import sys
from typing import List

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import cv2  # noqa: E402
import torch  # noqa: E402

from davit_mm import compat  # noqa: E402
from davit_mm.checkpoint import (adapt_model_checkpoint, check_checkpoint_fits,  # noqa: E402
                                 read_training_checkpoint)
from davit_mm.checks import IMAGE_SUFFIXES  # noqa: E402
from davit_mm.cli import (adapt_config_to_machine, check_can_show, check_device,  # noqa: E402
                          check_output_path, library_of, load_config, run_tool)
from davit_mm.fileio import is_url, resolve_checkpoint  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('image', help='an image file or a folder of images')
    parser.add_argument('config', help='the model config (mmdet or mmseg)')
    parser.add_argument('checkpoint', help='a trained checkpoint (a file or an http(s) URL)')
    parser.add_argument('--out-dir', default='outputs/demo', help='where drawn predictions go')
    parser.add_argument('--device', default='cuda:0' if torch.cuda.is_available() else 'cpu',
                        help='device, e.g. cpu or cuda:0 (default: cuda:0 when available)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: boxes below this score are not drawn')
    parser.add_argument('--show', action='store_true',
                        help='also display each drawing in a window until a key is pressed')
    return parser.parse_args(argv)


def check_inputs(image: str, checkpoint: str, device: str, score_thr: float) -> List[str]:
    """The image files to draw (a folder's images: its files of an image suffix, in any case, which
    mmdet's inferencer would skip for an upper-case one), once the arguments are checked."""
    if osp.isdir(image):
        names = sorted(name for name in os.listdir(image)
                       if name.lower().endswith(IMAGE_SUFFIXES) and osp.isfile(osp.join(image, name)))
        if not names:
            raise ValueError(f'image folder {image!r} holds no images ({", ".join(IMAGE_SUFFIXES)})')
        images = [osp.join(image, name) for name in names]
        stems = [osp.splitext(name)[0] for name in names]  # the raw predictions are named by them
        twins = sorted(name for name, stem in zip(names, stems) if stems.count(stem) > 1)
        if twins:
            raise ValueError(f'image folder {image!r}: {", ".join(twins[:4])} would write their predictions '
                             f'to the same files (named after the image without its suffix); rename one')
    elif not osp.isfile(image):
        raise ValueError(f'image {image!r}: no such file or folder')
    else:
        images = [image]
    for path in images:  # the inferencers stop at one with a bare "failed to load image"
        if cv2.imread(path, cv2.IMREAD_COLOR) is None:
            raise ValueError(f'image {path!r} ({osp.getsize(path)} bytes) cannot be read as an '
                             f'image: not an image file, or cut off')
    if not 0 <= score_thr <= 1:  # NaN too: scores are probabilities
        raise ValueError(f'--score-thr {score_thr}: accepted a score from 0 to 1')
    if not (is_url(checkpoint) or osp.isfile(checkpoint)):
        raise ValueError(f'checkpoint={checkpoint!r}: no such file')
    check_device(device)
    # The inferencers read it with mmengine's loader, which fails on an empty, truncated or
    # foreign file with torch's bare unpickling errors.
    read_training_checkpoint(checkpoint)
    return images


def checked_inferencer(base: type, checkpoint: str) -> type:
    """``base`` (an mmdet/mmseg inferencer) loading ``checkpoint`` all or nothing: a whole
    detector/segmentor of the official DaViT code is converted first, and a checkpoint that does
    not fit the config's model is refused (the inferencers would load what fits and go on)."""
    class CheckedInferencer(base):

        def _load_weights_to_model(self, model, loaded, cfg) -> None:
            if loaded is not None:
                loaded, note = adapt_model_checkpoint(model, loaded, checkpoint)
                if note:
                    print(f'davit_mm: {note}')
                check_checkpoint_fits(model, checkpoint, checkpoint=loaded)
            super()._load_weights_to_model(model, loaded, cfg)

    return CheckedInferencer


def named_label_maps(base: type) -> type:
    """``base`` (mmseg's inferencer) saving each label map as ``IMAGE_pred.png``, after the image
    it was predicted for: mmseg numbers them in the order the folder lists its files
    (``00000000_pred.png``, ...), which says nothing of the image and restarts at every run."""
    class NamedLabelMaps(base):

        def postprocess(self, preds, visualization, return_datasample=False, pred_out_dir=''):
            if pred_out_dir and not return_datasample:
                import numpy as np
                from PIL import Image
                os.makedirs(pred_out_dir, exist_ok=True)
                for pred in preds:
                    name = osp.splitext(osp.basename(pred.img_path))[0]
                    labels = pred.pred_sem_seg.numpy().data[0].astype(np.uint8)  # as mmseg saves
                    Image.fromarray(labels).save(osp.join(pred_out_dir, f'{name}_pred.png'))
            return super().postprocess(preds, visualization, return_datasample, pred_out_dir='')

    return NamedLabelMaps


def main(argv=None):
    args = parse_args(argv)
    images = check_inputs(args.image, args.checkpoint, args.device, args.score_thr)
    # A URL: the copy check_inputs downloaded (mmengine's loader would download it again)
    checkpoint = resolve_checkpoint(args.checkpoint)
    check_output_path('--out-dir', args.out_dir, folder=True)
    if args.show:
        check_can_show()
    cfg = load_config(args.config)
    adapt_config_to_machine(cfg, training=False)
    cfg.visualizer.pop('vis_backends', None)  # the inferencers write the images themselves
    if library_of(cfg) == 'mmdet':
        from mmdet.apis import DetInferencer
        inferencer = checked_inferencer(DetInferencer, checkpoint)(
            model=cfg, weights=checkpoint, device=args.device, show_progress=False)
        inferencer(images, out_dir=args.out_dir, pred_score_thr=args.score_thr,
                   no_save_pred=False, show=args.show)
    else:
        from mmseg.apis import MMSegInferencer
        inferencer = named_label_maps(checked_inferencer(MMSegInferencer, checkpoint))(
            model=cfg, weights=checkpoint, device=args.device)
        inferencer(images, out_dir=args.out_dir, show=args.show)
    print(f'drawn predictions of {len(images)} image(s): {osp.join(args.out_dir, "vis")}')


if __name__ == '__main__':
    with compat.runner_checkpoints_readable():  # the inferencers read checkpoints with mmengine's loader
        sys.exit(run_tool(main))
