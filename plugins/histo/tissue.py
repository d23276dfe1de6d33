"""Tissue detection on a thumbnail: Otsu on HSV saturation, then morphology and hole filling.

Otsu's method always splits a histogram in two, so on its own it calls the paler half of a field
that is tissue from edge to edge "background", and half of a blank slide "tissue". The threshold is
therefore kept inside the band where glass ends and stain begins (``min_saturation`` ..
``max_saturation``), and a field whose two Otsu classes barely differ is one population: all
glass or all tissue, by which side of that band it lies on. Saturation is box-filtered first
(5 px), so the noise of glass averages out before it meets a threshold (CLAM blurs for the same
reason).

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


def otsu_class_means(values: np.ndarray, threshold: float) -> tuple[float, float]:
    """Mean of the values at or below ``threshold`` and of those above (NaN for an empty class)."""
    v = np.asarray(values, np.float64).ravel()
    lo, hi = v[v <= threshold], v[v > threshold]
    return (float(lo.mean()) if lo.size else float("nan"), float(hi.mean()) if hi.size else float("nan"))


def saturation_threshold(sat: np.ndarray, *, min_saturation: float = 15.0, max_saturation: float = 40.0,
                         min_contrast: float = 15.0) -> float:
    """The saturation above which a pixel is tissue (both in [0, 255]).

    Otsu's cut, kept within [``min_saturation``, ``max_saturation``]: glass is never more saturated
    than ``max_saturation`` (so a cut between pale stroma and dark nuclei falls back to it and keeps
    both), and stain never less than ``min_saturation``. When the two Otsu classes' means differ by
    less than ``min_contrast`` there is one population, not two: the cut is put in the middle of the
    band so that all of it lands on one side (a blank slide: none kept; uniform tissue: all kept).
    """
    thr = otsu_threshold(sat)
    lo, hi = otsu_class_means(sat, thr)
    if not (hi - lo >= min_contrast):  # NaN (one empty class) counts as one population
        thr = (min_saturation + max_saturation) / 2
    return float(np.clip(thr, min_saturation, max_saturation))


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


def tissue_mask(rgb: np.ndarray, *, min_saturation: float = 15.0, max_saturation: float = 40.0,
                smooth: int = 5, closing: int = 2, min_object: float = 1e-3, max_hole: float = 5e-3) -> np.ndarray:
    """Boolean tissue mask [H, W] of an RGB uint8 thumbnail [H, W, 3].

    Saturation (box-filtered over ``smooth`` pixels) above :func:`saturation_threshold` is tissue:
    Otsu separates stained tissue from glass, bounded so that a slide with no glass is all tissue
    and a blank slide is empty. Closing joins nearby tissue, objects under ``min_object`` of the
    area go (dust), holes under ``max_hole`` are filled (fat, tears). Sizes are fractions of the
    thumbnail so the result does not depend on its resolution.
    """
    from scipy import ndimage

    sat = rgb_saturation(rgb)
    if smooth > 1:
        sat = ndimage.uniform_filter(sat, size=smooth, mode="nearest")
    thr = saturation_threshold(sat, min_saturation=min_saturation, max_saturation=max_saturation)
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
