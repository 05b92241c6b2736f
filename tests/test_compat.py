"""The torch.load(weights_only=True) shim: mmengine's runner checkpoints load and resume under
torch's default, and its unpickler allows no more than the HistoryBuffer statistics it needs."""
import os
import pickle

import pytest
import torch
import torch.nn as nn
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

from davit_mm import compat


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
        randomness=dict(seed=0), **kwargs)


def test_runner_checkpoints_fail_under_weights_only_without_the_shim(tmp_path):
    _runner(tmp_path, 1).train()
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
            torch.load(tmp_path / 'epoch_1.pth')
    finally:
        torch.serialization.add_safe_globals(saved)


def test_runner_resumes_from_its_own_checkpoint(tmp_path):
    _runner(tmp_path, 1).train()
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
