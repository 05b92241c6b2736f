"""Pre-flight checks of a config, run by the tools before the (slow) runner is built.

Each check raises a ValueError naming the config key, its value and what it has to match, where
mmdet/mmseg would fail later: at the first iteration deep in the FPN (channel counts), with a bare
AssertionError (more feature maps than the neck takes), with a JSONDecodeError that names no file
(annotation files), deep in a data loader (missing folders, empty datasets) or at evaluation
(class counts). :func:`empty_datasets` diagnoses, after the fact, a run that failed on a dataset
without samples.
"""
import json
import os
import os.path as osp
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

# Annotation files up to this size are parsed in full; larger ones (COCO train, ~450 MB) are
# checked at both ends, which catches files that are not JSON or were cut off.
_FULL_JSON_PARSE_BYTES = 64 * 2**20


def preflight(cfg: Config, splits: Sequence[str] = ('train', 'val')) -> None:
    """Every check of this module for the dataloaders ``splits``: data roots and folders,
    annotation files, class counts, and the channels between backbone, neck and heads (pipeline
    variables that reach no dataloader: :func:`davit_mm.cli.load_config`, before --cfg-options)."""
    if 'train' in splits:
        check_schedule(cfg)
        check_mask_annotations(cfg)
    check_data_paths(cfg, splits)
    check_seg_folders(cfg, splits)
    check_annotation_files(cfg, splits)
    check_seg_classes(cfg, splits)
    check_evaluators(cfg, splits)
    check_reduce_zero_label(cfg, splits)
    check_num_classes(cfg, 'train' if 'train' in splits else splits[0], splits)
    check_channels(cfg)


# ------------------------------------------------------------------------- the schedule
def check_schedule(cfg: Config) -> None:
    """The training loop's lengths and intervals are whole numbers >= 1: with ``max_epochs=0``
    mmengine trained nothing and exited 0, with ``val_interval=0`` it trained a whole epoch and
    then stopped with ZeroDivisionError; so ``auto_scale_lr.base_batch_size`` where it is used."""
    train_cfg = cfg.get('train_cfg') or {}
    for name in ('max_epochs', 'max_iters', 'val_interval'):
        if name in train_cfg:
            _check_count(f'train_cfg.{name}', train_cfg[name])
    auto_scale_lr = cfg.get('auto_scale_lr') or {}
    if auto_scale_lr.get('enable') and 'base_batch_size' in auto_scale_lr:
        _check_count('auto_scale_lr.base_batch_size', auto_scale_lr['base_batch_size'])


