"""Pretrained loading: every public format to identical outputs; every bad checkpoint to one clear error."""
import contextlib
import logging
import os
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch
from mmengine.logging import MMLogger
from safetensors.torch import save_file

import formats
from davit_mm.checkpoint import (CheckpointError, check_tensors, compare_state_dict, convert_model_checkpoint,
                                 convert_state_dict, describe_state_dict, detect_format, detect_model_format,
                                 layout_format, load_pretrained, read_checkpoint)
from davit_mm.models import DaViT
from davit_mm.models.reference import ReferenceDaViT
from helpers import REPO, assert_user_error

FLORENCE_KW = dict(overlapped_downsample=True, channel_attention='v2')


@contextlib.contextmanager
def captured_log():
    """Messages logged through mmengine's current logger while the block runs."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def reference(arch, identity_norms=False, **kwargs):
    """Random official-layout weights; classification formats carry no output norms, so for them
    the reference keeps norm0..3 at their init (what the loaded model will have)."""
    ref = ReferenceDaViT(arch, **kwargs).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if 'norm' in name and not (identity_norms and name.startswith('norm')):
                p.add_(torch.randn_like(p) * 0.2)
    return ref


def pretrained(arch, path, **kwargs):
    init_cfg = dict(type='Pretrained', checkpoint=str(path))
    init_cfg.update({k: kwargs.pop(k) for k in ('prefix', 'format') if k in kwargs})
    model = DaViT(arch, init_cfg=init_cfg, **kwargs)
    model.init_weights()
    return model.eval()


def assert_same_outputs(model, ref, shape=(2, 3, 45, 38)):
    x = torch.randn(shape)
    with torch.no_grad():
        for ours, theirs in zip(model(x), ref(x)):
            assert (ours - theirs).abs().max() < 1e-5


CASES = {
    # name: (writer, identity_norms, model kwargs)
    'official-classification': (formats.official_classification, True, {}),
    'official-detector': (formats.official_detector, False, {}),
    'timm': (formats.timm, True, {}),
    'mmpretrain': (formats.mmpretrain, True, {}),
    'florence2': (formats.florence2, True, FLORENCE_KW),
    'florence2-transformers': (lambda sd: formats.florence2(sd, transformers_layout=True), True, FLORENCE_KW),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_each_public_format_loads_to_identical_outputs(tiny_arch, tmp_path, case):
    writer, identity_norms, kwargs = CASES[case]
    ref = reference(tiny_arch, identity_norms, **kwargs)
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': writer(ref.state_dict()), 'epoch': 3}, path)
    assert_same_outputs(pretrained(tiny_arch, path, **kwargs), ref)


def test_davit_mm_checkpoint_round_trips_through_the_runner_layout(tiny_arch, tmp_path):
    source = DaViT(tiny_arch).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / 'epoch_12.pth'
    torch.save({'meta': {'epoch': 12}, 'state_dict': formats.davit_mm_detector(source.state_dict())}, path)
    model = pretrained(tiny_arch, path, prefix='backbone.')
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_classification_checkpoint_reports_missing_norms_once_in_one_line(tiny_arch, tmp_path):
    ref = reference(tiny_arch, identity_norms=True)
    path = tmp_path / 'cls.pth'
    torch.save(formats.official_classification(ref.state_dict()), path)
    model = DaViT(tiny_arch)
    with captured_log() as messages:
        report = load_pretrained(model, str(path))
    lines = [m for m in messages if 'left at init' in m]
    assert len(lines) == 1 and '\n' not in lines[0]
    assert 'left at init: norm0, norm1, norm2, norm3' in lines[0]
    assert 'dropped 4 classifier tensors' in lines[0]
    assert sorted(report['classifier']) == ['head.bias', 'head.weight', 'norms.bias', 'norms.weight']


def test_mmpretrain_classification_norm3_is_dropped_not_loaded(tiny_arch, tmp_path):
    ref = reference(tiny_arch, identity_norms=True)
    path = tmp_path / 'mmpretrain.pth'
    torch.save({'state_dict': formats.mmpretrain(ref.state_dict())}, path)
    model = DaViT(tiny_arch)
    report = load_pretrained(model, str(path))
    assert 'backbone.norm3.weight' in report['classifier']
    assert torch.equal(model.norm3.weight, torch.ones(128))


def test_detector_backbone_norms_load_and_unbuilt_parts_are_skipped(tiny_arch, tmp_path):
    ref = reference(tiny_arch)
    path = tmp_path / 'det.pth'
    torch.save({'state_dict': formats.official_detector(ref.state_dict())}, path)
    model = DaViT(tiny_arch, out_indices=(1, 2))
    report = load_pretrained(model, str(path))
    assert torch.equal(model.norm1.weight, ref.norm1.weight)
    assert {k.split('.')[0] for k in report['skipped']} == {'norm0', 'norm3', 'stages'}
    assert all(k.startswith(('norm', 'stages.3.')) for k in report['skipped'])


def test_explicit_prefix_and_format_are_honoured(tiny_arch, tmp_path):
    ref = reference(tiny_arch)
    path = tmp_path / 'det.pth'
    torch.save({'state_dict': formats.official_detector(ref.state_dict())}, path)
    assert_same_outputs(pretrained(tiny_arch, path, prefix='backbone.', format='official'), ref)
    with pytest.raises(CheckpointError, match="under prefix='bbone.'"):
        pretrained(tiny_arch, path, prefix='bbone.')
    with pytest.raises(CheckpointError, match='no timm-format DaViT weights'):
        pretrained(tiny_arch, path, format='timm')
    with pytest.raises(ValueError, match="format='caffe'"):
        pretrained(tiny_arch, path, format='caffe')


def test_prefix_without_its_dot_reads_as_mmengine_does_and_a_non_str_prefix_is_refused(tiny_arch, tmp_path):
    ref = reference(tiny_arch)
    path = tmp_path / 'det.pth'
    torch.save({'state_dict': formats.official_detector(ref.state_dict())}, path)
    assert_same_outputs(pretrained(tiny_arch, path, prefix='backbone'), ref)
    with pytest.raises(TypeError, match=r"prefix=3 \(int\): accepted a str such as 'backbone.'"):
        pretrained(tiny_arch, path, prefix=3)
    state_dict = formats.official_detector(ref.state_dict())  # converted, no key began with '.'
    assert convert_state_dict(state_dict, 'official', 'backbone').sources == \
        convert_state_dict(state_dict, 'official', 'backbone.').sources


LAYOUT_NAMES = r"\('davit_mm', 'timm', 'official', 'mmpretrain', 'florence2', 'florence2_hf'\)"


@pytest.mark.parametrize('call, error, message', [
    (lambda sd: convert_state_dict(sd, 'bogus'), ValueError,
     rf"^layout='bogus': accepted one of {LAYOUT_NAMES} \(the layouts detect_format returns\)$"),
    (lambda sd: layout_format(None), ValueError, rf'^layout=None: accepted one of {LAYOUT_NAMES}'),
    (lambda sd: convert_state_dict(sd, 'official', None), TypeError,
     r"^prefix=None \(NoneType\): accepted a str such as 'backbone.' \('' for none\)$"),
    (lambda sd: detect_format(None), TypeError,
     r'^state_dict=None \(NoneType\): accepted a dict of tensors \{name: tensor\}$'),
    (lambda sd: detect_format('ckpt.pth'), TypeError,  # read as the keys '.', 'c', 'h', 'k', ...
     r"^state_dict='ckpt.pth' \(str\): accepted a dict of tensors \{name: tensor\} \(a file: read it "
     r'with read_checkpoint\)$'),
    (lambda sd: detect_format({**sd, 3: torch.zeros(1)}), TypeError,
     r'^state_dict has the key 3 \(int\): accepted a dict of tensors whose keys are str$'),
    (lambda sd: convert_state_dict([1, 2], 'official'), TypeError, r'^state_dict=\[1, 2\] \(list\)'),
    (lambda sd: describe_state_dict(None), TypeError, r'^state_dict=None \(NoneType\)'),
    (lambda sd: compare_state_dict(None, sd), TypeError, r'^state=None \(NoneType\)'),
    (lambda sd: compare_state_dict(sd, None), TypeError, r'^own=None \(NoneType\)'),
    (lambda sd: check_tensors(None, sd, 'x'), TypeError, r'^state_dict=None \(NoneType\)'),
    (lambda sd: check_tensors(sd, None, 'x'), TypeError, r'^own=None \(NoneType\)'),
    (lambda sd: detect_model_format(None), TypeError, r'^state_dict=None \(NoneType\)'),
    (lambda sd: convert_model_checkpoint({'state_dict': None}), CheckpointError,
     r"^the checkpoint: its 'state_dict' is a NoneType, not a dict of tensors$"),
    (lambda sd: load_pretrained(torch.nn.Linear(2, 2), sd), TypeError,  # AttributeError: no 'arch'
     r'^model=Linear: accepted a davit_mm DaViT backbone \(of a detector or segmentor: its .backbone\)$'),
])
def test_checkpoint_functions_name_a_bad_argument_its_value_and_what_is_accepted(tiny_arch, call, error,
                                                                                 message):
    # before: KeyError: 'bogus', TypeError: 'NoneType' object is not iterable, AttributeError, ...
    with pytest.raises(error, match=message):
        call(formats.official_classification(ReferenceDaViT(tiny_arch).state_dict()))


@pytest.mark.parametrize('wrap', [
    lambda sd: {'state_dict': {'model': sd}},
    lambda sd: {'model': {'state_dict': sd, 'epoch': 1}},
    lambda sd: {'module': {'module': sd}},
    lambda sd: {'state_dict': {'model': {'module': sd}}, 'meta': {}},
])
def test_nested_wrappers_are_unwrapped(tiny_arch, tmp_path, wrap):
    ref = reference(tiny_arch, True)
    path = tmp_path / 'nested.pth'
    torch.save(wrap(formats.official_classification(ref.state_dict())), path)
    assert_same_outputs(pretrained(tiny_arch, path), ref)


def test_two_backbones_in_one_file_need_a_prefix(tiny_arch, tmp_path):
    """A distillation file holds a teacher and a student of the same size, with other weights:
    without a prefix the loader refuses to guess; each prefix loads its own backbone."""
    teacher, student = reference(tiny_arch), reference(tiny_arch)
    both = {**{f'teacher.{k}': v for k, v in teacher.state_dict().items()},
            **{f'student.{k}': v for k, v in student.state_dict().items()}}
    path = tmp_path / 'kd.pth'
    torch.save(both, path)
    with pytest.raises(CheckpointError, match='several DaViT backbones'):
        pretrained(tiny_arch, path)
    assert_same_outputs(pretrained(tiny_arch, path, prefix='student.'), student)
    assert_same_outputs(pretrained(tiny_arch, path, prefix='teacher.'), teacher)
    with pytest.raises(AssertionError):  # the two really differ
        assert_same_outputs(pretrained(tiny_arch, path, prefix='student.'), teacher)


# -------------------------------------------------------------------------- wrong checkpoints
def _save_official(arch, path, **kwargs):
    torch.save(formats.official_classification(reference(arch, True, **kwargs).state_dict()), path)
    return path


def test_checkpoint_of_another_width_names_arch_and_mismatching_keys(tiny_arch, tmp_path):
    path = _save_official(tiny_arch, tmp_path / 'narrow.pth')
    wider = dict(tiny_arch, embed_dims=32, num_heads=(1, 2, 4, 4))
    with pytest.raises(CheckpointError) as info:
        pretrained(wider, path)
    message = str(info.value)
    assert 'does not fit DaViT(arch=' in message and 'embed_dims=(32, 64, 128, 256)' in message
    assert 'looks like embed_dims=(16, 32, 64, 128), depths=(1, 2, 1, 1)' in message
    assert 'shape mismatches: stem.conv.weight: checkpoint (16, 3, 7, 7) vs model (32, 3, 7, 7)' in message


def test_checkpoint_of_another_depth_is_refused_either_way(tiny_arch, tmp_path):
    path = _save_official(tiny_arch, tmp_path / 'deep.pth')
    with pytest.raises(CheckpointError, match='keys the model does not have:.*stages.1.blocks.1'):
        pretrained(dict(tiny_arch, depths=(1, 1, 1, 1)), path)
    with pytest.raises(CheckpointError, match='model weights the checkpoint lacks:.*stages.2.blocks.1'):
        pretrained(dict(tiny_arch, depths=(1, 2, 2, 1)), path)


def test_failed_load_leaves_the_model_untouched(tiny_arch, tmp_path):
    path = _save_official(tiny_arch, tmp_path / 'deep.pth')
    model = DaViT(dict(tiny_arch, depths=(1, 2, 2, 1)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_pretrained(model, str(path))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_real_size_mismatch_tiny_checkpoint_into_small(tmp_path):
    path = tmp_path / 'tiny.pth'
    torch.save(formats.timm(ReferenceDaViT('tiny').state_dict()), path)
    with pytest.raises(CheckpointError, match=r"DaViT\(arch='small'\).*depths=\(1, 1, 3, 1\)"):
        pretrained('small', path)


def test_florence2_weights_into_a_v1_model_point_to_the_florence_arch(tiny_arch, tmp_path):
    path = tmp_path / 'florence.pth'
    torch.save(formats.florence2(reference(tiny_arch, True, **FLORENCE_KW).state_dict()), path)
    with pytest.raises(CheckpointError, match="channel_attention='v1'.*florence2-base"):
        pretrained(tiny_arch, path)


def test_checkpoint_of_another_model_is_refused(tiny_arch, tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save({'state_dict': {'conv1.weight': torch.randn(8, 3, 7, 7), 'fc.weight': torch.randn(2, 8)}}, path)
    with pytest.raises(CheckpointError, match=r"no DaViT weights found.*'conv1.weight'"):
        pretrained(tiny_arch, path)


@pytest.mark.parametrize('bad_value', [float('nan'), float('inf')])
def test_nan_or_inf_weights_are_refused_naming_the_keys(tiny_arch, tmp_path, bad_value):
    state = formats.timm(reference(tiny_arch, identity_norms=True).state_dict())
    state['stages.2.blocks.0.1.attn.qkv.weight'][0, 0] = bad_value
    torch.save(state, tmp_path / 'bad.pth')
    with pytest.raises(CheckpointError, match=r'1 with NaN/Inf values: stages.2.blocks.0.channel_block'
                                              r'.attn.qkv.weight \(1 of'):
        pretrained(tiny_arch, tmp_path / 'bad.pth')


@pytest.mark.skipif(not hasattr(torch, 'float8_e4m3fn'), reason='this torch has no 8-bit floats')
def test_8_bit_float_weights_load_as_their_values_and_nan_among_them_is_named(tiny_arch, tmp_path):
    """torch.isfinite is not implemented for float8: the NaN check stopped with
    NotImplementedError."""
    state = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v
             for k, v in formats.timm(reference(tiny_arch, identity_norms=True).state_dict()).items()}
    torch.save(state, tmp_path / 'fp8.pth')
    model = pretrained(tiny_arch, tmp_path / 'fp8.pth')
    weight = model.state_dict()['stages.2.blocks.0.channel_block.attn.qkv.weight']
    assert weight.dtype == torch.float32
    assert torch.equal(weight, state['stages.2.blocks.0.1.attn.qkv.weight'].float())
    state['stages.2.blocks.0.1.attn.qkv.weight'][0, 0] = float('nan')
    torch.save(state, tmp_path / 'fp8_nan.pth')
    with pytest.raises(CheckpointError, match=r'1 with NaN/Inf values: stages.2.blocks.0.channel_block'
                                              r'.attn.qkv.weight \(1 of'):
        pretrained(tiny_arch, tmp_path / 'fp8_nan.pth')


@pytest.mark.parametrize('make_bad,message', [
    (lambda w: w.to(torch.int32), r'wrong dtypes: stem.conv.weight: torch.int32, model torch.float32'),
    (lambda w: w.to_sparse(), r'not dense tensors: stem.conv.weight \(torch.sparse_coo\)'),
])
def test_integer_and_sparse_tensors_are_refused_before_anything_is_copied(tiny_arch, tmp_path, make_bad,
                                                                          message):
    state = formats.timm(reference(tiny_arch, identity_norms=True).state_dict())
    state['stem.conv.weight'] = make_bad(state['stem.conv.weight'])
    torch.save(state, tmp_path / 'bad.pth')
    model = DaViT(tiny_arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(model, str(tmp_path / 'bad.pth'))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_file(tiny_arch, tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint='.*nope.pth': no such file"):
        pretrained(tiny_arch, tmp_path / 'nope.pth')


def test_missing_checkpoint_argument(tiny_arch):
    model = DaViT(tiny_arch, init_cfg=dict(type='Pretrained'))
    with pytest.raises(ValueError, match='needs checkpoint=PATH'):
        model.init_weights()


def test_truncated_file(tiny_arch, tmp_path):
    path = _save_official(tiny_arch, tmp_path / 'full.pth')
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match='corrupt or truncated'):
        pretrained(tiny_arch, truncated)


def _flip_bytes_in_largest_member(path):
    """Corrupt the data of the archive's largest tensor, leaving the zip structure intact."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = (int.from_bytes(data[info.header_offset + o:info.header_offset + o + 2], 'little')
                           for o in (26, 28))
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    path.write_bytes(bytes(data))


