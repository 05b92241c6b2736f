"""Every GPU measurement of docs/benchmark.md ("GPU") in one call: in order of priority, each under
its own time limit within one overall budget, and each number checked against its target.

    python tools/analysis/gpu_suite.py --out OUT [--budget 520] [--only STEP ...] [--work-dir DIR]
    python tools/analysis/gpu_suite.py --list          # the steps, their limits and commands
    python tools/analysis/gpu_suite.py --out OUT --smoke   # a plumbing check, on a CPU too

The steps run ``tools/analysis/benchmark.py`` (the new-input-size cost, steady state against the
reference, timm and ``torch.compile``, memory, evaluation time per image) and
``tools/dist_train.sh`` (whole-model training, each config in a fresh process) with the
commands docs/benchmark.md gives, on synthetic COCO- and ADE20K-sized data the first step writes
into the work directory. Every step logs to ``OUT/logs/STEP.log`` and leaves its numbers in
``OUT/STEP.json``; after every step ``OUT/summary.json`` and ``OUT/summary.md`` are written anew:
each target with its measured value and whether it is met, the numbers reported beside the
targets, the machine (GPU, torch, CUDA, cuDNN, Triton, and per dtype whether davit_mm's Triton
kernels or PyTorch's computed the position encodings), and each step's status (``ok``,
``failed``, ``timed out``, ``not run``). A step that timed out or failed still gives the numbers
it measured before it stopped (its status then says ``partial numbers kept``): the benchmark
rewrites its ``--json`` as each number comes in, and a training run's log is read as far as it
got. A step that would start with less than a minute of the budget left is not run; the summary
ends with the ``--only`` command that runs those that did not finish, for a second call.
``--smoke`` runs the same plan shrunk (tiny inputs, the quickstart's mini configs in place of the
paper's and of the Swin-T baselines, no GPU-only options): it checks the plumbing, and its numbers
mean nothing.

A measurement, never a test: run it on a quiet machine and report what it printed.
"""
import argparse
import contextlib
import json
import os
import os.path as osp
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from davit_mm.cli import check_output_path, run_tool  # noqa: E402
from plot_loss import read_scalars  # noqa: E402  (tools/analysis/plot_loss.py)

BENCHMARK = osp.join(REPO, 'tools', 'analysis', 'benchmark.py')
# A step is started only with at least this many seconds of the budget left.
MIN_STEP_S = 60

# The paper's configs and the same configs with Swin-T in DaViT-T's place (configs/benchmark/).
CONFIGS = {
    'maskrcnn': 'configs/davit_maskrcnn_1x_coco.py',
    'maskrcnn_amp': 'configs/davit_maskrcnn_1x_coco_amp.py',
    'maskrcnn_swin': 'configs/benchmark/swin_t_maskrcnn_1x_coco.py',
    'retinanet': 'configs/davit_retinanet_1x_coco.py',
    'retinanet_swin': 'configs/benchmark/swin_t_retinanet_1x_coco.py',
    'upernet': 'configs/upernet_davit_512x512_160k_ade20k.py',
    'upernet_swin': 'configs/benchmark/upernet_swin_t_512x512_160k_ade20k.py',
}
MINI = {'maskrcnn': 'configs/quickstart/davit_mini_maskrcnn_synthetic_coco.py',
        'retinanet': 'configs/quickstart/davit_mini_retinanet_synthetic_coco.py',
        'upernet': 'configs/quickstart/upernet_davit_mini_synthetic_ade20k.py'}


@dataclass(frozen=True)
class Scale:
    """How large each measurement is."""
    shape_sizes: Sequence[str]   # new_shape: each new to the process
    size: str                    # steady state
    batch: int
    repeats: int
    warmup: int
    train_iters: int             # whole-model training: iterations (batch 2), logged every tenth
    log_interval: int
    images: int                  # evaluation: images timed (the first batch apart)
    tta_images: int
    coco: str                    # where the configs read their data, relative to the work dir
    ade: str
    coco_size: Sequence[int]
    ade_size: Sequence[int]
    configs: Dict[str, str]
    memory_dtype: str            # training peak memory
    profile_dtypes: Sequence[str]  # new input size and steady state with --profile
    gpu_options: bool            # --timm, --aten-depthwise, --compile


