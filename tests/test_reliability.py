"""Reliability: exact resume after a kill, safe checkpoints, and inputs a user's data may hold
(grayscale/RGBA images, images smaller than a window). The tools' refusals of bad arguments, configs
and checkpoints are in tests/test_tools.py."""
import contextlib
import math
import os
import os.path as osp
import re
import shutil
import signal
import subprocess
import sys
import time

import cv2
import pytest
import torch

from davit_mm.checkpoint import read_training_checkpoint
from davit_mm.engine import AtomicLocalBackend
from davit_mm.synthetic import write_coco
from helpers import (CONFIGS, REPO, assert_user_error, load_tool, losses, run_tool,
                     save_runner_checkpoint, write_datasets)

RETINANET = osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py')
UPERNET = osp.join(CONFIGS, 'quickstart', 'upernet_davit_mini_synthetic_ade20k.py')
MASKRCNN = osp.join(CONFIGS, 'quickstart', 'davit_mini_maskrcnn_synthetic_coco.py')
# Drop path on (torch's generator), random resize/flip on (numpy's), evaluation in between.
DET_RUN = ['--cfg-options', 'model.backbone.drop_path_rate=0.2', 'train_cfg.max_epochs=6',
           'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=1',
           'default_hooks.checkpoint.max_keep_ckpts=10']
SEG_RUN = ['--cfg-options', 'model.backbone.drop_path_rate=0.2', 'train_cfg.max_iters=24',
           'train_cfg.val_interval=8', 'param_scheduler.1.end=24', 'default_hooks.checkpoint.interval=4',
           'default_hooks.checkpoint.max_keep_ckpts=10']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_datasets(tmp_path_factory.mktemp('reliability'),
                          coco=dict(num_train=16, num_val=4, seed=3),
                          ade20k=dict(num_train=8, num_val=2, seed=4))