def test_corrupt_tensor_data_is_refused_by_its_checksum(tiny_arch, tmp_path):
    path = _save_official(tiny_arch, tmp_path / 'flipped.pth')
    read_checkpoint(str(path))  # intact
    _flip_bytes_in_largest_member(path)
    torch.load(path, weights_only=True)  # torch itself does not notice
    model = DaViT(tiny_arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r'corrupt or truncated\?\): BadZipFile: Bad CRC-32'):
        load_pretrained(model, str(path))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_archive_saved_without_checksums_loads(tiny_arch, tmp_path):
    config = pytest.importorskip('torch.utils.serialization').config.save  # torch >= 2.6
    ref = reference(tiny_arch, True)
    old, config.compute_crc32 = config.compute_crc32, False
    try:
        torch.save(formats.official_classification(ref.state_dict()), tmp_path / 'nocrc.pth')
    finally:
        config.compute_crc32 = old
    assert_same_outputs(pretrained(tiny_arch, tmp_path / 'nocrc.pth'), ref)


def test_plain_pickle_is_named_as_such(tiny_arch, tmp_path):
    path = tmp_path / 'pickled.pth'
    with open(path, 'wb') as f:
        pickle.dump(formats.official_classification(reference(tiny_arch, True).state_dict()), f)
    with pytest.raises(CheckpointError, match=r'is a plain Python pickle \(written by pickle.dump, not torch.save\)'):
        pretrained(tiny_arch, path)


