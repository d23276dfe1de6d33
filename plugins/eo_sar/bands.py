"""Band and class names of the eo-sar plugin, and alignment of data bands to a model's bands.

Pure constants and numpy/torch-agnostic helpers: safe to import anywhere (nothing heavy at import).
Band names follow ESA's Sentinel-2 convention without zero padding (``B1`` .. ``B12``, ``B8A``) and
Sentinel-1 polarisations (``VV``, ``VH``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from domainfm.errors import DomainFMError

# Sentinel-2 L1C (top-of-atmosphere) band order, the standard order of SAFE products, SSL4EO-S12
# ``s2c`` and EuroSAT: B8A right after B8. Reflectance x 10000.
S2_L1C_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
# Sentinel-2 L2A (surface reflectance): the same order without the cirrus band B10 (SSL4EO-S12
# ``s2a``, BigEarthNet).
S2_L2A_BANDS = tuple(b for b in S2_L1C_BANDS if b != "B10")
S2_BANDS = S2_L1C_BANDS
# Sentinel-1 GRD dual polarisation, backscatter in dB.
S1_BANDS = ("VV", "VH")
# True colour: red, green, blue. An RGB image fed to a Sentinel-2 model carries these names.
S2_RGB_BANDS = ("B4", "B3", "B2")
RGB_BANDS = S2_RGB_BANDS

# Bands per modality name used on the command line (``--modality``): ``s2`` is L1C, ``s2-l2a`` is
# L2A, ``s1`` is VV/VH. BANDS below keeps the folder modalities of the domainfm layout.
MODALITY_BANDS = {"s2": S2_L1C_BANDS, "s2-l2a": S2_L2A_BANDS, "s1": S1_BANDS}
# Nominal ground sampling distance (m) of each modality's patches (S2 resampled to 10 m, S1 GRD 10 m).
MODALITY_GSD_M = {"s2": 10.0, "s2-l2a": 10.0, "s1": 10.0}

BANDS = {"s2": S2_BANDS, "s1": S1_BANDS}
MODALITIES = tuple(BANDS)
MODALITY_NAMES = {"s2": "Sentinel-2 multispectral", "s1": "Sentinel-1 SAR"}

# Dynamic World land-cover classes; the class id in landcover/ rasters is the index here.
CLASS_NAMES = (
    "water",
    "trees",
    "grass",
    "flooded_vegetation",
    "crops",
    "shrub_and_scrub",
    "built",
    "bare",
    "snow_and_ice",
)
LANDCOVER_NODATA = 255

# True-colour bands (B4, B3, B2) as indices into S2_BANDS, for plots.
S2_RGB = (S2_BANDS.index("B4"), S2_BANDS.index("B3"), S2_BANDS.index("B2"))



def sensor_of(modality: str) -> str:
    """``"s2"`` for ``s2`` / ``s2-l2a``, ``"s1"`` for ``s1`` (raises DomainFMError otherwise)."""
    if modality in ("s2", "s2-l2a"):
        return "s2"
    if modality == "s1":
        return "s1"
    raise DomainFMError(f"unknown modality {modality!r}", fix=f"use --modality {' or '.join(MODALITY_BANDS)}")


_KNOWN = {b.upper(): b for b in (*S2_L1C_BANDS, *S1_BANDS)}
_S2_NAME = re.compile(r"^B0*([0-9]{1,2})(A?)$")


def try_normalize_band_name(name: Any) -> str | None:
    """The canonical name of ``name``, or None when it names no Sentinel-1/2 band.

    Case-insensitive; zero padding is dropped (``B01`` -> ``B1``, ``b08a`` -> ``B8A``); ``VV``/``VH``
    (also ``vv``). Surrounding white space is ignored.
    """
    if not isinstance(name, str):
        return None
    text = name.strip().upper()
    if text in _KNOWN:
        return _KNOWN[text]
    m = _S2_NAME.match(text)
    if m:
        candidate = f"B{int(m.group(1))}{m.group(2)}"
        return _KNOWN.get(candidate)
    return None


def normalize_band_name(name: str) -> str:
    """Canonical band name: ``"B01"`` -> ``"B1"``, ``"b8a"`` -> ``"B8A"``, ``"vh"`` -> ``"VH"``.

    Raises DomainFMError (one line) for a name that is no Sentinel-1/2 band.
    """
    canonical = try_normalize_band_name(name)
    if canonical is None:
        raise DomainFMError(f"unknown band name {name!r}",
                            fix=f"use Sentinel-2 names {', '.join(S2_L1C_BANDS)} or Sentinel-1 {', '.join(S1_BANDS)}")
    return canonical


def canonical_order(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` (already canonical) sorted into the standard order (S2 B1..B12 with B8A after B8,
    then VV, VH)."""
    rank = {b: i for i, b in enumerate((*S2_L1C_BANDS, *S1_BANDS))}
    return tuple(sorted(names, key=lambda b: rank[b]))


