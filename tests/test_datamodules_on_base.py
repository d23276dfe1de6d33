"""Every plugin datamodule is a ``domainfm.data.DictBatchDataModule`` and yields, for a seed, exactly
the batches of a plain torch ``DataLoader`` built by hand over its datasets with the settings each
plugin documents (histo: drawn tiles in index order, full batches only; sgd-ft and eo-sar fine-tuning:
training shuffled, val/test in order, test falling back to val; sports-reid: batches from
``DistinctPlayerPairSampler``), on real files; and their workers never fork."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import load_make_data

DATA = Path(__file__).parent / "data"


def _batches(loader, n: int, seed: int = 0) -> list:
    torch.manual_seed(seed)
    out = []
    for i, batch in enumerate(loader):
        if i == n:
            break
        out.append(batch)
    return out


def _assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in w:
            if isinstance(w[key], torch.Tensor):
                assert g[key].dtype == w[key].dtype and g[key].shape == w[key].shape, key
                assert torch.equal(g[key], w[key]), key
            else:
                assert g[key] == w[key], key


def _assert_no_fork(dm, split: str) -> None:
    from domainfm.data import worker_start_method

    dm.num_workers = 2
    loader = dm.dataloader(split)
    assert loader.num_workers == 2 and loader.persistent_workers and loader.timeout > 0
    assert loader.multiprocessing_context.get_start_method() == worker_start_method() != "fork"
    dm.num_workers = 0


# ---------------------------------------------------------------- histo pretraining

@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("histo_dm") / "slides"
    root.mkdir()
    md = load_make_data("histo")
    md.write_aperio_svs(root / "a40x.svs")
    md.write_generic_tiff(root / "b20x.tif")
    return root


def test_histo_pretrain_batches_are_the_samplers_draws_in_order_full_batches_only(slide_dir):
    from domainfm.data import DictBatchDataModule
    from plugins.histo.datamodule import HistoPretrainDataModule, SlideTileSampler

    dm = HistoPretrainDataModule(slide_dir, mpp=1.0, tile_size=48, img_size=28, tiles_per_epoch=10, batch_size=4,
                                 seed=3)
    assert isinstance(dm, DictBatchDataModule) and dm.splits == ("train",)
    got = _batches(dm.train_dataloader(), 5)
    assert [len(b["labels"]) for b in got] == [4, 4]  # 10 tiles: the last 2 dropped
    reference = SlideTileSampler(dm.paths, **dm.kwargs)  # a fresh sampler, read in index order
    want = _batches(DataLoader(reference, batch_size=4, shuffle=False, drop_last=True), 5)
    _assert_same_batches(got, want)
    assert got[0]["view_teacher"].shape == (4, 3, 28, 28)
    _assert_no_fork(dm, "train")
    # an epoch smaller than one batch is one batch (it was none: a run that never took a step)
    small = HistoPretrainDataModule(slide_dir, mpp=1.0, tile_size=48, img_size=28, tiles_per_epoch=3, batch_size=4)
    assert [len(b["labels"]) for b in small.train_dataloader()] == [3]


# ---------------------------------------------------------------- sgd-ft ImageFolder

def _module(name: str, path: Path):
    """A checked-in generator as a module (registered: its dataclasses look their module up)."""
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("with_test", [True, False])
def test_sgd_ft_imagefolder_batches_equal_a_plain_loader(tmp_path, with_test):
    from domainfm.data import DictBatchDataModule
    from plugins.sgd_ft.datamodule import ImageFolderDataModule, _collate

    md = _module("sgd_ft_make_data_dm", DATA / "sgd_ft" / "make_data.py")
    root = md.write_imagefolder(tmp_path / "d", train=3, val=2, size=12)
    if with_test:
        import shutil

        shutil.copytree(root / "val", root / "test")
    dm = ImageFolderDataModule(root, img_size=8, batch_size=4)
    assert isinstance(dm, DictBatchDataModule) and dm.has_test == with_test
    assert dm.train_set is not None and dm.val_set is not None and (dm.test_set is not None) == with_test
    test_set = dm.test_set if with_test else dm.val_set  # no test/ folder: test batches are val's

    def plain(ds, shuffle):
        return DataLoader(ds, batch_size=4, shuffle=shuffle, collate_fn=_collate)

    for seed in (0, 1):
        _assert_same_batches(_batches(dm.train_dataloader(), 9, seed), _batches(plain(dm.train_set, True), 9, seed))
    assert _batches(dm.train_dataloader(), 9, 0)[0]["label"].dtype == torch.int64
    _assert_same_batches(_batches(dm.val_dataloader(), 9), _batches(plain(dm.val_set, False), 9))
    _assert_same_batches(_batches(dm.test_dataloader(), 9), _batches(plain(test_set, False), 9))
    train_sizes = [len(b["label"]) for b in dm.train_dataloader()]
    assert train_sizes == [4, 4, 1]  # 9 images: the last partial batch kept
    _assert_no_fork(dm, "val")


# ---------------------------------------------------------------- eo-sar fine-tuning data

def test_eo_sar_multilabel_batches_equal_a_plain_loader(tmp_path):
    from domainfm.data import DictBatchDataModule
    from plugins.eo_sar.finetune_data import EOSARMultilabelDataModule
    from plugins.eo_sar.synthetic import write_sample

    root = write_sample(tmp_path / "eo", n_patches=10)
    dm = EOSARMultilabelDataModule(root, modality="s1", img_size=16, batch_size=3, seed=0)
    assert isinstance(dm, DictBatchDataModule) and dm.has_test

    def plain(ds, shuffle):
        return DataLoader(ds, batch_size=3, shuffle=shuffle)

    _assert_same_batches(_batches(dm.train_dataloader(), 9, 5), _batches(plain(dm.train_set, True), 9, 5))
    _assert_same_batches(_batches(dm.val_dataloader(), 9), _batches(plain(dm.val_set, False), 9))
    _assert_same_batches(_batches(dm.test_dataloader(), 9), _batches(plain(dm.test_set, False), 9))
    # no test split: test batches are val's
    dm.test_set = None
    assert not dm.has_test and "test" not in dm.datasets
    _assert_same_batches(_batches(dm.test_dataloader(), 9), _batches(plain(dm.val_set, False), 9))
    _assert_no_fork(dm, "train")


# ---------------------------------------------------------------- sports-reid pairs

def test_sports_reid_pair_batches_come_from_the_distinct_player_sampler(tmp_path):
    from domainfm.data import DictBatchDataModule
    from plugins.sports_reid.datamodule import ReIDPairDataModule
    from plugins.sports_reid.datasets import DistinctPlayerPairSampler

    md = _module("sports_reid_make_data_dm", DATA / "sports_reid" / "make_data.py")
    root = md.make_generic(tmp_path / "generic", train_players=4, test_players=2, frames=3)
    dm = ReIDPairDataModule(root, img_size=16, batch_size=2, mean=(0.5,) * 3, std=(0.5,) * 3, seed=7)
    assert isinstance(dm, DictBatchDataModule)
    got = _batches(dm.train_dataloader(), 9)
    sampler = DistinctPlayerPairSampler(dm.train_set.pids, 2, seed=7, rank=0, world_size=1)
    want = _batches(DataLoader(dm.train_set, batch_sampler=sampler), 9)
    _assert_same_batches(got, want)
    for batch in got:  # never two pairs of one player in a batch
        assert batch["anchor"].shape == (2, 3, 16, 16)
    _assert_no_fork(dm, "train")
    assert np.isfinite(got[0]["anchor"].numpy()).all()
