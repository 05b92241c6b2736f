"""Pre-flight checks: configs that cannot work are refused before the runner is built, naming the
config key and both values; unreadable inputs are named."""
import glob
import json
import os
import os.path as osp
import re

import cv2
import pytest
from mmengine.config import Config

from davit_mm import checks
from helpers import CONFIGS, assert_user_error, edited_config, run_tool, write_datasets

RETINANET = osp.join(CONFIGS, 'davit_retinanet_1x_coco.py')
MASK_RCNN = osp.join(CONFIGS, 'davit_maskrcnn_1x_coco.py')
UPERNET = osp.join(CONFIGS, 'upernet_davit_512x512_160k_ade20k.py')
QUICKSTART = osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py')


@pytest.mark.parametrize('config', sorted(
    c for c in glob.glob(osp.join(CONFIGS, '**', '*.py'), recursive=True) if '/_base_/' not in c))
def test_every_shipped_config_passes_the_channel_check(config):
    checks.check_channels(Config.fromfile(config))


def test_neck_sized_for_another_width_is_refused():
    cfg = edited_config(MASK_RCNN, {'model.backbone.arch': 'base'})
    with pytest.raises(ValueError, match=r"model.backbone \(DaViT arch='base', out_indices=\(0, 1, 2, 3\)\) "
                                         r'returns 4 feature maps with channels \[128, 256, 512, 1024\], but '
                                         r'model.neck.in_channels=\[96, 192, 384, 768\]'):
        checks.check_channels(cfg)


def test_one_more_stage_than_the_neck_takes_is_refused():
    cfg = edited_config(RETINANET, {'model.backbone.out_indices': (0, 1, 2, 3)})
    with pytest.raises(ValueError, match=r'but model.neck.in_channels=\[192, 384, 768\] takes 3: make '
                                         r'out_indices return 3 stages'):
        checks.check_channels(cfg)


def test_head_width_different_from_the_neck_output_is_refused():
    cfg = edited_config(RETINANET, {'model.bbox_head.in_channels': 128})
    with pytest.raises(ValueError, match=r'model.bbox_head.in_channels=128 but model.neck.out_channels=256'):
        checks.check_channels(cfg)


def test_segmentation_heads_are_checked_at_their_in_index():
    cfg = edited_config(UPERNET, {'model.backbone.arch': 'base'})
    with pytest.raises(ValueError, match=r'model.decode_head.in_channels=\[96, 192, 384, 768\] at '
                                         r'in_index=\[0, 1, 2, 3\]: set model.decode_head.in_channels='
                                         r'\[128, 256, 512, 1024\]'):
        checks.check_channels(cfg)
    cfg = edited_config(UPERNET, {'model.auxiliary_head.in_index': 3})
    with pytest.raises(ValueError, match=r'model.auxiliary_head.in_channels=384 at in_index=3: set '
                                         r'model.auxiliary_head.in_channels=768'):
        checks.check_channels(cfg)
    cfg.model.auxiliary_head.in_index = 4
    with pytest.raises(ValueError, match=r'model.auxiliary_head.in_index=4 asks for feature map 4'):
        checks.check_channels(cfg)


@pytest.fixture
def coco(tmp_path):
    return write_datasets(tmp_path, coco=dict(num_train=4, num_val=2, seed=1))


def quickstart_on(coco, *splits):
    """The quickstart RetinaNet config reading ``splits`` of the dataset generated under ``coco``."""
    root = str(coco / 'data' / 'synthetic_coco') + '/'
    return edited_config(QUICKSTART, {f'{split}_dataloader.dataset.data_root': root for split in splits})


@pytest.mark.parametrize('content,message', [
    (b'', 'is empty (0 bytes)'),
    (b'<html>not json</html>', 'is not a readable JSON file: Expecting value: line 1 column 1'),
    # JSON, but not COCO: the COCO API stopped with KeyError: 'categories'
    (b'{"a": 1}', "is not a COCO annotation file: it has no list of 'images' / 'categories' (its "
                  "keys: ['a'])"),
    (b'{"images": [], "categories": [], "annotations": {}}',
     "is not a COCO annotation file: it has no list of 'annotations'"),
    (b'[1, 2]', 'holds a JSON list, not a COCO annotation file'),
])
def test_unreadable_val_annotation_file_is_named_with_its_key(coco, content, message):
    ann = coco / 'data' / 'synthetic_coco' / 'annotations' / 'instances_val2017.json'
    ann.write_bytes(content)
    cfg = quickstart_on(coco, 'train', 'val')
    key = "val_dataloader.dataset.ann_file='.*instances_val2017.json'"
    with pytest.raises(ValueError, match=f'{key} {re.escape(message)}'):
        checks.check_annotation_files(cfg)


