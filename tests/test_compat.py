"""davit_mm.compat: each shim applies only on the versions it fixes, and only where it is needed.
mmengine's runner checkpoints load and resume under torch's weights_only default while a runner with
RunnerCheckpointsHook runs (not process-wide), and the unpickler allows no more than the
HistoryBuffer statistics it needs."""
import importlib
import os
import os.path as osp
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

from davit_mm import compat
from davit_mm.engine import RunnerCheckpointsHook
from helpers import REPO, CastToLong, ExportProbe


class _ToyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x, y=None, mode='loss'):
        out = self.linear(torch.stack(x)).squeeze(-1)
        if mode == 'loss':
            return dict(loss=((out - torch.as_tensor(y, dtype=out.dtype)) ** 2).mean())
        return out


class _ToyData(Dataset):
    metainfo = dict(classes=('a', 'b'))

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return dict(x=torch.full((2, ), float(index)), y=float(index % 3))


def _runner(work_dir, max_epochs, **kwargs):
    _runner.count = getattr(_runner, 'count', 0) + 1  # own MessageHub per runner
    return Runner(
        model=_ToyModel(), work_dir=str(work_dir), experiment_name=f'toy{_runner.count}',
        train_dataloader=dict(dataset=_ToyData(), batch_size=4,
                              sampler=dict(type='DefaultSampler', shuffle=True)),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        param_scheduler=[dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=2)],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        custom_hooks=[RunnerCheckpointsHook()], randomness=dict(seed=0), **kwargs)


def test_runner_checkpoints_fail_under_weights_only_outside_the_runners_scope(tmp_path):
    _runner(tmp_path, 1).train()
    assert HistoryBuffer not in torch.serialization.get_safe_globals()  # the hook's scope ended with the run
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        torch.load(tmp_path / 'epoch_1.pth')


def test_runner_resumes_from_its_own_checkpoint(tmp_path):
    _runner(tmp_path, 1).train()
    with compat.runner_checkpoints_readable():
        assert torch.load(tmp_path / 'epoch_1.pth')['meta']['epoch'] == 1  # weights_only default
    resumed = _runner(tmp_path, 2, resume=True, load_from=str(tmp_path / 'epoch_1.pth'))
    resumed.train()
    assert resumed.epoch == 2
    adam_state = next(iter(resumed.optim_wrapper.optimizer.state.values()))
    assert int(adam_state['step']) == 4  # 2 epochs x 2 iterations: the first epoch's state was loaded
    history = resumed.message_hub.get_scalar('train/loss')
    assert isinstance(history, HistoryBuffer) and len(history.data[0]) == 4


def test_unpickler_getattr_is_limited_to_history_buffer_statistics():
    assert compat._restricted_getattr(HistoryBuffer, 'mean') is HistoryBuffer.mean
    for obj, name in [(HistoryBuffer, '__init__'), (os, 'system'), (HistoryBuffer, '__class__')]:
        with pytest.raises(pickle.UnpicklingError, match='refuses getattr'):
            compat._restricted_getattr(obj, name)


# ------------------------------------------------------------------------ version gating
@pytest.mark.parametrize('versions,needed', [
    ({'torch': (2, 13, 0), 'mmengine': (0, 10, 7)}, True),
    ({'torch': (2, 5, 1), 'mmengine': (0, 10, 7)}, False),   # weights_only was not the default yet
    ({'torch': (2, 13, 0), 'mmengine': (0, 10, 8)}, False),  # a release after the upstream fix
])
def test_the_checkpoint_shim_is_gated_on_torch_and_mmengine(monkeypatch, versions, needed):
    monkeypatch.setattr(compat, '_installed', lambda package: versions[package])
    assert compat.needed('runner_checkpoint_globals') is needed
    assert bool(compat.runner_checkpoint_globals()) is needed


@pytest.mark.parametrize('shim,package,inside,outside', [
    ('name_unreadable_images', 'mmcv', (2, 1, 0), (1, 7, 2)),
    ('allow_davit_mm_config_scope', 'mmengine', (0, 10, 7), (0, 11, 0)),
])
def test_each_import_time_shim_is_gated_on_its_package(monkeypatch, shim, package, inside, outside):
    monkeypatch.setattr(compat, '_installed', lambda name: inside if name == package else (99, ))
    assert compat.needed(shim)
    monkeypatch.setattr(compat, '_installed', lambda name: outside if name == package else (99, ))
    assert not compat.needed(shim)


@pytest.mark.parametrize('versions,needed', [
    ({'torch': (2, 13, 0), 'mmdeploy': (1, 3, 1)}, True),
    ({'torch': (2, 8, 0), 'mmdeploy': (1, 3, 1)}, False),   # TorchScript was still the default
    ({'torch': (2, 13, 0), 'mmdeploy': (1, 4, 0)}, False),  # a release after the one checked
])
def test_the_onnx_exporter_shim_is_gated_on_torch_and_mmdeploy(monkeypatch, versions, needed):
    monkeypatch.setattr(compat, '_installed', lambda package: versions[package])
    assert compat.needed('torchscript_onnx_export') is needed
    export = torch.onnx.export
    with compat.torchscript_onnx_export():
        assert (torch.onnx.export is not export) is needed
    assert torch.onnx.export is export


