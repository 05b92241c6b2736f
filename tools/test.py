"""Evaluate a davit_mm detector (COCO bbox/segm mAP) or segmentor (mIoU).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out OUT] [--show-dir DIR]
                         [--tta] [--cfg-options KEY=VALUE ...] [--launcher ...]

``--out``: mmdet configs dump raw predictions to OUT (a .pkl file); mmseg configs write the
predicted label maps into the folder OUT. ``--show-dir``: every image's predictions are drawn,
by every process of a distributed run (mmdet: into WORK_DIR/TIMESTAMP/SHOW_DIR; mmseg: into
SHOW_DIR/vis_data/vis_image).
``--tta``: test-time augmentation from the config's ``tta_model``/``tta_pipeline`` (davit_mm's
configs: segmentation the official --aug-test, 6 scales x flip; detection 3 scales x flip).
CHECKPOINT may also be a whole detector/segmentor released with the official DaViT code (mmdet 2.11 /
mmseg 0.11): it is converted in memory (docs/model_zoo.md).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from davit_mm.checkpoint import check_checkpoint_fits  # noqa: E402
from davit_mm.checks import preflight  # noqa: E402
from davit_mm.cli import (add_launch_arguments, build_runner, check_output_path,  # noqa: E402
                          draw_on_every_process, enable_tta, library_of, load_config,
                          parse_launch_arguments, run_guarded, run_tool)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test a davit_mm detector or segmentor')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument('--out', help='mmdet: .pkl file for raw predictions; mmseg: a folder for '
                                      'predicted label maps')
    parser.add_argument('--show-dir', help='draw every image\'s predictions (mmdet: into '
                                           'WORK_DIR/TIMESTAMP/SHOW_DIR; mmseg: into '
                                           'SHOW_DIR/vis_data/vis_image)')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    add_launch_arguments(parser)
    return parse_launch_arguments(parser, argv)


def enable_drawing(cfg, library: str, show_dir: str) -> None:
    """Draw every test image's predictions, where each library's tools put them: mmdet's hook
    writes WORK_DIR/TIMESTAMP/SHOW_DIR/NAME.jpg, mmseg's visualizer SHOW_DIR/vis_data/vis_image/
    test_NAME.png (its hook draws every ``interval``-th batch only, 50 by default: set to 1)."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise ValueError('--show-dir: the config has no default_hooks.visualization')
    hook['draw'] = True
    if library == 'mmdet':
        hook['test_out_dir'] = show_dir
    else:
        hook['interval'] = 1
        cfg.visualizer['save_dir'] = show_dir


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        raise ValueError(f'checkpoint={args.checkpoint!r}: no such file')
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    library = library_of(cfg)
    check_output_path('work_dir', cfg.work_dir, folder=True)
    if args.out:  # mmseg writes label maps into a folder, mmdet one .pkl file
        check_output_path('--out', args.out, folder=library == 'mmseg')
    if args.show_dir:  # mmdet's hook draws into WORK_DIR/TIMESTAMP/SHOW_DIR
        check_output_path('--show-dir', args.show_dir if library == 'mmseg' else
                          osp.join(cfg.work_dir, args.show_dir), folder=True)
    preflight(cfg, ('test', ))
    cfg.load_from = args.checkpoint
    if args.show_dir:
        enable_drawing(cfg, library, args.show_dir)
    if args.tta:
        enable_tta(cfg, library)
    if args.out and library == 'mmseg':
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    if args.out and library == 'mmdet' and not args.out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out {args.out!r}: mmdet predictions are dumped to a .pkl file')

    runner = build_runner(cfg, training=False)
    check_checkpoint_fits(runner.model, args.checkpoint)  # evaluating a half-loaded model is worthless
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
