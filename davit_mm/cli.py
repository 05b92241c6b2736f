"""What tools/train.py, tools/test.py and demo/image_demo.py share: reading a config the way the
mmdet/mmseg tools do, with clear errors, and building a runner adapted to the machine."""
import contextlib
import difflib
import os.path as osp
import warnings
from typing import Dict, Optional, Tuple

from mmengine.config import Config, ConfigDict

from . import compat

# mmengine 0.10.7 resolves mmdet::/mmseg:: bases through the deprecated pkg_resources API.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')

LIBRARIES = ('mmdet', 'mmseg')


def library_of(cfg: Config) -> str:
    """``'mmdet'`` or ``'mmseg'``, from the config's ``default_scope``."""
    scope = cfg.get('default_scope')
    if scope not in LIBRARIES:
        raise ValueError(f'default_scope={scope!r} in the config: davit_mm tools run mmdet and '
                         f'mmseg configs, accepted {LIBRARIES}')
    return scope


def add_launch_arguments(parser) -> None:
    """``--cfg-options``, ``--launcher`` and ``--local_rank``, as mmdet's and mmseg's tools have."""
    from mmengine.config import DictAction
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.with_cp=True')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_launch_arguments(parser, argv=None):
    """Parse, and export LOCAL_RANK for launchers that pass it as an argument."""
    import os
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


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
            if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if isinstance(node, dict) and part in node:
                node = node[part]
                continue
            where = '.'.join(parts[:depth]) or 'the config'
            choices = list(node) if isinstance(node, dict) else [str(i) for i in range(len(node))] \
                if isinstance(node, (list, tuple)) else []
            close = difflib.get_close_matches(part, choices, n=3)
            hint = f'; did you mean {", ".join(close)}?' if close else \
                f'; it has {sorted(choices)[:12]}' if choices else ''
            raise ValueError(f'--cfg-options {key}: {where} has no key {part!r}{hint}')


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


def load_config(path: str, cfg_options: Optional[Dict[str, object]] = None,
                work_dir: Optional[str] = None, launcher: str = 'none') -> Config:
    """``Config.fromfile`` + ``--cfg-options`` + work dir, as the mmdet/mmseg tools do it."""
    if not osp.isfile(path):
        raise ValueError(f'config {path!r}: no such file')
    try:
        cfg = Config.fromfile(path)
    except SyntaxError as exc:  # mmengine parses the top file as '<unknown>'
        where = path if exc.filename in (None, '<unknown>') else exc.filename
        raise ValueError(f'config {where!r} has a syntax error at line {exc.lineno}: {exc.msg}: '
                         f'{(exc.text or "").strip()}') from exc
    cfg.launcher = launcher
    if cfg_options:
        check_cfg_options(cfg, cfg_options)
        cfg.merge_from_dict(cfg_options)
    library_of(cfg)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


def build_runner(cfg: Config):
    """A runner (the config's ``runner_type`` or mmengine's), after adapting the config to the
    machine (:func:`davit_mm.compat.adapt_config_to_machine`)."""
    from mmengine.logging import print_log
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    notes = compat.adapt_config_to_machine(cfg, cfg.get('launcher', 'none'))
    hooks = cfg.setdefault('custom_hooks', [])
    if not any(hook.get('type') == 'OfficialCheckpointHook' for hook in hooks):
        hooks.append(dict(type='OfficialCheckpointHook'))  # configs not based on davit_runtime.py
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    for note in notes:
        print_log(f'davit_mm: {note}', logger='current')
    return runner


def innermost_dataset(dataset_cfg: ConfigDict) -> ConfigDict:
    """The dataset config inside wrappers such as RepeatDataset/ConcatDataset's first member."""
    while 'dataset' in dataset_cfg:
        dataset_cfg = dataset_cfg['dataset']
    return dataset_cfg


# ------------------------------------------------------------------------------ input checks
def _joined(root: str, path: str) -> str:
    return path if not root or osp.isabs(path) else osp.join(root, path)


