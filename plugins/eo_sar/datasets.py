"""Sentinel-2 / Sentinel-1 GeoTIFF patches with Dynamic World multi-labels, torchgeo style.

Layout of a data root::

    ROOT/s2/<patch_id>.tif         13 bands B1..B12 (B8A after B8), uint16 reflectance x 10000
    ROOT/s1/<patch_id>.tif         2 bands VV, VH, float32 backscatter in dB
    ROOT/landcover/<patch_id>.tif  1 band, Dynamic World class ids 0..8, nodata 255
    ROOT/labels.csv                optional: patch_id + one 0/1 column per class; wins over landcover/

Building the dataset checks every file (:mod:`plugins.eo_sar.files`), reads the labels
(:mod:`plugins.eo_sar.labels`) and the cached per-band statistics (:mod:`plugins.eo_sar.band_stats`).
The standard datasets (SSL4EO-S12, BigEarthNet, EuroSAT) are in :mod:`plugins.eo_sar.layouts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from domainfm.errors import DomainFMError
from plugins.eo_sar.band_stats import BandStats, load_or_compute_stats
from plugins.eo_sar.bands import BANDS, CLASS_NAMES, LABELS_FILE, S2_RGB
from plugins.eo_sar.files import PatchFile, scan_patches
from plugins.eo_sar.labels import (fractions_from_counts, labels_from_fractions, load_or_compute_landcover_counts,
                                   read_labels_csv)

__all__ = ["EOSARPatches", "BandStats"]  # BandStats: re-exported for plugins/sgd_ft (until it asks eo-sar through the Plugin)


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

        from plugins.eo_sar.plots import percentile_stretch

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