def test_a_coco_file_without_annotations_is_taken_as_test_dev_image_info_is(coco, monkeypatch):
    """Read by the dataset, and by the evaluator writing predictions for a server (format_only);
    scored against, it gave every mAP as -1 and exit 0."""
    monkeypatch.chdir(coco)  # the evaluator's ann_file is relative: data/synthetic_coco/...
    ann = coco / 'data' / 'synthetic_coco' / 'annotations' / 'instances_val2017.json'
    content = json.loads(ann.read_text())
    del content['annotations']
    ann.write_text(json.dumps(content))
    cfg = quickstart_on(coco, 'train', 'val')
    with pytest.raises(ValueError, match=r"val_evaluator.ann_file='.*' has no \"annotations\" \(an image-info "
                                         r'file.*set val_evaluator.format_only=True and '
                                         r'val_evaluator.outfile_prefix'):
        checks.check_annotation_files(cfg)
    cfg.val_evaluator.update(format_only=True, outfile_prefix=str(coco / 'out'))
    checks.check_annotation_files(cfg)


def _second_val_set(coco):
    """data/synthetic_coco2: another generated set, whose image ids overlap the first's."""
    from davit_mm.synthetic import write_coco
    write_coco(str(coco / 'data' / 'synthetic_coco2'), num_train=1, num_val=3, seed=5)
    return 'data/synthetic_coco2/'


@pytest.mark.parametrize('change,message', [
    # the natural way to test on another set: mAP 0.009 where 0.178 was due, exit 0
    ('data_root', r"val_evaluator.ann_file='data/synthetic_coco/annotations/instances_val2017.json' is not the "
                  r"file val_dataloader.dataset.ann_file='data/synthetic_coco2/annotations/instances_val2017.json' "
                  r'reads: 2 images and 3, 2 of them alike \(id and file name\), other annotations\. .* Give '
                  r"val_evaluator.ann_file the dataset's file"),
    # half the images run, all scored: 0.209 where those images score 0.369
    ('indices', r'val_dataloader.dataset.indices=1 runs 1 of the 2 images val_evaluator.ann_file scores: the 1 '
                r'not run would count as missed'),
    # the second set's predictions scored against the first's annotations (ids collide)
    ('concat', r'val_dataloader.dataset joins 2 datasets, but val_evaluator.ann_file scores every prediction '
               r"against its one file 'data/synthetic_coco/annotations/instances_val2017.json', by image id"),
])
def test_an_evaluator_scoring_other_images_than_the_dataloader_runs_is_refused(coco, monkeypatch, change, message):
    monkeypatch.chdir(coco)
    cfg = quickstart_on(coco, 'train')
    val = cfg.val_dataloader.dataset
    if change == 'data_root':
        val.data_root = _second_val_set(coco)
    elif change == 'indices':
        val.indices = 1
    else:
        second = dict(val, data_root=_second_val_set(coco))
        cfg.val_dataloader.dataset = dict(type='ConcatDataset', datasets=[dict(val), second])
    with pytest.raises(ValueError, match=message):
        checks.check_annotation_files(cfg)


def test_an_evaluator_reading_a_copy_of_the_datasets_file_is_taken(coco, monkeypatch):
    import shutil
    monkeypatch.chdir(coco)
    cfg = quickstart_on(coco, 'train', 'val')
    shutil.copy(cfg.val_evaluator.ann_file, coco / 'copy.json')
    cfg.val_evaluator.ann_file = str(coco / 'copy.json')
    checks.check_annotation_files(cfg)


def test_large_annotation_file_cut_off_is_refused(coco, monkeypatch):
    monkeypatch.setattr(checks, '_FULL_JSON_PARSE_BYTES', 16)  # the cheap test for big files
    ann = coco / 'data' / 'synthetic_coco' / 'annotations' / 'instances_train2017.json'
    cfg = quickstart_on(coco, 'train')
    cfg.val_cfg = None
    checks.check_annotation_files(cfg)  # complete: passes
    ann.write_bytes(ann.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"train_dataloader.dataset.ann_file='.*' is not a JSON file, or "
                                         r"was cut off: it starts with b'\{' and ends with"):
        checks.check_annotation_files(cfg)


