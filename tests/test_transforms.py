"""Each sample checked as it is loaded (davit_mm.transforms): an image whose size is not its
annotation's, and a label map that is colour, of another size or holds labels the head does not
predict, stop with the files named, in every shipped config's pipelines."""
import glob
import os.path as osp
import re

import cv2
import numpy as np
import pytest
from mmengine.config import Config
from PIL import Image

from davit_mm import checks
from davit_mm.transforms import CheckAnnotationSize, CheckSegMap
from helpers import CONFIGS, assert_user_error, edited_config, run_tool, run_tool_in_process, write_datasets

QUICKSTART_DET = osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py')
QUICKSTART_SEG = osp.join(CONFIGS, 'quickstart', 'upernet_davit_mini_synthetic_ade20k.py')
SHIPPED = sorted(c for c in glob.glob(osp.join(CONFIGS, '**', '*.py'), recursive=True)
                 if '/_base_/' not in c)


# ------------------------------------------------------------------------------------- detection
def _load(path: str, height: int, width: int, **load_args) -> dict:
    from mmcv.transforms import LoadImageFromFile  # mmdet's and mmseg's
    return LoadImageFromFile(**load_args)(dict(img_path=path, img_id=7, height=height, width=width))


def test_image_of_its_annotated_size_passes_and_one_resized_since_is_refused(tmp_path):
    path = str(tmp_path / 'a.jpg')
    cv2.imwrite(path, np.zeros((30, 50, 3), np.uint8))
    assert CheckAnnotationSize()(_load(path, 30, 50))['ori_shape'] == (30, 50)
    with pytest.raises(ValueError, match=r"image '.*a\.jpg' decodes as 50x30 \(width x height\) but its "
                                         r'annotation \(image id 7\) says 100x60 \(width x height\): '
                                         r'.*Was the image resized'):
        CheckAnnotationSize()(_load(path, 60, 100))


def test_exif_quarter_turn_is_named_with_the_setting_that_loads_the_image_unturned(tmp_path):
    """A phone photo stored 50 wide x 30 high with EXIF orientation 6 (turn 90 degrees): OpenCV
    turns it to 30 x 50 on loading; an annotation written from the stored pixels says 50 x 30."""
    path = str(tmp_path / 'phone.jpg')
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(path, exif=exif)
    with pytest.raises(ValueError, match=r"decodes as 30x50 .* says 50x30 .* EXIF orientation 6, a quarter "
                                         r".*color_type='color_ignore_orientation'"):
        CheckAnnotationSize()(_load(path, 30, 50))
    unturned = _load(path, 30, 50, color_type='color_ignore_orientation')
    assert CheckAnnotationSize()(unturned)['ori_shape'] == (30, 50)


def test_images_without_annotation_sizes_pass_unchecked():
    """An inferencer's input (an array or a path, no dataset record) has no height/width."""
    results = dict(img=np.zeros((4, 6, 3), np.uint8), ori_shape=(4, 6))
    assert CheckAnnotationSize()(dict(results)) == results


@pytest.fixture
def coco(tmp_path):
    return write_datasets(tmp_path, coco=dict(num_train=4, num_val=2, seed=1))


def _dataset(cfg: Config, split: str):
    from mmengine.registry import DATASETS, init_default_scope
    init_default_scope(cfg.default_scope)
    return DATASETS.build(cfg[f'{split}_dataloader']['dataset'])


def test_quickstart_detection_refuses_an_image_resized_after_annotation(coco, monkeypatch):
    monkeypatch.chdir(coco)
    cfg = Config.fromfile(QUICKSTART_DET)
    for split, folder in (('train', 'train2017'), ('val', 'val2017')):
        dataset = _dataset(cfg, split)
        dataset[0]  # as generated: passes
        path = dataset.get_data_info(0)['img_path']
        image = cv2.imread(path)
        cv2.imwrite(path, cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2)))
        with pytest.raises(ValueError, match=f"image '{osp.join('data', 'synthetic_coco', folder)}/"
                                             r'.*\.jpg\' decodes as \d+x\d+ \(width x height\) but its'):
            dataset[0]


def test_train_tool_stops_at_an_image_resized_after_annotation(coco):
    """Before the check, the run trained on boxes outside the half-size image and exited 0. Raised
    in a DataLoader worker, whose traceback torch puts in the message: the tool prints the
    worker's own message and which worker raised it."""
    for path in glob.glob(str(coco / 'data' / 'synthetic_coco' / 'train2017' / '*.jpg')):
        image = cv2.imread(path)
        cv2.imwrite(path, cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2)))
    result = run_tool(['train.py', QUICKSTART_DET, '--work-dir', coco / 'w', '--cfg-options',
                       'train_cfg.max_epochs=1', 'train_dataloader.num_workers=1'], cwd=coco, expect_ok=False)
    assert_user_error(result, 'decodes as', 'Was the image resized')
    assert re.search(r"(?m)^error: image 'data/synthetic_coco/train2017/\d+\.jpg' decodes as .* restore the "
                     r'annotated image\. \(raised in DataLoader worker process 0\)\n\(DAVIT_MM_TRACEBACK=1',
                     result.stderr), result.stderr[-3000:]


