"""domainfm.data.DictBatchDataModule: the datamodule base (setup per stage, one dataloader factory)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset


class Numbered(Dataset):
    def __init__(self, n: int, split: str) -> None:
        self.n, self.split = n, split

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 2, 2), float(i)), "index": i, "split": self.split}


def _module(sizes: dict[str, int], **kwargs):
    from domainfm.data import DictBatchDataModule

    class Numbers(DictBatchDataModule):
        splits = tuple(sizes)

        def __init__(self, **kw) -> None:
            super().__init__(**kw)
            self.built: list[str] = []

        def build_dataset(self, split: str):
            self.built.append(split)
            return Numbered(sizes[split], split)

        def val_dataloader(self):
            return self.dataloader("val")

    return Numbers(**kwargs)


def test_setup_builds_each_split_of_a_stage_once():
    dm = _module({"train": 10, "val": 4, "test": 3}, batch_size=4)
    dm.setup("fit")
    assert dm.built == ["train", "val"]  # fit: train and val, as in torchgeo
    dm.setup("fit")
    dm.setup("validate")
    assert dm.built == ["train", "val"]  # idempotent
    dm.setup("test")
    assert dm.built == ["train", "val", "test"]
    assert dm.datasets["test"].split == "test"
    only_train = _module({"train": 5})
    only_train.setup("fit")  # a split the module does not have is not asked for
    assert only_train.built == ["train"]


def test_one_factory_shuffles_train_only_and_drops_a_partial_training_batch():
    dm = _module({"train": 10, "val": 10}, batch_size=4, drop_last_train=True)
    torch.manual_seed(0)
    train = [b["index"].tolist() for b in dm.train_dataloader()]
    assert [len(b) for b in train] == [4, 4]  # 10 patches, batches of 4: the last 2 dropped
    assert sorted(sum(train, [])) != sum(train, [])  # shuffled
    val = [b["index"].tolist() for b in dm.val_dataloader()]
    assert val == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # in order, nothing dropped
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 1, 2, 2) and batch["split"] == ["val"] * 4  # dicts collated per key
    assert dm.built == ["train", "val"]  # the loaders ran setup themselves, once per split
    # a training set smaller than one batch still yields it
    small = _module({"train": 3}, batch_size=8, drop_last_train=True)
    assert [len(b["index"]) for b in small.train_dataloader()] == [3]
    with pytest.raises(ValueError, match="has no 'test' split"):
        small.dataloader("test")


def test_loader_settings_come_from_loader_kwargs():
    from domainfm.data import worker_start_method

    dm = _module({"train": 4}, batch_size=2, num_workers=2, collate_fn=lambda s: len(s))
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    assert loader.multiprocessing_context.get_start_method() == worker_start_method() != "fork"
    assert loader.timeout > 0 and loader.collate_fn(["a", "b"]) == 2


def test_lightning_runs_only_the_loops_a_module_defines():
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from domainfm.data import DictBatchDataModule

    class TrainOnly(DictBatchDataModule):
        def build_dataset(self, split):
            return Numbered(2, split)

    dm = TrainOnly()
    assert is_overridden("train_dataloader", dm)
    for hook in ("val_dataloader", "test_dataloader", "predict_dataloader"):
        assert not is_overridden(hook, dm)  # no validation loop on a split that does not exist
    assert is_overridden("val_dataloader", _module({"train": 2, "val": 2}))


def test_unshuffled_training_and_a_batch_sampler_per_split():
    unshuffled = _module({"train": 5}, batch_size=2, drop_last_train=True, shuffle_train=False)
    assert [b["index"].tolist() for b in unshuffled.train_dataloader()] == [[0, 1], [2, 3]]  # in order, 4 dropped

    from domainfm.data import DictBatchDataModule

    class Composed(DictBatchDataModule):
        splits = ("train",)

        def build_dataset(self, split):
            return Numbered(6, split)

        def batch_sampler(self, split, dataset):
            return [[5, 0], [3], [1, 2, 4]]  # the sampler decides sizes and order

    dm = Composed(batch_size=4, drop_last_train=True)
    assert [b["index"].tolist() for b in dm.train_dataloader()] == [[5, 0], [3], [1, 2, 4]]


def test_labelled_module_reads_the_splits_it_holds_now_and_test_falls_back_to_val():
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from domainfm.data import DictBatchDataModule, LabelledDataModule

    class Labelled(LabelledDataModule):
        def __init__(self, test: bool) -> None:
            super().__init__(batch_size=3)
            self.classes = ["a", "b"]
            self.train_set, self.val_set = Numbered(4, "train"), Numbered(2, "val")
            self.test_set = Numbered(3, "test") if test else None

    dm = Labelled(test=False)
    assert isinstance(dm, DictBatchDataModule) and dm.num_outputs == 2 and not dm.has_test
    assert all(is_overridden(h, dm) for h in ("train_dataloader", "val_dataloader", "test_dataloader"))
    dm.setup("test")  # built in __init__: nothing to build, no split invented
    assert dm.test_set is None and set(dm.datasets) == {"train", "val"}
    assert [b["split"] for b in dm.test_dataloader()] == [["val", "val"]]  # no test split: val's samples
    dm.val_set = Numbered(1, "replaced")  # e.g. wrapped to align bands: the next loader reads it
    assert [b["split"] for b in dm.val_dataloader()] == [["replaced"]]
    with_test = Labelled(test=True)
    assert with_test.has_test and [len(b["index"]) for b in with_test.test_dataloader()] == [3]
    assert sorted(sum((b["index"].tolist() for b in with_test.train_dataloader()), [])) == [0, 1, 2, 3]