def test_train_tool_names_a_broken_val_annotation_file(coco):
    ann = coco / 'data' / 'synthetic_coco' / 'annotations' / 'instances_val2017.json'
    ann.write_text(json.dumps({'images': []})[:-1])
    result = run_tool(['train.py', QUICKSTART, '--work-dir', coco / 'w'], cwd=coco, expect_ok=False)
    assert_user_error(result, "val_dataloader.dataset.ann_file='data/synthetic_coco/annotations/"
                              "instances_val2017.json' is not a readable JSON file")


def test_train_tool_names_an_image_file_of_zero_bytes(coco):
    images = sorted((coco / 'data' / 'synthetic_coco' / 'train2017').iterdir())
    for image in images:
        image.write_bytes(b'')
    result = run_tool(['train.py', QUICKSTART, '--work-dir', coco / 'w', '--cfg-options',
                       'train_cfg.max_epochs=1'], cwd=coco, expect_ok=False)
    assert_user_error(result, 'cannot read image')
    assert re.search(r"cannot read image '.*data/synthetic_coco/train2017/\S+\.jpg' \(0 bytes\)",
                     result.stderr), result.stderr[-2000:]


# --------------------------------------------------------------------- wrappers, registries, storage
@pytest.mark.parametrize('config,key,classes', [
    (RETINANET, 'model.bbox_head.num_classes', 80),  # CocoDataset, no metainfo in the config
    (UPERNET, 'model.decode_head.num_classes', 150),  # ADE20KDataset
])
def test_class_count_comes_from_the_dataset_type_of_the_configs_scope(config, key, classes):
    """The dataset types' METAINFO are in mmdet's/mmseg's registries, not mmengine's root one,
    where the check looked and found nothing: a wrong num_classes passed."""
    checks.check_num_classes(Config.fromfile(config))
    with pytest.raises(ValueError, match=rf'{re.escape(key)}=7 but train_dataloader.dataset has {classes} classes'):
        checks.check_num_classes(edited_config(config, {key: 7}))


def test_a_validation_set_of_other_classes_than_the_heads_is_refused():
    """The run trained a whole epoch, then stopped with IndexError in CocoMetric."""
    cfg = edited_config(QUICKSTART, {'val_dataloader.dataset.metainfo.classes': ('square', 'disk')})
    checks.check_num_classes(cfg)  # the training set alone: as the heads
    with pytest.raises(ValueError, match=r'model.bbox_head.num_classes=3 but val_dataloader.dataset has 2 '
                                         r"classes \('square', 'disk'\): set num_classes=2 in every head"):
        checks.check_num_classes(cfg, 'train', ('train', 'val'))
    cfg.val_cfg = None  # a validation set the run does not use
    checks.check_num_classes(cfg, 'train', ('train', 'val'))


def test_seg_classes_other_than_the_dataset_types_are_explained():
    """ADE20KDataset given 2 of its names relabelled label maps numbering the user's own classes
    to 255 everywhere: loss 0, mIoU nan, exit 0. Other names stopped with mmseg's "not a subset"."""
    cfg = edited_config(UPERNET, {'train_dataloader.dataset.metainfo.classes': ('sky', 'tree')})
    warnings = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checks, 'print_log', lambda message, **kwargs: warnings.append(message))
        checks.check_seg_classes(cfg)
    assert warnings == [
        "davit_mm: train_dataloader.dataset (ADE20KDataset) keeps 2 of its 150 classes: mmseg reads the "
        "label maps in ADE20KDataset's numbering, gives these classes the labels 0..1 and every other "
        "pixel 255 (ignored); for label maps that number classes of your own (0, 1, ...), use "
        "type='BaseSegDataset' with the img_suffix, seg_map_suffix and reduce_zero_label your files need"]
    cfg.train_dataloader.dataset.metainfo.classes = ('crop', 'weed', 'sky')
    with pytest.raises(ValueError, match=r"train_dataloader.dataset.metainfo.classes names \('crop', 'weed'\), "
                                         r"which are not among ADE20KDataset's 150 classes: .* use "
                                         r"type='BaseSegDataset'"):
        checks.check_seg_classes(cfg)
    cfg.train_dataloader.dataset.type = 'BaseSegDataset'  # classes of its own: nothing to say
    checks.check_seg_classes(cfg)


def test_a_mask_head_with_a_pipeline_loading_no_masks_is_refused():
    """It stopped at the first iteration: 'InstanceData' object has no attribute 'masks'."""
    cfg = edited_config(MASK_RCNN)
    checks.check_mask_annotations(cfg)
    cfg.train_dataloader.dataset.pipeline[2].with_mask = False
    with pytest.raises(ValueError, match=r'model.roi_head.mask_head trains on masks, but '
                                         r'train_dataloader.dataset.pipeline.2 \(LoadAnnotations\) does '
                                         r'not load them: add with_mask=True'):
        checks.check_mask_annotations(cfg)
    checks.check_mask_annotations(edited_config(RETINANET))  # no mask head


