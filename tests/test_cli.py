"""davit_mm.cli, the tools' plumbing: every tool reports a user's mistake as ``error: ...`` with exit
status 2 and no traceback; run_guarded closes the process group whatever happens and names an
empty dataset; registry misses are reported as config errors."""
import glob
import json
import os
import os.path as osp
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from mmengine.config import Config

from davit_mm import cli
from davit_mm.synthetic import write_coco
from helpers import CONFIGS, REPO

RETINANET = osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py')


def _tool(path, args, cwd):
    return subprocess.run([sys.executable, osp.join(REPO, path)] + [str(a) for a in args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS='ignore'))


# script -> arguments with one user mistake, and words the message must hold
MISTAKES = {
    'tools/train.py': (['nope.py'], "config 'nope.py': no such file"),
    'tools/test.py': ([RETINANET, 'nope.pth'], "checkpoint='nope.pth': no such file"),
    'tools/convert_checkpoint.py': (['nope.pth', 'out.pth'], 'no such file'),
    'tools/export_onnx.py': (['deploy.py', RETINANET, 'nope.pth', 'demo.jpg'],
                             "checkpoint='nope.pth': no such file"),
    'demo/image_demo.py': (['nope.jpg', RETINANET, 'nope.pth', '--device', 'cpu'],
                           "image 'nope.jpg': no such file or folder"),
    'tools/analysis/get_flops.py': (['nope.py'], "config 'nope.py': no such file"),
    'tools/analysis/benchmark.py': (['--config', 'nope.py', '--sizes', '64x64', '--repeats', '1'],
                                    "config 'nope.py': no such file"),
    'tools/analysis/eval_official.py': (['--checkpoint-dir', '.', '--gpus', '0'],
                                        '--gpus 0: must be a positive integer'),
    'tools/analysis/gpu_suite.py': (['--out', 'o', '--device', 'cpu'],
                                    'on a CPU it runs only with --smoke'),
    'tools/analysis/plot_loss.py': (['.'], 'has no */vis_data/scalars.json'),
    'tools/analysis/plot_scaling.py': (['nope.json'], "json='nope.json': no such file"),
    'tools/dataset/make_synthetic_coco.py': (['out', '--num-train', '0'], '--num-train 0: accepted 1 or more'),
    'tools/dataset/make_synthetic_ade20k.py': (['out', '--size', '8', '8'], '--size 8 8: accepted sides'),
}


def test_every_python_tool_is_covered_and_exits_through_run_tool():
    scripts = sorted(osp.relpath(p, REPO) for pattern in ('tools/*.py', 'tools/*/*.py', 'demo/*.py')
                     for p in glob.glob(osp.join(REPO, pattern)))
    assert sorted(MISTAKES) == scripts
    for script in scripts:
        with open(osp.join(REPO, script)) as f:
            assert 'sys.exit(run_tool(main))' in f.read(), script


