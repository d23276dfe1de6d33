"""Read one Sentinel-2 / Sentinel-1 GeoTIFF patch into the units every eo-sar model sees.

- Sentinel-2: top-of-atmosphere (L1C) or surface (L2A) reflectance x 10000. Declared per-band
  scales and offsets (GDAL's ``scale``/``offset``: value = DN * scale + offset) are applied; a
  scale of about 1e-4 means the file declares reflectance, which is multiplied back by 10000.
  Since processing baseline 04.00 (products from 25 January 2022) ESA adds 1000 to every digital
  number (``BOA_ADD_OFFSET`` / ``RADIO_ADD_OFFSET`` = -1000 in the product metadata);
  ``s2_harmonize`` brings such files back to the older encoding so that one place looks the same
  before and after 2022 (ESA, "Sentinel-2: New Processing Baseline 04.00", S2-PDGS-MPC-L2A-PB04).
- Sentinel-1: backscatter in dB. Linear power (declared, or every valid value in 0..1 with none
  negative) is refused unless ``s1_units="linear"``, which converts with 10 * log10.
- Band descriptions that name bands (``B1``/``B01``/``B8A``/``VV``..., case-insensitive) are
  honoured: the bands are returned in the canonical order (:data:`plugins.eo_sar.bands.S2_L1C_BANDS`)
  whatever order the file stores them in.

Everything a file can get wrong is a one-line :class:`~domainfm.errors.DomainFMError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from domainfm.errors import DomainFMError
from plugins.eo_sar.bands import (MODALITY_BANDS, S1_BANDS, S2_L1C_BANDS, canonical_order, sensor_of,
                                  try_normalize_band_name)

S2_HARMONIZE = ("auto", "on", "off")
S1_UNITS = ("db", "linear")
# ESA's offset since baseline 04.00, in digital numbers (reflectance x 10000).
BASELINE_04_OFFSET = -1000.0
# When a file carries no nodata tag: Sentinel-2 products fill with 0 (ESA's NODATA value).
DEFAULT_NODATA = {"s2": 0.0}
# Backscatter outside this range (dB) is a fill value (-9999, -32768...), never a measurement.
S1_VALID_DB = (-100.0, 50.0)

_OFFSET_TAGS = ("BOA_ADD_OFFSET", "RADIO_ADD_OFFSET")
_BASELINE_TAGS = ("PROCESSING_BASELINE", "PROCESSINGBASELINE", "BASELINE")
_LINEAR_WORDS = ("linear", "power", "intensity", "sigma0_linear", "natural")


@dataclass
class PatchInfo:
    """What :func:`read_patch` found in a file and did to it.

    - ``band_names``: the returned bands, in order; ``file_band_names``: as stored in the file
      (from its descriptions, or by position when they name no band); ``bands_from``:
      ``"descriptions"`` or ``"position"``; ``reordered``: the file stored them in another order.
    - ``baseline``: the ``PROCESSING_BASELINE`` tag as ``"04.00"`` (None when absent);
      ``declared_offset``: the harmonisation offset the file declares, in DN (-1000.0), from its band
      offsets or ``BOA_ADD_OFFSET``/``RADIO_ADD_OFFSET`` tags (None when none); ``offset_source``
      says where it came from; ``harmonized``: 1000 was subtracted (or the declared offset applied);
      ``scale_applied``: a declared scale other than 1 was applied.
    - ``s1_units``: units of the file (``"db"``/``"linear"``), ``converted_to_db``.
    - ``nodata``: the nodata value used; ``valid``: bool [H, W], False where any band is nodata,
      not finite or (S1) outside :data:`S1_VALID_DB`.
    """

    path: Path
    modality: str
    band_names: tuple[str, ...]
    file_band_names: tuple[str, ...]
    bands_from: str = "position"
    reordered: bool = False
    baseline: str | None = None
    declared_offset: float | None = None
    offset_source: str | None = None
    harmonized: bool = False
    s2_harmonize: str = "auto"
    scale_applied: bool = False
    s1_units: str | None = None
    converted_to_db: bool = False
    nodata: float | None = None
    crs: str | None = None
    dtype: str = ""
    valid: np.ndarray | None = field(default=None, repr=False)

    @property
    def actions(self) -> list[str]:
        """What was done, in words (empty when the file was read as stored)."""
        out = []
        if self.reordered:
            out.append("bands reordered from the band descriptions")
        if self.harmonized:
            out.append("harmonised (-1000 DN)")
        if self.scale_applied:
            out.append("declared scale applied (x 10000 units)")
        if self.converted_to_db:
            out.append("linear power converted to dB")
        return out

    def summary_key(self) -> str:
        """A short label grouping files that were read the same way, for ``eo-sar check``'s
        per-folder summary, e.g. ``"baseline 04.00, offset -1000 (band offsets): harmonised (-1000 DN)"``."""
        if sensor_of(self.modality) == "s1":
            what = f"units {self.s1_units or 'dB'}"
        else:
            what = f"baseline {self.baseline}" if self.baseline else "no baseline tag"
            what += (f", offset {self.declared_offset:g} ({self.offset_source})" if self.declared_offset is not None
                     else ", no offset")
        done = "; ".join(self.actions) or "read as stored"
        return f"{what}: {done}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-able record (no pixel mask)."""
        return {"path": str(self.path), "modality": self.modality, "band_names": list(self.band_names),
                "file_band_names": list(self.file_band_names), "bands_from": self.bands_from,
                "reordered": self.reordered, "baseline": self.baseline, "declared_offset": self.declared_offset,
                "offset_source": self.offset_source, "harmonized": self.harmonized,
                "s2_harmonize": self.s2_harmonize, "scale_applied": self.scale_applied, "s1_units": self.s1_units,
                "converted_to_db": self.converted_to_db, "nodata": self.nodata, "actions": self.actions}


