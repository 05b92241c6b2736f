"""Tool plumbing shared by tools/train.py, tools/test.py, demo/image_demo.py and the analysis tools:
arguments as mmdet's/mmseg's tools take them, reading a config with clear errors, adapting it to
the machine, building and running a runner, and reporting user errors as ``error: ...`` with exit
status 2 (:func:`run_tool`). Config pre-flight checks live in :mod:`davit_mm.checks`, checkpoint
reading and fit checks in :mod:`davit_mm.checkpoint`.
"""
import argparse
import contextlib
import difflib
import gc
import os
import os.path as osp
import re
import sys
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict

from . import compat
from .fileio import is_url, resolve_checkpoint
from .registry import LIBRARIES

# mmengine 0.10.7 resolves mmdet::/mmseg:: bases through the deprecated pkg_resources API.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

# What davit_mm's checks raise for a user's input (arguments, config, data, checkpoint), as do
# mmengine's config machinery and registries (build_runner turns their KeyErrors into ValueErrors);
# anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def run_tool(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> int:
    """Run a tool's ``main``: 0 when it returns, 2 with ``error: ...`` on stderr for a user error
    (:data:`USER_ERRORS`). ``DAVIT_MM_TRACEBACK=1`` re-raises instead, with the traceback."""
    try:
        main(argv)
    except USER_ERRORS as exc:
        if os.environ.get('DAVIT_MM_TRACEBACK') == '1':
            raise
        print(f'error: {user_message(exc)}\n(DAVIT_MM_TRACEBACK=1 shows where it was raised)',
              file=sys.stderr)
        return 2
    return 0


_WORKER_ERROR = re.compile(r'Caught (\w+) (in DataLoader worker process \d+)\.\nOriginal Traceback')


def user_message(exc: BaseException) -> str:
    """The message of a user error. torch re-raises an error of a DataLoader worker with the
    worker's whole traceback as its message: then the worker's own message, and which worker."""
    text = str(exc)
    caught = _WORKER_ERROR.match(text)
    if caught:
        # the traceback's last "Type: message" line (a module-qualified name for non-builtins)
        lines = list(re.finditer(rf'\n(?:[\w.]+\.)?{caught.group(1)}: ', text))
        if lines:
            return f'{text[lines[-1].end():].rstrip()} (raised {caught.group(2)})'
    return text


def torchrun(argv: Sequence[str]) -> int:
    """``python -m torch.distributed.run ARGV`` (tools/launch.sh), with a user error kept a user
    error: when processes exited with status 2 (each has printed its ``error: ...``) and the
    others failed only by torchrun's own SIGTERM after the first, exit 2 without torchrun's
    ``ChildFailedError`` traceback, which would bury the message and turn the status into 1.
    Any other failure keeps torchrun's report."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main
    problem = rendezvous_problem(argv)
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 2
    try:
        main(list(argv))
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        if 2 in codes and codes <= {2, -signal.SIGTERM}:
            return 2
        raise
    return 0


def rendezvous_problem(argv: Sequence[str]) -> str:
    """What would stop torchrun (``--master_addr=``/``--master_port=``/``--node_rank=`` as
    tools/launch.sh passes them) with a traceback or a hang, named by the variables the user set,
    or ``''``: a MASTER_ADDR that does not resolve (torchrun retries it for minutes), or on node
    0, which hosts the rendezvous, a PORT another program listens on (``EADDRINUSE``)."""
    import socket
    options = dict(arg[2:].split('=', 1) for arg in argv if arg.startswith('--') and '=' in arg)
    address, port = options.get('master_addr', '127.0.0.1'), int(options.get('master_port', 29500))
    try:
        socket.getaddrinfo(address, port)
    except OSError as exc:
        return f'MASTER_ADDR={address!r} does not resolve to an address ({exc}): give node 0\'s name or IP'
    if options.get('node_rank', '0') != '0':
        return ''
    with socket.socket() as probe:
        # as the rendezvous store binds it (SO_REUSEADDR: a port a finished run left in TIME_WAIT is free)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(('', port))
        except OSError as exc:
            return (f'PORT={port} is taken on this machine ({exc.strerror}; another run?): give a free '
                    f'one, e.g. PORT={port + 1 if port < 65535 else port - 1}')
    return ''


def library_of(cfg: Config) -> str:
    """``'mmdet'`` or ``'mmseg'``, from the config's ``default_scope``."""
    scope = cfg.get('default_scope')
    if scope not in LIBRARIES:
        raise ValueError(f'default_scope={scope!r} in the config: davit_mm tools run mmdet and '
                         f'mmseg configs, accepted {LIBRARIES}')
    return scope


