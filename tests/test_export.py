"""The backbone traces and exports for deployment: torch.jit.trace and ONNX graphs made at one input
size run at others, and torch.export's graph, each compared with the eager model. So do whole
detectors and segmentors built on it, up to their post-processing."""
import json
import os
import os.path as osp
import warnings
from types import SimpleNamespace

import pytest
import torch

from davit_mm.models import DaViT
from helpers import (CONFIGS, assert_user_error, build_model, run_tool, run_tool_in_process,
                     save_runner_checkpoint)

RETINANET = osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py')
UPERNET = osp.join(CONFIGS, 'quickstart', 'upernet_davit_mini_synthetic_ade20k.py')


@pytest.fixture
def model(tiny_arch):
    torch.manual_seed(0)
    model = DaViT(tiny_arch)
    model.init_weights()
    return model.eval()


def assert_matches_eager(model, run, x):
    with torch.no_grad():
        expected = model(x)
        got = run(x)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        a = torch.as_tensor(a)
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-4 * max(1., b.abs().max().item())


def test_jit_trace_holds_at_other_sizes(model):
    """Traced at 64x96 (no padding needed there), run where stem, downsample and windows pad.
    Nothing in the model depends on a traced size in Python (no TracerWarning)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('error', torch.jit.TracerWarning)
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 96))
    for size in ((96, 160), (45, 67)):
        assert_matches_eager(model, traced, torch.randn(2, 3, *size))


def test_jit_trace_of_a_model_built_with_gradient_checkpointing(tiny_arch):
    """with_cp=True (the custom-dataset example config sets it), traced as docs/backbone.md shows
    it, without torch.no_grad(): the checkpointed blocks traced to graphs that differed between
    runs and the trace's check failed."""
    torch.manual_seed(0)
    model = DaViT(tiny_arch, with_cp=True).eval()
    traced = torch.jit.trace(model, torch.randn(1, 3, 64, 96))
    assert_matches_eager(model, traced, torch.randn(2, 3, 45, 67))


def test_torch_export_static(model):
    x = torch.randn(1, 3, 64, 96)
    exported = torch.export.export(model, (x,))
    assert_matches_eager(model, exported.module(), x)


