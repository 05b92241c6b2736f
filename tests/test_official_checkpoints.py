"""Whole checkpoints of the official DaViT code (mmdet 2.11 / mmseg 0.11) load into davit_mm's
configs and compute the same function as the official model they came from.

The official models are built from the plain reference backbone (official parameter names, an
output norm per stage) with mmdet's/mmseg's necks and heads (tests/official_models.py), given
random weights, and saved as mmcv 1.x saved the released files. davit_mm's quickstart configs
(the mini arch) then load those files, and are compared with the official-layout model loaded
from the same file.
"""
import glob
import json
import os
import os.path as osp
import pickle
import subprocess
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config

from davit_mm import compat, fileio
from davit_mm.checkpoint import (CheckpointError, adapt_model_checkpoint, convert_model_checkpoint,
                                 detect_model_format)
from davit_mm.engine import OfficialCheckpointHook
from davit_mm.synthetic import ADE20K_BACKGROUND_LABEL, ADE20K_SHAPE_LABELS, COCO_CLASSES
from helpers import (CONFIGS, REPO, assert_user_error, build_model, metric, run_tool,
                     run_tool_in_process, transform_of, write_datasets)
from official_models import official_checkpoint, official_config, randomise_

TESTS = osp.dirname(osp.abspath(__file__))
QUICKSTART = {
    'retinanet': osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py'),
    'maskrcnn': osp.join(CONFIGS, 'quickstart', 'davit_mini_maskrcnn_synthetic_coco.py'),
    'upernet': osp.join(CONFIGS, 'quickstart', 'upernet_davit_mini_synthetic_ade20k.py'),
}
LIBRARY = {'retinanet': 'mmdet', 'maskrcnn': 'mmdet', 'upernet': 'mmseg'}
# The subprocesses import official_models through the official configs' custom_imports.
TOOL_ENV = {'PYTHONPATH': os.pathsep.join([TESTS, REPO, os.environ.get('PYTHONPATH', '')])}


def build(config: str):
    return build_model(config, for_this_machine=True).eval()


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """A working directory with both generated datasets where the quickstart configs look."""
    return write_datasets(tmp_path_factory.mktemp('official'), coco=dict(num_train=2, num_val=4, seed=3),
                          ade20k=dict(num_train=2, num_val=4, seed=4))


@pytest.fixture(scope='module')
def official(data_root):
    """kind -> (official config, davit_mm config, official checkpoint file)."""
    from mmseg.datasets import ADE20KDataset
    out = {}
    for kind, config in QUICKSTART.items():
        ref_config = official_config(config, kind, str(data_root))
        model = randomise_(build(ref_config), seed=len(out))
        if kind == 'upernet':  # predict among the classes the images hold, so mIoU is not 0
            with torch.no_grad():
                bias = model.decode_head.conv_seg.bias
                bias.fill_(-5.0)
                bias[[ADE20K_BACKGROUND_LABEL - 1] + [label - 1 for label in ADE20K_SHAPE_LABELS]] = 0.0
        if LIBRARY[kind] == 'mmdet':
            checkpoint = official_checkpoint(model, 'mmdet', COCO_CLASSES)
        else:
            meta = ADE20KDataset.METAINFO
            checkpoint = official_checkpoint(model, 'mmseg', meta['classes'], meta['palette'])
        path = data_root / f'official_{kind}.pth'
        torch.save(checkpoint, path)
        out[kind] = (ref_config, config, path)
    return out


def load_like_the_runner(model, path):
    """What mmengine's runner does with ``load_from``: read the file (weights_only), call the
    after_load_checkpoint hooks, load the state dict (strictly here). RunnerCheckpointsHook's
    scope lets the runner read the old meta under weights_only."""
    from mmengine.runner.checkpoint import _load_checkpoint, _load_checkpoint_to_model
    with compat.runner_checkpoints_readable():
        checkpoint = _load_checkpoint(str(path), map_location='cpu')
    runner = SimpleNamespace(model=model, _load_from=str(path), _resume=False)
    OfficialCheckpointHook().after_load_checkpoint(runner, checkpoint)
    _load_checkpoint_to_model(model, checkpoint, strict=True)
    return checkpoint


