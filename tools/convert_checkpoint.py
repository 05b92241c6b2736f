"""Convert any public DaViT checkpoint into davit_mm's key layout.

    python tools/convert_checkpoint.py SRC DST [--format auto|official|timm|mmpretrain|florence2|davit_mm]
                                       [--prefix PREFIX] [--backbone-only]

SRC may be a .pth/.pt/.bin/.ckpt file, a .safetensors file or an http(s) URL. Every renamed key is
printed; anything not recognised is refused with exit status 2.

- A backbone (a classifier, a davit_mm detector/segmentor, which needs no conversion as a whole,
  or any checkpoint with ``--backbone-only``): DST receives
  ``{'state_dict': ..., 'meta': {...}}`` with backbone keys only (no prefix), which
  ``init_cfg=dict(type='Pretrained', checkpoint=DST)`` loads directly.
- A whole detector/segmentor released with the official DaViT code (mmdet 2.11 / mmseg 0.11): DST
  receives the whole model in davit_mm's layout for the mmdet 3.x / mmseg 1.x configs
  (``tools/test.py CONFIG DST``, ``load_from=DST``), with the class names (and palette) as
  ``meta['dataset_meta']`` and where it came from as ``meta['converted_from']``; the old optimizer
  state is dropped.
"""
import argparse
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from davit_mm.checkpoint import (FORMATS, MODEL_FORMATS,  # noqa: E402
                                 convert_model_checkpoint, convert_state_dict, describe_state_dict,
                                 detect_format, detect_model_format, implied_channel_attention,
                                 layout_format, read_checkpoint_and_meta)
from davit_mm.cli import check_output_path, run_tool  # noqa: E402
from davit_mm.fileio import atomic_file  # noqa: E402
from davit_mm.version import __version__  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src', help='checkpoint to convert (path or URL)')
    parser.add_argument('dst', help='where to write the davit_mm checkpoint')
    parser.add_argument('--format', default='auto', choices=('auto', ) + FORMATS,
                        help='source format (default: detected from the keys)')
    parser.add_argument('--prefix', default=None,
                        help="text before the backbone keys, e.g. 'backbone.' (default: detected)")
    parser.add_argument('--backbone-only', action='store_true',
                        help='of a whole official detector/segmentor, write only the backbone '
                             '(of any other checkpoint, only the backbone is written in any case)')
    return parser.parse_args(argv)


def save(checkpoint: dict, dst: str) -> None:
    """``torch.save`` into DST under a temporary name, renamed into place when complete: a
    run that fails or is killed while writing (DST may be SRC) leaves DST as it was."""
    with atomic_file(dst) as f:
        torch.save(checkpoint, f)


def convert_whole_model(state_dict: dict, meta: dict, src: str, dst: str) -> None:
    conversion = convert_model_checkpoint(dict(state_dict=state_dict, meta=meta), src)
    fmt = MODEL_FORMATS[conversion.format]
    converted = conversion.checkpoint['state_dict']
    print(f'source: {src}')
    print(f'format: whole {fmt.library} model of {fmt.written_by}')
    backbone = {k[len('backbone.'):]: v for k, v in converted.items() if k.startswith('backbone.')}
    print(f'backbone: {describe_state_dict(backbone)}')
    for new, old in conversion.renamed.items():
        print(f'  {old} -> {new}')
    others = sorted({k.split('.')[0] for k in converted} - {'backbone'})
    print(f'kept {len(converted) - len(backbone)} neck/head tensors ({", ".join(others)}): their '
          f'names are the same in {fmt.library} {"3.x" if fmt.library == "mmdet" else "1.x"}')
    if conversion.dropped:
        print(f'dropped: {", ".join(conversion.dropped)}')
    dataset_meta = conversion.checkpoint['meta'].get('dataset_meta', {})
    print(f'meta: {len(dataset_meta.get("classes", ()))} class names'
          + (', palette' if 'palette' in dataset_meta else '') + '; converted_from: '
          + ', '.join(sorted(conversion.checkpoint['meta']['converted_from'])))
    conversion.checkpoint['meta']['converted_from']['davit_mm_version'] = __version__
    save(conversion.checkpoint, dst)
    print(f'wrote {len(converted)} tensors to {dst}')


def main(argv=None) -> None:
    args = parse_args(argv)
    check_output_path('dst', args.dst, folder=False)  # before the (possibly long) read of SRC
    state_dict, meta_in = read_checkpoint_and_meta(args.src)
    if (not args.backbone_only and args.format in ('auto', 'official') and args.prefix is None
            and detect_model_format(state_dict, meta_in)):
        convert_whole_model(state_dict, meta_in, args.src, args.dst)
        return
    layout, prefix = detect_format(state_dict, args.prefix, args.format)
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
        print(f'ignored {ignored} tensors outside the backbone at prefix {prefix!r}')
    meta = dict(davit_mm_version=__version__, source=str(args.src), source_format=fmt)
    # Its keys no longer tell v1 from v2 channel attention: the loader checks this instead.
    attention = implied_channel_attention(layout, meta_in)
    if attention:
        meta['channel_attention'] = attention
    save({'state_dict': converted, 'meta': meta}, args.dst)
    print(f'wrote {len(converted)} tensors to {args.dst}')


if __name__ == '__main__':
    sys.exit(run_tool(main))