def test_onnx_export_runs_in_onnxruntime_at_another_size(model, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    path = str(tmp_path / 'davit.onnx')
    names = [f'out{i}' for i in range(len(model.out_indices))]
    torch.onnx.export(model, (torch.randn(1, 3, 64, 96),), path, input_names=['x'],
                      output_names=names, dynamo=False,
                      dynamic_axes={'x': {0: 'batch', 2: 'height', 3: 'width'}})
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    assert_matches_eager(model, lambda x: session.run(names, {'x': x.numpy()}),
                         torch.randn(2, 3, 96, 160))


def dynamic_example(backbone, name='x'):
    """The docs' recipe: an example that pads in every window partition, and dynamic batch,
    height and width (multiples of 32, at least 32 * (window_size + 1)) for the input ``name``."""
    window = backbone.stages[0].blocks[0].spatial_block.attn.window_size
    side = torch.export.Dim('side', min=window + 1, max=16)
    other = torch.export.Dim('other', min=window + 1, max=16)
    batch = torch.export.Dim('batch', min=1, max=4)
    x = torch.randn(2, 3, 32 * (window + 1), 32 * (window + 2))
    return x, {name: {0: batch, 2: 32 * side, 3: 32 * other}}


# 192 x 128 needs no padding anywhere (tiny arch, window 3); 224 x 288 pads. At 512 x 512 the
# last stage has more tokens than channels (256 >= 128), the example fewer (20): channel attention
# must not branch on that while exporting.
OTHER_SHAPES = ((1, 3, 192, 128), (3, 3, 224, 288), (1, 3, 512, 512))


def test_torch_export_dynamic_size_holds_at_other_sizes(model):
    x, shapes = dynamic_example(model)
    exported = torch.export.export(model, (x,), dynamic_shapes=shapes)
    for shape in OTHER_SHAPES:
        assert_matches_eager(model, exported.module(), torch.randn(*shape))


def test_dynamo_onnx_export_holds_at_other_sizes(model, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    x, shapes = dynamic_example(model)
    path = str(tmp_path / 'davit.onnx')
    torch.onnx.export(model, (x,), path, dynamo=True, input_names=['x'], dynamic_shapes=shapes)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for shape in OTHER_SHAPES:
        assert_matches_eager(model, lambda t: session.run(None, {'x': t.numpy()}),
                             torch.randn(*shape))


class Network(torch.nn.Module):
    """A detector's or segmentor's network without its post-processing (mmengine's
    ``mode='tensor'``: RetinaNet's class and box maps per level, UperNet's logits), its outputs
    in one flat tuple, the form exporters take."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        out = self.model(inputs, mode='tensor')
        if isinstance(out, torch.Tensor):
            return (out,)
        return tuple(t for level_maps in out for t in level_maps)


def test_retinanet_onnx_graph_runs_in_onnxruntime_at_another_size(tmp_path):
    """Backbone, FPN and head in one TorchScript-exported ONNX graph (dynamic batch, height and
    width) made where no stage pads (224 x 448: whole windows of 7 at every stage), run where
    they pad."""
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    network = Network(build_model(RETINANET).eval())
    path = str(tmp_path / 'retinanet.onnx')
    torch.onnx.export(network, (torch.randn(1, 3, 224, 448),), path, input_names=['inputs'],
                      dynamo=False, dynamic_axes={'inputs': {0: 'batch', 2: 'height', 3: 'width'}})
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    assert_matches_eager(network, lambda x: session.run(None, {'inputs': x.numpy()}),
                         torch.randn(2, 3, 160, 224))


def test_upernet_torch_export_with_dynamic_size_holds_at_other_sizes():
    """Backbone, pyramid pooling and FPN head in one torch.export graph with dynamic batch,
    height and width (the backbone's recipe), made where the stages pad; run where they pad and
    the pooling scales (1, 2, 3, 6) divide the last map (384: 12 x 12), and where nothing pads
    and they do not (448: 14 x 14)."""
    torch.manual_seed(0)
    network = Network(build_model(UPERNET).eval())
    x, shapes = dynamic_example(network.model.backbone, name='inputs')
    exported = torch.export.export(network, (x,), dynamic_shapes=shapes)
    for shape in ((1, 3, 384, 384), (3, 3, 448, 448)):
        assert_matches_eager(network, exported.module(), torch.randn(*shape))


# ------------------------------------------------------------------- tools/export_onnx.py
# mmdeploy itself is not a test dependency (its 1.3.1 wheel declares protobuf<=3.20.2, which
# would downgrade onnx): the tool runs against a stand-in whose torch2onnx does what the real one
# does with what it is handed. It reads the checkpoint with mmengine's loader (weights_only under
# torch >= 2.6, as mmdeploy's build_pytorch_model does), records the keys it would load, and
# exports with torch.onnx.export called without `dynamo=`, as mmdeploy calls it, recording
# whether the TorchScript tracer ran the module, through helpers.CastToLong (its symbolic imports
# `_cast_Long`, as mmdeploy's RoIAlign does), and runs the graph.
STAND_IN = '''
import json, os, torch
from mmengine.runner.checkpoint import _load_checkpoint

from helpers import CastToLong, ExportProbe  # CastToLong: the symbolic imports _cast_Long

TRACED = []


def torch2onnx(img, work_dir, save_file, deploy_cfg, model_cfg, model_checkpoint=None,
               device='cuda:0'):
    import numpy, onnxruntime
    checkpoint = _load_checkpoint(model_checkpoint, map_location='cpu')
    path = os.path.join(work_dir, save_file)
    probe = torch.nn.Sequential(ExportProbe(TRACED), CastToLong())
    torch.onnx.export(probe, (torch.zeros(1, 3),), path, input_names=['x'])
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    output = session.run(None, {'x': numpy.full((1, 3), 1.5, numpy.float32)})[0]
    record = dict(img=img, deploy_cfg=deploy_cfg, model_cfg=model_cfg, device=device,
                  checkpoint=model_checkpoint, keys=sorted(checkpoint['state_dict']),
                  torchscript=all(TRACED) and bool(TRACED), output=output.tolist(),
                  output_dtype=str(output.dtype))
    with open(os.path.join(work_dir, 'stand_in.json'), 'w') as f:
        json.dump(record, f)
'''
DEPLOY_CFG = ("codebase_config = dict(type='mmdet', task='ObjectDetection')\n"
              "onnx_config = dict(type='onnx', save_file='end2end.onnx')\n"
              "backend_config = dict(type='onnxruntime')\n")


@pytest.fixture
def stand_in(tmp_path):
    """A folder for PYTHONPATH holding the stand-in ``mmdeploy`` (1.3.1), a deploy config and an
    image, and the command that runs the tool there."""
    package = tmp_path / 'site' / 'mmdeploy'
    (package / 'apis').mkdir(parents=True)
    (package / '__init__.py').write_text("__version__ = '1.3.1'\n")
    (package / 'apis' / '__init__.py').write_text(STAND_IN)
    (tmp_path / 'deploy.py').write_text(DEPLOY_CFG)
    (tmp_path / 'demo.jpg').write_bytes(b'an image the stand-in never reads')
    path = os.pathsep.join([str(tmp_path / 'site'), osp.dirname(osp.abspath(__file__)),
                            os.environ.get('PYTHONPATH', '')])

    def run(config, checkpoint, in_process=False):
        args = ['export_onnx.py', 'deploy.py', config, checkpoint, 'demo.jpg', '--work-dir', 'out']
        if in_process:  # refused before mmdeploy is imported
            return run_tool_in_process(args, str(tmp_path))
        return run_tool(args, str(tmp_path), expect_ok=False, env={'PYTHONPATH': path})
    return SimpleNamespace(root=tmp_path, run=run)


def stand_in_record(root):
    with open(root / 'out' / 'stand_in.json') as f:
        return json.load(f)


def model_keys(config):
    return sorted(build_model(config).state_dict())


def test_export_tool_hands_mmdeploy_a_runner_checkpoint_and_the_torchscript_exporter(stand_in):
    """A runner's checkpoint (unreadable under weights_only without davit_mm's scope) reaches
    mmdeploy as it is, mmdeploy's plain torch.onnx.export call traces with TorchScript (torch >=
    2.9 would take torch.export, which mmdeploy's rewriters break), and a symbolic that imports
    `_cast_Long` exports a cast to int64 (torch 2.13 has no `_cast_Long`)."""
    checkpoint = save_runner_checkpoint(RETINANET, stand_in.root / 'epoch_1.pth', ('a', 'b', 'c'))
    result = stand_in.run(RETINANET, checkpoint)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'wrote out/end2end.onnx' in result.stdout
    record = stand_in_record(stand_in.root)
    assert record['checkpoint'] == checkpoint and record['model_cfg'] == RETINANET
    assert record['device'] == 'cpu' and record['img'] == 'demo.jpg'
    assert record['keys'] == model_keys(RETINANET)
    assert record['torchscript'] is True
    assert record['output'] == [[2, 2, 2]] and record['output_dtype'] == 'int64'  # _cast_Long
    assert osp.isfile(stand_in.root / 'out' / 'end2end.onnx')


def test_export_tool_converts_an_official_whole_model_before_mmdeploy_reads_it(stand_in):
    """mmdeploy would load none of the official layout's backbone keys and export on (a log line
    lists them; under torch >= 2.6 it cannot read the file at all): the tool hands it the model
    converted to davit_mm's layout, every key of the config's model."""
    from davit_mm.synthetic import COCO_CLASSES
    from official_models import official_checkpoint, official_config, randomise_
    reference = build_model(official_config(RETINANET, 'retinanet', str(stand_in.root)))
    path = stand_in.root / 'official_retinanet.pth'
    torch.save(official_checkpoint(randomise_(reference.eval()), 'mmdet', COCO_CLASSES), path)
    result = stand_in.run(RETINANET, path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'converted' in result.stdout and 'backbone.norm0' in result.stdout
    record = stand_in_record(stand_in.root)
    assert record['checkpoint'] == osp.join('out', 'checkpoint_davit_mm.pth')
    assert record['keys'] == model_keys(RETINANET)


def test_export_tool_refuses_a_checkpoint_that_does_not_fit_before_mmdeploy_runs(stand_in):
    checkpoint = save_runner_checkpoint(RETINANET, stand_in.root / 'mini.pth', ('a', 'b', 'c'))
    result = stand_in.run(osp.join(CONFIGS, 'davit_retinanet_1x_coco.py'), checkpoint)
    assert_user_error(result, "does not fit the config's model", 'backbone.stem.conv.weight')
    assert not osp.exists(stand_in.root / 'out' / 'stand_in.json')


def test_export_tool_refuses_a_deploy_config_of_the_other_library(stand_in):
    checkpoint = save_runner_checkpoint(RETINANET, stand_in.root / 'mini.pth', ('a', 'b', 'c'))
    (stand_in.root / 'deploy.py').write_text(DEPLOY_CFG.replace("'mmdet'", "'mmseg'"))
    result = stand_in.run(RETINANET, checkpoint, in_process=True)
    assert_user_error(result, "deploy_cfg 'deploy.py' is a deploy config for 'mmseg', the model "
                              "config's library is 'mmdet'")


def test_export_tool_names_the_install_command_without_mmdeploy(stand_in):
    (stand_in.root / 'site' / 'mmdeploy' / 'apis' / '__init__.py').write_text(
        "raise ImportError('mmdeploy.apis needs what is missing here')\n")
    checkpoint = save_runner_checkpoint(RETINANET, stand_in.root / 'mini.pth', ('a', 'b', 'c'))
    result = stand_in.run(RETINANET, checkpoint)
    assert_user_error(result, 'mmdeploy cannot be imported',
                      'pip install --no-deps mmdeploy==1.3.1 aenum multiprocess dill')