@pytest.mark.parametrize('script', sorted(MISTAKES))
def test_each_tool_reports_a_user_error_with_exit_status_2_and_no_traceback(script, tmp_path):
    args, words = MISTAKES[script]
    result = _tool(script, args, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith('error: ') and words in result.stderr, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr


class _DataError(ValueError):
    """A user error of a module other than builtins: tracebacks name it module-qualified."""


@pytest.mark.parametrize('error,message', [
    (ValueError("image 'a.jpg' decodes as 90x64\nsecond line"), "image 'a.jpg' decodes as 90x64\nsecond line"),
    (_DataError('label map: ValueError: inside'), 'label map: ValueError: inside'),
])
def test_user_error_of_a_dataloader_worker_is_its_own_message_and_the_worker(error, message):
    """torch re-raises a worker's error with the worker's whole traceback as its message, which the
    tools printed after `error:`."""
    from torch._utils import ExceptionWrapper
    try:
        raise error
    except ValueError:
        wrapped = ExceptionWrapper(where='in DataLoader worker process 3')
    with pytest.raises(ValueError) as caught:
        wrapped.reraise()
    assert 'Traceback' in str(caught.value)
    assert cli.user_message(caught.value) == f'{message} (raised in DataLoader worker process 3)'
    assert cli.user_message(error) == message  # raised in the main process: as it is


def test_check_device_accepts_cpu_and_the_gpus_the_machine_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    for device in ('cpu', 'cuda', 'cuda:0', 'cuda:1'):
        cli.check_device(device)
    for device, message in (('cuda:2', 'this machine has 2 CUDA device(s), cuda:0 to cuda:1'),
                            ('tpu', 'accepted cpu, cuda or cuda:N'),
                            ('cpu:0', 'accepted cpu, cuda or cuda:N'),
                            ('cuda:x', 'accepted cpu, cuda or cuda:N')):
        with pytest.raises(ValueError, match=f'--device {device}: {re.escape(message)}'):
            cli.check_device(device)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(ValueError, match='--device cuda: this machine has no CUDA device'):
        cli.check_device('cuda')


@pytest.mark.parametrize('library', ['mmdet', 'mmseg'])
def test_visualizers_draw_on_every_process_once_told_to(tmp_path, monkeypatch, library):
    """On a process other than the main one, mmdet's and mmseg's visualizers draw nothing and
    keep no class names (master_only); after draw_on_every_process they draw, as the main
    process does (into an out_file for mmdet's hook, through the visualizer's backend for
    mmseg's), with the class names the test loop hands them."""
    import mmengine.dist.utils
    import numpy as np
    from mmengine.structures import InstanceData, PixelData
    monkeypatch.setattr(mmengine.dist.utils, 'get_rank', lambda group=None: 1)
    image, meta = np.zeros((16, 16, 3), np.uint8), dict(classes=('a', 'b'), palette=[(255, 0, 0), (0, 255, 0)])
    if library == 'mmdet':
        from mmdet.structures import DetDataSample
        from mmdet.visualization import DetLocalVisualizer
        visualizer = DetLocalVisualizer(name='rank1_det')
        sample = DetDataSample(pred_instances=InstanceData(
            bboxes=torch.tensor([[1., 1., 8., 8.]]), labels=torch.tensor([1]), scores=torch.tensor([0.9])))
        kwargs = dict(out_file=str(tmp_path / 'drawn' / 'image.jpg'))
    else:
        from mmseg.structures import SegDataSample
        from mmseg.visualization import SegLocalVisualizer
        visualizer = SegLocalVisualizer(name='rank1_seg', save_dir=str(tmp_path),
                                        vis_backends=[dict(type='LocalVisBackend')])
        sample = SegDataSample(pred_sem_seg=PixelData(data=torch.ones(1, 16, 16, dtype=torch.long)))
        kwargs = dict(step=0)

    def drawn():
        return sorted(osp.relpath(p, tmp_path) for p in glob.glob(str(tmp_path / '**' / '*.*'), recursive=True))

    visualizer.dataset_meta = meta
    assert visualizer.dataset_meta is None
    visualizer.add_datasample('test_image.jpg', image, data_sample=sample, **kwargs)
    assert drawn() == []
    cli.draw_on_every_process(visualizer)
    assert isinstance(visualizer, DetLocalVisualizer if library == 'mmdet' else SegLocalVisualizer)
    visualizer.dataset_meta = meta
    assert visualizer.dataset_meta == meta
    visualizer.add_datasample('test_image.jpg', image, data_sample=sample, **kwargs)
    assert drawn() == ([osp.join('drawn', 'image.jpg')] if library == 'mmdet' else
                       [osp.join('vis_data', 'vis_image', 'test_image.jpg_0.png')])


def test_check_output_path_refuses_what_cannot_be_written(tmp_path, monkeypatch):
    afile = tmp_path / 'afile'
    afile.write_bytes(b'')
    cli.check_output_path('--work-dir', str(tmp_path / 'new' / 'deeper'), folder=True)  # created later
    cli.check_output_path('--out', str(tmp_path / 'new' / 'preds.pkl'), folder=False)
    cli.check_output_path('--out', str(afile), folder=False)  # overwritten, as a plain open would
    for label, path, folder, problem in (
            ('--work-dir', afile, True, 'is a file, not a folder'),
            ('--out', tmp_path, False, 'is a folder; give the file to write'),
            ('--out', afile / 'preds.pkl', False, f'cannot be created: {str(afile)!r} is a file'),
            ('--show-dir', afile / 'a' / 'b', True, f'cannot be created: {str(afile)!r} is a file')):
        with pytest.raises(ValueError, match=re.escape(f'{label} {str(path)!r} {problem}')):
            cli.check_output_path(label, str(path), folder)
    monkeypatch.setattr(os, 'access', lambda path, mode: False)  # as a user without write access
    with pytest.raises(ValueError, match=re.escape(f'no write permission in {str(tmp_path)!r}')):
        cli.check_output_path('--work-dir', str(tmp_path / 'w'), folder=True)


@pytest.mark.parametrize('script,args,message', [
    ('tools/train.py', [RETINANET, '--work-dir', 'afile'], "work_dir 'afile' is a file, not a folder"),
    ('tools/test.py', [RETINANET, 'afile', '--out', 'afile/preds.pkl'],
     "--out 'afile/preds.pkl' cannot be created"),
    ('tools/test.py', [RETINANET, 'afile', '--work-dir', 'w', '--show-dir', '/dev/null/vis'],
     "--show-dir '/dev/null/vis' cannot be created: '/dev/null' is a file"),
    ('tools/analysis/benchmark.py', ['--device', 'cpu', '--json', 'afile/b.json'],
     "--json 'afile/b.json' cannot be created"),
    ('tools/analysis/gpu_suite.py', ['--smoke', '--out', 'afile/suite'],
     "--out 'afile/suite' cannot be created"),
    ('tools/analysis/plot_loss.py', ['.', '--out', 'afile/loss.png'],
     "--out 'afile/loss.png' cannot be created"),
    ('tools/analysis/eval_official.py', ['--checkpoint-dir', '.', '--work-dir', 'afile'],
     "--work-dir 'afile' is a file, not a folder"),
    ('tools/dataset/make_synthetic_coco.py', ['afile/coco'], "out_dir 'afile/coco' cannot be created"),
    # an empty path: mmengine wrote into the working directory, --out '' and --show-dir '' were
    # ignored, convert_checkpoint.py failed after converting
    ('tools/test.py', [RETINANET, 'afile', '--work-dir', ''], "work_dir '': an empty path; give the folder"),
    ('tools/test.py', [RETINANET, 'afile', '--out', ''], "--out '': an empty path; give the file"),
    ('tools/test.py', [RETINANET, 'afile', '--show-dir', ''], "--show-dir '': an empty path"),
    # mmseg made a folder named segout.pkl
    ('tools/test.py', [osp.join(CONFIGS, 'upernet_davit_512x512_160k_ade20k.py'), 'afile', '--out', 'segout.pkl'],
     "--out 'segout.pkl': mmseg writes its predictions as label-map PNGs into a folder"),
    ('tools/train.py', [RETINANET, '--work-dir', ''], "work_dir '': an empty path"),
    ('tools/convert_checkpoint.py', ['afile', ''], "dst '': an empty path; give the file"),
    ('tools/analysis/benchmark.py', ['--device', 'cpu', '--json', ''], "--json '': an empty path"),
    ('tools/analysis/gpu_suite.py', ['--smoke', '--out', ''], "--out '': an empty path"),
])
def test_tools_refuse_output_paths_before_they_run(tmp_path, script, args, message):
    """These failed with a traceback from mmengine's or Python's makedirs, or after the work was
    done (test.py's --out after the whole evaluation, benchmark.py's --json after measuring)."""
    (tmp_path / 'afile').write_bytes(b'')
    result = _tool(script, args, tmp_path)
    assert result.returncode == 2 and f'error: {message}' in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('script,args', [
    ('tools/train.py', [RETINANET, '--cfg-options', 'model.backbone.drop_path_rate']),
    ('tools/analysis/get_flops.py', [RETINANET, '--cfg-options', '=0.1']),
])
def test_a_cfg_option_without_its_value_is_named(tmp_path, script, args):
    """mmengine's own message was "not enough values to unpack (expected 2, got 1)"."""
    result = _tool(script, args, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: --cfg-options {args[-1]!r}: accepted KEY=VALUE items" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize('item', [
    "model.backbone.init_cfg=dict(type='Pretrained',checkpoint='x.pth')",  # RecursionError
    'model.backbone.init_cfg=dict(checkpoint=x.pth)',  # set as the string 'dict(...)'
    "model.backbone.init_cfg={'checkpoint': 'x.pth'}",
])
def test_a_dict_value_in_cfg_options_is_refused_with_the_way_to_set_it(item):
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=cli.cfg_options_action())
    with pytest.raises(ValueError, match=re.escape(
            f'--cfg-options {item!r}: a value cannot be a dict') + '.*'
            + re.escape('model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH')):
        parser.parse_args(['--cfg-options', item])
    args = parser.parse_args(['--cfg-options', 'a.b=[1,(2,3)]', 'c=dictionary'])
    assert args.cfg_options == {'a.b': [1, (2, 3)], 'c': 'dictionary'}


