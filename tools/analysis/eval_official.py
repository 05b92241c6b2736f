"""Evaluate the 15 detectors/segmentors released with the official DaViT code (github
dingmyu/davit) with davit_mm's configs, and write a table: published vs measured.

    python tools/analysis/eval_official.py --checkpoint-dir DIR [--gpus N] [--out FILE.md]
        [--work-dir DIR] [--only NAME ...] [--coco-root data/coco/]
        [--ade-root data/ade/ADEChallengeData2016] [--table ROWS.json] [--dry-run]

DIR holds the downloaded files under the names of the table below (``mask_rcnn_davit_t_1x.pth``,
``retinanet_davit_s_3x.pth``, ``upernet_davit_b_160k.pth``, ...; rename or symlink the downloads).
Each model runs through ``tools/test.py`` (``tools/dist_test.sh`` with ``--gpus N`` > 1), the
official files loading directly; UperNet models are evaluated single-scale and with ``--tta``
(the official ``--aug-test``). Missing files are listed in the table and skipped. ``--table``
replaces the built-in rows with a JSON list of rows of the same fields.
"""
import argparse
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)
from davit_mm.cli import check_output_path, library_of, read_config, run_tool  # noqa: E402

# The official README's numbers (box/mask mAP on COCO val2017, mIoU on ADE20K val).
_SIZES = {'t': ('', 'Tiny'), 's': ('small_', 'Small'), 'b': ('base_', 'Base')}
_PUBLISHED = {
    ('maskrcnn', '1x'): {'t': (45.0, 41.1), 's': (47.7, 42.9), 'b': (48.2, 43.3)},
    ('maskrcnn', '3x'): {'t': (47.4, 42.9), 's': (49.5, 44.3), 'b': (49.9, 44.6)},
    ('retinanet', '1x'): {'t': (44.0, ), 's': (46.0, ), 'b': (46.7, )},
    ('retinanet', '3x'): {'t': (46.5, ), 's': (48.2, ), 'b': (48.7, )},
    ('upernet', '160k'): {'t': (46.3, ), 's': (48.8, ), 'b': (49.4, )},
}
# metric printed by tools/test.py -> (table column, factor to percent)
METRICS = {'coco/bbox_mAP': ('box mAP', 100), 'coco/segm_mAP': ('mask mAP', 100), 'mIoU': ('mIoU', 1)}


def builtin_rows() -> List[dict]:
    rows = []
    for (model, schedule), by_size in _PUBLISHED.items():
        for size, published in by_size.items():
            prefix, size_name = _SIZES[size]
            if model == 'upernet':
                config = f'configs/upernet_davit_{prefix}512x512_160k_ade20k.py'
                file = f'upernet_davit_{size}_160k.pth'
                metrics = ['mIoU']
            else:
                config = f'configs/davit_{prefix}{model}_{schedule}_coco.py'
                file = f"{'mask_rcnn' if model == 'maskrcnn' else 'retinanet'}_davit_{size}_{schedule}.pth"
                metrics = ['coco/bbox_mAP', 'coco/segm_mAP'][:len(published)]
            rows.append(dict(name=f'{model}_{size}_{schedule}', model=model, size=size_name,
                             schedule=schedule, config=config, checkpoint=file,
                             published=dict(zip(metrics, published)), tta=model == 'upernet'))
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint-dir', required=True, help='folder of the downloaded checkpoints')
    parser.add_argument('--gpus', type=int, default=1, help='processes per evaluation (dist_test.sh if > 1)')
    parser.add_argument('--out', default='official_eval.md', help='markdown table to write')
    parser.add_argument('--work-dir', default='work_dirs/official_eval', help='where the runs log')
    parser.add_argument('--only', nargs='+', help='evaluate these rows only (names as in the table)')
    parser.add_argument('--coco-root', help="COCO folder (default: the configs' data/coco/)")
    parser.add_argument('--ade-root', help="ADEChallengeData2016 folder (default: the configs')")
    parser.add_argument('--table', help='JSON list of rows replacing the built-in ones')
    parser.add_argument('--dry-run', action='store_true',
                        help='print the commands and the table (which files are missing); run and write '
                             'nothing')
    return parser.parse_args(argv)


