"""histo tiling: slide µm/px, pyramid level choice, tissue detection, coords files, CLI errors.

Slides are real files written by tests/data/histo/make_data.py and read back by OpenSlide.
"""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from domainfm.errors import DomainFMError
from plugins.histo import slides as S
from plugins.histo import tiling as T
from plugins.histo import tissue as TI
from plugins.histo.commands import tile_command
from conftest import load_make_data



@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return load_make_data("histo").make_slides(tmp_path_factory.mktemp("histo_slides"))


# ---------------------------------------------------------------- pure functions

def test_otsu_matches_exhaustive_search_of_within_class_variance():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(20, 5, 3000), rng.normal(120, 15, 1000)]).clip(0, 255)
    thr = TI.otsu_threshold(values)
    # independent: try every bin edge, keep the one with the least weighted within-class variance
    edges = np.linspace(0, 255, 257)
    hist, _ = np.histogram(values, bins=256, range=(0, 255))
    centres = (edges[:-1] + edges[1:]) / 2
    best, best_edge = np.inf, None
    for k in range(1, 256):
        lo, hi = hist[:k], hist[k:]
        if lo.sum() == 0 or hi.sum() == 0:
            continue
        v = sum(h.sum() * np.average((c - np.average(c, weights=h)) ** 2, weights=h)
                for h, c in ((lo, centres[:k]), (hi, centres[k:])))
        if v < best:
            best, best_edge = v, edges[k]
    assert thr == pytest.approx(best_edge)
    assert 30 < thr < 90  # between the two modes


def test_tissue_mask_finds_the_drawn_blobs():
    md = load_make_data("histo")
    w, h = 400, 300
    img = md.tissue_image(w, h, seed=1)
    yy, xx = np.mgrid[0:h, 0:w]
    truth = np.zeros((h, w), bool)
    for (cx, cy), (rx, ry), _ in md.BLOBS:
        truth |= ((xx / w - cx) / rx) ** 2 + ((yy / h - cy) / ry) ** 2 <= 1.0
    mask = TI.tissue_mask(img)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    # an empty (white) slide has no tissue, even though Otsu always splits something
    white = np.full((100, 100, 3), 240, np.uint8) + np.random.default_rng(0).integers(0, 4, (100, 100, 1)).astype(np.uint8)
    assert TI.tissue_mask(white).sum() == 0


def test_hole_filling_fills_enclosed_holes_only():
    mask = np.zeros((50, 50), bool)
    mask[10:40, 10:40] = True
    mask[20:23, 20:23] = False       # a small hole inside the tissue
    mask[0:3, 45:50] = False         # background at the border stays background
    filled = TI.fill_small_holes(mask, max_hole=20)
    assert filled[20:23, 20:23].all()
    assert not filled[:10].any()
    big = mask.copy()
    big[15:35, 15:35] = False        # 400-pixel hole: larger than max_hole, kept
    assert not TI.fill_small_holes(big, max_hole=20)[15:35, 15:35].any()


