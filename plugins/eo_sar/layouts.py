"""Standard Earth-observation datasets by root path: SSL4EO-S12, BigEarthNet (v1 and v2), EuroSAT.

``--layout auto`` (the default) recognises a folder from its contents (:func:`detect_layout`);
:func:`open_layout` builds the dataset. Every dataset here behaves like
:class:`plugins.eo_sar.datasets.EOSARPatches` (same sample dict, ``plot``, ``bands``, ``stats``,
``labels_of``), so pretraining, ``evaluate``, ``eo-sar check``/``plot`` and sgd-ft take them alike:

- ``image``: float32 [C, H, W] normalised per band (the dataset's ``stats`` in model units:
  reflectance x 10000 for S2, dB for S1), nodata pixels 0; ``valid``: bool [H, W];
- ``bands``: the band names of ``image`` in order (canonical: B1..B12 with B8A after B8, VV, VH);
- ``labels``: float32 [K] multi-hot over ``class_names`` (one-hot for EuroSAT); ``has_labels``;
- ``patch_id``; SSL4EO-S12 with ``views="seasons"`` adds ``image_other``, another season of the
  same location (the seasonal positives of Wang et al. 2022).

torchgeo's classes decide the layouts and are used where they do the job: ``BigEarthNet``
(folder pairs from the split CSVs, the 43 -> 19 class mapping), ``BigEarthNetV2`` (class set,
CORINE code mapping, folder naming), ``EuroSAT`` (file list of a split, class folders, stored
band order with B8A last), ``SSL4EOS12`` (product folders and band lists). Their readers are not
used as such, for reasons stated where it matters: ``SSL4EOS12`` reports a fixed length of
251 079 and indexes location folders by number, so a partial download fails, and it samples seasons
with Python's global RNG; ``BigEarthNet*`` read every band with ``out_dtype="int32"``, which
truncates Sentinel-1 dB values, and ``BigEarthNetV2._verify`` demands S1, S2 and the reference maps
all present. Pixels are read with rasterio and brought to model units by
:mod:`plugins.eo_sar.radiometry`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from domainfm.errors import DomainFMError, expect_folder
from plugins.eo_sar.bands import CLASS_NAMES, LANDCOVER_NODATA, MODALITY_BANDS, S1_BANDS, canonical_order, normalize_band_name, sensor_of

from plugins.eo_sar.layout_names import EXPECTS, LAYOUT_MODALITIES, LAYOUTS, VIEWS  # noqa: E402

MAX_STATS_SAMPLES = 512  # band statistics of a large dataset come from a seeded sample of its patches
STATS_CACHE = ".domainfm_stats_{layout}_{modality}.json"
_LOCATION = re.compile(r"^\d{7}$")


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------


def _has_tifs(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in (".tif", ".tiff") for p in folder.iterdir())


def _has_locations(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() and _LOCATION.match(p.name) for p in folder.iterdir())


def layout_signatures(root: Path) -> list[str]:
    """The layouts whose marks ``root`` carries (none, one, or several when ambiguous)."""
    found = []
    if any(_has_tifs(root / m) for m in ("s2", "s1")):
        found.append("domainfm")
    if any(_has_locations(root / m) for m in ("s2c", "s2a", "s1")):
        found.append("ssl4eo-s12")
    if (root / "BigEarthNet-v1.0").is_dir() or (root / "BigEarthNet-S1-v1.0").is_dir() or any(root.glob("bigearthnet-*.csv")):
        found.append("bigearthnet")
    if (root / "metadata.parquet").is_file() or any((root / d).is_dir() for d in ("BigEarthNet-S2", "BigEarthNet-S1", "Reference_Maps")):
        found.append("bigearthnet-v2")
    if any(root.glob("eurosat-*.txt")) or (root / "ds" / "images" / "remote_sensing").is_dir():
        found.append("eurosat")
    return found


def _all_expectations() -> str:
    return "; ".join(f"{name}: {what}" for name, what in EXPECTS.items())


def detect_layout(root: str | Path) -> str:
    """The one layout ``root`` is in; a one-line DomainFMError listing the layouts and what each
    expects when it matches none or several."""
    root = Path(root)
    expect_folder(root, "--data", missing="data folder does not exist",
                  fix="give --data the root of a dataset (" + ", ".join(LAYOUTS[1:]) + ")")
    found = layout_signatures(root)
    if not found:
        raise DomainFMError(f"unrecognised data layout (expected {_all_expectations()})", path=root,
                            fix="point --data at the dataset's root folder, or pass --layout")
    if len(found) > 1:
        raise DomainFMError(f"ambiguous data layout: the folder looks like {' and '.join(found)} "
                            f"(expected one of {_all_expectations()})", path=root,
                            fix=f"pass --layout {found[0]} (or {', '.join(found[1:])}), or split the folder")
    return found[0]


def resolve_layout(root: str | Path, layout: str = "auto") -> tuple[str, str | None]:
    """``(layout, line)``: ``layout`` itself, or the detected one when ``auto`` with the one line
    saying which (print it once the data checks passed, so a bad input stays a one-line error).

    A missing or empty folder, or one with ``s2/``/``s1/`` folders but no other mark, is left to
    the domainfm layout's own checks (their errors say what is missing there)."""
    if layout not in LAYOUTS:
        raise DomainFMError(f"unknown layout {layout!r}", fix=f"use --layout {'|'.join(LAYOUTS)}")
    root = Path(root)
    if layout != "auto":
        # a folder of another dataset must not be blamed on its modality or missing files
        if layout != "domainfm" and root.is_dir() and any(root.iterdir()):
            found = layout_signatures(root)
            if layout not in found:
                looks = f"it looks like {' and '.join(found)}" if found else "it holds none of its folders or files"
                raise DomainFMError(f"the folder is not in layout {layout} ({looks}; {layout} expects {EXPECTS[layout]})",
                                    path=root, fix=f"pass --layout {found[0]}" if len(found) == 1 else
                                    "point --data at the dataset's root folder, or pass --layout auto")
        return layout, None
    if not root.is_dir() or not any(root.iterdir()) or (
            not layout_signatures(root) and any((root / m).is_dir() for m in ("s2", "s1"))):
        return "domainfm", None
    chosen = detect_layout(root)
    return chosen, f"eo-sar: {root} recognised as layout {chosen} ({EXPECTS[chosen]})"


