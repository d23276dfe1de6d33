"""Sentinel-2 / Sentinel-1 GeoTIFF patches with Dynamic World multi-labels, torchgeo style.

Layout of a data root::

    ROOT/s2/<patch_id>.tif         13 bands B1..B12 (B8A after B8), uint16 reflectance x 10000
    ROOT/s1/<patch_id>.tif         2 bands VV, VH, float32 backscatter in dB
    ROOT/landcover/<patch_id>.tif  1 band, Dynamic World class ids 0..8, nodata 255
    ROOT/labels.csv                optional: patch_id + one 0/1 column per class; wins over landcover/

Everything that can be wrong with the files is checked when the dataset is built (each header is
opened, and the last block of each image is read to catch truncated files), so a long training
run never dies on patch 90 000. Per-band normalisation statistics are computed once over the
valid pixels and cached beside the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from domainfm.data import read_csv_rows
from domainfm.errors import DomainFMError
from plugins.eo_sar.bands import (BANDS, CLASS_NAMES, FILES_CACHE_FILE, LABELS_FILE, LANDCOVER_CACHE_FILE, LANDCOVER_NODATA,
                                  MODALITY_NAMES, S2_RGB, STATS_FILE)

TIFF_SUFFIXES = (".tif", ".tiff")
STATS_VERSION = 1


@dataclass(frozen=True)
class PatchFile:
    """One validated GeoTIFF: what its header says."""

    patch_id: str
    path: Path
    height: int
    width: int
    count: int
    dtype: str
    crs: str | None
    nodata: float | None


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation over the valid pixels of a data root."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    valid_pixels: int = 0


# ----------------------------------------------------------------------------------------------
# scanning and validation
# ----------------------------------------------------------------------------------------------


def _tiffs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES)


def check_data_root(root: str | Path, modality: str) -> Path:
    """The modality folder of ``root`` (``ROOT/s2``), or a DomainFMError saying what is missing."""
    if modality not in BANDS:
        raise DomainFMError(f"unknown modality {modality!r}", fix=f"use --modality {' or '.join(BANDS)}")
    root = Path(root)
    if not root.is_dir():
        raise DomainFMError("data folder does not exist", path=root,
                            fix=f"give --data a folder holding {modality}/<patch_id>.tif, or omit --data to use the embedded sample")
    folder = root / modality
    if not any(root.iterdir()):
        raise DomainFMError("data folder is empty", path=root,
                            fix=f"put the patches in {folder}/<patch_id>.tif (see `domainfm eo-sar sample` for the layout)")
    if not folder.is_dir():
        others = [m for m in BANDS if (root / m).is_dir()]
        hint = f" (it has {', '.join(o + '/' for o in others)}: try --modality {others[0]})" if others else ""
        raise DomainFMError(f"no {modality}/ folder in the data folder{hint}", path=root,
                            fix=f"put the {MODALITY_NAMES[modality]} GeoTIFFs in {folder}")
    if not _tiffs(folder):
        raise DomainFMError("folder has no GeoTIFFs (*.tif)", path=folder,
                            fix=f"put the {MODALITY_NAMES[modality]} patches there as <patch_id>.tif")
    return folder


def read_header(path: Path, *, modality: str | None) -> PatchFile:
    """Open ``path``'s header, check its band count against ``modality`` (None: 1-band land
    cover) and read its last block (truncation check)."""
    import rasterio
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    try:
        with rasterio.open(path) as src:
            _check_band_count(path, src.count, modality)
            if modality is not None:  # duplicate / unknown band names: one line now, not mid-run
                from plugins.eo_sar.radiometry import band_names_from_descriptions

                band_names_from_descriptions(path, src.descriptions, modality)
            # GDAL writes the header first and the pixel blocks after it: a file cut short may
            # still open, but its last block cannot be read. Reading one block is cheap.
            block_h, block_w = src.block_shapes[0]
            row = (src.height - 1) // block_h * block_h
            col = (src.width - 1) // block_w * block_w
            src.read(src.count, window=Window(col, row, min(block_w, src.width - col), min(block_h, src.height - row)))
            return PatchFile(path.stem, path, src.height, src.width, src.count, src.dtypes[0],
                             src.crs.to_string() if src.crs else None, src.nodata)
    except RasterioError as e:
        raise _unreadable(path, e) from None


def _check_band_count(path: Path, count: int, modality: str | None) -> None:
    if modality is None:
        if count != 1:
            raise DomainFMError(f"land-cover raster has {count} bands, needs 1 (Dynamic World class ids)",
                                path=path, fix="keep only the label band")
        return
    expected = len(BANDS[modality])
    if count == expected:
        return
    other = [m for m in BANDS if m != modality and len(BANDS[m]) == count]
    if other:
        fix = f"move it to {path.parent.parent / other[0]}/, or use --modality {other[0]} if the whole folder is {MODALITY_NAMES[other[0]]}"
    else:
        fix = f"remove it or replace it with a {expected}-band export ({', '.join(BANDS[modality])})"
    raise DomainFMError(f"has {count} band(s) but --modality {modality} needs {expected}", path=path, fix=fix)


def _unreadable(path: Path, error: BaseException) -> DomainFMError:
    """A one-line error for a file GDAL cannot open or read, with GDAL's reason shortened."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "not recognized" in text or "not recognised" in text:
        what, why = "not a GeoTIFF", "GDAL does not recognise the format"
    elif "Read failed" in text:  # rasterio's wrapper of GDAL's block read error
        what, why = "truncated or corrupt GeoTIFF", "its pixel data ends early or cannot be decoded"
    else:
        what = "truncated or corrupt GeoTIFF"
        why = text.replace(str(path), "").replace(path.name + ":", "").strip(" :'")[:120]
    return DomainFMError(f"{what} ({why})", path=path, fix="re-export or re-download the file, or remove it")