def test_legacy_torch_file_loads(tiny_arch, tmp_path):
    ref = reference(tiny_arch, True)
    path = tmp_path / 'legacy.pth'
    torch.save(formats.official_classification(ref.state_dict()), path, _use_new_zipfile_serialization=False)
    assert_same_outputs(pretrained(tiny_arch, path), ref)


@pytest.mark.parametrize('name', ['model.safetensors', 'MODEL.SAFETENSORS',
                                  '4f1c2e9a0b'])  # Hugging Face's cache: no extension
def test_safetensors_are_recognised_by_content(tiny_arch, tmp_path, name):
    ref = reference(tiny_arch, True)
    save_file({k: v.contiguous() for k, v in formats.timm(ref.state_dict()).items()}, str(tmp_path / name))
    assert_same_outputs(pretrained(tiny_arch, tmp_path / name), ref)


@pytest.mark.parametrize('map_location, error, message', [
    ('gpu', ValueError, r"map_location='gpu' is not a device: accepted a device \('cpu', 'cuda'"),
    (3, TypeError, r'map_location=3 \(int\): accepted a device'),
    ('cpu:0', ValueError, r"map_location='cpu:0': torch.load takes the CPU as 'cpu', without an index"),
    pytest.param('cuda', ValueError, r"map_location='cuda': this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')),
])
def test_bad_map_location_is_named_not_blamed_on_the_file(tiny_arch, tmp_path, map_location, error, message):
    path = _save_official(tiny_arch, tmp_path / 'ok.pth')
    model = DaViT(tiny_arch, init_cfg=dict(type='Pretrained', checkpoint=str(path), map_location=map_location))
    with pytest.raises(error, match=message):
        model.init_weights()


@pytest.mark.parametrize('content', [b'not a checkpoint at all\n', b''])
def test_file_that_is_not_a_checkpoint(tiny_arch, tmp_path, content):
    path = tmp_path / 'notes.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"notes.pth' is not a PyTorch checkpoint \(neither a torch.save "
                                              rf"archive, a pickle nor a safetensors file; {len(content)} bytes\)"):
        pretrained(tiny_arch, path)


def test_checkpoint_without_tensors(tiny_arch, tmp_path):
    path = tmp_path / 'meta.pth'
    torch.save({'epoch': 3, 'lr': 0.1}, path)
    with pytest.raises(CheckpointError, match='holds no tensors'):
        pretrained(tiny_arch, path)


def test_checkpoint_path_of_wrong_type():
    with pytest.raises(TypeError, match='checkpoint must be a path'):
        read_checkpoint(123)


_EXECUTED = []


class _Payload:
    def __reduce__(self):
        return (_EXECUTED.append, ('ran',))


def test_pickled_code_is_refused_and_not_executed(tiny_arch, tmp_path):
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        torch.save({'state_dict': {'x': torch.zeros(1)}, 'payload': _Payload()}, f,
                   pickle_module=pickle)
    with pytest.raises(CheckpointError, match='weights_only'):
        pretrained(tiny_arch, path)
    assert _EXECUTED == []


def test_official_checkpoint_with_argparse_namespace_loads(tiny_arch, tmp_path):
    import argparse
    ref = reference(tiny_arch, identity_norms=True)
    path = tmp_path / 'official_with_args.pth'
    torch.save({'state_dict': formats.official_classification(ref.state_dict()),
                'args': argparse.Namespace(model='DaViT_tiny', lr=1e-3)}, path)
    assert_same_outputs(pretrained(tiny_arch, path), ref)


# ----------------------------------------------------------------------- conversion tool
def test_convert_tool_writes_a_davit_mm_checkpoint(tiny_arch, tmp_path):
    ref = reference(tiny_arch, identity_norms=True)
    src, dst = tmp_path / 'timm.pth', tmp_path / 'converted.pth'
    torch.save(formats.timm(ref.state_dict()), src)
    result = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'convert_checkpoint.py'),
                             str(src), str(dst)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert 'format: timm' in result.stdout
    assert 'stages.0.blocks.0.0.attn.qkv.weight -> stages.0.blocks.0.spatial_block.attn.qkv.weight' in result.stdout
    assert 'dropped classifier: head.fc.bias, head.fc.weight, head.norm.bias, head.norm.weight' in result.stdout
    saved = torch.load(dst, weights_only=True)
    assert saved['meta']['source_format'] == 'timm'
    model = pretrained(tiny_arch, dst, format='davit_mm')
    assert_same_outputs(model, ref)