def check_modality(layout: str, modality: str, root: Path) -> None:
    """A one-line error when ``layout`` has no ``modality``."""
    have = LAYOUT_MODALITIES.get(layout)
    if have is None or modality in have:
        return
    listing = ", ".join(f"{m} = {what}" for m, what in have.items())
    raise DomainFMError(f"layout {layout} has no --modality {modality} (it holds {listing})", path=root,
                        fix=f"use --modality {' or '.join(have)}")


# ----------------------------------------------------------------------------------------------
# reading pixels
# ----------------------------------------------------------------------------------------------


def read_bands(files: Sequence[Path], names: Sequence[str], *, modality: str, s2_harmonize: str = "auto",
               s1_units: str = "db", size: tuple[int, int] | None = None):
    """float32 [C, H, W] in model units, the canonical band names, and a PatchInfo.

    ``files``: one single-band GeoTIFF per name in ``names`` (SSL4EO-S12, BigEarthNet: bands at
    their native 10/20/60 m resolution are resampled bilinearly to the finest grid or ``size``,
    as torchgeo does), or one multi-band file whose bands are ``names`` in stored order (EuroSAT).
    Declared scale/offset, baseline 04.00 harmonisation and the S1 dB check come from
    :mod:`plugins.eo_sar.radiometry`; the bands come back in canonical order.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioError

    from plugins.eo_sar import radiometry as rad
    from plugins.eo_sar.files import unreadable

    names = tuple(normalize_band_name(n) for n in names)
    sensor = sensor_of(modality)
    arrays, invalid, scales, offsets, units, band_tags = [], [], [], [], [], []
    tags: dict[str, str] = {}
    crs = dtype = None
    nodata = None
    if size is None and len(files) > 1:
        shapes = []
        for p in files:
            try:
                with rasterio.open(p) as src:
                    shapes.append((src.height, src.width))
            except RasterioError as e:
                raise unreadable(Path(p), e) from None
        size = max(shapes)
    for p in files:
        try:
            with rasterio.open(p) as src:
                out_shape = (src.count, *size) if size is not None else None
                resampling = Resampling.bilinear if sensor == "s2" else Resampling.nearest
                data = src.read(out_shape=out_shape, resampling=resampling) if out_shape else src.read()
                nd = src.nodata if src.nodata is not None else rad.DEFAULT_NODATA.get(sensor)
                scales += [float(s) if s is not None else 1.0 for s in src.scales]
                offsets += [float(o) if o is not None else 0.0 for o in src.offsets]
                units += [u or "" for u in src.units]
                band_tags += [dict(src.tags(i + 1)) for i in range(src.count)]
                tags.update(src.tags())
                crs = crs or (src.crs.to_string() if src.crs else None)
                dtype = dtype or src.dtypes[0]
                nodata = nd if nodata is None else nodata
        except RasterioError as e:
            raise unreadable(Path(p), e) from None
        image = data.astype(np.float32)
        bad = ~np.isfinite(image)
        if nd is not None and np.isfinite(nd):
            bad |= data == np.asarray(nd).astype(data.dtype)
        arrays.append(image)
        invalid.append(bad)
    image = np.concatenate(arrays)
    if image.shape[0] != len(names):
        raise DomainFMError(f"has {image.shape[0]} band(s), the layout names {len(names)} ({', '.join(names)})",
                            path=files[0], fix="re-download the patch")
    invalid_any = np.concatenate(invalid).any(axis=0)
    order = canonical_order(names)
    info = rad.PatchInfo(path=Path(files[0]), modality=modality, band_names=order, file_band_names=names,
                         bands_from="layout", reordered=False, s2_harmonize=s2_harmonize,
                         nodata=None if nodata is None else float(nodata), crs=crs, dtype=dtype or "")
    if sensor == "s2":
        image = rad._s2_units(Path(files[0]), image, scales, offsets, tags, band_tags, s2_harmonize, info)
    else:
        image, invalid_any = rad._s1_units(Path(files[0]), image, invalid_any, scales, offsets, units, tags, s1_units, info)
    image = image[[names.index(b) for b in order]]
    info.layout_reordered = list(order) != list(names)  # the layout's stored order (EuroSAT: B8A last)
    info.valid = ~invalid_any
    return np.ascontiguousarray(image, dtype=np.float32), order, info


# ----------------------------------------------------------------------------------------------
# the datasets
# ----------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One patch: its id, split, band files per acquisition (several for SSL4EO-S12 seasons), and
    the stored band names of those files."""

    patch_id: str
    split: str
    acquisitions: list[list[Path]]
    names: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)


