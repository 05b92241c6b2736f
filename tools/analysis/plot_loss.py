"""Plot the training losses mmengine logged for a run.

    python tools/analysis/plot_loss.py WORK_DIR [--out loss_curve.png] [--keys loss loss_cls ...]

Reads WORK_DIR/<timestamp>/vis_data/scalars.json (written by mmengine's LocalVisBackend during
tools/train.py) and draws every logged loss against the iteration. A run resumed in the same work
dir (``--resume``) continues the curve of the run it resumed; a run started afresh there starts
it anew.
"""
import argparse
import glob
import json
import os.path as osp
import sys

import matplotlib

matplotlib.use('Agg')  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from davit_mm.cli import check_figure_path, run_tool  # noqa: E402


def read_records(path: str):
    """The records of one ``scalars.json`` (a JSON object per line). An unfinished last line
    (no newline yet: a run writing it now, or killed while writing it) is left out, saying so.

    Raises:
        ValueError: naming the file and the line that is not a record (a file corrupt).
    """
    records = []
    try:
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    if not line.endswith('\n') and not f.read(1):
                        print(f'{path}: line {number} left out: unfinished (a run still writing it?)')
                        break
                    raise ValueError(f'{path!r} line {number}: not a JSON record ({exc.msg}: column '
                                     f'{exc.colno}): the file is cut off or corrupt; mmengine writes '
                                     f'one JSON object per line') from None
                if not isinstance(record, dict):
                    raise ValueError(f'{path!r} line {number}: {line.strip()[:40]!r} is not a JSON '
                                     f'object; mmengine writes one JSON object per line')
                records.append(record)
    except UnicodeDecodeError as exc:
        raise ValueError(f'{path!r}: not a text file ({exc.reason} at byte {exc.start}): corrupt?') from None
    return records


def read_scalars(work_dir: str):
    """The records of the runs in ``work_dir`` (one ``TIMESTAMP`` folder each, oldest first),
    joined where a run resumed the one before: its first training record, at a later iteration
    than the earlier run's first, replaces the earlier records from that iteration on (they were
    logged past the checkpoint it resumed from, and it did those iterations again). A run whose
    training records start where the earlier ones did started afresh: only its records are kept.
    Records without an iteration (validation metrics, a tools/test.py run) are kept as they come."""
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not files:
        raise ValueError(f'{work_dir!r} has no */vis_data/scalars.json: is it a tools/train.py work dir?')
    records, first_iter = [], None
    for path in files:
        run = read_records(path)
        start = next((r['iter'] for r in run if 'iter' in r), None)
        if start is not None:
            if first_iter is not None and start <= first_iter:
                records, first_iter = [], None  # started afresh
            records = [r for r in records if r.get('iter', -1) < start]
            if first_iter is None:
                first_iter = start
        records += run
    return records


def plot(work_dir: str, out: str, keys=None) -> str:
    records = [r for r in read_scalars(work_dir) if 'loss' in r]
    if not records:
        raise ValueError(f'{work_dir!r}: the log has no training losses yet')
    logged = sorted({k for r in records for k in r} - {'iter', 'step', 'epoch'})
    unknown = [k for k in keys or () if k not in logged]
    if unknown:
        raise ValueError(f'--keys {" ".join(unknown)}: not in the log of {work_dir!r}; logged: '
                         f'{", ".join(logged)}')
    keys = keys or [k for k in records[0] if k == 'loss' or 'loss' in k.split('.')[-1]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key in keys:
        points = [(r['iter'], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), label=key, linewidth=2.5 if key == 'loss' else 1.2)
    ax.set_xlabel('iteration')
    ax.set_ylabel('loss')
    ax.set_title(osp.basename(osp.normpath(work_dir)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('work_dir')
    parser.add_argument('--out', default='loss_curve.png')
    parser.add_argument('--keys', nargs='+', help='which logged values to draw (default: all losses)')
    args = parser.parse_args(argv)
    check_figure_path('--out', args.out)
    print(f'loss curve: {plot(args.work_dir, args.out, args.keys)}')


if __name__ == '__main__':
    sys.exit(run_tool(main))