@pytest.mark.parametrize('config,edits,message', [
    # KeyError tracebacks: at build, or after every image was run (segm on a box detector)
    (RETINANET, {'test_evaluator.metric': 'bboxx'},
     r"test_evaluator.metric='bboxx': CocoMetric computes \['bbox', 'segm', 'proposal', 'proposal_fast'\], "
     r"not \['bboxx'\]"),
    (RETINANET, {'test_evaluator.metric': ['bbox', 'segm']},
     r"test_evaluator.metric=\['bbox', 'segm'\] asks for mask AP, but the model predicts no masks"),
    # AssertionError: outfile_prefix must be not
    (MASK_RCNN, {'test_evaluator.format_only': True},
     r'test_evaluator.format_only=True writes the predictions to files named by '
     r'test_evaluator.outfile_prefix, which is not set'),
    (UPERNET, {'test_evaluator.iou_metrics': ['mIoU', 'mdice']},
     r"test_evaluator.iou_metrics=\['mIoU', 'mdice'\]: IoUMetric computes \['mIoU', 'mDice', 'mFscore'\], "
     r"not \['mdice'\]"),
    # AssertionError: Initialize dataset with `reduce_zero_label` as True but when load annotation ...
    (UPERNET, {'test_dataloader.dataset.pipeline.2.reduce_zero_label': False},
     r'test_dataloader.dataset.pipeline.2.reduce_zero_label=False but test_dataloader.dataset '
     r'\(ADE20KDataset\) has reduce_zero_label=True: set them alike'),
])
def test_evaluators_and_label_settings_that_fail_late_are_refused(config, edits, message):
    cfg = edited_config(config)
    checks.check_evaluators(cfg, ('test', ))
    checks.check_reduce_zero_label(cfg, ('test', ))
    cfg.merge_from_dict(edits)
    with pytest.raises(ValueError, match=message):
        checks.check_evaluators(cfg, ('test', ))
        checks.check_reduce_zero_label(cfg, ('test', ))
    checks.check_evaluators(edited_config(MASK_RCNN, {'test_evaluator.metric': ['bbox', 'segm']}), ('test', ))


@pytest.mark.parametrize('config, key', [(RETINANET, 'outfile_prefix'), (UPERNET, 'output_dir')])
def test_evaluator_outputs_that_cannot_be_written_are_refused_before_the_run(tmp_path, config, key):
    """--cfg-options test_evaluator.outfile_prefix=FILE/x ran the whole evaluation and then
    stopped with a FileExistsError traceback; output_dir=FILE with one when the metric was built."""
    (tmp_path / 'afile').write_text('')
    value = str(tmp_path / 'afile' / 'x') if key == 'outfile_prefix' else str(tmp_path / 'afile')
    cfg = edited_config(config, {f'test_evaluator.{key}': value})
    with pytest.raises(ValueError, match=rf"test_evaluator.{key}.* is a file, not a folder"):
        checks.check_evaluators(cfg, ('test', ))
    cfg.merge_from_dict({f'test_evaluator.{key}': str(tmp_path / 'new' / 'x')})  # created when written
    checks.check_evaluators(cfg, ('test', ))


def test_an_output_under_a_dangling_symbolic_link_is_refused(tmp_path):
    """os.makedirs stops at a link to nothing with FileExistsError: tools/test.py --out ran the
    whole evaluation first."""
    from davit_mm.cli import check_output_path
    os.symlink(tmp_path / 'missing', tmp_path / 'dangling')
    with pytest.raises(ValueError, match=r"--out '.*dangling/p.pkl' cannot be created: '.*dangling' is a "
                                         r"symbolic link to '.*missing', which does not exist"):
        check_output_path('--out', str(tmp_path / 'dangling' / 'p.pkl'), folder=False)


def test_semantic_heads_keep_their_own_class_count():
    """HTC's and SCNet's semantic heads segment COCO-stuff's 183 classes beside 80 detected ones."""
    cfg = edited_config(MASK_RCNN, {'model.roi_head.semantic_head': dict(
        type='FusedSemanticHead', in_channels=256, num_classes=183)})
    checks.check_num_classes(cfg)


def _concat(cfg, second):
    member = cfg.train_dataloader.dataset
    cfg.train_dataloader.dataset = dict(type='ConcatDataset', datasets=[member, dict(member, **second)])
    return cfg