def val_images(data_root, kind):
    if LIBRARY[kind] == 'mmdet':
        files = sorted(glob.glob(str(data_root / 'data' / 'synthetic_coco' / 'val2017' / '*.jpg')))
    else:
        files = sorted(glob.glob(str(data_root / 'data' / 'synthetic_ade20k' / 'ADEChallengeData2016' /
                                     'images' / 'validation' / '*.jpg')))
    return [torch.from_numpy(cv2.imread(f)).permute(2, 0, 1).contiguous() for f in files[:2]]


# ------------------------------------------------------------------------------ the files
def test_generated_files_have_the_official_layout(official):
    for kind, (_, _, path) in official.items():
        checkpoint = torch.load(path, weights_only=False)
        keys = checkpoint['state_dict']
        assert 'backbone.patch_embeds.0.proj.weight' in keys
        assert 'backbone.main_blocks.2.0.1.cpe.1.proj.weight' in keys
        assert 'backbone.norm0.weight' in keys  # every official backbone builds all four norms
        assert set(checkpoint) == {'meta', 'state_dict', 'optimizer'}
        assert detect_model_format(keys, checkpoint['meta']) == \
            ('official_mmseg0' if kind == 'upernet' else 'official_mmdet2')


def test_old_meta_and_optimizer_load_under_weights_only(official):
    from mmengine.runner.checkpoint import _load_checkpoint
    _, _, path = official['upernet']
    with compat.runner_checkpoints_readable():  # as RunnerCheckpointsHook does in the tools
        checkpoint = _load_checkpoint(str(path), map_location='cpu')  # torch.load, weights_only=True
    assert checkpoint['meta']['mmseg_version'] == '0.11.0'
    assert float(checkpoint['meta']['hook_msgs']['best_score']) == 0.25


# ------------------------------------------------------------------- the same function
@pytest.mark.parametrize('kind', ['retinanet', 'maskrcnn'])
def test_detector_loaded_from_an_official_file_matches_the_official_model(official, data_root, kind):
    from mmdet.structures import DetDataSample
    ref_config, config, path = official[kind]
    reference = build(ref_config)
    reference.load_state_dict(torch.load(path, weights_only=False)['state_dict'])
    model = build(config)
    checkpoint = load_like_the_runner(model, path)
    assert checkpoint['meta']['dataset_meta']['classes'] == COCO_CLASSES
    images = val_images(data_root, kind)
    samples = [DetDataSample(metainfo=dict(img_shape=tuple(i.shape[1:]), ori_shape=tuple(i.shape[1:]),
                                           scale_factor=(1.0, 1.0))) for i in images]
    with torch.no_grad():
        batch = reference.data_preprocessor(dict(inputs=images, data_samples=samples), False)
        expected_feats = reference.extract_feat(batch['inputs'])
        feats = model.extract_feat(batch['inputs'])
        assert len(feats) == len(expected_feats) == 5
        for got, want in zip(feats, expected_feats):
            assert (got - want).abs().max() <= 1e-4
        expected = reference.test_step(dict(inputs=images, data_samples=samples))
        results = model.test_step(dict(inputs=images, data_samples=samples))
    for got, want in zip(results, expected):
        got, want = got.pred_instances, want.pred_instances
        assert len(want) > 50  # random heads with zero class biases: plenty of boxes
        assert torch.equal(got.labels, want.labels)
        torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-4)
        torch.testing.assert_close(got.bboxes, want.bboxes, rtol=1e-4, atol=1e-3)
        if kind == 'maskrcnn':
            assert (got.masks != want.masks).float().mean() < 1e-3


def test_segmentor_loaded_from_an_official_file_matches_the_official_model(official, data_root):
    from mmseg.structures import SegDataSample
    ref_config, config, path = official['upernet']
    reference = build(ref_config)
    reference.load_state_dict(torch.load(path, weights_only=False)['state_dict'])
    model = build(config)
    checkpoint = load_like_the_runner(model, path)
    assert len(checkpoint['meta']['dataset_meta']['classes']) == 150
    for image in val_images(data_root, 'upernet'):  # of different sizes: one at a time
        shape = tuple(image.shape[1:])
        data = dict(inputs=[image], data_samples=[SegDataSample(metainfo=dict(img_shape=shape,
                                                                             ori_shape=shape))])
        with torch.no_grad():
            want, = reference.test_step(data)
            got, = model.test_step(data)
        assert (got.seg_logits.data - want.seg_logits.data).abs().max() <= 1e-4
        assert want.pred_sem_seg.data.unique().numel() > 1  # not a constant prediction
        assert (got.pred_sem_seg.data != want.pred_sem_seg.data).float().mean() < 1e-3


