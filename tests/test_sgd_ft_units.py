"""sgd-ft building blocks without Lightning: which parameters freeze, exact optimizer-state bytes,
and the ImageFolder reader on real PNG and GeoTIFF files (good and bad)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from domainfm.backbones import create_backbone
from domainfm.errors import DomainFMError
from plugins.sgd_ft.datasets import ImageFolderClassification, check_channels, scan_split, split_statistics
from plugins.sgd_ft.model import Classifier, apply_freezing
from plugins.sgd_ft.optim import build_optimizer, optimizer_state_bytes, per_parameter_state_bytes

_spec = importlib.util.spec_from_file_location("sgd_ft_make_data",
                                               Path(__file__).parent / "data" / "sgd_ft" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)


def _classifier(name: str, img_size: int = 32, **kw) -> Classifier:
    torch.manual_seed(0)
    if name.startswith("vit"):
        kw.setdefault("depth", 2)  # the same structure as the full model, at a fraction of the cost
    return Classifier(create_backbone(name, in_chans=3, img_size=img_size, init="random", **kw), num_outputs=3)


# ---------------------------------------------------------------- freezing

@pytest.mark.parametrize("name, pos, expected", [
    ("resnet18", False, {"conv1.weight", "bn1.weight", "bn1.bias"}),
    ("convnext_atto", False, {"stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"}),
    ("vit_tiny_patch16_224", False, {"patch_embed.proj.weight", "patch_embed.proj.bias"}),
    ("vit_tiny_patch16_224", True, {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "cls_token"}),
])
def test_embedding_layer_is_found_and_only_it_is_frozen(name, pos, expected):
    model = _classifier(name)
    report = apply_freezing(model, freeze_embed=True, freeze_pos_embed=pos)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"backbone.model.{n}" for n in expected}
    timm_params = dict(model.backbone.model.named_parameters())
    assert report.frozen_params == sum(timm_params[n].numel() for n in expected)
    assert report.trainable_params == sum(p.numel() for p in model.parameters()) - report.frozen_params


def test_pos_embed_alone_and_nothing_frozen():
    model = _classifier("vit_tiny_patch16_224")
    report = apply_freezing(model, freeze_embed=False, freeze_pos_embed=True)
    assert set(report.names) == {"backbone.model.pos_embed", "backbone.model.cls_token"}
    plain = _classifier("vit_tiny_patch16_224")
    assert apply_freezing(plain, freeze_embed=False, freeze_pos_embed=False).frozen_params == 0
    assert all(p.requires_grad for p in plain.parameters())


def test_frozen_stem_batchnorm_keeps_its_running_statistics():
    model = _classifier("resnet18")
    apply_freezing(model, freeze_embed=True, freeze_pos_embed=False)
    model.train()
    stem_bn, block_bn = model.backbone.model.bn1, model.backbone.model.layer1[0].bn1
    assert not stem_bn.training and block_bn.training
    before = stem_bn.running_mean.clone(), block_bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(stem_bn.running_mean, before[0])
    assert not torch.equal(block_bn.running_mean, before[1])


# ---------------------------------------------------------------- optimizer state

def _step(model: Classifier, opt) -> None:
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("optimizer, momentum", [("sgd", 0.9), ("sgd", 0.0), ("adamw", 0.9)])
def test_optimizer_state_is_exactly_4_0_or_8_bytes_per_trainable_parameter(optimizer, momentum):
    model = _classifier("vit_tiny_patch16_224")
    apply_freezing(model, freeze_embed=True, freeze_pos_embed=False)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("backbone.model.patch_embed.")]
    n_scalars = sum(p.numel() for p in trainable)
    opt = build_optimizer(model.parameters(), optimizer, lr=1e-3, momentum=momentum)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainable}
    _step(model, opt)
    expected_per_param = {("sgd", 0.9): 4, ("sgd", 0.0): 0, ("adamw", 0.9): 8}[(optimizer, momentum)]
    # AdamW also keeps one fp32 step counter per parameter tensor
    counters = 4 * len(trainable) if optimizer == "adamw" else 0
    assert optimizer_state_bytes(opt) == expected_per_param * n_scalars + counters
    assert per_parameter_state_bytes(opt) == expected_per_param


def test_every_parameter_frozen_is_a_clear_error():
    model = _classifier("resnet18")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(DomainFMError, match="nothing to fine-tune"):
        build_optimizer(model.parameters(), "sgd", lr=0.1)


# ---------------------------------------------------------------- metrics (torchmetrics, synced across ranks)

def test_task_metrics_equal_sklearn_map_and_hand_accuracy_over_several_batches():
    from sklearn.metrics import average_precision_score

    from plugins.sgd_ft.task import compute_score, configure_metrics

    rng = np.random.default_rng(0)
    scores = rng.random((23, 6)).astype(np.float32)
    scores[:, 1] = np.round(scores[:, 1], 1)  # tied scores
    targets = (rng.random((23, 6)) > 0.6).astype(np.int64)
    targets[:, 3] = 0  # a class without positives: no AP, left out of the mean
    targets[:, 5] = 1
    metrics = configure_metrics("multilabel", 6)
    for lo, hi in ((0, 10), (10, 11), (11, 23)):  # batches of uneven sizes, as a split ends
        for m in metrics.values():
            m.update(torch.from_numpy(scores[lo:hi]), torch.from_numpy(targets[lo:hi]))
    expected = np.mean([average_precision_score(targets[:, k], scores[:, k]) for k in (0, 1, 2, 4, 5)])
    assert compute_score("multilabel", metrics) == pytest.approx(expected, abs=1e-6)
    for m in metrics.values():
        m.reset()
        m.update(torch.rand(4, 6), torch.zeros(4, 6, dtype=torch.long))
    with pytest.raises(DomainFMError, match="no class has a positive sample"):
        compute_score("multilabel", metrics)

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 5.0], [4.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1, 1])  # hits: rows 0, 2, 4
    acc = configure_metrics("multiclass", 3)
    acc["accuracy"].update(logits[:2], labels[:2])
    acc["accuracy"].update(logits[2:], labels[2:])
    assert compute_score("multiclass", acc) == pytest.approx(3 / 5)


# ---------------------------------------------------------------- data

def test_imagefolder_png_reads_back_what_was_written(tmp_path):
    root = make_data.write_imagefolder(tmp_path / "d", train=2, val=1, size=20)
    classes, files = scan_split(root, "train")
    assert classes == list(make_data.CLASSES)
    assert [f.label for f in files] == [0, 0, 1, 1, 2, 2]
    assert check_channels(files, None) == 3
    ds = ImageFolderClassification(files, classes, img_size=20, mean=[0.5] * 3, std=[0.25] * 3)
    from PIL import Image

    raw = np.asarray(Image.open(files[3].path).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    item = ds[3]
    assert item["label"] == 1
    np.testing.assert_allclose(item["image"].numpy(), (raw - 0.5) / 0.25, atol=1e-6)
    assert ImageFolderClassification(files, classes, img_size=28, mean=[0] * 3, std=[1] * 3)[0]["image"].shape == (3, 28, 28)
    fig = ds.plot(item, prediction=2)
    assert "forest" in fig.axes[0].get_title() and "water" in fig.axes[0].get_title()


def test_geotiff_bands_are_standardised_with_train_statistics(tmp_path):
    import rasterio

    root = make_data.write_imagefolder(tmp_path / "g", fmt="tif", bands=5, train=3, val=1, size=16)
    classes, files = scan_split(root, "train")
    assert check_channels(files, 5) == 5
    mean, std = split_statistics(files)
    stack = []
    for f in files:
        with rasterio.open(f.path) as src:
            stack.append(src.read().astype(np.float64))
    stack = np.stack(stack)  # [N, C, H, W]
    np.testing.assert_allclose(mean, stack.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(std, stack.std(axis=(0, 2, 3)), rtol=1e-4)
    ds = ImageFolderClassification(files, classes, img_size=16, mean=mean, std=std)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert images.shape == (9, 5, 16, 16)
    np.testing.assert_allclose(images.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(images.std(dim=(0, 2, 3), unbiased=False).numpy(), 1, atol=1e-3)


def test_core_band_statistics_leave_nan_out_and_match_numpy():
    from domainfm.data import band_statistics

    rng = np.random.default_rng(0)
    images = [rng.normal(5, 3, (3, 4, 6)), rng.normal(-2, 1, (3, 7, 2)).astype(np.float32)]
    images[0][1, :2, :3] = np.nan  # band 1 nodata in a corner of the first image only
    images[1][2] = 4.0
    stack = np.concatenate([im.reshape(3, -1).astype(np.float64) for im in images], axis=1)
    stats = band_statistics(iter(images))  # a generator: streamed, one image at a time
    np.testing.assert_allclose(stats.mean, np.nanmean(stack, axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.std, np.nanstd(stack, axis=1), rtol=1e-9)
    assert stats.count.tolist() == [38, 32, 38]
    constant = band_statistics([np.full((2, 3, 3), 7.0), np.full((2, 1, 1), np.nan)])
    assert constant.mean.tolist() == [7.0, 7.0] and constant.std.tolist() == [1.0, 1.0]  # never divide by 0
    empty = band_statistics([np.full((1, 2, 2), np.nan)])
    assert (empty.mean.tolist(), empty.std.tolist(), empty.count.tolist()) == ([0.0], [1.0], [0])
    with pytest.raises(DomainFMError, match="an image has 2 bands where the others have 3"):
        band_statistics([np.zeros((3, 2, 2)), np.zeros((2, 2, 2))])
    with pytest.raises(DomainFMError, match="no images to compute band statistics from"):
        band_statistics([])


def test_class_folders_are_walked_by_torchvision_and_read_by_the_core_reader(tmp_path):
    from PIL import Image

    from plugins.sgd_ft.datasets import ClassFolders

    root = make_data.write_imagefolder(tmp_path / "d", train=2, val=1, size=8)
    first = sorted((root / "train" / make_data.CLASSES[0]).iterdir())
    # skipped: a hidden folder, a hidden file, a class folder's sub-folder
    for extra in (root / "train" / ".ipynb_checkpoints" / "x.png", root / "train" / make_data.CLASSES[0] / ".x.png",
                  root / "train" / make_data.CLASSES[0] / "sub" / "x.png"):
        extra.parent.mkdir(exist_ok=True)
        make_data.write_png(extra, np.zeros((3, 8, 8), np.float32))
    train = ClassFolders(root / "train")
    assert train.classes == list(make_data.CLASSES) and len(train) == 2 * len(make_data.CLASSES)
    assert [Path(p) for p, _ in train.samples[:2]] == first and train.targets == [0, 0, 1, 1, 2, 2]
    image, label = train[0]
    raw = np.asarray(Image.open(first[0]).convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    assert label == 0 and image.dtype == np.float32
    np.testing.assert_allclose(image, raw, atol=1e-7)
    # val/test take train's class indices, whatever classes they hold
    reordered = [make_data.CLASSES[2], "extra", make_data.CLASSES[0], make_data.CLASSES[1]]
    val = ClassFolders(root / "val", reordered)
    assert val.classes == reordered
    assert [(Path(p).parent.name, i) for p, i in val.samples] == [(c, reordered.index(c)) for c in sorted(make_data.CLASSES)]


def test_bad_folders_are_named(tmp_path):
    root = make_data.write_imagefolder(tmp_path / "d", train=1, val=1, size=8)
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DomainFMError, match=r"train/empty: class folder holds no images"):
        scan_split(root, "train")
    (root / "train" / "empty" / "notes.txt").unlink()
    (root / "train" / "empty").rmdir()
    (root / "val" / "desert").mkdir()
    make_data.write_png(root / "val" / "desert" / "0.png", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(DomainFMError, match=r"val: classes desert are not in train/"):
        scan_split(root, "val", scan_split(root, "train")[0])
    from plugins.sgd_ft.datamodule import ImageFolderDataModule

    single = make_data.write_imagefolder(tmp_path / "one", train=1, val=1, size=8, classes=("a",))
    with pytest.raises(DomainFMError, match=r"one/train: holds one class folder \(a\); classification needs at least two"):
        ImageFolderDataModule(single, img_size=8, batch_size=1)
    bad = root / "train" / "forest" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DomainFMError, match=r"broken\.png: cannot be read as an image"):
        scan_split(root, "train")


# ---------------------------------------------------------------- plugin surface

def test_lr_sweep_parsing():
    from plugins.sgd_ft.arms import parse_lr_sweep

    assert parse_lr_sweep("1e-4, 3e-4,1e-3,1e-4") == [1e-4, 3e-4, 1e-3]
    assert parse_lr_sweep(None) == []
    with pytest.raises(DomainFMError, match=r"--lr-sweep has '3e-4x', which is not a number"):
        parse_lr_sweep("1e-4,3e-4x")
    with pytest.raises(DomainFMError, match="must be positive"):
        parse_lr_sweep("0,1e-3")


def test_plugin_is_registered_and_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys; from domainfm import plugins; p = plugins.load('sgd-ft'); "
            "assert p.name == 'sgd-ft' and 'finetune' in p.supported, p.supported; "
            "names = [o.name for o in p.options('finetune')]; "
            "assert {'optimizer', 'freeze_embed', 'freeze_pos_embed', 'lr_sweep', 'compare'} <= set(names), names; "
            "assert not p.options('pretrain'); "
            "heavy = [m for m in ('torch', 'lightning', 'mlflow', 'timm') if m in sys.modules]; "
            "assert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_backbone_flag_may_name_weights(tmp_path):
    from domainfm.backbones import save_backbone
    from domainfm.config import RunConfig
    from plugins.sgd_ft.jobs import weights_from_backbone_flag

    plain = RunConfig(backbone="resnet18")
    assert weights_from_backbone_flag(plain) is plain
    uri = weights_from_backbone_flag(RunConfig(backbone="models:/eo@champion"))
    assert uri.weights == "models:/eo@champion"
    path = save_backbone(create_backbone("resnet18", in_chans=3, img_size=32, init="random"), tmp_path / "b.safetensors")
    local = weights_from_backbone_flag(RunConfig(backbone=str(path)))
    assert (local.backbone, local.weights) == ("resnet18", str(path))
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pth")
    with pytest.raises(DomainFMError, match="plain.pth: these weights do not say which architecture"):
        weights_from_backbone_flag(RunConfig(backbone=str(tmp_path / "plain.pth")))
    with pytest.raises(DomainFMError, match="both name weights"):
        weights_from_backbone_flag(RunConfig(backbone=str(path), weights=str(path)))


def test_geotiff_nodata_is_left_out_of_statistics_and_becomes_zero(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    folder = tmp_path / "d" / "train" / "a"
    folder.mkdir(parents=True)
    data = np.array([[[1, 2], [3, 0]], [[10, 20], [30, 0]]], np.uint16)  # 0 = nodata
    profile = dict(driver="GTiff", height=2, width=2, count=2, dtype="uint16", nodata=0, crs="EPSG:32633",
                   transform=from_origin(0, 0, 10, 10))
    with rasterio.open(folder / "x.tif", "w", **profile) as dst:
        dst.write(data)
    classes, files = scan_split(tmp_path / "d", "train")
    mean, std = split_statistics(files)
    np.testing.assert_allclose(mean, [2.0, 20.0])
    np.testing.assert_allclose(std, [np.std([1, 2, 3]), np.std([10, 20, 30])], rtol=1e-6)
    image = ImageFolderClassification(files, classes, img_size=2, mean=mean, std=std)[0]["image"]
    assert image[0, 1, 1] == 0 and image[1, 1, 1] == 0
    np.testing.assert_allclose(image[0, 0, 0], (1 - 2.0) / std[0], rtol=1e-6)


# ---------------------------------------------------------------- the eo-sar finetune_datamodule hook

def test_eo_sar_finetune_datamodule_hook_keeps_the_batch_contract(tmp_path):
    """sgd-ft's multi-label data comes through ``plugins.load("eo-sar")``: batches, class and band
    names, the seeded 60/20/20 split of the labelled patches and renormalisation, on real GeoTIFFs."""
    from domainfm import plugins
    from domainfm.config import RunConfig
    from plugins.eo_sar.bands import CLASS_NAMES, S1_BANDS
    from plugins.eo_sar.datasets import EOSARPatches
    from plugins.eo_sar.synthetic import write_sample

    root = write_sample(tmp_path / "eo", n_patches=10)
    cfg = RunConfig(data=str(root), options={"modality": "s1", "layout": "auto", "label_threshold": 0.01})
    eo = plugins.load("eo-sar")
    dm = eo.finetune_datamodule(cfg, img_size=16, batch_size=4, seed=0)
    assert (dm.task, dm.classes, dm.num_outputs, dm.in_chans, dm.bands) == ("multilabel", list(CLASS_NAMES), 9, 2,
                                                                            S1_BANDS)
    independent = EOSARPatches(root, "s1")
    labelled = [i for i in range(len(independent)) if independent.labels_of(i) is not None]
    n_val = n_test = max(1, round(0.2 * len(labelled)))
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sizes == [len(labelled) - n_val - n_test, n_val, n_test] and dm.has_test
    parts = [set(s.indices) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert set().union(*parts) == set(labelled) and sum(map(len, parts)) == len(labelled)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "labels"}
    assert batch["image"].dtype == torch.float32 and tuple(batch["image"].shape) == (4, 2, 16, 16)
    assert batch["labels"].dtype == torch.float32 and tuple(batch["labels"].shape) == (4, 9)
    assert set(batch["labels"].unique().tolist()) <= {0.0, 1.0}
    i = dm.val_set.indices[0]
    np.testing.assert_array_equal(dm.val_set[0]["labels"].numpy(), independent.labels_of(i))
    # renormalising: the same patch, re-standardised by hand from the old statistics
    before, (m0, s0) = dm.patches[i], (np.asarray(dm.mean), np.asarray(dm.std))
    dm.use_statistics((-10.0, -20.0), (5.0, 4.0))
    assert dm.mean == (-10.0, -20.0) and dm.std == (5.0, 4.0)
    valid = before["valid"].numpy()
    raw = before["image"].numpy() * s0[:, None, None] + m0[:, None, None]
    expected = np.where(valid, (raw - np.array([-10.0, -20.0])[:, None, None]) / np.array([5.0, 4.0])[:, None, None], 0)
    np.testing.assert_allclose(dm.patches[i]["image"].numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(DomainFMError, match="--in-chans 3 does not match the data: s1 patches have 2 bands"):
        eo.finetune_datamodule(cfg, img_size=16, batch_size=4, in_chans=3)
    with pytest.raises(DomainFMError, match="3 means and 2 stds for 2 bands"):
        dm.use_statistics((0.0, 0.0, 0.0), (1.0, 1.0))


def test_band_names_come_from_the_band_plugin_and_the_base_plugin_offers_no_data():
    from domainfm import plugins
    from domainfm.config import RunConfig

    plan = plugins.load("eo-sar").band_alignment(("B4", "B3", "B2"), ("B02", "B03", "B04", "B08"))
    assert (plan.have, plan.want, plan.changed) == (("B4", "B3", "B2"), ("B2", "B3", "B4", "B8"), True)
    rgb = torch.arange(3.0)[:, None, None].expand(3, 2, 2)  # red 0, green 1, blue 2
    np.testing.assert_array_equal(plan.apply(rgb)[:, 0, 0].numpy(), [2.0, 1.0, 0.0, 0.0])
    assert "filled with the band mean: B8" in plan.summary()
    base = plugins.Plugin()
    base.name = "bare"
    with pytest.raises(DomainFMError, match="plugin 'bare' offers no fine-tuning data"):
        base.finetune_datamodule(RunConfig(), img_size=8, batch_size=1)
    with pytest.raises(DomainFMError, match="plugin 'bare' names no bands to align"):
        base.band_alignment(("B1",), ("B1",))
