"""Dynamic World land-cover multi-labels of a domainfm-layout data root.

``ROOT/landcover/<patch_id>.tif`` (1 band, class ids 0..8, nodata 255) gives each class's share of
a patch's valid pixels; a class is a label when its share reaches ``--label-threshold``.
``ROOT/labels.csv`` (patch_id + one 0/1 column per class) gives the labels directly and wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from domainfm.data import read_csv_rows
from domainfm.errors import DomainFMError
from plugins.eo_sar.bands import CLASS_NAMES, LANDCOVER_CACHE_FILE, LANDCOVER_NODATA
from plugins.eo_sar.files import (STATS_VERSION, check_band_count, file_list_fingerprint, read_cache, tiff_files,
                                  track_progress, unreadable, write_cache)


def landcover_counts(landcover: np.ndarray) -> np.ndarray:
    """Valid pixels per Dynamic World class; 255 (nodata) and ids outside 0..8 are not valid."""
    values = landcover[(landcover != LANDCOVER_NODATA) & (landcover < len(CLASS_NAMES))].astype(np.int64)
    return np.bincount(values.ravel(), minlength=len(CLASS_NAMES))


def fractions_from_counts(counts: np.ndarray) -> np.ndarray:
    """Fraction of the valid pixels covered by each class (zeros if no pixel is valid)."""
    counts = np.asarray(counts)
    total = counts.sum()
    return counts / total if total else np.zeros(len(CLASS_NAMES))


def landcover_fractions(landcover: np.ndarray) -> np.ndarray:
    """Fraction of the valid pixels of a land-cover map covered by each Dynamic World class."""
    return fractions_from_counts(landcover_counts(landcover))


def labels_from_fractions(fractions: np.ndarray, threshold: float) -> np.ndarray:
    """Multi-hot labels: a class is present when it covers at least ``threshold`` of the valid pixels."""
    return (np.asarray(fractions) >= threshold).astype(np.float32)


def read_landcover(path: Path) -> np.ndarray:
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path) as src:
            check_band_count(path, src.count, None)
            band = src.read(1)
            if src.nodata is not None and src.nodata != LANDCOVER_NODATA:
                band = np.where(band == src.nodata, LANDCOVER_NODATA, band)
            return band
    except RasterioError as e:
        raise unreadable(path, e) from None


def read_labels_csv(path: Path, patch_ids: Sequence[str], modality_folder: Path) -> dict[str, np.ndarray]:
    """Labels from ``labels.csv``: patch_id plus one 0/1 column per Dynamic World class name."""
    known = set(patch_ids)
    rows = read_csv_rows(path, what="labels CSV")  # the core's one CSV reader (BOM, CRLF, spaces)
    header = rows.columns
    if not header or header[0] != "patch_id":
        raise DomainFMError("the first column must be patch_id", path=path,
                            fix=f"write a header line: patch_id,{','.join(CLASS_NAMES)}")
    columns = header[1:]
    unknown = [c for c in columns if c not in CLASS_NAMES]
    if unknown:
        raise DomainFMError(f"unknown class column {unknown[0]!r}", path=path,
                            fix=f"use Dynamic World class names: {', '.join(CLASS_NAMES)}")
    missing = [c for c in CLASS_NAMES if c not in columns]
    if missing:
        raise DomainFMError(f"missing class column(s) {', '.join(missing)}", path=path,
                            fix="give one 0/1 column per class (0 where absent)")
    labels: dict[str, np.ndarray] = {}
    for line_no, row in zip(rows.lines, rows):
        pid = row["patch_id"]
        if pid not in known:
            raise DomainFMError(f"patch id {pid!r} (line {line_no}) has no image {modality_folder / (pid + '.tif')}",
                                path=path, fix="remove the row or add the image")
        try:
            values = [int(row[c]) for c in CLASS_NAMES]
        except ValueError:
            values = [-1]
        if any(v not in (0, 1) for v in values):
            raise DomainFMError(f"line {line_no} has a value other than 0 or 1", path=path, fix="use 0/1 per class")
        labels[pid] = np.asarray(values, dtype=np.float32)
    return labels


def load_or_compute_landcover_counts(root: str | Path) -> dict[str, np.ndarray]:
    """Valid pixels per class for every ``ROOT/landcover/*.tif``, cached in
    ``ROOT/.domainfm_landcover.json`` (a million small rasters take minutes to read; the counts
    keep any --label-threshold possible without reading them again)."""
    folder = Path(root) / "landcover"
    if not folder.is_dir():
        return {}
    paths = tiff_files(folder)
    path = Path(root) / LANDCOVER_CACHE_FILE
    # band statistics barely move when one file is edited; a patch's labels do: mtimes count here
    fingerprint = file_list_fingerprint(paths, with_mtime=True)
    cached = read_cache(path, fingerprint)
    if cached is not None and isinstance(cached.get("counts"), dict):
        return {pid: np.asarray(c, dtype=np.int64) for pid, c in cached["counts"].items()}
    counts = {p.stem: landcover_counts(read_landcover(p)) for p in track_progress(paths, "counting land-cover classes")}
    write_cache(path, {"version": STATS_VERSION, "classes": list(CLASS_NAMES), "n_files": len(paths),
                       "fingerprint": fingerprint, "counts": {k: v.tolist() for k, v in counts.items()}})
    return counts
