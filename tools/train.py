"""Train a davit_mm detector (mmdet config) or segmentor (mmseg config).

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--auto-scale-lr] [--resume [CKPT]]
                          [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]

The library is picked from the config's ``default_scope``. Multi-GPU: tools/dist_train.sh;
slurm: tools/slurm_train.sh.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from davit_mm.checkpoint import (check_checkpoint_fits, check_resumable,  # noqa: E402
                                 latest_valid_checkpoint, read_training_checkpoint)
from davit_mm.checks import preflight  # noqa: E402
from davit_mm.cli import (add_launch_arguments, build_runner, check_output_path,  # noqa: E402
                          load_config, parse_launch_arguments, run_guarded, run_tool)
from davit_mm.engine import seed_samples_by_position  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a davit_mm detector or segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by total batch size / auto_scale_lr.base_batch_size')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from CKPT, or without a value from the latest checkpoint in '
                             "the work dir (when there is none: a fresh start, from the config's "
                             'load_from if it names one)')
    add_launch_arguments(parser)
    return parse_launch_arguments(parser, argv)


def keep_the_runs_seed(cfg, checkpoint: dict) -> None:
    """A resumed run takes the seed of the run it continues where the config sets none (the paper
    configs, as mmdet's and mmseg's: a random seed per run). mmengine restores that seed only
    after it has built the data loader, whose sampler then shuffles with the new run's seed."""
    seed = (checkpoint.get('meta') or {}).get('seed')
    randomness = cfg.setdefault('randomness', {})
    if seed is not None and randomness.get('seed') is None:
        cfg.randomness = dict(randomness, seed=int(seed))


def say_when_nothing_is_left(cfg, checkpoint: dict, option: str) -> None:
    """A run resumed (by ``option``) at or past its schedule's end trains nothing and exits 0
    (mmengine's loop just ends): say so, and which setting would let it train on."""
    train_cfg = cfg.get('train_cfg') or {}
    for key, reached in (('max_epochs', 'epoch'), ('max_iters', 'iter')):
        done, total = checkpoint['meta'][reached], train_cfg.get(key)
        if isinstance(total, int) and done >= total:
            print(f'{option}: {cfg.load_from} is at {reached} {done} of train_cfg.{key}={total}: '
                  f'nothing is left to train (raise train_cfg.{key} to train on)')
            return


def skip_pretrained_init(cfg, option: str) -> None:
    """A resumed run takes every weight from its checkpoint (which must fit the model exactly),
    but mmengine initialises the model before loading it: the backbone's pretrained checkpoint
    would be read only to be overwritten, and downloaded where this node's cache lacks it (on an
    offline node the resume stopped there)."""
    backbone = (cfg.get('model') or {}).get('backbone')
    init_cfg = backbone.get('init_cfg') if isinstance(backbone, dict) else None
    if isinstance(init_cfg, dict) and init_cfg.get('type') == 'Pretrained':
        backbone['init_cfg'] = None
        print(f"{option}: every weight comes from {cfg.load_from}; the backbone's pretrained "
              f"checkpoint ({init_cfg.get('checkpoint')}) is not read")


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    check_output_path('work_dir', cfg.work_dir, folder=True)

    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if not isinstance(cfg.get('auto_scale_lr'), dict) or 'base_batch_size' not in cfg.auto_scale_lr:
            raise ValueError(f'--auto-scale-lr: {args.config} has no auto_scale_lr.base_batch_size '
                             f"(auto_scale_lr={cfg.get('auto_scale_lr')!r})")
        cfg.auto_scale_lr.enable = True
    if cfg.get('load_from') == '':
        raise ValueError("load_from='': give a checkpoint's path or URL, or None to start from the "
                         "backbone's init_cfg")
    preflight(cfg, ('train', 'val'))
    checkpoint = None  # the content of load_from, when already read
    option = '--resume' if args.resume is not None else 'resume=True'  # what asked to resume
    # resume=True without load_from (in the config or --cfg-options) is mmengine's "resume from
    # the latest checkpoint in the work dir": --resume without a path.
    if args.resume == 'auto' or (args.resume is None and cfg.get('resume') and not cfg.get('load_from')):
        latest = latest_valid_checkpoint(cfg.work_dir) if osp.isdir(cfg.work_dir) else None
        cfg.resume = latest is not None
        if latest is not None:
            cfg.load_from, checkpoint = latest
        elif cfg.get('load_from'):  # a fine-tuning run's first start
            print(f'{option}: no checkpoint in {cfg.work_dir} yet, starting from load_from='
                  f'{cfg.load_from}')
        else:
            print(f'{option}: no checkpoint in {cfg.work_dir}, starting from scratch')
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
        checkpoint = read_training_checkpoint(args.resume)
    lacking = []  # what the resumed run starts afresh
    if cfg.get('resume') and cfg.get('load_from'):  # --resume, or resume = True in the config
        if checkpoint is None:
            checkpoint = read_training_checkpoint(cfg.load_from)
        lacking = check_resumable(checkpoint, cfg.load_from)
        keep_the_runs_seed(cfg, checkpoint)
        say_when_nothing_is_left(cfg, checkpoint, option)
        skip_pretrained_init(cfg, option)

    seed_samples_by_position(cfg)  # exact resumes whatever the data loader's workers
    runner = build_runner(cfg)
    if cfg.get('load_from'):
        # Resuming needs the exact model; fine-tuning (load_from) may change num_classes. This also
        # stops missing, truncated and corrupt files with a clear message.
        note = check_checkpoint_fits(runner.model, cfg.load_from, allow_class_mismatch=not cfg.resume,
                                     checkpoint=checkpoint)
        if note:
            runner.logger.warning(f'load_from: {note}')
        if lacking:
            runner.logger.warning(f'{option}: {cfg.load_from} has no {" and no ".join(lacking)}: '
                                  f'the resumed run starts them afresh')
    with run_guarded(cfg):
        runner.train()
        del runner  # its DDP wrapper holds the process group: free it before the group goes


if __name__ == '__main__':
    sys.exit(run_tool(main))
