"""eo-sar evaluation: the probes against hand-computed numbers, the synthetic data against a probe
on simple band statistics, and pretrain -> evaluate end to end through the real CLI, Lightning,
MLflow (sqlite) and the model registry."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from domainfm.metrics import multilabel_average_precision
from plugins.eo_sar.bands import CLASS_NAMES
from plugins.eo_sar.probes import knn_scores, linear_probe_scores, split_indices

_spec = importlib.util.spec_from_file_location("eo_sar_make_data", Path(__file__).parent / "data" / "eo_sar" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_data)

DOMAINFM = Path(sys.executable).with_name("domainfm")


def test_knn_scores_by_hand():
    train_x = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])  # the last one: cosine 1/sqrt(2) to [1, 0]
    train_y = np.array([[1, 0], [0, 1], [1, 1]])
    test_x = np.array([[3.0, 0.0]])
    # k = 1: the nearest neighbour's labels
    np.testing.assert_allclose(knn_scores(train_x, train_y, test_x, k=1), [[1.0, 0.0]])
    # k = 2: neighbours 0 (sim 1) and 2 (sim 0.7071) with weights exp(sim / 0.07), normalised
    w0, w2 = math.exp(1 / 0.07), math.exp((1 / math.sqrt(2)) / 0.07)
    expected = [[(w0 + w2) / (w0 + w2), w2 / (w0 + w2)]]
    np.testing.assert_allclose(knn_scores(train_x, train_y, test_x, k=2), expected, rtol=1e-9)
    # k larger than the training set uses all of it
    assert knn_scores(train_x, train_y, test_x, k=50).shape == (1, 2)


def test_split_is_seeded_disjoint_and_complete():
    train, test = split_indices(10, 0.3, seed=0)
    assert len(test) == 3 and len(train) == 7
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(10))
    again = split_indices(10, 0.3, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    assert not np.array_equal(split_indices(10, 0.3, seed=1)[1], test)
    assert [len(p) for p in split_indices(2, 0.9, seed=0)] == [1, 1]


def test_per_class_figure_marks_missing_classes_and_chance():
    from plugins.eo_sar.plots import per_class_ap_figure

    fig = per_class_ap_figure(["a", "b", "c"], {"linear": [0.9, math.nan, 0.5], "knn": [0.7, math.nan, 0.6]},
                              chance=[0.25, 0.0, 0.5])
    ax = fig.axes[0]
    heights = [round(p.get_height(), 3) for p in ax.patches]
    assert heights == [0.9, 0.0, 0.5, 0.7, 0.0, 0.6]
    assert [t.get_text() for t in ax.texts] == ["n/a"]
    ticks = [seg[0][1] for coll in ax.collections for seg in coll.get_segments()]
    assert ticks == [0.25, 0.5]  # none over the class without positives
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["chance (class share)", "knn", "linear"]


def test_linear_probe_separates_and_handles_a_constant_class():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 3))
    y = np.stack([x[:, 0] > 0, x[:, 1] > 0, np.ones(80, bool)], axis=1).astype(int)
    scores = linear_probe_scores(x[:60], y[:60], x[60:])
    assert scores.shape == (20, 3)
    ap = multilabel_average_precision(scores[:, :2], y[60:, :2])
    assert ap["per_class"] == pytest.approx([1.0, 1.0])
    np.testing.assert_allclose(scores[:, 2], 1.0)  # present in every training patch


def test_synthetic_landcover_is_learnable_from_band_statistics(tmp_path):
    """The sample's imagery carries its labels: a linear probe on per-band means and stds of the
    valid pixels beats the prevalence baseline by a wide margin (so a probe on good features can
    learn something, and a failing probe means the features, not the data)."""
    from plugins.eo_sar.datasets import EOSARPatches

    root = make_data.write_dataset(tmp_path / "root", n_patches=36, modalities=("s2",))
    ds = EOSARPatches(root, "s2")
    feats, labels = [], []
    for i in range(len(ds)):
        s = ds[i]
        pixels = s["image"][:, s["valid"]]
        feats.append(torch.cat([pixels.mean(1), pixels.std(1)]).numpy())
        labels.append(ds.labels_of(i))
    x, y = np.stack(feats), np.stack(labels).astype(int)
    train, test = split_indices(len(x), 0.3, seed=0)
    probe = multilabel_average_precision(linear_probe_scores(x[train], y[train], x[test]), y[test])
    baseline = multilabel_average_precision(np.tile(y[train].mean(0), (len(test), 1)), y[test])
    assert probe["macro"] > baseline["macro"] + 0.2, (probe, baseline)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow
def test_pretrain_on_embedded_sample_then_evaluate_registered_model(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DOMAINFM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)

    # pretraining in its own process, as a user runs it (it also sets per-run environment variables)
    out = tmp_path / "pretrain.json"
    r = subprocess.run([str(DOMAINFM), "pretrain", "--plugin", "eo-sar", "--init", "random", "--backbone", "test_vit",
            "--img-size", "32", "--max-steps", "3", "--batch-size", "8", "--proj-dim", "32",
            "--register", "eo-s2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "embedded synthetic sample" in r.stderr
    pre = json.loads(out.read_text())
    assert pre["global_step"] == 3 and math.isfinite(pre["loss/total"])
    client = _client(uri)
    assert client.get_run(pre["mlflow_run_id"]).data.params["modality"] == "s2"

    data = make_data.write_dataset(tmp_path / "eval_root", n_patches=12, modalities=("s2",))
    # evaluation through the same CLI in this process (torch and mlflow are imported already)
    from click.testing import CliRunner

    from domainfm.cli import main

    out = tmp_path / "evaluate.json"
    r = CliRunner().invoke(main, ["evaluate", "--plugin", "eo-sar", "--model", "models:/eo-s2@candidate", "--data",
                                  str(data), "--batch-size", "8", "--knn-k", "3", "--json", str(out)])
    assert r.exit_code == 0, r.output[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics["n_train"] + metrics["n_test"] == 12 and metrics["feature_dim"] == 64
    for key in ("linear_mAP_macro", "linear_mAP_micro", "knn_mAP_macro", "knn_mAP_micro"):
        assert 0.0 < metrics[key] <= 1.0, key

    run_id = metrics["mlflow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")} | {a.path for a in client.list_artifacts(run_id, "tables")}
    assert {"plots/per_class_ap.png", "tables/per_class_ap.csv"} <= artifacts
    logged = client.get_run(run_id).data.metrics
    assert logged["linear_mAP_macro"] == pytest.approx(metrics["linear_mAP_macro"])
    # the per-class table, the per-class metrics and the macro mean tell the same story
    local = client.download_artifacts(run_id, "tables/per_class_ap.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert [r["class"] for r in rows] == list(CLASS_NAMES)
    shares = [int(r["test_positives"]) / metrics["n_test"] for r in rows if int(r["test_positives"]) > 0]
    assert metrics["chance_mAP_macro"] == pytest.approx(np.mean(shares))
    for probe in ("linear", "knn"):
        aps = [float(r[f"{probe}_AP"]) for r in rows if int(r["test_positives"]) > 0]
        assert metrics[f"{probe}_mAP_macro"] == pytest.approx(np.mean(aps))
        for r in rows:
            if int(r["test_positives"]) > 0:
                assert metrics[f"{probe}_AP_{r['class']}"] == pytest.approx(float(r[f"{probe}_AP"]))
            else:
                assert f"{probe}_AP_{r['class']}" not in metrics


@pytest.mark.timeout(600)
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")
def test_evaluate_refuses_a_missing_gpu_and_16_bit_on_cpu_before_any_run(tmp_path, mlflow_store):
    """The device and precision of the frozen features (domainfm.inference) are checked in the
    plugin's check: one line, exit 2, and no MLflow run left behind."""
    from conftest import run_cli
    from domainfm.backbones import create_backbone, save_backbone

    model = save_backbone(create_backbone("test_resnet", in_chans=13, img_size=32, init="random"),
                          tmp_path / "cnn.safetensors")
    cases = {("--accelerator", "gpu"): "error: --accelerator gpu but no CUDA device is visible. Fix: use --accelerator cpu.",
             ("--precision", "16-mixed"): "error: --precision 16-mixed needs a GPU. Fix: use bf16-mixed or 32-true on CPU."}
    for flag, line in cases.items():
        r = run_cli(["evaluate", "--plugin", "eo-sar", "--model", str(model), *flag], cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert [l for l in r.stderr.strip().splitlines() if l.startswith("error:")] == [line]
        assert "Traceback" not in r.stderr
    db = tmp_path / "mlflow.db"
    if db.exists():
        import sqlite3

        with sqlite3.connect(db) as con:
            assert con.execute("select count(*) from runs").fetchone()[0] == 0
