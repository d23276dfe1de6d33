"""Statistics travel with the weights: a pretraining run records its bands and per-band mean/std
in the export and the MLflow model; evaluate normalises with them (or the data's, and says so);
the registered pyfunc takes raw pixels by band name and gives the embedding evaluate computes;
torchgeo weights enums supply their own bands and statistics; bands align by name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from domainfm.backbones import InputSpec, input_spec_of, torchgeo_weights
from domainfm.errors import DomainFMError
from plugins.eo_sar.bands import S2_L1C_BANDS, S2_L2A_BANDS
from plugins.eo_sar.normalization import AlignBands, plan_input

_spec = importlib.util.spec_from_file_location("eo_sar_make_data", Path(__file__).parent / "data" / "eo_sar" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)

SOFTCON_S2 = "torchgeo:ViTSmall14_DINOv2_Weights.SENTINEL2_ALL_SOFTCON"


def _valid_pixel_stats(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean/std over pixels where no band is 0 (S2 nodata), straight from rasterio."""
    import rasterio

    pixels = []
    for p in sorted((root / "s2").glob("*.tif")):
        with rasterio.open(p) as src:
            x = src.read().astype(np.float64)
        pixels.append(x[:, (x != 0).all(axis=0)])
    allpix = np.concatenate(pixels, axis=1)
    return allpix.mean(axis=1), allpix.std(axis=1)


def test_torchgeo_enum_supplies_bands_and_statistics():
    weights = torchgeo_weights(SOFTCON_S2)
    normalize = [t for t in weights.transforms if hasattr(t, "mean")][0]
    spec = input_spec_of(SOFTCON_S2)
    assert spec.bands == S2_L1C_BANDS  # the enum says "B8a": normalised
    assert spec.mean == pytest.approx(list(normalize.mean)) and spec.std == pytest.approx(list(normalize.std))
    assert spec.mean[S2_L1C_BANDS.index("B10")] == pytest.approx(22.0)
    assert spec.modality == "s2" and spec.units == "reflectance x 10000"
    # the round trip through safetensors metadata keeps every field
    assert InputSpec.from_meta(spec.to_meta(), source=spec.source) == spec
    assert input_spec_of("dinov2") is None and input_spec_of("random") is None


def test_plan_with_softcon_statistics_on_l2a_data_fills_b10():
    spec = input_spec_of(SOFTCON_S2)
    plan = plan_input("s2-l2a", spec, "backbone")
    assert plan.stats_from == "backbone" and plan.model_bands == S2_L1C_BANDS and plan.data_bands == S2_L2A_BANDS
    assert plan.alignment.filled == ("B10",)
    # the data is normalised with the backbone's numbers for its own 12 bands
    assert plan.mean == tuple(m for b, m in zip(spec.bands, spec.mean) if b != "B10")
    assert any("normalising with the backbone's own statistics" in m for m in plan.messages)
    assert any("filled with the band mean: B10" in m for m in plan.messages)
    sample = {"image": torch.ones(12, 4, 4), "bands": S2_L2A_BANDS}
    out = AlignBands(plan.alignment)(sample)
    assert out["bands"] == S2_L1C_BANDS and out["image"].shape == (13, 4, 4)
    assert torch.equal(out["image"][10], torch.zeros(4, 4)) and out["image"].sum() == 12 * 16
    assert plan_input("s2", spec, "data").mean is None
    assert "no normalisation statistics" in plan_input("s2", None).messages[0]


