"""Small generated datasets in the COCO and ADE20K layouts, so every config runs without the real data.

Each image is a smooth random background with a few non-overlapping shapes; each class has its own
shape and colour family, so a tiny model can learn them in minutes on a CPU. Shapes are polygons,
which gives exact COCO boxes, polygon masks and segmentation label maps from the same drawing.

Layouts written (the same folder names as the real datasets, so only ``data_root`` changes):

- COCO: ``annotations/instances_{train,val}2017.json`` and ``{train,val}2017/*.jpg``.
- ADE20K: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` and
  ``ADEChallengeData2016/annotations/{training,validation}/*.png`` with labels 0..150, 0 meaning
  "other" (ignored in training and evaluation, as in ADE20K).
"""
import json
import os
import os.path as osp
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

# name, colour (BGR) and number of polygon corners (0: an ellipse sampled as a polygon)
SHAPE_CLASSES: Tuple[Tuple[str, Tuple[int, int, int], int], ...] = (
    ('square', (40, 40, 220), 4),
    ('disk', (40, 200, 40), 0),
    ('triangle', (220, 90, 30), 3),
)
COCO_CLASSES = tuple(name for name, _, _ in SHAPE_CLASSES)
# ADE20K label of each shape class (1-based ADE ids: 1 wall, 2 building, 3 sky, ...); the background
# gets ADE20K_BACKGROUND_LABEL and a band of label 0 ("other", ignored) runs along the top edge.
ADE20K_SHAPE_LABELS = (13, 21, 43)  # person, car, signboard
ADE20K_BACKGROUND_LABEL = 1  # wall


@dataclass
class Shape:
    """One object drawn on a generated image: its class and its outline."""

    label: int  # index into SHAPE_CLASSES
    polygon: np.ndarray  # (K, 2) float x, y

    @property
    def bbox(self) -> List[float]:
        x0, y0 = self.polygon.min(0)
        x1, y1 = self.polygon.max(0)
        return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]

    @property
    def area(self) -> float:
        x, y = self.polygon[:, 0], self.polygon[:, 1]
        return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _polygon(rng: np.random.Generator, corners: int, cx: float, cy: float, r: float) -> np.ndarray:
    if corners == 0:
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        ry = r * rng.uniform(0.7, 1.0)
        return np.stack([cx + r * np.cos(angles), cy + ry * np.sin(angles)], 1)
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.arange(corners) * 2 * np.pi / corners
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)


def make_scene(rng: np.random.Generator, height: int, width: int,
               max_objects: int = 4) -> Tuple[np.ndarray, List[Shape]]:
    """A BGR uint8 image and the shapes drawn on it (1..max_objects; boxes never intersect, so
    every mask is fully visible)."""
    low = rng.uniform(60, 200, size=(3, 3, 3)).astype(np.float32)
    image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 6, size=image.shape).astype(np.float32)
    shapes: List[Shape] = []
    boxes: List[Tuple[float, float, float, float]] = []
    min_side = min(height, width)
    for _ in range(int(rng.integers(1, max_objects + 1)) * 10):  # rejection sampling
        if len(shapes) == max_objects:
            break
        label = int(rng.integers(len(SHAPE_CLASSES)))
        r = rng.uniform(0.12, 0.28) * min_side
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if any(_intersect(box, other) for other in boxes):
            continue
        polygon = _polygon(rng, SHAPE_CLASSES[label][2], cx, cy, r)
        colour = np.clip(np.array(SHAPE_CLASSES[label][1]) + rng.normal(0, 15, 3), 0, 255)
        cv2.fillPoly(image, [np.round(polygon).astype(np.int32)], colour.tolist())
        shapes.append(Shape(label, polygon))
        boxes.append(box)
    return np.clip(image, 0, 255).astype(np.uint8), shapes


def _intersect(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _sizes(rng: np.random.Generator, count: int, size: Tuple[int, int],
           jitter: float) -> List[Tuple[int, int]]:
    """Image sizes around ``size`` (h, w), +-jitter, deliberately not multiples of 32."""
    h, w = size
    out = []
    for _ in range(count):
        out.append((max(16, int(h * rng.uniform(1 - jitter, 1 + jitter))) | 1,
                    max(16, int(w * rng.uniform(1 - jitter, 1 + jitter))) | 1))
    return out


# Beyond these an image costs gigabytes, or no further shape fits (each is at least 0.24 of the
# shorter side wide and they do not overlap) while the sampling keeps trying.
MAX_SIDE, MAX_OBJECTS = 4096, 16


def _check_args(num_train: int, num_val: int, size: Sequence[int], max_objects: int) -> None:
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train={num_train}, num_val={num_val}: both must be >= 1')
    if len(size) != 2 or not 32 <= min(size) <= max(size) <= MAX_SIDE:
        raise ValueError(f'size={tuple(size)}: expected (height, width), both from 32 to {MAX_SIDE}')
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f'max_objects={max_objects}: accepted 1 to {MAX_OBJECTS}')


