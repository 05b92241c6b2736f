"""What several test files share: the checkout's paths, the tiny architecture, running the real tools
as a user would and reading what they leave behind. Test files import from here, never from
conftest (pytest loads conftest.py itself; importing it again as a module gives a second copy)."""
import contextlib
import glob
import importlib.util
import io
import json
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, List, Sequence

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(REPO, 'configs')
# A 4-stage DaViT small enough for CPU tests, with several windows per map at small images.
TINY_ARCH = dict(embed_dims=16, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=3)
# The paper's variants: embed dims and depths per stage.
PAPER_ARCH = {'tiny': ((96, 192, 384, 768), (1, 1, 3, 1)), 'small': ((96, 192, 384, 768), (1, 1, 9, 1)),
              'base': ((128, 256, 512, 1024), (1, 1, 9, 1))}


def weighted_sum(t: torch.Tensor) -> torch.Tensor:
    """A loss (float32, or wider) in which every element of ``t`` has its own weight from -1 to 1,
    so that its gradient tells elements and orderings apart."""
    return (t * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum()


def build_model(config: str, for_this_machine: bool = False):
    """The model of a config file, built as the tools build it (``davit_mm.cli.build_model``);
    ``for_this_machine``: after ``adapt_config_to_machine`` (SyncBN -> BN off-GPU, ...)."""
    from mmengine.config import Config

    from davit_mm.cli import adapt_config_to_machine
    from davit_mm.cli import build_model as build
    cfg = Config.fromfile(config)
    if for_this_machine:
        adapt_config_to_machine(cfg)
    return build(cfg)


def save_runner_checkpoint(config: str, path, classes: Sequence[str], palette: Sequence = None) -> str:
    """An untrained model of ``config``, saved as mmengine's runner saves one: with the message
    hub's logged scalars (``HistoryBuffer`` objects holding numpy arrays) beside the weights, and
    the dataset's ``classes`` (and ``palette``: mmseg's runs save one) in its meta."""
    import numpy as np
    from mmengine.logging import MessageHub
    model = build_model(config, for_this_machine=True)
    model.init_weights()
    hub = MessageHub.get_instance(f'runner_checkpoint_{osp.basename(str(path))}')
    hub.update_scalar('train/loss', np.float64(1.5))
    hub.update_info('iter', 20)
    meta = {'classes': classes} if palette is None else {'classes': classes, 'palette': palette}
    torch.save({'state_dict': model.state_dict(), 'meta': {'dataset_meta': meta},
                'message_hub': hub.state_dict()}, str(path))
    return str(path)


class ExportProbe(torch.nn.Module):
    """``x + 1``, recording in ``calls`` whether TorchScript's tracer ran it (torch.export does not
    trace; it also undoes a forward's changes to the module's own attributes, hence the list)."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def forward(self, x):
        self.calls.append(torch.jit.is_tracing())
        return x + 1


class CastToLong(torch.nn.Module):
    def forward(self, x):
        return ToLong.apply(x)


class ToLong(torch.autograd.Function):
    """``x.long()``, exported through a symbolic that imports ``_cast_Long`` from torch's opset 9
    symbolics, as mmdeploy's RoIAlign does (torch 2.13 has no ``_cast_Long``)."""

    @staticmethod
    def forward(ctx, x):
        return x.long()

    @staticmethod
    def symbolic(g, x):
        from torch.onnx.symbolic_opset9 import _cast_Long
        return _cast_Long(g, x, False)


def load_tool(path: str):
    """The module of ``tools/<path>`` (e.g. ``analysis/get_flops.py``), to call its functions."""
    name = osp.splitext(osp.basename(path))[0] + '_tool'
    spec = importlib.util.spec_from_file_location(name, osp.join(REPO, 'tools', path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(args: Sequence[str], cwd: str, timeout: int = 600, expect_ok: bool = True,
             env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    """Run ``tools/<script> args`` (python or bash by extension) from ``cwd``."""
    script = osp.join(REPO, 'tools', args[0])
    command = ['bash', script] if script.endswith('.sh') else [sys.executable, script]
    full_env = dict(os.environ, PYTHONWARNINGS='ignore', **(env or {}))
    result = subprocess.run(command + [str(a) for a in args[1:]], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, env=full_env)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f'{" ".join(map(str, args))} failed ({result.returncode}):\n'
                             f'{result.stdout[-3000:]}\n{result.stderr[-6000:]}')
    return result


def run_tool_in_process(args: Sequence[str], cwd: str) -> subprocess.CompletedProcess:
    """``tools/<script> args`` run as :func:`run_tool` runs it, but in this process: the tool's
    ``main`` through ``davit_mm.cli.run_tool``, from ``cwd``. For user errors a tool reports
    before it builds a model or a runner; a process start (imports: seconds) per case is then
    most of the cost. That each tool's script exits through ``run_tool`` is test_cli's."""
    from davit_mm.cli import run_tool as guarded
    main = load_tool(args[0]).main
    stdout, stderr, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = guarded(main, [str(a) for a in args[1:]])
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def assert_user_error(result: subprocess.CompletedProcess, *words: str):
    """``result`` is a tool stopped by a user error as the tools promise: exit status 2 and a line
    ``error: ...`` followed by each of ``words``; no traceback (not even a DataLoader worker's,
    which torch puts inside the error's message)."""
    stderr = result.stderr
    start = 0 if stderr.startswith('error: ') else stderr.find('\nerror: ')
    assert result.returncode == 2 and start >= 0, f'exit {result.returncode}:\n{stderr[-3000:]}'
    for part in words:
        assert part in stderr[start:], f'{part!r} not in:\n{stderr[-3000:]}'
    assert 'Traceback' not in stderr, stderr[-3000:]


def logged_scalars(work_dir: str) -> List[dict]:
    """The training log records mmengine wrote (one dict per logged iteration), oldest first."""
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    assert files, f'no scalars.json under {work_dir}'
    with open(files[-1]) as f:
        return [json.loads(line) for line in f if line.strip()]


def logged_metric(work_dir: str, name: str) -> float:
    """The last value of ``name`` (e.g. ``coco/bbox_mAP``) the training run logged: its final
    validation."""
    values = [record[name] for record in logged_scalars(work_dir) if name in record]
    assert values, f'{name} was never logged under {work_dir}'
    return values[-1]


def losses(work_dir: str, key: str = 'loss') -> List[float]:
    return [record[key] for record in logged_scalars(work_dir) if key in record]


def assert_loss_goes_down(work_dir: str, key: str = 'loss', window: int = 2,
                          factor: float = 0.8) -> None:
    """The mean of the last ``window`` logged values is below ``factor`` x that of the first."""
    values = losses(work_dir, key)
    assert len(values) >= 2 * window, values
    first = sum(values[:window]) / window
    last = sum(values[-window:]) / window
    assert last < factor * first, f'{key} did not go down: {values}'


def metric(output: str, name: str) -> float:
    """The value printed for ``name`` (e.g. ``coco/bbox_mAP``) in a tool's log output."""
    for line in reversed(output.splitlines()):
        if f'{name}:' in line:
            return float(line.split(f'{name}:')[1].split()[0])
    raise AssertionError(f'{name} not found in the output:\n{output[-3000:]}')


def write_datasets(root, coco: dict = None, ade20k: dict = None):
    """Generated datasets under ``root/data`` where the quickstart configs look: ``coco`` and
    ``ade20k`` are ``write_coco``/``write_ade20k`` arguments (num_train, num_val, seed); None
    writes none. Returns ``root``."""
    from davit_mm.synthetic import write_ade20k, write_coco
    if coco is not None:
        write_coco(str(root / 'data' / 'synthetic_coco'), **coco)
    if ade20k is not None:
        write_ade20k(str(root / 'data' / 'synthetic_ade20k'), **ade20k)
    return root


def transform_of(pipeline: Sequence[dict], kind: str) -> dict:
    """The first transform config of type ``kind`` in ``pipeline``."""
    found = [t for t in pipeline if t['type'] == kind]
    assert found, f'no {kind} in {[t["type"] for t in pipeline]}'
    return found[0]


def edited_config(path: str, edits: Dict[str, object] = None):
    """``Config.fromfile(path)`` with ``edits`` merged in as ``--cfg-options`` would (dotted keys)."""
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    if edits:
        cfg.merge_from_dict(edits)
    return cfg