def train_killed_after(config, work, args, cwd, checkpoint_name, processes=None, env=None):
    """Start tools/train.py (tools/dist_train.sh with ``processes``) and SIGKILL it, with every
    process it started, as soon as ``checkpoint_name`` exists."""
    command = ([sys.executable, osp.join(REPO, 'tools', 'train.py'), config] if processes is None else
               ['bash', osp.join(REPO, 'tools', 'dist_train.sh'), config, str(processes)])
    process = subprocess.Popen(command + ['--work-dir', str(work)] + args, cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **(env or {})))
    deadline = time.time() + 300
    while not (work / checkpoint_name).exists():
        assert process.poll() is None, 'training ended before the checkpoint to kill after'
        assert time.time() < deadline, 'timed out waiting for the checkpoint'
        time.sleep(0.05)
    # torchrun starts its workers in sessions of their own: kill the whole tree, children first
    for pid in reversed([process.pid] + load_tool('analysis/gpu_suite.py').descendants(process.pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def assert_identical_checkpoints(path_a, path_b):
    a, b = read_training_checkpoint(path_a), read_training_checkpoint(path_b)
    assert a['meta']['epoch'] == b['meta']['epoch'] and a['meta']['iter'] == b['meta']['iter']
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), f'weights differ: {key}'
    states_a, states_b = a['optimizer']['state'], b['optimizer']['state']
    assert states_a.keys() == states_b.keys()
    for index in states_a:
        for name, value in states_a[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(states_b[index][name])), (index, name)
    assert a['param_schedulers'] == b['param_schedulers']


def assert_resume_is_exact(data_dir, name, config, args, last, kill_after, resumed='resumed',
                           processes=None, ports=(None, None, None)):
    """Train ``config`` straight through to ``last``; train it again, killed once ``kill_after`` is
    written, and resume it to ``last``: both ``last`` checkpoints must be identical. With
    ``processes``, every run goes through tools/dist_train.sh, on ``ports`` (straight, killed,
    resumed). ``resumed`` is what the resumed run must print."""
    def train(work, port, *extra):
        tool = ['train.py', config] if processes is None else ['dist_train.sh', config, str(processes)]
        return run_tool(tool + ['--work-dir', work, *extra] + args, cwd=data_dir,
                        env=None if port is None else {'PORT': port})

    straight, killed = data_dir / f'{name}_straight', data_dir / f'{name}_killed'
    train(straight, ports[0])
    train_killed_after(config, killed, args, data_dir, kill_after, processes=processes,
                       env=None if ports[1] is None else {'PORT': ports[1]})
    assert not (killed / last).exists()
    result = train(killed, ports[2], '--resume')
    # torchrun's workers log to stderr; a single train.py logs to stdout
    assert resumed in (result.stdout if processes is None else result.stdout + result.stderr)
    assert_identical_checkpoints(straight / last, killed / last)


@pytest.mark.slow
@pytest.mark.parametrize('task', ['detector', 'segmentor'])
def test_killed_and_resumed_run_ends_identical_to_an_uninterrupted_one(data_dir, task):
    config, args, last, kill_after = (
        (RETINANET, DET_RUN, 'epoch_6.pth', 'epoch_2.pth') if task == 'detector' else
        (UPERNET, SEG_RUN, 'iter_24.pth', 'iter_8.pth'))
    assert_resume_is_exact(data_dir, task, config, args, last, kill_after)


# The paper configs' data loading: two workers that live across epochs.
WORKERS = ['train_dataloader.num_workers=2', 'train_dataloader.persistent_workers=True']


@pytest.mark.slow
def test_resume_is_exact_with_persistent_data_loader_workers(data_dir):
    """An iteration-based run (the segmentor's infinite sampler) in one process; the epoch-based
    detector with the same workers: test_resume_is_exact_with_two_gloo_processes_and_persistent_workers."""
    args = (SEG_RUN[:2] + ['train_cfg.max_iters=12', 'train_cfg.val_interval=12', 'param_scheduler.1.end=12',
                           'train_dataloader.batch_size=2'] + SEG_RUN[5:] + WORKERS)
    assert_resume_is_exact(data_dir, 'segmentor_workers', UPERNET, args, 'iter_12.pth', 'iter_4.pth')


@pytest.mark.slow
def test_resume_is_exact_for_mask_rcnn_whose_ranks_draw_differently(data_dir):
    """Mask R-CNN's RoI samplers draw a data-dependent number of times on each rank, so the ranks'
    generators drift apart; rank 0 alone writes checkpoints. Seeding every iteration from
    (seed, rank, iteration) makes the resumed ranks draw as the uninterrupted ones."""
    args = DET_RUN[:2] + ['train_cfg.max_epochs=2'] + DET_RUN[3:]
    assert_resume_is_exact(data_dir, 'dist_maskrcnn', MASKRCNN, args, 'epoch_2.pth', 'epoch_1.pth',
                           resumed='resumed epoch: 1', processes=2, ports=('29624', '29625', '29626'))


@pytest.mark.slow
@pytest.mark.parametrize('how', [['--resume'], ['resume=True']])
def test_resume_keeps_the_runs_seed_where_the_config_sets_none(data_dir, how):
    """The paper configs set no seed (a random one per run): the resumed run takes the seed of the
    run it continues before its data loader is built (mmengine restores it only afterwards,
    and the sampler shuffled with the new run's). ``resume=True`` without ``load_from`` (mmengine's
    auto-resume, in a config or --cfg-options) went to mmengine untouched: another seed, and a
    KeyError traceback on a weights-only file in the work dir."""
    args = DET_RUN[:2] + ['train_cfg.max_epochs=2', 'randomness.seed=None'] + DET_RUN[3:]
    first, again = data_dir / 'seedless', data_dir / f'seedless_again_{how[0][-4:]}'
    if not (first / 'epoch_2.pth').exists():
        run_tool(['train.py', RETINANET, '--work-dir', first] + args, cwd=data_dir)
    again.mkdir()
    shutil.copy(first / 'epoch_1.pth', again / 'epoch_1.pth')
    torch.save({'state_dict': {}}, again / 'epoch_5.pth')  # weights only: skipped, named
    flag, options = (how, []) if how[0].startswith('--') else ([], how)
    result = run_tool(['train.py', RETINANET, '--work-dir', again] + flag + args + options, cwd=data_dir)
    assert 'resumed epoch: 1' in result.stdout
    assert f'not resuming from {again / "epoch_5.pth"}' in result.stdout + result.stderr
    seeds = [read_training_checkpoint(str(d / 'epoch_2.pth'))['meta']['seed'] for d in (first, again)]
    assert seeds[0] == seeds[1] is not None
    assert_identical_checkpoints(first / 'epoch_2.pth', again / 'epoch_2.pth')


@pytest.mark.slow
def test_resume_is_exact_with_two_gloo_processes_and_persistent_workers(data_dir):
    args = DET_RUN[:2] + ['train_cfg.max_epochs=3'] + DET_RUN[3:] + WORKERS
    assert_resume_is_exact(data_dir, 'dist_workers', RETINANET, args, 'epoch_3.pth', 'epoch_1.pth',
                           resumed='resumed epoch: 1', processes=2, ports=('29621', '29622', '29623'))


@pytest.mark.slow
def test_resume_without_any_checkpoint_starts_cleanly(data_dir):
    """From scratch, or from the config's load_from (a preemptible fine-tuning run always given
    --resume: its first start dropped load_from and trained from the backbone's weights)."""
    work = data_dir / 'fresh'
    result = run_tool(['train.py', RETINANET, '--work-dir', work, '--resume', '--cfg-options',
                       'train_cfg.max_epochs=1', 'train_cfg.val_interval=1'], cwd=data_dir)
    assert f'no checkpoint in {work}, starting from scratch' in result.stdout
    assert (work / 'epoch_1.pth').exists()
    again = run_tool(['train.py', RETINANET, '--work-dir', work, '--resume', '--cfg-options',
                      'train_cfg.max_epochs=1', 'train_cfg.val_interval=1'], cwd=data_dir)
    assert (f'--resume: {work / "epoch_1.pth"} is at epoch 1 of train_cfg.max_epochs=1: nothing is left to '
            f'train (raise train_cfg.max_epochs to train on)') in again.stdout  # it exited 0 without a word
    by_config = run_tool(['train.py', RETINANET, '--work-dir', work, '--cfg-options', 'resume=True',
                          'train_cfg.max_epochs=1', 'train_cfg.val_interval=1'], cwd=data_dir)
    assert f'resume=True: {work / "epoch_1.pth"} is at epoch 1' in by_config.stdout  # not "--resume"
    tuned = data_dir / 'fresh_finetuned'
    result = run_tool(['train.py', RETINANET, '--work-dir', tuned, '--resume', '--cfg-options',
                       f'load_from={work / "epoch_1.pth"}', 'optim_wrapper.optimizer.lr=0',
                       'optim_wrapper.optimizer.weight_decay=0', 'train_cfg.max_epochs=1',
                       'train_cfg.val_interval=5'], cwd=data_dir)
    assert f'no checkpoint in {tuned} yet, starting from load_from={work / "epoch_1.pth"}' in result.stdout
    loaded, trained = (read_training_checkpoint(str(d / 'epoch_1.pth'))['state_dict'] for d in (work, tuned))
    assert all(torch.equal(loaded[k], trained[k]) for k in loaded)  # lr 0: what load_from gave


@pytest.mark.slow
def test_auto_resume_skips_a_truncated_latest_checkpoint_and_names_it(data_dir):
    work = data_dir / 'truncated'
    run_tool(['train.py', RETINANET, '--work-dir', work, '--cfg-options', 'train_cfg.max_epochs=2',
              'train_cfg.val_interval=5', 'default_hooks.checkpoint.interval=1'], cwd=data_dir)
    latest = work / 'epoch_2.pth'
    latest.write_bytes(latest.read_bytes()[:100000])  # as another writer killed mid-save leaves it
    # the work dir spelt relatively: last_checkpoint names the same file by its absolute path
    result = run_tool(['train.py', RETINANET, '--work-dir', work.name, '--resume', '--cfg-options',
                       'train_cfg.max_epochs=3', 'train_cfg.val_interval=5',
                       'default_hooks.checkpoint.interval=1'], cwd=data_dir)
    output = result.stdout + result.stderr
    assert output.count('not resuming from') == 1  # one warning, not one per spelling of the path
    assert f'not resuming from {latest}' in output and 'corrupt or truncated' in output
    assert f'resuming from {work / "epoch_1.pth"}, the newest complete checkpoint' in output
    assert 'resumed epoch: 1' in output
    truncated = work / 'truncated.pth'
    truncated.write_bytes(latest.read_bytes()[:100000])
    explicit = run_tool(['train.py', RETINANET, '--work-dir', work, '--resume', str(truncated)],
                        cwd=data_dir, expect_ok=False)
    assert_user_error(explicit, 'corrupt or truncated')


@pytest.mark.parametrize('how', [['--resume', 'weights.pth'],
                                 ['--cfg-options', 'resume=True', 'load_from=weights.pth']])
def test_resume_from_a_weights_only_file_is_refused_saying_to_use_load_from(tmp_path, how):
    """mmengine's resume stopped with KeyError: 'meta' after building everything."""
    write_datasets(tmp_path, coco=dict(num_train=1, num_val=1, seed=4))
    save_runner_checkpoint(RETINANET, tmp_path / 'trained.pth', ('a', 'b', 'c'))
    checkpoint = torch.load(tmp_path / 'trained.pth', weights_only=False)
    torch.save({'state_dict': checkpoint['state_dict']}, tmp_path / 'weights.pth')
    result = run_tool(['train.py', RETINANET, '--work-dir', tmp_path / 'work'] + how, cwd=tmp_path,
                      expect_ok=False)
    assert_user_error(result, "checkpoint 'weights.pth' cannot be resumed from: it has no 'meta', "
                              "'message_hub'", '--cfg-options load_from=weights.pth')
    assert not (tmp_path / 'work').exists() or not list((tmp_path / 'work').rglob('*.log'))


def test_what_a_resume_needs_and_what_it_would_start_afresh():
    from davit_mm.checkpoint import CheckpointError, check_resumable
    whole = {'meta': {'epoch': 3, 'iter': 12}, 'message_hub': {}, 'state_dict': {},
             'optimizer': {}, 'param_schedulers': []}
    assert check_resumable(whole, 'a.pth') == []
    assert check_resumable({k: v for k, v in whole.items() if k != 'optimizer'}, 'a.pth') == ['optimizer']
    for broken, missing in (({**whole, 'meta': {'epoch': 3}}, "meta['iter']"),
                            ({**whole, 'meta': {'epoch': True, 'iter': 12}}, "meta['epoch']"),
                            ({**whole, 'message_hub': None}, "'message_hub'")):
        with pytest.raises(CheckpointError, match=re.escape(f'it has no {missing},')):
            check_resumable(broken, 'a.pth')


def test_resuming_a_backbone_file_points_at_init_cfg_not_load_from(tiny_arch):
    """convert_checkpoint.py writes a backbone alone, which load_from refuses in turn: the advice
    to use load_from led from one error to the next."""
    from davit_mm.checkpoint import CheckpointError, check_resumable
    from davit_mm.models import DaViT
    backbone = {'state_dict': DaViT(tiny_arch).state_dict(), 'meta': {'source_format': 'timm'}}
    with pytest.raises(CheckpointError, match=re.escape(
            "(this one holds the weights of a DaViT backbone alone); to train from its weights, start a "
            "new run with init_cfg (--cfg-options model.backbone.init_cfg.checkpoint=bb.pth) instead")):
        check_resumable(backbone, 'bb.pth')
    detector = {'state_dict': {**{f'backbone.{k}': v for k, v in backbone['state_dict'].items()},
                               'neck.conv.weight': torch.zeros(1)}}
    with pytest.raises(CheckpointError, match=re.escape('(this one holds model weights); to train from its '
                                                        'weights, start a new run with load_from')):
        check_resumable(detector, 'model.pth')


def test_resume_falls_back_to_the_newest_complete_checkpoint_of_a_relative_work_dir(tmp_path, monkeypatch):
    from davit_mm.checkpoint import latest_valid_checkpoint
    work = tmp_path / 'work'
    work.mkdir()
    for epoch in (1, 2, 10, 11):
        torch.save({'meta': {'epoch': epoch, 'iter': 4 * epoch}, 'message_hub': {},
                    'state_dict': {'w': torch.ones(64)}}, work / f'epoch_{epoch}.pth')
    (work / 'epoch_11.pth').write_bytes((work / 'epoch_11.pth').read_bytes()[:300])  # killed mid-save
    (work / 'last_checkpoint').write_text(str(work / 'epoch_11.pth'))  # mmengine writes it absolute
    torch.save({'state_dict': {'w': torch.ones(64)}}, work / 'epoch_12.pth')  # weights only
    # mmengine's best checkpoints hold no optimizer or scheduler: resuming one replayed the warmup
    torch.save({'meta': {'epoch': 20, 'iter': 80}, 'message_hub': {}, 'state_dict': {'w': torch.ones(64)}},
               work / 'best_coco_bbox_mAP_epoch_20.pth')
    monkeypatch.chdir(tmp_path)
    path, content = latest_valid_checkpoint('work')
    assert path == str(work / 'epoch_10.pth') and content['meta']['epoch'] == 10  # 10 > 2: by number
    (work / 'epoch_12.pth').unlink()
    for name in ('epoch_1.pth', 'epoch_2.pth', 'epoch_10.pth'):
        (work / name).write_bytes(b'')
    assert latest_valid_checkpoint('work') is None


def test_resume_in_a_copied_work_dir_takes_its_own_checkpoint_not_the_originals(tmp_path):
    """last_checkpoint holds an absolute path: in a copy of a work dir (a forked experiment, a
    run moved to another cluster) it names the original's file, which may since have changed."""
    from davit_mm.checkpoint import latest_valid_checkpoint
    original, copy, elsewhere = tmp_path / 'exp1', tmp_path / 'exp2', tmp_path / 'out' / 'exp3'
    for work, value in ((original, 1.0), (copy, 2.0), (elsewhere, 3.0)):
        work.mkdir(parents=True)
        torch.save({'meta': {'epoch': 2, 'iter': 8}, 'message_hub': {},
                    'state_dict': {'w': torch.full((4,), value)}}, work / 'epoch_2.pth')
    (copy / 'last_checkpoint').write_text(str(original / 'epoch_2.pth'))
    path, content = latest_valid_checkpoint(str(copy))
    assert path == str(copy / 'epoch_2.pth') and content['state_dict']['w'][0] == 2.0
    # CheckpointHook(out_dir=...) saves outside the work dir and points there: that is followed
    (elsewhere / 'epoch_2.pth').rename(elsewhere / 'epoch_3.pth')
    (copy / 'last_checkpoint').write_text(str(elsewhere / 'epoch_3.pth'))
    path, content = latest_valid_checkpoint(str(copy))
    assert path == str(elsewhere / 'epoch_3.pth') and content['state_dict']['w'][0] == 3.0


def test_atomic_backend_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / 'epoch_1.pth'
    backend = AtomicLocalBackend()
    backend.put(b'complete checkpoint', target)
    assert target.read_bytes() == b'complete checkpoint'

    def fail(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(os, 'fsync', fail)  # the write dies after some bytes went out
    with pytest.raises(OSError, match='disk full'):
        backend.put(b'a newer checkpoint', target)
    assert target.read_bytes() == b'complete checkpoint'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch_1.pth']


@pytest.mark.parametrize('umask', [0o022, 0o002, 0o077])
def test_atomic_backend_gives_checkpoints_the_mode_a_plain_open_would(tmp_path, umask):
    old = os.umask(umask)
    try:
        AtomicLocalBackend().put(b'checkpoint', tmp_path / 'epoch_1.pth')
        with open(tmp_path / 'plain.pth', 'wb') as f:
            f.write(b'checkpoint')
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / 'epoch_1.pth').st_mode & 0o777
    assert mode == os.stat(tmp_path / 'plain.pth').st_mode & 0o777 == 0o666 & ~umask


def test_davit_configs_write_checkpoints_atomically_and_keep_random_state():
    from mmengine.config import Config
    for config in (RETINANET, UPERNET, osp.join(CONFIGS, 'davit_maskrcnn_3x_coco.py'),
                   osp.join(CONFIGS, 'upernet_davit_512x512_160k_ade20k.py')):
        cfg = Config.fromfile(config)
        assert cfg.default_hooks.checkpoint.backend_args == dict(backend='davit_mm_atomic')
        assert dict(type='RandomStateHook') in cfg.custom_hooks


@pytest.mark.slow
def test_grayscale_and_rgba_images_train_and_evaluate(tmp_path):
    root = tmp_path / 'data' / 'synthetic_coco'
    write_coco(str(root), num_train=4, num_val=2, seed=6)
    for split, convert in (('train2017', cv2.COLOR_BGR2GRAY), ('val2017', cv2.COLOR_BGR2BGRA)):
        for name in os.listdir(root / split):
            image = cv2.imread(str(root / split / name))
            png = (root / split / name).with_suffix('.png')
            cv2.imwrite(str(png), cv2.cvtColor(image, convert))
            os.remove(root / split / name)
    for ann in (root / 'annotations').iterdir():
        ann.write_text(ann.read_text().replace('.jpg', '.png'))
    assert cv2.imread(str(next((root / 'val2017').iterdir())), cv2.IMREAD_UNCHANGED).shape[2] == 4
    work = tmp_path / 'w'
    run_tool(['train.py', RETINANET, '--work-dir', work, '--cfg-options', 'train_cfg.max_epochs=1',
              'train_cfg.val_interval=1', 'default_hooks.logger.interval=1'], cwd=tmp_path)
    assert losses(str(work)) and all(math.isfinite(v) for v in losses(str(work)))
    result = run_tool(['test.py', RETINANET, work / 'epoch_1.pth'], cwd=tmp_path)
    # both RGBA validation images evaluated (one batch of 2; one epoch on 4 images leaves the
    # detector no box above its score threshold, so there is no mAP to compare)
    assert 'Epoch(test) [1/1]' in result.stdout


@pytest.mark.parametrize('height,width', [(20, 24), (9, 5)])
def test_images_smaller_than_one_window_run_through_a_detector(height, width):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    from mmdet.structures import DetDataSample
    init_default_scope('mmdet')
    model = MODELS.build(Config.fromfile(RETINANET).model).eval()
    image = torch.randint(0, 255, (3, height, width), dtype=torch.uint8)
    sample = DetDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width),
                                         scale_factor=(1., 1.)))
    with torch.no_grad():
        result, = model.test_step(dict(inputs=[image], data_samples=[sample]))
    boxes, scores = result.pred_instances.bboxes, result.pred_instances.scores
    assert len(boxes) > 0 and boxes.shape[1] == 4 and torch.isfinite(scores).all()
    # boxes are clipped to the image
    assert (boxes >= -1e-3).all()
    assert (boxes[:, 2] <= width + 1e-3).all() and (boxes[:, 3] <= height + 1e-3).all()