def test_retinanet_reports_the_unused_stage_1_norm_once(official, capsys):
    _, config, path = official['retinanet']
    model = build(config)
    checkpoint = torch.load(path, weights_only=False)
    converted, note = adapt_model_checkpoint(model, checkpoint, str(path))
    assert 'backbone.norm0.weight' not in converted['state_dict']
    assert 'not used by this model (out_indices=(1, 2, 3)): backbone.norm0 (2 tensors)' in note
    assert 'backbone.norm1.weight' in converted['state_dict']
    assert 'optimizer' not in converted


def test_a_different_size_is_refused_and_nothing_is_loaded(official):
    _, _, path = official['maskrcnn']
    model = build(osp.join(CONFIGS, 'davit_maskrcnn_1x_coco.py'))  # DaViT-Tiny: other widths
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from davit_mm.checkpoint import check_checkpoint_fits
    with pytest.raises(ValueError, match='does not fit the config.s model.*shape mismatches: '
                                         'backbone.stem.conv.weight'):
        check_checkpoint_fits(model, str(path))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_unknown_modules_are_refused(official):
    _, _, path = official['retinanet']
    checkpoint = torch.load(path, weights_only=False)
    checkpoint['state_dict']['mystery_head.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"keys under \['mystery_head'\]"):
        convert_model_checkpoint(checkpoint, 'x.pth')


# -------------------------------------------------------------------------- the tools
def dumped_detections(path):
    with open(path, 'rb') as f:
        return sorted(pickle.load(f), key=lambda r: r['img_id'])


def assert_same_detections(got, want, score_tol=1e-4, box_rtol=1e-4, box_atol=1e-3):
    """Each wanted detection has its own got one with the same label, score and box (to the
    tolerances). Detections whose scores tie to within the tolerance may come in either order
    (a different CPU's rounding reorders them), so they are matched, not compared by index."""
    got, want = ({k: np.asarray(v) for k, v in r.items()} for r in (got, want))
    assert len(got['scores']) == len(want['scores'])
    free = np.ones(len(got['scores']), dtype=bool)
    for i in range(len(want['scores'])):
        box = want['bboxes'][i]
        close = (free & (np.abs(got['scores'] - want['scores'][i]) <= score_tol)
                 & (got['labels'] == want['labels'][i])
                 & np.all(np.abs(got['bboxes'] - box) <= box_atol + box_rtol * np.abs(box), axis=1))
        assert close.any(), f'detection {i} (score {want["scores"][i]:.5f}, box {box}) has no match'
        free[np.argmax(close)] = False


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['retinanet', 'maskrcnn', 'upernet'])
def test_test_tool_reports_the_official_models_metrics(official, data_root, kind, tmp_path):
    """The official file evaluates in davit_mm's config as in the official one. For RetinaNet
    also the file convert_checkpoint.py writes of it (which holds the stage-1 norm RetinaNet
    does not build: refused by every tool before), given as a URL that is cached but cannot be
    reached (mmengine downloaded such a URL again itself: a traceback offline)."""
    ref_config, config, path = official[kind]
    runs = [('official', ref_config, path, {}), ('davit_mm', config, path, {})]
    if kind == 'retinanet':
        converted = tmp_path / 'retinanet_davit_mm.pth'
        run_tool(['convert_checkpoint.py', path, converted], cwd=tmp_path)
        url = 'http://127.0.0.1:9/retinanet_davit_mm.pth'  # the discard port: nothing answers
        cache = {'DAVIT_MM_CACHE': str(tmp_path / 'cache')}
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv('DAVIT_MM_CACHE', cache['DAVIT_MM_CACHE'])
            os.makedirs(cache['DAVIT_MM_CACHE'])
            cached = fileio.cached_path(url)
            os.replace(converted, cached)
        runs.append(('converted', config, url, cache))
    outputs = {}
    for name, cfg, checkpoint, env in runs:
        out = data_root / f'{kind}_{name}' / ('results.pkl' if LIBRARY[kind] == 'mmdet' else 'labels')
        result = run_tool(['test.py', cfg, checkpoint, '--work-dir', out.parent, '--out', out], cwd=data_root,
                          env=dict(TOOL_ENV, **env))
        outputs[name] = (result.stdout + result.stderr, out)
    (ref_log, ref_out), (log, out) = outputs['official'], outputs['davit_mm']
    assert "a model of the official DaViT code" in log and 'official DaViT code' not in ref_log
    names = ['coco/bbox_mAP', 'coco/bbox_mAP_50'] + (['coco/segm_mAP'] if kind == 'maskrcnn' else []) \
        if LIBRARY[kind] == 'mmdet' else ['mIoU', 'aAcc', 'mAcc']
    for name in names:
        assert metric(log, name) == metric(ref_log, name), name
    assert metric(log, names[1]) > 0  # bbox_mAP_50 / aAcc: the metrics compared are not all zero
    if kind == 'retinanet':
        converted_log, converted_out = outputs['converted']
        assert f'load_from {url} is read from {cached}' in converted_log
        assert 'not used by this model (out_indices=(1, 2, 3)): backbone.norm0 (2 tensors)' in converted_log
        assert 'Downloading' not in converted_log
        for name in names:
            assert metric(converted_log, name) == metric(log, name), name
        for g, w in zip(dumped_detections(converted_out), dumped_detections(out)):
            assert_same_detections(g['pred_instances'], w['pred_instances'])
    if LIBRARY[kind] == 'mmdet':
        got, want = dumped_detections(out), dumped_detections(ref_out)
        assert len(got) == len(want) == 4
        for g, w in zip(got, want):
            assert len(w['pred_instances']['scores']) > 50
            assert_same_detections(g['pred_instances'], w['pred_instances'])
    else:
        got, want = sorted(glob.glob(str(out / '*.png'))), sorted(glob.glob(str(ref_out / '*.png')))
        assert len(got) == len(want) == 4
        for g, w in zip(got, want):
            assert (cv2.imread(g, 0) != cv2.imread(w, 0)).mean() < 1e-3


