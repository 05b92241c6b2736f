"""Checkpoint formats as data: one record per key layout of DaViT weights, one per layout of whole
trained models, the top-level modules of whole models, and the keys that give other backbones away.

Adding a format is adding one record here; :mod:`davit_mm.checkpoint` reads, detects, converts and
loads through these tables only (and ``tests/test_checkpoint_formats.py`` walks every record).

==============  ==============================================  ===================================
format          where it comes from                             anchor key (after any prefix)
==============  ==============================================  ===================================
``davit_mm``    this package (also timm's Florence-2 models)    ``stem.conv.weight`` + named blocks
``timm``        timm ``davit_{tiny,small,base}.msft_in1k``      ``stem.conv.weight`` + ``blocks.N.0``
``official``    github dingmyu/davit (classification, and       ``patch_embeds.0.proj.weight``
                trained detectors/segmentors under backbone.)
``mmpretrain``  mmpretrain ``davit-{t,s,b}_3rdparty_in1k``      ``patch_embed.projection.weight``
``florence2``   Florence-2 vision towers (``vision_tower.``),   ``convs.0.proj.weight`` (remote
                both the original and the transformers layout   code) / ``convs.0.conv.weight``
==============  ==============================================  ===================================
"""
import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

Rule = Tuple[str, Union[str, Callable[[re.Match], str]]]


@dataclass(frozen=True)
class Layout:
    """One key layout of DaViT backbone weights.

    Attributes:
        name: the layout's name (the format's, or e.g. ``'florence2_hf'`` for a second layout of
            the same format).
        format: the user-facing format name (``--format``, ``init_cfg`` ``format=``).
        anchor: a key every file of this layout has, after its prefix; it locates the prefix.
        rules: ordered ``(pattern, replacement)`` renames into davit_mm's keys.
        block_key: a pattern some key (after the prefix) must match when layouts share an anchor
            (davit_mm and timm); None when the anchor is enough.
        channel_attention: the channel attention the format implies (``'v1'``, ``'v2'``), or None
            when its files may hold either (davit_mm's own).
        classification_norm: an output norm that is the classifier's pre-logits norm when it is
            the only output norm in the file (mmpretrain's ``norm3``), so it is not loaded.
        source: where files of this layout come from.
    """
    name: str
    format: str
    anchor: str
    rules: Tuple[Rule, ...] = ()
    block_key: Optional[str] = None
    channel_attention: Optional[str] = None
    classification_norm: Optional[str] = None
    source: str = ''


def _embed_rules(module: str, conv: str) -> Tuple[Rule, ...]:
    """Stem (index 0) and downsample (index N) convolutions and norms kept as ``MODULE.N.CONV``
    and ``MODULE.N.norm``."""
    return ((rf'^{module}\.0\.{conv}\.', 'stem.conv.'),
            (rf'^{module}\.0\.norm\.', 'stem.norm.'),
            (rf'^{module}\.(\d+)\.{conv}\.', r'stages.\1.downsample.conv.'),
            (rf'^{module}\.(\d+)\.norm\.', r'stages.\1.downsample.norm.'))


def _shift_stage(kind: str) -> Callable[[re.Match], str]:
    # mmpretrain keeps stage i's downsample at the end of stage i; davit_mm at the start of i + 1.
    return lambda m: f'stages.{int(m[1]) + 1}.downsample.{kind}.'


