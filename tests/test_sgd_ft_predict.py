"""``domainfm predict`` of a registered sgd-ft classifier: a real (tiny, random-init) multi-label
fine-tuning run on eo-sar patches, registered in a real sqlite MLflow store, then applied to
GeoTIFF patches of two sizes; the scores equal the classifier applied by an independent path
(rasterio read, the recorded statistics, torch resize, the core's create_backbone + the saved head);
bad input is one line naming the setting."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import invoke_cli, load_make_data, run_cli

make_data = load_make_data("eo_sar")
NAME = "sgd-landcover"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    root = tmp_path_factory.mktemp("sgd_predict")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    from plugins.eo_sar.synthetic import write_sample

    data = write_sample(root / "eo", n_patches=10)
    out = root / "m.json"
    r = run_cli(["finetune", "--plugin", "sgd-ft", "--task", "multilabel", "--modality", "s2", "--data", str(data),
                 "--backbone", "test_vit", "--img-size", "32", "--batch-size", "8", "--init", "random",
                 "--accelerator", "cpu", "--max-steps", "2", "--no-measure-memory", "--out", str(root / "runs"),
                 "--register", NAME, "--json", str(out)], cwd=root, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, env, json.loads(out.read_text())


def _independent_scores(weights: Path, tif: Path) -> np.ndarray:
    """The classifier applied by hand: rasterio read (S2 nodata 0), the recorded mean/std, nodata -> 0,
    bilinear resize (antialiased when shrinking), the core's create_backbone + the saved linear head,
    sigmoid."""
    import rasterio
    import torch.nn.functional as F
    from safetensors import safe_open
    from safetensors.torch import load_file

    from domainfm.backbones import create_backbone

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    bands, mean, std = (json.loads(meta[k]) for k in ("input_bands", "input_mean", "input_std"))
    size = int(meta["img_size"])
    with rasterio.open(tif) as src:
        raw = src.read().astype(np.float32)
        assert [d.upper() for d in src.descriptions] == bands
    x = (raw - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    x[:, (raw == 0).any(axis=0)] = 0.0
    t = F.interpolate(torch.from_numpy(x)[None], size=(size, size), mode="bilinear", align_corners=False,
                      antialias=size < x.shape[-1])
    sd = load_file(str(weights))
    backbone = create_backbone(weights).eval()
    with torch.no_grad():
        logits = backbone(t) @ sd["head.weight"].T + sd["head.bias"]
    return torch.sigmoid(logits)[0].numpy()


@pytest.mark.timeout(900)
def test_predict_registered_classifier_on_patches_of_two_sizes(registered):
    import mlflow
    import yaml

    from domainfm.backbones import read_metadata
    from plugins.eo_sar.bands import CLASS_NAMES, S2_L1C_BANDS

    root, env, m = registered
    weights = Path(m["weights"])
    meta = read_metadata(weights)
    assert (meta["plugin"], meta["task"], meta["threshold"], meta["img_size"]) == ("sgd-ft", "multilabel", "0.5", "32")
    assert json.loads(meta["classes"]) == list(CLASS_NAMES)
    assert json.loads(meta["input_bands"]) == list(S2_L1C_BANDS) and json.loads(meta["input_gsd_m"]) == 10.0
    # the registered MLflow model names its plugin in MLmodel and holds the backbone and the head
    local = _download(env, f"models:/{NAME}@candidate")
    assert yaml.safe_load((local / "MLmodel").read_text())["metadata"] == {"domainfm.plugin": "sgd-ft"}
    assert {p.name for p in local.rglob("*.safetensors")} == {"backbone.safetensors", "head.safetensors"}

    data = make_data.write_dataset(root / "new", n_patches=2, seed=9, modalities=("s2",))
    p64, p48 = data / "s2" / "p00.tif", data / "s2" / "p01.tif"
    out = root / "pred"
    r = run_cli(["predict", "--model", f"models:/{NAME}@candidate", str(p64), str(p48), "--out", str(out),
                 "--accelerator", "cpu", "--json", str(root / "p.json")], cwd=root, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", *CLASS_NAMES, "predicted"]
    assert [row["file"] for row in rows] == [str(p64), str(p48)]
    got = np.array([[float(row[c]) for c in CLASS_NAMES] for row in rows])
    expected = np.stack([_independent_scores(weights, p64), _independent_scores(weights, p48)])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    for row, s in zip(rows, expected):
        assert row["predicted"] == ";".join(c for c, v in zip(CLASS_NAMES, s) if v >= 0.5)

    # the registered pyfunc takes raw pixels [N, C, H, W] (recorded band order and units), any size
    import rasterio

    with rasterio.open(p64) as src:
        raw = src.read().astype(np.float32)
    assert (raw != 0).all()  # p00 has no nodata corner: raw pixels and the patch reader agree
    pyfunc = mlflow.pyfunc.load_model(str(local))
    frame = pyfunc.predict(raw[None])
    assert list(frame.columns) == list(CLASS_NAMES)
    np.testing.assert_allclose(frame.to_numpy()[0], expected[0], atol=1e-5, rtol=0)

    run = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_run(
        json.loads((root / "p.json").read_text())["mlflow_run_id"])
    assert run.data.tags["domainfm.model_version"] == f"{NAME}/1"
    assert run.data.tags["domainfm.plugin"] == "sgd-ft"
    version = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_model_version(NAME, "1")
    assert version.tags["domainfm.plugin"] == "sgd-ft" and version.tags["domainfm.training_run"]

    # the classifier's own file applies the same way (in this process: a second fresh one proves nothing more)
    r = invoke_cli(["predict", "--model", str(weights), str(p48), "--out", str(root / "pred_file"),
                    "--accelerator", "cpu"], cwd=root, env=env)
    assert r.exit_code == 0, r.output[-3000:]
    with (root / "pred_file" / "predictions.csv").open() as f:
        again = next(csv.DictReader(f))
    np.testing.assert_allclose([float(again[c]) for c in CLASS_NAMES], expected[1], atol=1e-5, rtol=0)


def _download(env, uri: str) -> Path:
    import mlflow

    # both: an earlier test in the same process may have pointed the registry elsewhere
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(env["MLFLOW_TRACKING_URI"])
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


@pytest.mark.timeout(600)
def test_sar_patch_for_an_s2_classifier_is_one_line_naming_the_bands(registered):
    root, env, _ = registered
    data = make_data.write_dataset(root / "sar", n_patches=1, modalities=("s1",))
    bad = data / "s1" / "p00.tif"
    r = invoke_cli(["predict", "--model", f"models:/{NAME}@candidate", str(bad), "--out", str(root / "bad")],
                   cwd=root, env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {bad}: cannot align the patch's bands to the model's: the data bands "
                               "(VV, VH) and the model bands (B1, B2"), lines[0]


@pytest.mark.timeout(900)
def test_predict_registered_rgb_classifier_on_images_of_two_sizes(registered):
    """An ImageFolder classifier (bands by position, RGB scaled to 0..1) applied to PNGs of two sizes."""
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.torch import load_file

    from domainfm.backbones import create_backbone, read_metadata

    sgd_data = load_make_data("sgd_ft")
    root, env, _ = registered
    data = sgd_data.write_imagefolder(root / "rgb", train=4, val=3, size=32)
    out = root / "rgb.json"
    # fine-tuned in this process (the module's fixture already ran one in its own): the predict below
    # is the fresh process a user starts
    r = invoke_cli(["finetune", "--plugin", "sgd-ft", "--data", str(data), "--backbone", "test_vit",
                    "--img-size", "32", "--batch-size", "8", "--init", "random", "--accelerator", "cpu", "--max-steps",
                    "2", "--no-measure-memory", "--out", str(root / "runs"), "--register", "sgd-rgb", "--json", str(out)],
                   cwd=root, env=env)
    assert r.exit_code == 0, r.output[-3000:]
    weights = Path(json.loads(out.read_text())["weights"])
    meta = read_metadata(weights)
    assert json.loads(meta["classes"]) == list(sgd_data.CLASSES) and meta["task"] == "multiclass"
    assert json.loads(meta["input_units"]) == "RGB scaled to 0..1" and "input_bands" not in meta

    rng = np.random.default_rng(3)
    images = []
    for label, size in ((0, 40), (2, 24)):
        path = root / "new_rgb" / f"img{size}.png"
        path.parent.mkdir(exist_ok=True)
        sgd_data.write_png(path, sgd_data.class_image(rng, label, bands=3, size=size, n_classes=3))
        images.append(path)
    r = run_cli(["predict", "--model", "models:/sgd-rgb@candidate", str(root / "new_rgb"), "--out", str(root / "rgb_pred"),
                 "--accelerator", "cpu"], cwd=root, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    with (root / "rgb_pred" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["file"] for row in rows] == [str(p) for p in sorted(images)]

    mean = torch.tensor(json.loads(meta["input_mean"]))[:, None, None]
    std = torch.tensor(json.loads(meta["input_std"]))[:, None, None]
    sd = load_file(str(weights))
    backbone = create_backbone(weights).eval()
    for row in rows:
        pixels = torch.from_numpy(np.asarray(Image.open(row["file"]).convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)
        x = F.interpolate(pixels[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            probs = torch.softmax(backbone((x - mean) / std) @ sd["head.weight"].T + sd["head.bias"], -1)[0].numpy()
        np.testing.assert_allclose([float(row[c]) for c in sgd_data.CLASSES], probs, atol=1e-5, rtol=0)
        assert row["predicted"] == sgd_data.CLASSES[int(probs.argmax())]

    # a 13-band GeoTIFF for this RGB model: one line naming the band count
    bad = root / "bad13.tif"
    sgd_data.write_geotiff(bad, np.ones((13, 16, 16), np.float32))
    r = invoke_cli(["predict", "--model", "models:/sgd-rgb@candidate", str(bad), "--out", str(root / "bad13")],
                   cwd=root, env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert r.exit_code == 2 and lines == [f"error: {bad}: has 13 band(s) but the model takes 3. "
                                           "Fix: give images with the 3 bands the model was trained on."], r.stderr