@pytest.mark.slow
def test_image_demo_draws_with_an_official_file(official, data_root):
    _, config, path = official['maskrcnn']
    image = sorted(glob.glob(str(data_root / 'data' / 'synthetic_coco' / 'val2017' / '*.jpg')))[0]
    out = data_root / 'demo'
    result = subprocess.run([sys.executable, osp.join(REPO, 'demo', 'image_demo.py'), image, config,
                             str(path), '--out-dir', str(out)], cwd=data_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'a model of the official DaViT code' in result.stdout
    assert len(glob.glob(str(out / 'vis' / '*.jpg'))) == 1


# ------------------------------------------------------------------ convert_checkpoint.py
def test_convert_tool_writes_a_whole_davit_mm_model_with_its_meta(official, tmp_path):
    _, config, path = official['retinanet']
    dst = tmp_path / 'retinanet_davit_mm.pth'
    result = run_tool(['convert_checkpoint.py', path, dst], cwd=tmp_path)
    assert 'format: whole mmdet model of the official DaViT code (mmdet 2.11)' in result.stdout
    assert 'backbone.main_blocks.0.0.0.cpe.0.proj.weight -> ' \
           'backbone.stages.0.blocks.0.spatial_block.cpe1.proj.weight' in result.stdout
    converted = torch.load(dst, weights_only=True)
    assert set(converted) == {'state_dict', 'meta'}  # no mmcv 1.x optimizer state
    assert converted['meta']['dataset_meta']['classes'] == COCO_CLASSES
    source = converted['meta']['converted_from']
    assert (source['format'], source['mmdet_version'], source['epoch']) == ('official_mmdet2', '2.11.0', 12)
    # The converted file holds exactly what loading the official file in memory gives.
    model = build(config)
    in_memory, _ = adapt_model_checkpoint(model, torch.load(path, weights_only=False), str(path))
    written, note = adapt_model_checkpoint(model, converted, str(dst))
    # Already davit_mm's layout: nothing renamed; the stage-1 norm RetinaNet does not build is left
    # out as for the official file (the tools refused the converted file for it before).
    assert note == f'{dst}: not used by this model (out_indices=(1, 2, 3)): backbone.norm0 (2 tensors)'
    assert 'backbone.norm0.weight' in converted['state_dict']  # the input is left as it was
    written = written['state_dict']
    assert written.keys() == in_memory['state_dict'].keys() == model.state_dict().keys()
    assert all(torch.equal(written[k], in_memory['state_dict'][k]) for k in written)


def test_convert_tool_keeps_only_the_backbone_on_request(official, tmp_path):
    _, _, path = official['upernet']
    dst = tmp_path / 'backbone.pth'
    run_tool(['convert_checkpoint.py', path, dst, '--backbone-only'], cwd=tmp_path)
    keys = torch.load(dst, weights_only=True)['state_dict']
    assert 'stem.conv.weight' in keys and 'norm0.weight' in keys
    assert not any(k.startswith(('decode_head', 'auxiliary_head', 'backbone.')) for k in keys)


def test_convert_tool_refuses_what_it_does_not_recognise(official, tmp_path):
    """A whole-model file with keys under a module no such model has (a file that is not
    DaViT at all: test_checkpoint's convert_tool_names_what_a_non_davit_checkpoint_looks_like)."""
    checkpoint = torch.load(official['maskrcnn'][2], weights_only=False)
    checkpoint['state_dict']['mystery_head.weight'] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / 'odd.pth')
    result = run_tool(['convert_checkpoint.py', tmp_path / 'odd.pth', tmp_path / 'out.pth'], cwd=tmp_path,
                      expect_ok=False)
    assert_user_error(result, "keys under ['mystery_head']")
    assert not (tmp_path / 'out.pth').exists()


