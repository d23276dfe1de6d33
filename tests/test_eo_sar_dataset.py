"""eo-sar dataset, labels, statistics cache, transforms, datamodule and plot on real GeoTIFFs
written by rasterio (tests/data/eo_sar/make_data.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from plugins.eo_sar.bands import CLASS_NAMES, S2_BANDS
from plugins.eo_sar.datasets import EOSARPatches
from plugins.eo_sar.labels import landcover_fractions
from plugins.eo_sar.plots import percentile_stretch
from plugins.eo_sar.transforms import TwoViews, crop_box, random_flip_rotate, random_resized_crop, resize

_spec = importlib.util.spec_from_file_location("eo_sar_make_data", Path(__file__).parent / "data" / "eo_sar" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)


@pytest.fixture(scope="module")
def eo_root(tmp_path_factory) -> Path:
    """Six co-registered S2/S1/land-cover patches (64 px in EPSG:32632, 48 px in EPSG:32633)."""
    return make_data.write_dataset(tmp_path_factory.mktemp("eo") / "root", n_patches=6)


def _raw(path: Path) -> tuple[np.ndarray, float | None]:
    with rasterio.open(path) as src:
        return src.read().astype(np.float64), src.nodata


def test_generated_geotiffs_are_realistic(eo_root):
    """What the generator promises, read back by rasterio (independent of the plugin's reader)."""
    crss = set()
    for p in sorted((eo_root / "s2").glob("*.tif")):
        with rasterio.open(p) as src:
            assert src.count == 13 and src.dtypes[0] == "uint16" and src.nodata == 0
            assert src.descriptions == S2_BANDS
            assert src.res == (10.0, 10.0) and src.crs.is_projected
            crss.add(src.crs.to_epsg())
            image = src.read().astype(float)
        with rasterio.open(eo_root / "landcover" / p.name) as src:
            lc = src.read(1)
        valid = (image > 0).all(axis=0) & (lc != 255)
        b4, b8 = image[S2_BANDS.index("B4")], image[S2_BANDS.index("B8")]
        water, trees = (lc == 0) & valid, (lc == 1) & valid
        if water.any() and trees.any():  # water dark in NIR, vegetation bright in B8
            assert b8[water].mean() < 0.3 * b8[trees].mean()
            assert (b8[trees] / b4[trees]).mean() > 3
    assert crss == {32632, 32633}
    with rasterio.open(eo_root / "s1" / "p00.tif") as src:
        assert src.count == 2 and src.dtypes[0] == "float32" and np.isnan(src.nodata)
        vv = src.read(1)
    assert np.isnan(vv).any() and -30 < np.nanmedian(vv) < 0
    with rasterio.open(eo_root / "s1" / "p01.tif") as src:
        assert src.nodata == -9999 and (src.read(1) == -9999).any()


def _independent_stats(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    pixels = []
    for p in sorted(folder.glob("*.tif")):
        image, nodata = _raw(p)
        bad = ~np.isfinite(image)
        if nodata is not None and np.isfinite(nodata):
            bad |= image == nodata
        pixels.append(image[:, ~bad.any(axis=0)])
    allpix = np.concatenate(pixels, axis=1)
    return allpix.mean(axis=1), allpix.std(axis=1)


@pytest.mark.parametrize("modality,bands", [("s2", 13), ("s1", 2)])
def test_dataset_reads_normalises_and_masks_nodata(eo_root, modality, bands):
    ds = EOSARPatches(eo_root, modality)
    assert len(ds) == 6 and ds.patch_ids == [f"p{i:02d}" for i in range(6)]
    assert "size: 6 (6 labelled)" in str(ds) and f"{bands} bands" in str(ds)
    mean, std = _independent_stats(eo_root / modality)
    np.testing.assert_allclose(ds.stats.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(ds.stats.std, std, rtol=1e-5)
    nodata_seen = 0
    for i in (0, 1):  # one patch per grid/size; p00 S1 nodata nan, p01 S1 nodata -9999 and an S2 edge
        sample = ds[i]
        raw, nodata = _raw(eo_root / modality / f"p{i:02d}.tif")
        image = sample["image"]
        assert image.dtype == torch.float32 and image.shape == (bands, *raw.shape[1:])
        assert torch.isfinite(image).all()
        invalid = ~np.isfinite(raw).all(axis=0) | (raw == nodata).any(axis=0)
        nodata_seen += int(invalid.sum())
        np.testing.assert_array_equal(sample["valid"].numpy(), ~invalid)
        expected = (raw - mean[:, None, None]) / std[:, None, None]
        np.testing.assert_allclose(image.numpy()[:, ~invalid], expected[:, ~invalid], rtol=1e-4, atol=1e-4)
        assert (image.numpy()[:, invalid] == 0).all()
    assert nodata_seen > 0, "the test data must contain nodata for this test to mean anything"


def test_untagged_fill_values_are_nodata(tmp_path):
    """Files without a nodata tag: S2's 0 fill and S1's -9999 fill are still masked."""
    root = tmp_path / "root"
    s2 = np.full((13, 8, 8), 1500, np.uint16)
    s2[:, 0, :] = 0  # first row outside the swath
    make_data.write_raster(root / "s2" / "a.tif", s2, nodata=None)
    s1 = np.full((2, 8, 8), -12.0, np.float32)
    s1[:, :, 0] = -9999.0
    s1[1, 5, 5] = -32768.0  # one band filled is enough to drop the pixel
    make_data.write_raster(root / "s1" / "a.tif", s1, nodata=None)
    for modality, expected_valid in (("s2", 56), ("s1", 55)):
        with rasterio.open(root / modality / "a.tif") as src:
            assert src.nodata is None
        ds = EOSARPatches(root, modality)
        sample = ds[0]
        assert int(sample["valid"].sum()) == expected_valid
        assert torch.isfinite(sample["image"]).all()
        assert ds.stats.mean[0] == pytest.approx(1500.0 if modality == "s2" else -12.0)


def test_labels_from_landcover_equal_a_hand_count(tmp_path):
    root = make_data.write_dataset(tmp_path / "root", n_patches=2, modalities=("s2",))
    lc, counts = make_data.hand_landcover()
    make_data.write_raster(root / "landcover" / "p00.tif", lc[None], nodata=255)
    valid = 100 - counts["nodata"]
    np.testing.assert_allclose(landcover_fractions(lc)[CLASS_NAMES.index("bare")], 1 / valid)

    def present(threshold):
        labels = EOSARPatches(root, "s2", label_threshold=threshold).labels_of(0)
        return {name for name, v in zip(CLASS_NAMES, labels) if v == 1}

    # 1/98 = 0.0102 >= 0.01: every class that occurs, even the single bare pixel
    assert present(0.01) == {"water", "trees", "crops", "built", "bare"}
    # 2/98 = 0.0204 >= 0.02 keeps built, drops bare
    assert present(0.02) == {"water", "trees", "crops", "built"}
    # 5/98 = 0.051 < 0.06; 30/98 = 0.306
    assert present(0.06) == {"water", "trees"}
    assert present(0.5) == {"water"}  # 60/98


def test_landcover_counts_are_cached_and_follow_edits(tmp_path):
    root = make_data.write_dataset(tmp_path / "root", n_patches=2, modalities=("s2",))
    EOSARPatches(root, "s2")
    cache = root / ".domainfm_landcover.json"
    record = json.loads(cache.read_text())
    assert record["classes"] == list(CLASS_NAMES) and sorted(record["counts"]) == ["p00", "p01"]
    with rasterio.open(root / "landcover" / "p01.tif") as src:
        lc = src.read(1)
    assert record["counts"]["p01"] == np.bincount(lc[lc != 255], minlength=9).tolist()
    # a rewritten raster is counted again
    snow = np.full_like(lc, CLASS_NAMES.index("snow_and_ice"))
    make_data.write_raster(root / "landcover" / "p01.tif", snow[None], nodata=255, crs="EPSG:32633")
    assert EOSARPatches(root, "s2").labels_of(1).tolist() == [0] * 8 + [1]


def test_labels_csv_overrides_landcover(tmp_path):
    root = make_data.write_dataset(tmp_path / "root", n_patches=3, modalities=("s2",))
    before = EOSARPatches(root, "s2")
    row = [0, 0, 0, 0, 0, 0, 0, 0, 1]  # snow only: different from p01's land cover
    assert before.labels_of(1).tolist() != row
    make_data.write_labels_csv(root, {"p01": row})
    after = EOSARPatches(root, "s2")
    assert after.labels_of(1).tolist() == row
    assert after[1]["labels"].tolist() == row
    # patches without a row keep their land-cover labels
    np.testing.assert_array_equal(after.labels_of(0), before.labels_of(0))
    np.testing.assert_array_equal(after.labels_of(2), before.labels_of(2))


def test_patch_without_any_label_gets_zero_labels(tmp_path):
    root = make_data.write_dataset(tmp_path / "root", n_patches=2, modalities=("s2",))
    (root / "landcover" / "p01.tif").unlink()
    ds = EOSARPatches(root, "s2")
    assert ds.labels_of(1) is None and ds[1]["labels"].sum() == 0 and ds[1]["has_labels"] is False
    assert ds.labels_of(0) is not None


def test_stats_cache_is_written_once_and_reused(tmp_path):
    root = make_data.write_dataset(tmp_path / "root", n_patches=2, modalities=("s2",))
    cache = root / ".domainfm_stats_s2.json"
    first = EOSARPatches(root, "s2")
    record = json.loads(cache.read_text())
    assert record["n_files"] == 2 and record["bands"] == list(S2_BANDS)
    assert record["mean"] == pytest.approx(list(first.stats.mean))
    stamp = cache.stat().st_mtime_ns
    # plant a value that only the cache holds: a rebuild that uses it has not recomputed
    record["mean"][0] = 1234.5
    cache.write_text(json.dumps(record))
    stamp = cache.stat().st_mtime_ns
    second = EOSARPatches(root, "s2")
    assert second.stats.mean[0] == 1234.5 and cache.stat().st_mtime_ns == stamp
    assert not list(root.glob("*.tmp"))
    # a new file changes the file list: recomputed and rewritten
    make_data.write_dataset(tmp_path / "more", n_patches=3, modalities=("s2",))
    (tmp_path / "more" / "s2" / "p02.tif").rename(root / "s2" / "p02.tif")
    third = EOSARPatches(root, "s2")
    assert third.stats.mean[0] != 1234.5
    np.testing.assert_allclose(third.stats.mean, _independent_stats(root / "s2")[0], rtol=1e-6)
    assert json.loads(cache.read_text())["n_files"] == 3


def test_header_checks_are_cached_until_a_file_changes(tmp_path):
    from domainfm.errors import DomainFMError

    root = make_data.write_dataset(tmp_path / "root", n_patches=2, modalities=("s1",))
    first = EOSARPatches(root, "s1")
    cache = root / ".domainfm_files_s1.json"
    record = json.loads(cache.read_text())
    assert [row[0] for row in record["files"]] == ["p00.tif", "p01.tif"]
    assert record["files"][0][1:5] == [64, 64, 2, "float32"] and np.isnan(record["files"][0][6])
    assert [f.nodata for f in first.files][1] == -9999
    # a planted CRS that only the cache holds: a rebuild that shows it opened no header
    record["files"][0][5] = "EPSG:4326"
    cache.write_text(json.dumps(record))
    assert EOSARPatches(root, "s1").files[0].crs == "EPSG:4326"
    # a file cut short changes the fingerprint: every header is checked again and the error names it
    make_data.truncate(root / "s1" / "p01.tif")
    with pytest.raises(DomainFMError, match="p01.tif: truncated or corrupt GeoTIFF"):
        EOSARPatches(root, "s1")


def test_resize_and_random_resized_crop():
    image = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    assert resize(image, 8) is image
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = crop_box(48, 64, scale=(0.2, 1.0), ratio=(0.75, 4 / 3), generator=g)
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
        assert 0.2 * 48 * 64 * 0.9 <= h * w <= 48 * 64
    # a crop of the whole image is a plain resize
    torch.testing.assert_close(random_resized_crop(image, 4, scale=(1.0, 1.0), ratio=(1.0, 1.0)), resize(image, 4))
    constant = torch.full((13, 64, 64), 3.0)
    out = random_resized_crop(constant, 28, generator=g)
    assert out.shape == (13, 28, 28) and torch.allclose(out, torch.full_like(out, 3.0))


def test_random_flip_rotate_gives_each_symmetry_of_the_square():
    image = torch.arange(9, dtype=torch.float32).reshape(1, 3, 3)
    symmetries = {tuple(torch.rot90(im, k, dims=(-2, -1)).flatten().tolist()) for im in (image, image.flip(-1))
                  for k in range(4)}
    assert len(symmetries) == 8
    g = torch.Generator().manual_seed(1)
    seen = {tuple(random_flip_rotate(image, generator=g).flatten().tolist()) for _ in range(200)}
    assert seen == symmetries


def test_two_views_differ_and_keep_labels(eo_root):
    ds = EOSARPatches(eo_root, "s2", transforms=TwoViews(28))
    torch.manual_seed(0)
    out = ds[0]
    assert set(out) == {"view_teacher", "view_student", "labels"}
    assert out["view_teacher"].shape == out["view_student"].shape == (13, 28, 28)
    assert not torch.equal(out["view_teacher"], out["view_student"])
    assert out["labels"].dtype == torch.float32 and out["labels"].shape == (len(CLASS_NAMES),)


def test_datamodule_batches(eo_root):
    from plugins.eo_sar.datamodule import EOSARDataModule

    dm = EOSARDataModule(eo_root, "s1", img_size=28, batch_size=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 1  # 6 patches, batch 4: the partial batch is dropped (contrastive loss)
    batch = batches[0]
    assert batch["view_teacher"].shape == batch["view_student"].shape == (4, 2, 28, 28)
    assert batch["labels"].shape == (4, 9) and batch["labels"].dtype == torch.float32
    assert torch.isfinite(batch["view_teacher"]).all() and torch.isfinite(batch["view_student"]).all()
    assert set(batch["labels"].unique().tolist()) <= {0.0, 1.0} and batch["labels"].sum() > 0
    # a dataset smaller than one batch still yields it
    small = EOSARDataModule(eo_root, "s2", img_size=28, batch_size=8)
    assert [b["view_teacher"].shape[0] for b in small.train_dataloader()] == [6]


def test_plot_s2_true_colour_and_s1_false_colour(eo_root, tmp_path):
    ds = EOSARPatches(eo_root, "s2")
    sample = ds[1]
    fig = ds.plot(sample, suptitle="p01")
    shown = fig.axes[0].get_images()[0].get_array()
    raw, _ = _raw(eo_root / "s2" / "p01.tif")
    valid = sample["valid"].numpy()
    expected = percentile_stretch(raw[[3, 2, 1]], valid).transpose(1, 2, 0)  # B4, B3, B2 from disk
    np.testing.assert_allclose(np.asarray(shown), expected, atol=1e-4)
    title = fig.axes[0].get_title()
    assert all(name in title for name, v in zip(CLASS_NAMES, sample["labels"]) if v)
    fig.savefig(tmp_path / "s2.png")
    s1 = EOSARPatches(eo_root, "s1")
    fig = s1.plot(s1[0], prediction=[0.9] + [0.1] * 8)
    shown = np.asarray(fig.axes[0].get_images()[0].get_array())
    raw, _ = _raw(eo_root / "s1" / "p00.tif")
    valid = s1[0]["valid"].numpy()
    expected = percentile_stretch(np.stack([raw[0], raw[1], raw[0] - raw[1]]), valid).transpose(1, 2, 0)
    np.testing.assert_allclose(shown, expected, atol=1e-4)
    assert "predicted: water" in fig.axes[0].get_title()
    fig.savefig(tmp_path / "s1.png")
    assert (tmp_path / "s1.png").stat().st_size > 1000


def test_percentile_stretch_by_hand_ignores_invalid_pixels():
    """torchgeo's percentile_normalization per band over the valid pixels only: the nodata fill
    (-9999) must not move the 2 % point, and invalid pixels are black."""
    rng = np.random.default_rng(0)
    image = rng.uniform(100.0, 3000.0, size=(3, 20, 20))
    valid = np.ones((20, 20), bool)
    valid[:4] = False
    image[:, ~valid] = -9999.0
    got = percentile_stretch(image, valid)
    for b in range(3):
        values = np.sort(image[b][valid])
        # numpy's default (linear) percentile, by hand: position p/100 * (n - 1) between order statistics
        def pct(p):
            pos = p / 100 * (len(values) - 1)
            lo = int(np.floor(pos))
            return values[lo] + (pos - lo) * (values[min(lo + 1, len(values) - 1)] - values[lo])
        lo, hi = pct(2.0), pct(98.0)
        expected = np.clip((image[b] - lo) / (hi - lo), 0.0, 1.0)
        np.testing.assert_allclose(got[b][valid], expected[valid], atol=1e-5)
    assert (got[:, ~valid] == 0).all() and got.dtype == np.float32
    assert got[:, valid].max() == 1.0 and got[:, valid].min() == 0.0
    assert (percentile_stretch(image, np.zeros((20, 20), bool)) == 0).all()  # nothing valid: black
