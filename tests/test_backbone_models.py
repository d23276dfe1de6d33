"""Logged backbone models take any spatial size (issue 13 item 3), and a registered version tells
its story: plugin, training run, data (item 4). A small random ViT goes through the real
export_and_register path into a real sqlite MLflow store and comes back by models:/NAME@ALIAS."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from domainfm.backbones import create_backbone

BANDS = ["B2", "B3", "B4"]
MEAN = [1000.0, 1200.0, 900.0]
STD = [300.0, 250.0, 400.0]


def _resized(x: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(x)
    shrink = t.shape[-1] > size
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def _mlmodel(uri: str) -> dict:
    from domainfm import tracking

    return yaml.safe_load((tracking.download_model(uri) / "MLmodel").read_text())


@pytest.mark.timeout(600)
def test_registered_backbone_without_statistics_takes_two_sizes(mlflow_store, tmp_path):
    import mlflow

    from domainfm import jobs, tracking

    torch.manual_seed(0)
    b = create_backbone("test_vit", in_chans=3, img_size=32, init="random").eval()
    with tracking.start_run(run_name="train", experiment="bb-test") as run:
        tracking.set_tags({"domainfm.plugin": "toy", "domainfm.data_root": "/data/x",
                           "domainfm.data_fingerprint": "sha256:abc"})
        out = jobs.export_and_register(b, tmp_path / "b.safetensors", register="plain-bb", alias="champion")
    assert out.registered_model == "models:/plain-bb@champion"
    model = mlflow.pyfunc.load_model("models:/plain-bb@champion")
    rng = np.random.default_rng(0)
    for size in (32, 48, 20):
        x = rng.standard_normal((3, 3, size, size)).astype(np.float32)
        got = model.predict(x)
        with torch.no_grad():
            ref = b(_resized(x, 32)).numpy()
        assert got.shape == (3, b.embed_dim)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    doc = _mlmodel("models:/plain-bb@champion")
    assert doc["metadata"]["domainfm.plugin"] == "toy"  # from the run's tag
    spec = doc["metadata"]["domainfm.input"]
    assert spec["size"] == 32 and spec["in_chans"] == 3 and spec["architecture"] == "test_vit"
    sig = json.loads(doc["signature"]["inputs"])[0]
    assert sig["tensor-spec"]["shape"] == [-1, 3, -1, -1]
    # the version tells its story: plugin, training run, data
    mv = tracking.model_version("models:/plain-bb@champion")
    assert mv.tags["domainfm.plugin"] == "toy" and mv.tags["domainfm.training_run"] == run.info.run_id
    assert mv.tags["domainfm.data_root"] == "/data/x" and mv.tags["domainfm.data_fingerprint"] == "sha256:abc"


@pytest.mark.timeout(600)
def test_registered_backbone_with_statistics_takes_raw_bands_of_two_sizes(mlflow_store, tmp_path):
    import mlflow

    from domainfm import jobs, tracking
    from domainfm.backbones import InputSpec

    torch.manual_seed(1)
    b = create_backbone("test_vit", in_chans=3, img_size=32, init="random").eval()
    meta = InputSpec(bands=tuple(BANDS), mean=tuple(MEAN), std=tuple(STD), gsd_m=10.0).to_meta()
    with tracking.start_run(run_name="train-eo", experiment="bb-test"):
        jobs.export_and_register(b, tmp_path / "b.safetensors", meta=meta, model_meta=meta, register="eo-bb",
                                 alias="candidate", plugin="eo-sar")
    model = mlflow.pyfunc.load_model("models:/eo-bb/1")
    rng = np.random.default_rng(1)
    mean, std = np.array(MEAN, np.float32)[:, None, None], np.array(STD, np.float32)[:, None, None]
    for size in (32, 64):
        raw = (rng.standard_normal((2, 3, size, size)) * 300 + 1000).astype(np.float32)
        got = model.predict({band: raw[:, i].astype(np.float64) for i, band in enumerate(BANDS)})
        with torch.no_grad():
            ref = b(_resized(((raw - mean) / std).astype(np.float32), 32)).numpy()
        assert got.shape == (2, b.embed_dim)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    doc = _mlmodel("models:/eo-bb@candidate")
    assert doc["metadata"]["domainfm.plugin"] == "eo-sar"
    spec = doc["metadata"]["domainfm.input"]
    assert spec["bands"] == BANDS and spec["mean"] == MEAN and spec["std"] == STD and spec["gsd_m"] == 10.0
    assert spec["size"] == 32
    assert tracking.model_version("models:/eo-bb@candidate").tags["domainfm.plugin"] == "eo-sar"
