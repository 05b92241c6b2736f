"""Time and memory of the DaViT backbone against the plain reference implementation of the official code.

    python tools/analysis/benchmark.py [--arch tiny] [--sizes 800x1216 ...] [--batch 1]
        [--dtype fp32|fp16|bf16] [--device cpu|cuda] [--modes forward train] [--repeats 5]
        [--warmup 2] [--memory] [--with-cp] [--compile] [--plain-kernels] [--aten-depthwise]
        [--other-linears] [--other-training-linears] [--unpacked-weights] [--pack-every-call]
        [--subnormal-grads] [--other-half-attention] [--timm] [--profile]
        [--threads N] [--json OUT]
    python tools/analysis/benchmark.py --modes new_shape --sizes 544x832 608x928 ... [--timm]
        [--aten-depthwise]
    python tools/analysis/benchmark.py --config CONFIG [--sizes 800x1333] [--batch 2]
        [--modes train forward test] [--images 50] [--tta] [--cfg-options KEY=VALUE ...]
    python tools/analysis/benchmark.py --config configs/benchmark/swin_t_maskrcnn_1x_coco.py ...

Backbone mode (default): davit_mm's ``DaViT`` and ``ReferenceDaViT`` (the official forward restated,
davit_mm.models.reference) get the same weights (DaViT's official random init); for every size, after ``--warmup`` untimed
runs of each, ``--repeats`` rounds alternate one timed run of ours and one of the reference (and
of each other implementation asked for, in an order that rotates every round), and the
medians are reported with their ratio and the largest output difference. ``forward`` is inference
(eval, no grad); ``train`` is forward + backward of the sum of the outputs (train mode, drop path 0
so both do the same work). ``--memory`` adds the peak memory of two steps of each mode for each
implementation, measured in a fresh process per implementation: ``*_peak_mb_*`` is the peak of the
tensors allocated (CUDA: ``torch.cuda.max_memory_allocated`` over what model and input hold; CPU:
the most the CPU allocator held at once during the steps, from the profiler's allocation events,
plus the parameters, buffers and input, which the CUDA number leaves out),
``*_rss_mb_*`` (CPU) the growth of the peak resident set (VmHWM) over the resident set with model
and input in place, which also counts memory the C allocator keeps after frees, and
``*_faulted_mb_*`` (CPU) the memory a step touches for the first time (its minor page faults
times the page size; the mean of the third to seventh steps, as it moves between steps): what
the operating system maps and zeroes for it again at every step because the C allocator gave it
back (glibc's default for large blocks).
``--with-cp`` also measures ours training with gradient checkpointing, ``--plain-kernels`` ours
with :mod:`davit_mm.ops`' device-specific kernels off, ``--aten-depthwise`` (CUDA) ours with the
position encodings on PyTorch's depth-wise kernel instead of davit_mm's Triton kernel (what runs
without Triton), ``--other-linears`` (CPU) ours with the other choices of linear kernel:
at inference oneDNN's linear where torch's AVX2 kernels take PyTorch's matmul, and the matmul
where AVX-512 kernels take oneDNN's; in the training MLP's backward, oneDNN's linears with
transposed weight views where AVX2 kernels take packed weights, and the other way round,
``--other-training-linears`` (CPU) ours with the other choice of linear kernel for training:
oneDNN's where davit_mm takes PyTorch's matmul (Intel CPUs), and the other way round,
``--unpacked-weights`` (CPU) ours with the inference MLP's and the training forward's weights
handed to oneDNN plain, to be reordered at every call or block, rather than packed once per
call, ``--pack-every-call`` (CPU) ours with the weights of training linears that make one call
packed for every call, however few rows it multiplies (davit_mm packs them from
``davit_mm.ops._PACK_MIN_ROWS`` rows), ``--other-half-attention`` (CPU, fp16/bf16) ours with the
other choice of window-attention kernel in half precision: PyTorch's flash attention where
davit_mm takes the plain steps (where oneDNN computes the dtype), and the plain steps where it
takes the flash attention, ``--compile``
``torch.compile(ours)``,
``--timm`` timm's DaViT of the same arch (its own random weights: timing, and memory with
``--memory``, as for ``--plain-kernels``), ``--profile``
the self time of the costliest operators of one run of each (``{mode}_profile_{impl}_ms``).
``new_shape`` mode times, for each size in turn (each new to the process), the first training step
(forward + backward) and repeat steps, and reports the median extra cost of a first call; each
implementation runs in a fresh process of its own (the reference and timm have the same
convolutions, and cuDNN and oneDNN reuse per-shape plans within a process); with ``--profile``,
the costliest operators by CPU time (where per-shape planning and compiling run) of one more
first call, at a size new to the process that is not timed (``new_shape_profile_{impl}_ms``).

Config mode (``--config``): the whole detector or segmentor of a config (random init), timing a
training step (forward with losses, backward, optimizer step) and an inference forward on random
images of the given size, with the config's own data preprocessing skipped; ``*_first_s`` is the
first call at each size. ``test`` mode times evaluation as tools/test.py runs it (``--tta``
too) on the first ``--images`` images of the config's test set, each at its own size, without the
data loading and the metric (``test_s_per_image``; the first batch apart, ``test_first_s``).
As under the runner, the config's ``env_cfg.cudnn_benchmark`` turns cuDNN autotuning on (rows
record ``cudnn_benchmark``).
configs/benchmark/ holds the paper configs with mmdet's/mmseg's Swin-T in DaViT-T's place, the
baseline to compare against.

``--json`` is rewritten (atomically) each time a row gains numbers, with ``"complete": false``
until the run ends: a run stopped at a time limit keeps what it had measured.

Benchmarks are measurements, never tests: run them on a quiet machine and report the command.
"""
import argparse
import importlib.util
import json
import os
import os.path as osp
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
import torch  # noqa: E402