def parse_baseline(value: Any) -> float | None:
    """``"04.00"``, ``"N0400"``, ``"0400"``, ``"4.0"`` -> 4.0; None when unreadable."""
    if value is None:
        return None
    text = str(value).strip().upper().lstrip("N")
    if re.fullmatch(r"\d{4}", text):
        return int(text[:2]) + int(text[2:]) / 100.0
    try:
        return float(text)
    except ValueError:
        return None


def _tag(tags: dict[str, str], names: Sequence[str]) -> tuple[str, str] | None:
    upper = {k.upper(): (k, v) for k, v in tags.items()}
    for n in names:
        if n in upper:
            return upper[n]
    return None


def band_names_from_descriptions(path: Path, descriptions: Sequence[str | None], modality: str) -> tuple[str, ...] | None:
    """The canonical names the GeoTIFF band descriptions give, or None when they name no band.

    Raises DomainFMError when some descriptions name bands and others do not (an unknown name),
    when a band is named twice, or when a name belongs to the other sensor.
    """
    texts = [d.strip() if isinstance(d, str) else "" for d in descriptions]
    names = [try_normalize_band_name(t) for t in texts]
    if not any(names):
        return None
    sensor = sensor_of(modality)
    allowed = S2_L1C_BANDS if sensor == "s2" else S1_BANDS
    unknown = [t or f"(band {i + 1} has no description)" for i, (t, n) in enumerate(zip(texts, names)) if n is None]
    if unknown:
        raise DomainFMError(f"band description {unknown[0]!r} names no band (descriptions: {', '.join(texts)})",
                            path=path, fix=f"name every band ({', '.join(allowed)}) or clear all band descriptions")
    foreign = [n for n in names if n not in allowed]
    if foreign:
        raise DomainFMError(f"band {foreign[0]} is not a {'Sentinel-2' if sensor == 's2' else 'Sentinel-1'} band "
                            f"but --modality is {modality}", path=path,
                            fix=f"put the file with the {'s1' if sensor == 's2' else 's2'} data or fix its band descriptions")
    dup = sorted({n for n in names if names.count(n) > 1}, key=names.index)
    if dup:
        raise DomainFMError(f"band descriptions name {', '.join(dup)} twice ({', '.join(texts)})", path=path,
                            fix="give every band its own name")
    return tuple(names)  # type: ignore[arg-type]