class LayoutPatches(Dataset):
    """Base of the standard-layout datasets (see the module doc for the sample dict)."""

    layout = ""
    class_names: tuple[str, ...] = CLASS_NAMES
    multilabel = True

    def __init__(self, root: str | Path, modality: str, *, split: str | Sequence[str] | None = None,
                 label_threshold: float = 0.01, transforms: Callable | None = None, stats=None,
                 s2_harmonize: str = "auto", s1_units: str = "db", views: str = "crops",
                 random_season: bool = False) -> None:
        if not 0.0 < label_threshold <= 1.0:
            raise DomainFMError(f"--label-threshold must be in (0, 1], got {label_threshold}")
        self.root = Path(root)
        check_modality(self.layout, modality, self.root)
        self.modality = modality
        self.label_threshold = label_threshold
        self.transforms = transforms
        self.radiometry = {"s2_harmonize": s2_harmonize, "s1_units": s1_units}
        self.views = views
        self.random_season = random_season
        self.notes: list[str] = []  # lines the commands print (labels source, skipped patches...)
        records = self._index()
        if not records:
            raise DomainFMError(f"no {modality} patches found for layout {self.layout}", path=self.root,
                                fix=f"check the download ({EXPECTS[self.layout]})")
        self.all_records = records
        splits = {split} if isinstance(split, str) else (set(split) if split is not None else None)
        self.records = [r for r in records if splits is None or r.split in splits]
        self.bands = canonical_order(tuple(normalize_band_name(n) for n in records[0].names))
        self._labels: dict[str, np.ndarray] = {}
        self._load_labels()
        self.stats = stats if stats is not None else self._stats()
        self._mean = torch.tensor(self.stats.mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(self.stats.std, dtype=torch.float32)[:, None, None]

    def use_stats(self, stats) -> None:
        """Normalise with ``stats`` (a BandStats in :attr:`bands` order, model units) from now on,
        e.g. a backbone's recorded statistics (sgd-ft fine-tuning on a standard layout)."""
        self.stats = stats
        self._mean = torch.tensor(stats.mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(stats.std, dtype=torch.float32)[:, None, None]

    # -- subclass hooks --------------------------------------------------------------------------

    def _index(self) -> list[Record]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_labels(self) -> None:
        """Fill ``self._labels`` (patch id -> float32 [K]) for the patches that have labels."""

    # -- shared machinery ------------------------------------------------------------------------

    @property
    def patch_ids(self) -> list[str]:
        return [r.patch_id for r in self.records]

    @property
    def splits(self) -> list[str]:
        return [r.split for r in self.records]

    def indices_of(self, split: str) -> list[int]:
        return [i for i, r in enumerate(self.records) if r.split == split]

    def labels_of(self, index: int) -> np.ndarray | None:
        return self._labels.get(self.records[index].patch_id)

    def __len__(self) -> int:
        return len(self.records)

    def __str__(self) -> str:
        return (f"{type(self).__name__} Dataset\n    layout: {self.layout}, modality: {self.modality} "
                f"({len(self.bands)} bands: {', '.join(self.bands)})\n    root: {self.root}\n"
                f"    size: {len(self)} ({len(self._labels)} labelled)")

    def read_raw(self, record: Record, acquisition: int = 0):
        return read_bands(record.acquisitions[acquisition], record.names, modality=self.modality, **self.radiometry)

    def _normalise(self, raw: np.ndarray, valid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image = (torch.from_numpy(raw) - self._mean) / self._std
        valid_t = torch.from_numpy(np.ascontiguousarray(valid))
        return torch.where(valid_t[None], image, torch.zeros(())), valid_t

    def _acquisition_pair(self, record: Record) -> tuple[int, int | None]:
        return 0, None

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        first, second = self._acquisition_pair(record)
        raw, bands, info = self.read_raw(record, first)
        image, valid = self._normalise(raw, info.valid)
        labels = self._labels.get(record.patch_id)
        sample = {
            "image": image,
            "valid": valid,
            "labels": torch.from_numpy(labels) if labels is not None else torch.zeros(len(self.class_names)),
            "has_labels": labels is not None,
            "patch_id": record.patch_id,
            "bands": bands,
        }
        if second is not None:
            raw2, _, info2 = self.read_raw(record, second)
            other, valid2 = self._normalise(raw2, info2.valid)
            if other.shape != image.shape:  # seasons on different grids: bring to the first one's
                other = torch.nn.functional.interpolate(other[None], size=image.shape[-2:], mode="bilinear",
                                                        align_corners=False)[0]
            sample["image_other"] = other
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def denormalise(self, image: torch.Tensor) -> torch.Tensor:
        return image * self._std + self._mean

    def _stats(self):
        """Per-band mean/std (model units) over the valid pixels of the training patches (a seeded
        sample of :data:`MAX_STATS_SAMPLES` for large sets), cached beside the data."""
        from plugins.eo_sar.band_stats import BandStats, band_stats_of
        from plugins.eo_sar.files import read_cache, write_cache

        pool = [r for r in self.all_records if r.split == "train"] or self.all_records
        if len(pool) > MAX_STATS_SAMPLES:
            rng = np.random.default_rng(0)
            pool = [pool[i] for i in sorted(rng.choice(len(pool), MAX_STATS_SAMPLES, replace=False))]
        settings = ",".join(f"{k}={v}" for k, v in sorted(self.radiometry.items()))
        fingerprint = f"{len(pool)}:{','.join(r.patch_id for r in pool)}:{settings}"
        import hashlib

        fingerprint = hashlib.sha256(fingerprint.encode()).hexdigest()
        path = self.root / STATS_CACHE.format(layout=self.layout, modality=self.modality)
        cached = read_cache(path, fingerprint)
        if cached is not None and len(cached.get("mean", [])) == len(self.bands):
            return BandStats(tuple(cached["mean"]), tuple(cached["std"]), int(cached.get("valid_pixels", 0)))
        def images():
            for r in pool:
                raw, _, info = self.read_raw(r, 0)
                yield raw, info.valid

        stats = band_stats_of(images(), len(self.bands))
        if stats.valid_pixels == 0:
            raise DomainFMError("every pixel of every patch is nodata", path=self.root,
                                fix="check the download and the nodata value of the GeoTIFFs")
        write_cache(path, {"version": 1, "fingerprint": fingerprint, "layout": self.layout, "modality": self.modality,
                           "bands": list(self.bands), "n_patches": len(pool), "mean": list(stats.mean),
                           "std": list(stats.std), "valid_pixels": stats.valid_pixels})
        return stats

    def headers(self) -> list[dict[str, Any]]:
        """Size and CRS of each patch's finest band file (``eo-sar check``); opens every file."""
        import rasterio
        from rasterio.errors import RasterioError

        from plugins.eo_sar.files import unreadable

        out = []
        for r in self.records:
            best = None
            for acquisition in r.acquisitions:
                for p in acquisition:
                    try:
                        with rasterio.open(p) as src:
                            if best is None or src.height > best["height"]:
                                best = {"height": src.height, "width": src.width,
                                        "crs": src.crs.to_string() if src.crs else None, "dtype": src.dtypes[0]}
                    except RasterioError as e:
                        raise unreadable(Path(p), e) from None
            out.append(best)
        return out

    # -- plotting (torchgeo's habit) -------------------------------------------------------------

    @property
    def rgb_bands(self) -> tuple[str, ...]:
        return ("B4", "B3", "B2") if sensor_of(self.modality) == "s2" else S1_BANDS

    def plot(self, sample: dict[str, Any], *, show_titles: bool = True, suptitle: str | None = None,
             prediction: Sequence[float] | None = None):
        """A matplotlib Figure: true colour (B4, B3, B2, 2-98 % stretch) for S2, VV / VH / VV-VH
        false colour for S1 (and the other season beside it when the sample has one), titled with
        the sample's classes (and ``prediction``'s, scores above 0.5)."""
        from matplotlib.figure import Figure

        from plugins.eo_sar.plots import percentile_stretch

        images = [sample["image"]] + ([sample["image_other"]] if "image_other" in sample else [])
        fig = Figure(figsize=(4 * len(images), 4.4))
        axes = np.atleast_1d(fig.subplots(1, len(images)))
        for k, (ax, img) in enumerate(zip(axes, images)):
            image = self.denormalise(img.detach().float().cpu()).numpy()
            valid = sample.get("valid")
            valid = valid.numpy() if k == 0 and isinstance(valid, torch.Tensor) and valid.shape == image.shape[1:] else None
            if sensor_of(self.modality) == "s2":
                rgb = image[[self.bands.index(b) for b in self.rgb_bands]]
            else:
                vv, vh = image[self.bands.index("VV")], image[self.bands.index("VH")]
                rgb = np.stack([vv, vh, vv - vh])
            ax.imshow(percentile_stretch(rgb, valid).transpose(1, 2, 0))
            ax.set_axis_off()
            if k == 1 and show_titles:
                ax.set_title("another season", fontsize=8)
        if show_titles:
            labels = sample.get("labels")
            names = [n for n, v in zip(self.class_names, labels.tolist()) if v > 0.5] if labels is not None else []
            title = ", ".join(names) if names else "no labels"
            if prediction is not None:
                pred = [n for n, s in zip(self.class_names, list(prediction)) if s > 0.5]
                title += "\npredicted: " + (", ".join(pred) or "none")
            axes[0].set_title(title, fontsize=7, wrap=True)
        if suptitle:
            fig.suptitle(suptitle)
        fig.tight_layout()
        return fig


def _need(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise DomainFMError(f"{what} missing", path=path, fix=fix)
    return path


# -- SSL4EO-S12 ---------------------------------------------------------------------------------


class SSL4EOS12Patches(LayoutPatches):
    """SSL4EO-S12 (Wang et al. 2022, arXiv:2211.07044) as torchgeo's ``SSL4EOS12`` lays it out:
    ``ROOT/{s2c,s2a,s1}/<location>/<acquisition>/<band>.tif``, four seasons per location.

    Only the locations on disk are used. ``views="seasons"``: each sample also carries another
    season of the same location (``image_other``), drawn at random; ``"crops"``: one random
    season. No official split: every location is ``train``. Multi-labels (Dynamic World classes)
    from ``labels_csv`` (``patch_id`` = location id + one 0/1 column per class) or
    ``landcover_dir`` (``<location id>.tif`` Dynamic World rasters); without either there are none.
    """

    layout = "ssl4eo-s12"
    FOLDER = {"s2": "s2c", "s2-l2a": "s2a", "s1": "s1"}

    def __init__(self, root, modality: str = "s2", *, labels_csv: str | Path | None = None,
                 landcover_dir: str | Path | None = None, **kwargs) -> None:
        self.labels_csv = Path(labels_csv) if labels_csv else None
        self.landcover_dir = Path(landcover_dir) if landcover_dir else None
        super().__init__(root, modality, **kwargs)

    def _index(self) -> list[Record]:
        from torchgeo.datasets import SSL4EOS12

        product = self.FOLDER[self.modality]
        folder = self.root / product
        if not _has_locations(folder):
            present = [m for m, f in self.FOLDER.items() if _has_locations(self.root / f)]
            raise DomainFMError(f"no {product}/ location folders for --modality {self.modality}"
                                + (f" (this download has {', '.join(self.FOLDER[m] + '/' for m in present)})" if present else ""),
                                path=self.root, fix=f"use --modality {' or '.join(present) or 's2'}, or download {product}")
        names = tuple(SSL4EOS12.metadata[product]["bands"])
        records = []
        for loc in sorted(p for p in folder.iterdir() if p.is_dir() and _LOCATION.match(p.name)):
            acquisitions = []
            for acq in sorted(p for p in loc.iterdir() if p.is_dir()):
                files = [acq / f"{b}.tif" for b in names]
                missing = [f for f in files if not f.is_file()]
                if missing:
                    raise DomainFMError(f"band file {missing[0].name} missing ({len(missing)} of {len(files)} missing)",
                                        path=acq, fix="re-download or remove this acquisition")
                acquisitions.append(files)
            if acquisitions:
                records.append(Record(loc.name, "train", acquisitions, names))
        return records

    def _load_labels(self) -> None:
        from plugins.eo_sar.labels import (fractions_from_counts, labels_from_fractions, landcover_counts, read_labels_csv,
                                           read_landcover)

        ids = [r.patch_id for r in self.all_records]
        if self.labels_csv is not None:
            path = _need(self.labels_csv, "labels CSV", "give --labels an existing CSV (patch_id + Dynamic World classes)")
            with open(path, newline="", encoding="utf-8-sig") as fh:
                listed = [row[0].strip() for row in list(csv.reader(fh))[1:] if row]
            # every location of the CSV is checked; those not downloaded are left out
            labels = read_labels_csv(path, listed, self.root / self.FOLDER[self.modality])
            self._labels = {k: v for k, v in labels.items() if k in set(ids)}
            self.notes.append(f"labels: {len(self._labels)} of {len(ids)} locations from {path}")
        elif self.landcover_dir is not None:
            folder = _need(self.landcover_dir, "land-cover folder", "give --landcover a folder of <location id>.tif Dynamic World rasters")
            for pid in ids:
                p = folder / f"{pid}.tif"
                if p.is_file():
                    fractions = fractions_from_counts(landcover_counts(read_landcover(p)))
                    self._labels[pid] = labels_from_fractions(fractions, self.label_threshold)
            if not self._labels:
                raise DomainFMError(f"no <location id>.tif raster for any of the {len(ids)} locations", path=folder,
                                    fix="name the Dynamic World rasters by location id, e.g. 0000002.tif")
            self.notes.append(f"labels: {len(self._labels)} of {len(ids)} locations from Dynamic World rasters in {folder}")
        else:
            self.notes.append("no --labels or --landcover: no multi-labels, the soft loss term falls back to the hard "
                              "(same-location) target")

    def _acquisition_pair(self, record: Record) -> tuple[int, int | None]:
        n = len(record.acquisitions)
        if not self.random_season or n == 1:  # evaluation, check, plots: the first season, deterministic
            return 0, None
        first = int(torch.randint(n, (1,)))
        if self.views != "seasons":
            return first, None
        second = (first + 1 + int(torch.randint(n - 1, (1,)))) % n  # another season, never the same
        return first, second


# -- BigEarthNet v1 -----------------------------------------------------------------------------


BEN_CLASSES_19 = (
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops", "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas", "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub", "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands",
    "Inland waters", "Marine waters",
)


def _sorted_s2_files(files: Sequence[Path]) -> list[Path]:
    from torchgeo.datasets.utils import sort_sentinel2_bands

    return sorted(files, key=sort_sentinel2_bands)


def _band_of(path: Path) -> str:
    return path.stem.split("_")[-1]


class BigEarthNetPatches(LayoutPatches):
    """BigEarthNet v1.0 (Sumbul et al. 2019) as torchgeo's ``BigEarthNet`` lays it out: the split
    CSVs ``bigearthnet-{train,val,test}.csv`` pair S2 and S1 patch folders; each folder holds one
    GeoTIFF per band and ``<patch>_labels_metadata.json`` (CORINE names, mapped to the 19-class
    nomenclature with torchgeo's ``BigEarthNet.label_converter``). Patches listed in a split but
    absent from disk are skipped (and counted in ``notes``)."""

    layout = "bigearthnet"
    class_names = BEN_CLASSES_19
    SPLITS = ("train", "val", "test")

    def _index(self) -> list[Record]:
        from torchgeo.datasets import BigEarthNet

        sensor = sensor_of(self.modality)
        directory = self.root / BigEarthNet.metadata[sensor]["directory"]
        _need(directory, f"{'Sentinel-2' if sensor == 's2' else 'Sentinel-1'} folder",
              f"extract {BigEarthNet.metadata[sensor]['filename']} into {self.root}")
        records, skipped = [], 0
        for split in self.SPLITS:
            csv_path = _need(self.root / BigEarthNet.splits_metadata[split]["filename"], f"{split} split file",
                             "download the official BigEarthNet-MM split CSVs (train.csv, val.csv, test.csv) "
                             "and save them as bigearthnet-train.csv, bigearthnet-val.csv, bigearthnet-test.csv")
            for line in csv_path.read_text().strip().splitlines():
                s2_name, s1_name = [x.strip() for x in line.split(",")[:2]]
                name = s2_name if sensor == "s2" else s1_name
                folder = directory / name
                if not folder.is_dir():
                    skipped += 1
                    continue
                files = list(folder.glob("*.tif"))
                files = _sorted_s2_files(files) if sensor == "s2" else sorted(files)
                names = tuple(_band_of(f) for f in files)
                records.append(Record(name, split, [files], names, {"folder": folder}))
        if skipped:
            self.notes.append(f"{skipped} patch(es) listed in the split files are not on disk (partial download): skipped")
        expected = MODALITY_BANDS[self.modality]
        for r in records:
            if sorted(normalize_band_name(n) for n in r.names) != sorted(expected):
                raise DomainFMError(f"holds bands {', '.join(r.names) or 'none'}, expected {', '.join(expected)}",
                                    path=r.extra["folder"], fix="re-download the patch")
        return records

    def _load_labels(self) -> None:
        from torchgeo.datasets import BigEarthNet

        class2idx = {c: i for i, c in enumerate(BigEarthNet.class_sets[43])}
        for r in self.all_records:
            folder = r.extra["folder"]
            path = folder / f"{folder.name}_labels_metadata.json"
            _need(path, "label file", "re-download the patch (every BigEarthNet folder has <patch>_labels_metadata.json)")
            try:
                names = json.loads(path.read_text())["labels"]
            except (ValueError, KeyError, TypeError):
                raise DomainFMError("not a BigEarthNet label file (no 'labels' list)", path=path,
                                    fix="re-download the patch") from None
            unknown = [n for n in names if n not in class2idx]
            if unknown:
                raise DomainFMError(f"unknown CORINE class {unknown[0]!r}", path=path,
                                    fix="use the 43 CORINE level-3 names of BigEarthNet v1.0")
            target = np.zeros(19, np.float32)
            for n in names:
                k = BigEarthNet.label_converter.get(class2idx[n])
                if k is not None:
                    target[k] = 1.0
            self._labels[r.patch_id] = target


# -- BigEarthNet v2 -----------------------------------------------------------------------------


class BigEarthNetV2Patches(LayoutPatches):
    """BigEarthNet v2.0 (reBEN, Clasen et al. 2024, arXiv:2407.03653) as torchgeo's
    ``BigEarthNetV2`` lays it out: ``metadata.parquet`` (patch_id, labels, split, s1_name),
    ``BigEarthNet-S2/<tile>/<patch>/``, ``BigEarthNet-S1/<scene>/<patch>/``,
    ``Reference_Maps/<tile>/<patch>/<patch>_reference_map.tif`` (CORINE codes).

    ``label_source="metadata"``: the official 19-class labels; ``"reference_map"``: a class is a
    label when it covers at least ``label_threshold`` of the reference map (pretraining)."""

    layout = "bigearthnet-v2"
    class_names = BEN_CLASSES_19

    def __init__(self, root, modality: str = "s2-l2a", *, label_source: str = "metadata", **kwargs) -> None:
        self.label_source = label_source
        super().__init__(root, modality, **kwargs)

    def _index(self) -> list[Record]:
        import pandas as pd
        from torchgeo.datasets import BigEarthNetV2

        sensor = sensor_of(self.modality)
        meta_path = _need(self.root / BigEarthNetV2.dir_file_names["metadata"], "metadata file (splits and labels)",
                          "download metadata.parquet of BigEarthNet v2.0 into the root")
        directory = _need(self.root / BigEarthNetV2.dir_file_names[sensor],
                          f"{'Sentinel-2' if sensor == 's2' else 'Sentinel-1'} folder",
                          f"extract {BigEarthNetV2.dir_file_names[sensor]}.tar.gz into {self.root}")
        try:
            df = pd.read_parquet(meta_path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DomainFMError(f"unreadable parquet ({type(e).__name__})", path=meta_path, fix="re-download metadata.parquet") from None
        missing_cols = [c for c in ("patch_id", "labels", "split", "s1_name") if c not in df.columns]
        if missing_cols:
            raise DomainFMError(f"metadata has no column {missing_cols[0]!r}", path=meta_path,
                                fix="use BigEarthNet v2.0's metadata.parquet")
        inverse_split = {v: k for k, v in BigEarthNetV2.split_map.items()}
        records, skipped = [], 0
        self._meta_labels: dict[str, list[str]] = {}
        for row in df.itertuples(index=False):
            patch_id, s1_name = str(row.patch_id), str(row.s1_name)
            if sensor == "s2":
                folder = directory / "_".join(patch_id.split("_")[:-2]) / patch_id
            else:
                folder = directory / "_".join(s1_name.split("_")[:-3]) / s1_name
            if not folder.is_dir():
                skipped += 1
                continue
            files = list(folder.glob("*.tif"))
            files = _sorted_s2_files(files) if sensor == "s2" else sorted(files)
            ref = (self.root / BigEarthNetV2.dir_file_names["maps"] / "_".join(patch_id.split("_")[:-2]) / patch_id
                   / f"{patch_id}_reference_map.tif")
            records.append(Record(patch_id, inverse_split.get(str(row.split), str(row.split)), [files],
                                  tuple(_band_of(f) for f in files), {"folder": folder, "reference_map": ref}))
            self._meta_labels[patch_id] = list(row.labels)
        if skipped:
            self.notes.append(f"{skipped} patch(es) of metadata.parquet are not on disk (partial download): skipped")
        return records

    def _load_labels(self) -> None:
        from torchgeo.datasets import BigEarthNetV2

        index = {c: i for i, c in enumerate(BigEarthNetV2.class_set)}
        if self.label_source == "metadata":
            for pid, names in self._meta_labels.items():
                unknown = [n for n in names if n not in index]
                if unknown:
                    raise DomainFMError(f"unknown class {unknown[0]!r} in the labels of {pid}",
                                        path=self.root / "metadata.parquet", fix="use BigEarthNet v2.0's 19 class names")
                target = np.zeros(19, np.float32)
                target[[index[n] for n in names]] = 1.0
                self._labels[pid] = target
            return
        for r in self.all_records:  # reference-map fractions, read once (pretraining)
            self._labels[r.patch_id] = labels_from_reference_map(r.extra["reference_map"], self.label_threshold)
        self.notes.append(f"labels: classes covering at least {self.label_threshold:g} of each reference map")


def labels_from_reference_map(path: Path, threshold: float) -> np.ndarray:
    """19-class multi-hot: classes covering at least ``threshold`` of a CORINE reference map
    (codes mapped with torchgeo's ``BigEarthNetV2.clc_codes``; unknown codes are not counted)."""
    import rasterio
    from rasterio.errors import RasterioError
    from torchgeo.datasets import BigEarthNetV2

    from plugins.eo_sar.files import unreadable

    _need(path, "reference map", "extract Reference_Maps.tar.gz, or pass --label-source metadata")
    try:
        with rasterio.open(path) as src:
            codes = src.read(1).astype(np.int64)
    except RasterioError as e:
        raise unreadable(path, e) from None
    counts = np.zeros(19)
    for code, k in BigEarthNetV2.clc_codes.items():
        counts[k] += np.count_nonzero(codes == code)
    total = counts.sum()
    return (counts / total >= threshold).astype(np.float32) if total else np.zeros(19, np.float32)


# -- EuroSAT ------------------------------------------------------------------------------------


class EuroSATPatches(LayoutPatches):
    """EuroSAT (Helber et al. 2019) as torchgeo's ``EuroSAT`` lays it out and lists it: the split
    files ``eurosat-{train,val,test}.txt`` name the images of
    ``ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/``; 13-band L1C GeoTIFFs
    stored B1..B12 then B8A (reordered here to the canonical order); 10 single-label classes
    (``labels`` is one-hot)."""

    layout = "eurosat"
    multilabel = False
    class_names = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")

    def _index(self) -> list[Record]:
        from torchgeo.datasets import EuroSAT

        base = self.root / EuroSAT.base_dir
        _need(base, "EuroSAT image folder", f"extract {EuroSAT.filename} into {self.root}")
        for split, fname in EuroSAT.split_filenames.items():
            _need(self.root / fname, f"{split} split file", f"download {fname} (torchgeo EuroSAT's split lists) into {self.root}")
        records = []
        self._class_of: dict[str, int] = {}
        names = tuple(EuroSAT.all_band_names)
        for split in ("train", "val", "test"):
            # torchgeo's own listing: ImageFolder over the class folders, filtered by the split file
            ds = EuroSAT(self.root, split=split)
            if list(ds.classes) != list(self.class_names):
                unknown = sorted(set(ds.classes) - set(self.class_names))
                raise DomainFMError(f"class folder(s) {', '.join(unknown) or '(some missing)'} are not EuroSAT's 10",
                                    path=base, fix=f"keep the class folders {', '.join(self.class_names)}")
            for path, label in ds.samples:
                p = Path(path)
                records.append(Record(p.stem, split, [[p]], names))
                self._class_of[p.stem] = int(label)
        return records

    def _load_labels(self) -> None:
        for pid, k in self._class_of.items():
            target = np.zeros(len(self.class_names), np.float32)
            target[k] = 1.0
            self._labels[pid] = target

    def class_of(self, index: int) -> int:
        return self._class_of[self.records[index].patch_id]


DATASETS = {"ssl4eo-s12": SSL4EOS12Patches, "bigearthnet": BigEarthNetPatches,
            "bigearthnet-v2": BigEarthNetV2Patches, "eurosat": EuroSATPatches}


def open_layout(root: str | Path, layout: str, modality: str, *, purpose: str = "pretrain",
                labels_csv: str | None = None, landcover_dir: str | None = None, **kwargs) -> LayoutPatches:
    """The dataset of ``root`` in ``layout`` (not ``domainfm``/``auto``: resolve first).

    ``purpose``: ``pretrain`` takes the training split (BigEarthNet v2 labels from the reference
    maps); ``evaluate``/``check`` take every split (official labels)."""
    cls = DATASETS[layout]
    if layout == "ssl4eo-s12":
        kwargs.update(labels_csv=labels_csv, landcover_dir=landcover_dir)
    elif labels_csv or landcover_dir:
        raise DomainFMError(f"--labels/--landcover are for ssl4eo-s12; layout {layout} brings its own labels",
                            path=Path(labels_csv or landcover_dir), fix="drop --labels/--landcover")
    if layout == "bigearthnet-v2":
        kwargs["label_source"] = "reference_map" if purpose == "pretrain" else "metadata"
    if purpose == "pretrain":
        kwargs["random_season"] = True
        if layout != "ssl4eo-s12":
            kwargs.setdefault("split", "train")
    return cls(root, modality, **kwargs)


def n_missing_labels(dataset) -> int:
    return sum(1 for i in range(len(dataset)) if dataset.labels_of(i) is None)


__all__ = ["LAYOUTS", "VIEWS", "EXPECTS", "LAYOUT_MODALITIES", "detect_layout", "resolve_layout", "check_modality",
           "read_bands", "LayoutPatches", "SSL4EOS12Patches", "BigEarthNetPatches", "BigEarthNetV2Patches",
           "EuroSATPatches", "open_layout", "labels_from_reference_map"]


def dataset_for(cfg, root: Path, *, purpose: str, echo: Callable[[str], None] | None = None, **kwargs):
    """``(dataset, layout)`` for a run config (``--layout``, ``--modality``, ``--labels``,
    ``--landcover``, ``--views``, ``--label-threshold``, ``--s2-harmonize``, ``--s1-units``).

    The domainfm layout gives :class:`~plugins.eo_sar.datasets.EOSARPatches`; the others the
    classes above. ``echo`` gets the chosen layout (when detected) and the dataset's notes, after
    the data checks passed."""
    layout, line = resolve_layout(root, getattr(cfg, "layout", "auto") or "auto")
    modality = getattr(cfg, "modality", "s2")
    radiometry = {k: getattr(cfg, k) for k in ("s2_harmonize", "s1_units") if hasattr(cfg, k)}
    if layout == "domainfm":
        from plugins.eo_sar.datasets import EOSARPatches

        if getattr(cfg, "labels", None) or getattr(cfg, "landcover", None):
            raise DomainFMError("--labels/--landcover are for ssl4eo-s12; the domainfm layout reads ROOT/labels.csv "
                                "and ROOT/landcover/", path=Path(getattr(cfg, "labels", None) or cfg.landcover),
                                fix="drop the flag and put the labels in the data folder")
        if modality not in ("s2", "s1"):
            raise DomainFMError(f"layout domainfm has no --modality {modality} (it holds s2 = s2/ (L1C, 13 bands), "
                                "s1 = s1/ (VV, VH))", path=root, fix="use --modality s2 or s1")
        dataset = EOSARPatches(root, modality, label_threshold=cfg.label_threshold, **radiometry, **kwargs)
    else:
        views = getattr(cfg, "views", None) or ("seasons" if layout == "ssl4eo-s12" else "crops")
        if views == "seasons" and layout != "ssl4eo-s12":
            raise DomainFMError(f"--views seasons needs several seasons per location (ssl4eo-s12); layout {layout} "
                                "has one image per patch", path=root, fix="drop --views or pass --views crops")
        dataset = open_layout(root, layout, modality, purpose=purpose, labels_csv=getattr(cfg, "labels", None),
                              landcover_dir=getattr(cfg, "landcover", None), label_threshold=cfg.label_threshold,
                              views=views, **radiometry, **kwargs)
    if echo is not None:
        if line:
            echo(line)
        for note in getattr(dataset, "notes", []):
            echo(f"eo-sar: {note}")
    return dataset, layout
