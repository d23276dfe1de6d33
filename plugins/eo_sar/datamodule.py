"""LightningDataModule for continual pretraining on Sentinel-2 / Sentinel-1 patches."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from domainfm.data import loader_kwargs
from plugins.eo_sar.datasets import EOSARPatches
from plugins.eo_sar.transforms import TwoViews


class EOSARDataModule(L.LightningDataModule):
    """Batches of ``{"view_teacher", "view_student": float[B, C, S, S], "labels": float[B, 9]}``.

    The dataset (and with it every file check and the band statistics) is built in
    :meth:`setup`; call it before handing the module to a Trainer to surface data errors before
    any model is built. ``setup`` is idempotent.
    """

    def __init__(self, root: str | Path, modality: str = "s2", *, label_threshold: float = 0.01, img_size: int = 224,
                 batch_size: int = 32, num_workers: int = 0, crop_scale: tuple[float, float] = (0.35, 1.0),
                 radiometry: dict[str, str] | None = None, plan=None, dataset=None) -> None:
        super().__init__()
        self.root = Path(root)
        self.modality = modality
        self.label_threshold = label_threshold
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.crop_scale = tuple(crop_scale)
        self.dataset: EOSARPatches | None = None
        self.radiometry = dict(radiometry or {})
        self.plan = plan  # plugins.eo_sar.normalization.InputPlan: statistics and band alignment
        self._given = dataset  # a standard-layout dataset (plugins.eo_sar.layouts) built by the caller

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            views = TwoViews(self.img_size, scale=self.crop_scale)
            stats = None
            if self.plan is not None:
                from plugins.eo_sar.datasets import BandStats
                from plugins.eo_sar.normalization import AlignBands

                views = AlignBands(self.plan.alignment, views)
                if self.plan.mean is not None:
                    stats = BandStats(self.plan.mean, self.plan.std)
            if self._given is not None:
                self._given.transforms = views
                self.dataset = self._given
                return
            self.dataset = EOSARPatches(self.root, self.modality, label_threshold=self.label_threshold,
                                        transforms=views, stats=stats, **self.radiometry)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self.dataset is not None
        # contrastive losses need full batches, unless the whole dataset is smaller than one batch
        drop_last = len(self.dataset) > self.batch_size
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=drop_last,
                          **loader_kwargs(self.num_workers, persistent=True))  # never fork a threaded process
