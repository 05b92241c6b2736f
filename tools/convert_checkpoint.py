"""Convert any public DaViT checkpoint into davit_mm's key layout.

    python tools/convert_checkpoint.py SRC DST [--format auto|official|timm|mmpretrain|florence2|davit_mm]
                                       [--prefix PREFIX]

SRC may be a .pth/.pt/.bin/.ckpt file, a .safetensors file or an http(s) URL. DST receives
``{'state_dict': ..., 'meta': {...}}`` with backbone keys only (no prefix), which
``init_cfg=dict(type='Pretrained', checkpoint=DST)`` loads directly. Every renamed key is printed.
"""
import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from davit_mm.checkpoint import (FORMATS, CheckpointError, convert_state_dict,  # noqa: E402
                                 describe_state_dict, detect_format, layout_format, read_checkpoint)
from davit_mm.version import __version__  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='checkpoint to convert (path or URL)')
    parser.add_argument('dst', help='where to write the davit_mm checkpoint')
    parser.add_argument('--format', default='auto', choices=('auto', ) + FORMATS,
                        help='source format (default: detected from the keys)')
    parser.add_argument('--prefix', default=None,
                        help="text before the backbone keys, e.g. 'backbone.' (default: detected)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        state_dict = read_checkpoint(args.src)
        layout, prefix = detect_format(state_dict, args.prefix, args.format)
    except (CheckpointError, ValueError, TypeError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    conversion = convert_state_dict(state_dict, layout, prefix)
    converted, classifier = conversion.state_dict, conversion.classifier
    fmt = layout_format(layout)
    print(f'source: {args.src}')
    print(f'format: {fmt}' + (f' ({layout} layout)' if layout != fmt else '') + f', prefix {prefix!r}')
    print(f'model: {describe_state_dict(converted)}')
    for new, old in conversion.sources.items():
        print(f'  {old} -> {new}' if old != new else f'  {old}')
    if classifier:
        print(f'dropped classifier: {", ".join(sorted(classifier))}')
    ignored = len(state_dict) - len(converted) - len(classifier)
    if ignored:
        print(f'ignored {ignored} tensors outside the backbone (not under prefix {prefix!r})')
    meta = dict(davit_mm_version=__version__, source=str(args.src), source_format=fmt)
    torch.save({'state_dict': converted, 'meta': meta}, args.dst)
    print(f'wrote {len(converted)} tensors to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