@dataclass(frozen=True)
class BandAlignment:
    """How data bands ``have`` map onto a model's bands ``want``.

    ``index[i]`` is the position in ``have`` of ``want[i]``, or None when the data lacks it (the
    band is filled). ``filled``: wanted bands the data lacks; ``dropped``: data bands the model
    does not take; ``reordered``: the shared bands come in another order.
    """

    have: tuple[str, ...]
    want: tuple[str, ...]
    index: tuple[int | None, ...]
    filled: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    reordered: bool = False
    fill_values: tuple[float, ...] = field(default=())

    @property
    def changed(self) -> bool:
        """True when the data does not already match the model band for band."""
        return self.have != self.want

    def summary(self) -> str:
        """One line for the console and MLflow: what was reordered, filled and dropped."""
        if not self.changed:
            return f"bands match the model ({', '.join(self.want)})"
        parts = [f"bands aligned by name to the model's {len(self.want)} ({', '.join(self.want)})"]
        if self.reordered:
            parts.append("reordered")
        if self.filled:
            parts.append(f"filled with the band mean: {', '.join(self.filled)}")
        if self.dropped:
            parts.append(f"dropped (the model has none): {', '.join(self.dropped)}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"have": list(self.have), "want": list(self.want), "filled": list(self.filled),
                "dropped": list(self.dropped), "reordered": self.reordered}

    def apply(self, x: Any) -> Any:
        """``x`` (numpy array or torch tensor, bands on axis -3: [C, H, W] or [B, C, H, W], or on
        the last axis of a 1-D/2-D [.., C] table when ``x.ndim <= 2``) with the model's bands."""
        axis = -3 if x.ndim >= 3 else -1
        if x.shape[axis] != len(self.have):
            raise DomainFMError(f"data has {x.shape[axis]} bands but {len(self.have)} band names "
                                f"({', '.join(self.have)})", fix="give one name per band")
        fills = self.fill_values or (0.0,) * len(self.want)
        parts = []
        for i, src in enumerate(self.index):
            if src is not None:
                parts.append(_take(x, src, axis))
            else:
                ref = _take(x, 0, axis)
                parts.append(ref * 0 + fills[i])
        return _stack(x, parts, axis)


def _take(x: Any, i: int, axis: int) -> Any:
    return x[..., i:i + 1, :, :] if axis == -3 else x[..., i:i + 1]


def _stack(x: Any, parts: list, axis: int) -> Any:
    if hasattr(x, "detach"):  # torch
        import torch

        return torch.cat(parts, dim=axis)
    import numpy as np

    return np.concatenate(parts, axis=axis)


def plan_band_alignment(have: Sequence[str], want: Sequence[str], *,
                        mean_fill: Mapping[str, float] | Sequence[float] | float | None = None) -> BandAlignment:
    """The :class:`BandAlignment` of data bands ``have`` to model bands ``want`` (names are
    normalised first).

    ``mean_fill``: value a missing band is filled with: a mapping band -> value, a sequence
    aligned with ``want`` (for example the model's per-band means, when the data is still raw), a
    single number, or None for 0 (the mean after normalisation).
    Raises DomainFMError naming both band lists when no band is shared, or when a list repeats a band.
    """
    have_n = tuple(normalize_band_name(b) for b in have)
    want_n = tuple(normalize_band_name(b) for b in want)
    for label, names in (("data", have_n), ("model", want_n)):
        dup = sorted({b for b in names if names.count(b) > 1})
        if dup:
            raise DomainFMError(f"the {label} bands name {', '.join(dup)} twice ({', '.join(names)})",
                                fix="give each band once")
    shared = [b for b in want_n if b in have_n]
    if not shared:
        raise DomainFMError(f"the data bands ({', '.join(have_n)}) and the model bands ({', '.join(want_n)}) "
                            "have no band in common",
                            fix="use a backbone pretrained on this sensor, or data with the bands the backbone was trained on")
    index = tuple(have_n.index(b) if b in have_n else None for b in want_n)
    filled = tuple(b for b in want_n if b not in have_n)
    dropped = tuple(b for b in have_n if b not in want_n)
    shared_in_data_order = [b for b in have_n if b in want_n]
    reordered = shared_in_data_order != shared
    if mean_fill is None:
        fills = (0.0,) * len(want_n)
    elif isinstance(mean_fill, Mapping):
        norm = {normalize_band_name(k): float(v) for k, v in mean_fill.items()}
        fills = tuple(norm.get(b, 0.0) for b in want_n)
    elif isinstance(mean_fill, (int, float)):
        fills = (float(mean_fill),) * len(want_n)
    else:
        fills = tuple(float(v) for v in mean_fill)
        if len(fills) != len(want_n):
            raise DomainFMError(f"mean_fill has {len(fills)} values for {len(want_n)} model bands")
    return BandAlignment(have_n, want_n, index, filled, dropped, reordered, fills)


def align_bands(x: Any, have: Sequence[str], want: Sequence[str], *,
                mean_fill: Mapping[str, float] | Sequence[float] | float | None = None) -> tuple[Any, BandAlignment]:
    """Reorder/fill/drop the bands of ``x`` (numpy or torch, [C, H, W] or [B, C, H, W]; bands on
    the last axis for a [.., C] table) from ``have`` to ``want``, by name.

    A band in ``want`` missing from ``have`` is filled with ``mean_fill`` (see
    :func:`plan_band_alignment`; default 0, the band mean after normalisation); a band in ``have``
    not in ``want`` is dropped. Returns the aligned array and the :class:`BandAlignment` report.
    Raises DomainFMError (naming both lists) when the two share no band.
    """
    plan = plan_band_alignment(have, want, mean_fill=mean_fill)
    return plan.apply(x), plan


STATS_FILE = ".domainfm_stats_{modality}.json"
LANDCOVER_CACHE_FILE = ".domainfm_landcover.json"
FILES_CACHE_FILE = ".domainfm_files_{modality}.json"
LABELS_FILE = "labels.csv"