# ---------------------------------------------------------------------------------- segmentation
def _seg(seg: np.ndarray, image_shape=None, **extra) -> dict:
    return dict(gt_seg_map=seg, seg_map_path='ann/x.png', img_path='img/x.jpg',
                ori_shape=image_shape or seg.shape[:2], **extra)


def test_label_maps_of_classes_and_the_ignore_index_pass():
    seg = np.array([[0, 149], [255, 3]], np.uint8)
    assert CheckSegMap(num_classes=150)(_seg(seg))['gt_seg_map'] is seg
    assert CheckSegMap(num_classes=4, ignore_index=7)(_seg(np.array([[7, 3]], np.int64)))
    assert CheckSegMap()(_seg(np.array([[200]], np.uint8)))  # no num_classes: shapes only
    assert CheckSegMap(num_classes=2)(dict(img=np.zeros((2, 2, 3)))) is not None  # inference: no map


@pytest.mark.parametrize('results,message', [
    (_seg(np.zeros((4, 5, 3), np.uint8)),
     r"label map 'ann/x.png' loads with shape \(4, 5, 3\) \(a colour image: class indices must be one "
     r'channel'),
    (_seg(np.zeros((4, 5), np.uint8), image_shape=(4, 6)),
     r"label map 'ann/x.png' is 5x4 \(width x height\) but its image 'img/x.jpg' is 6x4"),
    (_seg(np.array([[0, 160, 255, 151, 3]], np.uint8), reduce_zero_label=True),
     r"label map 'ann/x.png' holds labels 151, 160 \(as LoadAnnotations gives them, "
     r'reduce_zero_label=True\), which are neither a class 0..149 \(CheckSegMap num_classes=150\) nor '
     r'ignore_index=255$'),
    (_seg(np.array([[0, 150]], np.uint8), reduce_zero_label=False),
     r'holds labels 150 .* look 1-based with 0 as "other", as in ADE20K: set reduce_zero_label=True'),
])
def test_bad_label_maps_are_refused_by_name(results, message):
    with pytest.raises(ValueError, match=message):
        CheckSegMap(num_classes=150)(results)


@pytest.mark.parametrize('kwargs,error,message', [
    (dict(num_classes=0), ValueError, r'CheckSegMap num_classes=0: expected an int >= 1'),
    (dict(num_classes='150'), TypeError, r"CheckSegMap num_classes='150': expected an int"),
    (dict(num_classes=3, ignore_index=-1), ValueError, r'ignore_index=-1: expected an int >= 0'),
    (dict(num_classes=3, ignore_index=True), TypeError, r'ignore_index=True: expected an int'),
])
def test_bad_check_seg_map_arguments_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        CheckSegMap(**kwargs)


@pytest.fixture
def ade20k(tmp_path):
    return write_datasets(tmp_path, ade20k=dict(num_train=2, num_val=2, seed=3))


@pytest.mark.parametrize('damage,message', [
    (lambda seg: cv2.cvtColor(seg, cv2.COLOR_GRAY2BGR), r'loads with shape \(\d+, \d+, 3\) \(a colour'),
    (lambda seg: seg[:-2], r'is \d+x\d+ \(width x height\) but its image'),
    (lambda seg: np.where(seg == 1, 200, seg).astype(np.uint8), r'holds labels 199 '),
])
@pytest.mark.parametrize('split', ['train', 'val'])
def test_quickstart_segmentation_refuses_a_damaged_label_map(ade20k, monkeypatch, damage, message, split):
    monkeypatch.chdir(ade20k)
    dataset = _dataset(Config.fromfile(QUICKSTART_SEG), split)
    dataset[0]  # as generated: passes
    path = dataset.get_data_info(0)['seg_map_path']
    cv2.imwrite(path, damage(cv2.imread(path, cv2.IMREAD_UNCHANGED)))
    with pytest.raises(ValueError, match=f"label map '.*{osp.basename(path)}' {message}"):
        dataset[0]


