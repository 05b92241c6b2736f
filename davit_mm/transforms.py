"""Data pipeline transforms that check each sample as it is loaded, so that an image and its
annotation that do not fit stop the run with both files named, instead of training on, or
scoring, pixels in the wrong place.

- :class:`CheckAnnotationSize` (mmdet): the image as decoded has the height and width its annotation
  file gives it (COCO's ``images[].height/width``, VOC's ``<size>``). Boxes and polygons are in that
  frame: an image resized after it was annotated, or one that ``LoadImageFromFile`` turns by its
  EXIF orientation while the annotation was drawn unturned, otherwise trains on misplaced boxes
  and scores near 0 mAP without an error. Place it after ``LoadImageFromFile``.
- :class:`CheckSegMap` (mmseg): the label map is one channel (a colour-coded RGB map is not class
  indices), has its image's size (mmseg would crop the two apart, or fail to index one by the
  other at evaluation), and holds only labels below ``num_classes`` or ``ignore_index`` (a larger
  one is a CUDA device-side assert in the loss, and is silently left out of the IoU). Place it
  right after ``LoadAnnotations``, before any transform that resizes, crops or pads.

Both look at arrays already loaded (only for an image that fails is its EXIF orientation read).
A sample without the keys a check reads, such as an image given to an inferencer without
annotations, passes unchecked.
"""
import os.path as osp
from typing import Optional, Tuple

import numpy as np
from mmcv.transforms import BaseTransform

# EXIF orientations that turn an image by a quarter (its height and width swap when applied)
_QUARTER_TURNS = (5, 6, 7, 8)


def _exif_orientation(path: str) -> Optional[int]:
    """The EXIF orientation tag (1..8) of a local image file; None when absent or unreadable."""
    if not osp.isfile(path):
        return None
    try:
        from PIL import Image
        with Image.open(path) as image:
            return image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - only a hint for a message being written
        return None


class CheckAnnotationSize(BaseTransform):
    """Refuse an image whose decoded size differs from the height and width its annotation gives.

    Reads ``ori_shape`` (set by ``LoadImageFromFile``) and the dataset's ``height``/``width``. Its
    name holds "Annotation" so that mmdeploy's SDK, which drops such steps from the test pipeline
    it deploys, leaves it out as it does ``LoadAnnotations`` (the SDK knows no davit_mm step).

    Raises:
        ValueError: naming the image, both sizes and, for an image with a quarter-turn EXIF
            orientation, the ``LoadImageFromFile`` setting that loads it the other way.
    """

    def transform(self, results: dict) -> dict:
        if 'ori_shape' not in results or results.get('height') is None or results.get('width') is None:
            return results
        loaded = tuple(int(side) for side in results['ori_shape'][:2])
        annotated = (int(results['height']), int(results['width']))
        if loaded != annotated:
            path = str(results.get('img_path'))
            raise ValueError(f'image {path!r} decodes as {_size(loaded)} but its annotation (image id '
                             f'{results.get("img_id")}) says {_size(annotated)}: its boxes and masks '
                             f'would be in another frame. {_size_hint(path, loaded, annotated)}')
        return results


def _size(shape: Tuple[int, int]) -> str:
    return f'{shape[1]}x{shape[0]} (width x height)'


def _size_hint(path: str, loaded: Tuple[int, int], annotated: Tuple[int, int]) -> str:
    orientation = _exif_orientation(path)
    if orientation in _QUARTER_TURNS and loaded == annotated[::-1]:
        return (f'The file carries EXIF orientation {orientation}, a quarter turn, which '
                f"LoadImageFromFile applies with color_type='color' (the default) and not with "
                f"color_type='color_ignore_orientation': load it the way its annotations were "
                f'drawn, or correct the width and height in the annotation file.')
    return ('Was the image resized or replaced after it was annotated? Correct the width and height '
            'in the annotation file (and its boxes and masks), or restore the annotated image.')


class CheckSegMap(BaseTransform):
    """Refuse a label map that is not one channel, not its image's size, or holds a label that is
    neither a class (``0 .. num_classes - 1``) nor ``ignore_index``.

    Reads ``gt_seg_map`` (set by ``LoadAnnotations``, after its ``reduce_zero_label`` and
    ``label_map``) and ``ori_shape``.

    Args:
        num_classes (int, optional): the classes the decode head predicts; None checks shapes only.
        ignore_index (int): the label the loss and the metric ignore. Default: 255.

    Raises:
        TypeError, ValueError: a bad argument, naming it.
        ValueError: for a bad label map, naming it and what it holds.
    """

    def __init__(self, num_classes: Optional[int] = None, ignore_index: int = 255) -> None:
        for name, value, low in (('num_classes', num_classes, 1), ('ignore_index', ignore_index, 0)):
            if value is None and name == 'num_classes':
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f'CheckSegMap {name}={value!r}: expected an int')
            if value < low:
                raise ValueError(f'CheckSegMap {name}={value}: expected an int >= {low}')
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def transform(self, results: dict) -> dict:
        seg = results.get('gt_seg_map')
        if seg is None:
            return results
        path = str(results.get('seg_map_path'))
        if seg.ndim != 2:
            colour = ' (a colour image: class indices must be one channel, e.g. a grayscale or ' \
                     'palette PNG)' if seg.ndim == 3 else ''
            raise ValueError(f'label map {path!r} loads with shape {seg.shape}{colour}, expected '
                             f'height x width')
        image = results.get('ori_shape')
        if image is not None and tuple(image[:2]) != seg.shape:
            raise ValueError(f'label map {path!r} is {_size(seg.shape)} but its image '
                             f'{str(results.get("img_path"))!r} is {_size(tuple(image[:2]))}: each '
                             f'label map must have its image\'s size (after any resize or crop '
                             f'in the pipeline, CheckSegMap must come right after LoadAnnotations)')
        if self.num_classes is not None:
            self._check_labels(seg, path, results)
        return results

    def _check_labels(self, seg: np.ndarray, path: str, results: dict) -> None:
        if seg.dtype == np.uint8:
            values = np.flatnonzero(np.bincount(seg.ravel(), minlength=256))
        else:
            values = np.unique(seg)
        bad = [int(v) for v in values if not (0 <= v < self.num_classes or v == self.ignore_index)]
        if not bad:
            return
        reduce_zero_label = results.get('reduce_zero_label')
        hint = ''
        if not reduce_zero_label and max(bad) == self.num_classes:
            hint = (f'; labels up to {self.num_classes} look 1-based with 0 as "other", as in '
                    f'ADE20K: set reduce_zero_label=True in the dataset')
        shown = ', '.join(map(str, bad[:8])) + (', ...' if len(bad) > 8 else '')
        raise ValueError(f'label map {path!r} holds labels {shown} (as LoadAnnotations gives them, '
                         f'reduce_zero_label={reduce_zero_label}), which are neither a class '
                         f'0..{self.num_classes - 1} (CheckSegMap num_classes={self.num_classes}) nor '
                         f'ignore_index={self.ignore_index}{hint}')

    def __repr__(self) -> str:
        return f'{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index})'
