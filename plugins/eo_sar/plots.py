"""Figures of eo-sar: the display stretch of a patch, AP per class, a confusion matrix."""

from __future__ import annotations

import math

import numpy as np


def percentile_stretch(image: np.ndarray, valid: np.ndarray | None = None, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """float32 [C, H, W] in 0..1 for display: each band of ``image`` [C, H, W] scaled so its
    ``low``..``high`` percentiles over the valid pixels (bool [H, W]; None: all) map to 0..1,
    clipped; invalid pixels are black.

    The stretch is torchgeo's ``percentile_normalization`` (per band: ``axis=0`` over a
    [pixels, C] array). It has no mask, and nodata fill values (0, -9999) would drag the low
    percentile, so it is given only the valid pixels, and the result is put back in place.
    """
    from torchgeo.datasets.utils import percentile_normalization

    image = np.asarray(image)
    out = np.zeros(image.shape, dtype=np.float32)
    mask = np.ones(image.shape[1:], bool) if valid is None else np.asarray(valid, dtype=bool)
    if mask.any():
        out[:, mask] = percentile_normalization(image[:, mask].T, lower=low, upper=high, axis=0).T
    return out


def per_class_ap_figure(names, results: dict[str, list[float]], *, chance: list[float] | None = None,
                        title: str = "average precision per class"):
    """Grouped bars, one group per class and one bar per probe; classes without test positives
    are marked n/a instead of a bar. ``chance`` (the AP of a constant score: the class's share of
    test patches) is drawn as a black tick over each group."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.9 * len(names)), 4.0))
    ax = fig.subplots()
    width = 0.8 / max(1, len(results))
    x = np.arange(len(names))
    for i, (probe, aps) in enumerate(results.items()):
        values = np.nan_to_num(np.asarray(aps, dtype=float), nan=0.0)
        ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, label=probe)
    chance_label = "chance (class share)"
    for j, ap in enumerate(next(iter(results.values()))):
        if math.isnan(ap):
            ax.text(j, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
        elif chance is not None:
            ax.hlines(chance[j], j - 0.45, j + 0.45, colors="black", linewidth=1.5, label=chance_label)
            chance_label = None  # one legend entry for all the ticks
    ax.set_xticks(x, [n.replace("_", "\n") for n in names], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AP")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(cm: np.ndarray, names, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.0 + 0.55 * len(names), 0.8 + 0.5 * len(names)))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