REAL = Scale(shape_sizes=('544x832', '608x928', '672x1024', '736x1120', '800x1216', '576x1088'),
             size='800x1344', batch=2, repeats=20, warmup=5, train_iters=40, log_interval=10,
             images=30, tta_images=8, coco='data/coco', ade='data/ade', coco_size=(480, 640),
             ade_size=(512, 683), configs=CONFIGS, memory_dtype='fp16',
             profile_dtypes=('fp16', 'fp32'), gpu_options=True)
SMOKE = Scale(shape_sizes=('64x96', '96x64'), size='64x96', batch=1, repeats=1, warmup=0,
              train_iters=4, log_interval=1, images=4, tta_images=4, coco='data/synthetic_coco',
              ade='data/synthetic_ade20k', coco_size=(96, 128), ade_size=(64, 64),
              configs={role: MINI[role.split('_')[0]] for role in CONFIGS},
              memory_dtype='fp32',  # CPU fp16 memory profiles take minutes
              # One CPU fp16 training step at 64 x 96 records 519,137 profiler events (torch's
              # CPU half-precision kernels work in slices); benchmark.py --profile took 91 s,
              # 7 s without it.
              profile_dtypes=('fp32',),
              gpu_options=False)


@dataclass
class Step:
    name: str
    part: str            # the numbered part of docs/benchmark.md "GPU" it measures
    limit_s: int
    command: List[str]
    kind: str = 'bench'  # 'bench' (benchmark.py --json), 'train' (a work dir), 'data'
    status: str = 'not run'
    seconds: float = 0.0


def plan(scale: Scale, device: str) -> List[Step]:
    """The steps in order of priority: what a user meets first (a new input size, whole-model
    training), then steady state, evaluation, memory, and ``torch.compile`` last (it compiles for
    minutes)."""
    py = sys.executable
    dev = ['--device', device]
    bench = [py, BENCHMARK] + dev

    def cfg(role):
        return osp.join(REPO, scale.configs[role])

    make = [shlex.join([py, osp.join(REPO, 'tools', 'dataset', f'make_synthetic_{name}.py'), root,
                        '--num-train', str(count), '--num-val', str(scale.images + 2),
                        '--size', *map(str, size)] + extra)
            for name, root, count, size, extra in (
                ('coco', scale.coco, 2 * scale.train_iters, scale.coco_size,  # batch 2
                 ['--coco-classes'] if scale.gpu_options else []),
                ('ade20k', scale.ade, 1, scale.ade_size, []))]
    steps = [Step('data', '3', 180, ['bash', '-c', ' && '.join(make)], kind='data')]
    gpu = ['--aten-depthwise'] if scale.gpu_options else []

    def profile(dtype):
        """Where the time goes: the costliest operators of one more call per implementation
        (a first call at a new size; a steady-state call)."""
        return ['--profile'] if dtype in scale.profile_dtypes else []

    for dtype in ('fp32', 'fp16'):
        steps.append(Step(f'new_shape_{dtype}', '1', 180, bench + [
            '--modes', 'new_shape', '--batch', str(scale.batch), '--dtype', dtype, '--repeats', '2',
            '--sizes', *scale.shape_sizes] + gpu + profile(dtype)))
    train_options = ['train_cfg.max_epochs=1', 'val_cfg=None', 'val_dataloader=None',
                     'val_evaluator=None', 'model.backbone.init_cfg=None',
                     'train_dataloader.batch_size=2',
                     f'default_hooks.logger.interval={scale.log_interval}',
                     f'log_processor.window_size={scale.log_interval}',
                     'default_hooks.checkpoint.save_last=False',
                     'default_hooks.checkpoint.interval=1000']
    for role in ('maskrcnn', 'maskrcnn_swin', 'maskrcnn_amp'):
        steps.append(Step(f'train_{role}', '3', 240, kind='train', command=[
            'bash', osp.join(REPO, 'tools', 'dist_train.sh'), cfg(role), '1',
            '--work-dir', f'work/train_{role}', '--cfg-options', *train_options]))

    def steady(repeats):
        return bench + ['--sizes', scale.size, '--batch', str(scale.batch), '--repeats',
                        str(repeats), '--warmup', str(scale.warmup)]

    timm = ['--timm'] if scale.gpu_options else []
    steps += [Step(f'steady_{dtype}', '2', limit, steady(scale.repeats) + ['--dtype', dtype] + timm
                   + gpu + profile(dtype)) for dtype, limit in (('fp16', 180), ('fp32', 150))]
    for role in ('retinanet', 'maskrcnn', 'upernet'):
        for swin in ('', '_swin'):
            steps.append(Step(f'eval_{role}{swin}', '3', 120, bench + [
                '--config', cfg(role + swin), '--modes', 'test', '--images', str(scale.images)]))
    for swin in ('', '_swin'):
        steps.append(Step(f'eval_upernet{swin}_tta', '3', 180, bench + [
            '--config', cfg('upernet' + swin), '--modes', 'test', '--tta', '--images',
            str(scale.tta_images)]))
    steps.append(Step('memory', '2', 150, bench + [
        '--sizes', scale.size, '--batch', str(scale.batch), '--dtype', scale.memory_dtype,
        '--modes', 'train', '--memory', '--repeats', '1', '--warmup', '1'] + timm))
    if scale.gpu_options:
        steps.append(Step('compile_fp16', '2', 420, steady(10) + ['--dtype', 'fp16', '--compile']))
    return steps