def read_patch(path: str | Path, *, modality: str, s2_harmonize: str = "auto", s1_units: str = "db",
               window: Any = None, nodata: float | None = None,
               src: Any = None) -> tuple[np.ndarray, tuple[str, ...], PatchInfo]:
    """float32 [C, H, W] pixels of ``path`` in model units, their band names, and a :class:`PatchInfo`.

    ``modality``: ``s2`` (L1C, 13 bands), ``s2-l2a`` (L2A, 12 bands) or ``s1`` (VV, VH). When the
    band descriptions name the bands, those names decide (any subset of the sensor's bands, in any
    stored order; returned in the canonical order); otherwise the band count must be the
    modality's and bands are taken by position.
    ``s2_harmonize``: ``auto`` subtracts 1000 DN where the file declares it (a band offset of -1000,
    a ``BOA_ADD_OFFSET``/``RADIO_ADD_OFFSET`` tag) or its ``PROCESSING_BASELINE`` is >= 04.00;
    ``on`` treats every file as baseline >= 04.00 (a file declaring otherwise is an error);
    ``off`` never subtracts. Values below the offset clip to 0 (ESA's harmonisation).
    ``s1_units``: ``db`` (files must hold dB) or ``linear`` (10 * log10 is applied).
    ``window``: a rasterio ``Window`` to read part of the file. ``nodata`` overrides the file's tag.
    Invalid pixels keep their values; ``info.valid`` marks them. ``src``: an already open rasterio
    dataset of ``path`` to read from (window after window of one scene: GDAL's block cache then
    keeps the tiles a window shares with the previous one, instead of decompressing them again).
    Raises DomainFMError (one line, naming the file) on unreadable files and on each case above.
    """
    import rasterio
    from rasterio.errors import RasterioError

    path = Path(path)
    if modality not in MODALITY_BANDS:
        raise DomainFMError(f"unknown modality {modality!r}", fix=f"use --modality {' or '.join(MODALITY_BANDS)}")
    if s2_harmonize not in S2_HARMONIZE:
        raise DomainFMError(f"--s2-harmonize {s2_harmonize!r} is not one of {', '.join(S2_HARMONIZE)}")
    if s1_units not in S1_UNITS:
        raise DomainFMError(f"--s1-units {s1_units!r} is not one of {', '.join(S1_UNITS)}")
    sensor = sensor_of(modality)
    import contextlib

    try:
        with (contextlib.nullcontext(src) if src is not None else rasterio.open(path)) as src:
            raw = src.read(window=window)
            descriptions = src.descriptions
            scales = tuple(float(s) if s is not None else 1.0 for s in src.scales)
            offsets = tuple(float(o) if o is not None else 0.0 for o in src.offsets)
            units = tuple(u or "" for u in src.units)
            tags = dict(src.tags())
            band_tags = [dict(src.tags(i + 1)) for i in range(src.count)]
            file_nodata = src.nodata
            crs = src.crs.to_string() if src.crs else None
            dtype = src.dtypes[0]
    except RasterioError as e:
        from plugins.eo_sar.files import unreadable

        raise unreadable(path, e) from None

    count = raw.shape[0]
    named = band_names_from_descriptions(path, descriptions, modality)
    if named is None:
        expected = MODALITY_BANDS[modality]
        if count != len(expected):
            raise DomainFMError(f"has {count} band(s) but --modality {modality} needs {len(expected)} "
                                "and its band descriptions name no bands", path=path,
                                fix=f"export the {len(expected)} bands {', '.join(expected)} or name the bands in the "
                                    "GeoTIFF band descriptions")
        file_names = tuple(expected)
        bands_from = "position"
    else:
        file_names = named
        bands_from = "descriptions"
    order = canonical_order(file_names)
    perm = [file_names.index(b) for b in order]

    nodata_value = nodata if nodata is not None else file_nodata
    if nodata_value is None:
        nodata_value = DEFAULT_NODATA.get(sensor)
    image = raw.astype(np.float32, copy=True)
    # integers are always finite: one pass over the pixels less for the usual uint16 scene
    invalid = ~np.isfinite(image) if raw.dtype.kind == "f" else None
    if nodata_value is not None and np.isfinite(nodata_value):
        equal = raw == np.asarray(nodata_value).astype(raw.dtype)
        invalid = equal if invalid is None else invalid | equal
    invalid_any = invalid.any(axis=0) if invalid is not None else np.zeros(image.shape[1:], dtype=bool)

    info = PatchInfo(path=path, modality=modality, band_names=order, file_band_names=file_names,
                     bands_from=bands_from, reordered=list(order) != list(file_names), s2_harmonize=s2_harmonize,
                     nodata=None if nodata_value is None else float(nodata_value), crs=crs, dtype=dtype)
    if sensor == "s2":
        image = _s2_units(path, image, scales, offsets, tags, band_tags, s2_harmonize, info)
    else:
        image, invalid_any = _s1_units(path, image, invalid_any, scales, offsets, units, tags, s1_units, info)
    if perm != list(range(len(perm))):  # fancy indexing copies: only when the stored order differs
        image = image[perm]
    info.valid = ~invalid_any
    return np.ascontiguousarray(image, dtype=np.float32), order, info