def coco_categories(coco_classes: bool = False) -> List[dict]:
    """The categories of a generated COCO dataset: the three shapes, named :data:`COCO_CLASSES`;
    with ``coco_classes``, the 80 of the real COCO (mmdet's ``CocoDataset`` names, ids 1-80), the
    shapes being the first three (person, bicycle, car). A config for the real COCO then trains
    and evaluates on it unchanged: mmdet keeps only the categories its metainfo names, and its
    COCO metric needs a category for every class the model predicts."""
    if not coco_classes:
        names = COCO_CLASSES
        supercategory = 'shape'
    else:
        from mmdet.datasets import CocoDataset
        names = CocoDataset.METAINFO['classes']
        supercategory = 'coco'
    return [dict(id=i + 1, name=name, supercategory=supercategory) for i, name in enumerate(names)]


def write_coco(out_dir: str, num_train: int = 32, num_val: int = 8, size: Tuple[int, int] = (128, 160),
               max_objects: int = 4, seed: int = 0, jitter: float = 0.15,
               coco_classes: bool = False) -> Dict[str, str]:
    """Write a COCO-format dataset (boxes + polygon masks) under ``out_dir``; returns its paths.
    ``coco_classes``: see :func:`coco_categories`."""
    _check_args(num_train, num_val, size, max_objects)
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    categories = coco_categories(coco_classes)
    paths = {}
    ann_id = 1
    for split, count in (('train2017', num_train), ('val2017', num_val)):
        os.makedirs(osp.join(out_dir, split), exist_ok=True)
        images, annotations = [], []
        for image_id, (h, w) in enumerate(_sizes(rng, count, size, jitter), start=1):
            image, shapes = make_scene(rng, h, w, max_objects)
            file_name = f'{image_id:06d}.jpg'
            cv2.imwrite(osp.join(out_dir, split, file_name), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            images.append(dict(id=image_id, file_name=file_name, height=h, width=w))
            for shape in shapes:
                annotations.append(dict(
                    id=ann_id, image_id=image_id, category_id=shape.label + 1, bbox=shape.bbox,
                    area=shape.area, iscrowd=0,
                    segmentation=[shape.polygon.reshape(-1).round(2).tolist()]))
                ann_id += 1
        ann_file = osp.join(out_dir, 'annotations', f'instances_{split}.json')
        with open(ann_file, 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
        paths[split] = ann_file
    return paths


def write_ade20k(out_dir: str, num_train: int = 32, num_val: int = 8, size: Tuple[int, int] = (128, 160),
                 max_objects: int = 4, seed: int = 0, jitter: float = 0.15) -> str:
    """Write an ADE20K-layout dataset under ``out_dir``; returns the ``ADEChallengeData2016`` folder."""
    _check_args(num_train, num_val, size, max_objects)
    rng = np.random.default_rng(seed)
    root = osp.join(out_dir, 'ADEChallengeData2016')
    for split, count in (('training', num_train), ('validation', num_val)):
        image_dir = osp.join(root, 'images', split)
        label_dir = osp.join(root, 'annotations', split)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)
        for index, (h, w) in enumerate(_sizes(rng, count, size, jitter), start=1):
            image, shapes = make_scene(rng, h, w, max_objects)
            label = np.full((h, w), ADE20K_BACKGROUND_LABEL, np.uint8)
            label[:max(2, h // 16)] = 0  # an "other" band: ignored by training and mIoU
            for shape in shapes:
                cv2.fillPoly(label, [np.round(shape.polygon).astype(np.int32)],
                             ADE20K_SHAPE_LABELS[shape.label])
            name = f'ADE_{split[:5]}_{index:08d}'
            cv2.imwrite(osp.join(image_dir, f'{name}.jpg'), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(osp.join(label_dir, f'{name}.png'), label)
    return root


def parse_arguments(description: str, argv=None, coco: bool = False):
    """The command line of tools/dataset/make_synthetic_{coco,ade20k}.py, checked (``coco``:
    the COCO tool's, with ``--coco-classes``).

    Raises:
        ValueError: image counts below 1, objects below 1, a negative seed, sides below 32,
            an ``out_dir`` that cannot be written (:func:`davit_mm.cli.check_output_path`).
    """
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('out_dir')
    parser.add_argument('--num-train', type=int, default=32)
    parser.add_argument('--num-val', type=int, default=8)
    parser.add_argument('--size', type=int, nargs=2, default=(128, 160), metavar=('H', 'W'),
                        help='typical image size; each image varies by +-15%%')
    parser.add_argument('--max-objects', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    if coco:
        parser.add_argument('--coco-classes', action='store_true',
                            help="COCO's 80 categories, the shapes as person, bicycle and car: for "
                                 'the configs of the real COCO, unchanged')
    args = parser.parse_args(argv)
    # numpy's default_rng takes any integer from 0 on; its own message names no option
    for name, least in (('num_train', 1), ('num_val', 1), ('max_objects', 1), ('seed', 0)):
        if getattr(args, name) < least:
            raise ValueError(f'--{name.replace("_", "-")} {getattr(args, name)}: accepted {least} or more')
    if args.max_objects > MAX_OBJECTS:
        raise ValueError(f'--max-objects {args.max_objects}: accepted 1 to {MAX_OBJECTS} (no more fit '
                         f'an image without overlapping)')
    if not 32 <= min(args.size) <= max(args.size) <= MAX_SIDE:
        raise ValueError(f'--size {args.size[0]} {args.size[1]}: accepted sides of 32 to {MAX_SIDE} pixels')
    from davit_mm.cli import check_output_path
    check_output_path('out_dir', args.out_dir, folder=True)
    args.size = tuple(args.size)
    return args
