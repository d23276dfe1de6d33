"""Finding and checking the GeoTIFFs of a domainfm-layout data root, and the JSON caches beside it.

Everything that can be wrong with the files is checked when a dataset is built (each header is
opened, and the last block of each image is read to catch truncated files), so a long training
run never dies on patch 90 000. The validated headers, like the band statistics
(:mod:`plugins.eo_sar.band_stats`) and land-cover counts (:mod:`plugins.eo_sar.labels`), are
cached in JSON files beside the data under a fingerprint of the file list.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from domainfm.errors import DomainFMError, expect_folder
from plugins.eo_sar.bands import BANDS, FILES_CACHE_FILE, MODALITY_NAMES

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


def tiff_files(folder: Path) -> list[Path]:
    """The ``*.tif``/``*.tiff`` files of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES)


def check_data_root(root: str | Path, modality: str) -> Path:
    """The modality folder of ``root`` (``ROOT/s2``), or a DomainFMError saying what is missing."""
    if modality not in BANDS:
        raise DomainFMError(f"unknown modality {modality!r}", fix=f"use --modality {' or '.join(BANDS)}")
    root = Path(root)
    expect_folder(root, "--data", missing="data folder does not exist",
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
    if not tiff_files(folder):
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
            check_band_count(path, src.count, modality)
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
        raise unreadable(path, e) from None


def check_band_count(path: Path, count: int, modality: str | None) -> None:
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


def unreadable(path: Path, error: BaseException) -> DomainFMError:
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
    paths = tiff_files(folder)
    cache_path = Path(root) / FILES_CACHE_FILE.format(modality=modality)
    fingerprint = file_list_fingerprint(paths, with_mtime=True)
    cached = read_cache(cache_path, fingerprint) if use_cache else None
    if cached is not None:
        try:
            by_name = {p.name: p for p in paths}
            return [PatchFile(Path(name).stem, by_name[name], int(h), int(w), int(c), str(dt), crs, nodata)
                    for name, h, w, c, dt, crs, nodata in cached["files"]]
        except (KeyError, TypeError, ValueError):
            pass  # a damaged cache: check the files again
    files = [read_header(p, modality=modality) for p in track_progress(paths, "checking GeoTIFF headers")]
    seen: dict[str, Path] = {}
    for f in files:
        if f.patch_id in seen:
            raise DomainFMError(f"patch id {f.patch_id!r} appears twice (also {seen[f.patch_id].name})", path=f.path,
                                fix="keep one file per patch id")
        seen[f.patch_id] = f.path
    if use_cache:
        write_cache(cache_path, {"version": STATS_VERSION, "modality": modality, "fingerprint": fingerprint,
                                 "files": [[f.path.name, f.height, f.width, f.count, f.dtype, f.crs, f.nodata]
                                           for f in files]})
    return files


def track_progress(items: Sequence, description: str):
    """A rich progress bar on stderr for long scans; silent for a handful of files."""
    if len(items) < 500:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)


def file_list_fingerprint(paths: Sequence[Path], *, with_mtime: bool = False) -> str:
    """Changes when a file is added, removed, renamed or rewritten with a different size (and,
    ``with_mtime``, when it is rewritten at all)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns if with_mtime else 0}\n".encode())
    return h.hexdigest()


def read_cache(path: Path, fingerprint: str) -> dict | None:
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


def write_cache(path: Path, record: dict) -> None:
    """Write atomically (tmp name, then rename); a read-only data folder only loses the cache."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
