"""Training-run machinery for exact resumes and checkpoints that survive being killed.

- :class:`RandomStateHook` makes a resumed run continue exactly as if it had never stopped.
- :class:`AtomicLocalBackend` writes checkpoints so that a killed process never leaves a
  truncated checkpoint under its final name.
- :class:`RunnerCheckpointsHook` lets the runner read its own checkpoints under torch's
  ``weights_only`` loading, :class:`OfficialCheckpointHook` load whole official models.
- :class:`PositionSeededSampler` / :class:`PositionSeededDataset` make data augmentation depend
  on a sample's position in the data stream only.

They are registered by :mod:`davit_mm.registry`. The hooks are switched on by davit_mm's base
configs (and, for any other config the tools run, by :func:`davit_mm.cli.add_checkpoint_hooks`);
the position-seeded sampler and dataset by ``tools/train.py`` (:func:`seed_samples_by_position`).
"""
import contextlib
import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from mmengine.fileio import LocalBackend
from mmengine.hooks import Hook
from mmengine.runner import IterBasedTrainLoop
from torch.utils.data import Sampler

from . import compat
from .fileio import atomic_file

_STATE_KEY = 'random_state'


def capture_random_state() -> dict:
    """The global random generators' states: Python, numpy, torch CPU and every CUDA device."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def derived_seed(*entropy: int) -> int:
    """A 32-bit seed drawn from the given integers (numpy's ``SeedSequence``): distinct tuples give
    independent streams."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def restore_random_state(state: dict, data_pipeline: bool = True) -> None:
    """Restore what :func:`capture_random_state` captured (Python's and numpy's generators only
    if ``data_pipeline``: those are the ones data transforms draw from)."""
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    if data_pipeline:
        random.setstate(state['python'])
        np.random.set_state(state['numpy'])


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Give every process of a distributed run rank ``src``'s buffers of ``model`` (BN running
    statistics); nothing outside one.

    mmengine's DDP wrapper does not broadcast buffers (``broadcast_buffers=False``), so with plain
    BN (davit_mm's UperNet heads, as the official config; SyncBN turned into BN on CPU) each rank
    keeps running statistics of its own data. Validating during training then scored a mix of
    the ranks' statistics: not the model the checkpoint holds (rank 0's), and different after a
    resume (the resumed ranks start from rank 0's statistics)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src)


class RandomStateHook(Hook):
    """Exact resumption: a run resumed from a checkpoint ends with the same weights and optimizer
    state as one that never stopped (given deterministic kernels).

    mmengine restores weights, optimizer, schedulers and the sampler position, but not the global
    random generators that drop path, the detectors' RoI samplers and the data transforms draw
    from; a resumed run re-seeds them and diverges. This hook seeds them before every training
    iteration from (run seed, rank, iteration), so what an iteration draws depends on nothing
    before it: a resumed run draws the same, on every rank (only rank 0 writes checkpoints, so a
    state stored in them could hold rank 0's generators only, and Mask R-CNN's samplers draw a
    data-dependent number of times on each rank). It also stores the generators' states in every
    checkpoint and restores them when training resumes (what the first iteration's data loading
    draws before the first seeding). Iteration-based loops fast-forward the data loader through
    the batches already trained, replaying the transforms' draws from the seed: there only
    torch's generators are restored. Validation and testing are made neutral to the generators,
    and validation scores rank 0's buffers on every rank (:func:`broadcast_buffers`): the
    model its checkpoint holds.
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
        loader = runner.train_loop.dataloader
        if loader.generator is None:
            # torch draws each new data loader iterator's base seed from the global generator. With
            # persistent workers a run creates one iterator per run, not per epoch, so a resumed
            # run would draw once more than one that never stopped; give the loader its own.
            loader.generator = torch.Generator().manual_seed(runner.seed or 0)
        state, self._resumed_state = self._resumed_state, None
        if state is None or runner.train_loop.iter == 0:
            return  # a fresh start, or load_from (fine-tuning) rather than a resume
        restore_random_state(state, data_pipeline=not isinstance(runner.train_loop, IterBasedTrainLoop))

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        seed = derived_seed((runner.seed or 0) % 2**32, runner.rank, runner.iter)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # every CUDA device's generator too

    def _enter_eval(self, runner) -> None:
        self._outside_eval = capture_random_state()

    def _leave_eval(self, runner, metrics=None) -> None:
        if self._outside_eval is not None:
            restore_random_state(self._outside_eval)
            self._outside_eval = None

    def before_val_epoch(self, runner) -> None:
        self._enter_eval(runner)
        broadcast_buffers(runner.model)

    after_val_epoch = _leave_eval
    before_test_epoch = _enter_eval
    after_test_epoch = _leave_eval


# ------------------------------------------------------------------ per-sample data randomness
class SeededIndex(int):
    """A dataset index that carries the seed of its sample's random transforms; it is an int
    everywhere else (batch samplers read ``dataset.get_data_info(index)`` with it)."""

    def __new__(cls, index: int, seed: int) -> 'SeededIndex':
        obj = super().__new__(cls, index)
        obj.seed = seed
        return obj

    def __reduce__(self):  # to worker processes
        return SeededIndex, (int(self), self.seed)


class PositionSeededSampler(Sampler):
    """Wraps a sampler config (``DefaultSampler``, ``InfiniteSampler``, ...) and gives each index it
    yields a seed derived from (sampler seed, rank, epoch, position in the epoch's stream).

    With :class:`PositionSeededDataset`, every sample's augmentations then depend on where it
    falls in the data stream only, not on which worker loads it or on that worker's history: a
    run resumed with ``num_workers=2`` and persistent workers draws the same augmentations as one
    that never stopped. Iteration-based loops replay the stream on resume (mmengine advances the
    data loader through the batches already trained), so positions match there too.
    """

    def __init__(self, sampler: dict, dataset, seed: Optional[int] = None) -> None:
        from mmengine.dist import get_dist_info
        from mmengine.registry import DATA_SAMPLERS
        self.sampler = DATA_SAMPLERS.build(sampler, default_args=dict(dataset=dataset, seed=seed))
        self.dataset = dataset
        self.rank = get_dist_info()[0]
        base = getattr(self.sampler, 'seed', seed)
        self.seed = 0 if base is None else int(base)
        self.epoch = 0
        self._position = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._position = epoch, 0
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        for index in self.sampler:
            seed = derived_seed(self.seed % 2**32, self.rank, self.epoch, self._position)
            self._position += 1
            yield SeededIndex(index, seed)

    def __len__(self) -> int:
        return len(self.sampler)


class PositionSeededDataset:
    """Wraps a dataset config; draws each sample's transforms (Python's, numpy's and torch's
    generators) from the seed its :class:`SeededIndex` carries, leaving the process's own
    generators as they were. Everything else (``metainfo``, ``get_data_info``, ...) is the
    wrapped dataset's, read and written: mmdet's ``PipelineSwitchHook`` sets ``pipeline`` on the
    data loader's dataset, which must reach the wrapped one."""

    def __init__(self, dataset: dict) -> None:
        from mmengine.registry import DATASETS
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset

    def __getattr__(self, name: str):
        if name == 'dataset':  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value) -> None:
        if name == 'dataset':
            object.__setattr__(self, name, value)
        else:
            setattr(self.dataset, name, value)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        seed = getattr(index, 'seed', None)
        if seed is None:
            return self.dataset[index]
        outside = capture_random_state()
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            return self.dataset[int(index)]
        finally:
            restore_random_state(outside)