def test_cfg_options_fill_in_an_init_cfg_that_is_none():
    """The quickstart configs set init_cfg=None; mmengine refused nested keys under it."""
    assert Config.fromfile(RETINANET).model.backbone.init_cfg is None
    cfg = cli.load_config(RETINANET, {'model.backbone.init_cfg.type': 'Pretrained',
                                      'model.backbone.init_cfg.checkpoint': 'x.pth'})
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint='x.pth')
    with pytest.raises(ValueError, match="model.backbone has no key 'init_cgf'"):
        cli.load_config(RETINANET, {'model.backbone.init_cgf.type': 'Pretrained'})


def test_plot_loss_joins_a_resumed_run_to_the_run_it_resumed(tmp_path):
    """A run resumed from its iteration-20 checkpoint after logging up to 30 continues the curve
    from 25; a later run started afresh in the same work dir starts it anew; a test run's
    metrics (no iteration) change neither."""
    from helpers import load_tool
    plot_loss = load_tool('analysis/plot_loss.py')

    def run(stamp, records):
        folder = tmp_path / stamp / 'vis_data'
        folder.mkdir(parents=True)
        (folder / 'scalars.json').write_text(''.join(json.dumps(r) + '\n' for r in records))

    def train(iters, loss):
        return [dict(iter=i, loss=loss) for i in iters]

    run('20261206_010000', train([5, 10, 15, 20, 25, 30], 1.0) + [dict(mAP=0.1, step=1)])
    run('20261206_020000', train([25, 30, 35], 0.5))  # --resume from iter_20.pth
    run('20261206_030000', [dict(mAP=0.2, step=35)])  # tools/test.py
    joined = plot_loss.read_scalars(str(tmp_path))
    assert [(r['iter'], r['loss']) for r in joined if 'loss' in r] == [
        (5, 1.0), (10, 1.0), (15, 1.0), (20, 1.0), (25, 0.5), (30, 0.5), (35, 0.5)]
    assert [r['mAP'] for r in joined if 'mAP' in r] == [0.1, 0.2]
    run('20261206_040000', train([5, 10], 2.0))  # a new run in the same work dir
    assert [(r['iter'], r['loss']) for r in plot_loss.read_scalars(str(tmp_path))] == [
        (5, 2.0), (10, 2.0)]