def test_convert_tool_checks_where_it_writes_and_writes_all_or_nothing(tiny_arch, tmp_path,
                                                                        monkeypatch):
    """A folder as DST is refused before SRC is read; missing folders are created; a write that
    fails part-way (here converting a file onto itself) leaves DST as it was, with no leftovers."""
    from helpers import load_tool
    ref = reference(tiny_arch, identity_norms=True)
    src = tmp_path / 'timm.pth'
    torch.save(formats.timm(ref.state_dict()), src)
    result = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'convert_checkpoint.py'),
                             str(src), str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith(
        f"error: dst '{tmp_path}' is a folder; give the file to write"), result.stderr
    tool = load_tool('convert_checkpoint.py')
    tool.main([str(src), str(tmp_path / 'new' / 'folder' / 'out.pth')])
    assert_same_outputs(pretrained(tiny_arch, tmp_path / 'new' / 'folder' / 'out.pth'), ref)

    before = src.read_bytes()

    def fail(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(os, 'fsync', fail)  # dies after torch.save wrote the bytes
    with pytest.raises(OSError, match='disk full'):
        tool.main([str(src), str(src)])
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['new', 'timm.pth']


def test_convert_tool_rejects_a_non_davit_file(tmp_path):
    src = tmp_path / 'other.pth'
    torch.save({'fc.weight': torch.randn(2, 2)}, src)
    result = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'convert_checkpoint.py'),
                             str(src), str(tmp_path / 'out.pth'), '--format', 'official'],
                            capture_output=True, text=True, cwd=REPO)
    assert_user_error(result, 'no official-format DaViT weights found')
    assert not (tmp_path / 'out.pth').exists()