def test_check_seg_map_classes_must_be_the_datasets():
    cfg = edited_config(osp.join(CONFIGS, 'upernet_davit_512x512_160k_ade20k.py'))
    checks.check_num_classes(cfg, 'train', ('train', 'val'))
    cfg.train_dataloader.dataset.pipeline[2].num_classes = 151
    with pytest.raises(ValueError, match=r'train_dataloader.dataset.pipeline.2.num_classes=151 but '
                                         r'train_dataloader.dataset has 150 classes .*: set num_classes=150 in '
                                         r'its CheckSegMap .* or pass --cfg-options '
                                         r'train_dataloader.dataset.pipeline.2.num_classes=150\)'):
        checks.check_num_classes(cfg)
    cfg.train_dataloader.dataset.pipeline[2].num_classes = 150
    cfg.val_dataloader.dataset.pipeline[3].num_classes = 19  # checked where the tools run val
    checks.check_num_classes(cfg)
    with pytest.raises(ValueError, match=r'val_dataloader.dataset.pipeline.3.num_classes=19 but'):
        checks.check_num_classes(cfg, 'train', ('train', 'val'))
    # a wrapper's own pipeline (mmseg's MultiImageMixDataset runs one after its dataset's)
    cfg.train_dataloader.dataset = dict(type='MultiImageMixDataset', dataset=cfg.train_dataloader.dataset,
                                        pipeline=[dict(type='CheckSegMap', num_classes=19)])
    with pytest.raises(ValueError, match=r'train_dataloader.dataset.pipeline.0.num_classes=19 but '
                                         r'train_dataloader.dataset.dataset has 150 classes'):
        checks.check_num_classes(cfg)


def test_test_tool_checks_the_tta_pipelines_check_seg_map(ade20k):
    """`--tta` replaces the test pipeline with tta_pipeline, whose CheckSegMap went unchecked."""
    (ade20k / 'model.pth').write_bytes(b'not read: the config is refused first')
    result = run_tool_in_process(['test.py', QUICKSTART_SEG, ade20k / 'model.pth', '--tta', '--cfg-options',
                                  'tta_pipeline.1.transforms.3.0.num_classes=19'], cwd=ade20k)
    assert_user_error(result, 'tta_pipeline.1.transforms.3.0.num_classes=19 but test_dataloader.dataset has '
                              '150 classes', '--cfg-options tta_pipeline.1.transforms.3.0.num_classes=150)')
    # the key named is one --cfg-options takes
    result = run_tool_in_process(['test.py', QUICKSTART_SEG, ade20k / 'model.pth', '--tta', '--cfg-options',
                                  'tta_pipeline.1.transforms.3.0.num_classes=150'], cwd=ade20k)
    assert 'num_classes' not in result.stderr


# ------------------------------------------------------------------------------- shipped configs
def _pipelines(cfg: Config):
    """(name, flat list of transform configs) of each pipeline a config runs: train, val, test and
    TTA, TestTimeAug's choices flattened in order."""
    def flat(transforms):
        for t in transforms:
            if t['type'] == 'TestTimeAug':
                for choices in t['transforms']:
                    yield choices[0]
            else:
                yield t
    for split in ('train', 'val', 'test'):
        loader = cfg.get(f'{split}_dataloader')
        if loader:
            for key, dataset in checks.keyed_datasets(loader['dataset']):
                yield f'{split}_dataloader.{key}.pipeline', list(flat(dataset['pipeline']))
    if cfg.get('tta_pipeline'):
        yield 'tta_pipeline', list(flat(cfg.tta_pipeline))


@pytest.mark.parametrize('config', SHIPPED, ids=lambda c: osp.relpath(c, CONFIGS))
def test_every_shipped_pipeline_checks_what_it_loads(config):
    """Detection: CheckAnnotationSize right after LoadImageFromFile. Segmentation: CheckSegMap right
    after LoadAnnotations, with the decode head's class count."""
    cfg = Config.fromfile(config)
    names = list(_pipelines(cfg))
    assert {name.split('_')[0] for name, _ in names} >= {'train', 'val', 'test', 'tta'}
    for name, transforms in names:
        types = [t['type'] for t in transforms]
        if cfg.default_scope == 'mmdet':
            assert types[types.index('LoadImageFromFile') + 1] == 'CheckAnnotationSize', (name, types)
        else:
            check = transforms[types.index('LoadAnnotations') + 1]
            assert check['type'] == 'CheckSegMap', (name, types)
            assert check['num_classes'] == cfg.model.decode_head.num_classes


@pytest.mark.parametrize('config', [c for c in SHIPPED if '/quickstart/' not in c], ids=lambda c: osp.basename(c))
def test_the_pipeline_mmdeploys_sdk_deploys_holds_no_check(config):
    """mmdeploy 1.3.1 writes the SDK's preprocessing (pipeline.json) from the top-level
    test_pipeline: for mmdet, the steps whose type holds neither "Random" nor "Annotation"; for
    mmseg, the first two. The SDK knows no davit_mm step: none may remain."""
    cfg = Config.fromfile(config)
    pipeline = cfg.test_pipeline
    kept = [t['type'] for t in pipeline if 'Random' not in t['type'] and 'Annotation' not in t['type']] \
        if cfg.default_scope == 'mmdet' else [t['type'] for t in pipeline[:2]]
    assert not [t for t in kept if t.startswith('Check')], kept
    assert 'Resize' in kept and 'LoadImageFromFile' in kept