# ------------------------------------------------- configs evaluate as the official code did
OFFICIAL_ASPECTS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg 0.11 --aug-test img_ratios


@pytest.mark.parametrize('name', ['davit_retinanet_1x_coco', 'davit_small_retinanet_3x_coco',
                                  'davit_base_maskrcnn_1x_coco', 'davit_maskrcnn_3x_coco'])
def test_detection_configs_test_at_1333x800_without_flip_like_the_official_ones(name):
    cfg = Config.fromfile(osp.join(CONFIGS, f'{name}.py'))
    pipeline = cfg.test_dataloader.dataset.pipeline
    resize = [t for t in pipeline if t['type'] == 'Resize']
    assert [(t['scale'], t['keep_ratio']) for t in resize] == [((1333, 800), True)]
    assert not any('Flip' in t['type'] for t in pipeline)
    assert cfg.model.data_preprocessor.pad_size_divisor == 32


@pytest.mark.parametrize('size', ['', 'small_', 'base_'])
def test_upernet_tta_is_the_official_aug_test(size):
    cfg = Config.fromfile(osp.join(CONFIGS, f'upernet_davit_{size}512x512_160k_ade20k.py'))
    assert cfg.model.test_cfg.mode == 'whole'
    resize = [t for t in cfg.test_dataloader.dataset.pipeline if t['type'] == 'Resize']
    assert [(t['scale'], t['keep_ratio']) for t in resize] == [((2048, 512), True)]
    scales, flips = transform_of(cfg.tta_pipeline, 'TestTimeAug')['transforms'][:2]
    # mmseg 0.11 MultiScaleFlipAug: img_scale (2048, 512) times each ratio, truncated to ints.
    assert [t['scale'] for t in scales] == [(int(2048 * r), int(512 * r)) for r in OFFICIAL_ASPECTS]
    assert all(t['keep_ratio'] for t in scales)
    assert [t['prob'] for t in flips] == [0.0, 1.0]


# ------------------------------------------------------------- tools/analysis/eval_official.py
EVAL = osp.join(REPO, 'tools', 'analysis', 'eval_official.py')