def seed_samples_by_position(cfg) -> bool:
    """Wrap ``train_dataloader``'s sampler and dataset in :class:`PositionSeededSampler` and
    :class:`PositionSeededDataset` (once); returns whether the config changed."""
    loader = cfg.get('train_dataloader')
    if not loader or not isinstance(loader.get('sampler'), dict) or \
            loader.get('dataset', {}).get('type') == 'PositionSeededDataset':
        return False
    loader['sampler'] = dict(type='PositionSeededSampler', sampler=loader['sampler'])
    loader['dataset'] = dict(type='PositionSeededDataset', dataset=loader['dataset'])
    return True


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, writing each file under a temporary name in the same folder
    and renaming it into place once complete (``os.replace`` is atomic), so a process killed while
    saving leaves the previous checkpoint intact and no truncated file under the final name."""

    def put(self, obj: bytes, filepath) -> None:
        with atomic_file(str(filepath)) as f:
            f.write(obj)

    def put_text(self, obj: str, filepath, encoding: str = 'utf-8') -> None:
        self.put(obj.encode(encoding), filepath)


class OfficialCheckpointHook(Hook):
    """``load_from`` / ``tools/test.py`` with a whole detector or segmentor checkpoint of the
    official DaViT code (mmdet 2.11 / mmseg 0.11): converts it in memory, right after mmengine has
    read it and before it is loaded into the model (:func:`davit_mm.checkpoint.adapt_model_checkpoint`),
    and logs what it did in one line; backbone weights the model does not build (RetinaNet's
    ``norm0``) are left out of it and of davit_mm-layout files alike. Other checkpoints pass
    untouched."""

    priority = 'VERY_HIGH'  # before other hooks look at the loaded checkpoint

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.logging import print_log

        from .checkpoint import adapt_model_checkpoint, is_official_model
        source = getattr(runner, '_load_from', None) or 'the checkpoint'
        converted, note = adapt_model_checkpoint(runner.model, checkpoint, source)
        if converted is not checkpoint:
            if getattr(runner, '_resume', False) and is_official_model(checkpoint):
                raise ValueError(f'resume={source!r}: a model of the official DaViT code carries no '
                                 f'davit_mm training state; use load_from to start from its weights')
            checkpoint.clear()
            checkpoint.update(converted)
            print_log(f'davit_mm: {note}', logger='current')


class RunnerCheckpointsHook(Hook):
    """Lets mmengine's runner read its own checkpoints (``resume``, ``load_from``, testing) while it
    runs, under torch >= 2.6's ``weights_only`` loading: the globals their message hub holds are
    allowed from ``before_run`` (which precedes the runner's checkpoint loading) to ``after_run``,
    for this process's runner only (:func:`davit_mm.compat.runner_checkpoints_readable`)."""

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self._scope = contextlib.ExitStack()

    def before_run(self, runner) -> None:
        self._scope.enter_context(compat.runner_checkpoints_readable())

    def after_run(self, runner) -> None:
        self._scope.close()
