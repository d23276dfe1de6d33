"""Tissue detection on a thumbnail: Otsu on HSV saturation, then morphology and hole filling.

Pure numpy/scipy functions on arrays, so each step is tested against numbers.
"""

from __future__ import annotations

import numpy as np


def rgb_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 255] of an RGB uint8 image: (max - min) / max per pixel."""
    mx = rgb.max(axis=-1).astype(np.float32)  # max/min on uint8 first: 3x less float work
    mn = rgb.min(axis=-1).astype(np.float32)
    return (mx - mn) / np.maximum(mx, 1.0) * 255.0


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range: tuple[float, float] = (0.0, 255.0)) -> float:
    """Otsu's threshold: the cut between histogram bins that maximises between-class variance.

    Returns the upper edge of the last bin of the lower class: pixels ``> threshold`` are foreground.
    """
    hist, edges = np.histogram(np.asarray(values, np.float64).ravel(), bins=bins, range=value_range)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)  # pixels at or below each bin
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    mu0 = s0 / np.maximum(w0, 1)
    mu1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1  # a cut with an empty side is no split
    return float(edges[int(np.argmax(between)) + 1])


def remove_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0 or min_size <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_hole: int) -> np.ndarray:
    """Fill background regions fully enclosed by tissue and smaller than ``max_hole`` pixels."""
    holes = ~mask
    holes = holes & ~remove_small_objects(holes, max_hole)  # the small background blobs
    from scipy import ndimage

    # a background blob touching the border is outside the tissue, not a hole
    labels, _ = ndimage.label(holes)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    holes &= ~np.isin(labels, border[border > 0])
    return mask | holes


def tissue_mask(rgb: np.ndarray, *, min_saturation: float = 15.0, closing: int = 2, min_object: float = 1e-3,
                max_hole: float = 5e-3) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail.

    Otsu on saturation separates stained tissue from white glass; ``min_saturation`` keeps an
    empty (all-white) slide from being split in two by its noise. Closing joins nearby tissue,
    objects under ``min_object`` of the area go (dust), holes under ``max_hole`` are filled (fat,
    tears). Sizes are fractions of the thumbnail so the result does not depend on its resolution.
    """
    from scipy import ndimage

    sat = rgb_saturation(rgb)
    thr = max(otsu_threshold(sat), min_saturation)
    mask = sat > thr
    if closing > 0:
        st = np.ones((2 * closing + 1, 2 * closing + 1), bool)
        mask = ndimage.binary_closing(np.pad(mask, closing), structure=st)[closing:-closing, closing:-closing]
        mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    area = mask.size
    mask = remove_small_objects(mask, max(1, int(min_object * area)))
    return fill_small_holes(mask, max(1, int(max_hole * area)))


def tile_tissue_fractions(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray, size0: int, downsample: float) -> np.ndarray:
    """Fraction of tissue under each tile (level-0 top-left corners ``xs, ys``, side ``size0``).

    Uses an integral image of the mask: O(1) per tile whatever its size. Parts of a tile outside
    the mask count as background.
    """
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)

    def to_mask(v, limit):
        return np.clip(np.round(np.asarray(v, np.float64) / downsample).astype(np.int64), 0, limit)

    x0, x1 = to_mask(xs, w), to_mask(np.asarray(xs) + size0, w)
    y0, y1 = to_mask(ys, h), to_mask(np.asarray(ys) + size0, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    full = (np.asarray(size0, np.float64) / downsample) ** 2
    return np.clip(inside / np.maximum(full, 1e-9), 0.0, 1.0)
