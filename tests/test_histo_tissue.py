"""Tissue detection recognises a field with no glass and a slide with no tissue (issue 9, item 7).

Otsu on saturation always splits: a field that is tissue from edge to edge kept 7 of 24 tiles (pale
stroma called background) and blank glass with a scanner's colour cast came out as tissue. The kept
fraction of tiles is measured on all-tissue, half-tissue and blank slides (tests/data/histo/make_data.py
tissue_field: the left fraction of the width is tissue, so the expected fractions are 1, 1/2 and 0).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_make_data
from plugins.histo import tiling
from plugins.histo import tissue as TI


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    root = tmp_path_factory.mktemp("tissue_fields")
    md = load_make_data("histo")
    return {f: md.write_field_slide(root / f"field_{int(f * 100)}.tif", f, size=(768, 512), mpp=0.5)
            for f in (1.0, 0.5, 0.0)}


@pytest.mark.parametrize("fraction, low, high", [(1.0, 0.95, 1.0), (0.5, 0.45, 0.55), (0.0, 0.0, 0.0)])
def test_kept_fraction_of_tiles(fields, fraction, low, high):
    # 1 µm/px x 32 px = 64 level-0 px: a 12 x 8 grid, the tissue edge of the half field on a tile border
    ts = tiling.tile_slide(fields[fraction], mpp=1.0, tile_size=32)
    total = len(tiling.grid_coords(768, 512, ts.geometry.tile_size_level0))
    assert total == 96
    kept = len(ts.coords) / total
    assert low <= kept <= high, kept
    if fraction == 0.5:  # the kept tiles are the tissue half
        assert ts.coords[:, 0].max() < 384


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0])
def test_mask_fraction_matches_the_drawn_tissue(fraction):
    img = load_make_data("histo").tissue_field(400, 300, fraction, seed=2)
    mask = TI.tissue_mask(img)
    assert abs(mask.mean() - fraction) < 0.02
    if fraction:
        assert mask[:, : int(400 * fraction)].mean() > 0.98


def test_one_population_is_not_split():
    rng = np.random.default_rng(0)
    glass_with_cast = rng.normal(18, 2, 10_000).clip(0, 255)     # all inside 15..40: glass, by the midpoint
    pale_tissue = rng.normal(33, 2, 10_000).clip(0, 255)         # all inside 15..40: tissue
    assert (glass_with_cast > TI.saturation_threshold(glass_with_cast)).mean() < 0.01
    assert (pale_tissue > TI.saturation_threshold(pale_tissue)).mean() > 0.99
    # two tissue populations (stroma 60, nuclei 130): the cut is capped at 40, both are kept
    stroma_nuclei = np.concatenate([rng.normal(60, 8, 7500), rng.normal(130, 12, 2500)]).clip(0, 255)
    assert TI.saturation_threshold(stroma_nuclei) == 40.0
    # glass and tissue: Otsu's cut between them stands
    glass_tissue = np.concatenate([rng.normal(8, 2, 5000), rng.normal(30, 2, 5000)]).clip(0, 255)
    assert 15 < TI.saturation_threshold(glass_tissue) < 30