def test_eval_official_covers_the_15_releases_with_existing_configs(tmp_path):
    """A dry run prints the commands and the table, and leaves --out alone (it overwrote it, the
    default official_eval.md included, with a table of 'not run')."""
    (tmp_path / 'table.md').write_text('| results of a real run |\n')
    result = subprocess.run([sys.executable, EVAL, '--checkpoint-dir', str(tmp_path), '--dry-run',
                             '--out', str(tmp_path / 'table.md')], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if 'tools/test.py' in line]
    assert len(commands) == 15 + 3  # UperNet: single scale and --tta
    for line in commands:
        assert osp.isfile(line.split()[2]), line
    assert (tmp_path / 'table.md').read_text() == '| results of a real run |\n'
    assert f'--dry-run: nothing was run, and {tmp_path / "table.md"} was left as it was' in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith('| ')][1:]  # after the header
    assert len(rows) == 12 + 6 + 6  # Mask R-CNN box + mask, RetinaNet box, UperNet x 2 protocols
    assert '| maskrcnn_t_1x | `davit_maskrcnn_1x_coco.py` | mask_rcnn_davit_t_1x.pth | box mAP | 45.0 | file missing |  |' \
        in rows
    assert any('upernet_b_160k' in row and 'mIoU (multi-scale + flip) | 49.4' in row for row in rows)