def declared_s2_offset(scales: Sequence[float], offsets: Sequence[float], tags: dict[str, str],
                       band_tags: Sequence[dict[str, str]]) -> tuple[float | None, str | None]:
    """The harmonisation offset a file declares, in DN, and where: band offsets (GDAL ``offset``,
    converted to DN by the band's scale), else a ``BOA_ADD_OFFSET``/``RADIO_ADD_OFFSET`` tag of the
    file or of its bands. (None, None) when nothing is declared."""
    dn_offsets = {o / s if s else o for s, o in zip(scales, offsets) if o}
    if dn_offsets:
        return float(np.mean(sorted(dn_offsets))) if len(dn_offsets) > 1 else dn_offsets.pop(), "band offsets"
    for where, t in [("tag", tags), *[("band tag", bt) for bt in band_tags]]:
        hit = _tag(t, _OFFSET_TAGS)
        if hit is not None:
            try:
                return float(hit[1]), f"{hit[0]} {where}"
            except ValueError:
                continue
    return None, None


def _s2_to_units(scale: float) -> float:
    """Factor from a band's DN to reflectance x 10000 (GDAL scale ~1e-4: reflectance; else the scale)."""
    return 10000.0 * scale if 0 < scale < 0.01 else scale


def _s2_units(path: Path, image: np.ndarray, scales, offsets, tags, band_tags, mode: str, info: PatchInfo) -> np.ndarray:
    baseline_tag = _tag(tags, _BASELINE_TAGS)
    baseline = parse_baseline(baseline_tag[1]) if baseline_tag else None
    info.baseline = f"{baseline:05.2f}" if baseline is not None else None
    offset_dn, source = declared_s2_offset(scales, offsets, tags, band_tags)
    info.declared_offset, info.offset_source = offset_dn, source

    if mode == "on":
        contradiction = None
        if offset_dn is not None and not math.isclose(offset_dn, BASELINE_04_OFFSET):
            contradiction = f"declares an offset of {offset_dn:g} DN ({source})"
        elif offset_dn is None and baseline is not None and baseline < 4.0:
            contradiction = f"declares processing baseline {info.baseline} (before 04.00: no offset)"
        if contradiction:
            raise DomainFMError(f"{contradiction}, but --s2-harmonize on subtracts 1000", path=path,
                                fix="use --s2-harmonize auto to follow what each file declares")
        subtract = -BASELINE_04_OFFSET
    elif mode == "off":
        subtract = 0.0
    else:  # auto
        if offset_dn is not None:
            subtract = -offset_dn
        elif baseline is not None and baseline >= 4.0:
            subtract = -BASELINE_04_OFFSET
        else:
            subtract = 0.0

    # GDAL's value = DN * scale + offset. The offset in DN is offset / scale (declared_s2_offset);
    # DN * scale is reflectance (scale ~1e-4, brought back to x 10000) or reflectance x 10000 (1).
    info.harmonized = bool(subtract)
    if not subtract and all(s == 1.0 for s in scales[:image.shape[0]]):
        info.scale_applied = False
        return image  # DN = reflectance x 10000 already (the usual file): x * 1.0 == x, no pass needed
    out = np.empty_like(image)
    any_scale = False
    for b in range(image.shape[0]):
        s = scales[b] if b < len(scales) else 1.0
        to_units = _s2_to_units(s)
        if not math.isclose(s, 1.0, rel_tol=1e-6):
            any_scale = True
        dn = np.maximum(image[b] - subtract, 0.0) if subtract else image[b]
        out[b] = dn * to_units
    info.harmonized = bool(subtract)
    info.scale_applied = any_scale
    return out