# ------------------------------------------------------------------------------------ results
def seconds_per_iter(work_dir: str, interval: int) -> dict:
    """Training seconds per iteration from the run's ``vis_data/scalars.json``: each record's
    ``time`` is the mean over the last ``interval`` iterations (``log_processor.window_size``);
    the first window, which meets every first input shape and the start-up, is reported apart."""
    times = [(r['iter'], r['time']) for r in read_scalars(work_dir) if 'time' in r and 'loss' in r]
    later = [t for it, t in times if it > interval]
    if not later:
        raise ValueError(f'{work_dir!r}: fewer than two logged windows of {interval} iterations')
    return dict(s_per_iter=statistics.mean(later), first_window_s_per_iter=times[0][1],
                iters=times[-1][0], windows=[t for _, t in times])


def step_values(steps: Sequence[Step], out: str) -> Tuple[Dict[str, dict], dict]:
    """Each step's numbers (a benchmark step's median-over-sizes row or its last row, a training
    step's :func:`seconds_per_iter`), and the ``machine`` record of the first benchmark step that
    wrote one. A step that timed out or failed gives what it wrote before it stopped (the
    benchmark rewrites its file as each number comes in; :func:`run_step` says so in its
    status); a step that did not run in this call gives nothing, whatever an earlier call left."""
    values, machine = {}, {}
    for step in steps:
        path = osp.join(out, f'{step.name}.json')
        if step.status.startswith('not run') or not osp.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        if step.kind == 'bench':
            machine = machine or data.get('machine', {})
            rows = data['rows']
            if rows:
                values[step.name] = next((r for r in rows if r.get('size') == 'median over sizes'),
                                         rows[-1])
        else:
            values[step.name] = data
    return values, machine


@dataclass(frozen=True)
class Check:
    part: str
    what: str
    value: Callable[[Dict[str, dict]], float]  # raises KeyError where not measured
    op: str = ''   # '<=' or '>='; '' for a number reported beside the targets
    target: float = 0.0


def _ratio(a_step, a_key, b_step, b_key):
    return lambda v: v[a_step][a_key] / v[b_step][b_key]


