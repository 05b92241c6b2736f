"""The command-line tools' handling of their arguments and configs: --cfg-options and config files
checked before anything runs, configs adapted to the machine (or refused), checkpoints given to
tools/test.py and tools/train.py checked, and the launchers' and demo's refusals."""
import json
import os
import os.path as osp
import subprocess
import sys

import cv2
import pytest
import torch
from mmengine.config import Config

from davit_mm.checkpoint import read_training_checkpoint
from davit_mm.cli import adapt_config_to_machine
from davit_mm.synthetic import write_coco
from helpers import (CONFIGS, REPO, assert_user_error, run_tool, run_tool_in_process,
                     save_runner_checkpoint, write_datasets)

RETINANET = osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py')
MASKRCNN = osp.join(CONFIGS, 'quickstart', 'davit_mini_maskrcnn_synthetic_coco.py')
UPERNET = osp.join(CONFIGS, 'quickstart', 'upernet_davit_mini_synthetic_ade20k.py')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A working directory with data/synthetic_coco, where the quickstart configs look."""
    return write_datasets(tmp_path_factory.mktemp('tools'), coco=dict(num_train=16, num_val=4, seed=3))


# ------------------------------------------------------------------- configs and --cfg-options
@pytest.mark.parametrize('options,message', [
    (['train_dataloader.dataset.data_root=nowhere/'],
     "train_dataloader.dataset.data_root='nowhere/' does not exist"),
    (['train_dataloader.dataset.ann_file=annotations/missing.json'],
     "ann_file='annotations/missing.json'"),
    (['val_dataloader.dataset.data_prefix.img=val_missing/'], "data_prefix.img='val_missing/'"),
    (['model.backbon.arch=small'], "has no key 'backbon'; did you mean backbone"),
    (['model.backbone.arch=tinyy'], "arch='tinyy' is not a known DaViT variant"),
    (['model.bbox_head.num_classes=80'], 'model.bbox_head.num_classes=80 but train_dataloader.dataset has 3 classes'),
    (['model.backbone.out_indices=(1,2,4)'], 'out_indices=(1, 2, 4) has [4] out of range'),
    # mmengine: "error:  can not be found." (no key, no path)
    (["load_from=''"], "load_from='': give a checkpoint's path or URL, or None"),
    # "argument of type 'NoneType' is not iterable"
    (['auto_scale_lr=None', '--auto-scale-lr'], 'auto_scale_lr.base_batch_size (auto_scale_lr=None)'),
])
def test_bad_training_inputs_stop_with_a_message_naming_them(data_dir, options, message):
    flags = [o for o in options if o.startswith('--')]
    options = [o for o in options if o not in flags]
    result = run_tool_in_process(['train.py', RETINANET, '--work-dir', data_dir / 'bad', *flags,
                                  '--cfg-options', *options], cwd=data_dir)
    assert_user_error(result, message)


def _initial_weights(work_dir, options):
    from davit_mm.cli import build_runner, load_config
    cfg = load_config(RETINANET, options, str(work_dir))
    try:
        runner = build_runner(cfg)
        return runner.seed, runner.deterministic, runner.model.state_dict()
    finally:
        torch.use_deterministic_algorithms(False)


def test_seed_and_deterministic_from_cfg_options_reach_the_runner(data_dir, tmp_path):
    seed, deterministic, first = _initial_weights(
        tmp_path, {'randomness.seed': 5, 'randomness.deterministic': True})
    assert (seed, deterministic) == (5, True)
    _, _, again = _initial_weights(tmp_path, {'randomness.seed': 5})
    _, _, other = _initial_weights(tmp_path, {'randomness.seed': 6})
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first['bbox_head.retina_cls.weight'], other['bbox_head.retina_cls.weight'])


@pytest.mark.parametrize('option,message', [
    ('randomness.sed=0', "randomness.sed: randomness accepts ['deterministic', 'diff_rank_seed', 'seed']"),
    ('randomness.seed=abc', "randomness.seed='abc': accepted int or None"),
    # mmengine: "Seed must be between 0 and 2**32 - 1", naming neither option nor value
    ('randomness.seed=-1', 'randomness.seed=-1: accepted 0 to 2**32 - 1, or None'),
    ('randomness.seed=4294967296', 'randomness.seed=4294967296: accepted 0 to 2**32 - 1'),
])
def test_bad_randomness_options_are_refused(data_dir, option, message):
    result = run_tool_in_process(['train.py', RETINANET, '--work-dir', data_dir / 'bad', '--cfg-options',
                                  option], cwd=data_dir)
    assert_user_error(result, message)


def test_a_config_with_a_syntax_error_is_named_with_its_line(data_dir, tmp_path):
    broken = tmp_path / 'broken.py'
    broken.write_text("_base_ = ['" + RETINANET + "']\nmodel = dict(backbone=dict(arch='tiny'\n")
    result = run_tool_in_process(['train.py', broken], cwd=data_dir)
    assert_user_error(result, f"config '{broken}' has a syntax error at line 2: '(' was never closed")


@pytest.mark.slow
def test_an_empty_dataset_is_reported_as_such(data_dir, tmp_path):
    empty = tmp_path / 'data' / 'synthetic_coco'
    write_coco(str(empty), num_train=2, num_val=1, seed=5)
    ann = empty / 'annotations' / 'instances_train2017.json'
    content = json.loads(ann.read_text())
    content['annotations'] = []  # images without objects: filter_empty_gt drops them all
    ann.write_text(json.dumps(content))
    result = run_tool(['train.py', RETINANET, '--work-dir', tmp_path / 'w'], cwd=tmp_path, expect_ok=False)
    assert_user_error(result, 'has no samples')


# ------------------------------------------------------------- configs adapted to the machine
def test_sync_bn_becomes_bn_when_not_distributed():
    cfg = Config(dict(model=dict(decode_head=dict(norm_cfg=dict(type='SyncBN')),
                                 auxiliary_head=[dict(norm_cfg=dict(type='SyncBN'))])))
    notes = adapt_config_to_machine(cfg, launcher='none')
    assert cfg.model.decode_head.norm_cfg.type == 'BN'
    assert cfg.model.auxiliary_head[0].norm_cfg.type == 'BN'
    assert 'SyncBN -> BN in 2 norm configs' in notes[0]


def test_slurm_launcher_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    with pytest.raises(ValueError, match="launcher 'slurm'.*needs CUDA"):
        adapt_config_to_machine(Config(dict(model=dict())), launcher='slurm')


def test_amp_without_a_gpu_is_refused_with_a_clear_message():
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    cfg = Config.fromfile(osp.join(CONFIGS, 'davit_retinanet_1x_coco_amp.py'))
    with pytest.raises(ValueError, match="AmpOptimWrapper.*needs a GPU"):
        adapt_config_to_machine(cfg)


def test_amp_configs_count_test_and_draw_on_a_cpu(tmp_path):
    """Only training uses the AMP optimizer wrapper: get_flops, tools/test.py and the demo never
    build it, and take the *_amp configs as they are (test and demo: the quickstart RetinaNet with
    the *_amp configs' optimizer wrapper)."""
    result = run_tool(['analysis/get_flops.py', osp.join(CONFIGS, 'davit_retinanet_1x_coco_amp.py'),
                       '--shape', '64', '64'], cwd=tmp_path)
    assert 'params: 38.53M' in result.stdout, result.stdout
    write_datasets(tmp_path, coco=dict(num_train=1, num_val=2, seed=3))
    (tmp_path / 'amp.py').write_text(f"_base_ = [{RETINANET!r}]\n"
                                     "optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')\n")
    save_runner_checkpoint(RETINANET, tmp_path / 'model.pth', ('a', 'b', 'c'))
    result = run_tool(['test.py', 'amp.py', 'model.pth'], cwd=tmp_path)
    assert 'Epoch(test) [1/1]' in result.stdout, result.stdout  # the evaluation ran to its end
    run_tool(['../demo/image_demo.py', 'data/synthetic_coco/val2017', 'amp.py', 'model.pth',
              '--device', 'cpu', '--out-dir', 'out'], cwd=tmp_path)
    images = sorted(p.name for p in (tmp_path / 'data' / 'synthetic_coco' / 'val2017').iterdir())
    assert len(images) == 2 and sorted(p.name for p in (tmp_path / 'out' / 'vis').iterdir()) == images


def test_checkpoint_hooks_are_added_to_configs_without_custom_hooks():
    """mmdet's and mmseg's runtimes have no custom_hooks: the hooks must still reach the runner
    (without them tools/test.py and --resume failed on davit_mm's own checkpoints, and a config
    built from the README's blocks resumed with other random draws than an unbroken run)."""
    from davit_mm.cli import add_checkpoint_hooks
    for hooks in (None, [dict(type='RandomStateHook')], [dict(type='RunnerCheckpointsHook')]):
        cfg = Config(dict(model=dict()) if hooks is None else dict(model=dict(), custom_hooks=hooks))
        add_checkpoint_hooks(cfg)
        types = [h['type'] for h in cfg.custom_hooks]
        assert sorted(types) == ['OfficialCheckpointHook', 'RandomStateHook', 'RunnerCheckpointsHook']


@pytest.mark.parametrize('hook, backend', [
    (dict(type='CheckpointHook', interval=1), 'davit_mm_atomic'),
    (dict(type='CheckpointHook', backend_args=dict(backend='petrel')), 'petrel'),  # the user's own
    (dict(type='MyCheckpointHook'), None), (None, None)])
def test_checkpoints_are_written_atomically_where_no_backend_is_named(hook, backend):
    from davit_mm.cli import add_checkpoint_hooks
    cfg = Config(dict(model=dict(), default_hooks=dict(checkpoint=hook)))
    add_checkpoint_hooks(cfg)
    hook = cfg.default_hooks.checkpoint
    assert (hook or {}).get('backend_args', {}).get('backend') == backend


def test_a_config_inheriting_through_the_davit_mm_scope_builds_its_hooks(data_dir, tmp_path):
    """`_base_ = ['davit_mm::...']` (README): mmengine put _scope_='davit_mm' on every dict of
    such a base, and the runner then looked up davit_mm's hooks in mmengine's root registry."""
    config = tmp_path / 'mine.py'
    config.write_text("_base_ = ['davit_mm::quickstart/davit_mini_retinanet_synthetic_coco.py']\n"
                      "train_cfg = dict(max_epochs=1, val_interval=1)\n")
    cfg = Config.fromfile(str(config))

    def scopes(node):
        if isinstance(node, dict):
            return {node.get('_scope_')} | {s for v in node.values() for s in scopes(v)}
        return {s for v in node for s in scopes(v)} if isinstance(node, (list, tuple)) else set()

    assert 'davit_mm' not in scopes(cfg.to_dict())  # what the davit_mm config sets: default_scope
    result = run_tool(['train.py', config, '--work-dir', tmp_path / 'work'], cwd=data_dir)
    assert 'RandomStateHook' in result.stdout + result.stderr
    assert (tmp_path / 'work' / 'epoch_1.pth').exists()


# --------------------------------------------------------------------------- checkpoints in tools
@pytest.fixture(scope='module')
def trained(data_dir):
    work = data_dir / 'trained'
    run_tool(['train.py', RETINANET, '--work-dir', work, '--cfg-options', 'train_cfg.max_epochs=1',
              'train_cfg.val_interval=5'], cwd=data_dir)
    return work / 'epoch_1.pth'


def test_test_tool_refuses_a_checkpoint_with_another_num_classes(data_dir, trained, tmp_path):
    # the test set with two categories more, so that the config's 5 classes are among them
    content = json.loads((data_dir / 'data' / 'synthetic_coco' / 'annotations' /
                          'instances_val2017.json').read_text())
    names = [c['name'] for c in content['categories']] + ['d', 'e']
    content['categories'] += [dict(id=98, name='d'), dict(id=99, name='e')]
    (tmp_path / 'val5.json').write_text(json.dumps(content))
    result = run_tool(['test.py', RETINANET, trained, '--cfg-options', 'model.bbox_head.num_classes=5',
                       f'test_dataloader.dataset.metainfo.classes=[{",".join(names)}]',
                       f'test_dataloader.dataset.ann_file={tmp_path / "val5.json"}',
                       f'test_evaluator.ann_file={tmp_path / "val5.json"}'],
                      cwd=data_dir, expect_ok=False)
    assert_user_error(result, 'does not fit', 'another num_classes', 'bbox_head.retina_cls.weight')


def test_test_tool_refuses_a_checkpoint_of_another_size(data_dir, trained):
    result = run_tool(['test.py', RETINANET, trained, '--cfg-options',
                       'model.backbone.arch.depths=[1,1,2,1]'], cwd=data_dir, expect_ok=False)
    assert_user_error(result, 'model weights the checkpoint lacks', 'backbone.stages.2.blocks.1')


@pytest.mark.parametrize('content,message', [(None, 'corrupt or truncated'),
                                             (b'hello', 'not a PyTorch checkpoint')])
def test_test_tool_refuses_truncated_and_foreign_files(data_dir, trained, tmp_path, content, message):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(trained.read_bytes()[:50000] if content is None else content)
    result = run_tool(['test.py', RETINANET, bad], cwd=data_dir, expect_ok=False)
    assert_user_error(result, message)


def test_test_tool_refuses_a_detection_out_file_that_is_not_a_pickle_before_any_check(tmp_path):
    """mmdet dumps predictions to a .pkl: checked with the other --out checks, before the config
    is checked against data that need not exist yet (it came after them)."""
    (tmp_path / 'model.pth').write_bytes(b'')
    result = run_tool_in_process(['test.py', RETINANET, tmp_path / 'model.pth', '--out', 'preds.json'],
                                 cwd=tmp_path)
    assert_user_error(result, "--out 'preds.json': mmdet predictions are dumped to a .pkl file")


def test_test_tool_refuses_a_checkpoint_with_nan_weights(data_dir, trained, tmp_path):
    checkpoint = read_training_checkpoint(trained)
    checkpoint['state_dict']['bbox_head.retina_reg.weight'][0, 0, 0, 0] = float('nan')
    torch.save(checkpoint, tmp_path / 'nan.pth')
    result = run_tool(['test.py', RETINANET, tmp_path / 'nan.pth'], cwd=data_dir, expect_ok=False)
    assert_user_error(result, '1 with NaN/Inf values: bbox_head.retina_reg.weight (1 of')


@pytest.mark.slow
def test_fine_tuning_from_a_checkpoint_with_another_num_classes_reports_the_skipped_layers(data_dir, trained):
    """With the learning rate at 0, the fine-tuned checkpoint shows what load_from took: every
    tensor of the file but the class-specific ones, which keep their new shape."""
    work = data_dir / 'finetune'
    result = run_tool(['train.py', RETINANET, '--work-dir', work, '--cfg-options',
                       f'load_from={trained}', 'model.bbox_head.num_classes=2', 'train_cfg.max_epochs=1',
                       'train_cfg.val_interval=5', 'train_dataloader.dataset.metainfo.classes=[square,disk]',
                       'val_dataloader.dataset.metainfo.classes=[square,disk]',
                       'optim_wrapper.optimizer.lr=0'], cwd=data_dir)
    output = result.stdout + result.stderr
    assert 'class-specific tensors' in output and 'bbox_head.retina_cls.weight' in output
    before = read_training_checkpoint(str(trained))['state_dict']
    after = read_training_checkpoint(str(work / 'epoch_1.pth'))['state_dict']
    assert set(after) == set(before)
    skipped = {key for key in after if after[key].shape != before[key].shape}
    assert skipped == {'bbox_head.retina_cls.weight', 'bbox_head.retina_cls.bias'}
    for key in set(after) - skipped:
        assert torch.equal(after[key], before[key]), key


# ------------------------------------------------------------------------- test.py --show
# A matplotlib backend (MPLBACKEND=module://recording_window) that opens no window: it records
# each image the visualizer shows, under which title, and how long it then waits.
RECORDING_WINDOW = """
import json, os
from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg


def record(**entry):
    with open(os.environ['SHOWN_LOG'], 'a') as log:
        log.write(json.dumps(entry) + '\\n')


class FigureManager(FigureManagerBase):
    def show(self):
        image = self.canvas.figure.axes[0].images[0].get_array()
        record(title=self.get_window_title(), shape=list(image.shape))


class FigureCanvas(FigureCanvasAgg):
    manager_class = FigureManager

    def start_event_loop(self, timeout=0):
        record(wait=timeout)
"""


SHOW_CASES = [(RETINANET, dict(coco=dict(num_train=1, num_val=3, seed=2))),
              (UPERNET, dict(ade20k=dict(num_train=1, num_val=3, seed=2)))]


def shown_in_a_recording_window(root, config, data, command):
    """Run ``command`` (a tool and its arguments, the untrained model of ``config`` saved as
    ``root/model.pth``) over 3 generated validation images with the recording backend; returns
    the images ({name: path}) and, per image shown, what was shown and how long it waited."""
    write_datasets(root, **data)
    (root / 'recording_window.py').write_text(RECORDING_WINDOW)
    save_runner_checkpoint(config, root / 'model.pth', ('a', 'b', 'c'),
                           [[0, 0, 0], [255, 0, 0], [0, 255, 0]] if config == UPERNET else None)
    log = root / 'shown.jsonl'
    env = dict(MPLBACKEND='module://recording_window', PYTHONPATH=str(root), SHOWN_LOG=str(log))
    result = run_tool(command, cwd=root, env=env)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    shown = sorted(zip(entries[0::2], entries[1::2]), key=lambda pair: pair[0]['title'])
    images = {p.name: p for p in root.rglob('*.jpg') if p.parent.name in ('val2017', 'validation')}
    assert len(images) == 3 and len(shown) == 3, entries
    return result, images, shown


@pytest.mark.parametrize('config,data', SHOW_CASES)
def test_test_tool_shows_each_images_predictions_for_the_wait_time(tmp_path, config, data):
    result, images, shown = shown_in_a_recording_window(
        tmp_path, config, data, ['test.py', config, 'model.pth', '--show', '--wait-time', '0.25'])
    assert '(test) [' in result.stdout  # the evaluation ran to its end (its log line)
    for name, (entry, wait) in zip(sorted(images), shown):
        assert entry['title'].endswith(name)  # mmdet: NAME.jpg, mmseg: test_NAME.jpg
        height, width = cv2.imread(str(images[name])).shape[:2]
        assert entry['shape'] == [height, 2 * width, 3]  # ground truth beside the prediction
        assert wait == dict(wait=0.25)


@pytest.mark.parametrize('config,data', SHOW_CASES)
def test_image_demo_shows_each_drawing_until_a_key_is_pressed_and_saves_it(tmp_path, config, data):
    images_dir = 'data/synthetic_coco/val2017' if config == RETINANET else \
        'data/synthetic_ade20k/ADEChallengeData2016/images/validation'
    _, images, shown = shown_in_a_recording_window(
        tmp_path, config, data, ['../demo/image_demo.py', images_dir, config, 'model.pth', '--device',
                                 'cpu', '--out-dir', 'out', '--show'])
    for name, (entry, wait) in zip(sorted(images), shown):
        assert entry['title'] == name
        height, width = cv2.imread(str(images[name])).shape[:2]
        assert entry['shape'] == [height, width, 3]  # the prediction alone
        assert wait == dict(wait=0)
    assert sorted(p.name for p in (tmp_path / 'out' / 'vis').iterdir()) == sorted(images)


@pytest.mark.parametrize('config,args,message', [
    (RETINANET, ['--wait-time', '1'], '--wait-time 1 applies to --show only'),
    (RETINANET, ['--show', '--wait-time', '-1'], '--wait-time -1: accepted seconds >= 0'),
    (RETINANET, ['--show', '--wait-time', 'nan'], '--wait-time nan: accepted seconds >= 0'),
    (UPERNET, ['--show', '--show-dir', 'vis'], "--show with --show-dir: mmseg's visualization hook"),
    (RETINANET, ['--show'], "--show: matplotlib's backend here is 'agg', which opens no window"),
])
def test_test_tool_refuses_show_options_it_cannot_honour(tmp_path, monkeypatch, config, args, message):
    """Without a display matplotlib draws into memory only: the run would wait --wait-time
    seconds per image (forever for 0) showing nothing."""
    import matplotlib.pyplot as plt
    monkeypatch.setattr(plt, 'get_backend', lambda: 'agg')
    (tmp_path / 'model.pth').write_bytes(b'')  # refused before it is read
    result = run_tool_in_process(['test.py', config, tmp_path / 'model.pth'] + args, cwd=tmp_path)
    assert_user_error(result, message)


def test_image_demo_refuses_show_without_a_window(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    monkeypatch.setattr(plt, 'get_backend', lambda: 'agg')
    write_datasets(tmp_path, coco=dict(num_train=1, num_val=1, seed=2))
    torch.save({'state_dict': {}}, tmp_path / 'weights.pth')  # readable: the --show check is next
    result = run_tool_in_process(['../demo/image_demo.py', 'data/synthetic_coco/val2017', RETINANET,
                                  'weights.pth', '--device', 'cpu', '--show'], cwd=tmp_path)
    assert_user_error(result, "--show: matplotlib's backend here is 'agg', which opens no window")


def test_test_tool_names_why_matplotlib_cannot_open_a_window(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    def headless():
        raise ImportError("Cannot load backend 'TkAgg' which requires the 'tk' interactive "
                          "framework, as 'headless' is currently running")
    monkeypatch.setattr(plt, 'get_backend', headless)
    (tmp_path / 'model.pth').write_bytes(b'')
    result = run_tool_in_process(['test.py', RETINANET, tmp_path / 'model.pth', '--show'], cwd=tmp_path)
    assert_user_error(result, "--show: matplotlib cannot open a window here: Cannot load backend 'TkAgg'")


# -------------------------------------------------------------- launchers, quickstart and demo
def test_more_gpus_than_the_machine_has_is_refused(tmp_path):
    fake_python = tmp_path / 'python'  # reports CUDA with 2 devices
    fake_python.write_text('#!/usr/bin/env bash\n'
                           'case "$2" in *device_count*) echo 2; exit 0;; *is_available*) exit 0;; esac\n'
                           'exit 3\n')
    fake_python.chmod(0o755)
    result = run_tool(['dist_train.sh', RETINANET, '8'], cwd=tmp_path, expect_ok=False,
                      env={'PYTHON': str(fake_python)})
    assert result.returncode == 2 and 'asked for 8 GPUs but this machine has 2' in result.stderr


def _recording_program(path, name):
    """An executable ``path/name`` that only leaves ``path/name.ran`` behind: run as PYTHON or as
    ``srun``, it shows whether a launcher got as far as starting anything."""
    program = path / name
    program.write_text(f'#!/usr/bin/env bash\ntouch {path / (name + ".ran")}\nexit 3\n')
    program.chmod(0o755)
    return program


# The launchers' numbers (tools/common.sh: davit_mm_require_integer): decimal, no sign, no leading
# zeros, in range; a value of any length is refused without bash's arithmetic overflowing.
LAUNCH_CASES = [
    ('0', {}, 'GPUS=0 (processes on this node): accepted an integer from 1 to 1024'),
    ('two', {}, "GPUS='two' (processes on this node): accepted an integer from 1 to 1024"),
    ('-1', {}, "GPUS='-1' (processes on this node): accepted an integer from 1 to 1024"),
    ('00', {}, 'GPUS=00 (processes on this node): accepted an integer from 1 to 1024, written '
               'without leading zeros'),
    ('08', {}, 'GPUS=08 (processes on this node): accepted an integer from 1 to 1024, written '
               'without leading zeros'),
    ('99999999999999999999', {}, 'GPUS=99999999999999999999 (processes on this node): accepted an '
                                 'integer from 1 to 1024'),
    ('1025', {}, 'GPUS=1025 (processes on this node): accepted an integer from 1 to 1024'),
    ('1', {'PORT': '70000'}, 'PORT=70000: accepted an integer from 1 to 65535'),
    ('1', {'PORT': 'abc'}, "PORT='abc': accepted an integer from 1 to 65535"),
    ('1', {'PORT': '0'}, 'PORT=0: accepted an integer from 1 to 65535'),
    ('1', {'NNODES': '0'}, 'NNODES=0: accepted an integer from 1 to 65536'),
    ('1', {'NNODES': 'abc'}, "NNODES='abc': accepted an integer from 1 to 65536"),
    ('1', {'NNODES': '1:2'}, "NNODES='1:2': accepted an integer from 1 to 65536"),
    ('1', {'NODE_RANK': '-1'}, "NODE_RANK='-1' (with NNODES=1): accepted an integer from 0 to 0"),
    ('1', {'NNODES': '2', 'NODE_RANK': '2'}, 'NODE_RANK=2 (with NNODES=2): accepted an integer from 0 to 1'),
]


@pytest.mark.parametrize('tool', ['dist_train.sh', 'dist_test.sh'])
@pytest.mark.parametrize('gpus,env,message', LAUNCH_CASES)
def test_a_gpu_count_that_is_not_a_positive_integer_is_refused(tmp_path, tool, gpus, env, message):
    """...and the same for NNODES, NODE_RANK and PORT: refused before anything runs (PYTHON is
    a program that records being started: not even the CUDA check, let alone torchrun)."""
    python = _recording_program(tmp_path, 'python')
    args = [RETINANET, gpus] if tool == 'dist_train.sh' else [RETINANET, 'model.pth', gpus]
    result = run_tool([tool] + args, cwd=tmp_path, expect_ok=False, timeout=30,
                      env=dict({'NNODES': '', 'NODE_RANK': '', 'PORT': ''}, PYTHON=str(python), **env))
    assert result.returncode == 2 and result.stderr == f'error: {message}\n', result.stderr
    assert not (tmp_path / 'python.ran').exists()


def test_launchers_hand_good_numbers_to_torchrun(tmp_path):
    """The checks refuse only bad values: these reach PYTHON (the CUDA check, then torchrun)."""
    python = _recording_program(tmp_path, 'python')
    for env in ({'NNODES': '', 'NODE_RANK': '', 'PORT': ''},
                {'NNODES': '2', 'NODE_RANK': '1', 'PORT': '65535'}):
        result = run_tool(['dist_train.sh', RETINANET, '1024'], cwd=tmp_path, expect_ok=False,
                          timeout=30, env=dict(env, PYTHON=str(python)))
        assert result.returncode == 3 and result.stderr == '', result.stderr
        assert (tmp_path / 'python.ran').exists()
        (tmp_path / 'python.ran').unlink()


def test_a_port_in_use_or_an_address_that_does_not_resolve_is_refused_before_torchrun():
    """torchrun stopped with a DistNetworkError (EADDRINUSE) traceback and exit 1 on a busy PORT,
    and retried a MASTER_ADDR that does not resolve for minutes."""
    import socket

    from davit_mm.cli import rendezvous_problem
    with socket.socket() as busy:
        busy.bind(('', 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ['--nnodes=1', '--node_rank=0', '--master_addr=127.0.0.1', f'--master_port={port}']
        assert rendezvous_problem(args).startswith(f'PORT={port} is taken on this machine (Address already '
                                                   f'in use; another run?): give a free one, e.g. PORT=')
        assert rendezvous_problem(args[:1] + ['--node_rank=1'] + args[2:]) == ''  # node 0 hosts it
    assert rendezvous_problem(args) == ''  # free again
    assert rendezvous_problem(['--master_addr=nosuchhost.invalid', '--node_rank=1']).startswith(
        "MASTER_ADDR='nosuchhost.invalid' does not resolve to an address (")


def test_launch_without_arguments_prints_its_usage(tmp_path):
    result = run_tool(['launch.sh'], cwd=tmp_path, expect_ok=False, timeout=30)
    assert result.returncode == 2 and result.stderr.startswith('usage: bash tools/launch.sh NPROC SCRIPT')


@pytest.mark.parametrize('tool', ['slurm_train.sh', 'slurm_test.sh'])
@pytest.mark.parametrize('env,message', [
    ({'GPUS': '0'}, 'GPUS=0 (tasks, one per GPU, over all nodes): accepted an integer from 1 to 65536'),
    ({'GPUS': '08'}, 'GPUS=08 (tasks, one per GPU, over all nodes): accepted an integer from 1 to 65536, '
                     'written without leading zeros'),
    ({'GPUS': '99999999999999999999'}, 'GPUS=99999999999999999999 (tasks, one per GPU, over all nodes): '
                                       'accepted an integer from 1 to 65536'),
    ({'GPUS_PER_NODE': 'eight'}, "GPUS_PER_NODE='eight': accepted an integer from 1 to 1024"),
    ({'GPUS_PER_NODE': '00'}, 'GPUS_PER_NODE=00: accepted an integer from 1 to 1024, written without '
                              'leading zeros'),
    ({'CPUS_PER_TASK': '-5'}, "CPUS_PER_TASK='-5': accepted an integer from 1 to 1024"),
    ({'MASTER_PORT': '70000'}, 'MASTER_PORT=70000: accepted an integer from 1 to 65535'),
])
def test_slurm_launchers_refuse_bad_counts_before_srun(tmp_path, tool, env, message):
    _recording_program(tmp_path, 'srun')
    path = f'{tmp_path}{os.pathsep}{os.environ["PATH"]}'
    result = run_tool([tool, 'partition', 'job', RETINANET, 'w'], cwd=tmp_path, expect_ok=False,
                      timeout=30, env=dict({'GPUS': '', 'GPUS_PER_NODE': '', 'CPUS_PER_TASK': '',
                                            'MASTER_PORT': ''}, PATH=path, **env))
    assert result.returncode == 2 and result.stderr == f'error: {message}\n', result.stderr
    assert not (tmp_path / 'srun.ran').exists()


def test_slurm_launchers_hand_good_counts_to_srun(tmp_path):
    """The checks refuse only bad values: the defaults, and no MASTER_PORT, reach srun."""
    _recording_program(tmp_path, 'srun')
    path = f'{tmp_path}{os.pathsep}{os.environ["PATH"]}'
    result = run_tool(['slurm_train.sh', 'partition', 'job', RETINANET, 'w'], cwd=tmp_path,
                      expect_ok=False, timeout=30, env={'GPUS': '', 'GPUS_PER_NODE': '',
                                                        'CPUS_PER_TASK': '', 'MASTER_PORT': '',
                                                        'PATH': path})
    assert result.returncode == 3 and (tmp_path / 'srun.ran').exists(), result.stderr


@pytest.mark.parametrize('args,message', [
    (['--iters', '0'], "--iters must be a positive integer from 1 to 100000 written without leading zeros"),
    (['--iters', '00'], "--iters must be a positive integer from 1 to 100000"),
    (['--iters', '08'], "--iters must be a positive integer from 1 to 100000 written without leading "
                        "zeros (a demo of a few minutes; longer runs: tools/train.py), got '08'"),
    (['--iters', '100001'], "--iters must be a positive integer from 1 to 100000"),
    (['--iters', '99999999999999999999'], "--iters must be a positive integer from 1 to 100000"),
    (['--model', 'yolo'], '--model must be maskrcnn or retinanet'),
    (['--epochs', '3'], "unknown argument '--epochs'")])
def test_quickstart_rejects_bad_options_before_doing_anything(tmp_path, args, message):
    result = run_tool(['quickstart.sh'] + args + ['--out-dir', tmp_path / 'q'], cwd=tmp_path,
                      expect_ok=False, timeout=30)
    assert result.returncode == 2 and result.stderr.startswith(f'quickstart: {message}'), result.stderr
    assert result.stderr.count('\n') == 1, result.stderr  # that line only
    assert not (tmp_path / 'q').exists()


@pytest.mark.parametrize('out_dir,message', [
    ('', "--out-dir must name a folder, got ''"),
    ('afile', "--out-dir 'afile' is a file, not a folder"),
    ('afile/q', "--out-dir 'afile/q' cannot be created: Not a directory")])
def test_quickstart_refuses_an_output_folder_it_cannot_use_before_the_setup(tmp_path, out_dir, message):
    """Before: `mkdir: cannot create directory ''`, exit 1, after the setup step had run. PYTHON
    records being started: neither the setup nor anything later runs."""
    (tmp_path / 'afile').write_text('')
    python = _recording_program(tmp_path, 'python')
    result = run_tool(['quickstart.sh', '--out-dir', out_dir], cwd=tmp_path, expect_ok=False,
                      timeout=30, env={'PYTHON': str(python)})
    assert result.returncode == 2 and result.stderr.startswith(f'quickstart: {message}'), result.stderr
    assert result.stderr.count('\n') == 1, result.stderr  # that line only
    assert 'environment' not in result.stdout and not (tmp_path / 'python.ran').exists()


def test_quickstart_help_shows_the_whole_header(tmp_path):
    result = run_tool(['quickstart.sh', '--help'], cwd=tmp_path, timeout=30)
    assert result.stdout.startswith('See davit_mm work end to end')
    assert '1 to 100000' in result.stdout and result.stdout.rstrip().endswith('retinanet (boxes)')


def test_image_demo_rejects_missing_inputs(data_dir, tmp_path):
    demo = osp.join(REPO, 'demo', 'image_demo.py')
    image = data_dir / 'data' / 'synthetic_coco' / 'val2017' / '000001.jpg'
    empty = tmp_path / 'empty.pth'  # the inferencers' loader fails on it with a bare EOFError
    empty.write_bytes(b'')
    weights = tmp_path / 'weights.pth'  # readable: the output folder's check comes next
    torch.save({'state_dict': {}}, weights)
    cases = [([str(tmp_path / 'nope.jpg'), MASKRCNN, str(tmp_path)], 'no such file or folder'),
             ([str(tmp_path), MASKRCNN, str(tmp_path / 'x.pth')], 'holds no images'),
             ([str(image), MASKRCNN, str(tmp_path / 'x.pth')], "checkpoint='"),
             ([str(image), MASKRCNN, str(empty)], 'is not a PyTorch checkpoint'),
             ([str(image), MASKRCNN, str(empty), '--device', 'tpu'],
              '--device tpu: accepted cpu, cuda or cuda:N'),
             ([str(image), MASKRCNN, str(weights), '--device', 'cpu', '--out-dir', str(empty / 'o')],
              f"--out-dir {str(empty / 'o')!r} cannot be created: {str(empty)!r} is a file"),
             ([str(image), MASKRCNN, str(weights), '--device', 'cpu', '--out-dir', ''],
              "--out-dir '': an empty path; give the folder to write")]
    # the inferencers stopped with a bare "AssertionError: failed to load image"
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'notes.jpg').write_text('not an image\n')
    (bad / 'cut.jpg').write_bytes(image.read_bytes()[:200])
    cases += [([str(bad / 'notes.jpg'), MASKRCNN, str(weights)],
               f"image {str(bad / 'notes.jpg')!r} (13 bytes) cannot be read as an image"),
              ([str(bad), MASKRCNN, str(weights)],  # a folder: every image is checked
               f"image {str(bad / 'cut.jpg')!r} (200 bytes) cannot be read as an image")]
    twins = tmp_path / 'twins'  # one prediction file would overwrite the other
    twins.mkdir()
    for name in ('a.jpg', 'a.PNG'):
        (twins / name).write_bytes(image.read_bytes())
    cases += [([str(twins), MASKRCNN, str(weights)], "a.PNG, a.jpg would write their predictions to the "
                                                     "same files (named after the image without its suffix)")]
    cases += [([str(image), MASKRCNN, str(weights), '--score-thr', thr],  # nothing drawn, exit 0
               f'--score-thr {thr}: accepted a score from 0 to 1') for thr in ('nan', '5.0', '-0.5')]
    if not torch.cuda.is_available():
        cases.append(([str(image), MASKRCNN, str(image), '--device', 'cuda:0'], 'has no CUDA device'))
    for args, message in cases:
        result = subprocess.run([sys.executable, demo] + args, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_synthetic_coco_with_coco_classes_fits_the_real_configs_dataset_and_metric(tmp_path):
    """--coco-classes: the paper configs' dataset (COCO's 80 classes as metainfo) keeps every
    generated object, each with the label of its category, and their COCO metric scores a
    prediction on a ground-truth box (a perfect one: AP50 1.0) beside one of class 79; with the
    default shape names no image is left to train on."""
    from mmdet.evaluation import CocoMetric
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(CONFIGS, 'davit_maskrcnn_1x_coco.py'))
    datasets = []
    for option in ([], ['--coco-classes']):
        out = tmp_path / ('coco' if option else 'shapes')
        run_tool(['dataset/make_synthetic_coco.py', out, '--num-train', '3', '--num-val', '1',
                  '--size', '64', '64'] + option, cwd=tmp_path)
        dataset_cfg = cfg.train_dataloader.dataset.copy()
        dataset_cfg.update(data_root=f'{out}/', pipeline=[])
        datasets.append(dataset_cfg)
    with pytest.raises(ValueError, match='need at least one array'):  # no sample left
        DATASETS.build(datasets[0])
    dataset = DATASETS.build(datasets[1])
    objects = json.loads((out / 'annotations' / 'instances_train2017.json').read_text())
    label_of = {c['id']: i for i, c in enumerate(objects['categories'])}
    by_image = {}
    for a in objects['annotations']:
        by_image.setdefault(a['image_id'], []).append(label_of[a['category_id']])
    assert len(dataset) == 3
    assert sorted(i['bbox_label'] for d in dataset for i in d['instances']) == sorted(
        sum(by_image.values(), []))
    assert {label for labels in by_image.values() for label in labels} <= {0, 1, 2}
    val = json.loads((out / 'annotations' / 'instances_val2017.json').read_text())
    metric = CocoMetric(ann_file=str(out / 'annotations' / 'instances_val2017.json'))
    metric.dataset_meta = dataset.metainfo
    # Every ground-truth object of the validation image, exactly, and a box of class 79 (no
    # ground truth: a category the metric must map to an id and leave out of the mean).
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in val['annotations'])]
    labels = [label_of[a['category_id']] for a in val['annotations']]
    metric.process({}, [dict(img_id=val['images'][0]['id'], ori_shape=(64, 64), pred_instances=dict(
        bboxes=torch.tensor(boxes + [[0., 0., 8., 8.]]),
        scores=torch.linspace(.9, .5, len(boxes) + 1), labels=torch.tensor(labels + [79])))])
    results = metric.evaluate(1)
    assert results['coco/bbox_mAP'] == pytest.approx(1.0)


def test_label_map_folder_exists_on_every_process_before_the_metric_writes(tmp_path, monkeypatch):
    """mmseg's IoUMetric creates its output_dir (tools/test.py --out DIR) on the main process only,
    while every process writes its own images' label maps there: `dist_test.sh UPERNET CKPT 2
    --out new_dir` stopped on rank 1 with FileNotFoundError. build_runner creates it on every
    process; what a non-main process's metric writes then lands."""
    from mmseg.evaluation.metrics import iou_metric

    from davit_mm.cli import build_runner, load_config
    out = tmp_path / 'labels' / 'deeper'
    cfg = load_config(UPERNET, {'test_evaluator.output_dir': str(out)}, str(tmp_path / 'work'))
    build_runner(cfg, training=False)
    assert out.is_dir()
    monkeypatch.setattr(iou_metric, 'is_main_process', lambda: False)  # rank 1, as it builds it
    metric = iou_metric.IoUMetric(output_dir=str(out), format_only=True)
    metric.dataset_meta = dict(classes=('a', 'b'))
    sample = dict(pred_sem_seg=dict(data=torch.zeros(1, 4, 4, dtype=torch.long)),
                  img_path='x/ADE_valid_00000002.jpg')
    metric.process({}, [sample])
    assert (out / 'ADE_valid_00000002.png').is_file()
    # the other split's evaluator (val: training runs) is not created by a test run
    val_out = tmp_path / 'val_labels'
    cfg = load_config(UPERNET, {'val_evaluator.output_dir': str(val_out)}, str(tmp_path / 'work2'))
    build_runner(cfg, training=False)
    assert not val_out.exists()


@pytest.mark.parametrize('launcher,variable', [('mpi', 'OMPI_COMM_WORLD_LOCAL_RANK'),
                                               ('slurm', 'SLURM_LOCALID')])
def test_local_rank_comes_from_the_launchers_own_variable(monkeypatch, launcher, variable):
    """mpirun and srun export no LOCAL_RANK: the tools' default of 0 gave every process of an
    --launcher mpi run local rank 0 (DDP's device_ids=[0] on every process, one download per
    process instead of per node). torchrun's LOCAL_RANK, and --local_rank, still win."""
    import argparse

    from davit_mm.cli import add_launch_arguments, parse_launch_arguments
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    monkeypatch.setenv(variable, '3')
    parse_launch_arguments(parser, ['--launcher', launcher])
    assert os.environ['LOCAL_RANK'] == '3'  # what mmengine's DDP wrapper and fileio read
    monkeypatch.delenv('LOCAL_RANK')
    parse_launch_arguments(parser, ['--launcher', 'none'])  # not this launcher's variable
    assert os.environ['LOCAL_RANK'] == '0'
    monkeypatch.setenv('LOCAL_RANK', '1')  # torchrun's
    parse_launch_arguments(parser, ['--launcher', launcher])
    assert os.environ['LOCAL_RANK'] == '1'


def test_slurm_launch_asks_for_as_many_gpus_as_tasks_on_one_node(tmp_path):
    """GPUS=2 with the default GPUS_PER_NODE=8 asked srun for --gres=gpu:8 --ntasks-per-node=8:
    8 GPUs held for 2 tasks. Runs over whole nodes keep GPUS_PER_NODE."""
    srun = tmp_path / 'srun'
    srun.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {tmp_path / "srun.args"}\n')
    srun.chmod(0o755)
    path = f'{tmp_path}{os.pathsep}{os.environ["PATH"]}'
    for gpus, per_node, expected in (('2', '', '2'), ('16', '', '8'), ('12', '8', '8'), ('8', '4', '4')):
        run_tool(['slurm_train.sh', 'partition', 'job', RETINANET, 'w'], cwd=tmp_path, timeout=30,
                 env={'GPUS': gpus, 'GPUS_PER_NODE': per_node, 'CPUS_PER_TASK': '', 'MASTER_PORT': '',
                      'SRUN_ARGS': '', 'PATH': path})
        args = (tmp_path / 'srun.args').read_text().split('\n')
        assert f'--gres=gpu:{expected}' in args and f'--ntasks-per-node={expected}' in args, args
        assert f'--ntasks={gpus}' in args and args[-3:] == ['--launcher', 'slurm', ''], args


def test_slurm_launch_without_arguments_prints_its_usage(tmp_path):
    """It stopped with bash's `$1: unbound variable`, exit 1."""
    result = run_tool(['slurm_launch.sh'], cwd=tmp_path, expect_ok=False, timeout=30)
    assert result.returncode == 2 and result.stderr.startswith('usage: bash tools/slurm_launch.sh PARTITION'), \
        result.stderr


def test_resume_does_not_read_the_backbones_pretrained_weights(data_dir, tmp_path, monkeypatch):
    """A preempted run restarted on a node whose cache lacks the pretrained URL (an offline
    node): the resume takes every weight from its checkpoint, so it does not need the URL."""
    monkeypatch.setenv('DAVIT_MM_CACHE', str(tmp_path / 'empty_cache'))
    monkeypatch.setenv('DAVIT_MM_DOWNLOAD_TIMEOUT', '2')
    path = save_runner_checkpoint(RETINANET, tmp_path / 'epoch_1.pth', ('square', 'disk', 'triangle'))
    checkpoint = torch.load(path, weights_only=False)
    checkpoint['meta'].update(epoch=1, iter=4)
    torch.save(checkpoint, path)
    url = 'http://127.0.0.1:9/davit_tiny.pth'  # nothing listens: a download would fail
    result = run_tool_in_process(['train.py', RETINANET, '--work-dir', tmp_path / 'work', '--resume', path,
                                  '--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
                                  'model.backbone.init_cfg.type=Pretrained',
                                  f'model.backbone.init_cfg.checkpoint={url}'], cwd=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"the backbone's pretrained checkpoint ({url}) is not read" in result.stdout