def test_attributes_set_on_the_position_seeded_dataset_reach_the_wrapped_one():
    """mmdet's PipelineSwitchHook sets ``train_dataloader.dataset.pipeline``; under davit_mm's
    tools that dataset is the wrapper, and the new pipeline stayed there unused."""
    from types import SimpleNamespace

    from davit_mm.engine import PositionSeededDataset
    inner = SimpleNamespace(pipeline='old', metainfo={'classes': ('a', )})
    wrapped = PositionSeededDataset(inner)
    wrapped.pipeline = 'new'
    assert inner.pipeline == 'new' and wrapped.pipeline == 'new' and wrapped.dataset is inner


def test_atomic_backend_writes_through_a_symbolic_link_as_a_plain_open_would(tmp_path):
    target = tmp_path / 'store' / 'epoch_1.pth'
    target.parent.mkdir()
    target.write_bytes(b'old')
    link = tmp_path / 'epoch_1.pth'
    link.symlink_to(target)
    AtomicLocalBackend().put(b'new', str(link))
    assert link.is_symlink() and target.read_bytes() == b'new'
    assert sorted(p.name for p in target.parent.iterdir()) == ['epoch_1.pth']  # no temporary left


def _validate_with_rank_own_bn_statistics(rank, store, results):
    import torch.distributed as dist

    from davit_mm.engine import RandomStateHook
    dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        model.train()
        model(torch.randn(2, 3, 5, 5) + rank)  # each rank's running statistics of its own data
        own = model[1].running_mean.clone()
        runner = type('Runner', (), {'model': model})()
        RandomStateHook().before_val_epoch(runner)
        results[rank] = (own, model[1].running_mean.clone(), model[1].running_var.clone())
    finally:
        dist.destroy_process_group()


def test_validation_scores_rank_0s_buffers_on_every_rank(tmp_path):
    """With plain BN (davit_mm's UperNet heads) each rank of a distributed run keeps running
    statistics of its own data, and rank 0's are what checkpoints hold: an in-training validation
    of 2 gloo processes reported mIoU 13.88 (13.69 after a resume from the middle of the same run)
    for a checkpoint that tools/test.py scores 13.33. Validation now runs rank 0's buffers on
    every rank."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_validate_with_rank_own_bn_statistics, args=(str(tmp_path / 'store'), results), nprocs=2)
    (own0, mean0, var0), (own1, mean1, var1) = results[0], results[1]
    assert not torch.equal(own0, own1)  # they had drawn apart
    assert torch.equal(mean0, own0) and torch.equal(mean1, own0) and torch.equal(var1, var0)
