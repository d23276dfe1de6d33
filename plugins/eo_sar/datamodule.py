"""LightningDataModule for continual pretraining on Sentinel-2 / Sentinel-1 patches."""

from __future__ import annotations

from pathlib import Path

from domainfm.data import DictBatchDataModule
from plugins.eo_sar.datasets import EOSARPatches
from plugins.eo_sar.transforms import TwoViews


class EOSARDataModule(DictBatchDataModule):
    """Batches of ``{"view_teacher", "view_student": float[B, C, S, S], "labels": float[B, 9]}``.

    The dataset (and with it every file check and the band statistics) is built in
    :meth:`setup`; call it before handing the module to a Trainer to surface data errors before
    any model is built. ``setup`` is idempotent. One split, ``train``: shuffled, and its last
    partial batch dropped (contrastive losses need full batches) unless the whole dataset is
    smaller than one batch.
    """

    splits = ("train",)

    def __init__(self, root: str | Path, modality: str = "s2", *, label_threshold: float = 0.01, img_size: int = 224,
                 batch_size: int = 32, num_workers: int = 0, crop_scale: tuple[float, float] = (0.35, 1.0),
                 radiometry: dict[str, str] | None = None, plan=None, dataset=None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, drop_last_train=True)
        self.root = Path(root)
        self.modality = modality
        self.label_threshold = label_threshold
        self.img_size = img_size
        self.crop_scale = tuple(crop_scale)
        self.radiometry = dict(radiometry or {})
        self.plan = plan  # plugins.eo_sar.normalization.InputPlan: statistics and band alignment
        self._given = dataset  # a standard-layout dataset (plugins.eo_sar.layouts) built by the caller

    @property
    def dataset(self) -> EOSARPatches | None:
        """The training dataset once :meth:`setup` ran, else None."""
        return self.datasets.get("train")

    def build_dataset(self, split: str):
        views = TwoViews(self.img_size, scale=self.crop_scale)
        stats = None
        if self.plan is not None:
            from plugins.eo_sar.band_stats import BandStats
            from plugins.eo_sar.normalization import AlignBands

            views = AlignBands(self.plan.alignment, views)
            if self.plan.mean is not None:
                stats = BandStats(self.plan.mean, self.plan.std)
        if self._given is not None:
            self._given.transforms = views
            return self._given
        return EOSARPatches(self.root, self.modality, label_threshold=self.label_threshold,
                            transforms=views, stats=stats, **self.radiometry)
