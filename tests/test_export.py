"""The backbone traces and exports for deployment: torch.jit.trace and ONNX graphs made at one input
size run at others, and torch.export's graph, each compared with the eager model. So do whole
detectors and segmentors built on it, up to their post-processing."""
import os.path as osp
import warnings

import pytest
import torch

from davit_mm.models import DaViT
from helpers import CONFIGS, build_model

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
