"""The backbone traces and exports for deployment: torch.jit.trace and ONNX graphs made at one input
size run at others, and torch.export's graph, each compared with the eager model."""
import pytest
import torch

from davit_mm.models import DaViT


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
    """Traced at 64x96 (no padding needed there), run where stem, downsample and windows pad."""
    with torch.no_grad():
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