def test_each_member_of_a_concat_dataset_is_checked(coco):
    """Errors name the member by the key --cfg-options takes, and the fix they suggest works."""
    cfg = _concat(quickstart_on(coco, 'train'), {})
    checks.preflight(cfg, ('train',))
    bad = _concat(quickstart_on(coco, 'train'), dict(data_root='nowhere/'))
    key = 'train_dataloader.dataset.datasets.1.data_root'
    with pytest.raises(ValueError, match=re.escape(f"{key}='nowhere/' does not exist")) as error:
        checks.preflight(bad, ('train',))
    assert f'--cfg-options {key}=/path/to/data/' in str(error.value)
    bad.merge_from_dict({key: cfg.train_dataloader.dataset.datasets[0].data_root},
                        allow_list_keys=True)  # as --cfg-options applies it
    checks.preflight(bad, ('train',))
    wrong = _concat(quickstart_on(coco, 'train'), {})
    wrong.model.bbox_head.num_classes = 80
    with pytest.raises(ValueError, match=r'model.bbox_head.num_classes=80 but '
                                         r'train_dataloader.dataset.datasets.0 has 3 classes'):
        checks.preflight(wrong, ('train',))


def test_a_wrapped_dataset_is_named_by_its_own_key(coco):
    cfg = quickstart_on(coco, 'train')
    cfg.train_dataloader.dataset = dict(type='RepeatDataset', times=2, dataset=dict(
        cfg.train_dataloader.dataset, ann_file='missing.json'))
    with pytest.raises(ValueError, match=re.escape(
            "train_dataloader.dataset.dataset.ann_file='missing.json': ")):
        checks.preflight(cfg, ('train',))


def test_tta_reaches_every_member_of_a_concat_test_set():
    from davit_mm.cli import enable_tta
    cfg = Config.fromfile(QUICKSTART)
    member = cfg.test_dataloader.dataset
    cfg.test_dataloader.dataset = dict(type='ConcatDataset', datasets=[member, dict(member)])
    enable_tta(cfg, 'mmdet')
    assert 'pipeline' not in cfg.test_dataloader.dataset  # ConcatDataset takes none
    assert all(d.pipeline == cfg.tta_pipeline for d in cfg.test_dataloader.dataset.datasets)


@pytest.mark.parametrize('edits', [
    {'ann_file': 's3://bucket/annotations/instances_train2017.json'},
    {'data_root': 'data/on_s3/', 'backend_args': dict(backend='petrel', path_mapping={'data/': 's3://bucket/'})},
])
def test_remote_storage_is_not_looked_for_locally(coco, edits):
    cfg = quickstart_on(coco, 'train')
    cfg.train_dataloader.dataset.update(edits)
    checks.check_data_paths(cfg, ('train',))
    checks.check_annotation_files(cfg, ('train',))


def test_yolov3_necks_take_the_deepest_stage_first():
    cfg = edited_config(RETINANET, {'model.neck': dict(type='YOLOV3Neck', num_scales=3,
                                                        in_channels=[768, 384, 192], out_channels=[384, 192, 96])})
    checks.check_channels(cfg)
    cfg.model.neck.in_channels = [192, 384, 768]
    with pytest.raises(ValueError, match=r'set model.neck.in_channels=\[768, 384, 192\]'):
        checks.check_channels(cfg)


def test_heads_follow_the_last_of_several_necks():
    cfg = edited_config(MASK_RCNN)
    cfg.model.neck = [cfg.model.neck, dict(type='ChannelMapper', in_channels=[256] * 5, out_channels=128)]
    cfg.model.rpn_head.in_channels = 128
    checks.check_channels(cfg)
    cfg.model.rpn_head.in_channels = 256
    with pytest.raises(ValueError, match=r'model.rpn_head.in_channels=256 but model.neck.1.out_channels=128'):
        checks.check_channels(cfg)


@pytest.mark.parametrize('options,message', [
    ({'train_cfg.max_epochs': 0}, 'train_cfg.max_epochs=0: accepted a whole number >= 1'),
    ({'train_cfg.max_epochs': -3}, 'train_cfg.max_epochs=-3: accepted a whole number >= 1'),
    ({'train_cfg.max_epochs': 2.5}, 'train_cfg.max_epochs=2.5: accepted'),
    ({'train_cfg.val_interval': 0}, 'train_cfg.val_interval=0: accepted a whole number >= 1'),
    ({'auto_scale_lr.enable': True, 'auto_scale_lr.base_batch_size': 0},
     'auto_scale_lr.base_batch_size=0: accepted a whole number >= 1'),
])
def test_a_schedule_that_trains_nothing_or_divides_by_zero_is_refused(options, message):
    """max_epochs=0 trained nothing and exited 0; val_interval=0 and base_batch_size=0 stopped
    with ZeroDivisionError, the first after a whole epoch."""
    cfg = edited_config(QUICKSTART, options)
    with pytest.raises(ValueError, match=re.escape(message)):
        checks.check_schedule(cfg)


