"""Coords files made by CLAM and TRIDENT (issue 9, items 2 and 3).

- CLAM keeps its attrs on the ``coords`` dataset, some of them arrays (``downsample``, ``level_dim``):
  they are read as they are, and the run neither fails on them nor hangs afterwards.
- The tile size a file was made with wins: CLAM's ``patch_size`` at ``patch_level`` and TRIDENT's
  ``patch_size_level0`` give 512-px level-0 tiles here, where ``--mpp``/``--tile-size`` alone would
  read 256; the features equal a direct forward pass on 512-px regions read by OpenSlide.
- An error inside a DataLoader worker ends as one line naming the original error, with a non-zero
  exit, in bounded time.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import load_make_data, run_cli
from plugins.histo import tiling
from plugins.histo.commands import embed_command
from test_histo_embed import expected_features

COMMON = ["--mpp", "2", "--tile-size", "32", "--batch-size", "8"]
SIZE0 = 512  # level-0 pixels of the files' tiles: 128 µm on the 0.25 µm/px scan


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign_coords")
    md = load_make_data("histo")
    slides = md.make_slides(root / "slides")
    import openslide

    svs = openslide.OpenSlide(str(slides["svs"]))
    dims, downs = list(svs.level_dimensions), list(svs.level_downsamples)
    svs.close()
    # the grid of 512-px level-0 tiles (128 µm on the 0.25 µm/px scan): 4 x 3
    coords = tiling.grid_coords(dims[0][0], dims[0][1], SIZE0)
    assert len(coords) == 12
    sid = Path(slides["svs"]).stem
    files = {
        "clam0": md.write_clam_coords(root / "clam0" / f"{sid}.h5", coords, patch_size=SIZE0, patch_level=0,
                                      level_dims=dims, level_downsamples=downs, name=sid),
        "clam1": md.write_clam_coords(root / "clam1" / f"{sid}.h5", coords, patch_size=SIZE0 // 4, patch_level=1,
                                      level_dims=dims, level_downsamples=downs, name=sid),
        "trident": md.write_trident_coords(root / "trident" / f"{sid}.h5", coords, patch_size_level0=SIZE0,
                                           name=sid),
    }
    return {"slides": slides, "coords": coords, "files": files, "root": root}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from domainfm.backbones import create_backbone, save_backbone

    torch.manual_seed(0)
    return save_backbone(create_backbone("test_resnet", img_size=32, init="random"),
                         tmp_path_factory.mktemp("foreign_weights") / "encoder.safetensors")


def read_h5(path):
    with h5py.File(path) as f:
        return f["features"][:], f["coords"][:], dict(f.attrs)


def test_clam_attrs_are_read_as_they_are(data):
    coords, attrs = tiling.read_coords(data["files"]["clam0"])
    np.testing.assert_array_equal(coords, data["coords"])
    assert isinstance(attrs["downsample"], np.ndarray) and attrs["downsample"].tolist() == [1.0, 1.0]
    assert attrs["level_dim"].tolist() == [2048, 1536]
    assert attrs["patch_size"] == SIZE0 and attrs["patch_level"] == 0 and attrs["name"] == "aperio_40x"
    _, attrs = tiling.read_coords(data["files"]["trident"])
    assert attrs["patch_size_level0"] == SIZE0 and attrs["name"] == "aperio_40x"  # bytes decoded


@pytest.mark.parametrize("kind", ["clam0", "clam1", "trident"])
def test_the_files_tile_size_wins(data, weights, tmp_path, kind):
    svs = data["slides"]["svs"]
    res = CliRunner().invoke(embed_command, [str(svs), "--coords", str(data["files"][kind].parent), "--out",
                                             str(tmp_path), "--model", str(weights), "--num-workers", "0", *COMMON])
    assert res.exit_code == 0, res.output
    # one note: the file's 512 px, not the 256 of --mpp 2 --tile-size 32 on a 0.25 µm/px scan
    notes = [line for line in res.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "512 px at level 0" in notes[0] and "not the 256" in notes[0]
    feats, coords, attrs = read_h5(tmp_path / "features" / "aperio_40x.h5")
    np.testing.assert_array_equal(coords, data["coords"])
    assert attrs["tile_size_level0"] == SIZE0 and attrs["tile_size"] == 32
    assert attrs["mpp"] == pytest.approx(SIZE0 * 0.25 / 32)  # 4 µm/px
    # independent: 512 level-0 px = 32 px at level 2 (downsample 16), read by OpenSlide, no resize
    ref = expected_features(svs, coords, 2, 32, 32, weights)
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(600)
def test_clam_coords_with_workers_exit_cleanly(data, weights, tmp_path):
    """The reported hang: CLAM attrs, DataLoader workers, a real process that must exit."""
    slides = data["slides"]
    r = run_cli(["histo", "embed", str(slides["svs"]), "--coords", str(data["files"]["clam0"].parent),
                 "--out", str(tmp_path), "--model", str(weights), "--num-workers", "2", *COMMON], timeout=500)
    assert r.returncode == 0, r.stderr[-2000:]
    feats, coords, attrs = read_h5(tmp_path / "features" / "aperio_40x.h5")
    assert feats.shape == (12, 96) and attrs["tile_size_level0"] == SIZE0


@pytest.mark.timeout(600)
def test_an_error_in_a_worker_is_one_line_and_a_nonzero_exit(data, weights, tmp_path):
    """Damaged JPEG tiles read by DataLoader workers: the original error, on one line, exit 1."""
    slides = data["slides"]
    r = run_cli(["histo", "embed", str(slides["corrupt"]), str(slides["tiff"]), "--out", str(tmp_path),
                 "--model", str(weights), "--num-workers", "2", "--mpp", "0.5", "--tile-size", "32",
                 "--batch-size", "8"], timeout=500)
    assert r.returncode == 1, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "failures.csv")))
    assert [row["slide_id"] for row in rows] == ["corrupt_jpeg"]
    error = rows[0]["error"]
    assert "\n" not in error and "Corrupt JPEG" in error and not error.startswith("Caught")
    assert f"  corrupt_jpeg: {error}" in r.stderr.splitlines()
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["generic_20x.h5"]