def cfg_options_action() -> type:
    """mmengine's ``DictAction`` for ``--cfg-options``, refusing by name an item without ``=``
    (mmengine's own message is "not enough values to unpack (expected 2, got 1)") and a value it
    cannot take: a dict (``dict(...)`` became a string, or with a comma in it a
    ``RecursionError`` deep in mmengine's parser)."""
    from mmengine.config import DictAction

    accepted = 'numbers, strings, True/False/None, and [lists] or (tuples) of them'

    class ConfigOptions(DictAction):
        def __call__(self, parser, namespace, values, option_string=None):
            for item in values:
                key, sep, value = item.partition('=')
                if not sep or not key:
                    raise ValueError(f'{option_string} {item!r}: accepted KEY=VALUE items, e.g. '
                                     f'model.backbone.with_cp=True')
                if re.match(r'\s*(dict\s*\(|\{)', value):
                    raise ValueError(f'{option_string} {item!r}: a value cannot be a dict '
                                     f'(accepted: {accepted}); set each of its keys instead, '
                                     f'e.g. {key}.type=Pretrained {key}.checkpoint=PATH')
                try:
                    DictAction._parse_iterable(value)
                except RecursionError:
                    raise ValueError(f'{option_string} {item!r}: mmengine cannot parse this '
                                     f'value; accepted: {accepted}') from None
            super().__call__(parser, namespace, values, option_string)

    return ConfigOptions


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cfg-options``, ``--launcher`` and ``--local_rank``, as mmdet's and mmseg's tools have."""
    parser.add_argument('--cfg-options', nargs='+', action=cfg_options_action(),
                        help='override config entries, e.g. model.backbone.with_cp=True')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


# Where launchers that do not export LOCAL_RANK put a process's rank on its node: Open MPI's
# mpirun (mmengine's --launcher mpi reads it, but leaves LOCAL_RANK unset) and srun.
_LAUNCHER_LOCAL_RANK = {'mpi': 'OMPI_COMM_WORLD_LOCAL_RANK', 'slurm': 'SLURM_LOCALID'}


def parse_launch_arguments(parser: argparse.ArgumentParser,
                           argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse, and export LOCAL_RANK for launchers that pass it as an argument (``--local_rank``)
    or in a variable of their own (mpirun, srun). Without it every process of an ``--launcher
    mpi`` run had LOCAL_RANK 0: mmengine wraps the model in DDP with ``device_ids=[LOCAL_RANK]``
    (cuda:0 for a process whose model mmengine put on cuda:N), and every process downloaded
    (davit_mm.fileio: local rank 0 downloads)."""
    args = parser.parse_args(argv)
    own = os.environ.get(_LAUNCHER_LOCAL_RANK.get(getattr(args, 'launcher', 'none'), ''), '')
    os.environ.setdefault('LOCAL_RANK', own if own.isdigit() else str(args.local_rank))
    return args