def test_inside_the_exporter_shim_a_plain_export_call_traces_and_an_explicit_choice_holds(
        monkeypatch, tmp_path):
    pytest.importorskip('onnxscript')
    monkeypatch.setattr(compat, 'needed', lambda shim: shim == 'torchscript_onnx_export')
    export, calls = torch.onnx.export, []
    with pytest.raises(RuntimeError, match='inside'), compat.torchscript_onnx_export():
        torch.onnx.export(ExportProbe(calls), (torch.zeros(1, 3),), str(tmp_path / 'plain.onnx'))
        assert calls == [True]
        torch.onnx.export(ExportProbe(calls), (torch.zeros(1, 3),), str(tmp_path / 'dynamo.onnx'),
                          dynamo=True)
        assert calls[1:] and not any(calls[1:])
        raise RuntimeError('an error inside the block')
    assert torch.onnx.export is export


def test_inside_the_cast_long_shim_mmdeploys_import_works_and_casts_to_int64(monkeypatch, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    opset9 = importlib.import_module('torch.onnx.symbolic_opset9')
    monkeypatch.delattr(opset9, '_cast_Long', raising=False)  # as torch 2.13 has it
    monkeypatch.setattr(compat, 'needed', lambda shim: shim == 'onnx_cast_long')
    path = str(tmp_path / 'cast.onnx')
    with compat.onnx_cast_long():
        torch.onnx.export(CastToLong(), (torch.zeros(1, 3),), path, input_names=['x'], dynamo=False)
    assert not hasattr(opset9, '_cast_Long')
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    out = session.run(None, {'x': np.full((1, 3), 2.5, np.float32)})[0]
    assert out.dtype == np.int64 and out.tolist() == [[2, 2, 2]]
    with pytest.raises(ImportError, match='_cast_Long'):
        torch.onnx.export(CastToLong(), (torch.zeros(1, 3),), path, dynamo=False)


@pytest.mark.parametrize('mmdeploy,torch_has_it,added', [
    ((1, 3, 1), False, True), ((1, 4, 0), False, False), ((1, 3, 1), True, False)])
def test_the_cast_long_shim_is_gated_on_mmdeploy_and_on_torch_lacking_it(
        monkeypatch, mmdeploy, torch_has_it, added):
    monkeypatch.setattr(compat, '_installed', lambda package: mmdeploy)
    opset9 = importlib.import_module('torch.onnx.symbolic_opset9')
    own = object()
    if torch_has_it:
        monkeypatch.setattr(opset9, '_cast_Long', own, raising=False)
    else:
        monkeypatch.delattr(opset9, '_cast_Long', raising=False)
    with compat.onnx_cast_long():
        inside = getattr(opset9, '_cast_Long', None)
    assert (inside is not None and inside is not own) is added
    assert getattr(opset9, '_cast_Long', None) is (own if torch_has_it else None)


def test_version_strings_are_compared_as_numbers():
    assert compat._version('2.13.0+cpu') == (2, 13, 0) and compat._version('0.10.7') > compat._version('0.9.1')
    assert compat._version('2.6.0rc1') == (2, 6, 0)


def test_importing_davit_mm_leaves_torchs_allow_list_alone():
    # torch adds its own classes to the list as its modules load; HistoryBuffer is davit_mm's
    code = ('import torch, davit_mm; from mmengine.logging import HistoryBuffer; '
            'assert HistoryBuffer not in torch.serialization.get_safe_globals(), "widened"; print("ok")')
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]


def test_runner_checkpoints_are_readable_inside_the_scope_only(tmp_path):
    from mmengine.logging import HistoryBuffer
    path = osp.join(tmp_path, 'hub.pth')
    buffer = HistoryBuffer()
    buffer.update(1.0)
    buffer.update(2.0)
    torch.save({'meta': {'buffer': buffer}}, path)
    with compat.runner_checkpoints_readable():
        assert torch.load(path)['meta']['buffer'].mean() == 1.5
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(path)


def test_a_davit_mm_read_inside_the_scope_leaves_the_scope_whole(tmp_path):
    """davit_mm's own checkpoint read allows the same globals for its read: leaving it must not
    take them from an enclosing scope (torch's safe_globals removes on exit all it was given;
    image_demo.py reads the checkpoint inside the scope and then lets mmengine's loader read it)."""
    from davit_mm.checkpoint import read_file
    path = osp.join(tmp_path, 'hub.pth')
    buffer = HistoryBuffer()
    buffer.update(1.0)
    torch.save({'state_dict': {}, 'meta': {'buffer': buffer}}, path)
    with compat.runner_checkpoints_readable():
        read_file(path)
        assert torch.load(path)['meta']['buffer'].mean() == 1.0
    assert HistoryBuffer not in torch.serialization.get_safe_globals()


def test_nested_blocks_allowing_the_same_global_keep_it_for_the_outer_one():
    class Marker:
        pass

    import argparse
    with compat.globals_allowed([Marker]):
        with compat.globals_allowed([Marker, argparse.Namespace]):
            assert {Marker, argparse.Namespace} <= set(torch.serialization.get_safe_globals())
        assert Marker in torch.serialization.get_safe_globals()
        assert argparse.Namespace not in torch.serialization.get_safe_globals()
    assert Marker not in torch.serialization.get_safe_globals()