def test_eval_official_rejects_bad_options(tmp_path):
    for args, message in [(['--checkpoint-dir', str(tmp_path / 'nope')], 'no such folder'),
                          (['--checkpoint-dir', str(tmp_path), '--only', 'yolo'], "--only ['yolo']")]:
        result = subprocess.run([sys.executable, EVAL] + args, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr


FOLDER, MISSING = object(), object()
_CONFIG = 'configs/upernet_davit_512x512_160k_ade20k.py'


@pytest.mark.parametrize('table, words', [
    ([dict(name='a', config='c.py', checkpoint='a.pth', published=[45.0])],
     ["row 0 (a) has published=[45.0]; expected metric name -> published number"]),
    ([dict(name='a', config='c.py', checkpoint='a.pth', published={'mIoU': '46.3'})],
     ["row 0 (a) has published={'mIoU': '46.3'}"]),
    (dict(name='a', config='c.py', checkpoint='a.pth', published={'mIoU': 46.3}),
     ['holds an object, not a list of rows; expected a JSON list of rows such as [{"name": ']),
    ([dict(name='a', config='c.py', checkpoint=3, published={})],
     ['row 0 has checkpoint=3; expected a non-empty string']),
    ('[{"name": "a",', ['not a JSON file (Expecting property name', 'expected a JSON list of rows']),
    (FOLDER, ['is a folder; expected a file holding a JSON list of rows']),
    (MISSING, ['no such file']),
    # accepted before: "no" ran the TTA protocol, NaN was tabulated, two rows shared a work dir,
    # a missing config failed in every test run, an empty table wrote an empty table
    ([dict(name='a', config=_CONFIG, checkpoint='a.pth', published={'mIoU': 46.3}, tta='no')],
     ["row 0 (a) has tta='no'; expected true or false"]),
    ([dict(name='a', config=_CONFIG, checkpoint='a.pth', published={'mIoU': float('nan')})],
     ["row 0 (a) has published={'mIoU': nan}"]),
    ([dict(name='a', config=_CONFIG, checkpoint='a.pth', published={})] * 2,
     ["the names ['a'] are given to several rows"]),
    ([dict(name='a', config='configs/nope.py', checkpoint='a.pth', published={})],
     ["row 0 (a) has config='configs/nope.py': no such file"]),
    ([], ['holds no rows']),
], ids=['published_a_list', 'published_a_string', 'a_dict', 'checkpoint_a_number', 'cut_off', 'a_folder',
        'missing', 'tta_a_string', 'published_nan', 'a_name_twice', 'no_config', 'empty'])
def test_eval_official_names_what_is_wrong_with_its_table(tmp_path, table, words):
    path = tmp_path / 'rows.json'
    if table is FOLDER:
        path.mkdir()
    elif isinstance(table, str):
        path.write_text(table)
    elif table is not MISSING:
        path.write_text(json.dumps(table))
    out = tmp_path / 'table.md'
    result = run_tool_in_process(['analysis/eval_official.py', '--checkpoint-dir', tmp_path, '--dry-run',
                                  '--table', path, '--out', out, '--work-dir', tmp_path / 'work'],
                                 cwd=tmp_path)
    assert_user_error(result, f'--table {path}: ', *words)
    assert not out.exists()


def test_eval_official_routes_the_data_roots_by_the_configs_library(tmp_path):
    """A table row has no 'model' key to say it is a segmentor: --ade-root was dropped for it and
    COCO's data_root and ann_file given instead."""
    path = tmp_path / 'rows.json'
    rows = [dict(name='seg', config=_CONFIG, checkpoint='s.pth', published={'mIoU': 46.3}),
            dict(name='det', config='configs/davit_retinanet_1x_coco.py', checkpoint='d.pth',
                 published={'coco/bbox_mAP': 44.0})]
    path.write_text(json.dumps(rows))
    result = run_tool_in_process(['analysis/eval_official.py', '--checkpoint-dir', tmp_path, '--dry-run',
                                  '--table', path, '--ade-root', '/data/ade/', '--coco-root', '/data/coco'],
                                 cwd=tmp_path)
    seg, det = [line for line in result.stdout.splitlines() if 'tools/test.py' in line]
    assert seg.endswith('--cfg-options test_dataloader.dataset.data_root=/data/ade/')
    assert det.endswith('--cfg-options test_dataloader.dataset.data_root=/data/coco/ '
                        'test_evaluator.ann_file=/data/coco/annotations/instances_val2017.json')


@pytest.mark.slow
def test_eval_official_tabulates_what_the_test_tool_measures(official, data_root):
    _, config, path = official['upernet']
    table = data_root / 'rows.json'
    table.write_text(json.dumps([dict(name='mini_upernet', model='upernet', config=config,
                                      checkpoint=path.name, published={'mIoU': 1.5})]))
    out = data_root / 'eval.md'
    result = subprocess.run([sys.executable, EVAL, '--checkpoint-dir', str(data_root), '--table', str(table),
                             '--out', str(out), '--work-dir', str(data_root / 'eval')],
                            cwd=data_root, capture_output=True, text=True, env=dict(os.environ, **TOOL_ENV))
    assert result.returncode == 0, result.stderr[-3000:]
    row = out.read_text().splitlines()[2]
    measured = metric(result.stdout, 'mIoU')
    assert row == (f'| mini_upernet | `{osp.basename(config)}` | {path.name} | mIoU | 1.5 | {measured:.1f} | '
                   f'{measured - 1.5:+.1f} |')


@pytest.mark.slow
def test_fine_tuning_starts_from_an_official_file_with_another_num_classes(official, data_root):
    """With the learning rate at 0 the fine-tuned checkpoint shows what load_from took from the
    official file: every tensor, renamed, but the unused stage-1 norm and the class-specific
    ones, which keep their new shape."""
    _, config, path = official['retinanet']
    classes = 'train_dataloader.dataset.metainfo.classes=[square,disk]'
    result = run_tool(['train.py', config, '--work-dir', data_root / 'finetune', '--cfg-options',
                       f'load_from={path}', 'model.bbox_head.num_classes=2', 'train_cfg.max_epochs=1',
                       'train_cfg.val_interval=5', 'optim_wrapper.optimizer.lr=0', classes,
                       classes.replace('train_', 'val_')],
                      cwd=data_root)
    output = result.stdout + result.stderr
    assert 'a model of the official DaViT code (mmdet 2.11)' in output
    assert 'backbone.norm0 (2 tensors)' in output
    assert 'class-specific tensors' in output and 'bbox_head.retina_cls.weight' in output
    source = convert_model_checkpoint(torch.load(path, weights_only=False)).checkpoint['state_dict']
    after = torch.load(data_root / 'finetune' / 'epoch_1.pth', weights_only=False)['state_dict']
    assert set(after) == set(source) - {'backbone.norm0.weight', 'backbone.norm0.bias'}
    new_shape = {key for key in after if after[key].shape != source[key].shape}
    assert new_shape == {'bbox_head.retina_cls.weight', 'bbox_head.retina_cls.bias'}
    for key in set(after) - new_shape:
        assert torch.equal(after[key], source[key]), key
