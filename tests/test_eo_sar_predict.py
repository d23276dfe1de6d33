"""``domainfm predict`` of a registered eo-sar backbone: a real (tiny, random-init) pretraining run
registered in a real sqlite MLflow store, promoted, then applied to GeoTIFF patches of two sizes
and a per-band folder; the embeddings equal the backbone applied by an independent path (rasterio
read, the recorded statistics, torch resize, forward); bad input is one line naming the setting."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EO_TINY_MODEL, copy_store, invoke_cli, load_make_data, run_cli

make_data = load_make_data("eo_sar")
NAME = EO_TINY_MODEL


@pytest.fixture(scope="module")
def registered(eo_tiny_pretrained, tmp_path_factory):
    """One pretraining run registered as NAME (version 1; the session's shared one, this module's
    own copy of its store), promoted to @champion."""
    root = tmp_path_factory.mktemp("eo_predict")
    env = {"MLFLOW_TRACKING_URI": copy_store(eo_tiny_pretrained, root), "HF_HUB_OFFLINE": "1"}
    r = invoke_cli(["registry", "promote", NAME, "1", "--alias", "champion"], cwd=root, env=env)
    assert r.exit_code == 0, r.output[-2000:]
    return root, env, json.loads((eo_tiny_pretrained / "pretrain.json").read_text())


def _independent_embedding(weights: Path, tifs: list[Path], names: list[str] | None = None) -> np.ndarray:
    """The backbone applied by hand: rasterio read, bands put in the model's order by name, the
    recorded mean/std, nodata (0 in S2) -> 0, bilinear resize (antialiased when shrinking), forward."""
    import rasterio
    import torch.nn.functional as F
    from safetensors import safe_open

    from domainfm.backbones import create_backbone

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    bands, mean, std = (json.loads(meta[k]) for k in ("input_bands", "input_mean", "input_std"))
    size = int(meta["img_size"])
    layers = {}
    for i, tif in enumerate(tifs):
        with rasterio.open(tif) as src:
            data = src.read().astype(np.float32)
            given = names[i:i + 1] if names else [d.upper() for d in src.descriptions]
        for b, layer in zip(given, data):
            layers[b] = layer
    raw = np.stack([layers[b] for b in bands])
    x = (raw - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    x[:, (raw == 0).any(axis=0)] = 0.0
    t = torch.from_numpy(x)[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=size < t.shape[-1])
    backbone = create_backbone(weights).eval()
    with torch.no_grad():
        return backbone(t)[0].numpy()


@pytest.mark.timeout(900)
def test_predict_registered_backbone_on_patches_of_two_sizes(registered):
    import mlflow
    import rasterio

    from domainfm.backbones import read_metadata

    root, env, pre = registered
    data = make_data.write_dataset(root / "new", n_patches=2, seed=5, modalities=("s2",))
    p64, p48 = data / "s2" / "p00.tif", data / "s2" / "p01.tif"
    # a BigEarthNet-style patch: one single-band GeoTIFF per band, named by band
    folder = root / "per_band" / "S2A_patch"
    folder.mkdir(parents=True)
    with rasterio.open(p64) as src:
        stack, descriptions = src.read(), src.descriptions
    band_files = []
    for layer, band in zip(stack, descriptions):
        name = "B" + band[1:].zfill(2) if band != "B8A" else "B8A"  # B1 -> B01, as BigEarthNet names them
        band_files.append(make_data.write_raster(folder / f"S2A_patch_{name}.tif", layer[None], nodata=0))
    out = root / "pred"
    r = run_cli(["predict", "--model", f"models:/{NAME}@champion", str(p64), str(p48), str(folder.parent),
                 "--out", str(out), "--batch-size", "2", "--accelerator", "cpu", "--json", str(root / "p.json")],
                cwd=root, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert rasterio.open(p64).shape == (64, 64) and rasterio.open(p48).shape == (48, 48)

    emb = np.load(out / "embeddings.npy")
    weights = Path(pre["backbone_path"])
    assert read_metadata(weights)["plugin"] == "eo-sar"
    assert emb.shape == (3, int(read_metadata(weights)["embed_dim"])) and emb.dtype == np.float32
    expected = [_independent_embedding(weights, [p64]), _independent_embedding(weights, [p48]),
                _independent_embedding(weights, band_files, names=list(descriptions))]
    np.testing.assert_allclose(emb, np.stack(expected), atol=1e-5, rtol=0)
    np.testing.assert_allclose(emb[2], emb[0], atol=1e-5)  # the same pixels, one file per band

    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [str(p64), str(p48), str(folder)]
    assert [(int(r["height"]), int(r["width"])) for r in rows] == [(64, 64), (48, 48), (64, 64)]
    np.testing.assert_allclose([float(r["norm"]) for r in rows], np.linalg.norm(emb, axis=1), rtol=1e-5)
    centred = emb.astype(np.float64) - emb.mean(0)
    # pc1 carries the largest share of the variance: |pc1| projections have the top singular value
    s = np.linalg.svd(centred, compute_uv=False)
    assert np.linalg.norm([float(r["pc1"]) for r in rows]) == pytest.approx(s[0], rel=1e-4)

    summary = json.loads((root / "p.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["domainfm.model_version"] == f"{NAME}/1"
    assert run.data.tags["domainfm.plugin"] == "eo-sar"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "predictions")}
    # the registered MLflow model's own weights name their plugin and input too
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(env["MLFLOW_TRACKING_URI"])  # an earlier test may have moved the registry
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}@champion"))
    registered_meta = read_metadata(next(local.rglob("backbone.safetensors")))
    assert registered_meta["plugin"] == "eo-sar" and registered_meta["input_units"] == '"reflectance x 10000"'
    assert json.loads(registered_meta["input_gsd_m"]) == 10.0 and registered_meta["img_size"] == "32"
    assert logged == {"predictions/embeddings.npy", "predictions/predictions.csv"}


def _one_error_line(r) -> str:
    """The one error line of a finished call (run_cli's CompletedProcess or invoke_cli's Result)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert getattr(r, "returncode", getattr(r, "exit_code", None)) == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.timeout(600)
