"""tools/analysis/benchmark.py runs and reports what it promises (the numbers themselves are
measurements for docs/benchmark.md, never test assertions)."""
import functools
import json
import os.path as osp
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import CONFIGS, REPO, assert_user_error, load_tool, run_tool, run_tool_in_process


def test_benchmark_tool_reports_times_ratios_memory_and_accuracy(tmp_path):
    out = tmp_path / 'bench.json'
    run_tool(['analysis/benchmark.py', '--sizes', '64x96', '--repeats', '1', '--warmup', '0',
              '--memory', '--with-cp', '--accuracy', '--profile', '--json', out], cwd=tmp_path)
    data = json.loads(out.read_text())
    assert data['machine']['device'] == 'cpu' and data['machine']['cpu_capability']
    assert data['complete'] is True
    row, = data['rows']
    for key in ('forward_ours_s', 'forward_reference_s', 'forward_ratio', 'train_ours_s',
                'train_reference_s', 'train_ratio', 'train_peak_mb_ours', 'train_peak_mb_reference',
                'train_peak_mb_ours_cp', 'with_cp_memory_ratio', 'forward_peak_mb_ours',
                'forward_peak_mb_reference', 'train_rss_mb_ours', 'train_faulted_mb_ours',
                'train_faulted_mb_reference'):
        assert row[key] > 0, key
    assert row['max_abs_diff'] < 1e-4
    # --accuracy: both within fp32 rounding of the float64 result (outputs of magnitude ~1-10)
    assert 0 < row['ours_err_vs_fp64'] < 1e-4 and 0 < row['reference_err_vs_fp64'] < 1e-4
    # --with-cp: checkpointing keeps less for backward. At 64x96 the parameters' gradients make
    # most of the peak (0.99 measured); at 800x1216 0.39 (docs/benchmark.md).
    assert row['with_cp_memory_ratio'] == row['train_peak_mb_ours_cp'] / row['train_peak_mb_ours']
    assert row['with_cp_memory_ratio'] < 1
    # --profile: the costliest operators of one forward each, within that forward's total.
    for impl in ('ours', 'reference'):
        profile = row[f'forward_profile_{impl}_ms']
        ops = {op: ms for op, ms in profile.items() if op != 'total'}
        assert 1 <= len(ops) <= 8 and 0 < sum(ops.values()) <= profile['total'] + 1e-6
    assert 'aten::addmm' in row['forward_profile_reference_ms']  # nn.Linear on CPU


