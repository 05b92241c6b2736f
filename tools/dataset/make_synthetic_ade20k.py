"""Write a small generated dataset in the ADE20K layout (150-class labels, 0 = ignored "other").

    python tools/dataset/make_synthetic_ade20k.py OUT_DIR [--num-train 32] [--num-val 8]
                                                  [--size 128 160] [--max-objects 4] [--seed 0]

OUT_DIR receives ADEChallengeData2016/images|annotations/training|validation, so an ADE20K config
runs on it with data_root=OUT_DIR/ADEChallengeData2016.
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from davit_mm.cli import run_tool  # noqa: E402
from davit_mm.synthetic import parse_arguments, write_ade20k  # noqa: E402


def main(argv=None):
    args = parse_arguments(__doc__.split('\n\n')[0], argv)
    root = write_ade20k(args.out_dir, args.num_train, args.num_val, args.size, args.max_objects, args.seed)
    print(f'wrote {args.num_train} training / {args.num_val} validation images to {root}')


if __name__ == '__main__':
    sys.exit(run_tool(main))
