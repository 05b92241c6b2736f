"""The README's "use DaViT from your own configs" blocks, pasted after mmdet's RetinaNet and Mask
R-CNN and mmseg's UperNet configs, give models whose feature strides and widths match the anchors
and heads of those configs."""
import os.path as osp
import re

import torch
from mmengine.config import Config

from davit_mm.cli import adapt_config_to_machine
from helpers import REPO

SIZE = 128  # a square input: every stride's map is SIZE / stride


def readme_snippets():
    """{family: (base config line, snippet)} of the python blocks under the README section."""
    with open(osp.join(REPO, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    section = readme.split('## Use DaViT from your own configs', 1)[1].split('\n## ', 1)[0]
    snippets = {}
    for block in re.findall(r'```python\n(.*?)```', section, flags=re.S):
        family, base = re.match(r'# ([\w -]+): (_base_ = .*)\n', block).groups()
        snippets[family] = (base, block)
    return snippets


def build_pasted(tmp_path, family):
    from mmengine.registry import MODELS, init_default_scope
    base, snippet = readme_snippets()[family]
    path = tmp_path / 'my_config.py'
    path.write_text(base + '\n' + snippet)  # the user's own config, outside this repository
    cfg = Config.fromfile(str(path))
    assert cfg.model.backbone.arch == 'small'
    cfg.model.backbone.arch = 'tiny'  # the same widths (96..768) with fewer layers: faster to build
    adapt_config_to_machine(cfg)
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    return cfg, model.eval()


def features(model):
    with torch.no_grad():
        return model.extract_feat(torch.zeros(1, 3, SIZE, SIZE))


def strides(feats):
    return [SIZE // f.shape[-1] for f in feats]


def test_the_readme_has_a_block_for_each_model_family():
    assert sorted(readme_snippets()) == ['Mask R-CNN', 'RetinaNet', 'UperNet']


def test_retinanet_snippet_feeds_every_anchor_level_at_its_stride(tmp_path):
    cfg, model = build_pasted(tmp_path, 'RetinaNet')
    feats = features(model)
    assert strides(feats) == list(cfg.model.bbox_head.anchor_generator.strides) == [8, 16, 32, 64, 128]
    assert all(f.shape[1] == cfg.model.bbox_head.in_channels for f in feats)


def test_mask_rcnn_snippet_matches_the_rpn_anchors_and_roi_extractors(tmp_path):
    cfg, model = build_pasted(tmp_path, 'Mask R-CNN')
    feats = features(model)
    assert strides(feats) == list(cfg.model.rpn_head.anchor_generator.strides) == [4, 8, 16, 32, 64]
    roi_head = cfg.model.roi_head
    for extractor in (roi_head.bbox_roi_extractor, roi_head.mask_roi_extractor):
        assert strides(feats)[:len(extractor.featmap_strides)] == list(extractor.featmap_strides)


def test_upernet_snippet_feeds_the_decode_and_auxiliary_heads(tmp_path):
    cfg, model = build_pasted(tmp_path, 'UperNet')
    feats = features(model)
    assert strides(feats) == [4, 8, 16, 32]
    assert [f.shape[1] for f in feats] == list(cfg.model.decode_head.in_channels)
    aux = cfg.model.auxiliary_head
    assert feats[aux.in_index].shape[1] == aux.in_channels
    with torch.no_grad():  # the heads accept the features as they are
        logits = model.decode_head(feats)
        aux_logits = model.auxiliary_head(feats)
    assert logits.shape == (1, 150, SIZE // 4, SIZE // 4)
    assert aux_logits.shape[:2] == (1, 150)


def test_mmdets_base_neck_settings_would_miswire_davit(tmp_path):
    """Why the RetinaNet block sets start_level: without it the FPN starts at stride 16."""
    _, snippet = readme_snippets()['RetinaNet']
    assert 'start_level=0' in snippet
    broken = snippet.replace('start_level=0, ', '')
    path = tmp_path / 'broken.py'
    path.write_text("_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']\n" + broken)
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(str(path))
    init_default_scope('mmdet')
    assert strides(features(MODELS.build(cfg.model).eval()))[0] == 16
