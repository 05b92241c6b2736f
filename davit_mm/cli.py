"""What tools/train.py, tools/test.py and demo/image_demo.py share: reading a config the way the
mmdet/mmseg tools do, with clear errors, and building a runner adapted to the machine."""
import difflib
import os.path as osp
import warnings
from typing import Dict, Optional

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


def check_cfg_options(cfg: Config, options: Dict[str, object]) -> None:
    """Refuse ``--cfg-options`` keys whose parent does not exist (typos would silently add keys).

    A new leaf under an existing dict (``model.backbone.with_cp=True``) is fine; indices into
    lists (``train_dataloader.dataset.pipeline.2.scale``) are followed as mmengine does.
    """
    for key in options:
        node = cfg._cfg_dict if isinstance(cfg, Config) else cfg
        parts = key.split('.')
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


def load_config(path: str, cfg_options: Optional[Dict[str, object]] = None,
                work_dir: Optional[str] = None, launcher: str = 'none') -> Config:
    """``Config.fromfile`` + ``--cfg-options`` + work dir, as the mmdet/mmseg tools do it."""
    if not osp.isfile(path):
        raise ValueError(f'config {path!r}: no such file')
    cfg = Config.fromfile(path)
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
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    for note in notes:
        print_log(f'davit_mm: {note}', logger='current')
    return runner


def innermost_dataset(dataset_cfg: ConfigDict) -> ConfigDict:
    """The dataset config inside wrappers such as RepeatDataset/ConcatDataset's first member."""
    while 'dataset' in dataset_cfg:
        dataset_cfg = dataset_cfg['dataset']
    return dataset_cfg
