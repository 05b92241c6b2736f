"""Write a small generated dataset in the ADE20K layout (150-class labels, 0 = ignored "other").

    python tools/dataset/make_synthetic_ade20k.py OUT_DIR [--num-train 32] [--num-val 8]
                                                  [--size 128 160] [--max-objects 4] [--seed 0]

OUT_DIR receives ADEChallengeData2016/images|annotations/training|validation, so an ADE20K config
runs on it with data_root=OUT_DIR/ADEChallengeData2016.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
from davit_mm.synthetic import write_ade20k  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('out_dir')
    parser.add_argument('--num-train', type=int, default=32)
    parser.add_argument('--num-val', type=int, default=8)
    parser.add_argument('--size', type=int, nargs=2, default=(128, 160), metavar=('H', 'W'),
                        help='typical image size; each image varies by +-15%%')
    parser.add_argument('--max-objects', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    root = write_ade20k(args.out_dir, args.num_train, args.num_val, tuple(args.size),
                        args.max_objects, args.seed)
    print(f'wrote {args.num_train} training / {args.num_val} validation images to {root}')


if __name__ == '__main__':
    main()
