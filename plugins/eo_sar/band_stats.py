"""Per-band normalisation statistics of a domainfm-layout data root.

The mean and standard deviation of each band over the valid pixels of every patch, computed once
(float64 sums) and cached in ``ROOT/.domainfm_stats_<modality>.json`` under a fingerprint of the
file list and the radiometry settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domainfm.errors import DomainFMError
from plugins.eo_sar.bands import BANDS, STATS_FILE
from plugins.eo_sar.files import (STATS_VERSION, PatchFile, file_list_fingerprint, read_cache, track_progress,
                                  unreadable, write_cache)


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation over the valid pixels of a data root."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    valid_pixels: int = 0


# When a file carries no nodata tag: Sentinel-2 products fill with 0 (ESA's NODATA value).
DEFAULT_NODATA = {"s2": 0.0}
# Backscatter outside this range (dB) is a fill value (-9999, -32768...), never a measurement.
S1_VALID_DB = (-100.0, 50.0)


def read_image(path: Path, nodata: float | None = None, *, modality: str | None = None, s2_harmonize: str = "auto",
               s1_units: str = "db") -> tuple[np.ndarray, np.ndarray]:
    """float32 [C, H, W] pixels and a bool [H, W] mask of valid pixels.

    With a ``modality`` the file goes through :func:`plugins.eo_sar.radiometry.read_patch`
    (bands in canonical order from the descriptions, declared scale/offset, baseline 04.00
    harmonisation, S1 in dB).

    A pixel is invalid when any band equals the nodata value (the file's tag, else the
    modality's convention), is not finite (nan nodata, -inf from the log of zero backscatter),
    or, for S1, lies outside :data:`S1_VALID_DB`.
    """
    if modality is not None:
        from plugins.eo_sar.radiometry import read_patch

        image, _, info = read_patch(path, modality=modality, s2_harmonize=s2_harmonize, s1_units=s1_units, nodata=nodata)
        return image, info.valid
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path) as src:
            image = src.read().astype(np.float32, copy=False)
            nodata = src.nodata if nodata is None else nodata
    except RasterioError as e:
        raise unreadable(path, e) from None
    if nodata is None and modality is not None:
        nodata = DEFAULT_NODATA.get(modality)
    invalid = ~np.isfinite(image)
    if nodata is not None and np.isfinite(nodata):
        invalid |= image == np.float32(nodata)
    if modality == "s1":
        with np.errstate(invalid="ignore"):
            invalid |= (image < S1_VALID_DB[0]) | (image > S1_VALID_DB[1])
    return image, ~invalid.any(axis=0)


def band_stats_of(images: Iterable[tuple[np.ndarray, np.ndarray]], n_bands: int) -> BandStats:
    """Mean and (population) std per band over the valid pixels of ``images``: pairs of float
    [C, H, W] pixels and a bool [H, W] valid mask, through the core's one accumulator
    (:func:`domainfm.data.band_statistics`: float64 sums; a constant band gets std 1). No valid
    pixel at all: ``valid_pixels == 0`` (zeros and ones), for the caller to refuse in its own words."""
    from domainfm.data import band_statistics

    import itertools

    images = iter(images)
    first = next(images, None)  # read errors of the files themselves propagate from here and below
    if first is None:  # no image at all: nothing valid
        return BandStats((0.0,) * n_bands, (1.0,) * n_bands, 0)
    s = band_statistics(np.where(valid[None], image.astype(np.float64), np.nan)
                        for image, valid in itertools.chain([first], images))
    return BandStats(tuple(float(x) for x in s.mean), tuple(float(x) for x in s.std), int(s.count.min()))


def compute_band_stats(files: Sequence[PatchFile], modality: str | None = None, **radiometry: str) -> BandStats:
    """Mean and std per band over all valid pixels of ``files`` (:func:`band_stats_of`)."""
    images = (read_image(f.path, f.nodata, modality=modality, **radiometry)
              for f in track_progress(files, "computing band statistics"))
    stats = band_stats_of(images, files[0].count)
    if stats.valid_pixels == 0:
        raise DomainFMError("every pixel of every image is nodata", path=files[0].path.parent,
                            fix="check the nodata value of the GeoTIFFs")
    return stats


def load_or_compute_stats(root: str | Path, modality: str, files: Sequence[PatchFile], **radiometry: str) -> BandStats:
    """The cached statistics of ``ROOT/.domainfm_stats_<modality>.json``, recomputed when the file
    list or the radiometry settings (``s2_harmonize``, ``s1_units``) changed. Written atomically;
    a read-only data folder only loses the cache."""
    path = Path(root) / STATS_FILE.format(modality=modality)
    fingerprint = file_list_fingerprint([f.path for f in files])
    if any(v not in ("auto", "db") for v in radiometry.values()):  # non-default settings: other units
        fingerprint += ":" + ",".join(f"{k}={v}" for k, v in sorted(radiometry.items()))
    cached = read_cache(path, fingerprint)
    try:
        if cached is not None and len(cached["mean"]) == len(cached["std"]) == files[0].count:
            return BandStats(tuple(cached["mean"]), tuple(cached["std"]), int(cached.get("valid_pixels", 0)))
    except (KeyError, TypeError):
        pass  # a damaged cache is recomputed and overwritten
    stats = compute_band_stats(files, modality, **radiometry)
    write_cache(path, {"version": STATS_VERSION, "modality": modality, "bands": list(BANDS[modality]),
                       "n_files": len(files), "fingerprint": fingerprint, "mean": list(stats.mean),
                       "std": list(stats.std), "valid_pixels": stats.valid_pixels})
    return stats