def check_device(device: str) -> None:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` naming a GPU of this machine.

    Raises:
        ValueError: another device string, or a GPU this machine does not have.
    """
    match = re.fullmatch(r'cuda(?::(\d+))?', device)
    if device == 'cpu':
        return
    if match is None:
        raise ValueError(f'--device {device}: accepted cpu, cuda or cuda:N')
    if not torch.cuda.is_available():
        raise ValueError(f'--device {device}: this machine has no CUDA device; use --device cpu')
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ValueError(f'--device {device}: this machine has {count} CUDA device(s), cuda:0 to '
                         f'cuda:{count - 1}')


# matplotlib's backends that draw no window (mmengine's visualizers show images through matplotlib).
NON_INTERACTIVE_BACKENDS = ('agg', 'cairo', 'pdf', 'pgf', 'ps', 'svg', 'template')


def check_can_show(option: str = '--show') -> None:
    """``option`` (showing images in a window) where matplotlib can open one. Without a display
    matplotlib falls back to a backend that draws into memory, and mmengine's visualizers then wait
    their ``wait_time`` per image with nothing shown (forever for 0).

    Raises:
        ValueError: matplotlib's backend draws no window, or the one asked for cannot load.
    """
    import matplotlib.pyplot as plt
    try:
        backend = plt.get_backend()
    except ImportError as exc:  # e.g. MPLBACKEND=TkAgg where no display is
        raise ValueError(f'{option}: matplotlib cannot open a window here: {exc}') from None
    if backend.lower() in NON_INTERACTIVE_BACKENDS:
        raise ValueError(f'{option}: matplotlib\'s backend here is {backend!r}, which opens no window '
                         f'(no display found); run where there is a display, or set MPLBACKEND to '
                         f'an interactive backend (e.g. TkAgg or QtAgg)')


def check_output_path(label: str, path: str, folder: bool) -> None:
    """Refuse, before anything runs, an output location that cannot be written: an empty path,
    a folder (``folder``) that exists as a file, a file that exists as a folder, or a path whose
    nearest existing parent is a file or not writable. Missing folders are left to be created.

    Raises:
        ValueError: naming ``label`` (the option or key), ``path`` and the problem.
    """
    if not path:  # os.makedirs('') fails; mmengine would write into the working directory
        raise ValueError(f"{label} '': an empty path; give the {'folder' if folder else 'file'} "
                         f"to write")
    if folder and osp.exists(path) and not osp.isdir(path):
        raise ValueError(f'{label} {path!r} is a file, not a folder')
    if not folder and osp.isdir(path):
        raise ValueError(f'{label} {path!r} is a folder; give the file to write')
    parent = osp.abspath(path if folder else osp.dirname(osp.abspath(path)))
    while not osp.exists(parent):
        if osp.islink(parent):  # os.makedirs stops at it with FileExistsError
            raise ValueError(f'{label} {path!r} cannot be created: {parent!r} is a symbolic link to '
                             f'{os.readlink(parent)!r}, which does not exist')
        parent = osp.dirname(parent)
    if not osp.isdir(parent):
        raise ValueError(f'{label} {path!r} cannot be created: {parent!r} is a file')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f'{label} {path!r} cannot be written: no write permission in {parent!r}')


# What matplotlib's savefig writes (it picks the format by the suffix)
FIGURE_SUFFIXES = ('.png', '.pdf', '.svg', '.svgz', '.jpg', '.jpeg', '.tif', '.tiff', '.webp', '.eps', '.ps')


def check_figure_path(label: str, path: str) -> None:
    """:func:`check_output_path` for a figure: its suffix must name a format matplotlib writes
    (without one it writes PATH.png, which is not the file the tool then names)."""
    check_output_path(label, path, folder=False)
    if not path.lower().endswith(FIGURE_SUFFIXES):
        raise ValueError(f'{label} {path!r}: give a file name ending in one of {", ".join(FIGURE_SUFFIXES)} '
                         f'(the suffix picks the image format)')


def _child_index(node, part: str) -> Optional[Union[int, str]]:
    """Where ``part`` of a ``--cfg-options`` key leads in ``node``, as mmengine follows it: an
    index into a list, a key of a dict; None where ``node`` has no such entry."""
    if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
        return int(part)
    if isinstance(node, dict) and part in node:
        return part
    return None


def check_cfg_options(cfg: Config, options: Dict[str, object]) -> None:
    """Refuse ``--cfg-options`` keys whose parent does not exist (typos would silently add keys).

    A new leaf under an existing dict (``model.backbone.with_cp=True``) is fine; indices into
    lists (``train_dataloader.dataset.pipeline.2.scale``) are followed as mmengine does.
    """
    for key in options:
        node = cfg._cfg_dict if isinstance(cfg, Config) else cfg
        parts = key.split('.')
        if parts[0] == 'randomness' and len(parts) == 2:
            check_randomness_option(key, options[key])
            continue  # the runner's argument: valid whether or not the config sets it
        for depth, part in enumerate(parts[:-1]):
            index = _child_index(node, part)
            if index is not None:
                node = node[index]
                continue
            where = '.'.join(parts[:depth]) or 'the config'
            choices = list(node) if isinstance(node, dict) else [str(i) for i in range(len(node))] \
                if isinstance(node, (list, tuple)) else []
            close = difflib.get_close_matches(part, choices, n=3)
            hint = f'; did you mean {", ".join(close)}?' if close else \
                f'; it has {sorted(choices)[:12]}' if choices else ''
            if not close and isinstance(node, dict):  # a block the config lacks, maybe meant
                hint += (f' (to add a {part!r} block, set it in a config of your own that '
                         f'inherits this one: _base_ = [...])')
            raise ValueError(f'--cfg-options {key}: {where} has no key {part!r}{hint}')
        leaf = parts[-1]
        if isinstance(node, dict) and leaf not in node and not (len(parts) == 1 and leaf in RUNNER_KEYS):
            close = [k for k in node if isinstance(k, str) and _one_edit_apart(leaf, k)]
            if close:
                where = '.'.join(parts[:-1]) or 'the config'
                raise ValueError(
                    f'--cfg-options {key}: {where} has no key {leaf!r}; did you mean '
                    f'{", ".join(close)}? (a new key one letter away from one the config has is '
                    f'taken for a typo; set it in a config file if it is meant)')


# What mmengine's Runner reads from a config's top level: keys `--cfg-options` may add.
RUNNER_KEYS = frozenset((
    'model', 'work_dir', 'train_dataloader', 'val_dataloader', 'test_dataloader', 'train_cfg',
    'val_cfg', 'test_cfg', 'auto_scale_lr', 'optim_wrapper', 'param_scheduler', 'val_evaluator',
    'test_evaluator', 'default_hooks', 'custom_hooks', 'data_preprocessor', 'load_from', 'resume',
    'launcher', 'env_cfg', 'log_processor', 'log_level', 'visualizer', 'default_scope',
    'randomness', 'experiment_name', 'activation_checkpointing', 'compile',
    'efficient_conv_bn_eval', 'find_unused_parameters', 'model_wrapper_cfg', 'sync_bn'))


def _one_edit_apart(a: str, b: str) -> bool:
    """One letter inserted, removed, changed, or two neighbours swapped (``score_thrr``,
    ``load_form``), in names of 4 letters or more."""
    if a == b or min(len(a), len(b)) < 4 or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def open_none_parents(cfg: Config, options: Dict[str, object]) -> None:
    """Make each ``None`` that an option's key goes through an empty dict, so that
    ``model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH`` fills
    in a config's ``init_cfg=None`` (mmengine refuses: "init_cfg is a dict in the child config
    but is of type NoneType in base config")."""
    for key in options:
        node = cfg._cfg_dict if isinstance(cfg, Config) else cfg
        for part in key.split('.')[:-1]:
            index = _child_index(node, part)
            if index is None:
                break  # a new branch: mmengine creates it
            if node[index] is None:
                node[index] = ConfigDict()
            node = node[index]


# mmengine's Runner(randomness=...): what `--cfg-options randomness.KEY=VALUE` may set, and the
# types it accepts. mmengine's default (no `randomness` in the config) is dict(seed=None).
RANDOMNESS_KEYS = {'seed': (int, type(None)), 'deterministic': (bool, ), 'diff_rank_seed': (bool, )}


def check_randomness_option(key: str, value: object) -> None:
    """Accept ``randomness.seed=N`` / ``randomness.deterministic=True`` / ``randomness.diff_rank_seed``
    for configs that do not set ``randomness`` (mmdet's and mmseg's way of seeding a run)."""
    name = key[len('randomness.'):]
    if name not in RANDOMNESS_KEYS:
        raise ValueError(f'--cfg-options {key}: randomness accepts {sorted(RANDOMNESS_KEYS)}')
    accepted = RANDOMNESS_KEYS[name]
    if not isinstance(value, accepted) or (accepted == (int, type(None)) and isinstance(value, bool)):
        names = ' or '.join('None' if t is type(None) else t.__name__ for t in accepted)
        raise ValueError(f'--cfg-options {key}={value!r}: accepted {names}')
    if name == 'seed' and value is not None and not 0 <= value < 2**32:  # numpy's seeding range
        raise ValueError(f'--cfg-options {key}={value!r}: accepted 0 to 2**32 - 1, or None')


CONFIG_SUFFIXES = ('.py', '.yml', '.yaml', '.json')  # what mmengine's Config.fromfile reads


def read_config(path: str, label: str = 'config') -> Config:
    """``Config.fromfile(path)``, or a ValueError naming ``label``, the file and what is wrong with
    it (a syntax error, a name or import that fails as mmengine runs it, a YAML/JSON error, a
    ``_base_`` that is missing), where it is, if it can be told."""
    if not osp.isfile(path):
        raise ValueError(f'{label} {path!r}: no such file')
    if not path.lower().endswith(CONFIG_SUFFIXES):
        raise ValueError(f'{label} {path!r}: mmengine reads configs named *.py, *.yml, *.yaml or '
                         f'*.json, not {osp.splitext(path)[1] or "a name without a suffix"}')
    try:
        return Config.fromfile(path)
    except SyntaxError as exc:  # mmengine parses the top file as '<unknown>'
        where = path if exc.filename in (None, '<unknown>') else exc.filename
        raise ValueError(f'{label} {where!r} has a syntax error at line {exc.lineno}: {exc.msg}: '
                         f'{(exc.text or "").strip()}') from exc
    except FileNotFoundError as exc:  # a _base_ (or a file it reads) that is not there
        raise ValueError(f'{label} {path!r}: {exc.strerror}: {exc.filename!r}') from exc
    except Exception as exc:  # whatever running a config raised: NameError, ImportError, ...
        raise ValueError(f'{label} {path!r} cannot be read: {_where_config_failed(exc)}'
                         f'{type(exc).__name__}{": " if str(exc) else ""}{exc}') from exc


def _where_config_failed(exc: Exception) -> str:
    """``'line N of FILE (CODE): '`` for the config line (top file or a base) that raised
    ``exc`` as mmengine ran it, or ``''``; with what mmengine's new-style configs allow when a
    name imported there was called."""
    import traceback

    import mmengine
    library = osp.dirname(osp.realpath(mmengine.__file__))
    frames = traceback.extract_tb(exc.__traceback__)
    lines = [frame for frame in frames if frame.name == '<module>'
             and not osp.realpath(frame.filename).startswith(library)]
    if not lines:
        return ''
    frame = lines[-1]
    lazy = any(osp.basename(f.filename) == 'lazy.py' and osp.realpath(f.filename).startswith(library)
               for f in frames[frames.index(frame):])
    hint = (' (a config that imports modules is read as an mmengine new-style config, whose '
            'imported names can be referred to, not called)' if lazy else '')
    return f'line {frame.lineno} of {frame.filename} ({(frame.line or "").strip()}){hint}: '


def load_config(path: str, cfg_options: Optional[Dict[str, object]] = None,
                work_dir: Optional[str] = None, launcher: str = 'none') -> Config:
    """``Config.fromfile`` + ``--cfg-options`` + work dir, as the mmdet/mmseg tools do it; a pipeline
    variable of the config as written that reaches no dataloader is warned of."""
    from .checks import warn_of_unused_pipelines
    cfg = read_config(path)
    warn_of_unused_pipelines(cfg)  # before --cfg-options, which edit the dataloaders' pipelines
    cfg.launcher = launcher
    if cfg_options:
        check_cfg_options(cfg, cfg_options)
        open_none_parents(cfg, cfg_options)
        cfg.merge_from_dict(cfg_options)
    library_of(cfg)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


# Used when an mmdet config has no TTA of its own: horizontal flip, merged by NMS.
DEFAULT_DET_TTA_MODEL = dict(type='DetTTAModel',
                             tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))


def enable_tta(cfg: Config, library: str) -> None:
    """Test-time augmentation (``--tta``): the config's ``tta_model`` wraps its model (mmdet
    configs without one get :data:`DEFAULT_DET_TTA_MODEL`) and its ``tta_pipeline`` replaces the
    test dataset's pipeline."""
    from .checks import innermost_datasets
    if library == 'mmdet' and 'tta_model' not in cfg:
        cfg.tta_model = ConfigDict(DEFAULT_DET_TTA_MODEL)
    if 'tta_pipeline' not in cfg:
        raise ValueError(f'--tta: the config has no tta_pipeline (library {library})')
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    datasets = innermost_datasets(cfg.test_dataloader.dataset)  # each of a ConcatDataset's
    test_scales, tta_scales = _resize_scales(datasets[0].get('pipeline')), _resize_scales(cfg.tta_pipeline)
    if test_scales and tta_scales and not {s for s, _ in test_scales} & {s for s, _ in tta_scales}:
        test_scales, tta_scales = [shown for _, shown in test_scales], [shown for _, shown in tta_scales]
        from mmengine.logging import print_log
        print_log(f'davit_mm: --tta: the tta_pipeline resizes to {sorted(tta_scales)}, none of them the '
                  f'test pipeline\'s {sorted(test_scales)}: a config that changes the test scale sets '
                  f'its tta_pipeline too (else the inherited one runs)', logger='current', level=30)
    for dataset in datasets:
        dataset.pipeline = cfg.tta_pipeline


def _resize_scales(node) -> List[Tuple[tuple, tuple]]:
    """(compared, shown) for the ``scale`` of every Resize in a pipeline config, TestTimeAug's
    choices included; compared as sorted sides where the aspect ratio is kept ((1333, 800) fits an
    image as (800, 1333) does)."""
    from .checks import type_name
    if isinstance(node, dict):
        scale = node.get('scale')
        found = [(tuple(sorted(scale)) if node.get('keep_ratio') else tuple(scale), tuple(scale))] \
            if type_name(node.get('type')) == 'Resize' and isinstance(scale, (list, tuple)) else []
        return found + [s for value in node.values() for s in _resize_scales(value)]
    if isinstance(node, (list, tuple)):
        return [s for value in node for s in _resize_scales(value)]
    return []


# ------------------------------------------------------------------------- the machine
_SYNC_BN_TYPES = ('SyncBN', 'SyncBatchNorm', 'MMSyncBN')


def _replace_sync_bn(node) -> int:
    """Turn every SyncBN norm config inside a (nested) config into BN; returns how many."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') in _SYNC_BN_TYPES:
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_sync_bn(value)
    return count


def adapt_config_to_machine(cfg, launcher: str = 'none', training: bool = True) -> List[str]:
    """Make one config run unchanged on 8 GPUs, 1 GPU or a CPU-only machine; returns what changed.

    The single place davit_mm's tools adapt a config to the machine (and refuse what cannot run:
    training with mixed precision without a GPU; ``training=False`` for the tools that only
    build the model, which never build the optimizer wrapper):

    - SyncBN (mmseg's UperNet bases; davit_mm's configs keep the official BN) only works on CUDA
      with several processes, and has no CPU implementation: it becomes BN for a non-distributed
      or CPU-only run.
    - Upstream problem: mmengine 0.10.7's ``_init_dist_pytorch`` calls ``torch.cuda.set_device``
      and its runner wraps the model in DDP with ``device_ids=[LOCAL_RANK]`` unconditionally, so
      ``--launcher pytorch`` cannot run on a machine without CUDA. Here the process group is
      initialised with gloo first (mmengine then skips its own init) and the wrapper gets
      ``device_ids=None``, which is what DDP needs for CPU modules.
    """
    distributed = launcher != 'none'
    cuda = torch.cuda.is_available()
    notes = []
    optim_wrapper = cfg.get('optim_wrapper') or {}
    if training and optim_wrapper.get('type') == 'AmpOptimWrapper' and not cuda:
        raise ValueError("optim_wrapper.type='AmpOptimWrapper' (--amp or an *_amp config) needs a "
                         "GPU: mmengine's AmpOptimWrapper supports cuda/npu/mlu/musa only, and this "
                         "machine has no CUDA device; train without --amp here")
    if not (distributed and cuda):
        converted = _replace_sync_bn(cfg.get('model', {}))
        if converted:
            notes.append(f'SyncBN -> BN in {converted} norm configs (SyncBN needs CUDA and several '
                         f'processes)')
    if distributed and not cuda:
        if launcher != 'pytorch':
            raise ValueError(f'--launcher {launcher!r} needs CUDA; on a CPU-only machine use '
                             f"--launcher 'pytorch' (tools/dist_train.sh / dist_test.sh)")
        env_cfg = cfg.setdefault('env_cfg', {})
        env_cfg['dist_cfg'] = dict(env_cfg.get('dist_cfg', {}), backend='gloo')
        if not dist.is_initialized():
            dist.init_process_group(backend='gloo')
        wrapper = dict(cfg.get('model_wrapper_cfg') or dict(
            type='MMDistributedDataParallel', broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False)))
        wrapper['device_ids'] = None
        cfg.model_wrapper_cfg = wrapper
        notes.append('no CUDA: distributed over gloo, DDP without device_ids')
    return notes


# --------------------------------------------------------------------------------- running
@contextlib.contextmanager
def config_build_errors() -> Iterator[None]:
    """Within this block, a ``KeyError`` from building what a config describes (a type no registry
    has, or a key the config lacks) is a user error: ``ValueError`` naming it."""
    try:
        yield
    except KeyError as exc:
        raise ValueError(f'the config cannot be built: {exc.args[0] if exc.args else exc}') from exc


def build_model(cfg: Config) -> torch.nn.Module:
    """The config's model (as initialised when built: ``init_weights`` is not called), built in
    its library's scope; what cannot be built is a config error (:func:`config_build_errors`)."""
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(library_of(cfg))
    with config_build_errors():
        return MODELS.build(cfg.model)


def _main_process_only(function) -> Optional[Callable]:
    """The function mmengine's ``master_only`` wraps in ``function``; None for any other."""
    from mmengine.dist import master_only
    wrapper_code = master_only(len).__code__
    if getattr(function, '__code__', None) is wrapper_code:
        return function.__wrapped__
    return None


def draw_on_every_process(visualizer) -> None:
    """Let every process of a run draw with ``visualizer``. mmdet's and mmseg's visualizers draw
    on the main process only (their ``add_datasample`` and ``add_image``, and ``dataset_meta``,
    through which the test loop hands them the class names, are mmengine's ``master_only``), so
    with N processes ``tools/test.py --show-dir`` drew only the main process's share of the test
    images. This gives ``visualizer`` a subclass of its class with the functions ``master_only``
    wraps: each process draws its own images (their files are named after the images). What is
    not so wrapped is left as it is."""
    import inspect
    cls = type(visualizer)
    plain = {}
    for name in ('add_datasample', 'add_image'):
        function = _main_process_only(getattr(cls, name))
        if function is not None:
            plain[name] = function
    meta = inspect.getattr_static(cls, 'dataset_meta', None)
    if isinstance(meta, property):
        get, put = (_main_process_only(f) or f for f in (meta.fget, meta.fset))
        if (get, put) != (meta.fget, meta.fset):
            plain['dataset_meta'] = property(get, put)
    if plain:
        visualizer.__class__ = type(cls.__name__, (cls, ), plain)


def add_checkpoint_hooks(cfg: Config) -> None:
    """What davit_mm's runtime config gives its configs, given to any other config the tools run
    (one that puts DaViT into an mmdet/mmseg config, as the README shows): davit_mm's hooks
    (exact resumption, official whole-model files, runner checkpoints under ``weights_only``) in
    ``custom_hooks`` where they are not already, and checkpoints written atomically where the
    checkpoint hook names no storage backend."""
    from .registry import ATOMIC_BACKEND

    # A list assigned, not cfg.setdefault: a Config keeps a converted copy of the default it is
    # given, so appending to what setdefault returns changed nothing (mmdet's and mmseg's own
    # runtimes have no custom_hooks).
    hooks = list(cfg.get('custom_hooks') or [])
    for hook in ('RandomStateHook', 'OfficialCheckpointHook', 'RunnerCheckpointsHook'):
        if not any(h.get('type') == hook for h in hooks):
            hooks.append(dict(type=hook))
    cfg.custom_hooks = hooks
    checkpoint = (cfg.get('default_hooks') or {}).get('checkpoint')
    if (isinstance(checkpoint, dict) and checkpoint.get('type') in ('CheckpointHook', None)
            and not checkpoint.get('backend_args') and not checkpoint.get('file_client_args')):
        checkpoint['backend_args'] = dict(backend=ATOMIC_BACKEND)


def build_runner(cfg: Config, training: bool = True):
    """A runner (the config's ``runner_type`` or mmengine's), after adapting the config to the
    machine (:func:`adapt_config_to_machine`; ``training=False`` for a runner that only tests)
    and adding davit_mm's checkpoint hooks to configs not based on davit_mm's runtime config. A
    ``load_from`` URL is replaced by its cached download (:func:`davit_mm.fileio.resolve_checkpoint`)."""
    from mmengine.logging import print_log
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    notes = adapt_config_to_machine(cfg, cfg.get('launcher', 'none'), training)
    add_checkpoint_hooks(cfg)
    compat.make_evaluator_output_dirs(cfg, ('val', ) if training else ('test', ))
    with config_build_errors():
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    for note in notes:
        print_log(f'davit_mm: {note}', logger='current')
    url = cfg.get('load_from')
    if url and is_url(url):
        # The copy davit_mm's checks read (downloaded once per node, now that the process group is
        # up), which mmengine would otherwise download again into its own cache, offline or not.
        cfg.load_from = runner._load_from = resolve_checkpoint(url)
        print_log(f'davit_mm: load_from {url} is read from {cfg.load_from}', logger='current')
    return runner


@contextlib.contextmanager
def run_guarded(cfg: Config) -> Iterator[None]:
    """Run a runner's train/test: a failure that a dataset without samples caused (deep in a data
    loader, with numpy's or torch's words) is reported as that, naming the dataloader
    (:func:`davit_mm.checks.empty_datasets`); the process group is closed in any case
    (:func:`close_distributed`)."""
    failed = True
    try:
        yield
        failed = False
    except ValueError as exc:
        from .checks import empty_datasets
        empty = empty_datasets(cfg)
        if empty:
            raise ValueError(f'{", ".join(empty)}: the dataset has no samples: an annotation file '
                             f'without images or objects, metainfo classes that name none of its '
                             f'categories, or every image filtered out by filter_cfg '
                             f'(filter_empty_gt=True drops images without objects)') from exc
        raise
    finally:
        close_distributed(wait_for_others=not failed)


def close_distributed(wait_for_others: bool = True) -> None:
    """Tear the process group down once the run is over.

    Upstream problem: mmengine 0.10.7 never destroys the process group it (or
    :func:`adapt_config_to_machine`) created; a process then exiting while gloo's threads are
    still running can die with "terminate called without an active exception" (SIGABRT) after
    a successful run, and NCCL warns about the leak. Destroying the group is not enough while
    the runner lives: its DDP wrapper holds the group, whose threads then meet the interpreter's
    shutdown (2-process gloo training aborted so in 3 of 22 runs on 2 loaded cores; 0 of 80 with
    the runner freed first). So the tools drop their runner inside :func:`run_guarded`, and this
    collects the runner's reference cycles before anything else. After a successful run, a
    barrier keeps ranks from tearing down while others still communicate; after a failure there
    is none (the other ranks may never arrive).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()