def check_data_paths(cfg: Config, splits=('train', 'val')) -> None:
    """Refuse dataloaders whose data root, annotation file or image/label folders do not exist,
    naming the dataloader and the path (mmdet/mmseg would fail later, deep in dataset code)."""
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader or (split != 'train' and cfg.get(f'{split}_cfg') is None):
            continue
        dataset = innermost_dataset(loader['dataset'])
        root = dataset.get('data_root') or ''
        where = f'{split}_dataloader.dataset'
        if '://' in root:
            continue  # remote storage: nothing to check locally
        if root and not osp.isdir(root):
            raise ValueError(f'{where}.data_root={root!r} does not exist (working directory '
                             f'{osp.abspath(".")}); point it at your data, e.g. --cfg-options '
                             f'{where}.data_root=/path/to/data/')
        ann_file = dataset.get('ann_file') or ''
        if ann_file and not osp.isfile(_joined(root, ann_file)):
            raise ValueError(f'{where}.ann_file={ann_file!r}: {_joined(root, ann_file)!r} does not exist')
        for key, folder in (dataset.get('data_prefix') or {}).items():
            if folder and '://' not in folder and not osp.isdir(_joined(root, folder)):
                raise ValueError(f'{where}.data_prefix.{key}={folder!r}: folder '
                                 f'{_joined(root, folder)!r} does not exist')


def _dataset_classes(dataset_cfg) -> Optional[tuple]:
    classes = (dataset_cfg.get('metainfo') or {}).get('classes')
    if classes is not None:
        return tuple(classes)
    from mmengine.registry import DATASETS
    dataset_type = DATASETS.get(dataset_cfg.get('type', ''))
    meta = getattr(dataset_type, 'METAINFO', None) or {}
    return tuple(meta['classes']) if 'classes' in meta else None


