"""LightningDataModules of the fine-tuning data: ImageFolder (single-label) and the eo-sar layout
(multi-label). Both are set up eagerly in ``__init__`` so every data mistake surfaces before a
model is built, and both give batches ``{"image": float [B, C, S, S], "label": ...}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from domainfm.data import loader_kwargs
from domainfm.errors import DomainFMError
from plugins.sgd_ft.data import (PIL_SUFFIXES, ImageFolderClassification, band_statistics, check_channels,
                                 scan_split)

MULTICLASS, MULTILABEL = "multiclass", "multilabel"
# eo-sar roots have no split folders: labelled patches are split by a seeded shuffle
EOSAR_SPLIT = (0.6, 0.2, 0.2)


def _collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    images = torch.stack([s["image"] for s in samples])
    labels = [s["label"] for s in samples]
    label = torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.as_tensor(labels)
    return {"image": images, "label": label}


class _Loaders(L.LightningDataModule):
    task: str
    classes: list[str]
    in_chans: int

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set = self.val_set = self.test_set = None

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=_collate, drop_last=False,
                          **loader_kwargs(self.num_workers, persistent=True))  # never fork a threaded process

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set if self.test_set is not None else self.val_set, False)

    @property
    def has_test(self) -> bool:
        return self.test_set is not None


class ImageFolderDataModule(_Loaders):
    """``ROOT/{train,val[,test]}/<class>/<image>``. RGB images are normalised with the backbone's
    mean/std (``rgb_mean``/``rgb_std``, as timm does); GeoTIFF bands with their own statistics over
    the train split."""

    task = MULTICLASS

    def __init__(self, root: str | Path, *, img_size: int, batch_size: int, num_workers: int = 0,
                 in_chans: int | None = None, rgb_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 rgb_std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        super().__init__(batch_size, num_workers)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DomainFMError("data folder not found", path=self.root, fix="give --data an existing folder")
        self.classes, train = scan_split(self.root, "train")
        _, val = scan_split(self.root, "val", self.classes)
        test = scan_split(self.root, "test", self.classes)[1] if (self.root / "test").is_dir() else None
        self.in_chans = check_channels(train + val + (test or []), in_chans)
        if all(f.path.suffix.lower() in PIL_SUFFIXES for f in train):
            mean, std = np.asarray(rgb_mean, np.float32), np.asarray(rgb_std, np.float32)
        else:
            mean, std = band_statistics(train)
        self.mean, self.std = mean, std
        kw = dict(img_size=img_size, mean=mean, std=std)
        self.train_set = ImageFolderClassification(train, self.classes, augment=True, **kw)
        self.val_set = ImageFolderClassification(val, self.classes, **kw)
        self.test_set = ImageFolderClassification(test, self.classes, **kw) if test else None


class _EOSARSubset:
    """Labelled eo-sar patches resized to the model's input, as ``{"image", "label": multi-hot}``."""

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
        return {"image": image.contiguous(), "label": sample["labels"].float()}


class EOSARMultilabelDataModule(_Loaders):
    """The eo-sar layout (``ROOT/s2|s1/*.tif`` with ``landcover/`` or ``labels.csv``) read by the
    eo-sar plugin's own dataset; the labelled patches are split 60/20/20 by a seeded shuffle."""

    task = MULTILABEL

    def __init__(self, root: str | Path, *, modality: str = "s2", label_threshold: float = 0.01, img_size: int,
                 batch_size: int, num_workers: int = 0, in_chans: int | None = None, seed: int = 0,
                 layout: str = "domainfm") -> None:
        super().__init__(batch_size, num_workers)
        from plugins.eo_sar.bands import CLASS_NAMES, MODALITY_BANDS
        from plugins.eo_sar.datasets import EOSARPatches
        from plugins.eo_sar.layouts import open_layout, resolve_layout

        self.root = Path(root)
        bands = len(MODALITY_BANDS[modality])
        if in_chans is not None and in_chans != bands:
            raise DomainFMError(f"--in-chans {in_chans} does not match the data: {modality} patches have {bands} bands",
                                path=self.root / modality, fix=f"pass --in-chans {bands} or drop --in-chans")
        layout = resolve_layout(self.root, layout)[0]
        if layout != "domainfm":  # a standard dataset: its official splits and classes
            patches = open_layout(self.root, layout, modality, purpose="evaluate", label_threshold=label_threshold)
            self.classes = list(patches.class_names)
            self.in_chans = bands
            parts = {s: [i for i in patches.indices_of(s) if patches.labels_of(i) is not None] for s in ("train", "val", "test")}
            if not parts["train"] or not (parts["val"] or parts["test"]):
                raise DomainFMError(f"layout {layout} needs labelled patches in its train and val/test splits", path=self.root,
                                    fix="check the download")
            self.train_set = _EOSARSubset(patches, parts["train"], img_size)
            self.val_set = _EOSARSubset(patches, parts["val"] or parts["test"], img_size)
            self.test_set = _EOSARSubset(patches, parts["test"], img_size) if parts["test"] else None
            self.patches = patches
            return
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
        self.in_chans = bands
        self.train_set = _EOSARSubset(patches, order[:n_train], img_size)
        self.val_set = _EOSARSubset(patches, order[n_train:n_train + n_val], img_size)
        self.test_set = _EOSARSubset(patches, order[n_train + n_val:], img_size)
        self.patches = patches