def test_profile_counts_each_cuda_kernel_once():
    """With CUDA activity a profile lists each kernel as a device event and again in the self
    device time of the operator that launched it: operators are ranked by their kernels' time,
    and the total is the kernels' time, counted once."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    benchmark = load_tool('analysis/benchmark.py')

    def event(key, device_type, device_us, cpu_us=50.0):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=device_us,
                               self_cpu_time_total=cpu_us)

    events = [event('aten::add', DeviceType.CPU, 100.0, cpu_us=20.0),
              event('elementwise_kernel', DeviceType.CUDA, 100.0, cpu_us=0.0),
              event('aten::mm', DeviceType.CPU, 300.0, cpu_us=10.0),
              event('gemm_kernel', DeviceType.CUDA, 300.0, cpu_us=0.0),
              event('aten::empty', DeviceType.CPU, 0.0, cpu_us=5.0)]
    assert benchmark.operator_times(events, cuda=True, top=2) == {
        'aten::mm': 0.3, 'aten::add': 0.1, 'total': 0.4}
    # On the CPU every event is an operator, timed by its own CPU time.
    assert benchmark.operator_times(events, cuda=False, top=2) == {
        'aten::add': 0.02, 'aten::mm': 0.01, 'total': 0.035}
    # A kernel no operator launched (a Triton kernel, launched by Triton's runtime) is in the
    # total and reported apart, not lost between the operators and the total.
    triton = events + [event('_depthwise_fwd_kernel', DeviceType.CUDA, 250.0, cpu_us=0.0)]
    assert benchmark.operator_times(triton, cuda=True, top=2) == {
        'aten::mm': 0.3, 'aten::add': 0.1, 'kernels outside operators': 0.25, 'total': 0.65}


def _huge_pages_always() -> bool:
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            return '[always]' in f.read()
    except OSError:
        return False


@pytest.mark.skipif(_huge_pages_always(), reason='a fault maps a 2 MiB page: counts differ')
def test_faulted_bytes_counts_memory_touched_for_the_first_time():
    """What the memory workers report as ``*_faulted_mb_*``: pages first touched, not writes."""
    import mmap

    import torch
    benchmark = load_tool('analysis/benchmark.py')
    # A fresh anonymous mapping: the kernel maps each page at its first touch. (Not a new tensor:
    # glibc hands out memory the process already touched whenever a free block in its heap is
    # large enough, whatever the size; how often depends on what this process ran before.)
    size = 64 << 20
    region = mmap.mmap(-1, size)
    pages = torch.frombuffer(region, dtype=torch.uint8)
    halves = iter((pages[:size // 2], pages[size // 2:]))
    per_call = benchmark.faulted_bytes(lambda: next(halves).fill_(1), calls=2)
    assert 0.9 * size / 2 <= per_call <= 1.1 * size / 2  # a mean over the calls
    assert benchmark.faulted_bytes(functools.partial(pages.fill_, 2)) < 0.1 * size  # mapped already
    del pages
    region.close()


def test_benchmark_tool_times_a_whole_config(tmp_path, monkeypatch):
    """Each timed training step runs the config's model on the batch and updates its weights;
    each timed forward runs it in eval mode."""
    benchmark = load_tool('analysis/benchmark.py')
    built, calls = [], []

    def build_and_record(cfg):
        model = benchmark_build(cfg)
        model.backbone.register_forward_hook(
            lambda module, args, out: calls.append((module.training, tuple(args[0].shape))))
        built.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    benchmark_build = benchmark.build_config_model
    monkeypatch.setattr(benchmark, 'build_config_model', build_and_record)
    out = tmp_path / 'bench.json'
    config = osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py')
    monkeypatch.chdir(tmp_path)
    benchmark.main(['--config', config, '--sizes', '96x128', '--batch', '2', '--repeats', '1',
                    '--warmup', '0', '--subnormal-grads', '--json', str(out)])
    # train and forward: the first call, the timed one, the timed one of the kernel variant
    assert sorted(calls) == [(False, (2, 3, 96, 128))] * 3 + [(True, (2, 3, 96, 128))] * 3
    (model, before), = built
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith('backbone.') for k in changed)
    assert any(k.startswith('bbox_head.') for k in changed)
    row, = json.loads(out.read_text())['rows']
    assert row['size'] == '96x128' and row['batch'] == 2
    assert row['train_s'] > 0 and row['forward_s'] > 0
    assert row['forward_images_per_s'] == pytest.approx(2 / row['forward_s'])
    # A kernel variant times the same model's steps beside davit_mm's own.
    assert row['train_ours_subnormal_grads_s'] > 0 and row['forward_ours_subnormal_grads_s'] > 0


@pytest.mark.parametrize('argv, message', [
    (['--repeats', '0'], '--repeats 0: accepted 1 or more'),  # 'must be >= 1', naming nothing given
    (['--batch', '0'], '--batch 0: accepted 1 or more'),
    (['--warmup', '-1'], '--warmup -1: accepted 0 or more'),
    (['--with-cp'], '--with-cp: measures the memory of with_cp=True, which needs --memory'),  # did nothing
    (['--modes', 'new_shape', '--accuracy'], '--accuracy: measured with --modes forward/train'),
    (['--arch', 'foo'], "--arch: arch='foo' is not a known DaViT variant"),  # after the JSON was begun
])
def test_backbone_mode_names_an_option_that_would_do_nothing_or_fail_late(capsys, argv, message):
    benchmark = load_tool('analysis/benchmark.py')
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv + ['--device', 'cpu'])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize('flag', [['--arch', 'small'], ['--memory'], ['--with-cp'], ['--compile'],
                                  ['--no-reference'], ['--timm'], ['--accuracy'], ['--profile']])
def test_config_mode_refuses_the_backbone_modes_flags(capsys, flag):
    """Config mode times the config's model alone: a backbone-mode flag would be ignored, so it
    is refused by name."""
    benchmark = load_tool('analysis/benchmark.py')
    alongside = ['--memory'] if flag == ['--with-cp'] else []  # it measures memory
    assert benchmark.parse_args(flag + alongside + ['--device', 'cpu'])  # backbone mode takes it
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(['--config', 'x.py', '--device', 'cpu'] + flag)
    assert exit_info.value.code == 2
    assert f'{flag[0]}: backbone mode only, not with --config' in capsys.readouterr().err


def test_config_mode_takes_kernel_variants_for_train_and_forward_only(capsys):
    benchmark = load_tool('analysis/benchmark.py')
    assert benchmark.parse_args([]).arch == 'tiny'
    args = benchmark.parse_args(['--config', 'x.py', '--device', 'cpu', '--plain-kernels'])
    assert args.arch is None and benchmark.ours_variants(args) == ['ours_plain_kernels']
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--config', 'x.py', '--device', 'cpu', '--modes', 'forward', 'test',
                              '--plain-kernels', '--subnormal-grads'])
    assert ('--plain-kernels --subnormal-grads: with --config, kernel variants time the train '
            'and forward modes' in capsys.readouterr().err)


@pytest.mark.parametrize('tta', [False, True])
def test_benchmark_tool_times_evaluation_on_the_configs_test_set(tmp_path, tta):
    """--modes test: test_step over the config's own test pipeline (with --tta, the TTA model and
    pipeline), first batch apart; --cfg-options points it at the data."""
    from davit_mm.synthetic import write_coco
    write_coco(str(tmp_path / 'data'), num_train=1, num_val=6, size=(96, 128))
    out = tmp_path / 'bench.json'
    config = osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py')
    run_tool(['analysis/benchmark.py', '--config', config, '--modes', 'test', '--images', '6',
              '--cfg-options', f'test_dataloader.dataset.data_root={tmp_path / "data"}/',
              '--json', out] + (['--tta'] if tta else []), cwd=tmp_path)
    row, = json.loads(out.read_text())['rows']
    assert row['tta'] is tta and row['test_images'] == 4  # batches of 2; the first timed apart
    assert row['test_s_per_image'] > 0 and row['test_first_s'] > 0
    # Shapes the backbone met in the 2 timed batches: one per batch, or one per TTA scale (3).
    assert 3 <= row['test_backbone_shapes'] <= 6 if tta else 1 <= row['test_backbone_shapes'] <= 2


def test_config_mode_refuses_too_few_test_images_before_timing_other_modes(tmp_path):
    """Test mode times the first batch apart: --images must exceed the test batch size, and
    that is checked before train/forward spend their time."""
    config = osp.join(CONFIGS, 'quickstart', 'davit_mini_retinanet_synthetic_coco.py')  # batches of 2
    result = run_tool(['analysis/benchmark.py', '--config', config, '--modes', 'train', 'test',
                       '--images', '2', '--sizes', '64x64', '--json', tmp_path / 'b.json'],
                      cwd=tmp_path, expect_ok=False)
    assert result.returncode == 2
    assert ('--images 2: test mode times at least 2 batches and davit_mini_retinanet_synthetic_coco.py '
            'has test_dataloader.batch_size=2: give more than 2') in result.stderr
    assert json.loads((tmp_path / 'b.json').read_text())['rows'] == []  # nothing was timed


@pytest.mark.parametrize('option,expected', [
    ([], True), (['--cfg-options', 'env_cfg.cudnn_benchmark=False'], False)])
def test_config_mode_sets_up_cudnn_autotuning_as_the_runner_does(tmp_path, option, expected):
    """mmseg's default runtime turns cuDNN autotuning on, and on a GPU it decides what each new
    evaluation shape costs the head: config mode must measure with the config's choice."""
    out = tmp_path / 'bench.json'
    config = osp.join(CONFIGS, 'quickstart', 'upernet_davit_mini_synthetic_ade20k.py')
    run_tool(['analysis/benchmark.py', '--config', config, '--sizes', '64x64', '--modes', 'forward',
              '--repeats', '1', '--warmup', '0', '--json', out] + option, cwd=tmp_path)
    row, = json.loads(out.read_text())['rows']
    assert row['cudnn_benchmark'] is expected