def _num_classes_fields(node, path='model'):
    """(path, value) of every ``num_classes`` in a model config, except class-agnostic RPN heads."""
    if isinstance(node, dict):
        if 'RPN' in str(node.get('type', '')):
            return
        for key, value in node.items():
            if key == 'num_classes' and isinstance(value, int):
                yield f'{path}.num_classes', value
            else:
                yield from _num_classes_fields(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _num_classes_fields(value, f'{path}.{i}')


def check_num_classes(cfg: Config, split: str = 'train') -> None:
    """Refuse heads whose ``num_classes`` differs from the dataset's class count (mmdet would train,
    then fail or mislabel at evaluation)."""
    loader = cfg.get(f'{split}_dataloader')
    if not loader:
        return
    from mmengine.registry import init_default_scope
    init_default_scope(library_of(cfg))
    classes = _dataset_classes(innermost_dataset(loader['dataset']))
    if classes is None:
        return
    for path, value in _num_classes_fields(cfg.model):
        if value != len(classes):
            raise ValueError(f'{path}={value} but {split}_dataloader.dataset has {len(classes)} '
                             f'classes {classes[:5]}{"..." if len(classes) > 5 else ""}: set '
                             f'num_classes={len(classes)} in every head, or the dataset metainfo')


# ------------------------------------------------------------------------- checkpoint checks
_CLASS_SPECIFIC = ('cls', 'conv_seg', 'conv_logits', 'fc_reg')


def read_training_checkpoint(path: str) -> dict:
    """A checkpoint written by tools/train.py (or mmdet/mmseg), fully read with weights_only, or
    a ValueError saying why it cannot be one (missing, truncated, corrupt, not a checkpoint)."""
    from .checkpoint import load_torch_file
    if not osp.isfile(path):
        raise ValueError(f'checkpoint {path!r}: no such file')
    checkpoint = load_torch_file(path)  # its CheckpointError is a ValueError
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict', checkpoint), dict):
        raise ValueError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, not a model checkpoint')
    return checkpoint


def check_checkpoint_fits(model, path: str, allow_class_mismatch: bool = False,
                          checkpoint: Optional[dict] = None) -> str:
    """Compare a detector/segmentor checkpoint with the built model, key by key.

    Evaluating (``allow_class_mismatch=False``) needs every weight present with its shape.
    Fine-tuning from it (``True``) may differ in the class-count-dependent layers of the heads
    (another ``num_classes``), which are then left at init; returns a one-line note about them.
    ``checkpoint`` is the file's content when it was already read. A whole detector/segmentor of
    the official DaViT code is compared as converted for this model
    (:func:`davit_mm.checkpoint.adapt_model_checkpoint`), which is how it is loaded.

    Raises:
        ValueError: an unreadable file (:func:`read_training_checkpoint`), missing/unexpected
            keys or other shape mismatches (another model or size), naming the first ones.
    """
    from .checkpoint import adapt_model_checkpoint
    state = checkpoint if checkpoint is not None else read_training_checkpoint(path)
    while hasattr(model, 'module'):  # DDP and test-time-augmentation wrappers
        model = model.module
    state, _ = adapt_model_checkpoint(model, state, path)  # official detectors/segmentors
    state = state.get('state_dict', state)
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    class_layers = [k for k in mismatched if any(p in k.split('.')[-2] for p in _CLASS_SPECIFIC)]
    if allow_class_mismatch and set(mismatched) == set(class_layers):
        mismatched = []
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            problems.append('shape mismatches: ' + ', '.join(
                f'{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}' for k in mismatched[:4]))
        if missing:
            problems.append(f'{len(missing)} model weights missing, e.g. {missing[:4]}')
        if unexpected:
            problems.append(f'{len(unexpected)} keys the model does not have, e.g. {unexpected[:4]}')
        hint = (' (its class-specific layers differ: was it trained with another num_classes?)'
                if class_layers else '')
        raise ValueError(f'checkpoint {path!r} does not fit the config\'s model{hint}: ' + '; '.join(problems))
    from .checkpoint import check_tensors
    check_tensors({k: v for k, v in state.items() if k not in class_layers}, own, f'checkpoint {path!r}')
    if class_layers:
        return (f'{len(class_layers)} class-specific tensors of {path} differ in shape (another '
                f'num_classes) and stay at init: {", ".join(class_layers[:6])}')
    return ''


def latest_valid_checkpoint(work_dir: str) -> Optional[Tuple[str, dict]]:
    """``(path, content)`` of the newest checkpoint in ``work_dir`` that loads, for ``--resume``
    without a path.

    mmengine takes whatever ``last_checkpoint`` names; a checkpoint truncated by a kill (with
    writers other than davit_mm's atomic one) would then stop the resume with a load error.
    Broken candidates are skipped with a warning naming them; None when there is none.
    """
    import glob
    import re

    from mmengine.logging import print_log
    candidates = []
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if named:
            candidates.append(named)
    numbered = []
    for path in glob.glob(osp.join(osp.abspath(work_dir), '*.pth')):
        match = re.search(r'(epoch|iter)_(\d+)\.pth$', path)
        if match:
            numbered.append((int(match[2]), path))
    candidates += [path for _, path in sorted(numbered, reverse=True)]
    seen, broken = set(), []
    for path in candidates:
        # last_checkpoint holds an absolute path, the glob the work dir's spelling of it
        if osp.realpath(path) in seen:
            continue
        seen.add(osp.realpath(path))
        try:
            content = read_training_checkpoint(path)
        except ValueError as exc:
            print_log(f'davit_mm: not resuming from {path}: {exc}', logger='current', level=30)
            broken.append(path)
            continue
        if broken:
            print_log(f'davit_mm: resuming from {path}, the newest complete checkpoint in '
                      f'{work_dir} (skipped: {", ".join(broken)})', logger='current')
        return path, content
    return None


@contextlib.contextmanager
def run_guarded():
    """Run a runner's train/test: turn the error an empty dataset causes deep in a data loader into
    one that says so, and close the process group afterwards (:func:`compat.close_distributed`)."""
    empty = ('need at least one array to concatenate',  # mmengine serialising an empty dataset
             'num_samples should be a positive integer', 'num_samples=0')
    try:
        yield
    except ValueError as exc:
        if any(text in str(exc) for text in empty):
            raise ValueError('a dataset has no samples: an annotation file without images or '
                             'objects, metainfo classes that name none of its categories, or '
                             'every image filtered out by filter_cfg (filter_empty_gt=True drops '
                             'images without objects)') from exc
        raise
    compat.close_distributed()