def test_sar_patch_for_an_s2_model_is_one_line_naming_the_bands(registered):
    root, env, _ = registered
    data = make_data.write_dataset(root / "sar", n_patches=1, modalities=("s1",))
    r = invoke_cli(["predict", "--model", f"models:/{NAME}@champion", str(data / "s1" / "p00.tif"),
                    "--out", str(root / "bad1")], cwd=root, env=env)
    line = _one_error_line(r)
    assert line.startswith(f"error: {data / 's1' / 'p00.tif'}: cannot align the patch's bands to the model's: "
                           "the data bands (VV, VH) and the model bands (B1, B2"), line
    assert not (root / "bad1").exists()  # the --out folder predict made is removed: nothing partial


@pytest.mark.timeout(600)
def test_patch_at_another_pixel_size_is_one_line_naming_the_gsd(registered):
    import rasterio
    from affine import Affine

    root, env, _ = registered
    data = make_data.write_dataset(root / "gsd", n_patches=1, modalities=("s2",))
    src_path = data / "s2" / "p00.tif"
    coarse = root / "coarse.tif"
    with rasterio.open(src_path) as src:
        profile, pixels, desc = src.profile, src.read(), src.descriptions
    profile.update(transform=Affine(30.0, 0.0, 500_000.0, 0.0, -30.0, 5_000_000.0))  # 30 m pixels
    with rasterio.open(coarse, "w", **profile) as dst:
        dst.write(pixels)
        dst.descriptions = desc
    r = invoke_cli(["predict", "--model", f"models:/{NAME}@champion", str(coarse), "--out", str(root / "bad2")],
                   cwd=root, env=env)
    line = _one_error_line(r)
    assert line == (f"error: {coarse}: its pixels are 30 m but the model's GSD is 10 m (tolerance 25%). "
                    "Fix: resample the patch to 10 m (e.g. gdalwarp -tr 10 10 -r bilinear).")
    # within the tolerance it is accepted
    r = invoke_cli(["predict", "--model", f"models:/{NAME}@champion", str(coarse), "--out", str(root / "ok2"),
                    "--gsd-tolerance", "2.5", "--accelerator", "cpu"], cwd=root, env=env)
    assert r.exit_code == 0, r.output[-2000:]
    assert np.load(root / "ok2" / "embeddings.npy").shape[0] == 1


@pytest.mark.timeout(600)
@pytest.mark.parametrize("drop, setting", [("input_units", "records no units of its statistics (input_units)"),
                                           ("input_mean", "records no normalisation statistics for its bands "
                                                          "(input_mean/input_std)")])
def test_model_missing_units_or_statistics_is_one_line(tmp_path, drop, setting):
    """A backbone file whose metadata lacks what applying it takes is refused before any pixel is read."""
    from domainfm.backbones import InputSpec, create_backbone, save_backbone
    from plugins.eo_sar.bands import S2_L1C_BANDS

    spec = InputSpec(bands=S2_L1C_BANDS, mean=(1000.0,) * 13, std=(500.0,) * 13, modality="s2", gsd_m=10.0,
                     units="reflectance x 10000").to_meta()
    spec.pop(drop)
    weights = save_backbone(create_backbone("resnet18", in_chans=13, img_size=32, init="random"),
                            tmp_path / "bare.safetensors", extra_meta={"plugin": "eo-sar", **spec})
    patch = make_data.write_dataset(tmp_path / "d", n_patches=1, modalities=("s2",)) / "s2" / "p00.tif"
    r = invoke_cli(["predict", "--model", str(weights), str(patch), "--out", str(tmp_path / "out")], cwd=tmp_path,
                   env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert _one_error_line(r).startswith(f"error: {weights}: the model {setting}. Fix: use a backbone exported by")
