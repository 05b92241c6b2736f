"""Plot how forward time and peak memory grow with the number of pixels, from benchmark.py's JSON.

    python tools/analysis/benchmark.py --sizes 256x256 512x512 ... 1600x1600 --modes forward \
        --memory --json scaling.json
    python tools/analysis/plot_scaling.py scaling.json --out docs/benchmark_scaling.png

Draws ours and the reference against megapixels with least-squares lines through the origin's
neighbourhood (a straight line = cost linear in pixels), and prints each fit's R^2.
"""
import argparse
import json
import math
import os.path as osp
import re
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from davit_mm.cli import check_figure_path, run_tool  # noqa: E402

SERIES = (('ours', 'davit_mm', '#1f77b4'), ('reference', 'reference (official code)', '#d62728'))
PANELS = (('forward_{}_s', 'forward time (s)'), ('forward_peak_mb_{}', 'forward peak memory (MB)'))
# benchmark.py --json: {'machine': ..., 'complete': ..., 'rows': [row, ...]}; older files: the list
EXPECTED = ("benchmark.py --json's {'machine': ..., 'rows': [...]}, or a list of rows, one dict per "
            "size with 'size': 'HxW' and forward timings (forward_ours_s, ...)")


def _a(value) -> str:
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def read_rows(path: str) -> list:
    """The rows of benchmark.py's JSON at ``path``, checked for what :func:`plot` reads: a list
    of dicts, at least 3 sizes (``'size': 'HxW'``), and for each series drawn (``forward_ours_s``,
    ``forward_peak_mb_reference``, ...) a number in every row.

    Raises:
        ValueError: naming ``path``, what is missing or wrong, and what is expected.
    """
    where = f'json={path!r}'
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f'{where} is not a JSON file ({exc}); expected {EXPECTED}') from None
    rows, what = data, 'it'
    if isinstance(data, dict):
        if 'rows' not in data:
            raise ValueError(f"{where} has no 'rows' (its keys: {sorted(data)[:8]}); expected {EXPECTED}")
        rows, what = data['rows'], "its 'rows'"
    if not isinstance(rows, list):
        raise ValueError(f'{where}: {what} is {_a(rows)}, not a list of rows; expected {EXPECTED}')
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f'{where}: row {i} is {_a(row)}, not a dict; expected {EXPECTED}')
        if 'size' not in row:
            raise ValueError(f"{where}: row {i} has no 'size' (its keys: {sorted(row)[:8]}); "
                             f'expected {EXPECTED}')
    series = [key.format(impl) for key, _ in PANELS for impl, _, _ in SERIES]
    drawn = [key for key in series if any(key in row for row in rows)]
    if rows and not drawn:
        raise ValueError(f'{where} has no forward timings or memory to plot (none of {", ".join(series)}): '
                         f'measure them with tools/analysis/benchmark.py --modes forward [--memory]')
    for i, row in enumerate(rows):
        if not (isinstance(row['size'], str) and re.fullmatch(r'[1-9][0-9]*x[1-9][0-9]*', row['size'])):
            raise ValueError(f"{where}: row {i} has 'size': {row['size']!r}; expected 'HxW' (e.g. '512x512')")
        for key in drawn:
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                got = 'none' if key not in row else repr(value)
                raise ValueError(f"{where}: row {i} ({row['size']}) has {key}: {got}; expected a finite "
                                 f'number in every row (other rows have it)')
    sizes = sorted({row['size'] for row in rows})
    if len(sizes) < 3:
        raise ValueError(f'{where} has {len(rows)} rows of {len(sizes)} sizes {sizes}; a scaling plot needs '
                         f'at least 3 different sizes (tools/analysis/benchmark.py --sizes A B C ... --json)')
    return rows


def linear_fit(x: np.ndarray, y: np.ndarray):
    slope, intercept = np.polyfit(x, y, 1)
    predicted = slope * x + intercept
    r2 = 1 - ((y - predicted) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return slope, intercept, r2


def plot(rows, out: str) -> dict:
    megapixels = np.array([np.prod([int(v) for v in r['size'].split('x')]) / 1e6 for r in rows])
    smallest, largest = rows[int(megapixels.argmin())]['size'], rows[int(megapixels.argmax())]['size']
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    fits = {}
    for ax, (key, label) in zip(axes, PANELS):
        for impl, name, colour in SERIES:
            if key.format(impl) not in rows[0]:
                continue
            y = np.array([r[key.format(impl)] for r in rows])
            slope, intercept, r2 = linear_fit(megapixels, y)
            fits[key.format(impl)] = dict(slope=slope, intercept=intercept, r2=r2)
            ax.plot(megapixels, y, 'o', color=colour, label=f'{name}')
            grid = np.linspace(0, megapixels.max() * 1.05, 50)
            ax.plot(grid, slope * grid + intercept, '-', color=colour, alpha=0.5,
                    label=f'linear fit, R$^2$={r2:.4f}')
        ax.set_xlabel(f'megapixels (batch {rows[0].get("batch", 1)}; {smallest} .. {largest})')
        ax.set_ylabel(label)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"DaViT-{first.get('arch', '?')} backbone, {first.get('dtype', '?')}, "
                 f"{first.get('device', '?')}, {first.get('threads', '?')} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return fits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('json', help='benchmark.py --json output with several sizes')
    parser.add_argument('--out', default='benchmark_scaling.png')
    args = parser.parse_args(argv)
    if not osp.isfile(args.json):
        raise ValueError(f'json={args.json!r}: no such file')
    check_figure_path('--out', args.out)
    rows = read_rows(args.json)
    for name, fit in plot(rows, args.out).items():
        print(f"{name}: {fit['slope']:.4g} per megapixel + {fit['intercept']:.4g}, R^2 = {fit['r2']:.4f}")
    print(f'plot: {args.out}')


if __name__ == '__main__':
    sys.exit(run_tool(main))