def _declares_linear(units: Sequence[str], tags: dict[str, str]) -> bool | None:
    """True when the file declares linear power, False when it declares dB, None when silent."""
    words = [u.lower() for u in units if u] + [str(v).lower() for k, v in tags.items()
                                               if k.upper() in ("UNITS", "UNIT", "BACKSCATTER_UNITS", "SCALE_TYPE")]
    if any(w.replace(" ", "") in ("db", "decibel", "decibels") for w in words):
        return False
    if any(any(x in w for x in _LINEAR_WORDS) for w in words):
        return True
    return None


def _s1_units(path: Path, image: np.ndarray, invalid: np.ndarray, scales, offsets, units, tags, s1_units: str,
              info: PatchInfo) -> tuple[np.ndarray, np.ndarray]:
    for b in range(image.shape[0]):
        s = scales[b] if b < len(scales) else 1.0
        o = offsets[b] if b < len(offsets) else 0.0
        if s != 1.0 or o != 0.0:
            image[b] = image[b] * s + o
            info.scale_applied = True
    declared = _declares_linear(units, tags)
    values = image[:, ~invalid]
    looks_linear = values.size > 0 and float(values.min()) >= 0.0 and float(values.max()) <= 1.0
    if s1_units == "db":
        if declared or (declared is None and looks_linear):
            why = "declares linear power" if declared else "holds linear power (every valid value in 0..1, none negative)"
            raise DomainFMError(f"Sentinel-1 file {why}, the model takes dB", path=path,
                                fix="pass --s1-units linear to convert with 10*log10, or export the backscatter in dB")
        info.s1_units = "db"
    else:
        if declared is False:
            raise DomainFMError("Sentinel-1 file declares dB but --s1-units linear would take the log again", path=path,
                                fix="drop --s1-units linear (dB is the default)")
        with np.errstate(divide="ignore", invalid="ignore"):
            image = (10.0 * np.log10(image)).astype(np.float32)
        info.s1_units = "linear"
        info.converted_to_db = True
    with np.errstate(invalid="ignore"):
        invalid = invalid | ~np.isfinite(image).all(axis=0) | ((image < S1_VALID_DB[0]) | (image > S1_VALID_DB[1])).any(axis=0)
    return image, invalid


def radiometry_summary(paths: Sequence[str | Path], *, modality: str, s2_harmonize: str = "auto",
                       s1_units: str = "db") -> list[str]:
    """Lines for ``eo-sar check``: per folder, how many files carry which baseline/offset (S2) or
    units (S1) and what was done to them, and how many had their bands reordered from the
    descriptions. Reads every file (the checks of :func:`read_patch` apply)."""
    from collections import Counter, defaultdict

    groups: dict[Path, Counter] = defaultdict(Counter)
    reordered: dict[Path, list[str]] = defaultdict(list)
    for p in paths:
        _, _, info = read_patch(p, modality=modality, s2_harmonize=s2_harmonize, s1_units=s1_units)
        folder = Path(p).parent
        groups[folder][info.summary_key()] += 1
        if info.reordered:
            reordered[folder].append(Path(p).name)
    lines = []
    for folder, counts in groups.items():
        total = sum(counts.values())
        option = f"--s2-harmonize {s2_harmonize}" if sensor_of(modality) == "s2" else f"--s1-units {s1_units}"
        lines.append(f"radiometry of {folder} ({total} files, {option}):")
        for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {n:>6} file(s): {key}")
        if reordered[folder]:
            names = reordered[folder]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            lines.append(f"  bands reordered from the band descriptions in {len(names)} file(s): {shown}")
    return lines
