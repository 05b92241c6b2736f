"""Every record of davit_mm.formats, walked: a file written in each layout (by tests/formats.py, which
follows each codebase's names independently of the records) is detected as that record, under any
prefix, loads to the reference's outputs, and is refused by a model of the other channel attention.
A record without a writer here fails, so a new format cannot land untested."""
import pytest
import torch

import formats as writers
from davit_mm.checkpoint import (CheckpointError, convert_state_dict, detect_format,
                                 detect_model_format, load_pretrained)
from davit_mm.formats import FORMATS, LAYOUTS, MODEL_FORMATS
from davit_mm.models import DaViT
from davit_mm.models.reference import ReferenceDaViT

FLORENCE_KW = dict(overlapped_downsample=True, channel_attention='v2')


def _davit_mm(official):
    return convert_state_dict(official, 'official').state_dict


# layout -> (writer of an official-layout state dict, model settings its files imply)
WRITERS = {
    'davit_mm': (_davit_mm, {}),
    'timm': (writers.timm, {}),
    'official': (writers.official_classification, {}),
    'mmpretrain': (writers.mmpretrain, {}),
    'florence2': (writers.florence2, FLORENCE_KW),
    'florence2_hf': (lambda sd: writers.florence2(sd, transformers_layout=True), FLORENCE_KW),
}


def test_every_layout_record_has_a_writer_and_a_listed_format():
    assert sorted(WRITERS) == sorted(LAYOUTS)
    assert set(FORMATS) == {layout.format for layout in LAYOUTS.values()}
    for name, layout in LAYOUTS.items():
        assert layout.name == name and layout.anchor and layout.source


@pytest.mark.parametrize('name', sorted(LAYOUTS))
@pytest.mark.parametrize('prefix', ['', 'backbone.', 'model.vision_tower.'])
def test_each_layout_is_detected_under_any_prefix_and_loads_to_the_reference(tiny_arch, name, prefix):
    writer, settings = WRITERS[name]
    ref = ReferenceDaViT(tiny_arch, **settings).eval()
    with torch.no_grad():
        for param in ref.parameters():  # nothing left at an init value the model shares
            param.add_(torch.randn_like(param) * 0.1)
    written = {prefix + key: value for key, value in writer(ref.state_dict()).items()}
    anchor = LAYOUTS[name].anchor  # some writers add their codebase's own prefix (vision_tower.)
    expected = next(key[:-len(anchor)] for key in written if key.endswith(anchor))
    assert expected.startswith(prefix)
    assert detect_format(written) == (name, expected)
    assert detect_format(written, format=LAYOUTS[name].format) == (name, expected)

    model = DaViT(tiny_arch, **settings)
    load_pretrained(model, written)
    if LAYOUTS[name].format in ('official', 'florence2', 'timm', 'mmpretrain'):
        # classification files carry no output norms: give the reference the model's
        for i in range(4):
            getattr(ref, f'norm{i}').load_state_dict(getattr(model, f'norm{i}').state_dict())
    x = torch.randn(1, 3, 45, 38)
    with torch.no_grad():
        for ours, theirs in zip(model.eval()(x), ref(x)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', sorted(n for n, layout in LAYOUTS.items() if layout.channel_attention))
def test_each_layout_is_refused_by_a_model_of_the_other_channel_attention(tiny_arch, name):
    writer, settings = WRITERS[name]
    written = writer(ReferenceDaViT(tiny_arch, **settings).state_dict())
    other = 'v1' if LAYOUTS[name].channel_attention == 'v2' else 'v2'
    model = DaViT(tiny_arch, **dict(settings, channel_attention=other))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"channel attention is '{LAYOUTS[name].channel_attention}'"):
        load_pretrained(model, written)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize('name', sorted(MODEL_FORMATS))
def test_each_model_format_is_told_by_its_modules_and_by_its_meta(tiny_arch, name):
    fmt = MODEL_FORMATS[name]
    backbone = {f'backbone.{k}': v for k, v in
                WRITERS[fmt.backbone_layout][0](ReferenceDaViT(tiny_arch).state_dict()).items()}
    for module in fmt.modules:
        assert detect_model_format({**backbone, f'{module}.conv.weight': torch.zeros(1)}) == name
    # a module both kinds could have (none listed): the meta's version entry decides
    assert detect_model_format({**backbone, 'extra.weight': torch.zeros(1)}, {fmt.version_key: '1'}) == name
    assert detect_model_format(backbone) is None  # a backbone alone is not a whole model
