"""Training-run machinery for exact resumes and checkpoints that survive being killed.

- :class:`RandomStateHook` makes a resumed run continue exactly as if it had never stopped.
- :class:`AtomicLocalBackend` writes checkpoints so that a killed process never leaves a
  truncated checkpoint under its final name.

Both are registered by :mod:`davit_mm.registry` and switched on by davit_mm's base configs.
"""
import os
import os.path as osp
import random
import tempfile
from typing import Optional

import numpy as np
import torch
from mmengine.fileio import LocalBackend
from mmengine.hooks import Hook
from mmengine.runner import IterBasedTrainLoop

_STATE_KEY = 'random_state'


def capture_random_state() -> dict:
    """The global random generators' states: Python, numpy, torch CPU and every CUDA device."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict, data_pipeline: bool = True) -> None:
    """Restore what :func:`capture_random_state` captured (Python's and numpy's generators only
    if ``data_pipeline``: those are the ones data transforms draw from)."""
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    if data_pipeline:
        random.setstate(state['python'])
        np.random.set_state(state['numpy'])


class RandomStateHook(Hook):
    """Exact resumption: a run resumed from a checkpoint ends with the same weights and optimizer
    state as one that never stopped (given deterministic kernels).

    mmengine restores weights, optimizer, schedulers and the sampler position, but not the global
    random generators that drop path and the data transforms draw from; a resumed run re-seeds
    them and diverges. This hook stores their states in every checkpoint and restores them when
    training resumes. Iteration-based loops fast-forward the data loader through the batches
    already trained, replaying the transforms' draws from the seed: there only torch's generators
    are restored. Validation and testing are made neutral to the generators (the run that never
    stopped validates after the checkpoint, the resumed one does not).
    """

    priority = 'VERY_LOW'  # before_train runs after mmengine has loaded the checkpoint

    def __init__(self) -> None:
        self._resumed_state: Optional[dict] = None
        self._outside_eval: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[_STATE_KEY] = capture_random_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._resumed_state = checkpoint.get(_STATE_KEY)

    def before_train(self, runner) -> None:
        state, self._resumed_state = self._resumed_state, None
        if state is None or runner.train_loop.iter == 0:
            return  # a fresh start, or load_from (fine-tuning) rather than a resume
        restore_random_state(state, data_pipeline=not isinstance(runner.train_loop, IterBasedTrainLoop))

    def _enter_eval(self, runner) -> None:
        self._outside_eval = capture_random_state()

    def _leave_eval(self, runner, metrics=None) -> None:
        if self._outside_eval is not None:
            restore_random_state(self._outside_eval)
            self._outside_eval = None

    before_val_epoch = _enter_eval
    after_val_epoch = _leave_eval
    before_test_epoch = _enter_eval
    after_test_epoch = _leave_eval


def default_file_mode() -> int:
    """The mode a plain ``open(path, 'w')`` gives a new file under the process umask."""
    umask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(umask)
    return 0o666 & ~umask


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, writing each file under a temporary name in the same folder
    and renaming it into place once complete (``os.replace`` is atomic), so a process killed while
    saving leaves the previous checkpoint intact and no truncated file under the final name."""

    def put(self, obj: bytes, filepath) -> None:
        filepath = str(filepath)
        folder = osp.dirname(osp.abspath(filepath))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(filepath)}.', suffix='.tmp', dir=folder)
        try:
            # mkstemp creates the file with mode 0600, which the rename would keep.
            os.chmod(tmp, default_file_mode())
            with os.fdopen(fd, 'wb') as f:
                f.write(obj)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, filepath)
        except BaseException:
            if osp.exists(tmp):
                os.remove(tmp)
            raise

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        self.put(obj.encode(encoding), filepath)