def test_sar_into_an_optical_backbone_is_one_line():
    with pytest.raises(DomainFMError) as e:
        plan_input("s1", input_spec_of(SOFTCON_S2))
    msg = str(e.value)
    assert msg.startswith("the data bands (VV, VH) and the model bands (B1, B2, B3") and len(msg.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_statistics_travel_from_pretraining_to_evaluate_and_the_registered_pyfunc(eo_tiny_pretrained, tmp_path,
                                                                                  monkeypatch):
    import mlflow
    from safetensors import safe_open

    from conftest import EO_TINY_MODEL, copy_store

    # the session's tiny eo-sar pretraining (4 S2 patches, test_vit, 32 px, its own process), this
    # test's own copy of its store
    uri = copy_store(eo_tiny_pretrained, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    train = eo_tiny_pretrained / "train"
    assert "the backbone records no normalisation statistics" in (eo_tiny_pretrained / "pretrain.stderr").read_text()
    pre = json.loads((eo_tiny_pretrained / "pretrain.json").read_text())

    # the export records the bands and the statistics the run normalised with (hand-computed here)
    with safe_open(pre["backbone_path"], framework="pt") as f:
        meta = f.metadata()
    mean, std = _valid_pixel_stats(train)
    assert json.loads(meta["input_bands"]) == list(S2_L1C_BANDS)
    np.testing.assert_allclose(json.loads(meta["input_mean"]), mean, rtol=1e-9)
    np.testing.assert_allclose(json.loads(meta["input_std"]), std, rtol=1e-6)
    assert (json.loads(meta["input_modality"]), json.loads(meta["input_gsd_m"]), meta["img_size"]) == ("s2", 10.0, "32")
    assert json.loads(meta["input_units"]) == "reflectance x 10000"

    # evaluate on another folder: the backbone's statistics by default, the data's on request
    from click.testing import CliRunner

    from domainfm.cli import main

    data = make_data.write_dataset(tmp_path / "eval", n_patches=8, seed=7, modalities=("s2",))
    res = tmp_path / "evaluate.json"
    r = CliRunner().invoke(main, ["evaluate", "--plugin", "eo-sar", "--model", f"models:/{EO_TINY_MODEL}@candidate",
                                  "--data", str(data), "--batch-size", "4", "--knn-k", "3", "--json", str(res)])
    assert r.exit_code == 0, r.output[-3000:]
    assert "eo-sar: normalising with the backbone's own statistics (13 bands" in r.stderr
    assert not (data / ".domainfm_stats_s2.json").exists()  # the folder's own statistics were never needed
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(json.loads(res.read_text())["mlflow_run_id"])
    assert run.data.tags["eo_sar.stats_from"] == "backbone"
    r = CliRunner().invoke(main, ["evaluate", "--plugin", "eo-sar", "--model", f"models:/{EO_TINY_MODEL}@candidate",
                                  "--data", str(data), "--batch-size", "4", "--knn-k", "3", "--stats", "data"])
    assert r.exit_code == 0, r.output[-3000:]
    assert "--stats data: normalising with the data's own statistics" in r.stderr

    # the registered pyfunc takes raw reflectance by band name and gives evaluate's embedding
    import rasterio

    from domainfm.backbones import create_backbone
    from plugins.eo_sar.datasets import BandStats, EOSARPatches
    from domainfm.inference import extract_features
    from plugins.eo_sar.transforms import ResizeWhole

    backbone = create_backbone(f"models:/{EO_TINY_MODEL}@candidate")
    plan = plan_input("s2", backbone.input_spec)
    ds = EOSARPatches(data, "s2", stats=BandStats(plan.mean, plan.std), patch_ids=["p00"])  # p00: no nodata
    ds.transforms = AlignBands(plan.alignment, ResizeWhole(backbone.img_size))
    expected = extract_features(backbone, ds, batch_size=1, device="cpu")
    with rasterio.open(data / "s2" / "p00.tif") as src:
        raw = src.read().astype(np.float32)
    assert (raw != 0).all()
    model = mlflow.pyfunc.load_model(f"models:/{EO_TINY_MODEL}@candidate")
    schema_names = model.metadata.get_input_schema().input_names()
    assert schema_names == list(S2_L1C_BANDS)
    got = model.predict({b: raw[i][None] for i, b in enumerate(S2_L1C_BANDS)})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # band names, not positions: the same bands handed over in another order
    shuffled = {b: raw[i][None] for i, b in reversed(list(enumerate(S2_L1C_BANDS)))}
    np.testing.assert_allclose(model.predict(shuffled), expected, rtol=1e-4, atol=1e-5)

    # a band the model expects and the input lacks (L2A: no B10) passes MLflow's schema check (the
    # band columns are optional) and is filled with its mean: the embedding of B10 set to the mean
    schema = model.metadata.get_input_schema()
    assert not any(c.required for c in schema.inputs)
    b10 = S2_L1C_BANDS.index("B10")
    without_b10 = {b: raw[i][None] for i, b in enumerate(S2_L1C_BANDS) if b != "B10"}
    at_mean = raw.copy()
    at_mean[b10] = np.float32(backbone.input_spec.mean[b10])
    got = model.predict(without_b10)
    np.testing.assert_allclose(got, model.predict({b: at_mean[i][None] for i, b in enumerate(S2_L1C_BANDS)}),
                               rtol=1e-5, atol=1e-6)
    # ... and independently: normalise with the recorded statistics, B10 = 0, resize, embed
    import torch.nn.functional as F

    x = (raw.astype(np.float64) - np.array(backbone.input_spec.mean)[:, None, None]) / np.array(backbone.input_spec.std)[:, None, None]
    x[b10] = 0.0
    t = F.interpolate(torch.from_numpy(x.astype(np.float32))[None], size=(backbone.img_size,) * 2, mode="bilinear",
                      align_corners=False, antialias=backbone.img_size < raw.shape[-1])
    with torch.no_grad():
        np.testing.assert_allclose(got, backbone.eval()(t).float().numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, expected, rtol=1e-4, atol=1e-5)  # B10 at its mean is not the real B10
    # an input with none of the model's bands is one clear error
    with pytest.raises(Exception, match=r"the input has none of the model bands \(B1, B2, B3"):
        model.predict({"VV": raw[0][None], "VH": raw[1][None]})


def test_band_stats_of_by_hand():
    """The one per-band statistics accumulator (domainfm layout and standard layouts alike):
    numpy's mean/std over the valid pixels of all images pooled; a constant band gets std 1."""
    from plugins.eo_sar.band_stats import band_stats_of

    rng = np.random.default_rng(1)
    a, b = rng.normal(100.0, 7.0, (3, 5, 6)), rng.normal(90.0, 3.0, (3, 4, 4))
    a[2], b[2] = 5.0, 5.0  # constant band
    va, vb = rng.random((5, 6)) > 0.3, np.ones((4, 4), bool)
    vb[0] = False
    stats = band_stats_of([(a, va), (b, vb)], 3)
    pooled = np.concatenate([a[:, va], b[:, vb]], axis=1)
    assert stats.valid_pixels == int(va.sum() + vb.sum()) == pooled.shape[1]
    np.testing.assert_allclose(stats.mean, pooled.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.std[:2], pooled.std(axis=1)[:2], rtol=1e-9)
    assert stats.std[2] == 1.0 and stats.mean[2] == 5.0
    assert band_stats_of([(a, np.zeros((5, 6), bool))], 3).valid_pixels == 0
