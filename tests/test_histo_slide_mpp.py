"""Placeholder resolution tags and --slide-mpp (issue 9, item 6).

A converter wrote 72 or 300 dpi (unit inch) into a 0.5 µm/px scan: 353 or 85 µm/px, outside the
range of microscopy (slides.MPP_RANGE, 0.05-20 µm/px), so it counts as unknown. An explicit
--slide-mpp beats the file and a note says so; a slide that fails leaves no output behind.
"""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import load_make_data
from plugins.histo import slides as S
from plugins.histo.commands import tile_command

TILING = ["--mpp", "2", "--tile-size", "32"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slide_mpp")
    md = load_make_data("histo")
    for sub in ("true", "dpi72", "dpi300"):
        (root / sub).mkdir()
    return {"true": md.write_generic_tiff(root / "true" / "scan.tif", mpp=0.5),
            72: md.write_generic_tiff(root / "dpi72" / "scan.tif", mpp=0.5, dpi=72),
            300: md.write_generic_tiff(root / "dpi300" / "scan.tif", mpp=0.5, dpi=300)}


def tile(*args):
    return CliRunner().invoke(tile_command, [str(a) for a in args])


def read_coords(out):
    with h5py.File(out / "coords" / "scan.h5") as f:
        return f["coords"][:], dict(f.attrs)


def test_placeholder_dpi_is_unknown():
    for dpi in (72, 300):
        props = {"tiff.ResolutionUnit": "inch", "tiff.XResolution": str(dpi),
                 "openslide.mpp-x": str(25400 / dpi)}  # what OpenSlide derives from the tags
        assert S.file_mpp(props) == (pytest.approx(25400 / dpi), f"TIFF resolution {dpi} px/inch")
        assert S.mpp_from_properties(props) is None
    assert S.MPP_RANGE == (0.05, 20.0)
    assert S.mpp_from_properties({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "500"}) == 20.0
    assert S.mpp_from_properties({"tiff.ResolutionUnit": "centimeter", "tiff.XResolution": "499"}) is None


@pytest.mark.parametrize("dpi", [72, 300])
def test_slide_mpp_beats_a_placeholder_and_says_so(slides, tmp_path, dpi):
    ref = tile(slides["true"], "--out", tmp_path / "ref", *TILING)
    assert ref.exit_code == 0, ref.output
    res = tile(slides[dpi], "--out", tmp_path / "out", "--slide-mpp", "0.5", *TILING)
    assert res.exit_code == 0, res.output
    notes = [line for line in res.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    assert f"--slide-mpp 0.5 µm/px used; the file says {25400 / dpi:.4g} µm/px (TIFF resolution {dpi} px/inch" in notes[0]
    # the same tiles as the scan with true tags: 2 µm/px x 32 px = 128 level-0 px at 0.5 µm/px
    c_ref, a_ref = read_coords(tmp_path / "ref")
    coords, attrs = read_coords(tmp_path / "out")
    assert attrs["slide_mpp"] == 0.5 and attrs["tile_size_level0"] == 128
    np.testing.assert_array_equal(coords, c_ref)


@pytest.mark.parametrize("dpi", [72, 300])
def test_a_placeholder_without_slide_mpp_fails_and_leaves_nothing(slides, tmp_path, dpi):
    out = tmp_path / "out"
    assert tile(slides[dpi], "--out", out, "--slide-mpp", "0.5", *TILING).exit_code == 0
    assert (out / "coords" / "scan.h5").is_file() and (out / "thumbnails" / "scan.png").is_file()
    res = tile(slides[dpi], "--out", out, *TILING)  # a rerun without the value: outputs of the slide go
    assert res.exit_code == 1
    rows = list(csv.DictReader(open(out / "failures.csv")))
    assert len(rows) == 1 and rows[0]["error"] == (
        f"{slides[dpi]}: the file's {25400 / dpi:.4g} µm/px (TIFF resolution {dpi} px/inch) is outside the "
        "µm/px of microscopy (0.05-20): a placeholder, not the scan's. Fix: " + S.SLIDE_MPP_FIX + ".")
    assert not (out / "coords" / "scan.h5").exists() and not (out / "thumbnails" / "scan.png").exists()
    assert not list(out.rglob("*.partial"))


def test_slide_mpp_beats_a_plausible_file_value_and_says_so(slides, tmp_path):
    res = tile(slides["true"], "--out", tmp_path, "--slide-mpp", "0.25", *TILING)
    assert res.exit_code == 0, res.output
    notes = [line for line in res.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--slide-mpp 0.25 µm/px used; the file says 0.5 µm/px" in notes[0]
    _, attrs = read_coords(tmp_path)
    assert attrs["slide_mpp"] == 0.25 and attrs["tile_size_level0"] == 256
    # the same value as the file: nothing to say
    res = tile(slides["true"], "--out", tmp_path / "same", "--slide-mpp", "0.5", *TILING)
    assert res.exit_code == 0 and "note:" not in res.output


def test_an_implausible_slide_mpp_is_refused(slides, tmp_path):
    res = tile(slides["true"], "--out", tmp_path, "--slide-mpp", "300", *TILING)
    assert res.exit_code == 1
    rows = list(csv.DictReader(open(tmp_path / "failures.csv")))
    assert "--slide-mpp 300 is outside the µm/px of microscopy (0.05-20)" in rows[0]["error"]


def test_a_slide_whose_second_output_fails_leaves_neither(slides, tmp_path):
    """The thumbnail cannot be written (a folder holds its name): no coords file stays either."""
    (tmp_path / "thumbnails" / "scan.png").mkdir(parents=True)
    res = tile(slides["true"], "--out", tmp_path, *TILING)
    assert res.exit_code == 1
    assert [r["slide_id"] for r in csv.DictReader(open(tmp_path / "failures.csv"))] == ["scan"]
    assert not (tmp_path / "coords" / "scan.h5").exists()
    assert not list(tmp_path.rglob("*.partial"))