from davit_mm import ops  # noqa: E402
from davit_mm.checkpoint import convert_state_dict  # noqa: E402
from davit_mm.cli import cfg_options_action, check_device, check_output_path  # noqa: E402
from davit_mm.fileio import atomic_file  # noqa: E402
from davit_mm.models import DaViT  # noqa: E402
from davit_mm.models.reference import ReferenceDaViT  # noqa: E402

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def parse_size(text: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'size {text!r}: expected HxW, e.g. 800x1216')
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f'size {text!r}: both sides must be positive')
    return h, w


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', help='DaViT arch name (backbone mode; default tiny)')
    parser.add_argument('--config', help='benchmark this config\'s whole model instead')
    parser.add_argument('--sizes', type=parse_size, nargs='+', default=[(800, 1216)])
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='fp32',
                        help='fp16/bf16 run under autocast')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--modes', nargs='+', choices=('forward', 'train', 'new_shape', 'test'),
                        default=['forward', 'train'],
                        help='new_shape (backbone mode): the one-off cost of each new input size; '
                             'test (config mode): evaluation on the config\'s test set')
    parser.add_argument('--images', type=int, default=50,
                        help='test mode: how many test images to time')
    parser.add_argument('--tta', action='store_true',
                        help='test mode: with the config\'s test-time augmentation (as tools/test.py)')
    parser.add_argument('--cfg-options', nargs='+', action=cfg_options_action(),
                        help='config mode: override config settings, as tools/train.py does')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--memory', action='store_true',
                        help='also measure the peak memory of each mode (a fresh process per number)')
    parser.add_argument('--with-cp', action='store_true', help='also measure ours with with_cp=True')
    parser.add_argument('--compile', action='store_true', help='also time torch.compile(ours)')
    parser.add_argument('--no-reference', action='store_true', help='time ours only')
    parser.add_argument('--timm', action='store_true',
                        help="also time timm's davit_<arch> (features_only; its own random init) "
                             "and, with --memory, measure its memory")
    parser.add_argument('--plain-kernels', action='store_true',
                        help="also time ours with davit_mm.ops' device-specific kernels off")
    parser.add_argument('--aten-depthwise', action='store_true',
                        help="CUDA: also time ours with the position encodings on PyTorch's "
                             "depth-wise kernel instead of the Triton kernel")
    parser.add_argument('--other-linears', action='store_true',
                        help="CPU: also time ours with the other choices of linear kernel "
                             "(at inference oneDNN's linear with AVX2 kernels, PyTorch's "
                             "matmul otherwise; in the training MLP's backward weight views "
                             "with AVX2 kernels, packed weights otherwise)")
    parser.add_argument('--other-training-linears', action='store_true',
                        help="CPU: also time ours with the other choice of linear kernel for "
                             "training (oneDNN's on Intel CPUs, PyTorch's matmul elsewhere; "
                             "inference unchanged)")
    parser.add_argument('--unpacked-weights', action='store_true',
                        help="CPU: also time ours with the inference MLP's and the training "
                             "forward's weights handed to oneDNN plain (reordered at every "
                             "call or block) instead of packed once per call")
    parser.add_argument('--pack-every-call', action='store_true',
                        help="CPU: also time ours with the weights of training linears that make "
                             "one call packed for every call, however few rows it multiplies "
                             "(davit_mm packs them from davit_mm.ops._PACK_MIN_ROWS rows)")
    parser.add_argument('--subnormal-grads', action='store_true',
                        help="CPU: also time ours with the gradient of the channel attention's "
                             "logits kept whole, subnormal entries included (davit_mm drops its "
                             "negligible entries: davit_mm.ops.drop_negligible_grad)")
    parser.add_argument('--other-half-attention', action='store_true',
                        help="CPU, fp16/bf16: also time ours with the other choice of window-"
                             "attention kernel (PyTorch's flash attention where davit_mm takes "
                             "the plain steps, and the other way round: "
                             "davit_mm.ops._NATIVE_HALF_DTYPES)")
    parser.add_argument('--accuracy', action='store_true',
                        help='also report the error of ours and of the reference against float64')
    parser.add_argument('--profile', action='store_true',
                        help='also record the costliest operators of one run of each '
                             '(torch.profiler; new_shape: of one more first call, by CPU time)')
    parser.add_argument('--threads', type=int, help='torch.set_num_threads (default: torch\'s)')
    parser.add_argument('--json', help='write the results to this file (rewritten as each '
                                       'number comes in; "complete": true once the run ends)')
    parser.add_argument('--worker', help=argparse.SUPPRESS)  # internal: a child's measurement
    args = parser.parse_args(argv)
    try:
        check_device(args.device)
        if args.json is not None:  # written as the numbers come in
            check_output_path('--json', args.json, folder=False)
    except ValueError as exc:
        parser.error(str(exc))
    if args.threads is not None and args.threads < 1:
        parser.error(f'--threads {args.threads}: accepted 1 or more')
    if args.aten_depthwise and not args.device.startswith('cuda'):
        parser.error(f'--aten-depthwise: the Triton kernel runs on CUDA only, not on '
                     f'--device {args.device}')
    for flag, given, what in (('--other-linears', args.other_linears, 'linear kernel'),
                              ('--other-training-linears', args.other_training_linears,
                               'linear kernel'),
                              ('--unpacked-weights', args.unpacked_weights, 'weight layout'),
                              ('--pack-every-call', args.pack_every_call, 'weight layout'),
                              ('--subnormal-grads', args.subnormal_grads, 'logit gradient'),
                              ('--other-half-attention', args.other_half_attention,
                               'attention kernel')):
        if given and args.device != 'cpu':
            parser.error(f'{flag}: the choice of {what} is the CPU\'s, not '
                         f'--device {args.device}\'s')
    if args.other_half_attention and args.dtype == 'fp32':
        parser.error('--other-half-attention: the choice is made in fp16/bf16 only, not with '
                     '--dtype fp32')
    if args.config is None:
        for name, given in (('--modes test', 'test' in args.modes), ('--tta', args.tta),
                            ('--cfg-options', bool(args.cfg_options))):
            if given:
                parser.error(f'{name} needs --config (it measures a whole detector or segmentor)')
        args.arch = args.arch or 'tiny'
    else:
        if 'new_shape' in args.modes:
            parser.error('--modes new_shape: backbone mode only (config mode reports *_first_s)')
        for name, given in (('--arch', args.arch is not None), ('--memory', args.memory),
                            ('--with-cp', args.with_cp), ('--compile', args.compile),
                            ('--no-reference', args.no_reference), ('--timm', args.timm),
                            ('--accuracy', args.accuracy), ('--profile', args.profile)):
            if given:
                parser.error(f'{name}: backbone mode only, not with --config (the config names '
                             f'the model, and config mode times it alone)')
        variants = ours_variants(args)
        if 'test' in args.modes and variants:
            flags = ' '.join('--' + impl[len('ours_'):].replace('_', '-') for impl in variants)
            parser.error(f'{flags}: with --config, kernel variants time the train and forward '
                         f'modes, not --modes test')
    if 'new_shape' in args.modes and len(set(args.sizes)) < len(args.sizes):
        repeated = sorted({'{}x{}'.format(*s) for s in args.sizes if args.sizes.count(s) > 1})
        parser.error(f'--modes new_shape: --sizes {" ".join(repeated)} given more than once; '
                     f'each size must be new to the process when it is timed')
    if args.tta and 'test' not in args.modes:
        parser.error('--tta: applies to --modes test only')
    if args.images < 2:
        parser.error(f'--images {args.images}: at least 2 (the first batch is timed apart)')
    for option, value, least in (('--batch', args.batch, 1), ('--repeats', args.repeats, 1),
                                 ('--warmup', args.warmup, 0)):
        if value < least:
            parser.error(f'{option} {value}: accepted {least} or more')
    if args.with_cp and not args.memory:
        parser.error('--with-cp: measures the memory of with_cp=True, which needs --memory')
    if args.config is None and set(args.modes) == {'new_shape'}:
        for name, given in (('--memory', args.memory), ('--accuracy', args.accuracy)):
            if given:
                parser.error(f'{name}: measured with --modes forward/train, not with --modes new_shape '
                             f'alone')
    if args.config is None and isinstance(args.arch, str):
        from davit_mm.models.davit import resolve_arch
        try:  # before the machine's line and --json are written
            resolve_arch(args.arch)
        except ValueError as exc:
            parser.error(f'--arch: {exc}')
    return args