def _check_count(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{key}={value!r}: accepted a whole number >= 1')


# ------------------------------------------------------------------------- data and classes
def keyed_datasets(dataset_cfg: ConfigDict, key: str = 'dataset') -> List[Tuple[str, ConfigDict]]:
    """(config key, dataset config) of each dataset config inside wrappers: RepeatDataset's /
    ClassBalancedDataset's ``dataset`` and each member of a ConcatDataset's ``datasets``, ``key``
    being where ``dataset_cfg`` is (``dataset.datasets.1`` for a ConcatDataset's second member,
    as ``--cfg-options`` names it)."""
    if 'dataset' in dataset_cfg:
        return keyed_datasets(dataset_cfg['dataset'], f'{key}.dataset')
    if isinstance(dataset_cfg.get('datasets'), (list, tuple)):
        return [leaf for i, member in enumerate(dataset_cfg['datasets'])
                for leaf in keyed_datasets(member, f'{key}.datasets.{i}')]
    return [(key, dataset_cfg)]


def innermost_datasets(dataset_cfg: ConfigDict) -> List[ConfigDict]:
    """The dataset configs of :func:`keyed_datasets`, without their keys."""
    return [dataset for _, dataset in keyed_datasets(dataset_cfg)]


def innermost_dataset(dataset_cfg: ConfigDict) -> ConfigDict:
    """The first of :func:`innermost_datasets`."""
    return innermost_datasets(dataset_cfg)[0]


def _is_remote(path: str) -> bool:
    return '://' in path


def _joined(root: str, path: str) -> str:
    return path if not root or osp.isabs(path) or _is_remote(path) else osp.join(root, path)


def _datasets_that_run(cfg: Config, splits: Sequence[str]) -> Iterator[Tuple[str, str, ConfigDict]]:
    """(split, config key, innermost dataset config) of each of ``splits`` whose dataloader the
    run uses (val/test only with a ``val_cfg``/``test_cfg``), every member of a ConcatDataset;
    the key is the dataset's full one (``train_dataloader.dataset.datasets.1``)."""
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if loader and (split == 'train' or cfg.get(f'{split}_cfg') is not None):
            for key, dataset in keyed_datasets(loader['dataset']):
                yield split, f'{split}_dataloader.{key}', dataset


def _reads_local_files(backend_args: Optional[dict]) -> bool:
    """Whether a dataset's or evaluator's ``backend_args`` read the local file system: not when
    they name another backend or map paths (e.g. to s3 or petrel)."""
    backend_args = backend_args or {}
    return backend_args.get('backend', 'local') == 'local' and not backend_args.get('path_mapping')


def check_data_paths(cfg: Config, splits=('train', 'val')) -> None:
    """Refuse dataloaders whose data root, annotation file or image/label folders do not exist,
    naming the dataloader and the path (mmdet/mmseg would fail later, deep in dataset code)."""
    for _, where, dataset in _datasets_that_run(cfg, splits):
        root = dataset.get('data_root') or ''
        if _is_remote(root) or not _reads_local_files(dataset.get('backend_args')):
            continue  # remote storage: nothing to check locally
        if root and not osp.isdir(root):
            top = cfg.get('data_root')
            unused = f'. The config\'s data_root={top!r} is not this key: in a config that inherits ' \
                f'the dataloaders, set {where}.data_root too' if isinstance(top, str) and top != root else ''
            raise ValueError(f'{where}.data_root={root!r} does not exist (working directory '
                             f'{osp.abspath(".")}); point it at your data, e.g. --cfg-options '
                             f'{where}.data_root=/path/to/data/{unused}')
        ann_file = dataset.get('ann_file') or ''
        if ann_file and not _is_remote(ann_file) and not osp.isfile(_joined(root, ann_file)):
            raise ValueError(f'{where}.ann_file={ann_file!r}: {_joined(root, ann_file)!r} does not exist')
        for key, folder in (dataset.get('data_prefix') or {}).items():
            if folder and not _is_remote(folder) and not osp.isdir(_joined(root, folder)):
                raise ValueError(f'{where}.data_prefix.{key}={folder!r}: folder '
                                 f'{_joined(root, folder)!r} does not exist')


# The pipeline variables of mmdet's and mmseg's configs, and the dataloaders that use them.
_PIPELINE_VARIABLES = (('train_pipeline', ('train', )), ('test_pipeline', ('val', 'test')))


def _pipelines(dataset_cfg: ConfigDict, key: str = 'dataset') -> Iterator[Tuple[str, list]]:
    """(config key, pipeline) of every ``pipeline`` of a dataset config and of the datasets it
    wraps (MultiImageMixDataset has one of its own besides its dataset's)."""
    if isinstance(dataset_cfg, dict):
        if isinstance(dataset_cfg.get('pipeline'), list):
            yield f'{key}.pipeline', dataset_cfg['pipeline']
        yield from _pipelines(dataset_cfg.get('dataset'), f'{key}.dataset')
        for i, member in enumerate(dataset_cfg.get('datasets') or ()):
            yield from _pipelines(member, f'{key}.datasets.{i}')


def warn_of_unused_pipelines(cfg: Config) -> None:
    """Warn of a ``train_pipeline``/``test_pipeline`` that no dataloader runs: set in a config that
    inherits the dataloaders, the variable does not reach them (mmengine substitutes a variable
    only in the file that uses it), and the run went on with the inherited pipeline. For the
    config as written: ``--cfg-options`` edit the dataloaders' pipelines, not the variables."""
    for variable, users in _PIPELINE_VARIABLES:
        pipeline = cfg.get(variable)
        loaders = [f'{split}_dataloader' for split in users if cfg.get(f'{split}_dataloader')]
        if not isinstance(pipeline, list) or not loaders:
            continue
        if all(pipeline not in [p for _, p in _pipelines(cfg[loader].get('dataset'))] for loader in loaders):
            keys = ' / '.join(f'{loader}.dataset.pipeline' for loader in loaders)
            print_log(f'davit_mm: the config sets {variable}, but {keys} is another list, which the '
                      f'run uses: a config that inherits the dataloaders must also set them, e.g. '
                      f'{loaders[0]} = dict(dataset=dict(pipeline={variable}))',
                      logger='current', level=30)


# Image files as the tools take them (demo/image_demo.py lists a folder's with these).
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def check_seg_folders(cfg: Config, splits: Sequence[str] = ('train', 'val')) -> None:
    """mmseg's folder datasets read the images named ``*{img_suffix}`` (``.jpg`` for ADE20K) and
    leave the others out without a word: a warning counts the image files of other suffixes. An
    image without its label map (``*{seg_map_suffix}`` at the same place in the label folder) is
    refused: mmseg stopped at it with a bare FileNotFoundError, at whatever point it came."""
    if cfg.get('default_scope') != 'mmseg':
        return
    for _, where, dataset in _datasets_that_run(cfg, splits):
        prefix = dataset.get('data_prefix') or {}
        dataset_type = _dataset_type(dataset, 'mmseg')
        if dataset.get('ann_file') or prefix.get('img_path') is None or not isinstance(dataset_type, type):
            continue
        folder = _joined(dataset.get('data_root') or '', prefix['img_path'])
        if _is_remote(folder) or not osp.isdir(folder):
            continue
        suffix = _setting(dataset, dataset_type, 'img_suffix', '.jpg')
        files = sorted(osp.relpath(osp.join(d, name), folder)
                       for d, _, names in os.walk(folder) for name in names)
        others = [name for name in files
                  if name.lower().endswith(IMAGE_SUFFIXES) and not name.endswith(suffix)]
        if others:
            print_log(f'davit_mm: {where}: {len(others)} images in {folder!r} are not *{suffix} and are '
                      f'left out ({", ".join(others[:3])}{", ..." if len(others) > 3 else ""}); set '
                      f'{where}.img_suffix to read them', logger='current', level=30)
        labels = prefix.get('seg_map_path')
        if not labels:
            continue
        labels = _joined(dataset.get('data_root') or '', labels)
        if _is_remote(labels) or not osp.isdir(labels):
            continue
        seg_suffix = _setting(dataset, dataset_type, 'seg_map_suffix', '.png')
        label_files = {osp.relpath(osp.join(d, name), labels)
                       for d, _, names in os.walk(labels) for name in names}
        missing = [name for name in files if name.endswith(suffix)
                   and name[:-len(suffix)] + seg_suffix not in label_files]
        if missing:
            raise ValueError(f'{where}: {len(missing)} of the images in {folder!r} have no label map in '
                             f'{labels!r} ({", ".join(missing[:3])}{", ..." if len(missing) > 3 else ""}; '
                             f'each image NAME{suffix} needs NAME{seg_suffix}): add them, or move those '
                             f'images out')


def _dataset_type(dataset_cfg, scope: Optional[str]) -> Optional[type]:
    """The class of a dataset config's ``type``: the class itself in new-style configs, else looked
    up in the registry of ``scope`` (mmdet's/mmseg's datasets are not in mmengine's root one)."""
    kind = dataset_cfg.get('type')
    if isinstance(kind, type):
        return kind
    import importlib

    from mmengine.registry import DATASETS
    scope = dataset_cfg.get('_scope_') or scope
    registry = importlib.import_module(f'{scope}.registry').DATASETS if scope in ('mmdet', 'mmseg') \
        else DATASETS
    return registry.get(kind or '')


def _setting(dataset_cfg, dataset_type: Optional[type], name: str, fallback: object) -> object:
    """A dataset config's ``name``, else the default of its type's constructor, else ``fallback``."""
    if name in dataset_cfg:
        return dataset_cfg[name]
    import inspect
    parameter = inspect.signature(dataset_type).parameters.get(name) if isinstance(dataset_type, type) \
        else None
    return parameter.default if parameter is not None else fallback


def _dataset_classes(dataset_cfg, scope: Optional[str]) -> Optional[tuple]:
    """The classes of a dataset config: its ``metainfo``, else its type's ``METAINFO``."""
    classes = (dataset_cfg.get('metainfo') or {}).get('classes')
    if classes is not None:
        return tuple(classes)
    meta = getattr(_dataset_type(dataset_cfg, scope), 'METAINFO', None) or {}
    return tuple(meta['classes']) if 'classes' in meta else None


def _num_classes_fields(node, path='model'):
    """(path, value) of every ``num_classes`` in a model config, except class-agnostic RPN heads
    and semantic heads (HTC's and SCNet's segment COCO-stuff's 183 classes)."""
    if isinstance(node, dict):
        if any(kind in str(node.get('type', '')) for kind in ('RPN', 'Semantic')) or \
                path.endswith('.semantic_head'):
            return
        for key, value in node.items():
            if key == 'num_classes' and isinstance(value, int):
                yield f'{path}.num_classes', value
            else:
                yield from _num_classes_fields(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _num_classes_fields(value, f'{path}.{i}')


def check_seg_classes(cfg: Config, splits: Sequence[str] = ('train', 'val')) -> None:
    """An mmseg dataset of a type with classes of its own (ADE20KDataset's 150) given other
    ``metainfo.classes``: mmseg reads the label maps in the type's numbering and keeps only those
    classes, relabelled, every other pixel becoming 255 (ignored). Label maps numbering the user's
    own classes then trained on nothing (loss 0, mIoU nan, exit 0): warned of. Names that are not
    the type's classes are refused, pointing at ``BaseSegDataset`` (mmseg's own message does not)."""
    if cfg.get('default_scope') != 'mmseg':
        return
    for _, where, dataset in _datasets_that_run(cfg, splits):
        new = (dataset.get('metainfo') or {}).get('classes')
        dataset_type = _dataset_type(dataset, 'mmseg')
        name = getattr(dataset_type, '__name__', dataset.get('type'))
        old = (getattr(dataset_type, 'METAINFO', None) or {}).get('classes')
        if new is None or not old or list(new) == list(old):
            continue
        own = ("for label maps that number classes of your own (0, 1, ...), use type='BaseSegDataset' "
               "with the img_suffix, seg_map_suffix and reduce_zero_label your files need")
        foreign = [name for name in new if name not in old]
        if foreign:
            raise ValueError(f'{where}.metainfo.classes names {_shortened(foreign)}, which are not among '
                             f'{name}\'s {len(old)} classes: mmseg takes only a subset of '
                             f'them, relabelled; {own}')
        print_log(f'davit_mm: {where} ({name}) keeps {len(new)} of its {len(old)} classes: '
                  f'mmseg reads the label maps in {name}\'s numbering, gives these classes '
                  f'the labels 0..{len(new) - 1} and every other pixel 255 (ignored); {own}',
                  logger='current', level=30)


# The metrics mmdet 3.3's CocoMetric and mmseg 1.2's IoUMetric compute (a KeyError traceback, at
# build or after the whole test, for another name).
COCO_METRICS = ('bbox', 'segm', 'proposal', 'proposal_fast')
IOU_METRICS = ('mIoU', 'mDice', 'mFscore')


def _predicts_masks(model: object) -> bool:
    """Whether a model config has a part that predicts masks (a mask head, a Mask*/SOLO/CondInst
    type): heuristic, for refusing the segm metric on a box detector."""
    if isinstance(model, dict):
        kind = type_name(model.get('type')).lower()
        if any('mask' in str(key).lower() for key in model) or any(
                word in kind for word in ('mask', 'solo', 'condinst', 'ins')):
            return True
        return any(_predicts_masks(value) for value in model.values())
    if isinstance(model, (list, tuple)):
        return any(_predicts_masks(value) for value in model)
    return False


def check_evaluators(cfg: Config, splits: Sequence[str] = ('val', 'test')) -> None:
    """Refuse evaluators that fail only once built or after the whole evaluation: a metric name
    CocoMetric/IoUMetric does not compute, ``segm`` for a model that predicts no masks (a KeyError
    after every image was run), ``format_only`` without ``outfile_prefix``, an ``outfile_prefix``
    or ``output_dir`` that cannot be written (a traceback after the evaluation / when built)."""
    from .cli import check_output_path
    for split in splits:
        if split == 'train' or cfg.get(f'{split}_cfg') is None:
            continue
        evaluators = cfg.get(f'{split}_evaluator') or []
        for i, evaluator in enumerate(_as_list(evaluators)):
            if not isinstance(evaluator, dict):
                continue
            where = f'{split}_evaluator' if isinstance(evaluators, dict) else f'{split}_evaluator.{i}'
            kind = type_name(evaluator.get('type'))
            prefix = evaluator.get('outfile_prefix')
            if isinstance(prefix, str) and prefix:  # PREFIX.bbox.json, ...: its folder is written
                check_output_path(f'{where}.outfile_prefix={prefix!r}: its folder',
                                  osp.dirname(prefix) or '.', folder=True)
            if isinstance(evaluator.get('output_dir'), str):
                check_output_path(f'{where}.output_dir', evaluator['output_dir'], folder=True)
            if kind == 'CocoMetric':
                metrics = _as_list(evaluator.get('metric', 'bbox'))
                unknown = [m for m in metrics if m not in COCO_METRICS]
                if unknown:
                    raise ValueError(f'{where}.metric={evaluator.get("metric")!r}: CocoMetric computes '
                                     f'{list(COCO_METRICS)}, not {unknown}')
                if 'segm' in metrics and cfg.get('model') and not _predicts_masks(cfg.model):
                    raise ValueError(f'{where}.metric={evaluator.get("metric")!r} asks for mask AP, but the '
                                     f'model predicts no masks (no mask head): leave out \'segm\'')
                if evaluator.get('format_only') and not evaluator.get('outfile_prefix'):
                    raise ValueError(f'{where}.format_only=True writes the predictions to files named by '
                                     f'{where}.outfile_prefix, which is not set')
            elif kind == 'IoUMetric':
                metrics = _as_list(evaluator.get('iou_metrics', ['mIoU']))
                unknown = [m for m in metrics if m not in IOU_METRICS]
                if unknown:
                    raise ValueError(f'{where}.iou_metrics={evaluator.get("iou_metrics")!r}: IoUMetric '
                                     f'computes {list(IOU_METRICS)}, not {unknown}')


def check_reduce_zero_label(cfg: Config, splits: Sequence[str] = ('train', 'val')) -> None:
    """An mmseg pipeline's ``LoadAnnotations(reduce_zero_label=...)`` must be its dataset's (mmseg
    stops at the first label map with an AssertionError traceback)."""
    if cfg.get('default_scope') != 'mmseg':
        return
    for _, where, dataset in _datasets_that_run(cfg, splits):
        dataset_type = _dataset_type(dataset, 'mmseg')
        if 'reduce_zero_label' not in dataset and not isinstance(dataset_type, type):
            continue
        reduce = _setting(dataset, dataset_type, 'reduce_zero_label', False)
        for i, step in enumerate(dataset.get('pipeline') or []):
            if isinstance(step, dict) and type_name(step.get('type')) == 'LoadAnnotations' and \
                    step.get('reduce_zero_label') is not None and step['reduce_zero_label'] != reduce:
                raise ValueError(f'{where}.pipeline.{i}.reduce_zero_label={step["reduce_zero_label"]} '
                                 f'but {where} ({type_name(dataset.get("type"))}) has '
                                 f'reduce_zero_label={reduce}: set them alike')


def check_mask_annotations(cfg: Config) -> None:
    """A model with a mask head trains on masks: a training pipeline whose ``LoadAnnotations``
    does not load them stopped at the first iteration with ``AttributeError: 'InstanceData'
    object has no attribute 'masks'``."""
    roi_head = (cfg.get('model') or {}).get('roi_head') or {}
    loader = cfg.get('train_dataloader')
    if not isinstance(roi_head, dict) or not roi_head.get('mask_head') or not loader:
        return
    for key, dataset in keyed_datasets(loader['dataset']):
        for i, step in enumerate(dataset.get('pipeline') or []):
            if isinstance(step, dict) and type_name(step.get('type')) == 'LoadAnnotations' \
                    and not step.get('with_mask'):
                raise ValueError(f'model.roi_head.mask_head trains on masks, but train_dataloader.{key}.'
                                 f'pipeline.{i} (LoadAnnotations) does not load them: add with_mask=True')


def _split_classes(cfg: Config, split: str) -> Tuple[Optional[str], Optional[tuple]]:
    """(dataset key, classes) of ``split``'s dataloader: a ConcatDataset's first member that has
    classes; (None, None) without a dataloader or classes."""
    loader = cfg.get(f'{split}_dataloader')
    if not loader:
        return None, None
    from mmengine.registry import init_default_scope
    if cfg.get('default_scope'):  # None in new-style configs
        init_default_scope(cfg.default_scope)
    members = [(key, _dataset_classes(d, cfg.get('default_scope')))
               for key, d in keyed_datasets(loader['dataset'])]
    return next(((k, c) for k, c in members if c is not None), (None, None))


def _refuse_class_count(path: str, value: int, split: str, key: str, classes: tuple, fix: str) -> None:
    if value != len(classes):
        raise ValueError(f'{path}={value} but {split}_dataloader.{key} has {len(classes)} classes '
                         f'{classes[:5]}{"..." if len(classes) > 5 else ""}: {fix}')


def check_num_classes(cfg: Config, split: str = 'train', splits: Sequence[str] = ()) -> None:
    """Refuse heads whose ``num_classes`` differs from the class count of the dataset of ``split``
    or of ``splits`` (mmdet would train, then fail or mislabel at evaluation), and a
    ``CheckSegMap`` in those splits' pipelines whose ``num_classes`` differs from its dataset's."""
    for pipeline_split in dict.fromkeys((split, *splits)):
        key, classes = _split_classes(cfg, pipeline_split)
        if classes is None or (pipeline_split != 'train' and cfg.get(f'{pipeline_split}_cfg') is None):
            continue  # (a val/test dataloader runs only with its val_cfg/test_cfg)
        # the heads against every split's dataset: a val set of other classes failed after a
        # whole epoch (IndexError in CocoMetric)
        for path, value in _num_classes_fields(cfg.model):
            _refuse_class_count(path, value, pipeline_split, key, classes,
                                f'set num_classes={len(classes)} in every head, or the dataset metainfo')
        for where, pipeline in _pipelines(cfg[f'{pipeline_split}_dataloader']['dataset']):
            for path, value in _num_classes_fields(pipeline, f'{pipeline_split}_dataloader.{where}'):
                _refuse_class_count(path, value, pipeline_split, key, classes, _seg_map_fix(path, classes))


def check_tta_num_classes(cfg: Config) -> None:
    """``--tta``: a ``CheckSegMap`` in the ``tta_pipeline`` (which replaces the test pipeline) whose
    ``num_classes`` differs from the test set's, named by its ``tta_pipeline`` key."""
    key, classes = _split_classes(cfg, 'test')
    if classes is not None:
        for path, value in _num_classes_fields(cfg.get('tta_pipeline'), 'tta_pipeline'):
            _refuse_class_count(path, value, 'test', key, classes, _seg_map_fix(path, classes))


def _seg_map_fix(path: str, classes: tuple) -> str:
    return (f'set num_classes={len(classes)} in its CheckSegMap (a config inheriting the pipeline '
            f'cannot edit one step of it: write the train, val, test and TTA pipelines anew, or pass '
            f'--cfg-options {path}={len(classes)})')


def empty_datasets(cfg: Config, splits: Sequence[str] = ('train', 'val', 'test')) -> List[str]:
    """The dataloaders of ``splits`` whose dataset holds no samples once loaded and filtered (an
    annotation file without images or objects, metainfo classes that name none of its categories,
    every image dropped by ``filter_cfg``). Builds each dataset without serialising it; for
    diagnosing a run that failed, not for every run (it reads the annotation files again)."""
    import copy

    from mmengine.registry import DATASETS, init_default_scope
    if cfg.get('default_scope'):  # None in new-style configs
        init_default_scope(cfg.default_scope)
    empty = []
    for split in splits:
        loader = cfg.get(f'{split}_dataloader')
        if not loader or 'dataset' not in loader:
            continue
        dataset_cfg = copy.deepcopy(innermost_dataset(loader['dataset']))
        dataset_cfg['lazy_init'] = True
        try:
            dataset = DATASETS.build(dataset_cfg)
            dataset.data_list = dataset.load_data_list()
            if not dataset.filter_data():
                empty.append(f'{split}_dataloader')
        except Exception:  # noqa: BLE001 - a dataset that cannot even load is not "empty"
            continue
    return empty


# ------------------------------------------------------------------------------ channels
def backbone_out_channels(backbone: dict) -> Optional[List[int]]:
    """Channels of each feature map a DaViT backbone config returns (None for other backbones).

    Raises:
        ValueError/TypeError: an invalid ``arch`` (from :func:`davit_mm.models.resolve_arch`).
    """
    if backbone.get('type') != 'DaViT':
        return None
    from .models import resolve_arch
    embed_dims = resolve_arch(backbone.get('arch', 'tiny'))['embed_dims']
    out_indices = backbone.get('out_indices', (0, 1, 2, 3))
    if not all(isinstance(i, int) and -len(embed_dims) <= i < len(embed_dims) for i in out_indices):
        return None  # the backbone itself refuses these, naming the accepted range
    return [embed_dims[i] for i in sorted(i % len(embed_dims) for i in out_indices)]


# Necks whose in_channels list the backbone's stages from the deepest one (mmdet's YOLOv3).
_DEEPEST_FIRST_NECKS = ('YOLOV3Neck', )


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_channels(cfg: Config) -> None:
    """Backbone output channels against ``model.neck.in_channels`` (mmdet, or an mmseg neck) or
    the decode/auxiliary heads' ``in_channels`` at their ``in_index`` (mmseg without a neck), and
    the neck's ``out_channels`` against the heads' ``in_channels`` (mmdet).

    Raises:
        ValueError: naming both config keys and both values.
    """
    model = cfg.get('model') or {}
    backbone = model.get('backbone') or {}
    channels = backbone_out_channels(backbone)
    if channels is None:
        return
    arch = backbone.get('arch', 'tiny')
    out_indices = tuple(backbone.get('out_indices', (0, 1, 2, 3)))
    source = (f'model.backbone (DaViT arch={arch!r}, out_indices={out_indices}) returns '
              f'{len(channels)} feature maps with channels {channels}')
    neck = model.get('neck')
    if isinstance(neck, (list, tuple)):
        neck = neck[0] if neck else None  # the first takes the backbone's maps
    if neck and 'in_channels' in neck:
        given = _as_list(neck['in_channels'])
        # the order the neck lists the stages in (YOLOv3's: deepest first)
        expected = channels[::-1] if neck.get('type') in _DEEPEST_FIRST_NECKS else channels
        if len(given) != len(channels):
            raise ValueError(f'{source}, but model.neck.in_channels={given} takes {len(given)}: '
                             f'make out_indices return {len(given)} stages, or set '
                             f'model.neck.in_channels={expected}')
        if given != expected:
            raise ValueError(f'{source}, but model.neck.in_channels={given}: set '
                             f'model.neck.in_channels={expected} (or the arch the neck was sized for)')
        _check_heads_after_neck(model)
        return
    for head_key in ('decode_head', 'auxiliary_head'):
        for i, head in enumerate(_as_list(model.get(head_key) or [])):
            key = head_key if not isinstance(model.get(head_key), (list, tuple)) else f'{head_key}.{i}'
            _check_head_inputs(head, key, channels, source)


def _check_head_inputs(head: dict, key: str, channels: List[int], source: str) -> None:
    if 'in_channels' not in head:
        return
    in_channels, in_index = head['in_channels'], head.get('in_index', -1)
    pairs = list(zip(_as_list(in_index), _as_list(in_channels)))
    if len(_as_list(in_index)) != len(_as_list(in_channels)):
        raise ValueError(f'model.{key}.in_index={in_index} and model.{key}.in_channels={in_channels} '
                         f'have different lengths')
    for index, wanted in pairs:
        if not isinstance(index, int) or not -len(channels) <= index < len(channels):
            raise ValueError(f'{source}, but model.{key}.in_index={in_index} asks for feature map '
                             f'{index}: accepted -{len(channels)}..{len(channels) - 1}')
        if wanted != channels[index]:
            expected = [channels[i] for i, _ in pairs]
            raise ValueError(f'{source}, but model.{key}.in_channels={in_channels} at '
                             f'in_index={in_index}: set model.{key}.in_channels='
                             f'{expected if isinstance(in_channels, (list, tuple)) else expected[0]}')


def _check_heads_after_neck(model: dict) -> None:
    """The heads against the neck's ``out_channels`` (a list of necks: what the last gives)."""
    neck, where = model['neck'], 'model.neck.out_channels'
    if isinstance(neck, (list, tuple)):
        neck, where = neck[-1], f'model.neck.{len(neck) - 1}.out_channels'
    out_channels = neck.get('out_channels')
    if not isinstance(out_channels, int):
        return
    for key in ('rpn_head', 'bbox_head'):
        head = model.get(key)
        if isinstance(head, dict) and isinstance(head.get('in_channels'), int) \
                and head['in_channels'] != out_channels:
            raise ValueError(f'model.{key}.in_channels={head["in_channels"]} but {where}='
                             f'{out_channels}: they must be equal')


# ------------------------------------------------------------------------- annotation files
def _annotation_files(cfg: Config, splits: Sequence[str]) -> Iterator[Tuple[str, str, dict, bool]]:
    """(config key, path, the config of the dataset or evaluator reading it, whether that is a
    dataset) of every local JSON annotation file of the dataloaders and evaluators."""
    for split, where, dataset in _datasets_that_run(cfg, splits):
        root, ann_file = dataset.get('data_root') or '', dataset.get('ann_file') or ''
        if ann_file and not _is_remote(root + ann_file) and _reads_local_files(dataset.get('backend_args')):
            yield f'{where}.ann_file', _joined(root, ann_file), dataset, True
        if split == 'train':
            continue
        for i, evaluator in enumerate(_as_list(cfg.get(f'{split}_evaluator') or [])):
            if not isinstance(evaluator, dict):
                continue
            ann = evaluator.get('ann_file')
            if ann and not _is_remote(ann) and _reads_local_files(evaluator.get('backend_args')):
                where = f'{split}_evaluator' if isinstance(cfg.get(f'{split}_evaluator'), dict) \
                    else f'{split}_evaluator.{i}'
                yield f'{where}.ann_file', ann, evaluator, False


def _reads_coco_json(reader: object, scope: Optional[str]) -> bool:
    """Whether ``reader`` (a dataset's or evaluator's type) is mmdet's CocoDataset or CocoMetric
    or one of their subclasses, which read the file through the COCO API."""
    if scope != 'mmdet':
        return False
    from mmdet.datasets import CocoDataset
    from mmdet.evaluation import CocoMetric
    from mmdet.registry import DATASETS, METRICS
    if isinstance(reader, str):
        reader = DATASETS.get(reader) or METRICS.get(reader)
    return isinstance(reader, type) and issubclass(reader, (CocoDataset, CocoMetric))


def _check_coco_layout(content: object, key: str, path: str) -> None:
    """A COCO annotation file is an object with lists of ``images`` and ``categories`` (and of
    ``annotations``, which test-dev's image info lacks); the COCO API stopped on another JSON file
    with ``KeyError: 'categories'``."""
    if not isinstance(content, dict):
        raise ValueError(f'{key}={path!r} holds a JSON {type(content).__name__}, not a COCO '
                         f'annotation file (an object with "images", "annotations" and "categories")')
    wrong = [name for name in ('images', 'categories') if not isinstance(content.get(name), list)]
    if 'annotations' in content and not isinstance(content['annotations'], list):
        wrong.append('annotations')
    if wrong:
        raise ValueError(f'{key}={path!r} is not a COCO annotation file: it has no list of '
                         f'{" / ".join(repr(name) for name in wrong)} (its keys: '
                         f'{sorted(content)[:12]})')


def type_name(kind: object) -> str:
    """A config's ``type``: a class's name, or the registered name without its scope."""
    return kind.__name__ if isinstance(kind, type) else str(kind).split('.')[-1]


def _shortened(names: list) -> str:
    return str(tuple(names[:8]))[:-1] + (', ...)' if len(names) > 8 else ')')


def _is_size(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and \
        float(value).is_integer()


def _check_coco_content(content: dict, key: str, path: str, classes: Optional[tuple],
                        warn: bool = True, masks: Optional[str] = None, dataset: bool = True,
                        sorts_by_id: bool = False) -> None:
    """What mmdet's CocoDataset would crash on much later, or silently get wrong: duplicate image
    ids (one image dropped, another given its boxes) or category names, annotations whose
    ``image_id``/``category_id`` name nothing, an image without ``file_name``, ``height`` or
    ``width`` (a ``dataset``'s; an evaluator's sizes for mask evaluation), a ``bbox`` that is not
    4 finite numbers, no ``area``, an ``iscrowd`` other than 0/1, ``classes`` (the dataset's
    metainfo) missing from the categories (an IndexError after the first epoch) or listed in
    another order than the file's (``sorts_by_id``: the order of the ids, as mmdet's Objects365 v1
    dataset numbers them). The boxes mmdet leaves out as it reads them
    (empty inside the image, under 1 pixel, ``area`` <= 0) are counted in a warning (``warn``), or
    refused when they are all there is. With ``masks`` (``'load'``: a pipeline loading them,
    ``'segm'``: mask evaluation) a ``segmentation`` that is missing or empty, or an RLE of another
    size than its image, is refused; polygons of fewer than 3 points are refused for ``'segm'``
    (pycocotools stops on them after the whole inference) and counted in the warning otherwise
    (mmdet leaves them out)."""
    import math

    def refuse(problem: str) -> None:
        raise ValueError(f'{key}={path!r}: {problem}')

    images, names = {}, {}
    # what mmdet's CocoDataset reads of each image (a KeyError traceback when missing); the
    # COCO API rasterises polygons at the image's size for mask evaluation
    fields = ('file_name', 'height', 'width') if dataset else \
        ('height', 'width') if masks == 'segm' else ()
    for image in content['images']:
        if not isinstance(image, dict) or 'id' not in image:
            refuse(f'an entry of "images" has no "id": {str(image)[:80]}')
        for field in fields:
            if field == 'file_name' and 'coco_url' in image:
                continue  # LVIS v1: mmdet names the file after its URL
            value = image.get(field)
            if not (isinstance(value, str) and value if field == 'file_name' else _is_size(value)):
                has = f'{field}={value!r}' if field in image else f'no {field!r}'
                accepted = 'a file name' if field == 'file_name' else 'a whole number of pixels > 0'
                refuse(f'image id {image["id"]!r} has {has}: accepted {accepted} (mmdet reads each '
                       f'image\'s {", ".join(fields)})')
        if image['id'] in images:
            refuse(f'image id {image["id"]!r} is given twice ({images[image["id"]].get("file_name")!r} '
                   f'and {image.get("file_name")!r}): mmdet would drop one and give the other its boxes')
        images[image['id']] = image
    for category in content['categories']:
        if not isinstance(category, dict) or 'id' not in category or 'name' not in category:
            refuse(f'an entry of "categories" lacks "id" or "name": {str(category)[:80]}')
        if category['name'] in names.values():
            refuse(f'the category name {category["name"]!r} is given twice (ids '
                   f'{[i for i, n in names.items() if n == category["name"]][0]!r} and '
                   f'{category["id"]!r})')
        names[category['id']] = category['name']
    missing = [name for name in classes or () if name not in names.values()]
    if missing:
        refuse(f'{len(missing)} of the dataset\'s classes, {_shortened(missing)}, are not among its '
               f'categories {_shortened(sorted(names.values()))} (metainfo.classes must name categories '
               f'of the file)')
    # mmdet numbers labels in the file's order of categories (Objects365 v1: in the order of ids)
    ordered = sorted(names.items()) if sorts_by_id else names.items()
    in_file_order = [name for _, name in ordered if name in (classes or ())]
    if classes and in_file_order != list(classes):
        refuse(f'its "categories" list the classes in another order than metainfo.classes: mmdet '
               f'numbers labels in the file\'s order and names them in metainfo\'s, so objects would '
               f'be trained, scored or named as another class. The file\'s order: '
               f'{_shortened(in_file_order)}; metainfo.classes: {_shortened(list(classes))}. List '
               f'metainfo.classes in the file\'s order (the same in every file the model reads)')
    dropped, short_polygons = [], []
    for ann in content.get('annotations', []):
        where = f'annotation {ann.get("id")!r}' if isinstance(ann, dict) else 'an annotation'
        if not isinstance(ann, dict):
            refuse(f'{where} is not an object: {str(ann)[:80]}')
        for field in ('image_id', 'category_id', 'bbox', 'area'):
            if field not in ann:
                refuse(f'{where} has no "{field}"')
        box = ann['bbox']
        if not (isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            refuse(f'{where} has bbox={box!r}: accepted [x, y, width, height], 4 finite numbers')
        if ann['image_id'] not in images:
            refuse(f'{where} has image_id={ann["image_id"]!r}, which no entry of "images" has')
        if ann['category_id'] not in names:
            refuse(f'{where} has category_id={ann["category_id"]!r}, which no entry of "categories" '
                   f'has (ids {sorted(names)[:12]})')
        if ann.get('iscrowd', 0) not in (0, 1) or isinstance(ann.get('iscrowd', 0), bool):
            refuse(f'{where} has iscrowd={ann["iscrowd"]!r}: accepted 0 or 1')
        image, (x, y, w, h) = images[ann['image_id']], box
        if masks and _bad_mask(ann, image, where, refuse, strict=masks == 'segm'):
            short_polygons.append(ann.get('id'))
        width, height = image.get('width', math.inf), image.get('height', math.inf)
        inside = max(0, min(x + w, width) - max(x, 0)) * max(0, min(y + h, height) - max(y, 0))
        if inside == 0 or w < 1 or h < 1 or not ann['area'] > 0:
            dropped.append(ann.get('id'))
    kept = len(content.get('annotations', [])) - len(dropped)
    if dropped and kept == 0:
        refuse(f'mmdet would leave out every one of its {len(dropped)} annotations (boxes empty inside '
               f'their image, under 1 pixel wide or high, or area <= 0; ids {dropped[:5]})')
    if short_polygons and warn:
        print_log(f'davit_mm: {key}={path!r}: mmdet leaves out the polygons of fewer than 3 points '
                  f'of {len(short_polygons)} annotations (ids {short_polygons[:5]})',
                  logger='current', level=30)
    if dropped and warn:
        print_log(f'davit_mm: {key}={path!r}: mmdet leaves out {len(dropped)} of '
                  f'{kept + len(dropped)} annotations (boxes empty inside their image, under 1 pixel '
                  f'wide or high, or area <= 0; ids {dropped[:5]}{", ..." if len(dropped) > 5 else ""})',
                  logger='current', level=30)


def _bad_mask(ann: dict, image: dict, where: str, refuse: Callable[[str], None], strict: bool) -> bool:
    """Refuse an annotation's ``segmentation`` that mmdet or pycocotools stop on; True when it
    has polygons of fewer than 3 points (refused if ``strict``)."""
    segmentation = ann.get('segmentation')
    if not segmentation:  # LoadAnnotations(with_mask=True): KeyError: 'mask'
        refuse(f'{where} has segmentation={segmentation!r}: a pipeline or metric reading masks '
               f'needs polygons [[x1, y1, x2, y2, x3, y3, ...], ...] or an RLE dict')
    if isinstance(segmentation, dict):
        size = [image.get('height'), image.get('width')]
        if segmentation.get('size') != size:
            refuse(f'{where} has an RLE of size {segmentation.get("size")!r}, its image '
                   f'{image.get("file_name")!r} is {size!r} (height, width)')
        return False
    short = [poly for poly in segmentation if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2]
    if short and strict:
        refuse(f'{where} has a polygon of fewer than 3 points ({str(short[0])[:60]}): the COCO '
               f'API stops on it when evaluating masks')
    return bool(short)


def check_annotation_files(cfg: Config, splits: Sequence[str] = ('train', 'val')) -> None:
    """Refuse JSON annotation files that are missing, empty, not JSON or cut off, naming the key
    and the file (mmdet's loader raises a JSONDecodeError that names neither).

    Files up to 64 MiB are parsed; larger ones are checked to start with ``{``/``[`` and end with
    the matching bracket.
    """
    parsed = {}  # real path -> content: a file the dataloader and its evaluator both read, once
    coco_files = []  # (key, path, content, reader, is_dataset) of those read through the COCO API
    for key, path, reader, is_dataset in _annotation_files(cfg, splits):
        if not path.endswith('.json'):
            continue
        if not osp.isfile(path):
            raise ValueError(f'{key}={path!r} does not exist')
        size = osp.getsize(path)
        if size == 0:
            raise ValueError(f'{key}={path!r} is empty (0 bytes)')
        if size <= _FULL_JSON_PARSE_BYTES:
            if osp.realpath(path) not in parsed:
                try:
                    with open(path, 'rb') as f:
                        parsed[osp.realpath(path)] = json.load(f)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise ValueError(f'{key}={path!r} is not a readable JSON file: {exc}') from exc
            content = parsed[osp.realpath(path)]
            if _reads_coco_json(reader.get('type'), cfg.get('default_scope')):
                _check_coco_layout(content, key, path)
                coco_files.append((key, path, content, reader, is_dataset))
                if is_dataset:  # what the dataloader reads, warning of what it leaves out
                    loads_masks = any(isinstance(step, dict) and step.get('with_mask')
                                      for step in reader.get('pipeline') or [])
                    _check_coco_content(content, key, path,
                                        _dataset_classes(reader, cfg.get('default_scope')),
                                        masks='load' if loads_masks else None,
                                        sorts_by_id='Objects365V1' in type_name(reader.get('type')))
                else:  # what the evaluator crashes on (its dataloader warned already)
                    metric = reader.get('metric', 'bbox')
                    _check_coco_content(content, key, path, None, warn=False, dataset=False,
                                        masks='segm' if 'segm' in _as_list(metric) else None)
            continue
        with open(path, 'rb') as f:
            head = f.read(4096).lstrip()[:1]
            f.seek(max(0, size - 4096), os.SEEK_SET)
            tail = f.read().rstrip()[-1:]
        if (head, tail) not in ((b'{', b'}'), (b'[', b']')):
            raise ValueError(f'{key}={path!r} is not a JSON file, or was cut off: it starts with '
                             f'{head!r} and ends with {tail!r}')
    _check_evaluators_score_their_datasets(cfg, coco_files)


def _check_evaluators_score_their_datasets(cfg: Config, coco_files: list) -> None:
    """A CocoMetric scores the predictions against its own ``ann_file``, by image id, counting
    every image of that file not predicted as missed. Refuse an evaluator file that is not the
    images the dataloader runs: another set (a changed ``data_root``: mAP 0.009 where 0.178 was
    due), a subset either way or ``indices`` (the images not run counted as missed), a
    ConcatDataset (the second set scored against the first's annotations), and a file without
    annotations outside ``format_only`` (every mAP -1)."""
    for split in ('val', 'test'):
        loader = cfg.get(f'{split}_dataloader')
        datasets = [f for f in coco_files if f[4] and f[0].startswith(f'{split}_dataloader.')]
        evaluators = [f for f in coco_files if not f[4] and f[0].startswith(f'{split}_evaluator')]
        if not loader or not evaluators:
            continue
        members = keyed_datasets(loader['dataset'])
        for key, path, content, reader, _ in evaluators:
            if reader.get('format_only'):
                continue
            where = key[:-len('.ann_file')]
            if 'annotations' not in content:
                raise ValueError(f'{key}={path!r} has no "annotations" (an image-info file, as COCO '
                                 f'test-dev\'s): there is nothing to score against (every mAP -1); to '
                                 f'write the predictions for an evaluation server, set '
                                 f'{where}.format_only=True and {where}.outfile_prefix')
            if len(members) > 1:
                raise ValueError(f'{split}_dataloader.dataset joins {len(members)} datasets, but {key} '
                                 f'scores every prediction against its one file {path!r}, by image id: '
                                 f'evaluate each set in a run of its own')
            if len(datasets) != 1:
                continue  # the dataset's file is not read here (remote, large or not COCO)
            data_key, data_path, data_content, data_reader, _ = datasets[0]
            run = {(image['id'], image.get('file_name')) for image in data_content['images']}
            scored = {(image['id'], image.get('file_name')) for image in content['images']}
            if osp.realpath(path) != osp.realpath(data_path) and (
                    content['images'] != data_content['images'] or
                    content.get('annotations') != data_content.get('annotations')):
                raise ValueError(f'{key}={path!r} is not the file {data_key}={data_path!r} reads: '
                                 f'{len(scored)} images and {len(run)}, {len(run & scored)} of them alike '
                                 f'(id and file name), other annotations. CocoMetric scores the predictions '
                                 f'against its own file, by image id: against another set\'s annotations, '
                                 f'counting the images not run as missed. Give {key} the dataset\'s file')
            indices = data_reader.get('indices')
            if indices is not None:
                taken = min(indices, len(run)) if isinstance(indices, int) else len(indices)
                if taken < len(run):
                    raise ValueError(f'{data_key[:-len(".ann_file")]}.indices={indices!r} runs {taken} of '
                                     f'the {len(run)} images {key} scores: the {len(run) - taken} not run '
                                     f'would count as missed; write an annotation file of those images '
                                     f'for both')
