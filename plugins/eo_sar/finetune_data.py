"""eo-sar's labelled patches for another plugin's fine-tuning (the ``Plugin.finetune_datamodule``
hook, see :mod:`domainfm.plugins`): multi-label land cover, batches ``{"image": float [B, C, S, S],
"labels": float [B, K]}``.

The domainfm layout (``ROOT/s2|s1/*.tif`` with ``landcover/`` or ``labels.csv``) has no splits: its
labelled patches are split 60/20/20 by a seeded shuffle. A standard dataset (BigEarthNet,
EuroSAT, ...: :mod:`plugins.eo_sar.layouts`) keeps its official train/val/test splits and classes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from domainfm.data import LabelledDataModule
from domainfm.errors import DomainFMError

MULTILABEL = "multilabel"
# eo-sar roots have no split folders: labelled patches are split by a seeded shuffle
EOSAR_SPLIT = (0.6, 0.2, 0.2)


class _LabelledSubset:
    """Labelled eo-sar patches resized to the model's input, as ``{"image", "labels": multi-hot}``."""

    def __init__(self, patches, indices: Sequence[int], img_size: int) -> None:
        self.patches = patches
        self.indices = list(indices)
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch.nn.functional as F

        sample = self.patches[self.indices[i]]
        image = sample["image"]
        if tuple(image.shape[1:]) != (self.img_size, self.img_size):
            image = F.interpolate(image[None], size=(self.img_size, self.img_size), mode="bilinear",
                                  align_corners=False, antialias=True)[0]
        return {"image": image.contiguous(), "labels": sample["labels"].float()}


class EOSARMultilabelDataModule(LabelledDataModule):
    """The eo-sar layout or a standard dataset read by eo-sar's own datasets, set up in
    ``__init__`` so every data mistake surfaces before a model is built. Attributes as documented
    by :meth:`domainfm.plugins.Plugin.finetune_datamodule`; loaders as
    :class:`domainfm.data.LabelledDataModule` makes them (test: val's patches without a test split)."""

    task = MULTILABEL

    def __init__(self, root: str | Path, *, modality: str = "s2", label_threshold: float = 0.01, img_size: int,
                 batch_size: int, num_workers: int = 0, in_chans: int | None = None, seed: int = 0,
                 layout: str = "domainfm") -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        from plugins.eo_sar.bands import CLASS_NAMES, MODALITY_BANDS
        from plugins.eo_sar.datasets import EOSARPatches
        from plugins.eo_sar.layouts import open_layout, resolve_layout

        self.root = Path(root)
        self.modality = modality
        bands = len(MODALITY_BANDS[modality])
        if in_chans is not None and in_chans != bands:
            raise DomainFMError(f"--in-chans {in_chans} does not match the data: {modality} patches have {bands} bands",
                                path=self.root / modality, fix=f"pass --in-chans {bands} or drop --in-chans")
        self.in_chans = bands
        layout = resolve_layout(self.root, layout)[0]
        if layout != "domainfm":  # a standard dataset: its official splits and classes
            patches = open_layout(self.root, layout, modality, purpose="evaluate", label_threshold=label_threshold)
            self.classes = list(patches.class_names)
            parts = {s: [i for i in patches.indices_of(s) if patches.labels_of(i) is not None] for s in ("train", "val", "test")}
            if not parts["train"] or not (parts["val"] or parts["test"]):
                raise DomainFMError(f"layout {layout} needs labelled patches in its train and val/test splits", path=self.root,
                                    fix="check the download")
            splits = (parts["train"], parts["val"] or parts["test"], parts["test"] or None)
        else:
            patches = EOSARPatches(self.root, modality, label_threshold=label_threshold)
            labelled = [i for i in range(len(patches)) if patches.labels_of(i) is not None]
            if len(labelled) < 3:
                raise DomainFMError(f"only {len(labelled)} patches have land-cover labels; fine-tuning needs at least 3",
                                    path=self.root, fix="add landcover/ rasters or a labels.csv")
            order = np.random.default_rng(seed).permutation(labelled)
            n_val = max(1, round(EOSAR_SPLIT[1] * len(order)))
            n_test = max(1, round(EOSAR_SPLIT[2] * len(order)))
            n_train = len(order) - n_val - n_test
            self.classes = list(CLASS_NAMES)
            splits = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
        self.patches = patches
        self.train_set, self.val_set, self.test_set = (
            _LabelledSubset(patches, part, img_size) if part is not None else None for part in splits)

    # -- what a consumer reads ---------------------------------------------------------------------

    @property
    def bands(self) -> tuple[str, ...]:
        return tuple(self.patches.bands)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.patches.stats.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.patches.stats.std)

    @property
    def gsd_m(self) -> float:
        """Ground sampling distance of the patches in metres (Sentinel-1/2 at 10 m)."""
        from plugins.eo_sar.bands import MODALITY_GSD_M

        return MODALITY_GSD_M[self.modality]

    @property
    def units(self) -> str:
        """Units of :attr:`mean`/:attr:`std` (reflectance x 10000 for Sentinel-2, dB for Sentinel-1)."""
        from plugins.eo_sar.bands import sensor_of
        from plugins.eo_sar.normalization import UNITS

        return UNITS[sensor_of(self.modality)]

    def use_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Normalise with ``mean``/``std`` (one value per band, in :attr:`bands` order) from now on."""
        if len(mean) != len(self.bands) or len(std) != len(self.bands):
            raise DomainFMError(f"{len(mean)} means and {len(std)} stds for {len(self.bands)} bands "
                                f"({', '.join(self.bands)})", fix="give one value per band")
        self.patches.use_stats(dataclasses.replace(self.patches.stats, mean=tuple(float(m) for m in mean),
                                                   std=tuple(float(s) for s in std)))


def finetune_datamodule(cfg, *, img_size: int, batch_size: int, num_workers: int = 0, in_chans: int | None = None,
                        seed: int = 0) -> EOSARMultilabelDataModule:
    """:meth:`domainfm.plugins.Plugin.finetune_datamodule` of eo-sar: ``cfg.data`` (the embedded
    sample when None), ``cfg.modality``, ``cfg.layout`` (auto; the sample is the domainfm layout)
    and ``cfg.label_threshold``."""
    root = cfg.data
    if root is None:
        from plugins.eo_sar.sample import ensure_sample

        root = ensure_sample()
    return EOSARMultilabelDataModule(root, modality=getattr(cfg, "modality", "s2"),
                                     label_threshold=getattr(cfg, "label_threshold", 0.01), img_size=img_size,
                                     batch_size=batch_size, num_workers=num_workers, in_chans=in_chans, seed=seed,
                                     layout=(getattr(cfg, "layout", "auto") or "auto") if cfg.data else "domainfm")
