"""tools/analysis/gpu_suite.py: the GPU measurements in one call. Its plan runs the documented
commands, its checks read the numbers the benchmark writes, a step over its limit is killed with
its children and the rest still run, and what did not finish is named for a second call. The
numbers themselves are measurements, never test assertions."""
import json
import os.path as osp
import re
import sys
import time

import pytest
import torch

from helpers import REPO, load_tool, run_tool

suite = load_tool('analysis/gpu_suite.py')
benchmark = load_tool('analysis/benchmark.py')


def test_every_benchmark_step_of_the_gpu_plan_is_a_valid_benchmark_command(monkeypatch):
    """The real plan's benchmark.py command lines parse as on a CUDA machine (the GPU-only options
    included), and every config it names exists."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    steps = suite.plan(suite.REAL, 'cuda')
    names = [s.name for s in steps]
    assert len(names) == len(set(names))
    for step in steps:
        if step.kind != 'bench':
            continue
        args = benchmark.parse_args(step.command[2:])
        assert args.device == 'cuda'
        if args.config:
            assert osp.isfile(args.config), args.config
    by_name = {s.name: benchmark.parse_args(s.command[2:]) for s in steps if s.kind == 'bench'}
    # What docs/benchmark.md's targets ask for: six new sizes at batch 2, 2 x 3 x 800 x 1344.
    assert len(by_name['new_shape_fp16'].sizes) == 6 and by_name['new_shape_fp16'].batch == 2
    assert by_name['steady_fp16'].sizes == [(800, 1344)] and by_name['steady_fp16'].timm
    assert all(by_name[f'{mode}_{dtype}'].profile for mode in ('new_shape', 'steady')
               for dtype in ('fp16', 'fp32'))
    assert by_name['compile_fp16'].compile
    assert by_name['eval_upernet_tta'].tta and not by_name['eval_upernet'].tta
    trains = [s for s in steps if s.kind == 'train']
    assert [osp.basename(s.command[2]) for s in trains] == [
        'davit_maskrcnn_1x_coco.py', 'swin_t_maskrcnn_1x_coco.py', 'davit_maskrcnn_1x_coco_amp.py']
    # >= 40 iterations at batch 2, logged and averaged over windows of ten.
    assert suite.REAL.train_iters >= 40
    assert 'log_processor.window_size=10' in trains[0].command
    assert 'default_hooks.logger.interval=10' in trains[0].command


def test_checks_compare_each_number_with_its_target():
    values = {'new_shape_fp32': {'new_shape_extra_ours_ms': 45.0},
              'new_shape_fp16': {'new_shape_extra_ours_ms': 75.0},
              'train_maskrcnn': {'s_per_iter': 0.6}, 'train_maskrcnn_amp': {'s_per_iter': 0.4},
              'train_maskrcnn_swin': {'s_per_iter': 0.5}}
    rows = {row['what']: row for row in suite.evaluate(suite.CHECKS, values)}
    first = rows['new input size, fp32: median extra ms of a first training step']
    assert first['value'] == 45.0 and first['met'] is True and first['target'] == '<= 60'
    assert rows['new input size, fp16 autocast: median extra ms of a first training step'][
        'met'] is False
    assert rows['Mask R-CNN training s/iter / Swin-T']['value'] == pytest.approx(1.2)
    assert rows['Mask R-CNN training s/iter / Swin-T']['met'] is False  # 1.2 > 1.15
    amp = rows['Mask R-CNN training s/iter fp32 / _amp config']
    assert amp['value'] == pytest.approx(1.5) and amp['met'] is True and amp['target'] == '>= 1.2'
    missing = rows['fwd+bwd fp16 autocast / reference']
    assert missing['value'] is None and missing['met'] is None
    assert not any(row['partial'] for row in rows.values())
    # a value that needs a step that stopped early is marked so
    marked = {row['what']: row for row in suite.evaluate(suite.CHECKS, values, ['train_maskrcnn_amp'])}
    assert marked['Mask R-CNN training s/iter fp32 / _amp config']['partial'] is True
    assert marked['Mask R-CNN training s/iter / Swin-T']['partial'] is False
    reported = rows['maskrcnn training s/iter']
    assert reported['value'] == 0.6 and reported['met'] is None and reported['target'] == ''


def test_smoke_run_measures_summarises_and_cleans_up(tmp_path):
    """A shrunk plan on this CPU: the benchmark's and the training log's numbers reach the
    checks (the data step runs first on its own), the summary is written, the work dir goes."""
    out = tmp_path / 'out'
    run_tool(['analysis/gpu_suite.py', '--out', out, '--smoke', '--work-dir', tmp_path / 'work',
              '--only', 'new_shape_fp32', 'steady_fp32', 'train_maskrcnn', 'train_maskrcnn_swin',
              'eval_retinanet', 'eval_retinanet_swin'], cwd=tmp_path)
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['smoke'] is True and summary['rerun'] == []
    assert [s['name'] for s in summary['steps']] == [
        'data', 'new_shape_fp32', 'train_maskrcnn', 'train_maskrcnn_swin', 'steady_fp32',
        'eval_retinanet', 'eval_retinanet_swin']
    assert {s['status'] for s in summary['steps']} == {'ok'}
    assert summary['machine']['device'] == 'cpu' and summary['machine']['torch']
    checks = {row['what']: row for row in summary['checks']}
    for what in ('new input size, fp32: median extra ms of a first training step',
                 'fwd+bwd fp32 / reference', 'Mask R-CNN training s/iter / Swin-T',
                 'RetinaNet evaluation s/image / Swin-T',
                 'new input size, fp32: median extra ms, reference'):
        assert isinstance(checks[what]['value'], float), what
        assert checks[what]['met'] in ((True, False) if checks[what]['target'] else (None,))
    for what in ('fwd+bwd fp16 autocast / reference', 'UperNet --tta evaluation s/image / Swin-T'):
        assert checks[what]['value'] is None  # not run
    # Training: 4 logged iterations of one each; the first (start-up, first shapes) apart.
    train = summary['values']['train_maskrcnn']
    assert train['iters'] == 4 and len(train['windows']) == 4
    assert train['s_per_iter'] == pytest.approx(sum(train['windows'][1:]) / 3)
    assert train['first_window_s_per_iter'] == train['windows'][0]
    assert (out / 'logs' / 'train_maskrcnn.log').read_text().count('Epoch(train)') == 4
    table = (out / 'summary.md').read_text()
    assert '| 1 | new input size, fp32: median extra ms of a first training step |' in table
    assert '| eval_retinanet_swin | ok |' in table
    # --profile: a line per step, mode and implementation, its top operators and total.
    for step, mode in (('steady_fp32', 'forward'), ('steady_fp32', 'train'),
                       ('new_shape_fp32', 'new_shape')):
        ops = summary['values'][step][f'{mode}_profile_ours_ms']
        assert f"- {step}, {mode}, ours (total {ops['total']:.2f} ms): " in table
        assert f"- {step}, {mode}, reference (total " in table
    assert (tmp_path / 'work' / 'data' / 'synthetic_coco').is_dir()


def fake_steps(tmp_path):
    """Steps whose commands sleep in a child process in a session of its own, as torchrun's
    workers do; each child writes its pid to a file named after the step."""
    def sleeper(name, seconds, limit):
        child = (f'import os, time; open({str(tmp_path / name)!r}, "w").write(str(os.getpid())); '
                 f'time.sleep({seconds})')
        code = (f'import subprocess, sys; subprocess.run([sys.executable, "-c", {child!r}], '
                f'start_new_session=True)')
        return suite.Step(name, '1', limit, [sys.executable, '-c', code], kind='data')
    return [sleeper('quick', 0, 30), sleeper('stuck', 120, 5), sleeper('after', 4, 30),
            sleeper('late', 0, 30)]


def test_a_step_over_its_limit_is_killed_with_its_children_and_the_budget_is_kept(
        tmp_path, monkeypatch, capsys):
    """A 12-s budget, 4 s at least per step: 'stuck' is killed at its 5-s limit, 'after' starts
    with about 7 s left and ends with about 3 left, too little to start 'late'."""
    monkeypatch.setattr(suite, 'plan', lambda scale, device: fake_steps(tmp_path))
    monkeypatch.setattr(suite, 'MIN_STEP_S', 4)
    start = time.monotonic()
    summary = suite.main(['--out', str(tmp_path / 'out'), '--smoke', '--budget', '12'])
    assert time.monotonic() - start < 30  # the 120-s sleeper was killed, not waited for
    status = {s['name']: s['status'] for s in summary['steps']}
    assert status == {'quick': 'ok', 'stuck': 'timed out', 'after': 'ok',
                      'late': 'not run (budget)'}
    assert summary['steps'][1]['seconds'] == pytest.approx(5, abs=1)
    assert summary['rerun'][:5] == ['python', 'tools/analysis/gpu_suite.py', '--only', 'stuck',
                                    'late']
    assert (tmp_path / 'after').exists() and not (tmp_path / 'late').exists()
    stuck = int((tmp_path / 'stuck').read_text())  # the worker in its own session is gone too
    assert not osp.exists(f'/proc/{stuck}') or open(f'/proc/{stuck}/stat').read().rsplit(')', 1)[1].split()[0] == 'Z'
    printed = capsys.readouterr().out
    assert 'not finished: python tools/analysis/gpu_suite.py --only stuck late' in printed
    # the targets table is printed last (a remote run returns only the end of its output)
    assert printed.rindex('| part | measurement |') > printed.rindex('| step | status |')


def test_a_step_stopped_early_gives_the_numbers_it_wrote_and_an_old_file_is_not_read(
        tmp_path, monkeypatch):
    """A benchmark step killed at its limit after writing its first numbers (as benchmark.py
    rewrites --json) reports them, and says so; a step that fails before writing anything is not
    credited with a result file an earlier call left in the same --out."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'steady_fp32.json').write_text(json.dumps(dict(machine={}, complete=True, rows=[
        dict(size='800x1344', train_ratio=0.5)])))  # an earlier call's

    def bench_step(name, code, limit):
        writer = ('import json, sys, time; json.dump(dict(machine=dict(gpu="test"), '
                  'complete=False, rows=[dict(size="median over sizes", '
                  'new_shape_extra_ours_ms=42.0)]), open(sys.argv[-1], "w")); ' + code)
        return suite.Step(name, '1', limit, [sys.executable, '-c', writer])

    # a training run stopped at its limit after logging three windows (of one iteration each)
    log = tmp_path / 'work' / 'work' / 'train_maskrcnn' / '20261206_000000' / 'vis_data'
    records = ''.join(json.dumps(dict(iter=i, time=t, loss=1.0)) + '\n'
                      for i, t in ((1, 3.0), (2, 0.5), (3, 0.7)))
    trainer = (f'import os, time; os.makedirs({str(log)!r}); '
               f'open({str(log / "scalars.json")!r}, "w").write({records!r}); time.sleep(60)')
    steps = [bench_step('new_shape_fp32', 'time.sleep(60)', 5),
             suite.Step('steady_fp32', '2', 30, [sys.executable, '-c', 'raise SystemExit(3)']),
             suite.Step('train_maskrcnn', '3', 5, [sys.executable, '-c', trainer], kind='train')]
    monkeypatch.setattr(suite, 'plan', lambda scale, device: steps)
    monkeypatch.setattr(suite, 'MIN_STEP_S', 4)
    summary = suite.main(['--out', str(out), '--smoke', '--budget', '60',
                          '--work-dir', str(tmp_path / 'work')])
    status = {s['name']: s['status'] for s in summary['steps']}
    assert status == {'new_shape_fp32': 'timed out, partial numbers kept',
                      'steady_fp32': 'failed (exit 3)',
                      'train_maskrcnn': 'timed out, partial numbers kept'}
    train = summary['values']['train_maskrcnn']
    assert train['s_per_iter'] == pytest.approx(0.6) and train['complete'] is False
    checks = {row['what']: row for row in summary['checks']}
    first = checks['new input size, fp32: median extra ms of a first training step']
    assert first['value'] == 42.0 and first['met'] is True and first['partial'] is True
    assert checks['fwd+bwd fp32 / reference']['value'] is None
    assert summary['machine'] == {'gpu': 'test'}
    assert summary['rerun'][3:6] == ['new_shape_fp32', 'steady_fp32', 'train_maskrcnn']
    table = (out / 'summary.md').read_text()
    assert '| new_shape_fp32 | timed out, partial numbers kept |' in table
    assert ('| 1 | new input size, fp32: median extra ms of a first training step | 42 | <= 60 | '
            'yes (a step stopped early) |') in table