def scan_patches(root: str | Path, modality: str, *, use_cache: bool = True) -> list[PatchFile]:
    """Every GeoTIFF of ``ROOT/<modality>``, each header validated (sorted by patch id).

    The validated headers are cached in ``ROOT/.domainfm_files_<modality>.json`` under a
    fingerprint of every file's name, size and modification time: a restart on a million
    unchanged patches then opens none of them, while any rewritten, added or removed file sends
    the whole folder through the checks again.
    """
    folder = check_data_root(root, modality)
    paths = _tiffs(folder)
    cache_path = Path(root) / FILES_CACHE_FILE.format(modality=modality)
    fingerprint = file_list_fingerprint(paths, with_mtime=True)
    cached = _read_cache(cache_path, fingerprint) if use_cache else None
    if cached is not None:
        try:
            by_name = {p.name: p for p in paths}
            return [PatchFile(Path(name).stem, by_name[name], int(h), int(w), int(c), str(dt), crs, nodata)
                    for name, h, w, c, dt, crs, nodata in cached["files"]]
        except (KeyError, TypeError, ValueError):
            pass  # a damaged cache: check the files again
    files = [read_header(p, modality=modality) for p in _progress(paths, "checking GeoTIFF headers")]
    seen: dict[str, Path] = {}
    for f in files:
        if f.patch_id in seen:
            raise DomainFMError(f"patch id {f.patch_id!r} appears twice (also {seen[f.patch_id].name})", path=f.path,
                                fix="keep one file per patch id")
        seen[f.patch_id] = f.path
    if use_cache:
        _write_cache(cache_path, {"version": STATS_VERSION, "modality": modality, "fingerprint": fingerprint,
                                  "files": [[f.path.name, f.height, f.width, f.count, f.dtype, f.crs, f.nodata]
                                            for f in files]})
    return files


def _progress(items: Sequence, description: str):
    """A rich progress bar on stderr for long scans; silent for a handful of files."""
    if len(items) < 500:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)


# ----------------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------------


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
            _check_band_count(path, src.count, None)
            band = src.read(1)
            if src.nodata is not None and src.nodata != LANDCOVER_NODATA:
                band = np.where(band == src.nodata, LANDCOVER_NODATA, band)
            return band
    except RasterioError as e:
        raise _unreadable(path, e) from None


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


