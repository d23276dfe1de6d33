"""The LightningDataModule of contrastive fine-tuning: pairs of the training part, batched by
:class:`~plugins.sports_reid.datasets.DistinctPlayerPairSampler` (never two pairs of one player)."""

from __future__ import annotations

from pathlib import Path

from domainfm.data import DictBatchDataModule
from plugins.sports_reid.datasets import DistinctPlayerPairSampler, PairDataset, read_part


class ReIDPairDataModule(DictBatchDataModule):
    """Training pairs of ``root``'s training part (either layout). ``batch_size`` counts pairs,
    as pretraining's counts samples with two views: a step sees ``2 * batch_size`` images.
    One split, ``train``, built in :meth:`setup`; its batches come from the sampler
    (:meth:`batch_sampler`), workers from the base's loader (never a fork of a threaded process)."""

    splits = ("train",)

    def __init__(self, root: str | Path, *, img_size: int, batch_size: int, mean, std, num_workers: int = 0,
                 seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.root, self.img_size = Path(root), img_size
        self.mean, self.std, self.seed = mean, std, seed

    @property
    def train_set(self) -> PairDataset | None:
        """The training pairs once :meth:`setup` ran, else None."""
        return self.datasets.get("train")

    def build_dataset(self, split: str) -> PairDataset:
        return PairDataset(read_part(self.root, "train"), img_size=self.img_size, mean=self.mean, std=self.std)

    def batch_sampler(self, split: str, dataset: PairDataset) -> DistinctPlayerPairSampler:
        trainer = getattr(self, "_trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        # the sampler splits batches across processes itself: the Trainer is built with
        # use_distributed_sampler=False so Lightning leaves it alone
        return DistinctPlayerPairSampler(dataset.pids, self.batch_size, seed=self.seed, rank=rank, world_size=world)