TABLE_ROW = ('{"name": "maskrcnn_t_1x", "config": "configs/davit_maskrcnn_1x_coco.py", "checkpoint": '
             '"mask_rcnn_davit_t_1x.pth", "published": {"coco/bbox_mAP": 45.0}}')


def _json_kind(value) -> str:
    """What ``value`` was in the JSON text: an object, a list, a string, ..."""
    kinds = ((bool, 'true/false'), (dict, 'an object'), (list, 'a list'), (str, 'a string'),
             ((int, float), 'a number'), (type(None), 'null'))
    return next(kind for types, kind in kinds if isinstance(value, types))


def read_table(path: str) -> List[dict]:
    """``--table``: a JSON list of rows as :func:`builtin_rows` makes them, each with a ``name``,
    ``config`` and ``checkpoint`` (strings) and ``published`` (metric name -> number).

    Raises:
        ValueError: ``--table PATH: ...`` naming what is wrong and what is accepted.
    """
    label = f'--table {path}'
    expected = f'a JSON list of rows such as [{TABLE_ROW}, ...]'
    if osp.isdir(path):
        raise ValueError(f'{label}: is a folder; expected a file holding {expected}')
    if not osp.isfile(path):
        raise ValueError(f'{label}: no such file')
    try:
        with open(path) as f:
            rows = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f'{label}: not a JSON file ({exc}); expected {expected}') from None
    except OSError as exc:
        raise ValueError(f'{label}: cannot be read: {exc.strerror}') from None
    if not isinstance(rows, list):
        raise ValueError(f'{label}: holds {_json_kind(rows)}, not a list of rows; expected {expected}')
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f'{label}: row {i} is {_json_kind(row)}, not an object; '
                             f'expected {expected}')
        missing = {'name', 'config', 'checkpoint', 'published'} - set(row)
        if missing:
            raise ValueError(f'{label}: row {i} lacks {sorted(missing)}; expected {expected}')
        for key in ('name', 'config', 'checkpoint'):
            if not isinstance(row[key], str) or not row[key]:
                raise ValueError(f'{label}: row {i} has {key}={row[key]!r}; expected a non-empty string')
        published = row['published']
        if not isinstance(published, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in published.values()):
            raise ValueError(f'{label}: row {i} ({row["name"]}) has published={published!r}; expected '
                             f'metric name -> published number, e.g. {{"coco/bbox_mAP": 45.0}} '
                             f'(metrics: {", ".join(METRICS)})')
        if not isinstance(row.get('tta', False), bool):  # "no" would have run it
            raise ValueError(f'{label}: row {i} ({row["name"]}) has tta={row["tta"]!r}; expected true or '
                             f'false')
        if not osp.isfile(config_path(row)):
            raise ValueError(f'{label}: row {i} ({row["name"]}) has config={row["config"]!r}: no such '
                             f'file (a path relative to the repository, or absolute)')
    names = [row['name'] for row in rows]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # they would share a work dir and a line of the table
        raise ValueError(f'{label}: the names {twice} are given to several rows; expected one each')
    if not rows:
        raise ValueError(f'{label}: holds no rows; expected {expected}')
    return rows


def config_path(row: dict) -> str:
    return row['config'] if osp.isabs(row['config']) else osp.join(ROOT, row['config'])


def load_rows(args) -> List[dict]:
    rows = builtin_rows()
    if args.table:
        rows = read_table(args.table)
    if args.only:
        names = [row['name'] for row in rows]
        unknown = [name for name in args.only if name not in names]
        if unknown:
            raise ValueError(f'--only {unknown}: accepted {names}')
        rows = [row for row in rows if row['name'] in args.only]
    return rows