# ----------------------------------------------------------------------------------------------
# normalisation statistics
# ----------------------------------------------------------------------------------------------


def file_list_fingerprint(paths: Sequence[Path], *, with_mtime: bool = False) -> str:
    """Changes when a file is added, removed, renamed or rewritten with a different size (and,
    ``with_mtime``, when it is rewritten at all)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns if with_mtime else 0}\n".encode())
    return h.hexdigest()


def _read_cache(path: Path, fingerprint: str) -> dict | None:
    """The JSON cache at ``path`` if it was written for ``fingerprint`` (a damaged one is ignored)."""
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except ValueError:
        return None
    if isinstance(cached, dict) and cached.get("version") == STATS_VERSION and cached.get("fingerprint") == fingerprint:
        return cached
    return None


def _write_cache(path: Path, record: dict) -> None:
    """Write atomically (tmp name, then rename); a read-only data folder only loses the cache."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)


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
        raise _unreadable(path, e) from None
    if nodata is None and modality is not None:
        nodata = DEFAULT_NODATA.get(modality)
    invalid = ~np.isfinite(image)
    if nodata is not None and np.isfinite(nodata):
        invalid |= image == np.float32(nodata)
    if modality == "s1":
        with np.errstate(invalid="ignore"):
            invalid |= (image < S1_VALID_DB[0]) | (image > S1_VALID_DB[1])
    return image, ~invalid.any(axis=0)


def compute_band_stats(files: Sequence[PatchFile], modality: str | None = None, **radiometry: str) -> BandStats:
    """Mean and std per band over all valid pixels (float64 sums: exact enough for 1e9 pixels)."""
    total = np.zeros(files[0].count)
    total_sq = np.zeros(files[0].count)
    count = 0
    for f in _progress(files, "computing band statistics"):
        image, valid = read_image(f.path, f.nodata, modality=modality, **radiometry)
        pixels = image[:, valid].astype(np.float64)
        total += pixels.sum(axis=1)
        total_sq += (pixels**2).sum(axis=1)
        count += pixels.shape[1]
    if count == 0:
        raise DomainFMError("every pixel of every image is nodata", path=files[0].path.parent,
                            fix="check the nodata value of the GeoTIFFs")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)  # a constant band: leave it centred, do not divide by zero
    return BandStats(tuple(float(x) for x in mean), tuple(float(x) for x in std), int(count))


def load_or_compute_stats(root: str | Path, modality: str, files: Sequence[PatchFile], **radiometry: str) -> BandStats:
    """The cached statistics of ``ROOT/.domainfm_stats_<modality>.json``, recomputed when the file
    list or the radiometry settings (``s2_harmonize``, ``s1_units``) changed. Written atomically;
    a read-only data folder only loses the cache."""
    path = Path(root) / STATS_FILE.format(modality=modality)
    fingerprint = file_list_fingerprint([f.path for f in files])
    if any(v not in ("auto", "db") for v in radiometry.values()):  # non-default settings: other units
        fingerprint += ":" + ",".join(f"{k}={v}" for k, v in sorted(radiometry.items()))
    cached = _read_cache(path, fingerprint)
    try:
        if cached is not None and len(cached["mean"]) == len(cached["std"]) == files[0].count:
            return BandStats(tuple(cached["mean"]), tuple(cached["std"]), int(cached.get("valid_pixels", 0)))
    except (KeyError, TypeError):
        pass  # a damaged cache is recomputed and overwritten
    stats = compute_band_stats(files, modality, **radiometry)
    _write_cache(path, {"version": STATS_VERSION, "modality": modality, "bands": list(BANDS[modality]),
                        "n_files": len(files), "fingerprint": fingerprint, "mean": list(stats.mean),
                        "std": list(stats.std), "valid_pixels": stats.valid_pixels})
    return stats


