"""Self-describing slide models and ``domainfm predict`` on whole slides (issue 13, items 1, 2, 6).

Real pyramidal TIFFs through OpenSlide, a real sqlite MLflow store and registry: the pipeline trains
and registers an ensemble from slides (a random-initialised timm encoder, shipped with the model),
the version is promoted, and ``domainfm predict`` applies it to two new slides. The CSV is checked
against an independent path: ``histo embed`` with the same settings, then the pyfunc model.
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

from conftest import load_make_data, run_cli

ENCODER = ["--backbone", "test_resnet", "--init", "random"]


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _labels(path: Path, rows) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "label"])
        w.writerows(rows)
    return path


@pytest.fixture
def registered(tmp_path, mlflow_store):
    """8 training slides -> pipeline --register (alias candidate) -> promoted to champion."""
    from domainfm.cli import main
    from pipelines.slide_biomarker import command

    md = load_make_data("histo")
    (tmp_path / "train").mkdir()
    for i in range(8):
        md.write_generic_tiff(tmp_path / "train" / f"t{i}.tif", mpp=2.0, seed=i, tile=64)
    labels = _labels(tmp_path / "train.csv", [(f"t{i}", f"p{i}", i % 2) for i in range(8)])
    out_json = tmp_path / "m.json"
    res = CliRunner().invoke(command, [
        str(tmp_path / "train"), "--features", str(tmp_path / "feat"), "--labels", str(labels), "--target", "her2",
        *ENCODER, "--mpp", "8", "--tile-size", "16", "--min-tissue", "0.5", "--num-workers", "0", "--folds", "2",
        "--seeds", "2", "--max-epochs", "2", "--n-boot", "20", "--max-heatmaps", "0", "--register", "histo-her2",
        "--out", str(tmp_path / "out"), "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["registry", "promote", "histo-her2", "1", "--alias", "champion"])
    assert res.exit_code == 0, res.output
    return json.loads(out_json.read_text())


@pytest.mark.timeout(900)
def test_registered_model_records_its_recipe_and_predict_equals_embed_then_pyfunc(tmp_path, registered, mlflow_store):
    import mlflow
    import yaml
    from mlflow import MlflowClient
    from PIL import Image

    from plugins.histo.commands import embed_command, heatmap_command

    md = load_make_data("histo")
    new = tmp_path / "new"
    new.mkdir()
    # one scanned at 2 µm/px, one at 1 µm/px: the model's 8 µm/px tiles are read from different levels
    s1 = md.write_generic_tiff(new / "n1.tif", mpp=2.0, seed=11, tile=64)
    s2 = md.write_generic_tiff(new / "n2.tif", mpp=1.0, seed=12, tile=64)

    # ---- the model records how its features were made, and names its plugin
    client = MlflowClient(tracking_uri=mlflow_store)
    mv = client.get_model_version_by_alias("histo-her2", "champion")
    assert client.get_run(registered["mlflow_run_id"]).data.tags["domainfm.plugin"] == "histo"
    # the registry's lineage: the version names its plugin and the run that trained it
    assert mv.tags["domainfm.plugin"] == "histo"
    assert mv.tags["domainfm.training_run"] == registered["mlflow_run_id"]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/histo-her2@champion",
                                                     tracking_uri=mlflow_store))
    assert yaml.safe_load((local / "MLmodel").read_text())["metadata"] == {"domainfm.plugin": "histo"}
    config = json.loads(next(local.rglob("config.json")).read_text())
    rec = config["features"]
    with h5py.File(tmp_path / "feat" / "features" / "t0.h5") as f:
        train_sha, train_dim = f.attrs["encoder_sha256"], f["features"].shape[1]
    assert (rec["mpp"], rec["tile_size"], rec["min_tissue"], rec["max_tiles"], rec["feature_dim"]) == (8.0, 16, 0.5, 0,
                                                                                                     train_dim)
    assert rec["encoder"]["source"] == "timm" and rec["encoder"]["backbone"] == "test_resnet"
    assert rec["encoder"]["init"] == "random" and rec["encoder"]["sha256"] == train_sha
    assert rec["class_names"] == ["0", "1"] and rec["target"] == "her2"
    assert next(local.rglob("encoder.safetensors")).is_file()  # random weights travel with the model

    # ---- domainfm predict, as a user runs it
    out = tmp_path / "pred"
    r = run_cli(["predict", "--model", "models:/histo-her2@champion", str(s1), str(s2), "--out", str(out),
                 "--num-workers", "0", "--json", str(tmp_path / "p.json")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r_["slide_id"] for r_ in rows] == ["n1", "n2"]
    assert list(rows[0]) == ["slide_id", "slide", "prob_0", "prob_1", "spread", "n_tiles", "predicted"]

    # ---- the independent path: histo embed with the recorded settings, then the pyfunc model
    res = CliRunner().invoke(embed_command, [str(s1), str(s2), "--out", str(tmp_path / "emb"), *ENCODER, "--mpp", "8",
                                             "--tile-size", "16", "--min-tissue", "0.5", "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    mlflow.set_tracking_uri(mlflow_store)
    pyfunc = mlflow.pyfunc.load_model("models:/histo-her2@champion")
    spreads = []
    for row in rows:
        with h5py.File(tmp_path / "emb" / "features" / f"{row['slide_id']}.h5") as f:
            feats = f["features"][:]
            assert f.attrs["encoder_sha256"] == train_sha
        o = pyfunc.predict(feats)
        assert [float(row["prob_0"]), float(row["prob_1"])] == pytest.approx(o["probabilities"], abs=1e-6)
        members = np.asarray(o["member_probabilities"])
        assert members.shape == (4, 2)  # 2 folds x 2 seeds
        k = int(np.argmax(o["probabilities"]))
        assert row["predicted"] == ["0", "1"][k]
        assert float(row["spread"]) == pytest.approx(float(np.std(members[:, k])), abs=1e-6)
        assert float(row["spread"]) >= 0
        spreads.append(float(row["spread"]))
        assert int(row["n_tiles"]) == len(feats) > 0
        png = out / "heatmaps" / f"{row['slide_id']}.png"
        with Image.open(png) as im:
            im.load()
            assert im.size[0] > 10 and im.mode == "RGB"
    assert max(spreads) > 0  # four differently seeded members do not agree exactly
    assert sorted(p.name for p in (out / "heatmaps").glob("*.png")) == ["n1.png", "n2.png"]

    # ---- one MLflow run, tagged with the version it applied, with the files
    summary = json.loads((tmp_path / "p.json").read_text())
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["domainfm.model_version"] == f"histo-her2/{mv.version}"
    assert run.data.tags["domainfm.plugin"] == "histo" and run.data.tags["domainfm.command"] == "predict"
    assert run.data.metrics["slides"] == 2
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"predictions.csv", "heatmaps"}
    assert len(client.list_artifacts(run.info.run_id, "heatmaps")) == 2

    # ---- features made another way: heatmap refuses in one line naming the setting, exit 2
    res = CliRunner().invoke(embed_command, [str(s1), "--out", str(tmp_path / "other"), *ENCODER, "--mpp", "8",
                                             "--tile-size", "32", "--min-tissue", "0.5", "--num-workers", "0"])
    assert res.exit_code == 0, res.output
    bad = tmp_path / "other" / "features" / "n1.h5"
    res = CliRunner().invoke(heatmap_command, [str(s1), "--features", str(bad), "--model",
                                               "models:/histo-her2@champion", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2
    assert res.output.startswith(f"error: {bad}: made with 32 px tiles, the model expects 16 px tiles. Fix: "
                                 "re-embed the slide with `domainfm histo embed --backbone test_resnet --init random "
                                 "--mpp 8 --tile-size 16 --min-tissue 0.5`")
    assert res.output.count("\n") == 1 and not (tmp_path / "x.png").exists()
    # the right features draw, with the probability predict wrote
    good = tmp_path / "emb" / "features" / "n1.h5"
    res = CliRunner().invoke(heatmap_command, [str(s1), "--features", str(good), "--model",
                                               "models:/histo-her2@champion", "--out", str(tmp_path / "ok.png")])
    assert res.exit_code == 0, res.output
    assert res.output.split()[1] == f"{float(rows[0]['prob_1']):.3f}"


def test_an_encoder_whose_weights_differ_from_the_record_is_refused(tmp_path):
    """The sha256 the features recorded must be the rebuilt encoder's: one line, before any slide."""
    from domainfm.errors import DomainFMError
    from plugins.histo import embedding

    slide = load_make_data("histo").write_generic_tiff(tmp_path / "s.tif", mpp=2.0, seed=1, tile=64)
    s = embedding.EmbedSettings(out_dir=str(tmp_path / "o"), backbone="test_resnet", init="random", mpp=8,
                                tile_size=16, num_workers=0, progress=False, expect_sha256="0" * 64,
                                expect_source="models:/m@a")
    with pytest.raises(DomainFMError, match=r"the encoder built from test_resnet \(init=random\) has weights sha256 "
                                            r"\w{12}\.\.\., models:/m@a was trained on features of 000000000000"):
        embedding.embed_slides([slide], s)
    assert not (tmp_path / "o" / "features").exists()
    # the same settings without the expectation embed, and the file records the sha256 of the weights
    s.expect_sha256 = None
    embedding.embed_slides([slide], s)
    torch.manual_seed(0)
    with h5py.File(tmp_path / "o" / "features" / "s.h5") as f:
        rec = json.loads(f.attrs["encoder_record"])
        assert f.attrs["encoder_sha256"] == rec["sha256"] == embedding.state_sha256(embedding.build_encoder(s).model)
        assert (f.attrs["min_tissue"], f.attrs["max_tiles"], f.attrs["seed"]) == (0.6, 0, 0)
        assert rec["source"] == "timm" and f.attrs["feature_dim"] == f["features"].shape[1]