LAYOUTS: Dict[str, Layout] = {layout.name: layout for layout in (
    Layout('davit_mm', 'davit_mm', 'stem.conv.weight',
           block_key=r'stages\.\d+\.blocks\.\d+\.(spatial|channel)_block\.',
           source="davit_mm's DaViT (and checkpoints of davit_mm's detectors/segmentors)"),
    Layout('timm', 'timm', 'stem.conv.weight', channel_attention='v1',
           block_key=r'stages\.\d+\.blocks\.\d+\.[01]\.',
           rules=((r'^(stages\.\d+\.blocks\.\d+)\.0\.', r'\1.spatial_block.'),
                  (r'^(stages\.\d+\.blocks\.\d+)\.1\.', r'\1.channel_block.')),
           source="timm's davit_tiny/small/base.msft_in1k"),
    Layout('official', 'official', 'patch_embeds.0.proj.weight', channel_attention='v1',
           rules=_embed_rules('patch_embeds', 'proj') + (
                  (r'^main_blocks\.(\d+)\.(\d+)\.0\.', r'stages.\1.blocks.\2.spatial_block.'),
                  (r'^main_blocks\.(\d+)\.(\d+)\.1\.', r'stages.\1.blocks.\2.channel_block.'),
                  (r'\.cpe\.0\.', '.cpe1.'),
                  (r'\.cpe\.1\.', '.cpe2.')),
           source='the official DaViT code (classification, and backbone. of its detectors/segmentors)'),
    Layout('mmpretrain', 'mmpretrain', 'patch_embed.projection.weight', channel_attention='v1',
           classification_norm='norm3',
           rules=((r'^patch_embed\.projection\.', 'stem.conv.'),
                  (r'^patch_embed\.norm\.', 'stem.norm.'),
                  (r'^stages\.(\d+)\.downsample\.projection\.', _shift_stage('conv')),
                  (r'^stages\.(\d+)\.downsample\.norm\.', _shift_stage('norm')),
                  (r'\.attn\.w_msa\.', '.attn.'),
                  (r'\.ffn\.layers\.0\.0\.', '.mlp.fc1.'),
                  (r'\.ffn\.layers\.1\.', '.mlp.fc2.')),
           source="mmpretrain's davit-t/s/b_3rdparty_in1k"),
    Layout('florence2', 'florence2', 'convs.0.proj.weight', channel_attention='v2',
           rules=_embed_rules('convs', 'proj') + (
                  (r'^blocks\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
                  (r'\.conv([12])\.fn\.dw\.', r'.cpe\1.proj.'),
                  (r'\.(?:window|channel)_attn\.norm\.', '.norm1.'),
                  (r'\.(?:window|channel)_attn\.fn\.', '.attn.'),
                  (r'\.ffn\.norm\.', '.norm2.'),
                  (r'\.ffn\.fn\.net\.', '.mlp.')),
           source="Florence-2's vision tower as published with its remote code (microsoft/Florence-2-*)"),
    Layout('florence2_hf', 'florence2', 'convs.0.conv.weight', channel_attention='v2',
           rules=_embed_rules('convs', 'conv') + (
                  (r'^blocks\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
                  (r'\.conv([12])\.', r'.cpe\1.proj.'),
                  (r'\.(?:window|channel)_attn\.', '.attn.'),
                  (r'\.ffn\.', '.mlp.')),
           source="Florence-2's vision tower as converted for transformers' Florence2 model"),
)}
# The user-facing format names, in the order the tools list them.
FORMATS: Tuple[str, ...] = tuple(dict.fromkeys(layout.format for layout in LAYOUTS.values()))

# Keys outside every backbone layout: classification heads (``head``, timm's ``norms``).
CLASSIFIER_KEY = re.compile(r'^(head|norms)(\.|$)')
# A davit_mm block with both attentions: what tells a DaViT from other backbones sharing an anchor
# (mmdet/mmpretrain Swin has patch_embed.projection and stages.N.downsample; timm RegNets stem.conv).
DUAL_ATTENTION_BLOCK = re.compile(r'^stages\.\d+\.blocks\.\d+\.(spatial|channel)_block\.attn\.qkv\.')

# Keys that identify other backbones, to say what a checkpoint that is not DaViT looks like.
OTHER_MODELS: Tuple[Tuple[str, re.Pattern], ...] = (
    ('Swin Transformer', re.compile(r'relative_position_bias_table$|(^|\.)layers\.\d+\.blocks\.\d+\.attn\.')),
    ('ResNet/ResNeXt', re.compile(r'(^|\.)layer[1-4]\.\d+\.(conv|bn)[123]\.')),
    ('ConvNeXt', re.compile(r'(^|\.)downsample_layers\.\d+\.|(^|\.)stages\.\d+\.\d+\.(dw|depthwise_)conv\.')),
    ('Vision Transformer', re.compile(r'(^|\.)(cls_token|pos_embed)$')),
)


@dataclass(frozen=True)
class ModelFormat:
    """The layout of whole trained models (backbone, neck, heads) written by another codebase.

    Attributes:
        name: the record's key.
        library: the library whose davit_mm configs evaluate these models.
        written_by: what wrote them.
        backbone_layout: the :data:`LAYOUTS` entry of their ``backbone.`` keys.
        version_key: the ``meta`` entry naming that library's version.
        modules: top-level modules next to ``backbone`` (anything else is refused); a file
            with any of them (or ``version_key`` in its meta) is of this format.
        rules: renames of neck/head keys into the names of ``library``'s current release.
        checked: the neck/head modules of davit_mm's configs whose parameter names were compared
            between the two releases' code.
    """
    name: str
    library: str
    written_by: str
    backbone_layout: str
    version_key: str
    modules: Tuple[str, ...]
    rules: Tuple[Rule, ...]
    checked: Tuple[str, ...]


# Top-level modules of mmdet/mmseg models besides the backbone: a file with keys under any of them
# is a whole model, not a backbone alone.
MODEL_MODULES: Tuple[str, ...] = ('neck', 'rpn_head', 'roi_head', 'bbox_head', 'mask_head', 'decode_head',
                                  'auxiliary_head')

# The official DaViT code (github dingmyu/davit) trained its 15 released detectors/segmentors with
# mmdet 2.11 / mmseg 0.11 (mmcv-full 1.3); their backbone keys are the official layout under
# 'backbone.', with an output norm for every stage. In the modules our configs use, mmdet 3.x and
# mmseg 1.x name every parameter as those releases did (FPN lateral_convs/fpn_convs.N.conv;
# RetinaHead cls_convs/reg_convs.N.conv, retina_cls, retina_reg; RPNHead rpn_conv/rpn_cls/rpn_reg;
# Shared2FCBBoxHead shared_fcs.N, fc_cls, fc_reg; FCNMaskHead convs.N.conv, upsample, conv_logits;
# UPerHead psp_modules.N.1, bottleneck, lateral_convs, fpn_convs, fpn_bottleneck, conv_seg, ConvModule
# conv/bn; FCNHead convs.N, conv_seg), so their rename lists are empty.
# Segmentors come first: detection is what remains when neither their modules nor meta match.
MODEL_FORMATS: Dict[str, ModelFormat] = {fmt.name: fmt for fmt in (
    ModelFormat('official_mmseg0', library='mmseg', written_by='the official DaViT code (mmseg 0.11)',
                backbone_layout='official', version_key='mmseg_version',
                modules=('decode_head', 'auxiliary_head'), rules=(), checked=('UPerHead', 'FCNHead')),
    ModelFormat('official_mmdet2', library='mmdet', written_by='the official DaViT code (mmdet 2.11)',
                backbone_layout='official', version_key='mmdet_version',
                modules=('neck', 'rpn_head', 'roi_head', 'bbox_head'), rules=(),
                checked=('FPN', 'RetinaHead', 'RPNHead', 'StandardRoIHead', 'Shared2FCBBoxHead',
                         'FCNMaskHead')),
)}