def load_or_compute_landcover_counts(root: str | Path) -> dict[str, np.ndarray]:
    """Valid pixels per class for every ``ROOT/landcover/*.tif``, cached in
    ``ROOT/.domainfm_landcover.json`` (a million small rasters take minutes to read; the counts
    keep any --label-threshold possible without reading them again)."""
    folder = Path(root) / "landcover"
    if not folder.is_dir():
        return {}
    paths = _tiffs(folder)
    path = Path(root) / LANDCOVER_CACHE_FILE
    # band statistics barely move when one file is edited; a patch's labels do: mtimes count here
    fingerprint = file_list_fingerprint(paths, with_mtime=True)
    cached = _read_cache(path, fingerprint)
    if cached is not None and isinstance(cached.get("counts"), dict):
        return {pid: np.asarray(c, dtype=np.int64) for pid, c in cached["counts"].items()}
    counts = {p.stem: landcover_counts(read_landcover(p)) for p in _progress(paths, "counting land-cover classes")}
    _write_cache(path, {"version": STATS_VERSION, "classes": list(CLASS_NAMES), "n_files": len(paths),
                        "fingerprint": fingerprint, "counts": {k: v.tolist() for k, v in counts.items()}})
    return counts


# ----------------------------------------------------------------------------------------------
# the dataset
# ----------------------------------------------------------------------------------------------