def test_old_spellings_still_work_with_one_notice(capsys):
    from pipelines.slide_biomarker import command
    from plugins.histo.commands import embed_command

    ctx = command.make_context("slide-biomarker", [
        "--slides", "a", "b", "--features", "f", "--labels", "l.csv", "--target", "t", "--epochs", "3",
        "--max-tiles-per-slide", "7", "--model", "chowder", "--weights", "e.safetensors"])
    p = ctx.params
    assert p["slides"] == ("a", "b") and p["epochs"] == 3 and p["max_tiles_per_slide"] == 7
    assert p["model_name"] == "chowder" and p["encoder"] == "e.safetensors"
    notes = capsys.readouterr().err.splitlines()
    assert notes == [f"note: {old} is now {new}; the old spelling still works for now" for old, new in (
        ("--slides", "positional"), ("--epochs", "--max-epochs"), ("--max-tiles-per-slide", "--max-tiles"),
        ("--model", "--mil"), ("--weights", "--encoder"))]
    ctx = embed_command.make_context("embed", ["s.svs", "--out", "o", "--weights", "w.safetensors"])
    assert ctx.params["weights"] == "w.safetensors"
    assert capsys.readouterr().err == "note: --weights is now --model; the old spelling still works for now\n"
    helps = command.get_help(ctx) + embed_command.get_help(ctx)
    for gone in ("--slides", "--epochs", "--max-tiles-per-slide", "--weights"):
        assert gone not in helps