class Results:
    """The rows measured so far, written to ``path`` (``--json``; None: kept in memory only)
    each time one is saved, with ``"complete": false`` until :meth:`finish`. A row is saved again
    as it gains numbers (the same dict object), so a run stopped at a time limit keeps every
    number measured before it: a size's forward times when its training times never came."""

    def __init__(self, path: Optional[str], machine: dict):
        self.path, self.machine, self.rows = path, machine, []
        self._write(complete=False)  # the machine, even if no number ever comes

    def save(self, row: dict) -> None:
        """Keep ``row`` (added the first time; the same dict again when it has grown)."""
        if not any(kept is row for kept in self.rows):
            self.rows.append(row)
        self._write(complete=False)

    def finish(self) -> None:
        """Mark the results complete: the run measured everything it was asked for."""
        self._write(complete=True)

    def _write(self, complete: bool) -> None:
        if self.path:
            text = json.dumps(dict(machine=self.machine, complete=complete, rows=self.rows),
                              indent=1)
            with atomic_file(self.path) as f:  # never a half-written file, even when killed
                f.write(text.encode())


# ------------------------------------------------------------------------------------ models
def build_pair(arch, device, with_cp=False) -> Tuple[DaViT, ReferenceDaViT]:
    """Ours and the reference with identical weights (DaViT's own random init, as a model starts
    training from; drop path 0 in ours)."""
    torch.manual_seed(0)
    ours = DaViT(arch, drop_path_rate=0.0, with_cp=with_cp)
    ours.init_weights()
    ref = ReferenceDaViT(arch)
    ref.load_state_dict(reference_state_dict(ours))
    return ours.to(device), ref.to(device)


def reference_state_dict(ours: DaViT) -> Dict[str, torch.Tensor]:
    """ours' weights under the official key names (the inverse of the official conversion)."""
    template = ReferenceDaViT(ours.arch).state_dict()
    official_to_ours = convert_state_dict(template, 'official').sources
    mine = ours.state_dict()
    return {official: mine[name] for name, official in official_to_ours.items()}


def accuracy_vs_fp64(ours, ref, x) -> Tuple[float, float]:
    """Largest deviation of ours and of the reference from the reference computed in float64."""
    import copy
    with torch.no_grad():
        truth = copy.deepcopy(ref).double()(x.double())
        errors = []
        for model in (ours, ref):
            errors.append(max((a.double() - b).abs().max().item() for a, b in zip(model(x), truth)))
    return errors[0], errors[1]