def test_plot_loss_refuses_keys_the_log_does_not_have(tmp_path):
    log = tmp_path / 'work' / '20260101_000000' / 'vis_data'
    log.mkdir(parents=True)
    (log / 'scalars.json').write_text('{"loss": 1.0, "loss_cls": 0.5, "lr": 0.01, "iter": 1}\n')
    result = _tool('tools/analysis/plot_loss.py', [tmp_path / 'work', '--keys', 'los', 'loss',
                                                   '--out', tmp_path / 'l.png'], tmp_path)
    assert result.returncode == 2 and not (tmp_path / 'l.png').exists()
    assert "error: --keys los: not in the log of" in result.stderr and 'logged: loss, loss_cls, lr' in result.stderr


def test_distributed_launchers_keep_a_user_error_a_user_error(tmp_path):
    """torchrun turned the processes' exit status 2 into 1, after a ChildFailedError traceback."""
    for args, message in ((['dist_train.sh', 'nope.py', '2'], "error: config 'nope.py': no such file"),
                          (['dist_test.sh', RETINANET, 'nope.pth', '1'], "error: checkpoint='nope.pth': no such file")):
        result = subprocess.run(['bash', osp.join(REPO, 'tools', args[0])] + args[1:], cwd=tmp_path,
                                capture_output=True, text=True, env=dict(os.environ, PORT=str(_free_port())))
        assert result.returncode == 2, result.stderr[-3000:]
        assert message in result.stderr and 'Traceback' not in result.stderr, result.stderr[-3000:]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_traceback_on_request(tmp_path):
    result = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'train.py'), 'nope.py'], cwd=tmp_path,
                            capture_output=True, text=True, env=dict(os.environ, DAVIT_MM_TRACEBACK='1'))
    assert result.returncode == 1 and 'Traceback' in result.stderr and 'no such file' in result.stderr


