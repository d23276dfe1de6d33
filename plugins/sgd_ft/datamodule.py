"""The ImageFolder LightningDataModule (single-label): set up eagerly in ``__init__`` so every data
mistake surfaces before a model is built; batches ``{"image": float [B, C, S, S], "label": long [B]}``.
Multi-label data comes from the eo-sar plugin's ``finetune_datamodule`` hook (batches
``{"image", "labels": float [B, K]}``), asked for through ``domainfm.plugins.load("eo-sar")``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from domainfm.data import LabelledDataModule
from domainfm.errors import DomainFMError, expect_folder
from plugins.sgd_ft.datasets import PIL_SUFFIXES, ImageFolderClassification, check_channels, scan_split, split_statistics

MULTICLASS, MULTILABEL = "multiclass", "multilabel"


def _collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"image": torch.stack([s["image"] for s in samples]), "label": torch.as_tensor([s["label"] for s in samples])}


class ImageFolderDataModule(LabelledDataModule):
    """``ROOT/{train,val[,test]}/<class>/<image>``. RGB images are normalised with the backbone's
    mean/std (``rgb_mean``/``rgb_std``, as timm does); GeoTIFF bands with their own statistics over
    the train split. Loaders as :class:`domainfm.data.LabelledDataModule` makes them (test: val's
    images when there is no test/ folder)."""

    task = MULTICLASS

    def __init__(self, root: str | Path, *, img_size: int, batch_size: int, num_workers: int = 0,
                 in_chans: int | None = None, rgb_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 rgb_std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
        self.root = Path(root)
        expect_folder(self.root, "--data", missing="data folder not found",
                      fix="give --data the folder holding train/<class>/<image> (and val/, test/)")
        self.classes, train = scan_split(self.root, "train")
        if len(self.classes) < 2:  # accuracy (torchmetrics) and cross-entropy need two classes
            raise DomainFMError(f"holds one class folder ({self.classes[0]}); classification needs at least two",
                                path=self.root / "train", fix="add a train/<class>/ folder for every class")
        _, val = scan_split(self.root, "val", self.classes)
        test = scan_split(self.root, "test", self.classes)[1] if (self.root / "test").is_dir() else None
        self.in_chans = check_channels(train + val + (test or []), in_chans)
        if all(f.path.suffix.lower() in PIL_SUFFIXES for f in train):
            mean, std = np.asarray(rgb_mean, np.float32), np.asarray(rgb_std, np.float32)
        else:
            mean, std = split_statistics(train)
        self.mean, self.std = mean, std
        kw = dict(img_size=img_size, mean=mean, std=std)
        self.train_set = ImageFolderClassification(train, self.classes, augment=True, **kw)
        self.val_set = ImageFolderClassification(val, self.classes, **kw)
        self.test_set = ImageFolderClassification(test, self.classes, **kw) if test else None


MULTILABEL_PLUGIN = "eo-sar"  # the plugin whose finetune_datamodule hook gives --task multilabel its data


def build_datamodule(cfg):
    """The run's data: an ImageFolder (``--task multiclass``), or the eo-sar plugin's multi-label
    patches through its ``finetune_datamodule`` hook (``--task multilabel``; without --data, its
    embedded sample)."""
    if cfg.task == MULTILABEL:
        from domainfm import plugins

        return plugins.load(MULTILABEL_PLUGIN).finetune_datamodule(
            cfg, img_size=cfg.img_size, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
            in_chans=cfg.in_chans, seed=cfg.seed)
    if cfg.data is None:
        raise DomainFMError("sgd-ft needs --data ROOT with train/<class>/ and val/<class>/ image folders",
                            fix="pass --data, or --task multilabel for the eo-sar sample")
    from domainfm.backbones import normalization_for_config

    mean, std = normalization_for_config(cfg)  # the mean/std the backbone normalises RGB input with
    return ImageFolderDataModule(cfg.data, img_size=cfg.img_size, batch_size=cfg.batch_size,
                                 num_workers=cfg.num_workers, in_chans=cfg.in_chans, rgb_mean=mean, rgb_std=std)
