"""eo-sar through the real `domainfm` CLI: every bad input is one line on stderr naming the file,
exit 2, no traceback, nothing half-written; the plugin's own commands; the embedded sample."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio
from click.testing import CliRunner

from domainfm.cli import main

_spec = importlib.util.spec_from_file_location("eo_sar_make_data", Path(__file__).parent / "data" / "eo_sar" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)

DOMAINFM = Path(sys.executable).with_name("domainfm")


@pytest.fixture(scope="module")
def bad_roots(tmp_path_factory):
    return make_data.write_bad_roots(tmp_path_factory.mktemp("eo_bad"))


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _assert_one_line_error(stderr: str, names: Path) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and str(names) in lines[0] and "Fix: " in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case,phrase", [
    ("missing_folder", "does not exist"),
    ("empty_folder", "data folder is empty"),
    ("no_modality_folder", "no s2/ folder in the data folder (it has s1/: try --modality s1)"),
    ("no_geotiffs", "no GeoTIFFs"),
    ("wrong_band_count", "has 4 band(s) but --modality s2 needs 13"),
    ("truncated", "truncated or corrupt GeoTIFF"),
    ("truncated_header", "truncated or corrupt GeoTIFF"),
    ("unreadable", "not a GeoTIFF"),
    ("labels_unknown_patch", "patch id 'p77' (line 3) has no image"),
    ("labels_unknown_column", "unknown class column 'forest'"),
    ("labels_missing_column", "missing class column(s) snow_and_ice"),
    ("labels_bad_value", "line 2 has a value other than 0 or 1"),
    ("landcover_band_count", "land-cover raster has 3 bands"),
])
def test_bad_input_is_one_line_naming_the_file(bad_roots, case, phrase):
    root, named = bad_roots[case]
    result = _invoke(["eo-sar", "check", "--data", str(root)])
    assert result.exit_code == 2
    assert phrase in _assert_one_line_error(result.stderr, named)
    assert result.stdout == ""


def test_pretrain_refuses_bad_data_before_any_run_or_file(bad_roots, tmp_path):
    """Through the real executable: the file check runs before a model, an MLflow run or a
    checkpoint exists, and the statistics cache written by an earlier good run is left intact."""
    root, named = bad_roots["wrong_band_count"]
    stats = root / ".domainfm_stats_s2.json"
    (root / "s2" / named.name).rename(tmp_path / named.name)  # the good part of the root first
    assert _invoke(["eo-sar", "check", "--data", str(root)]).exit_code == 0
    before = stats.read_bytes()
    (tmp_path / named.name).rename(named)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(DOMAINFM), "pretrain", "--plugin", "eo-sar", "--data", str(root), "--init", "random",
                        "--img-size", "28", "--max-steps", "2", "--out", str(tmp_path / "out")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    _assert_one_line_error(r.stderr, named)
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()
    assert stats.read_bytes() == before


def test_in_chans_that_disagrees_with_the_modality_is_refused(tmp_path):
    root = make_data.write_dataset(tmp_path / "root", n_patches=2, modalities=("s1",))
    result = _invoke(["pretrain", "--plugin", "eo-sar", "--data", str(root), "--modality", "s1", "--in-chans", "13",
                      "--init", "random", "--img-size", "28", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    line = _assert_one_line_error(result.stderr, "--in-chans")
    assert "--modality s1" in line and "2 bands" in line
    assert not (tmp_path / "out").exists()


def test_help_shows_the_plugin_flags():
    result = _invoke(["pretrain", "--plugin", "eo-sar", "--help"])
    assert result.exit_code == 0
    assert "--modality [s2|s2-l2a|s1]" in result.stdout and "--label-threshold" in result.stdout
    assert "--layout [auto|domainfm|ssl4eo-s12|bigearthnet|bigearthnet-v2|eurosat]" in result.stdout
    result = _invoke(["evaluate", "--plugin", "eo-sar", "--help"])
    assert "--knn-k" in result.stdout and "--test-fraction" in result.stdout and "--train-fraction" in result.stdout


def test_plugin_package_imports_without_torch():
    code = ("import sys, plugins.eo_sar as p; p.plugin.options('pretrain'); p.plugin.commands(); "
            "heavy = [m for m in ('torch', 'lightning', 'mlflow', 'rasterio') if m in sys.modules]; "
            "assert not heavy, heavy; print(p.plugin.name)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "eo-sar", r.stderr


def test_check_plot_and_sample_commands(tmp_path):
    result = _invoke(["eo-sar", "sample", str(tmp_path / "root"), "--patches", "4", "--seed", "3"])
    assert result.exit_code == 0, result.output
    root = tmp_path / "root"
    assert sorted(p.name for p in (root / "s2").iterdir()) == [f"patch_{i:03d}.tif" for i in range(4)]
    assert _invoke(["eo-sar", "sample", str(root)]).exit_code == 2  # never writes into a non-empty folder

    result = _invoke(["eo-sar", "check", "--data", str(root), "--modality", "s1"])
    assert result.exit_code == 0, result.output
    assert "4 s1 patches" in result.stdout and "EPSG:32632" in result.stdout and "EPSG:32633" in result.stdout
    assert (root / ".domainfm_stats_s1.json").is_file()

    png = tmp_path / "plots" / "p.png"
    result = _invoke(["eo-sar", "plot", "--data", str(root), "--patch-id", "patch_002", "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = _invoke(["eo-sar", "plot", "--data", str(root), "--patch-id", "nope", "--out", str(png)])
    assert result.exit_code == 2 and "no patch 'nope'" in result.stderr


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.tif"))}


def test_embedded_sample_is_deterministic_cached_and_announced(tmp_path, monkeypatch):
    from plugins.eo_sar.sample import SAMPLE_PATCHES, ensure_sample
    from plugins.eo_sar.synthetic import write_sample

    monkeypatch.setenv("DOMAINFM_CACHE", str(tmp_path / "cache"))
    root = ensure_sample()
    assert root.is_relative_to(tmp_path / "cache") and (root / "COMPLETE").is_file()
    stamp = (root / "COMPLETE").stat().st_mtime_ns
    assert ensure_sample() == root and (root / "COMPLETE").stat().st_mtime_ns == stamp  # reused
    assert len(list((root / "s2").glob("*.tif"))) == SAMPLE_PATCHES
    # the same generator and seed rebuild the same bytes
    again = write_sample(tmp_path / "again", n_patches=SAMPLE_PATCHES)
    assert _digest(again) == _digest(root)
    sizes, crss, nodata = set(), set(), set()
    for p in sorted((root / "s1").glob("*.tif")):
        with rasterio.open(p) as src:
            sizes.add(src.shape)
            crss.add(src.crs.to_epsg())
            nodata.add("nan" if src.nodata != src.nodata else src.nodata)
    assert sizes == {(64, 64), (48, 48)} and crss == {32632, 32633} and nodata == {"nan", -9999.0}

    # a sample folder emptied by hand (marker gone) is rebuilt rather than trusted
    (root / "COMPLETE").unlink()
    (root / "s2" / "patch_000.tif").unlink()
    assert ensure_sample() == root and (root / "s2" / "patch_000.tif").is_file()

    result = _invoke(["eo-sar", "check"])
    assert result.exit_code == 0
    assert "embedded synthetic sample" in result.stderr and str(root) in result.stderr
    assert json.loads((root / ".domainfm_stats_s2.json").read_text())["n_files"] == SAMPLE_PATCHES

    # an unwritable cache location is a one-line error with the way out
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("DOMAINFM_CACHE", str(blocker))
    result = _invoke(["eo-sar", "check"])
    assert result.exit_code == 2
    _assert_one_line_error(result.stderr, blocker / "eo_sar")
    assert "DOMAINFM_CACHE" in result.stderr