def test_the_schedules_of_the_shipped_configs_pass():
    for path in glob.glob(osp.join(CONFIGS, '**', '*.py'), recursive=True):
        if '_base_' not in path:
            checks.check_schedule(Config.fromfile(path))
    cfg = edited_config(QUICKSTART, {'auto_scale_lr.base_batch_size': 0})  # not enabled: not used
    checks.check_schedule(cfg)


def test_train_tool_refuses_a_zero_val_interval_before_training(coco):
    result = run_tool(['train.py', QUICKSTART, '--work-dir', coco / 'w', '--cfg-options',
                       'train_cfg.val_interval=0'], cwd=coco, expect_ok=False)
    assert_user_error(result, 'train_cfg.val_interval=0: accepted a whole number >= 1')
    assert not (coco / 'w').exists() or not list((coco / 'w').rglob('*.pth'))


def _corrupt(ann: dict, case: str) -> None:
    first = ann['annotations'][0]
    if case == 'dup_image_id':
        ann['images'][1]['id'] = ann['images'][0]['id']
    elif case == 'dup_category_name':
        ann['categories'].append(dict(id=99, name=ann['categories'][0]['name']))
    elif case == 'class_not_a_category':
        ann['categories'][-1]['name'] += 'x'
    elif case == 'unknown_category':
        first['category_id'] = 99
    elif case == 'unknown_image':
        first['image_id'] = 999
    elif case == 'bbox_nan':
        first['bbox'][2] = float('nan')
    elif case == 'bbox_short':
        first['bbox'] = first['bbox'][:3]
    elif case == 'no_area':
        del first['area']
    elif case == 'iscrowd_2':
        first['iscrowd'] = 2
    elif case == 'all_area_0':
        for a in ann['annotations']:
            a['area'] = 0
    elif case == 'empty_segmentation':
        first['segmentation'] = []
    elif case == 'rle_of_another_size':
        first['segmentation'] = {'size': [10, 10], 'counts': 'f037000`1'}
    elif case == 'two_point_polygon':
        first['segmentation'] = [first['segmentation'][0][:4]]
    elif case == 'categories_reordered':
        ann['categories'].reverse()
    elif case == 'no_height':
        del ann['images'][1]['height']
    elif case == 'width_text':
        ann['images'][0]['width'] = '160'
    elif case == 'no_file_name':
        ann['images'][0]['file_name'] = ''


@pytest.mark.parametrize('case,message', [
    ('dup_image_id', "image id 1 is given twice ('000001.jpg' and '000002.jpg')"),
    ('dup_category_name', "the category name 'square' is given twice (ids 1 and 99)"),
    ('class_not_a_category', "1 of the dataset's classes, ('triangle',), are not among its categories "
                             "('disk', 'square', 'trianglex')"),
    ('unknown_category', 'has category_id=99, which no entry of "categories" has'),
    ('unknown_image', 'has image_id=999, which no entry of "images" has'),
    ('bbox_nan', 'has bbox=['),
    ('bbox_short', 'has bbox=['),
    ('no_area', 'has no "area"'),
    ('iscrowd_2', 'has iscrowd=2: accepted 0 or 1'),
    ('all_area_0', 'mmdet would leave out every one of its'),
    # the pipeline loads masks: KeyError: 'mask' / "all input arrays must have the same shape"
    ('empty_segmentation', 'has segmentation=[]: a pipeline or metric reading masks needs polygons'),
    ('rle_of_another_size', "has an RLE of size [10, 10], its image '000001.jpg' is ["),
    # KeyError: 'height' traceback as mmdet loaded the file; '160' failed comparisons later
    ('no_height', "image id 2 has no 'height': accepted a whole number of pixels > 0 (mmdet reads each "
                  "image's file_name, height, width)"),
    ('width_text', "image id 1 has width='160': accepted a whole number of pixels > 0"),
    ('no_file_name', "image id 1 has file_name='': accepted a file name"),
    # trained, scored and named each object as another class, exit 0
    ('categories_reordered', 'its "categories" list the classes in another order than metainfo.classes: '
                             "mmdet numbers labels in the file's order and names them in metainfo's, so "
                             "objects would be trained, scored or named as another class. The file's "
                             "order: ('triangle', 'disk', 'square'); metainfo.classes: ('square', 'disk', "
                             "'triangle')."),
])
def test_coco_annotations_mmdet_would_drop_misread_or_crash_on_are_refused(coco, case, message):
    """mmdet dropped these silently (training on nothing with area 0 everywhere), gave one image
    another's boxes, or stopped with a KeyError / IndexError after the first epoch."""
    path = coco / 'data' / 'synthetic_coco' / 'annotations' / 'instances_train2017.json'
    content = json.loads(path.read_text())
    _corrupt(content, case)
    path.write_text(json.dumps(content))
    cfg = quickstart_on(coco, 'train')
    cfg.val_cfg = None
    with pytest.raises(ValueError, match=r"train_dataloader.dataset.ann_file='.*instances_train2017.json': "
                                         r'(annotation 1 )?' + re.escape(message)):
        checks.check_annotation_files(cfg, ('train',))