@pytest.mark.parametrize('argv,message', [
    (['--modes', 'test'], '--modes test needs --config'),
    (['--config', 'x.py', '--modes', 'new_shape'], '--modes new_shape: backbone mode only'),
    (['--config', 'x.py', '--tta'], '--tta: applies to --modes test only'),
    (['--config', 'x.py', '--modes', 'test', '--images', '1'], '--images 1: at least 2'),
    (['--device', 'tpu'], '--device tpu: accepted cpu, cuda or cuda:N'),
    (['--device', 'cpu', '--threads', '0'], '--threads 0: accepted 1 or more'),
    (['--device', 'cpu', '--modes', 'new_shape', '--sizes', '64x96', '96x64', '64x96'],
     '--sizes 64x96 given more than once'),
])
def test_benchmark_tool_refuses_modes_outside_their_kind(tmp_path, argv, message):
    result = run_tool(['analysis/benchmark.py'] + argv, cwd=tmp_path, expect_ok=False)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize('baseline,ours,library', [
    ('swin_t_maskrcnn_1x_coco', 'davit_maskrcnn_1x_coco', 'mmdet'),
    ('swin_t_retinanet_1x_coco', 'davit_retinanet_1x_coco', 'mmdet'),
    ('upernet_swin_t_512x512_160k_ade20k', 'upernet_davit_512x512_160k_ade20k', 'mmseg'),
])
def test_swin_baseline_configs_differ_from_ours_only_in_the_backbone(baseline, ours, library):
    """The speed baselines keep our config's data, schedule, neck and heads, and their backbone
    feeds the neck the same widths at the same strides."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    from davit_mm.cli import adapt_config_to_machine
    cfgs = [Config.fromfile(osp.join(CONFIGS, *name)) for name in
            (('benchmark', f'{baseline}.py'), (f'{ours}.py',))]
    dicts = [cfg.to_dict() for cfg in cfgs]
    backbones = [d['model'].pop('backbone') for d in dicts]
    assert backbones[0]['type'] == 'SwinTransformer' and backbones[1]['type'] == 'DaViT'
    assert dicts[0] == dicts[1]
    init_default_scope(library)
    shapes = []
    for cfg in cfgs:
        adapt_config_to_machine(cfg)
        cfg.model.backbone.init_cfg = None
        with torch.no_grad():
            feats = MODELS.build(cfg.model).eval().extract_feat(torch.randn(1, 3, 64, 96))
        shapes.append([tuple(f.shape) for f in feats])
    assert shapes[0] == shapes[1]


def test_benchmark_tool_measures_the_cost_of_new_input_sizes(tmp_path):
    out = tmp_path / 'bench.json'
    avx2 = dict(ATEN_CPU_CAPABILITY='avx2', ONEDNN_MAX_CPU_ISA='AVX2', MKL_ENABLE_INSTRUCTIONS='AVX2')
    run_tool(['analysis/benchmark.py', '--modes', 'new_shape', '--sizes', '64x96', '96x64',
              '--repeats', '2', '--profile', '--json', out], cwd=tmp_path,
             env=dict(avx2, LD_PRELOAD='', MALLOC_TRIM_THRESHOLD_='1073741824'))
    data = json.loads(out.read_text())
    # The machine record says which instruction set torch's CPU kernels were held to.
    assert data['machine']['cpu_capability'] == 'AVX2'
    assert {k: data['machine'][k] for k in avx2} == avx2
    # ... and how memory was allocated: glibc's malloc (nothing preloaded), with this tunable.
    allocation = data['machine']['allocator'].split()
    assert allocation[0] == 'glibc' and 'MALLOC_TRIM_THRESHOLD_=1073741824' in allocation[1:]
    rows = data['rows']
    assert [row['size'] for row in rows] == ['64x96', '96x64', 'median over sizes']
    for row in rows[:2]:
        for impl in ('ours', 'reference'):
            assert row[f'new_shape_first_{impl}_s'] > 0 and row[f'new_shape_repeat_{impl}_s'] > 0
    assert set(rows[2]) >= {'new_shape_extra_ours_ms', 'new_shape_extra_reference_ms'}
    # --profile: one more first call, at a size neither implementation's process had seen.
    assert rows[2]['new_shape_profile_size'] == '128x128'
    for impl in ('ours', 'reference'):
        profile = rows[2][f'new_shape_profile_{impl}_ms']
        ops = {op: ms for op, ms in profile.items() if op != 'total'}
        assert 1 <= len(ops) <= 12 and 0 < sum(ops.values()) <= profile['total'] + 1e-6


def test_a_run_that_stops_early_keeps_the_numbers_it_measured(tmp_path, monkeypatch):
    """--json is rewritten as each number comes in: a size's forward times survive its training
    step failing (or a time limit killing the process), marked ``"complete": false``."""
    bench = load_tool('analysis/benchmark.py')
    step_fn = bench.step_fn

    def forward_only(model, x, mode, *args):
        if mode == 'train':
            raise RuntimeError('stopped before training')
        return step_fn(model, x, mode, *args)

    monkeypatch.setattr(bench, 'step_fn', forward_only)
    out = tmp_path / 'bench.json'
    with pytest.raises(RuntimeError, match='stopped before training'):
        bench.main(['--device', 'cpu', '--sizes', '64x96', '--repeats', '1', '--warmup', '0',
                    '--no-reference', '--json', str(out)])
    data = json.loads(out.read_text())
    assert data['complete'] is False and data['machine']['device'] == 'cpu'
    row, = data['rows']
    assert row['size'] == '64x96' and row['forward_ours_s'] > 0 and row['max_abs_diff'] < 1e-4
    assert 'train_ours_s' not in row


def test_new_shape_saves_each_implementation_as_its_process_ends(tmp_path, monkeypatch):
    """ours' first-call costs are kept when the reference's process never returns."""
    bench = load_tool('analysis/benchmark.py')

    def fresh_process(kind, impl, args, **spec):
        assert kind == 'new_shape' and spec['sizes'] == [[64, 96], [96, 64]]
        if impl == 'reference':
            raise RuntimeError('the reference process was killed')
        return dict(times=[(0.5, 0.1), (0.4, 0.1)])

    monkeypatch.setattr(bench, 'in_fresh_process', fresh_process)
    out = tmp_path / 'bench.json'
    with pytest.raises(RuntimeError, match='reference process was killed'):
        bench.main(['--device', 'cpu', '--modes', 'new_shape', '--sizes', '64x96', '96x64',
                    '--json', str(out)])
    data = json.loads(out.read_text())
    assert data['complete'] is False
    assert [r['size'] for r in data['rows']] == ['64x96', '96x64', 'median over sizes']
    assert data['rows'][0]['new_shape_first_ours_s'] == 0.5
    assert data['rows'][2]['new_shape_extra_ours_ms'] == pytest.approx(350)
    assert not any('reference' in key for row in data['rows'] for key in row)


def test_new_shape_warm_up_is_at_a_size_that_is_not_timed():
    """The untimed first step takes the process's start-up costs at a size of its own: a timed
    size of 224 x 224 would otherwise not be new when it is timed."""
    bench = load_tool('analysis/benchmark.py')
    assert bench.warmup_size([[64, 96], [96, 64]]) == (224, 224)
    assert bench.warmup_size([[224, 224], [256, 256], [800, 1216]]) == (288, 288)
    # nor at the size --profile's extra first call is kept for (the largest sides + 32)
    assert bench.profiled_new_size([[224, 224], [192, 192]]) == (256, 256)
    assert bench.warmup_size([[224, 224], [192, 192]]) == (288, 288)


def test_new_shape_mode_runs_each_implementation_in_a_fresh_process(monkeypatch):
    """The reference and timm have the same convolutions, and cuDNN/oneDNN keep per-shape plans
    for the whole process: a size must be new to each implementation's own process."""
    bench = load_tool('analysis/benchmark.py')
    spawned = []

    def fake_fresh_process(kind, impl, args, **spec):
        spawned.append((kind, impl, spec['sizes']))
        return dict(times=[(0.5 + i, 0.25) for i in range(len(spec['sizes']))])

    monkeypatch.setattr(bench, 'in_fresh_process', fake_fresh_process)
    args = bench.parse_args(['--modes', 'new_shape', '--sizes', '64x96', '96x64', '--timm',
                             '--plain-kernels', '--device', 'cpu'])
    results = bench.Results(None, {})
    bench.bench_new_shapes(args, results)
    rows = results.rows
    impls = ['ours', 'reference', 'timm', 'ours_plain_kernels']
    assert spawned == [('new_shape', impl, [[64, 96], [96, 64]]) for impl in impls]
    assert rows[1]['new_shape_first_timm_s'] == 1.5 and rows[1]['new_shape_repeat_timm_s'] == 0.25
    assert rows[2]['new_shape_extra_reference_ms'] == 750  # median of 250 and 1250 ms