class EOSARPatches(Dataset):
    """Sentinel-2 (``modality="s2"``) or Sentinel-1 (``"s1"``) patches of a data root.

    ``dataset[i]`` is a dict:

    - ``image``: float32 tensor [C, H, W], normalised per band with the root's statistics, nodata
      pixels set to 0 (the band mean), so no nan ever reaches a model;
    - ``valid``: bool tensor [H, W], False where any band was nodata;
    - ``labels``: float32 multi-hot [9] over :data:`CLASS_NAMES` (all zeros when unknown);
    - ``has_labels``: bool; ``patch_id``: str; ``bands``: tuple of the band names, in order.

    ``s2_harmonize`` / ``s1_units``: see :func:`plugins.eo_sar.radiometry.read_patch`.

    ``transforms`` (a callable on that dict) runs last, as in torchgeo.
    """

    def __init__(self, root: str | Path, modality: str = "s2", *, label_threshold: float = 0.01,
                 transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 stats: BandStats | None = None, patch_ids: Sequence[str] | None = None,
                 s2_harmonize: str = "auto", s1_units: str = "db") -> None:
        if not 0.0 < label_threshold <= 1.0:
            raise DomainFMError(f"--label-threshold must be in (0, 1], got {label_threshold}")
        self.root = Path(root)
        self.modality = modality
        self.bands = BANDS[modality]
        self.label_threshold = label_threshold
        self.transforms = transforms
        self.radiometry = {"s2_harmonize": s2_harmonize, "s1_units": s1_units}
        files = scan_patches(self.root, modality)
        self.stats = stats if stats is not None else load_or_compute_stats(self.root, modality, files, **self.radiometry)
        self.fractions, labels_csv = self._load_labels(files)
        if patch_ids is not None:
            wanted = set(patch_ids)
            files = [f for f in files if f.patch_id in wanted]
        self.files = files
        self._labels = {}
        for f in files:
            if f.patch_id in labels_csv:
                self._labels[f.patch_id] = labels_csv[f.patch_id]
            elif f.patch_id in self.fractions:
                self._labels[f.patch_id] = labels_from_fractions(self.fractions[f.patch_id], label_threshold)
        self._mean = torch.tensor(self.stats.mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(self.stats.std, dtype=torch.float32)[:, None, None]

    def use_stats(self, stats: BandStats) -> None:
        """Normalise with ``stats`` from now on (e.g. a backbone's recorded statistics)."""
        self.stats = stats
        self._mean = torch.tensor(stats.mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(stats.std, dtype=torch.float32)[:, None, None]

    def _load_labels(self, files: Sequence[PatchFile]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        ids = [f.patch_id for f in files]
        csv_path = self.root / LABELS_FILE
        from_csv = read_labels_csv(csv_path, ids, self.root / self.modality) if csv_path.is_file() else {}
        counts = load_or_compute_landcover_counts(self.root)
        fractions = {pid: fractions_from_counts(counts[pid]) for pid in ids if pid in counts}
        return fractions, from_csv

    # -- torch Dataset ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.files)

    def __str__(self) -> str:
        return (f"{type(self).__name__} Dataset\n    modality: {self.modality} ({len(self.bands)} bands)\n"
                f"    root: {self.root}\n    size: {len(self)} ({len(self._labels)} labelled)")

    @property
    def patch_ids(self) -> list[str]:
        return [f.patch_id for f in self.files]

    def labels_of(self, index: int) -> np.ndarray | None:
        """The multi-hot labels of patch ``index``, None when it has none."""
        return self._labels.get(self.files[index].patch_id)

    def __getitem__(self, index: int) -> dict[str, Any]:
        f = self.files[index]
        from plugins.eo_sar.radiometry import read_patch

        raw, bands, info = read_patch(f.path, modality=self.modality, nodata=f.nodata, **self.radiometry)
        valid = info.valid
        image = (torch.from_numpy(raw) - self._mean) / self._std
        valid_t = torch.from_numpy(valid)
        image = torch.where(valid_t[None], image, torch.zeros(()))
        labels = self._labels.get(f.patch_id)
        sample = {
            "image": image,
            "valid": valid_t,
            "labels": torch.from_numpy(labels) if labels is not None else torch.zeros(len(CLASS_NAMES)),
            "has_labels": labels is not None,
            "patch_id": f.patch_id,
            "bands": bands,
        }
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def denormalise(self, image: torch.Tensor) -> torch.Tensor:
        """Back to reflectance x 10000 (S2) or dB (S1)."""
        return image * self._std + self._mean

    # -- plotting --------------------------------------------------------------------------------

    def plot(self, sample: dict[str, Any], *, show_titles: bool = True, suptitle: str | None = None,
             prediction: Sequence[float] | None = None):
        """A matplotlib Figure of ``sample``: true colour (B4, B3, B2, 2-98 % stretch) for S2, a
        VV / VH / VV-VH (ratio in dB) false colour for S1, with the present classes as title.
        ``prediction`` (scores per class) adds the classes scored above 0.5."""
        from matplotlib.figure import Figure

        image = self.denormalise(sample["image"].detach().float().cpu()).numpy()
        valid = sample.get("valid")
        valid = valid.numpy() if isinstance(valid, torch.Tensor) and valid.shape == image.shape[1:] else np.ones(image.shape[1:], bool)
        if self.modality == "s2":
            rgb = image[list(S2_RGB)]
        else:
            vv, vh = image[0], image[1]
            rgb = np.stack([vv, vh, vv - vh])
        rgb = percentile_stretch(rgb, valid)
        fig = Figure(figsize=(4, 4.4))
        ax = fig.subplots()
        ax.imshow(rgb.transpose(1, 2, 0))
        ax.set_axis_off()
        if show_titles:
            labels = sample.get("labels")
            names = [n for n, v in zip(CLASS_NAMES, labels.tolist()) if v > 0.5] if labels is not None else []
            title = ", ".join(names) if names else "no labels"
            if prediction is not None:
                pred = [n for n, s in zip(CLASS_NAMES, list(prediction)) if s > 0.5]
                title += "\npredicted: " + (", ".join(pred) or "none")
            ax.set_title(title, fontsize=8)
        if suptitle:
            fig.suptitle(suptitle)
        fig.tight_layout()
        return fig


def percentile_stretch(image: np.ndarray, valid: np.ndarray | None = None, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """Scale each band so its ``low``..``high`` percentiles (over valid pixels) map to 0..1;
    invalid pixels are black."""
    out = np.zeros_like(image, dtype=np.float32)
    mask = np.ones(image.shape[1:], bool) if valid is None else valid
    for b in range(image.shape[0]):
        values = image[b][mask]
        if values.size == 0:
            continue
        lo, hi = np.percentile(values, [low, high])
        out[b] = np.clip((image[b] - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    out[:, ~mask] = 0.0
    return out
