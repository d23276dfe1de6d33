"""eo-sar on the standard datasets by root path (SSL4EO-S12, BigEarthNet v1/v2, EuroSAT): layout
detection, the datasets against the generated files read back independently with rasterio, each
bad input as one line through the real CLI, and pretrain -> evaluate per layout (Lightning, sqlite
MLflow, the registry)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from domainfm.errors import DomainFMError

from conftest import invoke_cli, load_make_data
from plugins.eo_sar.layouts import LAYOUTS, detect_layout, open_layout, resolve_layout

ssl4eo = load_make_data("ssl4eo_s12")
ben = load_make_data("bigearthnet")
ben2 = load_make_data("bigearthnet_v2")
eurosat = load_make_data("eurosat")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    maps = ssl4eo.write_dataset(base / "ssl4eo", size=24, landcover_dir=base / "dw")
    ssl4eo.write_labels_csv(base / "ssl4eo_labels.csv", maps)
    ben.write_dataset(base / "ben", splits={"train": 6, "val": 2, "test": 4})
    ben2.write_dataset(base / "ben2", splits={"train": 6, "validation": 2, "test": 4})
    eurosat.write_dataset(base / "eurosat", splits={"train": 2, "val": 1, "test": 1})
    return {"ssl4eo": base / "ssl4eo", "dw": base / "dw", "csv": base / "ssl4eo_labels.csv", "ben": base / "ben",
            "ben2": base / "ben2", "eurosat": base / "eurosat", "maps": maps}


def _one_line_error(stderr: str, names) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and str(names) in lines[0] and "Fix: " in lines[0], lines[0]
    return lines[0]


def test_auto_detection_names_each_layout(roots, tmp_path):
    expected = {"ssl4eo": "ssl4eo-s12", "ben": "bigearthnet", "ben2": "bigearthnet-v2", "eurosat": "eurosat"}
    for key, layout in expected.items():
        assert detect_layout(roots[key]) == layout
        chosen, line = resolve_layout(roots[key], "auto")
        assert chosen == layout and f"recognised as layout {layout}" in line
    assert resolve_layout(roots["ben"], "bigearthnet") == ("bigearthnet", None)  # explicit: nothing said
    with pytest.raises(DomainFMError, match="not in layout eurosat"):  # but a folder of another dataset is named
        resolve_layout(roots["ben"], "eurosat")
    # the domainfm layout: s2/ holding GeoTIFFs
    make = load_make_data("eo_sar")
    own = make.write_dataset(tmp_path / "own", n_patches=2, modalities=("s2",))
    assert detect_layout(own) == "domainfm"


def test_unrecognised_and_ambiguous_folders_are_one_line_errors(roots, tmp_path):
    odd = tmp_path / "odd"
    (odd / "images").mkdir(parents=True)
    (odd / "images" / "a.png").write_bytes(b"x")
    r = invoke_cli(["eo-sar", "check", "--data", str(odd)])
    line = _one_line_error(r.stderr, odd)
    assert r.exit_code == 2 and "unrecognised data layout" in line
    for layout in LAYOUTS[1:]:  # every layout is listed with what it expects
        assert f"{layout}: " in line
    both = tmp_path / "both"
    shutil.copytree(roots["eurosat"], both)
    shutil.copy(roots["ben"] / "bigearthnet-train.csv", both)
    r = invoke_cli(["eo-sar", "check", "--data", str(both)])
    line = _one_line_error(r.stderr, both)
    assert "ambiguous data layout" in line and "bigearthnet and eurosat" in line and "--layout" in line


def test_ssl4eo_seasons_bands_partial_download_and_labels(roots):
    import rasterio

    ds = open_layout(roots["ssl4eo"], "ssl4eo-s12", "s2", purpose="pretrain", views="seasons",
                     landcover_dir=roots["dw"])
    assert ds.patch_ids == [loc for loc, *_ in ssl4eo.LOCATIONS]  # only what is on disk (ids not contiguous)
    torch.manual_seed(0)
    s = ds[0]
    assert s["bands"] == ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
    assert s["image"].shape == s["image_other"].shape == (13, 24, 24)
    assert not torch.allclose(s["image"], s["image_other"])  # another season, never the same one
    # labels: Dynamic World fractions >= 0.01, counted here by hand from the map the generator wrote
    lc = roots["maps"]["0000002"]
    valid = lc[lc != 255]
    expected = (np.bincount(valid, minlength=9) / valid.size >= 0.01).astype(np.float32)
    np.testing.assert_array_equal(s["labels"].numpy(), expected)
    # the 10 m band read back with rasterio equals the dataset's B4 after denormalising (valid pixels)
    ev = open_layout(roots["ssl4eo"], "ssl4eo-s12", "s2", purpose="evaluate")
    first = sorted((roots["ssl4eo"] / "s2c" / "0000005").iterdir())[0]
    with rasterio.open(first / "B4.tif") as src:
        b4 = src.read(1).astype(np.float32)
    back = ev.denormalise(ev[1]["image"])[ev.bands.index("B4")].numpy()
    np.testing.assert_allclose(back, b4, rtol=1e-4, atol=0.05)
    # L2A: 12 bands, no B10; S1: VV, VH
    assert open_layout(roots["ssl4eo"], "ssl4eo-s12", "s2-l2a", purpose="evaluate").bands == tuple(
        b for b in s["bands"] if b != "B10")
    assert open_layout(roots["ssl4eo"], "ssl4eo-s12", "s1", purpose="evaluate")[0]["bands"] == ("VV", "VH")
    # a labels CSV listing a location that was not downloaded: the row is left out, no error
    by_csv = open_layout(roots["ssl4eo"], "ssl4eo-s12", "s2", purpose="evaluate", labels_csv=str(roots["csv"]))
    np.testing.assert_array_equal(by_csv.labels_of(0), expected)
    # without a land-cover source: no labels and the run says the soft term falls back
    bare = open_layout(roots["ssl4eo"], "ssl4eo-s12", "s2", purpose="pretrain")
    assert bare.labels_of(0) is None and "falls back to the hard" in bare.notes[0]


def test_bigearthnet_v1_labels_splits_and_s1_db(roots):
    import rasterio

    ds = open_layout(roots["ben"], "bigearthnet", "s2-l2a", purpose="evaluate")
    assert [len(ds.indices_of(s)) for s in ("train", "val", "test")] == [6, 2, 4]
    assert ds.bands == ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
    # 43 -> 19 classes, by hand: "Non-irrigated arable land" is "Arable land" (index 2), "Water bodies"
    # "Inland waters" (17), "Vineyards" "Permanent crops" (3)
    folder = ds.records[0].extra["folder"]
    names = json.loads((folder / f"{folder.name}_labels_metadata.json").read_text())["labels"]
    by_hand = {"Continuous urban fabric": 0, "Industrial or commercial units": 1, "Non-irrigated arable land": 2,
               "Vineyards": 3, "Pastures": 4, "Broad-leaved forest": 8, "Water bodies": 17, "Sea and ocean": 18,
               "Coniferous forest": 9, "Mixed forest": 10, "Transitional woodland/shrub": 13}
    expected = np.zeros(19, np.float32)
    expected[[by_hand[n] for n in names]] = 1
    np.testing.assert_array_equal(ds.labels_of(0), expected)
    # S1 stays in float dB (torchgeo's reader would truncate to int32)
    s1 = open_layout(roots["ben"], "bigearthnet", "s1", purpose="evaluate")
    vv_file = s1.records[0].extra["folder"] / f"{s1.records[0].patch_id}_VV.tif"
    with rasterio.open(vv_file) as src:
        vv = src.read(1)
    back = s1.denormalise(s1[0]["image"])[0].numpy()
    np.testing.assert_allclose(back, vv, atol=1e-3)
    assert np.any(np.abs(vv - np.round(vv)) > 0.01)


def test_bigearthnet_v2_reference_map_labels_match_metadata(roots):
    import pandas as pd

    meta = pd.read_parquet(roots["ben2"] / "metadata.parquet")
    official = open_layout(roots["ben2"], "bigearthnet-v2", "s2-l2a", purpose="evaluate")
    # the generator leaves classes under 5 % of the map out of the labels: the maps at 0.05 agree
    from_maps = open_layout(roots["ben2"], "bigearthnet-v2", "s2-l2a", purpose="pretrain", label_threshold=0.05)
    assert len(from_maps) == 6 and len(official) == 12
    for i, pid in enumerate(from_maps.patch_ids):
        j = official.patch_ids.index(pid)
        np.testing.assert_array_equal(from_maps.labels_of(i), official.labels_of(j))
        names = list(meta.set_index("patch_id").loc[pid, "labels"])
        assert [official.class_names[k] for k in np.flatnonzero(official.labels_of(j))] == names


def test_eurosat_b8a_last_is_reordered_by_name(roots):
    import rasterio

    ds = open_layout(roots["eurosat"], "eurosat", "s2", purpose="evaluate")
    assert len(ds) == 40 and not ds.multilabel and ds.bands[8] == "B8A"
    path = ds.records[0].acquisitions[0][0]
    with rasterio.open(path) as src:
        stored = src.read().astype(np.float32)
    back = ds.denormalise(ds[0]["image"]).numpy()
    np.testing.assert_allclose(back[8], stored[12], rtol=1e-5, atol=0.05)  # B8A is stored last
    np.testing.assert_allclose(back[9], stored[8], rtol=1e-5, atol=0.05)  # B9 stored 9th
    assert ds[0]["labels"].tolist() == [1.0] + [0.0] * 9  # AnnualCrop, one-hot


BAD = {
    "ben_missing_split": lambda r, t: _copy_and(r["ben"], t / "b1", lambda d: (d / "bigearthnet-test.csv").unlink(),
                                                  "bigearthnet-test.csv", ["--modality", "s2-l2a"], "split file missing"),
    "ben_missing_labels": lambda r, t: _copy_and(
        r["ben"], t / "b2", lambda d: next((d / "BigEarthNet-v1.0").glob("*/*_labels_metadata.json")).unlink(),
        "_labels_metadata.json", ["--modality", "s2-l2a"], "label file missing"),
    "ben2_missing_metadata": lambda r, t: _copy_and(r["ben2"], t / "b3", lambda d: (d / "metadata.parquet").unlink(),
                                                    "metadata.parquet", ["--modality", "s2-l2a", "--layout", "bigearthnet-v2"],
                                                    "metadata file (splits and labels) missing"),
    "eurosat_missing_split": lambda r, t: _copy_and(r["eurosat"], t / "b4", lambda d: (d / "eurosat-train.txt").unlink(),
                                                    "eurosat-train.txt", [], "train split file missing"),
    "eurosat_s1": lambda r, t: (r["eurosat"], str(r["eurosat"]), ["--modality", "s1"], "has no --modality s1"),
    "ben_l1c": lambda r, t: (r["ben"], str(r["ben"]), ["--modality", "s2"], "has no --modality s2"),
    "ssl4eo_views_elsewhere": lambda r, t: (r["eurosat"], str(r["eurosat"]), ["--views", "seasons"], "--views seasons"),
}


def _copy_and(src, dst, edit, named, args, phrase):
    shutil.copytree(src, dst)
    edit(dst)
    return dst, named, args, phrase


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_layout_inputs_are_one_line_errors(case, roots, tmp_path):
    root, named, args, phrase = BAD[case](roots, tmp_path)
    before = sorted(p.name for p in Path(root).rglob("*"))
    r = invoke_cli(["eo-sar", "check", "--data", str(root), *args])
    assert r.exit_code == 2, r.stderr
    line = _one_line_error(r.stderr, named)
    assert phrase in line
    assert sorted(p.name for p in Path(root).rglob("*")) == before  # nothing written


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_pretrain_and_evaluate_every_layout(roots, tmp_path, monkeypatch):
    from domainfm.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    cases = [
        ("ssl4eo", "s2", ["--landcover", str(roots["dw"])], ["--landcover", str(roots["dw"]), "--test-fraction", "0.5"]),
        ("ben", "s2-l2a", [], ["--train-fraction", "0.5"]),
        ("ben2", "s2-l2a", ["--label-threshold", "0.05"], []),
        ("eurosat", "s2", [], []),
    ]
    results = {}
    for key, modality, pre_args, eval_args in cases:
        name = f"lay-{key}"
        out = tmp_path / f"{key}_pre.json"
        r = runner.invoke(main, ["pretrain", "--plugin", "eo-sar", "--data", str(roots[key]), "--modality", modality,
                                 "--init", "random", "--backbone", "test_vit", "--img-size", "32",
                                 "--max-steps", "2", "--batch-size", "4", "--proj-dim", "16", "--register", name,
                                 "--json", str(out), *pre_args])
        assert r.exit_code == 0, r.output[-3000:]
        assert "recognised as layout" in r.output
        pre = json.loads(out.read_text())
        assert pre["global_step"] == 2 and math.isfinite(pre["loss/total"])
        # the rank-0 -> worker hand-off is not left behind for the next job of this process
        assert "DOMAINFM_RUN_ID" not in os.environ and "DOMAINFM_CKPT_DIR" not in os.environ
        out = tmp_path / f"{key}_eval.json"
        r = runner.invoke(main, ["evaluate", "--plugin", "eo-sar", "--data", str(roots[key]), "--modality", modality,
                                 "--model", f"models:/{name}@candidate", "--batch-size", "8", "--knn-k", "3",
                                 "--json", str(out), *eval_args])
        assert r.exit_code == 0, r.output[-3000:]
        results[key] = json.loads(out.read_text())
    # official splits: BigEarthNet trains on (half of) its 6 train patches and scores its 4 test patches
    assert results["ben"]["n_train"] == 3 and results["ben"]["n_test"] == 4
    assert results["ben2"]["n_train"] == 6 and results["ben2"]["n_test"] == 4
    assert results["eurosat"]["n_train"] == 20 and results["eurosat"]["n_test"] == 10
    assert results["ssl4eo"]["n_train"] + results["ssl4eo"]["n_test"] == 6
    for key in ("ssl4eo", "ben", "ben2"):
        for metric in ("linear_mAP_macro", "linear_mAP_micro", "knn_mAP_macro", "knn_mAP_micro", "chance_mAP_macro"):
            assert 0.0 < results[key][metric] <= 1.0, (key, metric)
    ev = results["eurosat"]
    assert ev["chance_accuracy"] == pytest.approx(0.1)  # 10 balanced classes: the majority guess is right 1 in 10
    for metric in ("linear_accuracy", "knn_accuracy"):
        assert 0.0 <= ev[metric] <= 1.0 and round(ev[metric] * 10, 6).is_integer()  # k/10 of 10 test patches
    import mlflow

    client = mlflow.MlflowClient()
    arts = {a.path for a in client.list_artifacts(ev["mlflow_run_id"], "plots")}
    assert "plots/confusion_matrix.png" in arts
    (tmp_path / "layout_metrics.json").write_text(json.dumps(results, indent=1))


@pytest.mark.timeout(300)
def test_a_dataset_layout_without_data_is_refused_before_any_run(tmp_path):
    # found by trying it: `--layout bigearthnet` with no --data silently evaluated the embedded sample
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = invoke_cli(["evaluate", "--plugin", "eo-sar", "--model", str(tmp_path / "unused.safetensors"),
                    "--layout", "bigearthnet"], cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
    assert r.exit_code == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --layout bigearthnet names a downloaded dataset, but no --data was given. Fix: pass --data ROOT "
        "(the bigearthnet download), or drop --layout to use the embedded sample."]
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run opened


@pytest.mark.timeout(300)
def test_a_folder_of_another_layout_is_named_as_such(roots):
    # found by trying it: the domainfm sample with --layout bigearthnet was told to change --modality
    r = invoke_cli(["eo-sar", "check", "--data", str(roots["eurosat"]), "--layout", "bigearthnet", "--modality", "s2-l2a"])
    assert r.exit_code == 2, r.stderr
    line = _one_line_error(r.stderr, str(roots["eurosat"]))
    assert "the folder is not in layout bigearthnet (it looks like eurosat;" in line
    assert line.endswith("Fix: pass --layout eurosat.")
