"""Named bands and radiometry on real GeoTIFFs written by rasterio (tests/data/eo_sar/make_data.py):
band-name normalisation and alignment, band descriptions honoured, baseline 04.00 harmonisation
(both encodings of one scene give the same normalised tensor), Sentinel-1 units, and each bad
input as one line through the real CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from domainfm.cli import main
from domainfm.errors import DomainFMError
from plugins.eo_sar.bands import (S1_BANDS, S2_L1C_BANDS, S2_L2A_BANDS, S2_RGB_BANDS, align_bands,
                                  normalize_band_name, try_normalize_band_name)
from plugins.eo_sar.datasets import BandStats, EOSARPatches
from plugins.eo_sar.radiometry import read_patch

_spec = importlib.util.spec_from_file_location("eo_sar_make_data", Path(__file__).parent / "data" / "eo_sar" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)


@pytest.fixture(scope="module")
def encodings(tmp_path_factory):
    root = tmp_path_factory.mktemp("encodings")
    return root, make_data.write_s2_encodings(root)


@pytest.fixture(scope="module")
def bad_roots(tmp_path_factory):
    return make_data.write_bad_roots(tmp_path_factory.mktemp("eo_bad_radiometry"))


# ---------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("given,canonical", [("B01", "B1"), ("b1", "B1"), ("B08", "B8"), ("b8a", "B8A"),
                                             ("B08A", "B8A"), (" B12 ", "B12"), ("vv", "VV"), ("VH", "VH")])
def test_band_names_are_normalised(given, canonical):
    assert normalize_band_name(given) == canonical


@pytest.mark.parametrize("name", ["B13", "B0", "cirrus", "", "HH", "B8B"])
def test_unknown_band_names(name):
    assert try_normalize_band_name(name) is None
    with pytest.raises(DomainFMError, match="unknown band name"):
        normalize_band_name(name)


def test_canonical_band_lists():
    assert len(S2_L1C_BANDS) == 13 and S2_L1C_BANDS.index("B8A") == S2_L1C_BANDS.index("B8") + 1
    assert len(S2_L2A_BANDS) == 12 and "B10" not in S2_L2A_BANDS
    assert S1_BANDS == ("VV", "VH") and S2_RGB_BANDS == ("B4", "B3", "B2")


def test_align_l2a_data_to_l1c_model_fills_b10():
    x = np.arange(12 * 3 * 3, dtype=np.float32).reshape(12, 3, 3) + 1
    y, report = align_bands(x, S2_L2A_BANDS, S2_L1C_BANDS)
    assert y.shape == (13, 3, 3)
    assert np.array_equal(y[10], np.zeros((3, 3)))  # B10 = 0, the mean after normalisation
    assert np.array_equal(y[:10], x[:10]) and np.array_equal(y[11:], x[10:])
    assert report.filled == ("B10",) and report.dropped == () and not report.reordered
    assert "filled with the band mean: B10" in report.summary()
    # raw data: fill with the model's own mean of B10
    _, report = align_bands(x, S2_L2A_BANDS, S2_L1C_BANDS, mean_fill={"B10": 22.0})
    assert align_bands(x, S2_L2A_BANDS, S2_L1C_BANDS, mean_fill={"B10": 22.0})[0][10, 0, 0] == 22.0


def test_align_reorders_and_drops_by_name_on_torch_batches():
    x = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2)
    y, report = align_bands(x, ["B02", "B03", "B04", "B08"], S2_RGB_BANDS)
    assert torch.equal(y, x[:, [2, 1, 0]])
    assert report.reordered and report.dropped == ("B8",) and report.filled == ()
    assert "reordered" in report.summary() and "dropped (the model has none): B8" in report.summary()


def test_align_without_shared_band_names_both_lists():
    with pytest.raises(DomainFMError) as e:
        align_bands(np.zeros((2, 4, 4)), S1_BANDS, S2_L1C_BANDS)
    msg = str(e.value)
    assert "data bands (VV, VH)" in msg and "model bands (B1, B2" in msg and "no band in common" in msg
    assert len(msg.splitlines()) == 1


# ------------------------------------------------------------------------------------ radiometry


@pytest.mark.parametrize("name", ["old", "pb04_offset", "pb04_tag", "pb04_baseline", "pb04_reflectance", "reordered"])
def test_every_encoding_reads_back_the_same_reflectance(encodings, name):
    _, paths = encodings
    truth = make_data.s2_scene()
    image, bands, info = read_patch(paths[name], modality="s2")
    assert bands == S2_L1C_BANDS
    valid = truth[0] > 0
    assert np.array_equal(info.valid, valid)
    assert np.array_equal(image[:, valid], truth[:, valid].astype(np.float32))
    assert info.harmonized == name.startswith("pb04")
    assert info.reordered == (name == "reordered")


def test_info_names_baseline_offset_and_source(encodings):
    _, paths = encodings
    info = read_patch(paths["pb04_offset"], modality="s2")[2]
    assert (info.baseline, info.declared_offset, info.offset_source) == ("04.00", -1000.0, "band offsets")
    assert info.summary_key() == "baseline 04.00, offset -1000 (band offsets): harmonised (-1000 DN)"
    info = read_patch(paths["pb04_tag"], modality="s2")[2]
    assert (info.baseline, info.declared_offset, info.offset_source) == (None, -1000.0, "BOA_ADD_OFFSET tag")
    info = read_patch(paths["pb04_baseline"], modality="s2")[2]
    assert (info.baseline, info.declared_offset) == ("05.09", None) and info.harmonized
    info = read_patch(paths["pb04_reflectance"], modality="s2")[2]
    assert info.declared_offset == pytest.approx(-1000.0) and info.scale_applied
    info = read_patch(paths["reordered"], modality="s2")[2]
    assert info.file_band_names[-1] == "B8A" and info.bands_from == "descriptions"
    assert info.summary_key() == "baseline 03.01, no offset: bands reordered from the band descriptions"


def test_both_encodings_give_the_same_normalised_tensor(encodings):
    root, _ = encodings
    ds = EOSARPatches(root, "s2")
    by_id = {s["patch_id"]: s for s in (ds[i] for i in range(len(ds)))}
    reference = by_id["old"]["image"]
    for pid in ("pb04_offset", "pb04_tag", "pb04_baseline", "pb04_reflectance", "reordered"):
        assert torch.equal(by_id[pid]["image"], reference), pid
        assert by_id[pid]["bands"] == S2_L1C_BANDS
    # the statistics are those of the one scene (six identical copies), computed by hand
    truth = make_data.s2_scene().astype(np.float64)
    valid = truth[0] > 0
    assert np.allclose(ds.stats.mean, truth[:, valid].mean(axis=1))
    assert np.allclose(ds.stats.std, truth[:, valid].std(axis=1), rtol=1e-6)


def test_harmonize_off_and_on(encodings):
    _, paths = encodings
    truth = make_data.s2_scene().astype(np.float32)
    valid = truth[0] > 0
    image, _, info = read_patch(paths["pb04_tag"], modality="s2", s2_harmonize="off")
    assert np.array_equal(image[:, valid], truth[:, valid] + 1000) and not info.harmonized
    for name in ("pb04_offset", "pb04_tag", "pb04_baseline"):
        image, _, info = read_patch(paths[name], modality="s2", s2_harmonize="on")
        assert np.array_equal(image[:, valid], truth[:, valid]), name
    with pytest.raises(DomainFMError) as e:
        read_patch(paths["old"], modality="s2", s2_harmonize="on")
    assert str(e.value) == (f"{paths['old']}: declares processing baseline 03.01 (before 04.00: no offset), but "
                            "--s2-harmonize on subtracts 1000. Fix: use --s2-harmonize auto to follow what each "
                            "file declares.")


def test_harmonised_values_below_the_offset_clip_to_zero(tmp_path):
    dn = np.full((13, 4, 4), 1500, np.uint16)
    dn[:, 0, 0] = 900  # dark water in a baseline 04.00 product can sit below the +1000 offset
    path = make_data.write_raster_tagged(tmp_path / "dark.tif", dn, "EPSG:32631", make_data.utm_transform(6e5, 5e6),
                                         S2_L1C_BANDS, {"PROCESSING_BASELINE": "04.00"})
    image = read_patch(path, modality="s2")[0]
    assert image[0, 0, 0] == 0.0 and image[0, 1, 1] == 500.0


def test_s1_linear_power(tmp_path):
    path, linear = make_data.write_s1_linear(tmp_path / "lin.tif")
    with pytest.raises(DomainFMError) as e:
        read_patch(path, modality="s1")
    assert "--s1-units linear" in str(e.value) and "every valid value in 0..1" in str(e.value)
    image, bands, info = read_patch(path, modality="s1", s1_units="linear")
    assert bands == S1_BANDS and info.converted_to_db
    ok = np.isfinite(linear).all(axis=0)
    assert np.array_equal(info.valid, ok)
    assert np.allclose(image[:, ok], 10 * np.log10(linear[:, ok]), atol=1e-5)
    declared, _ = make_data.write_s1_linear(tmp_path / "declared.tif", declared=True)
    with pytest.raises(DomainFMError, match="declares linear power"):
        read_patch(declared, modality="s1")


def test_s1_in_db_is_read_as_stored_and_refuses_a_second_log(tmp_path):
    root = make_data.write_dataset(tmp_path / "root", n_patches=1, modalities=("s1",))
    path = root / "s1" / "p00.tif"
    image, _, info = read_patch(path, modality="s1")
    import rasterio

    with rasterio.open(path) as src:
        stored = src.read()
    assert info.s1_units == "db" and not info.converted_to_db
    assert np.array_equal(image[:, info.valid], stored[:, info.valid]) and np.median(stored[:, info.valid]) < 0
    with pytest.raises(DomainFMError, match="declares dB but --s1-units linear"):
        read_patch(path, modality="s1", s1_units="linear")


# ------------------------------------------------------------------------------------------- CLI


def _one_line(stderr: str, names: Path) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"error: {names}: ") and "Fix: " in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case,args,phrase", [
    ("duplicate_band_name", [], "band descriptions name B8 twice"),
    ("unknown_band_name", [], "band description 'cirrus' names no band"),
    ("s1_linear", ["--modality", "s1"], "pass --s1-units linear to convert with 10*log10"),
    ("harmonize_on_contradicted", ["--s2-harmonize", "on"], "but --s2-harmonize on subtracts 1000"),
])
@pytest.mark.timeout(300)
def test_bad_bands_and_radiometry_are_one_line(bad_roots, case, args, phrase):
    root, named = bad_roots[case]
    stats = list(root.glob(".domainfm_stats_*.json"))
    result = CliRunner().invoke(main, ["eo-sar", "check", "--data", str(root), *args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert phrase in _one_line(result.stderr, named)
    assert result.stdout == ""
    assert list(root.glob(".domainfm_stats_*.json")) == stats  # nothing written


@pytest.mark.timeout(300)
def test_check_prints_the_radiometry_summary(encodings):
    root, _ = encodings
    result = CliRunner().invoke(main, ["eo-sar", "check", "--data", str(root)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"radiometry of {root / 's2'} (6 files, --s2-harmonize auto):" in out
    assert "1 file(s): baseline 04.00, offset -1000 (band offsets): harmonised (-1000 DN)" in out
    assert "1 file(s): no baseline tag, offset -1000 (BOA_ADD_OFFSET tag): harmonised (-1000 DN)" in out
    assert "1 file(s): baseline 05.09, no offset: harmonised (-1000 DN)" in out
    assert "1 file(s): baseline 03.01, no offset: read as stored" in out
    assert "bands reordered from the band descriptions in 1 file(s): reordered.tif" in out
