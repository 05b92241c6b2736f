"""davit_mm.compat's shims apply only on the versions they fix, and only where they are needed:
importing davit_mm, or running a runner, leaves torch's weights_only allow-list as it was."""
import os.path as osp
import subprocess
import sys

import pytest
import torch

from davit_mm import compat
from helpers import REPO


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