CHECKS = [
    Check('1', 'new input size, fp32: median extra ms of a first training step', lambda v:
          v['new_shape_fp32']['new_shape_extra_ours_ms'], '<=', 60),
    Check('1', 'new input size, fp16 autocast: median extra ms of a first training step', lambda v:
          v['new_shape_fp16']['new_shape_extra_ours_ms'], '<=', 60),
    Check('2', 'fwd+bwd fp16 autocast / reference', lambda v: v['steady_fp16']['train_ratio'],
          '<=', 0.75),
    Check('2', 'fwd+bwd fp32 / reference', lambda v: v['steady_fp32']['train_ratio'], '<=', 0.80),
    Check('2', 'inference fp16 / reference', lambda v: v['steady_fp16']['forward_ratio'], '<=',
          0.70),
    Check('2', 'training peak memory (fp16 autocast) / reference', lambda v:
          v['memory']['train_memory_ratio'], '<=', 0.90),
    Check('3', 'Mask R-CNN training s/iter / Swin-T', _ratio(
        'train_maskrcnn', 's_per_iter', 'train_maskrcnn_swin', 's_per_iter'), '<=', 1.15),
    Check('3', 'Mask R-CNN training s/iter fp32 / _amp config', _ratio(
        'train_maskrcnn', 's_per_iter', 'train_maskrcnn_amp', 's_per_iter'), '>=', 1.2),
] + [
    Check('3', f'{name} evaluation s/image / Swin-T', _ratio(
        f'eval_{step}', 'test_s_per_image', f'eval_{swin}', 'test_s_per_image'), '<=', 1.15)
    for name, step, swin in (('RetinaNet', 'retinanet', 'retinanet_swin'),
                             ('Mask R-CNN', 'maskrcnn', 'maskrcnn_swin'),
                             ('UperNet', 'upernet', 'upernet_swin'),
                             ('UperNet --tta', 'upernet_tta', 'upernet_swin_tta'))
] + [
    Check('1', f'new input size, {dtype}: median extra ms, {impl}', lambda v, d=dtype, i=impl:
          v[f'new_shape_{d}'][f'new_shape_extra_{i}_ms'])
    for dtype in ('fp32', 'fp16') for impl in ('reference', 'ours_aten_depthwise')
] + [
    Check('2', f'{mode} {dtype} / reference, {impl}', lambda v, m=mode, d=dtype, k=key:
          v[f'steady_{d}'][f'{m}_ratio{k}'])
    for dtype in ('fp16', 'fp32') for mode in ('train', 'forward')
    for impl, key in (('timm', '_timm'), ('PyTorch depth-wise kernel', '_aten_depthwise'))
] + [
    Check('2', f'{mode} fp16 / reference, torch.compile', lambda v, m=mode:
          v['compile_fp16'][f'{m}_ratio_compiled']) for mode in ('train', 'forward')
] + [
    Check('3', f'{role} training s/iter', lambda v, r=role: v[f'train_{r}']['s_per_iter'])
    for role in ('maskrcnn', 'maskrcnn_swin', 'maskrcnn_amp')
]


def evaluate(checks: Sequence[Check], values: Dict[str, dict],
             partial: Sequence[str] = ()) -> List[dict]:
    """Each check's value and, for a target, whether it is met (None: not measured).
    ``partial``: the steps that stopped before the end; a value that needs one of them is
    marked ``partial`` (a training step's mean over fewer iterations than planned, say)."""
    finished = {name: row for name, row in values.items() if name not in partial}
    rows = []
    for check in checks:
        value, from_partial = None, False
        for source in (finished, values):
            try:
                value = check.value(source)
            except (KeyError, ZeroDivisionError):
                continue
            from_partial = source is not finished
            break
        met = None
        if value is not None and check.op:
            met = value <= check.target if check.op == '<=' else value >= check.target
        rows.append(dict(part=check.part, what=check.what, value=value,
                         target=f'{check.op} {check.target:g}' if check.op else '', met=met,
                         partial=from_partial))
    return rows


def profile_lines(values: Dict[str, dict]) -> List[str]:
    """Where the time goes: each ``--profile`` record of the finished steps (``MODE_profile_IMPL_ms``,
    the costliest operators of one call), a line per mode and implementation."""
    lines = []
    for name, row in values.items():
        for key, ops in row.items():
            if key.endswith('_ms') and '_profile_' in key and isinstance(ops, dict):
                mode, impl = key[:-len('_ms')].split('_profile_', 1)
                top = ', '.join(f'{op} {ms:.2f}' for op, ms in ops.items() if op != 'total')
                lines.append(f"- {name}, {mode}, {impl} (total {ops['total']:.2f} ms): {top}")
    title = ('Costliest operators of one call, ms (new input size: CPU time, where per-shape '
             'planning runs; steady state: GPU time of the kernels each launched):')
    return ['', title, ''] + lines if lines else []