SWIN_MMDET = {  # the key layout of mmdet's SwinTransformer inside a detector checkpoint
    'backbone.patch_embed.projection.weight': torch.randn(8, 3, 4, 4),
    'backbone.patch_embed.norm.weight': torch.ones(8),
    'backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table': torch.randn(169, 1),
    'backbone.stages.0.blocks.0.attn.w_msa.qkv.weight': torch.randn(24, 8),
    'backbone.stages.0.blocks.0.ffn.layers.0.0.weight': torch.randn(32, 8),
    'backbone.stages.0.downsample.reduction.weight': torch.randn(16, 32),
    'backbone.stages.1.downsample.norm.weight': torch.ones(32),
}
RESNET = {'conv1.weight': torch.randn(8, 3, 7, 7), 'layer1.0.conv1.weight': torch.randn(8, 8, 1, 1),
          'layer1.0.bn1.weight': torch.ones(8)}


@pytest.mark.parametrize('state,name', [(SWIN_MMDET, 'Swin Transformer'), (RESNET, 'ResNet/ResNeXt')])
def test_convert_tool_names_what_a_non_davit_checkpoint_looks_like(tmp_path, state, name):
    src = tmp_path / 'other.pth'
    torch.save({'state_dict': state}, src)
    result = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'convert_checkpoint.py'),
                             str(src), str(tmp_path / 'out.pth')], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith('error: no DaViT weights found; it looks like a ' + name)
    assert not (tmp_path / 'out.pth').exists()