def test_run_tool_keeps_the_traceback_of_errors_that_are_not_the_users(capsys):
    def broken(argv):
        raise RuntimeError('a bug')

    def refused(argv):
        raise ValueError('--x 3: accepted 1 or 2')

    with pytest.raises(RuntimeError, match='a bug'):
        cli.run_tool(broken)
    assert cli.run_tool(refused) == 2
    assert capsys.readouterr().err.startswith('error: --x 3: accepted 1 or 2\n')
    assert cli.run_tool(lambda argv: 'metrics') == 0


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_run_guarded_closes_the_process_group_after_a_run(process_group):
    with cli.run_guarded(Config(dict())):
        assert dist.is_initialized()
    assert not dist.is_initialized()


def test_a_dropped_ddp_model_is_freed_before_the_process_group_goes(process_group, monkeypatch):
    """A DDP wrapper holds the group; one left for the interpreter's shutdown can abort the
    process. A runner (here: a DDP model in a reference cycle) dropped inside run_guarded is
    collected before the group is destroyed."""
    import weakref
    alive_at_destroy, destroy = [], dist.destroy_process_group

    def recording_destroy(*args, **kwargs):
        alive_at_destroy.append(model_ref() is not None)
        return destroy(*args, **kwargs)

    monkeypatch.setattr(dist, 'destroy_process_group', recording_destroy)
    with cli.run_guarded(Config(dict())):
        runner = SimpleNamespace(model=torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2)))
        runner.model.runner = runner  # the cycles a real runner has
        runner.model(torch.randn(3, 2)).sum().backward()
        model_ref = weakref.ref(runner.model)
        del runner
        assert model_ref() is not None  # only a collection frees it
    assert alive_at_destroy == [False]


def test_run_guarded_closes_the_process_group_after_a_failure(process_group):
    with pytest.raises(RuntimeError, match='boom'):
        with cli.run_guarded(Config(dict())):
            raise RuntimeError('boom')
    assert not dist.is_initialized()


def _coco(tmp_path, objects=True):
    root = tmp_path / 'data' / 'synthetic_coco'
    write_coco(str(root), num_train=2, num_val=1, seed=5)
    if not objects:
        ann = root / 'annotations' / 'instances_train2017.json'
        content = json.loads(ann.read_text())
        content['annotations'] = []  # images without objects: filter_empty_gt drops them all
        ann.write_text(json.dumps(content))
    return tmp_path


def test_run_guarded_names_the_empty_dataset_only_when_one_is(tmp_path):
    cwd = os.getcwd()
    os.chdir(_coco(tmp_path, objects=False))
    try:
        cfg = Config.fromfile(RETINANET)
        with pytest.raises(ValueError, match=r'^train_dataloader: the dataset has no samples') as info:
            with cli.run_guarded(cfg):
                raise ValueError('need at least one array to concatenate')
        assert str(info.value.__cause__) == 'need at least one array to concatenate'
        cfg.train_dataloader.dataset.filter_cfg = dict(filter_empty_gt=False)  # now it has samples
        with pytest.raises(ValueError, match='^need at least one array'):
            with cli.run_guarded(cfg):
                raise ValueError('need at least one array to concatenate')
    finally:
        os.chdir(cwd)