def test_benchmark_tool_times_timm_and_plain_kernels_beside_ours(tmp_path):
    """The GPU commands' --timm, --plain-kernels and --dtype paths (here bf16 autocast on CPU),
    with a stand-in timm package that records how the tool asks for its model."""
    fake = tmp_path / 'fake_site' / 'timm'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text(
        'import json, os\n'
        'from davit_mm.models import DaViT\n'
        'def create_model(name, **kwargs):\n'
        '    with open(os.environ["FAKE_TIMM_LOG"], "a") as f:\n'
        '        f.write(json.dumps(dict(name=name, **kwargs)) + "\\n")\n'
        '    return DaViT(name[len("davit_"):])\n')
    log = tmp_path / 'timm_calls.jsonl'
    env = dict(PYTHONPATH=str(fake.parent), FAKE_TIMM_LOG=str(log))
    out = tmp_path / 'bench.json'
    run_tool(['analysis/benchmark.py', '--sizes', '64x96', '--repeats', '1', '--warmup', '0',
              '--dtype', 'bf16', '--timm', '--plain-kernels', '--json', out],
             cwd=tmp_path, env=env)
    row, = json.loads(out.read_text())['rows']
    assert row['dtype'] == 'bf16'
    for mode in ('forward', 'train'):
        for impl in ('ours', 'reference', 'timm', 'ours_plain_kernels'):
            assert row[f'{mode}_{impl}_s'] > 0, (mode, impl)
    # --memory measures each implementation in a fresh process, here a training step of each
    # (the workers differ by mode in nothing but the step) in fp32: a bf16 worker is the
    # reference's in a test below (46 s alone on a Zen 3 EPYC, AVX2 kernels).
    memory = tmp_path / 'memory.json'
    run_tool(['analysis/benchmark.py', '--sizes', '64x96', '--repeats', '1', '--warmup', '0',
              '--modes', 'train', '--memory', '--no-reference', '--timm', '--plain-kernels',
              '--json', memory], cwd=tmp_path, env=env)
    row, = json.loads(memory.read_text())['rows']
    for impl in ('ours', 'timm', 'ours_plain_kernels'):
        assert row[f'train_peak_mb_{impl}'] > 0, impl
    assert 'train_peak_mb_reference' not in row and 'forward_ours_s' not in row
    new_shape = tmp_path / 'new_shape.json'
    run_tool(['analysis/benchmark.py', '--modes', 'new_shape', '--sizes', '64x96', '96x64',
              '--repeats', '1', '--timm', '--json', new_shape], cwd=tmp_path, env=env)
    rows = json.loads(new_shape.read_text())['rows']
    assert all(row['new_shape_first_timm_s'] > 0 for row in rows[:2])
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # The timing run, the fp32 memory run and its worker, and the new_shape run.
    assert calls == [dict(name='davit_tiny', features_only=True, pretrained=False)] * 4


