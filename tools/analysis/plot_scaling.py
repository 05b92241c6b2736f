"""Plot how forward time and peak memory grow with the number of pixels, from benchmark.py's JSON.

    python tools/analysis/benchmark.py --sizes 256x256 512x512 ... 1600x1600 --modes forward \
        --memory --json scaling.json
    python tools/analysis/plot_scaling.py scaling.json --out docs/benchmark_scaling.png

Draws ours and the reference against megapixels with least-squares lines through the origin's
neighbourhood (a straight line = cost linear in pixels), and prints each fit's R^2.
"""
import argparse
import json
import os.path as osp
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from davit_mm.cli import check_output_path, run_tool  # noqa: E402

SERIES = (('ours', 'davit_mm', '#1f77b4'), ('reference', 'reference (official code)', '#d62728'))


def linear_fit(x: np.ndarray, y: np.ndarray):
    slope, intercept = np.polyfit(x, y, 1)
    predicted = slope * x + intercept
    r2 = 1 - ((y - predicted) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return slope, intercept, r2


def plot(rows, out: str) -> dict:
    megapixels = np.array([np.prod([int(v) for v in r['size'].split('x')]) / 1e6 for r in rows])
    panels = (('forward_{}_s', 'forward time (s)'), ('forward_peak_mb_{}', 'forward peak memory (MB)'))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    fits = {}
    for ax, (key, label) in zip(axes, panels):
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
        ax.set_xlabel('megapixels (batch 1; 256$^2$ .. 1600$^2$)')
        ax.set_ylabel(label)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"DaViT-{first['arch']} backbone, {first['dtype']}, {first['device']}, "
                 f"{first['threads']} threads", fontsize=10)
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
    check_output_path('--out', args.out, folder=False)
    with open(args.json) as f:
        rows = json.load(f)  # a JSONDecodeError is a ValueError
    if isinstance(rows, dict):  # {'machine': ..., 'rows': [...]}; older files hold the list only
        rows = rows.get('rows', [])
    if not isinstance(rows, list) or len(rows) < 3:
        raise ValueError(f'json={args.json!r} has {len(rows)} sizes; a scaling plot needs at least 3 '
                         f'(tools/analysis/benchmark.py --sizes A B C ... --json)')
    for name, fit in plot(rows, args.out).items():
        print(f"{name}: {fit['slope']:.4g} per megapixel + {fit['intercept']:.4g}, R^2 = {fit['r2']:.4f}")
    print(f'plot: {args.out}')


if __name__ == '__main__':
    sys.exit(run_tool(main))