@pytest.mark.parametrize('state_dict, message', [
    ({'weight': None, 'bias': torch.zeros(2)}, r"tensors that cannot be loaded, nothing was: 1 with values that are not tensors: weight \(NoneType\)"),
    ({'weight': [1.0, 2.0], 'bias': torch.zeros(2)}, r'weight \(list\)'),
    ([torch.zeros(2)], r"its 'state_dict' is a list, not a dict of tensors"),
])
def test_whole_model_check_names_entries_that_are_not_tensors(tmp_path, state_dict, message):
    from davit_mm.checkpoint import check_checkpoint_fits
    path = tmp_path / 'odd.pth'
    torch.save({'state_dict': state_dict, 'meta': {}}, path)
    with pytest.raises(CheckpointError, match=message):
        check_checkpoint_fits(torch.nn.Linear(3, 2), str(path))


def test_a_backbone_checkpoint_given_for_a_whole_model_is_named_as_such(tmp_path):
    """`tools/test.py` with a backbone's weights (e.g. convert_checkpoint.py --backbone-only)
    listed 152 unexpected and 190 missing keys without saying what the file was."""
    from davit_mm.checkpoint import check_checkpoint_fits

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Linear(3, 4)
            self.head = torch.nn.Linear(4, 2)

    model = Detector()
    path = tmp_path / 'backbone.pth'
    torch.save({'state_dict': model.backbone.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"it holds a backbone alone: its keys are the model's backbone\.\* "
                                              r'keys; give it as model.backbone.init_cfg.checkpoint'):
        check_checkpoint_fits(model, str(path))
    torch.save({'state_dict': {'head.weight': torch.zeros(3, 4)}}, path)  # not the backbone's keys
    with pytest.raises(CheckpointError) as caught:
        check_checkpoint_fits(model, str(path))
    assert 'backbone alone' not in str(caught.value)


# ------------------------------------------------- loaders: what a checkpoint audit found
@pytest.mark.parametrize('map_location', [None, {'cuda:0': 'cpu'}, {}])
def test_safetensors_take_torch_loads_other_kinds_of_map_location(tiny_arch, tmp_path, map_location):
    """None and dicts (torch.load's other kinds) were handed to safetensors as str(map_location),
    which called the file unreadable: 'device None is invalid'."""
    ref = reference(tiny_arch, True)
    save_file({k: v.contiguous() for k, v in formats.timm(ref.state_dict()).items()}, str(tmp_path / 'm.safetensors'))
    model = DaViT(tiny_arch, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'm.safetensors'),
                                           map_location=map_location))
    model.init_weights()
    assert_same_outputs(model.eval(), ref)