def write_summary(steps: Sequence[Step], out: str, smoke: bool, argv_tail: List[str]) -> dict:
    values, machine = step_values(steps, out)
    left = [s.name for s in steps if s.status != 'ok']
    checks = evaluate(CHECKS, values, left)
    summary = dict(smoke=smoke, machine=machine,
                   steps=[dict(name=s.name, part=s.part, status=s.status,
                               seconds=round(s.seconds, 1), limit_s=s.limit_s) for s in steps],
                   checks=checks, values=values,
                   rerun=(['python', 'tools/analysis/gpu_suite.py', '--only', *left] + argv_tail
                          if left else []))
    with open(osp.join(out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    title = '# GPU suite' + (' (--smoke: plumbing only, the numbers mean nothing)' if smoke else '')
    lines = [title,
             '', 'machine: ' + ', '.join(f'{k} {v}' for k, v in summary['machine'].items()), '',
             '| part | measurement | value | target | met |', '|---|---|---|---|---|']
    for row in checks:
        value = '' if row['value'] is None else f"{row['value']:.4g}"
        met = {None: '', True: 'yes', False: '**no**'}[row['met']]
        if row['partial']:
            met = f'{met} (a step stopped early)'.lstrip()
        lines.append(f"| {row['part']} | {row['what']} | {value} | {row['target']} | {met} |")
    details = ['', '| step | status | seconds | limit |', '|---|---|---|---|']
    details += [f'| {s.name} | {s.status} | {s.seconds:.0f} | {s.limit_s} |' for s in steps]
    details += profile_lines(values)
    rerun = ['', 'not finished: ' + ' '.join(summary['rerun'])] if left else []
    with open(osp.join(out, 'summary.md'), 'w') as f:
        f.write('\n'.join(lines + details + rerun) + '\n')
    # Printed with the targets last: a caller that keeps only the end of the output (a remote
    # run's last few kilobytes) keeps the table that matters.
    summary['printed'] = '\n'.join(details[1:] + [''] + lines + rerun)
    return summary


# ------------------------------------------------------------------------------------ running
TERM_GRACE_S = 5  # how long a step over its limit gets to stop after SIGTERM


def descendants(pid: int) -> List[int]:
    """The processes below ``pid`` (Linux ``/proc``), whatever session or group they are in:
    torchrun starts its workers in sessions of their own, which a kill of the step's process
    group does not reach."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                parent = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_step(process: subprocess.Popen) -> None:
    """Stop a step and everything it started: SIGTERM to its group (torchrun then stops its
    workers), a few seconds' grace, then SIGKILL to every process found below it before and
    after (workers left behind would go on using the GPU while later steps are timed)."""
    below = set(descendants(process.pid))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=TERM_GRACE_S)
    below |= set(descendants(process.pid))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def run_step(step: Step, limit: float, work: str, out: str, scale: Scale) -> None:
    """Run one step in its own process group (dist_train.sh starts torchrun and its workers),
    stopped with everything below it at ``limit`` seconds (:func:`stop_step`); its output goes
    to ``OUT/logs/STEP.log``."""
    command = list(step.command)
    result = osp.join(out, f'{step.name}.json')
    if osp.exists(result):  # an earlier call's, into the same --out: never read as this one's
        os.remove(result)
    if step.kind == 'bench':
        command += ['--json', result]
    log_path = osp.join(out, 'logs', f'{step.name}.log')
    start = time.monotonic()
    with open(log_path, 'w') as log:
        log.write(' '.join(command) + '\n\n')
        log.flush()
        process = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True,
                                   env=dict(os.environ, PYTHON=sys.executable,  # dist_train.sh's
                                            PYTHONPATH=os.pathsep.join(
                                                filter(None, [REPO, os.environ.get('PYTHONPATH')]))))
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            stop_step(process)
            code = None
    step.seconds = time.monotonic() - start
    step.status = ('timed out' if code is None else f'failed (exit {code})' if code != 0
                   else 'ok')
    if step.kind == 'train':  # a run stopped at its limit still logged its first windows
        try:
            measured = seconds_per_iter(osp.join(work, 'work', step.name), scale.log_interval)
        except (OSError, ValueError) as exc:
            if code == 0:
                step.status = f'failed ({exc})'
        else:
            with open(result, 'w') as f:
                json.dump(dict(measured, complete=code == 0), f, indent=1)
    if code != 0 and step.name in step_values([step], out)[0]:
        step.status += ', partial numbers kept'
    print(f'{step.name}: {step.status} in {step.seconds:.0f} s (limit {limit:.0f} s)', flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', help='where the results, logs and summary go')
    parser.add_argument('--work-dir', help='data and training work dirs (default: a temporary '
                                           'folder, removed at the end)')
    parser.add_argument('--budget', type=float, default=520,
                        help='seconds for the whole call (default 520: one device call of '
                             '10 minutes, with room for start-up)')
    parser.add_argument('--only', nargs='+', metavar='STEP', help='run these steps only')
    parser.add_argument('--device', default=None, help='cuda (default) or cpu (with --smoke)')
    parser.add_argument('--smoke', action='store_true',
                        help='the same plan at tiny sizes with the mini configs: plumbing only')
    parser.add_argument('--list', action='store_true', help='print the steps and exit')
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = 'cpu' if args.smoke else 'cuda'
    if args.device not in ('cuda', 'cpu'):
        raise ValueError(f'--device {args.device!r}: accepted cuda or cpu')
    if args.device == 'cpu' and not args.smoke:
        raise ValueError('--device cpu: the suite measures GPU targets; on a CPU it runs only with '
                         '--smoke (a plumbing check)')
    if not MIN_STEP_S <= args.budget < float('inf'):  # NaN too: no step would ever be left out
        raise ValueError(f'--budget {args.budget:g}: accepted {MIN_STEP_S} seconds or more, finite')
    if not args.list and args.out is None:
        raise ValueError('--out is required (where the results go), except with --list')
    for label, folder in (('--out', args.out), ('--work-dir', args.work_dir)):
        if folder is not None and not args.list:
            check_output_path(label, folder, folder=True)
    return args


def main(argv=None):
    args = parse_args(argv)
    scale = SMOKE if args.smoke else REAL
    steps = plan(scale, args.device)
    names = [s.name for s in steps]
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            raise ValueError(f'--only {" ".join(unknown)}: no such step; the steps are '
                             f'{", ".join(names)}')
    if args.list:
        for step in steps:
            print(f'{step.name} (part {step.part}, limit {step.limit_s} s): '
                  f'{" ".join(step.command)}')
        return
    if args.device == 'cuda':
        import torch
        if not torch.cuda.is_available():
            raise ValueError('--device cuda: this machine has no CUDA device (--smoke --device cpu '
                             'checks the plumbing on a CPU)')
    deadline = time.monotonic() + args.budget
    out = osp.abspath(args.out)
    work = osp.abspath(args.work_dir or tempfile.mkdtemp(prefix='davit_mm_gpu_suite_'))
    os.makedirs(osp.join(out, 'logs'), exist_ok=True)
    os.makedirs(work, exist_ok=True)
    tail = ['--out', args.out] + (['--smoke', '--device', args.device] if args.smoke else [])
    selected = [s for s in steps if not args.only or s.name in args.only]
    if args.only and 'data' not in args.only and any(s.kind != 'bench' or '--config' in s.command
                                                      for s in selected):
        selected.insert(0, steps[0])  # training and evaluation read the generated data
    for step in selected:
        left = deadline - time.monotonic()
        if left < MIN_STEP_S:
            step.status = 'not run (budget)'
            continue
        run_step(step, min(step.limit_s, left), work, out, scale)
        write_summary(selected, out, args.smoke, tail)
    summary = write_summary(selected, out, args.smoke, tail)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(summary.pop('printed'), flush=True)
    return summary


if __name__ == '__main__':
    sys.exit(run_tool(main))
