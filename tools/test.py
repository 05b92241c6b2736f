"""Evaluate a davit_mm detector (COCO bbox/segm mAP) or segmentor (mIoU).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out OUT] [--show-dir DIR]
                         [--show [--wait-time SECONDS]] [--tta] [--cfg-options KEY=VALUE ...]
                         [--launcher ...]

``--out``: mmdet configs dump raw predictions to OUT (a .pkl file); mmseg configs write the
predicted label maps into the folder OUT. ``--show-dir``: every image's predictions are drawn,
by every process of a distributed run (mmdet: into WORK_DIR/TIMESTAMP/SHOW_DIR; mmseg: into
SHOW_DIR/vis_data/vis_image). ``--show``: each image's predictions are displayed in a window for
``--wait-time`` seconds (2; 0 waits for a key), which needs a display.
``--tta``: test-time augmentation from the config's ``tta_model``/``tta_pipeline`` (davit_mm's
configs: segmentation the official --aug-test, 6 scales x flip; detection 3 scales x flip).
CHECKPOINT may also be a whole detector/segmentor released with the official DaViT code (mmdet 2.11 /
mmseg 0.11): it is converted in memory (docs/model_zoo.md).
"""
import argparse
import math
import os.path as osp
import sys
from typing import Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from davit_mm.checkpoint import check_checkpoint_fits  # noqa: E402
from davit_mm.checks import check_tta_num_classes, preflight  # noqa: E402
from davit_mm.cli import (add_launch_arguments, build_runner, check_can_show,  # noqa: E402
                          check_output_path, draw_on_every_process, enable_tta, library_of,
                          load_config, parse_launch_arguments, run_guarded, run_tool)
from davit_mm.fileio import is_url  # noqa: E402


# What mmdet's and mmseg's own tools/test.py default to.
DEFAULT_WAIT_TIME = 2.


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test a davit_mm detector or segmentor')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file, or an http(s) URL (downloaded once, cached)')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument('--out', help='mmdet: .pkl file for raw predictions; mmseg: a folder for '
                                      'predicted label maps')
    parser.add_argument('--show-dir', help='draw every image\'s predictions (mmdet: into '
                                           'WORK_DIR/TIMESTAMP/SHOW_DIR; mmseg: into '
                                           'SHOW_DIR/vis_data/vis_image)')
    parser.add_argument('--show', action='store_true',
                        help='display every image\'s predictions in a window (needs a display)')
    parser.add_argument('--wait-time', type=float,
                        help=f'with --show: seconds each image stays up, 0 until a key is pressed '
                             f'(default: {DEFAULT_WAIT_TIME:g})')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    add_launch_arguments(parser)
    return parse_launch_arguments(parser, argv)


def check_show(args, library: str) -> None:
    """``--show`` and ``--wait-time`` make sense together, and where a window can open."""
    if args.wait_time is not None and not args.show:
        raise ValueError(f'--wait-time {args.wait_time:g} applies to --show only')
    if not args.show:
        return
    if args.wait_time is not None and not (math.isfinite(args.wait_time) and args.wait_time >= 0):
        raise ValueError(f'--wait-time {args.wait_time:g}: accepted seconds >= 0 (0: until a key '
                         f'is pressed)')
    if library == 'mmseg' and args.show_dir:
        raise ValueError('--show with --show-dir: mmseg\'s visualization hook then drops the '
                         'visualizer\'s file backends and --show-dir would stay empty; give one')
    check_can_show()


def enable_drawing(cfg, library: str, show_dir: Optional[str] = None,
                   wait_time: Optional[float] = None) -> None:
    """Draw every test image's predictions: into files with ``show_dir``, where each library's
    tools put them (mmdet's hook writes WORK_DIR/TIMESTAMP/SHOW_DIR/NAME.jpg, mmseg's visualizer
    SHOW_DIR/vis_data/vis_image/test_NAME.png), and in a window for ``wait_time`` seconds when
    it is not None. mmseg's hook draws every ``interval``-th batch only, 50 by default: set to 1."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        option = '--show-dir' if show_dir else '--show'
        raise ValueError(f'{option}: the config has no default_hooks.visualization')
    hook['draw'] = True
    if library == 'mmseg':
        hook['interval'] = 1
    if show_dir and library == 'mmdet':
        hook['test_out_dir'] = show_dir
    elif show_dir:
        cfg.visualizer['save_dir'] = show_dir
    if wait_time is not None:
        hook['show'] = True
        hook['wait_time'] = wait_time


def main(argv=None):
    args = parse_args(argv)
    if not (is_url(args.checkpoint) or osp.isfile(args.checkpoint)):
        raise ValueError(f'checkpoint={args.checkpoint!r}: no such file')
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    library = library_of(cfg)
    check_output_path('work_dir', cfg.work_dir, folder=True)
    if args.out is not None:  # mmseg writes label maps into a folder, mmdet one .pkl file
        if library == 'mmseg' and args.out.endswith(('.pkl', '.pickle', '.json')):
            raise ValueError(f'--out {args.out!r}: mmseg writes its predictions as label-map PNGs into '
                             f'a folder; give a folder (a .pkl file is what mmdet configs write)')
        check_output_path('--out', args.out, folder=library == 'mmseg')
        if library == 'mmdet' and not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out {args.out!r}: mmdet predictions are dumped to a .pkl file')
    if args.show_dir is not None:  # mmdet's hook draws into WORK_DIR/TIMESTAMP/SHOW_DIR
        check_output_path('--show-dir', args.show_dir if library == 'mmseg' or not args.show_dir else
                          osp.join(cfg.work_dir, args.show_dir), folder=True)
    check_show(args, library)
    preflight(cfg, ('test', ))
    cfg.load_from = args.checkpoint
    if args.show_dir or args.show:
        wait_time = DEFAULT_WAIT_TIME if args.wait_time is None else args.wait_time
        enable_drawing(cfg, library, args.show_dir, wait_time if args.show else None)
    if args.tta:
        check_tta_num_classes(cfg)
        enable_tta(cfg, library)
    if args.out and library == 'mmseg':
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True

    runner = build_runner(cfg, training=False)
    check_checkpoint_fits(runner.model, cfg.load_from)  # evaluating a half-loaded model is worthless
    if args.show_dir:
        draw_on_every_process(runner.visualizer)
    if args.out and library == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    with run_guarded(cfg):
        metrics = runner.test()
        del runner  # its DDP wrapper holds the process group: free it before the group goes
    return metrics


if __name__ == '__main__':
    sys.exit(run_tool(main))