def command(row: dict, checkpoint: str, args, tta: bool, segmentation: bool) -> List[str]:
    """The test command of ``row``; ``segmentation``: its config is an mmseg one, for which
    ``--ade-root`` applies, else ``--coco-root``."""
    config = config_path(row)
    work_dir = osp.join(args.work_dir, row['name'] + ('_tta' if tta else ''))
    if args.gpus > 1:
        cmd = ['bash', osp.join(ROOT, 'tools', 'dist_test.sh'), config, checkpoint, str(args.gpus)]
    else:
        cmd = [sys.executable, osp.join(ROOT, 'tools', 'test.py'), config, checkpoint]
    cmd += ['--work-dir', work_dir] + (['--tta'] if tta else [])
    options = []
    if args.coco_root and not segmentation:
        root = args.coco_root.rstrip('/') + '/'
        options += [f'test_dataloader.dataset.data_root={root}',
                    f'test_evaluator.ann_file={root}annotations/instances_val2017.json']
    if args.ade_root and segmentation:
        options += [f'test_dataloader.dataset.data_root={args.ade_root}']
    return cmd + (['--cfg-options'] + options if options else [])


def measured(output: str, names) -> Dict[str, float]:
    """The last value printed for each metric name in a tools/test.py log."""
    values = {}
    for name in names:
        found = re.findall(rf'(?:^|\s){re.escape(name)}: (-?[0-9.]+)', output)
        if found:
            values[name] = float(found[-1])
    return values


def fmt(value: Optional[float], factor: float = 1) -> str:
    return '' if value is None else f'{value * factor:.1f}'


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gpus < 1:
        raise ValueError(f'--gpus {args.gpus}: must be a positive integer')
    if not osp.isdir(args.checkpoint_dir):
        raise ValueError(f'--checkpoint-dir {args.checkpoint_dir!r}: no such folder')
    check_output_path('--out', args.out, folder=False)
    check_output_path('--work-dir', args.work_dir, folder=True)
    rows = load_rows(args)
    lines = ['| model | config | checkpoint | metric | published | measured | difference |',
             '|---|---|---|---|---|---|---|']
    failed = 0
    for row in rows:
        checkpoint = osp.join(args.checkpoint_dir, row['checkpoint'])
        runs = [False, True] if row.get('tta') else [False]
        # which data root applies: the config's library (a table's rows name no model kind)
        segmentation = library_of(read_config(config_path(row))) == 'mmseg'
        for tta in runs:
            cmd = command(row, checkpoint, args, tta, segmentation)
            print(' '.join(cmd), flush=True)
            values: Dict[str, float] = {}
            status = ''
            if not osp.isfile(checkpoint):
                status = 'file missing'
            elif not args.dry_run:
                result = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd())
                sys.stdout.write(result.stdout[-2000:])
                if result.returncode != 0:
                    failed += 1
                    status = f'failed ({result.returncode})'
                    sys.stderr.write(result.stderr[-4000:])
                values = measured(result.stdout + result.stderr, row['published'])
            for name, published in row['published'].items():
                column, factor = METRICS.get(name, (name, 1))
                got = values.get(name)
                diff = '' if got is None else f'{got * factor - published:+.1f}'
                diff = diff.replace('-0.0', '+0.0')  # a difference that rounds to nothing
                label = column + (' (multi-scale + flip)' if tta else '')
                lines.append(f"| {row['name']} | `{osp.basename(row['config'])}` | {row['checkpoint']} | "
                             f'{label} | {published} | {fmt(got, factor) or status or "not run"} | {diff} |')
    if args.dry_run:  # printed, not written: --out (official_eval.md by default) may hold real results
        print('\n'.join(lines))
        print(f'--dry-run: nothing was run, and {args.out} was left as it was')
        return 0
    with open(args.out, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print(f'table: {args.out}')
    if failed:
        raise SystemExit(1)  # some evaluations failed; their errors are printed above


if __name__ == '__main__':
    sys.exit(run_tool(main))