def test_a_step_that_did_not_run_is_not_credited_with_an_earlier_calls_file(tmp_path):
    (tmp_path / 'steady_fp32.json').write_text(json.dumps(dict(machine={}, rows=[dict(
        size='800x1344', train_ratio=0.5)])))
    for status in ('not run', 'not run (budget)'):
        step = suite.Step('steady_fp32', '2', 30, ['true'], status=status)
        assert suite.step_values([step], str(tmp_path)) == ({}, {})
    ran = suite.Step('steady_fp32', '2', 30, ['true'], status='ok')
    assert suite.step_values([ran], str(tmp_path))[0]['steady_fp32']['train_ratio'] == 0.5


@pytest.mark.parametrize('argv,message', [
    pytest.param(['--out', 'o'], '--device cuda: this machine has no CUDA device',
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='would start the GPU plan')),
    (['--out', 'o', '--device', 'cpu'], 'on a CPU it runs only with --smoke'),
    (['--out', 'o', '--smoke', '--only', 'steady', 'data'], '--only steady: no such step'),
    (['--out', 'o', '--smoke', '--budget', '10'], '--budget 10: accepted 60 seconds or more'),
    # NaN compares false with everything: no step was ever left out for lack of time
    (['--out', 'o', '--smoke', '--budget', 'nan'], '--budget nan: accepted 60 seconds or more, finite'),
    (['--out', 'o', '--smoke', '--budget', 'inf'], '--budget inf: accepted 60 seconds or more, finite'),
    (['--smoke'], '--out is required'),
    (['--out', 'o', '--device', 'tpu'], "--device 'tpu': accepted cuda or cpu"),
])
def test_bad_arguments_are_refused_with_a_message(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        suite.main(argv)
    assert not (tmp_path / 'o').exists()


def test_list_prints_every_step_with_its_limit():
    result = run_tool(['analysis/gpu_suite.py', '--list'], cwd=REPO)
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [s.name for s in suite.plan(suite.REAL, 'cuda')]
    assert lines[1].startswith('new_shape_fp32 (part 1, limit 180 s): ')
    assert '--modes new_shape' in lines[1]