def test_tensor_peak_bytes_is_the_allocators_peak_plus_what_was_held():
    """The CPU peak: the most bytes allocated at once during the steps, plus the bytes held from
    before. A block allocated before profiling and freed during it lowers nothing."""
    import torch
    benchmark = load_tool('analysis/benchmark.py')
    earlier = [torch.empty(1 << 22)]  # 16 MiB

    def step():
        earlier.clear()
        a = torch.empty(1 << 20)  # 4 MiB
        b = torch.empty(1 << 21)  # 8 MiB: 12 MiB at once
        del a
        c = torch.empty(1 << 19)  # 2 MiB: 10 MiB
        del b, c

    assert benchmark._tensor_peak_bytes(step, held=1000) == 1000 + 12 * 2 ** 20


def test_cpu_peak_memory_is_the_profilers_memory_timeline(tmp_path):
    """The CPU peak is the peak of torch's memory timeline (which counts the tensors alive from
    before that the steps use), with which docs/benchmark.md's numbers were first measured, for a
    training step of DaViT-T at 64 x 96. The timeline sums each microsecond's events, so its peak
    can miss a little (39 KB of 1.8 GB at 800 x 1216, Zen 3). In a fresh process: building the
    timeline hands out None without a new reference, enough in bf16 to abort Python < 3.12."""
    script = tmp_path / 'timeline.py'
    script.write_text(textwrap.dedent(f"""\
        import sys, torch
        sys.path.insert(0, {osp.join(REPO, 'tools', 'analysis')!r})
        import benchmark
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline
        torch.manual_seed(0)
        model, x = benchmark.DaViT('tiny', drop_path_rate=0.0), torch.randn(1, 3, 64, 96)
        step = benchmark.step_fn(model, x, 'train', torch.float32, 'cpu')
        fn = benchmark.with_kernels('ours', step)
        fn(); fn()
        held = benchmark.held_bytes(model, x)
        peak = benchmark._tensor_peak_bytes(fn, held)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn(); fn()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(x.device)
        print(peak, max(sum(row) for row in sizes), held)
        """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    peak, timeline_peak, held = map(int, result.stdout.split()[-3:])
    assert timeline_peak <= peak <= timeline_peak + 2 ** 20
    assert peak > 2 * held  # the gradients, as large as the parameters


def test_memory_worker_measures_the_references_bf16_training_step():
    """The reference's bf16 training step, whose memory measurement aborted Python < 3.12 when
    it came from the memory timeline ("Fatal Python error: none_dealloc", at teardown too): its
    worker completes, and the peak holds the parameters and a step's gradients."""
    from types import SimpleNamespace
    benchmark = load_tool('analysis/benchmark.py')
    args = SimpleNamespace(arch='tiny', device='cpu', batch=1, dtype='bf16')
    measured = benchmark.measure_memory('reference', 'train', args, (64, 96))
    parameter_bytes = 4 * sum(p.numel() for p in benchmark.ReferenceDaViT('tiny').parameters())
    assert measured['peak_bytes'] >= 2 * parameter_bytes, (measured, parameter_bytes)


def test_plain_kernels_runs_ours_with_the_kernels_switched_off_and_back_after(monkeypatch):
    from davit_mm import ops
    benchmark = load_tool('analysis/benchmark.py')
    monkeypatch.setattr(ops, '_enabled', True)
    seen = []
    benchmark.KERNEL_VARIANTS['ours_plain_kernels'](
        lambda: seen.append(ops.fast_kernels_enabled()))()
    assert seen == [False] and ops.fast_kernels_enabled()


def test_aten_depthwise_runs_ours_as_without_triton_and_only_on_cuda(tmp_path):
    """--aten-depthwise (a GPU command's comparison) times ours with the position encodings on
    PyTorch's depth-wise kernel: Triton's kernels are out of reach while it runs, and back after."""
    from davit_mm import ops
    benchmark = load_tool('analysis/benchmark.py')
    seen = []
    variant = benchmark.KERNEL_VARIANTS['ours_aten_depthwise']
    run = variant(lambda: seen.append(ops._triton_depthwise()))
    before = ops._triton_depthwise
    run()
    assert seen == [None] and ops._triton_depthwise is before
    result = run_tool(['analysis/benchmark.py', '--aten-depthwise', '--device', 'cpu'],
                      cwd=tmp_path, expect_ok=False)
    assert result.returncode == 2
    assert '--aten-depthwise: the Triton kernel runs on CUDA only' in result.stderr


@pytest.mark.parametrize('flag,variant,attributes,what,during,stand_ins', [
    ('--other-linears', 'ours_other_linears',
     ('_AVX2_INFERENCE_MATMUL', '_PACK_MLP_BACKWARD_WEIGHTS'), 'linear kernel',
     lambda before: not before, (True, False)),
    ('--other-training-linears', 'ours_other_training_linears', ('_ONEDNN_TRAINING',),
     'linear kernel', lambda before: not before, (True, False)),
    ('--unpacked-weights', 'ours_unpacked_weights', ('_PACK_MLP_WEIGHTS', '_PACK_FORWARD_WEIGHTS'),
     'weight layout', lambda before: False, (True,)),
    ('--pack-every-call', 'ours_pack_every_call', ('_PACK_MIN_ROWS',), 'weight layout',
     lambda before: 0, (4096, 1)),
    ('--subnormal-grads', 'ours_subnormal_grads', ('_DROP_NEGLIGIBLE_GRADS',), 'logit gradient',
     lambda before: False, (True,)),
    ('--other-half-attention', 'ours_other_half_attention', ('_PLAIN_HALF_ATTENTION',),
     'attention kernel', lambda before: False, (True,)),
], ids=['other-linears', 'other-training-linears', 'unpacked-weights', 'pack-every-call',
        'subnormal-grads', 'other-half-attention'])
def test_cpu_choice_flags_time_ours_with_the_other_choice(monkeypatch, capsys, flag, variant,
                                                          attributes, what, during, stand_ins):
    """--other-linears (the comparisons behind the AVX2 choices in docs/benchmark.md) times ours
    with the other choices of CPU linear kernel, --other-training-linears (behind the Intel
    choice) with the other kernel for training's linears, --unpacked-weights (behind packing the
    weights of the inference MLP and of the training forward) with the weights handed to oneDNN
    plain, --pack-every-call (behind ops._PACK_MIN_ROWS) with the weights packed for every
    call, --subnormal-grads with the channel attention's logit gradients kept whole,
    --other-half-attention with the other CPU attention kernel in half precision; each puts the
    choices back after (checked from stand-in settings other than the variant's), and on a GPU
    it is refused, saying why (--other-half-attention in fp32 too: no choice is made there)."""
    from davit_mm import ops
    benchmark = load_tool('analysis/benchmark.py')
    for before in stand_ins:
        assert during(before) != before  # else a variant that changes nothing would pass
        for attribute in attributes:
            monkeypatch.setattr(ops, attribute, before)
        seen = []
        benchmark.KERNEL_VARIANTS[variant](
            lambda: seen.append([getattr(ops, attribute) for attribute in attributes]))()
        assert seen == [[during(before)] * len(attributes)]
        assert all(getattr(ops, attribute) is before for attribute in attributes)
    args = benchmark.parse_args([flag, '--device', 'cpu', '--dtype', 'bf16'])
    assert benchmark.ours_variants(args) == [variant]
    monkeypatch.setattr(benchmark.torch.cuda, 'is_available', lambda: True)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args([flag, '--device', 'cuda', '--dtype', 'bf16'])
    assert exit_info.value.code == 2
    assert f"{flag}: the choice of {what} is the CPU's" in capsys.readouterr().err
    if flag == '--other-half-attention':
        with pytest.raises(SystemExit) as exit_info:
            benchmark.parse_args([flag, '--device', 'cpu'])
        assert exit_info.value.code == 2
        assert f'{flag}: the choice is made in fp16/bf16 only' in capsys.readouterr().err


def test_interleaved_rounds_rotate_so_no_run_always_follows_the_same_one():
    """Each round runs every function once; the order rotates, so over the rounds each function
    follows each other one equally often (a run leaves caches and memory to the next)."""
    benchmark = load_tool('analysis/benchmark.py')
    assert benchmark.round_orders(['ours', 'reference'], 3) == [
        ['ours', 'reference'], ['reference', 'ours'], ['ours', 'reference']]
    orders = benchmark.round_orders(['a', 'b', 'c'], 6)
    assert all(sorted(order) == ['a', 'b', 'c'] for order in orders)
    runs = [name for order in orders for name in order]
    followers = {}
    for before, after in zip(runs, runs[1:]):
        followers.setdefault(after, []).append(before)
    for name in 'abc':
        others = [f for f in followers[name] if f != name]
        assert sorted(set(others)) == sorted(set('abc') - {name})
    calls = []
    medians = benchmark.interleaved({n: (lambda n=n: calls.append(n)) for n in 'abc'}, warmup=1,
                                    repeats=3, device='cpu')
    assert calls == list('abc') + list('abc') + list('bca') + list('cab')
    assert set(medians) == set('abc')


def _documented_commands(tmp_path):
    """Every command the bash blocks of docs/benchmark.md run, as bash expands them (loops,
    continuation lines, ``$(basename ...)``), recorded instead of run: [tool, arg, ...]."""
    import re
    import subprocess
    with open(osp.join(REPO, 'docs', 'benchmark.md'), encoding='utf-8') as f:
        blocks = re.findall(r'```bash\n(.*?)```', f.read(), re.S)
    record = tmp_path / 'commands'
    shims = (f'python() {{ printf "%s\\037" "$@" >> "{record}"; echo >> "{record}"; }}\n'
             f'bash() {{ python "$@"; }}\n')
    for block in blocks:  # each block alone, so that one failing shows which
        subprocess.run(['bash', '-euc', shims + block], cwd=tmp_path, check=True)
    with open(record) as f:
        return [line.rstrip('\n').split('\x1f')[:-1] for line in f]


def test_every_command_in_benchmark_md_parses_as_its_tool_reads_it(tmp_path, monkeypatch):
    """The GPU commands are run on a lent machine with little time: none may fail on a renamed
    option, a missing config or a bad size. Each is parsed by its tool's own parser, as on a
    machine with CUDA."""
    import torch

    from davit_mm.synthetic import parse_arguments
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    benchmark, train = load_tool('analysis/benchmark.py'), load_tool('train.py')
    gpu_suite = load_tool('analysis/gpu_suite.py')
    commands = _documented_commands(tmp_path)
    tools = [command[0] for command in commands]
    assert tools.count('tools/analysis/benchmark.py') >= 30 and 'tools/dist_train.sh' in tools
    for tool, *args in commands:
        if tool == 'tools/analysis/benchmark.py':
            parsed = benchmark.parse_args(args)
            assert parsed.config is None or osp.isfile(osp.join(REPO, parsed.config)), args
        elif tool == 'tools/dist_train.sh':
            config, processes, *rest = args
            assert osp.isfile(osp.join(REPO, config)) and int(processes) >= 1, args
            train.parse_args([config] + rest)
        elif tool.startswith('tools/dataset/make_synthetic_'):
            parse_arguments('', args, coco='coco' in tool)
        elif tool == 'tools/analysis/gpu_suite.py':
            gpu_suite.parse_args(args)
        elif tool == 'tools/analysis/plot_scaling.py':
            assert osp.isfile(osp.join(REPO, args[0])), args
        else:
            raise AssertionError(f'docs/benchmark.md runs {tool}, which this test does not check')


def test_the_gpu_record_says_which_kernel_computes_the_position_encodings(monkeypatch):
    """On a GPU the benchmark records, per dtype, whether davit_mm's Triton kernels (self-checked
    there) or PyTorch's depth-wise kernel ran, so that a fallback cannot pass for the Triton
    kernels' numbers."""
    import torch

    from davit_mm import ops
    benchmark = load_tool('analysis/benchmark.py')
    monkeypatch.setattr(ops, '_triton_depthwise', lambda: None)
    assert benchmark.depthwise_kernels('cpu') == {'fp32': 'pytorch (no Triton)',
                                                  'fp16': 'pytorch (no Triton)'}
    monkeypatch.setattr(ops, '_triton_depthwise', lambda: object())
    asked = []
    monkeypatch.setattr(ops, '_triton_ready', lambda x, compute: asked.append(
        (x.device.type, compute)) or compute == torch.float32)  # the fp16 self-check failed
    assert benchmark.depthwise_kernels('cpu') == {'fp32': 'triton', 'fp16': 'pytorch'}
    assert asked == [('cpu', torch.float32), ('cpu', torch.float16)]


def test_benchmark_refuses_timm_where_it_is_not_installed_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'timm', None)  # import timm fails, as where it is not installed
    out = tmp_path / 'bench.json'
    result = run_tool_in_process(['analysis/benchmark.py', '--timm', '--sizes', '32x32', '--repeats', '1',
                                  '--warmup', '0', '--device', 'cpu', '--json', out], cwd=tmp_path)
    assert_user_error(result, '--timm needs timm: pip install timm')
    assert result.stdout == '' and not out.exists()  # not even the machine's line


@pytest.mark.parametrize('tool', ['dataset/make_synthetic_coco.py', 'dataset/make_synthetic_ade20k.py'])
@pytest.mark.parametrize('args, message', [
    # numpy's default_rng takes any integer from 0 on
    (['--seed', '-1'], '--seed -1: accepted 0 or more'),
    # cv2's "Insufficient memory" traceback / a sampling loop that ran for minutes
    (['--size', '100000', '64'], '--size 100000 64: accepted sides of 32 to 4096 pixels'),
    (['--max-objects', '1000000'], '--max-objects 1000000: accepted 1 to 16'),
])
def test_dataset_generators_name_a_bad_number_before_writing(tmp_path, tool, args, message):
    result = run_tool_in_process([tool, tmp_path / 'out', *args], cwd=tmp_path)
    assert_user_error(result, message)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('tool, first', [('analysis/plot_loss.py', 'work'),
                                         ('analysis/plot_scaling.py', 'b.json')])
@pytest.mark.parametrize('out', ['lossnoext', 'l.xyz'])
def test_plots_refuse_an_out_without_an_image_suffix(tmp_path, tool, first, out):
    """Without a suffix matplotlib wrote OUT.png while the tool named OUT; an unknown one failed
    after the plotting, naming no option."""
    (tmp_path / 'b.json').write_text('[]')
    result = run_tool_in_process([tool, first, '--out', out], cwd=tmp_path)
    assert_user_error(result, f"--out '{out}': give a file name ending in one of .png, .pdf")


# ----------------------------------------------------------------- tools/analysis/plot_scaling.py
SCALING_SIZES = ('256x256', '512x512', '768x768')


def _scaling_rows(*sizes, **values):
    """Rows as benchmark.py --json writes them, with ``values`` (e.g. forward_ours_s=1.0)."""
    return [dict(size=size, arch='tiny', dtype='fp32', device='cpu', threads=1, **values) for size in sizes]


@pytest.mark.parametrize('data, words', [
    ([{}, {}, {}], ["row 0 has no 'size' (its keys: [])", "expected benchmark.py --json's"]),
    ({'machine': {}, 'rows': {'a': 1, 'b': 2, 'c': 3}}, ["its 'rows' is a dict, not a list of rows"]),
    ({'machine': {}}, ["has no 'rows' (its keys: ['machine'])"]),
    ([1, 2, 3], ['row 0 is an int, not a dict']),
    (dict(rows=_scaling_rows(*SCALING_SIZES, new_shape_first_ours_s=1.0)),
     ['has no forward timings or memory to plot (none of forward_ours_s, ', '--modes forward']),
    (_scaling_rows(*SCALING_SIZES[:2], forward_ours_s=1.0) * 2,
     ['has 4 rows of 2 sizes', 'needs at least 3 different sizes']),
    (_scaling_rows(*SCALING_SIZES[:2], forward_ours_s=1.0) + _scaling_rows(SCALING_SIZES[2]),
     ['row 2 (768x768) has forward_ours_s: none; expected a finite number in every row']),
    (_scaling_rows('256', '512', '768', forward_ours_s=1.0), ["row 0 has 'size': '256'; expected 'HxW'"]),
    ('{"rows": [', ['is not a JSON file (Expecting value']),
], ids=['rows_without_keys', 'rows_a_dict', 'no_rows', 'rows_not_dicts', 'no_forward_keys',
        'two_sizes', 'a_row_lacks_a_series', 'size_not_HxW', 'cut_off'])
def test_plot_scaling_names_what_its_json_lacks(tmp_path, data, words):
    path, out = tmp_path / 'scaling.json', tmp_path / 'scaling.png'
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    result = run_tool_in_process(['analysis/plot_scaling.py', path, '--out', out], cwd=tmp_path)
    assert_user_error(result, f"json='{path}'", *words)
    assert not out.exists()


def test_plot_scaling_fits_each_series_of_benchmark_rows(tmp_path):
    rows = [dict(row, forward_ours_s=n * 1.0, forward_peak_mb_ours=n * 10.0)
            for n, row in enumerate(_scaling_rows(*SCALING_SIZES), start=1)]
    path, out = tmp_path / 'scaling.json', tmp_path / 'scaling.png'
    path.write_text(json.dumps(dict(machine={}, complete=True, rows=rows)))
    result = run_tool_in_process(['analysis/plot_scaling.py', path, '--out', out], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'forward_ours_s: ' in result.stdout and 'forward_peak_mb_ours: ' in result.stdout and out.exists()


def test_plot_scaling_labels_the_sizes_and_batch_it_plots(tmp_path, monkeypatch):
    """The x axis said 'batch 1; 256² .. 1600²' whatever the rows held."""
    scaling = load_tool('analysis/plot_scaling.py')
    figures = []
    monkeypatch.setattr(scaling.plt, 'close', figures.append)
    rows = [dict(row, batch=2, forward_ours_s=n * 1.0)
            for n, row in enumerate(_scaling_rows(*SCALING_SIZES), start=1)]
    scaling.plot(rows, str(tmp_path / 'scaling.png'))
    assert figures[0].axes[0].get_xlabel() == 'megapixels (batch 2; 256x256 .. 768x768)'