def test_tile_tissue_fraction_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((64, 80)) > 0.5
    coords = T.grid_coords(160, 128, 16)  # level 0 is twice the mask size
    frac = TI.tile_tissue_fractions(mask, coords[:, 0], coords[:, 1], 16, 2.0)
    expected = [mask[y // 2:(y + 16) // 2, x // 2:(x + 16) // 2].mean() for x, y in coords]
    np.testing.assert_allclose(frac, expected)


def test_level_choice_reads_the_level_just_finer_than_the_target():
    ds = (1.0, 4.0, 16.0)
    assert S.choose_level(ds, 0.25, 0.5) == 0     # level 1 would be 1.0 µm/px: coarser than wanted
    assert S.choose_level(ds, 0.25, 1.0) == 1
    assert S.choose_level(ds, 0.25, 3.9) == 1
    assert S.choose_level(ds, 0.25, 4.0) == 2
    g = S.tile_geometry(ds, 0.25, 0.5, 224)
    assert (g.tile_size_level0, g.level, g.read_size) == (448, 0, 448)
    g = S.tile_geometry(ds, 0.25, 2.0, 224)
    assert (g.tile_size_level0, g.level, g.read_size) == (1792, 1, 448)


def test_mpp_from_openslide_property_then_tiff_tags():
    assert S.mpp_from_properties({"openslide.mpp-x": "0.2525"}) == pytest.approx(0.2525)
    assert S.mpp_from_properties({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "40000"}) == pytest.approx(0.25)
    assert S.mpp_from_properties({"tiff.ResolutionUnit": "inch", "tiff.XResolution": "50800"}) == pytest.approx(0.5)
    assert S.mpp_from_properties({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1"}) is None


# ---------------------------------------------------------------- real slides

def test_openslide_reads_the_generated_slides(slides):
    import openslide

    svs = openslide.OpenSlide(str(slides["svs"]))
    assert svs.properties["openslide.vendor"] == "aperio"
    assert svs.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    tif = openslide.OpenSlide(str(slides["tiff"]))
    assert tif.properties["openslide.vendor"] == "generic-tiff"
    assert S.mpp_from_properties(svs.properties) == pytest.approx(0.25)
    assert S.mpp_from_properties(tif.properties) == pytest.approx(0.5)
    assert S.mpp_from_properties(openslide.OpenSlide(str(slides["no_mpp"])).properties) is None


def test_40x_and_20x_scans_give_tiles_of_the_same_tissue(slides):
    a = T.tile_slide(slides["svs"], mpp=1.0, tile_size=32)
    b = T.tile_slide(slides["tiff"], mpp=1.0, tile_size=32)
    assert a.geometry.tile_size_level0 == 128 and b.geometry.tile_size_level0 == 64
    assert a.geometry.level == 1 and b.geometry.level == 0
    # the same physical grid: the 40x coordinates are twice the 20x ones
    common = set(map(tuple, a.coords // 2)) & set(map(tuple, b.coords))
    assert len(common) >= 0.9 * max(len(a.coords), len(b.coords))
    sa, sb = S.open_slide(slides["svs"]), S.open_slide(slides["tiff"])
    diffs, shifted = [], []
    for x, y in sorted(common)[:10]:
        ta = S.read_tile(sa, 2 * x, 2 * y, a.geometry).astype(float)
        tb = S.read_tile(sb, x, y, b.geometry).astype(float)
        assert ta.shape == tb.shape == (32, 32, 3)
        diffs.append(np.abs(ta.mean((0, 1)) - tb.mean((0, 1))).max())
        shifted.append(np.abs(ta - S.read_tile(sb, x + 300, y, b.geometry)).mean())
    assert max(diffs) < 6.0          # same tissue: colour within a few grey levels
    assert np.mean(shifted) > 10.0   # while another place of the slide differs clearly


def test_tiles_lie_on_tissue_and_max_tiles_is_seeded(slides):
    ts = T.tile_slide(slides["tiff"], mpp=1.0, tile_size=32, min_tissue=0.6)
    assert len(ts.coords) > 20
    assert (ts.tissue_fraction >= 0.6).all()
    sub1 = T.tile_slide(slides["tiff"], mpp=1.0, tile_size=32, max_tiles=7, seed=3).coords
    sub2 = T.tile_slide(slides["tiff"], mpp=1.0, tile_size=32, max_tiles=7, seed=3).coords
    sub3 = T.tile_slide(slides["tiff"], mpp=1.0, tile_size=32, max_tiles=7, seed=4).coords
    assert len(sub1) == 7 and (sub1 == sub2).all() and not (sub1 == sub3).all()
    assert set(map(tuple, sub1)) <= set(map(tuple, ts.coords))


def test_tile_command_writes_coords_and_thumbnails(slides, tmp_path):
    from PIL import Image

    res = CliRunner().invoke(tile_command, [str(slides["svs"]), str(slides["tiff"]), "--out", str(tmp_path),
                                            "--mpp", "1", "--tile-size", "32"])
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "coords" / "aperio_40x.h5") as f:
        coords = f["coords"][:]
        assert coords.dtype == np.int64 and coords.shape[1] == 2
        assert f.attrs["mpp"] == 1.0 and f.attrs["tile_size"] == 32 and f.attrs["tile_size_level0"] == 128
        assert f.attrs["slide_mpp"] == pytest.approx(0.25)
    assert (coords % 128 == 0).all() and (coords[:, 0] + 128 <= 2048).all()
    thumb = Image.open(tmp_path / "thumbnails" / "aperio_40x.png")
    assert thumb.size == (512, 384)  # the coarsest level of at least 512 px: level 1 of 2048 x 1536
    assert not (tmp_path / "failures.csv").exists()
    assert not list(tmp_path.rglob("*.partial"))


def test_slide_without_mpp_names_the_option(slides, tmp_path):
    with pytest.raises(DomainFMError, match="--slide-mpp"):
        T.tile_slide(slides["no_mpp"], mpp=1.0, tile_size=32)
    ok = T.tile_slide(slides["no_mpp"], mpp=1.0, tile_size=32, slide_mpp=0.5)
    assert ok.geometry.tile_size_level0 == 64
    table = tmp_path / "mpp.csv"
    table.write_text("slide_id,mpp\nno_mpp,0.25\n")
    from_csv = T.tile_slide(slides["no_mpp"], mpp=1.0, tile_size=32, slide_mpp=S.parse_slide_mpp(str(table)))
    assert from_csv.geometry.tile_size_level0 == 128


def test_plain_image_is_a_one_level_slide(slides):
    ts = T.tile_slide(slides["plain"], mpp=2.0, tile_size=16, slide_mpp=1.0)
    assert ts.geometry.level == 0 and ts.geometry.tile_size_level0 == 32
    assert len(ts.coords) > 10


def test_batch_goes_on_past_broken_slides(slides, tmp_path):
    res = CliRunner().invoke(tile_command, [str(slides["svs"]), str(slides["truncated"]), str(slides["no_mpp"]),
                                            "--out", str(tmp_path), "--mpp", "1", "--tile-size", "32"])
    assert res.exit_code == 1
    assert "2 of 3 slides failed" in res.output
    assert (tmp_path / "coords" / "aperio_40x.h5").is_file()
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "failures.csv"))}
    assert set(rows) == {"truncated", "no_mpp"}
    assert "--slide-mpp" in rows["no_mpp"]["error"]
    assert "truncated" in rows["truncated"]["error"] or "complete" in rows["truncated"]["error"]


def test_cli_error_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("domainfm")
    res = subprocess.run([str(exe), "histo", "tile", str(tmp_path / "nope.svs"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "nope.svs" in res.stderr
    assert "Traceback" not in res.stderr