def synchronize(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def step_fn(model, x, mode: str, dtype: torch.dtype, device: str) -> Callable[[], object]:
    autocast = torch.autocast(device_type=device.split(':')[0], dtype=dtype,
                              enabled=dtype != torch.float32)

    def forward():
        model.eval()
        with torch.no_grad(), autocast:
            return model(x)

    def train():
        model.train()
        model.zero_grad(set_to_none=True)
        with autocast:
            outs = model(x)
        sum(o.float().sum() for o in outs).backward()

    return forward if mode == 'forward' else train


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def profile_ops(fn, device: str) -> Dict[str, float]:
    """Milliseconds of self time of the costliest operators in one call of ``fn`` (after one
    untimed call), plus ``'total'``: device time on CUDA (:func:`operator_times`; the top 12, as
    a GPU's time spreads over more operators), CPU time otherwise (the top 8)."""
    cuda = device.startswith('cuda')
    fn()
    return operator_times(profiled_call(fn, device, cuda), cuda, 12 if cuda else 8)


def profiled_call(fn, device: str, cuda_activity: bool):
    """The profile (``key_averages()``) of one call of ``fn``, with CUDA kernels recorded if
    ``cuda_activity``."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda_activity else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    return prof.key_averages()


def operator_times(events, cuda: bool, top: int) -> Dict[str, float]:
    """The ``top`` operators of a profile's ``key_averages()`` by self time in milliseconds, and
    ``'total'``.

    On CUDA the profile holds each kernel twice: as an event of its own (device type CUDA) and
    in the self device time of the operator that launched it. So operators (CPU events) are
    ranked by the device time of the kernels they launched, and the total sums the device
    events only, each kernel once (as torch's own profiler table does). Kernels launched outside
    any operator (davit_mm's Triton kernels are launched by Triton's runtime, not by a PyTorch
    operator) are in the total but in no operator's time: their sum is reported as
    ``'kernels outside operators'``, beside the operators.
    """
    from torch.autograd import DeviceType
    fields = ('self_device_time_total', 'self_cuda_time_total') if cuda else ('self_cpu_time_total',)

    def self_us(event) -> float:
        return next(getattr(event, name) for name in fields if hasattr(event, name))

    def on_device(event) -> bool:
        return cuda and getattr(event, 'device_type', DeviceType.CPU) != DeviceType.CPU

    operators = sorted((e for e in events if not on_device(e)), key=self_us, reverse=True)
    result = {event.key: self_us(event) / 1e3 for event in operators[:top]}
    counted = [e for e in events if on_device(e)] if cuda else operators
    total_us = sum(self_us(event) for event in counted)
    if cuda:
        outside_us = total_us - sum(self_us(event) for event in operators)
        if outside_us >= 1:  # a microsecond: more than the rounding of the profiler's times
            result['kernels outside operators'] = outside_us / 1e3
    result['total'] = total_us / 1e3
    return result


def round_orders(names: Sequence[str], repeats: int) -> List[List[str]]:
    """The order of each round: one run of every function, the list rotated by one each round,
    so that no function always runs right after the same other one. A run leaves the caches,
    the allocator's free lists and (with glibc's default malloc) the pages it gave back as the
    next run finds them, and a fixed order would charge that to the same function every
    round."""
    names = list(names)
    return [names[r % len(names):] + names[:r % len(names)] for r in range(repeats)]


def interleaved(fns: Dict[str, Callable], warmup: int, repeats: int, device: str) -> Dict[str, float]:
    """Median seconds per function, runs alternating between the functions in rotating order
    (:func:`round_orders`)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for order in round_orders(fns, repeats):
        for name in order:
            times[name].append(timed(fns[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


# ------------------------------------------------------------------------------------ memory
def _proc_status_bytes(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f'/proc/self/status has no {field}')


def _reset_peak_resident() -> None:
    # VmHWM (peak resident set) belongs to this address space; '5' resets it (Linux >= 4.0).
    # ru_maxrss is no use here: Linux carries it over from the parent across exec.
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass  # then the peak also covers building the model, which is small against activations


def held_bytes(model, x) -> int:
    """Bytes of the tensors a step uses that are made before it: parameters, buffers, input."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), x])


def _tensor_peak_bytes(fn, held: int) -> int:
    """Peak bytes of tensors alive while ``fn`` runs twice on the CPU: ``held`` (what
    :func:`held_bytes` counts), plus the most the CPU allocator held at once of what it allocated
    during the steps. The profiler's allocation events carry that running total; its count
    starts when profiling does."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == 'cpu':
            events.append((node.start_time_ns, node.extra_fields))
    if not events:
        raise RuntimeError('the profiler recorded no CPU allocation during the steps')
    first = min(events, key=lambda event: event[0])[1]
    before = first.total_allocated - first.alloc_size  # (a free's alloc_size is negative)
    return held + max(fields.total_allocated for _, fields in events) - before


def faulted_bytes(fn: Callable, calls: int = 1) -> float:
    """Bytes ``fn`` touches for the first time in this process's address space (its minor page
    faults times the base page size), per call over ``calls`` calls. Where transparent huge
    pages back the memory (``always`` in /sys/kernel/mm/transparent_hugepage/enabled), one
    fault maps up to 2 MiB and this counts less than was touched."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return faults * resource.getpagesize() / calls


# Steps whose faults memory_worker averages. How much of a step's memory glibc hands back and
# maps again depends on its heap's state, which differs from step to step (DaViT-T training at
# 800 x 1216 with AVX-512 kernels, steps 3 to 8 of one Zen 4 process: 27 to 596 MB per step for
# davit_mm, 350 to 1766 MB for the reference).
FAULT_STEPS = 5


def memory_worker(cfg: dict) -> dict:
    """Peak memory (bytes) of one implementation's steps and, on the CPU, the bytes a step
    faults in (runs in a child process)."""
    device = cfg['device']
    torch.manual_seed(0)  # weights do not change memory: build only the measured model
    if cfg['impl'] == 'reference':
        model = ReferenceDaViT(cfg['arch'])
    elif cfg['impl'] == 'timm':
        model = timm_model(cfg['arch'], device)
    else:
        model = DaViT(cfg['arch'], drop_path_rate=0.0, with_cp=cfg['impl'] == 'ours_cp')
    model.to(device)
    x = torch.randn(cfg['batch'], 3, *cfg['size'], device=device)
    fn = with_kernels(cfg['impl'], step_fn(model, x, cfg['mode'], DTYPES[cfg['dtype']], device))
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        fn()  # (each training step sets the gradients to None first: the peak of one step)
        return dict(peak_bytes=torch.cuda.max_memory_allocated() - base)
    # The resident set first: growth of its peak (VmHWM) over what model and input hold. It also
    # counts what the C allocator keeps after frees, so it is larger than the tensors' peak.
    base = _proc_status_bytes('VmRSS')
    _reset_peak_resident()
    fn()
    fn()
    rss = _proc_status_bytes('VmHWM') - base
    faulted = faulted_bytes(fn, calls=FAULT_STEPS)
    return dict(peak_bytes=_tensor_peak_bytes(fn, held_bytes(model, x)), rss_bytes=rss,
                faulted_bytes=faulted)


def measure_memory(impl: str, mode: str, args, size) -> dict:
    return in_fresh_process('memory', impl, args, mode=mode, size=list(size))


def in_fresh_process(kind: str, impl: str, args, **spec):
    """Run the ``kind`` worker for implementation ``impl`` in a child process; its result."""
    spec = json.dumps(dict(kind=kind, impl=impl, arch=args.arch, device=args.device,
                           batch=args.batch, dtype=args.dtype, threads=torch.get_num_threads(),
                           **spec))
    result = subprocess.run([sys.executable, osp.abspath(__file__), '--worker', spec],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f'{kind} worker for {impl} failed:\n{result.stderr[-2000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def worker(spec: str) -> None:
    """A child process's one measurement: print its result as JSON."""
    cfg = json.loads(spec)
    torch.set_num_threads(cfg['threads'])
    print(json.dumps(WORKERS[cfg['kind']](cfg)), flush=True)
    # Nothing to clean up, and the result is out: leave without the interpreter's teardown, where
    # a C extension's fault (torch 2.13's profiler once left None's reference count short) would
    # only turn a finished measurement into a failed one.
    os._exit(0)


# ----------------------------------------------------------------------------------- modes
def timm_model(arch: str, device: str):
    """timm's DaViT of the same arch as a multi-scale feature extractor (timing only)."""
    import timm
    return timm.create_model(f'davit_{arch}', features_only=True, pretrained=False).to(device)


def plain_kernels(fn: Callable) -> Callable:
    """``fn`` run with davit_mm.ops' device-specific kernels switched off."""
    def run():
        with ops.plain_kernels():
            return fn()
    return run


def _with_ops_attributes(fn: Callable, **values) -> Callable:
    """``fn`` run with each ``davit_mm.ops.<name>`` set to ``values[name]``, and put back after."""
    def run():
        saved = {name: getattr(ops, name) for name in values}
        for name, value in values.items():
            setattr(ops, name, value)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                setattr(ops, name, value)
    return run


def aten_depthwise(fn: Callable) -> Callable:
    """``fn`` run as on a CUDA machine without Triton: the position encodings take PyTorch's
    depth-wise kernel."""
    return _with_ops_attributes(fn, _triton_depthwise=lambda: None)


def other_linears(fn: Callable) -> Callable:
    """``fn`` run with the other choices of linear kernel than torch's instruction set makes: at
    inference oneDNN's linear with AVX2 kernels, PyTorch's matmul with AVX-512 kernels
    (:data:`davit_mm.ops._AVX2_INFERENCE_MATMUL`); in the training MLP's backward, oneDNN's
    linears with transposed weight views with AVX2 kernels, with packed ones with AVX-512
    kernels (:data:`davit_mm.ops._PACK_MLP_BACKWARD_WEIGHTS`)."""
    return _with_ops_attributes(
        fn, _AVX2_INFERENCE_MATMUL=not ops._AVX2_INFERENCE_MATMUL,
        _PACK_MLP_BACKWARD_WEIGHTS=not ops._PACK_MLP_BACKWARD_WEIGHTS)


def other_training_linears(fn: Callable) -> Callable:
    """``fn`` run with the other choice of linear kernel for CPU training than davit_mm makes on
    this CPU: oneDNN's where it takes PyTorch's matmul (Intel CPUs), and the other way round
    (:data:`davit_mm.ops._ONEDNN_TRAINING`; inference is unchanged)."""
    return _with_ops_attributes(fn, _ONEDNN_TRAINING=not ops._ONEDNN_TRAINING)


def unpacked_weights(fn: Callable) -> Callable:
    """``fn`` run with the weights davit_mm packs for oneDNN once per call handed to it plain,
    to be reordered at every call or block: the inference MLP's and the training forward's
    (:data:`davit_mm.ops._PACK_MLP_WEIGHTS` and :data:`davit_mm.ops._PACK_FORWARD_WEIGHTS`
    off)."""
    return _with_ops_attributes(fn, _PACK_MLP_WEIGHTS=False, _PACK_FORWARD_WEIGHTS=False)


def pack_every_call(fn: Callable) -> Callable:
    """``fn`` run with the weights of oneDNN's training linears that make one call packed for it
    however few rows it multiplies (:data:`davit_mm.ops._PACK_MIN_ROWS` 0)."""
    return _with_ops_attributes(fn, _PACK_MIN_ROWS=0)


def subnormal_grads(fn: Callable) -> Callable:
    """``fn`` run with the channel attention's logit gradients kept whole instead of losing their
    negligible and subnormal entries (:data:`davit_mm.ops._DROP_NEGLIGIBLE_GRADS` off)."""
    return _with_ops_attributes(fn, _DROP_NEGLIGIBLE_GRADS=False)


def other_half_attention(fn: Callable) -> Callable:
    """``fn`` run with the other choice of CPU attention kernel in half precision than davit_mm
    makes: PyTorch's flash attention where it takes the plain steps, and the other way round
    (:data:`davit_mm.ops._PLAIN_HALF_ATTENTION` off)."""
    return _with_ops_attributes(fn, _PLAIN_HALF_ATTENTION=False)


# ours with some of davit_mm.ops' kernels replaced, by implementation name: ``ours_`` and the
# name of the flag that asks for it (``--plain-kernels``: ``ours_plain_kernels``)
KERNEL_VARIANTS = {'ours_plain_kernels': plain_kernels, 'ours_aten_depthwise': aten_depthwise,
                   'ours_other_linears': other_linears,
                   'ours_other_training_linears': other_training_linears,
                   'ours_unpacked_weights': unpacked_weights,
                   'ours_pack_every_call': pack_every_call,
                   'ours_subnormal_grads': subnormal_grads,
                   'ours_other_half_attention': other_half_attention}


def with_kernels(impl: str, fn: Callable) -> Callable:
    """``fn`` with the kernels implementation ``impl`` names (unchanged for the others)."""
    return KERNEL_VARIANTS[impl](fn) if impl in KERNEL_VARIANTS else fn


def ours_variants(args) -> List[str]:
    """The :data:`KERNEL_VARIANTS` whose flags are given, in that table's order."""
    return [impl for impl in KERNEL_VARIANTS if getattr(args, impl[len('ours_'):])]


def bench_new_shapes(args, results: Results) -> None:
    """First call minus repeat call of a training step (forward + backward) at each size, every
    size new to the process: what cuDNN-style per-shape planning costs. Each implementation runs
    in a fresh process of its own: they share convolution shapes, and cuDNN and oneDNN keep what
    they build per shape for the whole process. The rows are saved as each implementation's
    process ends (ours first)."""
    impls = ['ours'] + ([] if args.no_reference else ['reference']) + (
        ['timm'] if args.timm else []) + ours_variants(args)
    rows = [dict(arch=args.arch, size=f'{h}x{w}', batch=args.batch, dtype=args.dtype,
                 device=args.device) for h, w in args.sizes]
    summary = dict(arch=args.arch, size='median over sizes', batch=args.batch, dtype=args.dtype,
                   device=args.device)
    if args.profile:
        summary['new_shape_profile_size'] = '{}x{}'.format(*profiled_new_size(args.sizes))
    for impl in impls:
        result = in_fresh_process('new_shape', impl, args, sizes=[list(s) for s in args.sizes],
                                  repeats=args.repeats, profile=args.profile)
        for row, (first, repeat) in zip(rows, result['times']):
            row[f'new_shape_first_{impl}_s'], row[f'new_shape_repeat_{impl}_s'] = first, repeat
            results.save(row)
        summary[f'new_shape_extra_{impl}_ms'] = 1e3 * statistics.median(
            first - repeat for first, repeat in result['times'])
        if args.profile:
            summary[f'new_shape_profile_{impl}_ms'] = result['profile']
        results.save(summary)
        print(f'new_shape: {impl} done', flush=True)
    for row in rows + [summary]:
        print_row(row)


def profiled_new_size(sizes: Sequence[Sequence[int]]) -> Tuple[int, int]:
    """A size none of ``sizes`` is (32 more than the largest height and width; multiples of 32
    stay so), whose first call ``--profile`` records."""
    return max(h for h, _ in sizes) + 32, max(w for _, w in sizes) + 32


def warmup_size(sizes: Sequence[Sequence[int]]) -> Tuple[int, int]:
    """The size of the untimed first step that takes the process's one-off start-up costs:
    224 x 224, or the next square multiple of 32 that neither ``sizes`` nor
    :func:`profiled_new_size` is."""
    taken = {tuple(s) for s in sizes} | {profiled_new_size(sizes)}
    side = 224
    while (side, side) in taken:
        side += 32
    return side, side


def new_shape_worker(cfg: dict) -> dict:
    """``times``: (first, median repeat) seconds of one implementation's training step at each
    size, after one step at :func:`warmup_size` (one-off start-up costs); with ``profile``, the
    costliest operators by CPU time of a first call at :func:`profiled_new_size`."""
    device, dtype, impl = cfg['device'], DTYPES[cfg['dtype']], cfg['impl']
    if impl == 'timm':
        model = timm_model(cfg['arch'], device)
    else:
        ours, ref = build_pair(cfg['arch'], device)
        model = ref if impl == 'reference' else ours

    def step(size):
        x = torch.randn(cfg['batch'], 3, *size, device=device)
        return with_kernels(impl, step_fn(model, x, 'train', dtype, device))

    step(warmup_size(cfg['sizes']))()
    times = []
    for size in cfg['sizes']:
        fn = step(size)
        first = timed(fn, device)
        times.append((first, statistics.median(timed(fn, device)
                                               for _ in range(max(2, cfg['repeats'])))))
    result = dict(times=times)
    if cfg.get('profile'):
        first_call = profiled_call(step(profiled_new_size(cfg['sizes'])), device,
                                   cuda_activity=False)
        result['profile'] = operator_times(first_call, cuda=False, top=12)
    return result


WORKERS = {'memory': memory_worker, 'new_shape': new_shape_worker}


def bench_backbone(args, results: Results) -> None:
    dtype = DTYPES[args.dtype]
    if 'new_shape' in args.modes:
        bench_new_shapes(args, results)
        args.modes = [m for m in args.modes if m != 'new_shape']
        if not args.modes:
            return
    timm_net = timm_model(args.arch, args.device) if args.timm else None
    for size in args.sizes:
        ours, ref = build_pair(args.arch, args.device)
        x = torch.randn(args.batch, 3, *size, device=args.device)
        row = dict(arch=args.arch, size=f'{size[0]}x{size[1]}', batch=args.batch, dtype=args.dtype,
                   device=args.device, threads=torch.get_num_threads())
        with torch.no_grad():
            ours.eval()
            ref.eval()
            row['max_abs_diff'] = max((a.float() - b.float()).abs().max().item()
                                      for a, b in zip(ours(x), ref(x)))
        if args.accuracy:
            row['ours_err_vs_fp64'], row['reference_err_vs_fp64'] = accuracy_vs_fp64(ours, ref, x)
        results.save(row)
        compiled = torch.compile(ours) if args.compile else None
        for mode in args.modes:
            fns = {'ours': step_fn(ours, x, mode, dtype, args.device)}
            if not args.no_reference:
                fns['reference'] = step_fn(ref, x, mode, dtype, args.device)
            if compiled is not None:
                fns['ours_compiled'] = step_fn(compiled, x, mode, dtype, args.device)
            for name in ours_variants(args):
                fns[name] = with_kernels(name, step_fn(ours, x, mode, dtype, args.device))
            if timm_net is not None:
                fns['timm'] = step_fn(timm_net, x, mode, dtype, args.device)
            medians = interleaved(fns, args.warmup, args.repeats, args.device)
            for name, seconds in medians.items():
                row[f'{mode}_{name}_s'] = seconds
            if args.profile:
                for name, fn in fns.items():
                    row[f'{mode}_profile_{name}_ms'] = profile_ops(fn, args.device)
            if 'reference' in medians:
                for name in medians:
                    if name != 'reference':
                        suffix = '' if name == 'ours' else name[len('ours'):] if name.startswith(
                            'ours') else f'_{name}'
                        row[f'{mode}_ratio{suffix}'] = medians[name] / medians['reference']
            results.save(row)
        if args.memory:
            for mode in args.modes:
                impls = ['ours'] + ([] if args.no_reference else ['reference'])
                impls += ['ours_cp'] if args.with_cp and mode == 'train' else []
                impls += ours_variants(args)
                impls += ['timm'] if args.timm else []
                for impl in impls:
                    measured = measure_memory(impl, mode, args, size)
                    row[f'{mode}_peak_mb_{impl}'] = measured['peak_bytes'] / 2**20
                    for key in ('rss', 'faulted'):
                        if f'{key}_bytes' in measured:
                            row[f'{mode}_{key}_mb_{impl}'] = measured[f'{key}_bytes'] / 2**20
                    results.save(row)
                if f'{mode}_peak_mb_reference' in row:
                    row[f'{mode}_memory_ratio'] = (row[f'{mode}_peak_mb_ours'] /
                                                   row[f'{mode}_peak_mb_reference'])
            if 'train_peak_mb_ours_cp' in row:
                row['with_cp_memory_ratio'] = row['train_peak_mb_ours_cp'] / row['train_peak_mb_ours']
        results.save(row)
        print_row(row)


def bench_config(args, results: Results) -> None:
    from mmengine.registry import init_default_scope

    from davit_mm.cli import adapt_config_to_machine, library_of, load_config
    cfg = load_config(args.config, args.cfg_options)
    library = library_of(cfg)
    adapt_config_to_machine(cfg)
    init_default_scope(library)
    cfg.model.backbone.init_cfg = None  # random weights: timing only
    # As the runner sets it up (Runner.setup_env): cuDNN autotuning, which mmseg's default runtime
    # turns on, decides what a new input shape costs the convolutions of mmdet's/mmseg's necks and
    # heads on a GPU.
    if cfg.get('env_cfg', {}).get('cudnn_benchmark'):
        torch.backends.cudnn.benchmark = True
    if 'test' in args.modes:  # before the other modes spend their minutes
        per_batch = cfg.test_dataloader.get('batch_size', 1)
        if args.images <= per_batch:
            raise ValueError(f'--images {args.images}: test mode times at least 2 batches and '
                             f'{osp.basename(args.config)} has test_dataloader.batch_size='
                             f'{per_batch}: give more than {per_batch}')
    if set(args.modes) - {'test'}:
        bench_config_steps(args, cfg, library, results)
    if 'test' in args.modes:
        bench_config_test(args, cfg, library, results)


def build_config_model(cfg):
    """The config's model (random init, seeded), without mmengine's line per initialised
    parameter."""
    import logging

    from mmengine.logging import MMLogger

    from davit_mm.cli import build_model
    torch.manual_seed(0)
    model = build_model(cfg)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return model


def bench_config_steps(args, cfg, library: str, results: Results) -> None:
    """``train`` and ``forward`` at each of ``--sizes``, on random images."""
    from mmengine.optim import build_optim_wrapper
    model = build_config_model(cfg).to(args.device)
    optim_cfg = dict(cfg.optim_wrapper)
    if args.dtype != 'fp32':
        optim_cfg.update(type='AmpOptimWrapper', dtype=args.dtype)
    optim = build_optim_wrapper(model, optim_cfg)
    for size in args.sizes:
        inputs, samples = fake_batch(library, args.batch, size, args.device)
        if args.device.startswith('cuda'):
            torch.cuda.reset_peak_memory_stats()  # each row's peak_mb: the peak at its own size

        def train():
            model.train()
            with optim.optim_context(model):
                losses = model(inputs, samples, mode='loss')
            loss, _ = model.parse_losses(losses)
            optim.update_params(loss)

        def forward():
            model.eval()
            with torch.no_grad(), optim.optim_context(model):
                model(inputs, samples, mode='tensor')

        fns = {'train': train, 'forward': forward}
        modes = [m for m in args.modes if m in fns]
        row = config_row(args, size=f'{size[0]}x{size[1]}', batch=args.batch)
        for mode in modes:  # the first call at a size new to the process
            row[f'{mode}_first_s'] = timed(fns[mode], args.device)
        results.save(row)
        steps = {m: fns[m] for m in modes}
        for variant in ours_variants(args):  # the same model, kernels swapped for the call
            steps.update({f'{m}_{variant}': with_kernels(variant, fns[m]) for m in modes})
        medians = interleaved(steps, args.warmup, args.repeats, args.device)
        for name, seconds in medians.items():
            row[f'{name}_s'] = seconds
            if name in modes:
                row[f'{name}_images_per_s'] = args.batch / seconds
        if args.device.startswith('cuda'):
            row['peak_mb'] = torch.cuda.max_memory_allocated() / 2**20
        results.save(row)
        print_row(row)


def bench_config_test(args, cfg, library: str, results: Results) -> None:
    """``test``: evaluation as ``tools/test.py`` runs it (``--tta`` too), without the data loading
    and the metric: the first ``--images`` images of the config's test set go through its test
    pipeline first, then ``model.test_step`` (preprocessing, inference, post-processing) is timed
    batch by batch. Each image keeps its own size, as in COCO/ADE20K evaluation, so new input
    shapes are paid for as they come; the first batch (one-off start-up) is reported apart."""
    from mmengine.runner import Runner

    from davit_mm.checks import preflight
    from davit_mm.cli import enable_tta
    cfg.pop('test_evaluator', None)  # no metric here: its files need not exist
    preflight(cfg, ('test', ))
    if args.tta:
        enable_tta(cfg, library)
    loader = Runner.build_dataloader(cfg.test_dataloader)
    batches, counts = [], []
    for batch in loader:
        samples = batch['data_samples']  # under TTA: one list of samples per augmentation
        counts.append(len(samples[0] if isinstance(samples[0], (list, tuple)) else samples))
        batches.append(batch)
        if sum(counts) >= args.images:
            break
    if len(batches) < 2:
        raise ValueError(f'--images {args.images}: the test set gives {sum(counts)} image(s) in '
                         f'{len(batches)} batch(es); test mode times at least 2 batches')
    model = build_config_model(cfg).to(args.device).eval()
    shapes = set()
    backbone = model.module.backbone if args.tta else model.backbone
    backbone.register_forward_pre_hook(lambda module, inputs: shapes.add(tuple(inputs[0].shape)))
    autocast = torch.autocast(device_type=args.device.split(':')[0], dtype=DTYPES[args.dtype],
                              enabled=args.dtype != 'fp32')

    def test_step(batch):
        with torch.no_grad(), autocast:
            model.test_step(batch)

    first = timed(lambda: test_step(batches[0]), args.device)
    shapes.clear()
    seconds = [timed(lambda: test_step(batch), args.device) for batch in batches[1:]]
    row = config_row(args, tta=args.tta, test_images=sum(counts[1:]),
                     test_backbone_shapes=len(shapes), test_first_s=first,
                     test_s_per_image=sum(seconds) / sum(counts[1:]),
                     test_median_batch_s=statistics.median(seconds))
    if args.device.startswith('cuda'):
        row['peak_mb'] = torch.cuda.max_memory_allocated() / 2**20
    results.save(row)
    print_row(row)


def config_row(args, **fields) -> dict:
    """A result row of config mode: what ran, how, then ``fields``."""
    return dict(config=osp.basename(args.config), **fields, dtype=args.dtype, device=args.device,
                cudnn_benchmark=torch.backends.cudnn.benchmark)


def fake_batch(library: str, batch: int, size, device):
    """Normalised random images and one random object / label map each."""
    h, w = size
    inputs = torch.randn(batch, 3, h, w, device=device)
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                scale_factor=(1., 1.))
    if library == 'mmdet':
        from mmdet.structures import DetDataSample
        from mmdet.structures.mask import BitmapMasks
        from mmengine.structures import InstanceData
        samples = []
        for _ in range(batch):
            gt = InstanceData()
            gt.bboxes = torch.tensor([[w * .2, h * .2, w * .6, h * .7]], device=device)
            gt.labels = torch.tensor([1], device=device)
            mask = torch.zeros(1, h, w, dtype=torch.uint8)
            mask[:, int(h * .2):int(h * .7), int(w * .2):int(w * .6)] = 1
            gt.masks = BitmapMasks(mask.numpy(), h, w)
            samples.append(DetDataSample(metainfo=meta, gt_instances=gt))
        return inputs, samples
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = [SegDataSample(metainfo=meta, gt_sem_seg=PixelData(
        data=torch.randint(0, 150, (1, h, w), device=device))) for _ in range(batch)]
    return inputs, samples


def print_row(row: dict) -> None:
    parts = []
    for key, value in row.items():
        if isinstance(value, dict):  # --profile: operator -> ms
            value = '{' + ', '.join(f'{op}: {ms:.1f}' for op, ms in value.items()) + '}'
        parts.append(f'{key}={value:.4g}' if isinstance(value, float) else f'{key}={value}')
    print('  '.join(parts), flush=True)



# Environment variables that cap the instruction set torch's CPU libraries use: with all three
# set to AVX2, an AVX-512 machine runs the kernels an AVX2-only machine would (docs/benchmark.md).
CPU_ISA_CAPS = ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'MKL_ENABLE_INSTRUCTIONS')


def allocator() -> str:
    """How this process allocates memory, which moves CPU times (docs/benchmark.md, "The memory
    allocator moves the CPU ratios"): the libraries in ``LD_PRELOAD`` (jemalloc, tcmalloc) or glibc's malloc, with any
    ``MALLOC_*`` tunables set. glibc hands large freed blocks back to the OS by default, so each
    forward faults in fresh, zeroed pages again; the others keep and reuse them."""
    preload = os.environ.get('LD_PRELOAD', '').replace(':', ' ').split()
    name = '+'.join(osp.basename(lib) for lib in preload) or 'glibc'
    tunables = sorted(f'{key}={value}' for key, value in os.environ.items()
                      if key.startswith('MALLOC_'))
    return ' '.join([name] + tunables)


def cpu_model() -> str:
    """The CPU's name with its family and model numbers (the name alone, e.g. 'AMD EPYC' on
    cloud VMs, does not tell CPU generations apart, and speed ratios differ between them)."""
    fields = ops.cpuinfo_fields()
    name = fields.get('model name', 'unknown')
    if 'cpu family' in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def depthwise_kernels(device: str) -> Dict[str, str]:
    """Which kernel computes the position encodings on this GPU, in fp32 and under fp16 autocast:
    ``'triton'`` (davit_mm's kernels, which passed their self-check here) or ``'pytorch'``
    (PyTorch's depth-wise kernel: no Triton, a GPU Triton does not build for, or a failed
    self-check, which davit_mm.ops warns about with the reason)."""
    if ops._triton_depthwise() is None:
        return {name: 'pytorch (no Triton)' for name in ('fp32', 'fp16')}
    probe = torch.empty(0, device=device)
    return {name: 'triton' if ops._triton_ready(probe, DTYPES[name]) else 'pytorch'
            for name in ('fp32', 'fp16')}


def machine(device: str) -> dict:
    """What the numbers were measured on, printed first and written into ``--json``."""
    info = dict(torch=torch.__version__, device=device, threads=torch.get_num_threads())
    if device.startswith('cuda'):
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    triton='.'.join(map(str, ops._triton_version() or ('none',))),
                    depthwise=depthwise_kernels(device))
    else:
        info['cpu'] = cpu_model()
        info['cpu_capability'] = torch.backends.cpu.get_cpu_capability()
        info.update({name: os.environ[name] for name in CPU_ISA_CAPS if name in os.environ})
        info['allocator'] = allocator()
    return info


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    if args.timm and importlib.util.find_spec('timm') is None:  # before any measuring
        raise ValueError('--timm needs timm: pip install timm')
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(args.device)
    print(', '.join(f'{key} {value}' for key, value in info.items()), flush=True)
    results = Results(args.json, info)
    (bench_config if args.config else bench_backbone)(args, results)
    results.finish()


if __name__ == '__main__':
    from davit_mm.cli import run_tool
    sys.exit(run_tool(main))
