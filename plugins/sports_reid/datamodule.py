"""The LightningDataModule of contrastive fine-tuning: pairs of the training part, batched by
:class:`~plugins.sports_reid.datasets.DistinctPlayerPairSampler` (never two pairs of one player)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from domainfm.data import loader_kwargs
from plugins.sports_reid.datasets import DistinctPlayerPairSampler, PairDataset, read_part


class ReIDPairDataModule(L.LightningDataModule):
    """Training pairs of ``root``'s training part (either layout). ``batch_size`` counts pairs,
    as pretraining's counts samples with two views: a step sees ``2 * batch_size`` images."""

    def __init__(self, root: str | Path, *, img_size: int, batch_size: int, mean, std, num_workers: int = 0,
                 seed: int = 0):
        super().__init__()
        self.root, self.img_size, self.batch_size = Path(root), img_size, batch_size
        self.mean, self.std, self.num_workers, self.seed = mean, std, num_workers, seed
        self.train_set: PairDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = PairDataset(read_part(self.root, "train"), img_size=self.img_size,
                                         mean=self.mean, std=self.std)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = getattr(self, "_trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        # the sampler splits batches across processes itself: the Trainer is built with
        # use_distributed_sampler=False so Lightning leaves it alone
        sampler = DistinctPlayerPairSampler(self.train_set.pids, self.batch_size, seed=self.seed,
                                            rank=rank, world_size=world)
        return DataLoader(self.train_set, batch_sampler=sampler,
                          **loader_kwargs(self.num_workers, persistent=True))  # never fork a threaded process