def test_lvis_and_objects365_files_are_read_as_mmdet_reads_them(coco):
    """LVIS v1 images have a coco_url and no file_name (mmdet names the file after the URL);
    Objects365 v1's dataset numbers labels in the order of category ids, not the file's."""
    path = coco / 'data' / 'synthetic_coco' / 'annotations' / 'instances_train2017.json'
    content = json.loads(path.read_text())
    classes = ('square', 'disk', 'triangle')
    for image in content['images']:
        image['coco_url'] = 'http://images.cocodataset.org/train2017/' + image.pop('file_name')
    content['categories'].reverse()
    checks._check_coco_content(content, 'k', 'p', classes, warn=False, sorts_by_id=True)
    with pytest.raises(ValueError, match="another order than metainfo.classes"):
        checks._check_coco_content(content, 'k', 'p', classes, warn=False)  # CocoDataset: file order
    del content['images'][0]['coco_url']
    with pytest.raises(ValueError, match="image id 1 has no 'file_name'"):
        checks._check_coco_content(content, 'k', 'p', classes, warn=False, sorts_by_id=True)


def test_a_few_boxes_mmdet_leaves_out_are_taken(coco):
    """Real COCO has boxes under a pixel: mmdet leaves them out, and a warning counts them."""
    path = coco / 'data' / 'synthetic_coco' / 'annotations' / 'instances_train2017.json'
    content = json.loads(path.read_text())
    content['annotations'][0]['bbox'][2] = 0.5
    path.write_text(json.dumps(content))
    cfg = quickstart_on(coco, 'train')
    cfg.val_cfg = None
    checks.check_annotation_files(cfg, ('train',))


def test_polygons_under_3_points_are_refused_where_masks_are_evaluated(coco):
    """pycocotools stopped on them after the whole inference ("Argument 'bb' has incorrect
    type"); in training mmdet leaves them out (a warning counts them)."""
    maskrcnn = osp.join(CONFIGS, 'quickstart', 'davit_mini_maskrcnn_synthetic_coco.py')
    for split in ('train', 'val'):
        path = coco / 'data' / 'synthetic_coco' / 'annotations' / f'instances_{split}2017.json'
        content = json.loads(path.read_text())
        _corrupt(content, 'two_point_polygon')
        path.write_text(json.dumps(content))
    root = str(coco / 'data' / 'synthetic_coco') + '/'
    cfg = edited_config(maskrcnn, {'train_dataloader.dataset.data_root': root,
                                   'val_dataloader.dataset.data_root': root,
                                   'val_evaluator.ann_file': root + 'annotations/instances_val2017.json'})
    checks.check_annotation_files(cfg, ('train', ))
    with pytest.raises(ValueError, match=r"val_evaluator.ann_file='.*': annotation \d+ has a polygon of "
                                         r'fewer than 3 points'):
        checks.check_annotation_files(cfg, ('train', 'val'))