def test_a_type_no_registry_has_is_a_config_error(tmp_path):
    result = _tool('tools/train.py', [RETINANET, '--work-dir', tmp_path / 'w', '--cfg-options',
                                      'model.neck.type=NoSuchNeck'], _coco(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith('error: the config cannot be built: ') and 'NoSuchNeck' in result.stderr


@pytest.mark.parametrize('name,text,message', [
    ('mine.txt', "x = 1\n", "config '{dir}/mine.txt': mmengine reads configs named *.py, *.yml, *.yaml or "
                            "*.json, not .txt"),
    ('mine', "x = 1\n", 'not a name without a suffix'),
    ('mine.py', "a = 1\nx = undefined_name\n",
     "cannot be read: line 2 of {dir}/mine.py (x = undefined_name): NameError: name 'undefined_name' "
     "is not defined"),
    ('mine.py', "import torch\nx = torch.zeros(1)\n",
     "line 2 of {dir}/mine.py (x = torch.zeros(1)) (a config that imports modules is read as an "
     "mmengine new-style config, whose imported names can be referred to, not called): RuntimeError"),
    ('mine.yaml', "a: [1, 2\nb: 3\n", "config '{dir}/mine.yaml' cannot be read: ParserError: "),
    ('mine.json', '{"a": 1,}', "cannot be read: JSONDecodeError: Expecting property name"),
    ('mine.py', "_base_ = ['nope.py']\n", "config '{dir}/mine.py': No such file or directory: "
                                          "'{dir}/nope.py'"),
])
def test_a_config_that_cannot_be_read_is_named_with_the_reason(tmp_path, name, text, message):
    """Config.fromfile's OSError for the suffix, and whatever running a config raised, were
    tracebacks (exit 1)."""
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as info:
        cli.load_config(str(tmp_path / name))
    assert message.format(dir=tmp_path) in str(info.value)


def test_export_tool_reads_the_deploy_config_the_same_way(tmp_path):
    (tmp_path / 'deploy.txt').write_text('codebase_config = dict(type="mmdet")\n')
    result = _tool('tools/export_onnx.py', [tmp_path / 'deploy.txt', RETINANET, RETINANET, RETINANET],
                   tmp_path)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert f"error: deploy_cfg '{tmp_path / 'deploy.txt'}': mmengine reads configs named" in result.stderr


@pytest.mark.parametrize('key,close', [('load_form', 'load_from'),
                                       ('model.test_cfg.rcnn.score_thrr', 'score_thr'),
                                       ('train_cfg.max_epoch', 'max_epochs'),
                                       ('model.backbone.drop_path_rat', 'drop_path_rate')])
def test_a_new_cfg_options_key_one_letter_from_an_existing_one_is_a_typo(key, close):
    """mmengine adds any key it is given: `load_form=x.pth` trained from scratch, exit 0."""
    cfg = Config.fromfile(osp.join(CONFIGS, 'davit_maskrcnn_1x_coco.py'))
    where = key.rpartition('.')[0] or 'the config'
    with pytest.raises(ValueError, match=re.escape(
            f"--cfg-options {key}: {where} has no key {key.rpartition('.')[2]!r}; did you mean {close}?")):
        cli.check_cfg_options(cfg, {key: 1})


def test_new_cfg_options_keys_that_are_not_near_misses_are_taken():
    cfg = Config.fromfile(osp.join(CONFIGS, 'davit_maskrcnn_1x_coco.py'))
    options = {'find_unused_parameters': True,  # a key the runner reads, absent from the config
               'model.backbone.with_cp': True, 'default_hooks.checkpoint.max_keep_ckpts': 3,
               'default_hooks.checkpoint.save_last': True, 'train_cfg.max_epochs': 3}
    cli.check_cfg_options(cfg, options)
    assert not cli._one_edit_apart('save_last', 'save_best') and cli._one_edit_apart('abcd', 'abdc')


def test_a_cfg_options_block_the_config_lacks_is_refused_saying_where_to_add_it():
    cfg = Config.fromfile(osp.join(CONFIGS, 'davit_maskrcnn_1x_coco.py'))
    with pytest.raises(ValueError, match=re.escape(
            "optim_wrapper has no key 'clip_grad'; it has ['_scope_', 'optimizer', 'type'] (to add a "
            "'clip_grad' block, set it in a config of your own that inherits this one")):
        cli.check_cfg_options(cfg, {'optim_wrapper.clip_grad.max_norm': 35})
