"""Write a small generated COCO-format dataset (3 shape classes, boxes and polygon masks).

    python tools/dataset/make_synthetic_coco.py OUT_DIR [--num-train 32] [--num-val 8]
                                                [--size 128 160] [--max-objects 4] [--seed 0]
                                                [--coco-classes]

OUT_DIR receives annotations/instances_{train,val}2017.json and {train,val}2017/*.jpg, the COCO
layout, so a COCO config runs on it with data_root=OUT_DIR/ and the three class names
(davit_mm.synthetic.COCO_CLASSES) as metainfo. With ``--coco-classes`` its categories are COCO's 80
(the shapes are person, bicycle and car), and the configs for the real COCO train and evaluate on
it unchanged.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from davit_mm.cli import run_tool  # noqa: E402
from davit_mm.synthetic import COCO_CLASSES, parse_arguments, write_coco  # noqa: E402


def main(argv=None):
    args = parse_arguments(__doc__.split('\n\n')[0], argv, coco=True)
    paths = write_coco(args.out_dir, args.num_train, args.num_val, args.size, args.max_objects, args.seed,
                       coco_classes=args.coco_classes)
    classes = "COCO's 80 (shapes: person, bicycle, car)" if args.coco_classes else COCO_CLASSES
    print(f'wrote {args.num_train} train / {args.num_val} val images, classes {classes}:')
    for split, path in paths.items():
        print(f'  {split}: {path}')


if __name__ == '__main__':
    sys.exit(run_tool(main))