def test_a_pipeline_variable_no_dataloader_runs_is_warned_of(tmp_path, monkeypatch):
    """A config inheriting the dataloaders that sets only train_pipeline/test_pipeline: mmengine
    does not substitute them there, and the run went on with the inherited pipelines, exit 0."""
    own = tmp_path / 'own.py'
    own.write_text(f"_base_ = [{QUICKSTART!r}]\n"
                   "train_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),\n"
                   "                  dict(type='Resize', scale=(96, 64)), dict(type='PackDetInputs')]\n"
                   "test_pipeline = train_pipeline\n")
    warnings = []
    monkeypatch.setattr(checks, 'print_log', lambda message, **kwargs: warnings.append(message))
    checks.warn_of_unused_pipelines(Config.fromfile(str(own)))
    assert warnings == [
        'davit_mm: the config sets train_pipeline, but train_dataloader.dataset.pipeline is another '
        'list, which the run uses: a config that inherits the dataloaders must also set them, e.g. '
        'train_dataloader = dict(dataset=dict(pipeline=train_pipeline))',
        'davit_mm: the config sets test_pipeline, but val_dataloader.dataset.pipeline / '
        'test_dataloader.dataset.pipeline is another list, which the run uses: a config that inherits '
        'the dataloaders must also set them, e.g. val_dataloader = dict(dataset=dict(pipeline=test_pipeline))']
    warnings.clear()
    from davit_mm.cli import load_config
    load_config(str(own), {'train_dataloader.dataset.pipeline.2.scale': (80, 64)})
    assert len(warnings) == 2  # the config as written; not what --cfg-options then edit
    with open(own, 'a') as f:  # as the warning says
        f.write('train_dataloader = dict(dataset=dict(pipeline=train_pipeline))\n'
                'val_dataloader = dict(dataset=dict(pipeline=test_pipeline))\n')
    warnings.clear()
    checks.warn_of_unused_pipelines(Config.fromfile(str(own)))
    load_config(str(own), {'train_dataloader.dataset.pipeline.2.scale': (80, 64),
                           'val_dataloader.dataset.pipeline.2.scale': (80, 64)})
    assert warnings == []


def test_a_top_level_data_root_that_reaches_no_dataloader_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where data/coco/ is not
    own = tmp_path / 'own.py'
    own.write_text(f"_base_ = [{RETINANET!r}]\ndata_root = {str(tmp_path)!r}\n")
    with pytest.raises(ValueError, match=r"train_dataloader.dataset.data_root='data/coco/' does not exist .*"
                                         r"The config's data_root='.*' is not this key: in a config that "
                                         r'inherits the dataloaders, set train_dataloader.dataset.data_root too'):
        checks.check_data_paths(Config.fromfile(str(own)))


def test_an_image_without_its_label_map_is_refused(tmp_path):
    """mmseg stopped at it with a bare FileNotFoundError, wherever in the run it came."""
    write_datasets(tmp_path, ade20k=dict(num_train=2, num_val=2, seed=1))
    root = tmp_path / 'data' / 'synthetic_ade20k' / 'ADEChallengeData2016'
    cfg = edited_config(osp.join(CONFIGS, 'quickstart', 'upernet_davit_mini_synthetic_ade20k.py'),
                        {f'{split}_dataloader.dataset.data_root': str(root) for split in ('train', 'val')})
    checks.check_seg_folders(cfg)
    label = sorted((root / 'annotations' / 'validation').iterdir())[1]
    label.unlink()
    with pytest.raises(ValueError, match=rf"val_dataloader.dataset: 1 of the images in '.*images/validation' "
                                         rf"have no label map in '.*annotations/validation' \({label.stem}.jpg; "
                                         rf'each image NAME.jpg needs NAME.png\)'):
        checks.check_seg_folders(cfg)


def test_images_an_mmseg_folder_dataset_leaves_out_are_counted_in_a_warning(tmp_path, monkeypatch):
    """ADE20K's dataset reads *.jpg only: a .png image was left out of training and validation
    without a word."""
    write_datasets(tmp_path, ade20k=dict(num_train=2, num_val=2, seed=1))
    root = tmp_path / 'data' / 'synthetic_ade20k' / 'ADEChallengeData2016'
    image = sorted((root / 'images' / 'training').iterdir())[0]
    cv2.imwrite(str(image.with_suffix('.png')), cv2.imread(str(image)))
    image.unlink()
    cfg = edited_config(osp.join(CONFIGS, 'quickstart', 'upernet_davit_mini_synthetic_ade20k.py'),
                        {f'{split}_dataloader.dataset.data_root': str(root) for split in ('train', 'val')})
    warnings = []
    monkeypatch.setattr(checks, 'print_log', lambda message, **kwargs: warnings.append(message))
    checks.preflight(cfg, ('train', 'val'))
    assert warnings == [f"davit_mm: train_dataloader.dataset: 1 images in '{root}/images/training' are "
                        f"not *.jpg and are left out ({image.stem}.png); set "
                        f"train_dataloader.dataset.img_suffix to read them"]
