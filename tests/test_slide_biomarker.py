"""slide-biomarker: cohort checks, MIL models, folds, and the whole pipeline with a real MLflow store.

The synthetic cohort (tests/data/histo/make_data.py) plants a signal in a few tiles of positive
slides: the ensemble must find it (external AUC >= 0.9) and look at it (top-attention tiles).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from domainfm.errors import DomainFMError
from pipelines.slide_biomarker import command
from plugins.histo import cohort as C
from plugins.histo.mil import Chowder, GatedAttentionMIL, MeanPoolMIL
from conftest import load_make_data



@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("histo_cohort")
    load_make_data("histo").make_feature_cohort(root, n_slides=36, n_external=20, dim=16, tiles=(30, 50))
    return root


def write_labels(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "label"])
        w.writerows(rows)
    return path


# ---------------------------------------------------------------- models

def test_gated_attention_matches_the_formula_and_ignores_tile_order():
    torch.manual_seed(0)
    m = GatedAttentionMIL(8, 2, hidden=6, attn_dim=4).eval()
    bag = torch.randn(11, 8)
    logits, a = m(bag)
    h = torch.relu(bag @ m.embed[0].weight.T + m.embed[0].bias)
    s = (torch.tanh(h @ m.attn_v.weight.T + m.attn_v.bias) * torch.sigmoid(h @ m.attn_u.weight.T + m.attn_u.bias)) \
        @ m.attn_w.weight.T + m.attn_w.bias
    expected_a = torch.softmax(s.squeeze(-1), 0)
    torch.testing.assert_close(a, expected_a)
    torch.testing.assert_close(logits, m.classifier(expected_a @ h))
    perm = torch.randperm(11)
    logits_p, a_p = m(bag[perm])
    torch.testing.assert_close(logits_p, logits)
    torch.testing.assert_close(a_p, a[perm])


def test_chowder_uses_top_and_bottom_scores_and_meanpool_the_mean():
    torch.manual_seed(0)
    ch = Chowder(4, 2, n_extreme=2).eval()
    bag = torch.randn(9, 4)
    logits, a = ch(bag)
    scores = ch.tile_score(bag)
    srt = scores.sort(0, descending=True).values
    ext = torch.cat([srt[:2], srt.flip(0)[:2]], 0).T
    torch.testing.assert_close(logits, ch.mlp(ext).squeeze(-1))
    assert a.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert ch(torch.randn(1, 4))[0].shape == (2,)  # a one-tile bag still works
    mp = MeanPoolMIL(4, 3).eval()
    logits, a = mp(bag)
    torch.testing.assert_close(logits, mp.classifier(mp.embed(bag).mean(0)))
    torch.testing.assert_close(a, torch.full((9,), 1 / 9))


def test_patient_folds_keep_patients_together_and_stratify():
    labels = np.array([0, 0, 1, 1] * 10)
    patients = [f"p{i // 2}" for i in range(40)]  # two slides per patient
    folds = C.patient_folds(labels, patients, 4, seed=1)
    assert len(folds) == 4
    seen = np.concatenate([va for _, va in folds])
    assert sorted(seen) == list(range(40))
    for tr, va in folds:
        assert not {patients[i] for i in tr} & {patients[i] for i in va}
        assert set(labels[va]) == {0, 1}


# ---------------------------------------------------------------- label errors

def test_label_errors_are_clear(cohort_dir, tmp_path):
    feats = cohort_dir / "train"
    dup = write_labels(tmp_path / "dup.csv", [("train_000", "a", 0), ("train_000", "a", 0), ("train_001", "b", 1)])
    with pytest.raises(DomainFMError, match="duplicate slide ids: train_000"):
        C.load_cohort(feats, dup)
    missing = write_labels(tmp_path / "missing.csv", [("train_000", "a", 0), ("ghost_1", "b", 1), ("ghost_2", "c", 1)])
    with pytest.raises(DomainFMError, match="2 labelled slide.*ghost_1, ghost_2"):
        C.load_cohort(feats, missing)
    words = write_labels(tmp_path / "words.csv", [("train_000", "a", "MSI"), ("train_001", "b", "MSS")])
    with pytest.raises(DomainFMError, match="non-numeric.*0 and the positive class as 1"):
        C.load_cohort(feats, words)
    one = write_labels(tmp_path / "one.csv", [("train_000", "a", 1), ("train_001", "b", 1)])
    with pytest.raises(DomainFMError, match="single class"):
        C.load_cohort(feats, one)
    rare = write_labels(tmp_path / "rare.csv", [(f"train_{i:03d}", f"p{i}", int(i == 0)) for i in range(12)])
    co = C.load_cohort(feats, rare)
    with pytest.raises(DomainFMError, match="class 1 has 1 patient"):
        C.patient_folds(co.labels, co.patient_ids, 3, 0, rare)
    # three string classes are a multi-class target, in sorted order
    multi = write_labels(tmp_path / "multi.csv", [("train_000", "a", "b"), ("train_001", "b", "a"), ("train_002", "c", "c")])
    co = C.load_cohort(feats, multi)
    assert co.class_names == ["a", "b", "c"] and list(co.labels) == [1, 0, 2]


def test_pipeline_error_exits_2_naming_the_slides(cohort_dir, tmp_path, mlflow_store):
    missing = write_labels(tmp_path / "missing.csv", [("train_000", "a", 0), ("ghost_1", "b", 1)])
    res = CliRunner().invoke(command, ["--features", str(cohort_dir / "train"), "--labels", str(missing),
                                       "--target", "msi"])
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and "ghost_1" in res.output and "Fix:" in res.output


# ---------------------------------------------------------------- end to end

def test_pipeline_ensemble_finds_and_looks_at_the_planted_tiles(cohort_dir, tmp_path, mlflow_store):
    import mlflow
    from mlflow import MlflowClient

    out_json = tmp_path / "metrics.json"
    args = ["--features", str(cohort_dir / "train"), "--labels", str(cohort_dir / "train" / "labels.csv"),
            "--target", "msi", "--external-features", str(cohort_dir / "external"),
            "--external-labels", str(cohort_dir / "external" / "labels.csv"),
            "--folds", "3", "--seeds", "2", "--max-epochs", "6", "--patience", "3", "--lr", "1e-3",
            "--n-boot", "200", "--max-heatmaps", "2", "--max-tiles", "40",
            "--out", str(tmp_path / "out"), "--json", str(out_json)]
    res = CliRunner().invoke(command, args)
    assert res.exit_code == 0, res.output
    m = json.loads(out_json.read_text())
    for key in ("cv_auc_mean", "external_auc_ensemble", "external_auc_ensemble_ci", "external_auc_oneshot",
                "mlflow_run_id"):
        assert key in m
    assert m["external_auc_ensemble"] >= 0.9
    lo, hi = m["external_auc_ensemble_ci"]
    assert lo <= m["external_auc_ensemble"] <= hi
    assert m["n_members"] == 6

    # the ensemble's numbers are the external predictions' numbers (independent recomputation)
    from sklearn.metrics import roc_auc_score

    table = mlflow.artifacts.download_artifacts(run_id=m["mlflow_run_id"], tracking_uri=mlflow_store,
                                                artifact_path="tables/external_predictions.csv")
    preds = list(csv.DictReader(open(table)))
    y = [int(r["label"]) for r in preds]
    assert roc_auc_score(y, [float(r["prob_ensemble_1"]) for r in preds]) == pytest.approx(m["external_auc_ensemble"])
    assert roc_auc_score(y, [float(r["prob_oneshot_1"]) for r in preds]) == pytest.approx(m["external_auc_oneshot"])

    # MLflow: a parent run with one child per member plus the one-shot model, and a registered model
    client = MlflowClient(tracking_uri=mlflow_store)
    parent = client.get_run(m["mlflow_run_id"])
    assert parent.data.metrics["external_auc_ensemble"] == pytest.approx(m["external_auc_ensemble"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = sorted(r.info.run_name for r in children)
    assert names == sorted([f"fold{k}-seed{s}" for k in range(3) for s in range(2)] + ["oneshot"])
    for r in children:
        if r.info.run_name != "oneshot":
            assert {"val_auc", "val_balanced_accuracy", "external_auc", "external_balanced_accuracy",
                    "best_epoch", "train_loss", "val_loss"} <= set(r.data.metrics)
    member_aucs = [r.data.metrics["external_auc"] for r in children if r.info.run_name != "oneshot"]
    assert m["external_auc_members_mean"] == pytest.approx(np.mean(member_aucs))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/roc_cv.png", "plots/roc_external.png"} <= artifacts
    assert len(client.list_artifacts(parent.info.run_id, "heatmaps")) == 2

    # the registered pyfunc model: one bag in, probability and attention out; attention on planted tiles
    mlflow.set_tracking_uri(mlflow_store)
    model = mlflow.pyfunc.load_model("models:/histo-msi@candidate")
    hits, total = 0, 0
    for r in preds:
        if r["label"] != "1":
            continue
        with h5py.File(cohort_dir / "external" / "features" / f"{r['slide_id']}.h5") as f:
            feats, planted = f["features"][:], f["planted"][:]
        out = model.predict(feats)
        assert out["probability"] == pytest.approx(float(r["prob_ensemble_1"]), abs=1e-5)
        att = np.asarray(out["attention"])
        assert att.shape == (len(feats),) and att.sum() == pytest.approx(1.0, abs=1e-4)
        k = int(planted.sum())
        top = np.argsort(-att)[:k]
        hits += int(planted[top].sum())
        total += k
    assert hits / total >= 0.7, f"only {hits}/{total} top-attention tiles are planted ones"

    # one slide's heatmap through the plugin command, from the registered model
    from plugins.histo.commands import heatmap_command

    sid = next(r["slide_id"] for r in preds if r["label"] == "1")
    png = tmp_path / "one.png"
    res = CliRunner().invoke(heatmap_command, [sid, "--features", str(cohort_dir / "external" / "features" / f"{sid}.h5"),
                                               "--model", "models:/histo-msi@candidate", "--out", str(png)])
    assert res.exit_code == 0, res.output
    from PIL import Image

    assert Image.open(png).size[0] > 10
    # the same from the model folder kept under --out, without MLflow: the same probability
    res2 = CliRunner().invoke(heatmap_command, [sid, "--features", str(cohort_dir / "external" / "features" / f"{sid}.h5"),
                                                "--model", str(tmp_path / "out" / "model"), "--out", str(tmp_path / "two.png")])
    assert res2.exit_code == 0, res2.output
    assert res2.output.split()[1] == res.output.split()[1]  # "probability 0.xxx -> ..."


def test_pipeline_from_whole_slides_chains_tile_embed_and_draws_heatmaps(tmp_path, mlflow_store):
    """Slides in, registered model out: tiles embedded by the plugin, heatmaps over the real thumbnails."""
    from domainfm.backbones import create_backbone, save_backbone

    md = load_make_data("histo")
    rows = []
    for cohort, n in (("train", 8), ("ext", 4)):
        (tmp_path / cohort).mkdir()
        for i in range(n):
            md.write_generic_tiff(tmp_path / cohort / f"{cohort}{i}.tif", mpp=2.0, seed=i, tile=64)
        write_labels(tmp_path / f"{cohort}.csv", [(f"{cohort}{i}", f"{cohort}p{i}", i % 2) for i in range(n)])
    torch.manual_seed(0)
    enc = save_backbone(create_backbone("test_resnet", img_size=16, init="random"), tmp_path / "enc.safetensors")
    out_json = tmp_path / "m.json"
    res = CliRunner().invoke(command, [
        str(tmp_path / "train"), "--features", str(tmp_path / "feat_train"),
        "--labels", str(tmp_path / "train.csv"),
        "--external-slides", str(tmp_path / "ext"), "--external-features", str(tmp_path / "feat_ext"),
        "--external-labels", str(tmp_path / "ext.csv"), "--target", "her2", "--encoder", str(enc),
        "--mpp", "8", "--tile-size", "16", "--num-workers", "0", "--folds", "2", "--seeds", "1", "--max-epochs", "2",
        "--n-boot", "20", "--max-heatmaps", "1", "--out", str(tmp_path / "out"), "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    m = json.loads(out_json.read_text())
    assert m["n_members"] == 2 and m["registered_model"] == "models:/histo-her2@candidate"
    with h5py.File(tmp_path / "feat_train" / "features" / "train0.h5") as f:
        assert f["features"].shape[1] == 96 and f.attrs["tile_size_level0"] == 64
    from PIL import Image

    (png,) = (tmp_path / "out" / "heatmaps").glob("*.png")
    # drawn over the slide's own thumbnail: the coarsest level >= 512 px of a 256 x 192 slide is level 0
    assert Image.open(png).size == (256, 192)


def test_multiclass_target_with_chowder(cohort_dir, tmp_path, mlflow_store):
    """Three string classes: macro one-vs-rest AUC, a pyfunc model returning one probability per class."""
    import mlflow

    from pipelines.slide_biomarker import run

    rows = list(csv.DictReader(open(cohort_dir / "train" / "labels.csv")))
    names = ["A", "B", "C"]
    labels = write_labels(tmp_path / "three.csv", [(r["slide_id"], r["patient_id"], names[int(r["patient_id"][-3:]) % 3])
                                                   for r in rows])
    m = run(features_dir=cohort_dir / "train", labels_csv=labels, target="subtype", model_name="chowder", folds=2,
            seeds=1, epochs=1, n_boot=20, max_heatmaps=0)
    assert 0.0 <= m["cv_auc_ensemble"] <= 1.0 and len(m["cv_auc_ensemble_ci"]) == 2
    mlflow.set_tracking_uri(mlflow_store)
    model = mlflow.pyfunc.load_model(m["model_uri"])
    with h5py.File(cohort_dir / "train" / "features" / "train_000.h5") as f:
        feats = f["features"][:]
    out = model.predict(feats)
    assert out["class_names"] == names
    assert len(out["probabilities"]) == 3 and sum(out["probabilities"]) == pytest.approx(1.0, abs=1e-5)



# ---------------------------------------------------------------- degenerate cohorts (issue 9, items 13-14)

def test_auc_of_scores_equal_up_to_float_noise_is_a_tie():
    from sklearn.metrics import roc_auc_score

    from domainfm.metrics import roc_auc, roc_auc_ci

    # the reported situation: every slide at 0.43964 +- 1e-7, positives a hair below the negatives
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p1 = np.float32(0.43964) + np.array([1, 1, 0, 1, -1, 0, -1, -1]) * np.float32(1e-7)
    probs = np.stack([1 - p1, p1], 1).astype(np.float32)
    assert roc_auc_score(y, probs[:, 1]) < 0.2  # the raw ranking rewards noise
    assert roc_auc(y, probs) == 0.5
    assert roc_auc(y, probs[:, 1]) == 0.5
    assert roc_auc_ci(y, probs, n_boot=50, seed=0) == (0.5, 0.5, 0.5)
    assert roc_auc_ci(y, probs[:, 1], n_boot=50) == (0.5, 0.5, 0.5)
    # three classes, constant up to noise: every one-vs-rest AUC is 0.5
    y3 = np.array([0, 1, 2, 0, 1, 2])
    p3 = np.tile([0.2, 0.3, 0.5], (6, 1)) + np.random.default_rng(0).normal(0, 1e-8, (6, 3))
    assert roc_auc(y3, p3) == 0.5 and roc_auc_ci(y3, p3, n_boot=20)[0] == 0.5
    # real differences (1e-4) still rank
    assert roc_auc(y, np.r_[np.zeros(4), np.ones(4)] * 1e-4 + 0.4) == 1.0


def test_pipeline_on_a_cohort_with_nothing_to_learn_reports_ties_and_no_gain(tmp_path, mlflow_store):
    from mlflow import MlflowClient

    root = tmp_path / "flat"
    load_make_data("histo").make_feature_cohort(root, n_slides=12, n_external=8, dim=8, tiles=(5, 40),
                                                constant_features=True)
    out_json = tmp_path / "m.json"
    res = CliRunner().invoke(command, [
        "--features", str(root / "train"), "--labels", str(root / "train" / "labels.csv"), "--target", "msi",
        "--external-features", str(root / "external"), "--external-labels", str(root / "external" / "labels.csv"),
        "--folds", "2", "--seeds", "1", "--max-epochs", "2", "--n-boot", "50", "--max-heatmaps", "0",
        "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    m = json.loads(out_json.read_text())
    assert m["external_auc_ensemble"] == 0.5 and m["external_auc_ensemble_ci"] == [0.5, 0.5]
    assert m["external_auc_oneshot"] == 0.5 and m["external_auc_oneshot_ci"] == [0.5, 0.5]
    assert m["ensemble_gain_auc"] is None
    # out of fold, each fold has its own models: their (different) constants are not one value
    assert m["constant_predictions"] == ["external ensemble", "external one-shot"]
    warnings_ = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert warnings_ == ["warning: external ensemble and external one-shot gave every "
                         "slide the same probability: the models learned nothing from these features (AUC 0.5 "
                         "by ties; no ensemble gain reported)"]
    run = MlflowClient().get_run(m["mlflow_run_id"])
    assert run.data.tags["histo.constant_predictions"] == "external ensemble, external one-shot"
    assert run.data.metrics["constant_predictions"] == 2
    assert "ensemble_gain_auc" not in run.data.metrics


@pytest.mark.fresh_store  # checks that no MLflow store file is made
def test_split_preconditions_are_checked_before_training(cohort_dir, tmp_path, mlflow_store):
    feats = cohort_dir / "train"
    # 4 patients of class 1 among 10: the default --folds 5 cannot put one in each validation fold
    few = write_labels(tmp_path / "few.csv", [(f"train_{i:03d}", f"p{i}", int(i < 4)) for i in range(10)])
    res = CliRunner().invoke(command, ["--features", str(feats), "--labels", str(few), "--target", "msi"])
    assert res.exit_code == 2
    assert res.output == (f"error: {few}: class 1 has 4 patient(s) (4 slide(s)) but --folds 5 needs at least 5, "
                          "one in each validation fold. Fix: use --folds 4 (the most this cohort allows), or add "
                          "patients of class 1.\n")
    # one patient of a class: no number of folds works
    one = write_labels(tmp_path / "one.csv", [(f"train_{i:03d}", f"p{i}", int(i == 0)) for i in range(6)])
    co = C.load_cohort(feats, one)
    with pytest.raises(DomainFMError, match=r"class 1 has 1 patient.*Fix: add patients of class 1: cross-validation "
                                            r"needs at least 2 patients per class"):
        C.patient_folds(co.labels, co.patient_ids, 2, 0, one, class_names=co.class_names)
    # an external cohort with a single class has no AUC: refused before training, with the fix
    ext = write_labels(tmp_path / "ext.csv", [(f"external_{i:03d}", f"q{i}", 0) for i in range(3)])
    res = CliRunner().invoke(command, ["--features", str(feats), "--labels", str(feats / "labels.csv"),
                                       "--target", "msi", "--folds", "3", "--external-features",
                                       str(cohort_dir / "external"), "--external-labels", str(ext)])
    assert res.exit_code == 2
    assert res.output == (f"error: {ext}: the external cohort has only class(es) 0 (none of 1): its AUC is "
                          "undefined. Fix: add external slides of class 1, or drop --external-features and "
                          "--external-labels.\n")
    assert not list(tmp_path.glob("mlruns")) and not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------- cross-validation outputs (issue 13, item 5)

def test_confidence_extremes_and_summary_by_hand():
    from plugins.histo.jobs import confidence_extremes
    from plugins.histo.slide_metrics import summary

    # confidence = the largest class probability: 0.9, 0.55, 0.8, 0.6, 0.95
    p = np.array([[0.1, 0.9], [0.55, 0.45], [0.2, 0.8], [0.6, 0.4], [0.95, 0.05]])
    most, least = confidence_extremes(p, 3)
    assert list(most) == [4, 0] and list(least) == [1]
    most, least = confidence_extremes(p, 10)  # more than the cohort: every slide once
    assert sorted(np.r_[most, least]) == [0, 1, 2, 3, 4]
    assert [len(x) for x in confidence_extremes(p, 0)] == [0, 0]
    s = summary({"cv_auc_ensemble": 0.81254, "cv_auc_ensemble_ci": [0.7, 0.9104], "n_members": 4,
                 "constant_predictions": [], "ensemble_gain_auc": None})
    assert s == {"cv_auc_ensemble": "0.8125 (95% CI 0.700-0.910)", "n_members": 4, "ensemble_gain_auc": None}


def test_cross_validation_without_external_saves_out_of_fold_predictions_and_heatmaps(cohort_dir, tmp_path,
                                                                                       mlflow_store):
    import mlflow
    from mlflow import MlflowClient
    from sklearn.metrics import roc_auc_score

    feats = cohort_dir / "train"
    out_json = tmp_path / "m.json"
    res = CliRunner().invoke(command, [
        "--features", str(feats), "--labels", str(feats / "labels.csv"), "--target", "msi", "--folds", "3",
        "--seeds", "2", "--max-epochs", "2", "--n-boot", "50", "--max-heatmaps", "3", "--max-tiles", "20",
        "--out", str(tmp_path / "out"), "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    m = json.loads(out_json.read_text())

    # one row per training slide, in the fold the patient split gave it, with its label
    rows = list(csv.DictReader(open(tmp_path / "out" / "tables" / "cv_predictions.csv")))
    labels = {r["slide_id"]: r for r in csv.DictReader(open(feats / "labels.csv"))}
    assert sorted(r["slide_id"] for r in rows) == sorted(labels)
    assert list(rows[0]) == ["slide_id", "patient_id", "fold", "label", "prob_0", "prob_1"]
    co = C.load_cohort(feats, feats / "labels.csv", "msi")
    folds = C.patient_folds(co.labels, co.patient_ids, 3, 0, feats / "labels.csv", class_names=co.class_names)
    fold_of = {co.slide_ids[i]: k for k, (_, va) in enumerate(folds) for i in va}
    for r in rows:
        assert int(r["fold"]) == fold_of[r["slide_id"]]
        assert r["label"] == labels[r["slide_id"]]["label"] and r["patient_id"] == labels[r["slide_id"]]["patient_id"]
        assert float(r["prob_0"]) + float(r["prob_1"]) == pytest.approx(1.0, abs=1e-5)
    # the reported CV AUC is the AUC of these probabilities (sklearn, independently)
    y = [int(r["label"]) for r in rows]
    p1 = [float(r["prob_1"]) for r in rows]
    assert roc_auc_score(y, p1) == pytest.approx(m["cv_auc_ensemble"])
    lo, hi = m["cv_auc_ensemble_ci"]
    assert lo <= m["cv_auc_ensemble"] <= hi

    # MLflow: the same CSV as an artifact, and as an MLflow table
    run_id = m["mlflow_run_id"]
    logged = mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=mlflow_store,
                                                 artifact_path="tables/cv_predictions.csv")
    assert list(csv.DictReader(open(logged))) == rows
    client = MlflowClient(tracking_uri=mlflow_store)
    table = client.load_table(client.get_run(run_id).info.experiment_id, "tables/cv_predictions.json", [run_id])
    assert list(table["slide_id"]) == [r["slide_id"] for r in rows]
    np.testing.assert_allclose(table["prob_1"].to_numpy(), p1, rtol=1e-6)

    # heatmaps of the 2 most and the 1 least confident slides (largest class probability)
    conf = np.array([max(float(r["prob_0"]), float(r["prob_1"])) for r in rows])
    order = np.argsort(-conf, kind="stable")  # rows are in cohort order: ties go to the first listed
    drawn = {Path(a.path).stem for a in client.list_artifacts(run_id, "heatmaps")}
    assert drawn == {rows[i]["slide_id"] for i in (order[0], order[1], order[-1])}
    assert {p.stem for p in (tmp_path / "out" / "heatmaps").glob("*.png")} == drawn

    # the printed summary carries the interval of the CV AUC
    assert f"{m['cv_auc_ensemble']:.4f} (95% CI {lo:.3f}-{hi:.3f})" in res.stderr