def test_a_map_location_function_is_refused_for_safetensors_naming_the_argument(tiny_arch, tmp_path):
    save_file({k: v.contiguous() for k, v in formats.timm(reference(tiny_arch).state_dict()).items()},
              str(tmp_path / 'm.safetensors'))
    with pytest.raises(ValueError, match=r"map_location=<function .*a function is taken for torch.save files; "
                                         r".*m.safetensors' is a .safetensors file: give a device") as caught:
        read_checkpoint(str(tmp_path / 'm.safetensors'), map_location=lambda storage, location: storage)
    assert 'not a readable' not in str(caught.value)


@pytest.mark.parametrize('meta', ['written', 'source_format only'])
def test_a_converted_florence2_file_is_refused_by_a_v1_model(tiny_arch, tmp_path, meta):
    """Its keys are davit_mm's, the same for either channel attention: a v1 model loaded it
    without a word, weights that mean something else. The converter now writes the attention
    into meta; files converted before carry the source format, which tells it too."""
    from helpers import run_tool_in_process
    ref = reference(tiny_arch, True, **FLORENCE_KW)
    torch.save(formats.florence2(ref.state_dict()), tmp_path / 'florence2.pth')
    result = run_tool_in_process(['convert_checkpoint.py', tmp_path / 'florence2.pth', tmp_path / 'conv.pth'],
                                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    converted = torch.load(tmp_path / 'conv.pth', weights_only=True)
    assert converted['meta']['channel_attention'] == 'v2'
    if meta == 'source_format only':
        del converted['meta']['channel_attention']
        torch.save(converted, tmp_path / 'conv.pth')
    v1 = dict(FLORENCE_KW, channel_attention='v1')
    with pytest.raises(CheckpointError, match=r"conv.pth is converted from a florence2 checkpoint \(its meta "
                                              r"says so\), whose channel attention is 'v2', but DaViT.* "
                                              r"uses channel_attention='v1' \(use arch='florence2-base'"):
        pretrained(tiny_arch, tmp_path / 'conv.pth', **v1)
    assert_same_outputs(pretrained(tiny_arch, tmp_path / 'conv.pth', **FLORENCE_KW), ref)
    # and converting the converted file keeps it
    run_tool_in_process(['convert_checkpoint.py', tmp_path / 'conv.pth', tmp_path / 'again.pth'],
                        cwd=tmp_path)
    assert torch.load(tmp_path / 'again.pth', weights_only=True)['meta']['channel_attention'] == 'v2'


def test_prefix_empty_chooses_the_root_backbone_beside_an_ema_copy(tiny_arch, tmp_path):
    """With a DaViT at the root and a copy under 'ema.', prefix='' took every key (the copy's as
    unknown keys) and the converter wrote the mix, which nothing could load."""
    from helpers import run_tool_in_process
    ref = reference(tiny_arch, True)
    root = formats.timm(ref.state_dict())
    written = dict(root, **{f'ema.{k}': torch.zeros_like(v) for k, v in root.items()})
    with pytest.raises(CheckpointError, match='several DaViT backbones'):
        detect_format(written)
    torch.save(written, tmp_path / 'two.pth')
    assert_same_outputs(pretrained(tiny_arch, tmp_path / 'two.pth', prefix=''), ref)
    assert sorted(convert_state_dict(written, 'timm', 'ema.').state_dict) == \
        sorted(convert_state_dict(written, 'timm', '').state_dict)
    result = run_tool_in_process(['convert_checkpoint.py', tmp_path / 'two.pth', tmp_path / 'root.pth',
                                  '--prefix', ''], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    keys = torch.load(tmp_path / 'root.pth', weights_only=True)['state_dict']
    assert not any(k.startswith('ema.') for k in keys)
    assert_same_outputs(pretrained(tiny_arch, tmp_path / 'root.pth'), ref)


class _Detector(torch.nn.Module):
    def __init__(self, arch, out_indices=(0, 1, 2, 3)):
        super().__init__()
        self.backbone = DaViT(arch, out_indices=out_indices)
        self.bbox_head = torch.nn.Linear(4, 2)


@pytest.mark.parametrize('writer, format', [(formats.official_classification, 'official'),
                                            (formats.timm, 'timm'), (formats.mmpretrain, 'mmpretrain')])
def test_a_public_classifier_given_as_a_whole_model_is_named_as_such(tiny_arch, tmp_path, writer, format):
    """Only davit_mm-layout backbones got the hint; an mmpretrain file read like a size mismatch."""
    from davit_mm.checkpoint import check_checkpoint_fits
    torch.save(writer(reference(tiny_arch).state_dict()), tmp_path / 'cls.pth')
    torch.save({'state_dict': _Detector(tiny_arch).state_dict()}, tmp_path / 'model.pth')
    under = " under 'backbone.'" if format == 'mmpretrain' else ''  # an ImageClassifier's backbone
    with pytest.raises(CheckpointError, match=rf"it holds a backbone alone: DaViT weights in {format} format"
                                              rf"{under}; give it as model.backbone.init_cfg.checkpoint"):
        check_checkpoint_fits(_Detector(tiny_arch), str(tmp_path / 'cls.pth'))
    # a whole model of the same kind with another size is not called a backbone
    with pytest.raises(CheckpointError) as caught:
        check_checkpoint_fits(_Detector(dict(tiny_arch, embed_dims=32)), str(tmp_path / 'model.pth'))
    assert 'backbone alone' not in str(caught.value)
    # nor a detector given to a segmentor: it is named as a model of another kind
    segmentor = _Detector(tiny_arch)
    segmentor.decode_head = segmentor.bbox_head
    del segmentor.bbox_head
    with pytest.raises(CheckpointError, match=r"it is a whole model with \['bbox_head'\], where the config's "
                                              r"model has \['decode_head'\]: a checkpoint of another kind") as caught:
        check_checkpoint_fits(segmentor, str(tmp_path / 'model.pth'))
    assert 'backbone alone' not in str(caught.value)


def test_a_davit_mm_whole_model_leaves_out_the_norms_the_model_does_not_build(tiny_arch, tmp_path):
    """A Mask R-CNN's (or a converted official RetinaNet's) backbone.norm0 in a RetinaNet-like
    model (out_indices from 1): refused as a key the model does not have, by every tool."""
    from types import SimpleNamespace

    from davit_mm.checkpoint import adapt_model_checkpoint, check_checkpoint_fits
    from davit_mm.engine import OfficialCheckpointHook
    source = _Detector(tiny_arch)  # builds norm0..3
    checkpoint = {'state_dict': source.state_dict(), 'meta': {'epoch': 3}, 'optimizer': {'state': {}}}
    torch.save(checkpoint, tmp_path / 'model.pth')
    model = _Detector(tiny_arch, out_indices=(1, 2, 3))
    adapted, note = adapt_model_checkpoint(model, checkpoint, 'model.pth')
    assert note == 'model.pth: not used by this model (out_indices=(1, 2, 3)): backbone.norm0 (2 tensors)'
    assert set(adapted['state_dict']) == set(model.state_dict())
    assert adapted['meta'] == {'epoch': 3} and 'optimizer' in adapted
    assert 'backbone.norm0.weight' in checkpoint['state_dict']  # the input is left as it was
    assert check_checkpoint_fits(model, str(tmp_path / 'model.pth')) == ''
    # resuming from it is not an official file's resume: the hook adapts it and goes on
    loaded = dict(checkpoint)
    OfficialCheckpointHook().after_load_checkpoint(
        SimpleNamespace(model=model, _load_from='model.pth', _resume=True), loaded)
    model.load_state_dict(loaded['state_dict'], strict=True)
    # a model that builds them all takes the file as it is
    assert adapt_model_checkpoint(_Detector(tiny_arch), checkpoint, 'model.pth') == (checkpoint, '')
