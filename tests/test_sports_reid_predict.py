"""sports-reid's self-describing model and ``domainfm predict`` end to end: a real fine-tuning run
registers a model in a real sqlite MLflow store, ``registry promote`` moves an alias, and
``domainfm predict --model models:/NAME@ALIAS QUERY --gallery DIR`` ranks the gallery as an
independent computation does (the exported backbone built by the core factory, cosine distances in
numpy), with the evaluation's mAP; bad input is one line and exit status 2."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_one_line_error, run_cli

from domainfm.cli import main
from domainfm.errors import DomainFMError

_spec = importlib.util.spec_from_file_location("sports_reid_make_data_predict",
                                               Path(__file__).parent / "data" / "sports_reid" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = make_data
_spec.loader.exec_module(make_data)

# the tiny timm CNN of the other sports-reid tests, random init, 32 px, a few steps
TRAIN_FLAGS = ["--backbone", "test_resnet", "--init", "random", "--img-size", "32", "--batch-size", "6",
               "--max-steps", "12", "--lr", "3e-3", "--warmup-steps", "2", "--seed", "0"]
NAME = "reid-predict"


def _invoke(args, env):
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """data, a fine-tuned model registered as NAME (version 1, @candidate) and promoted to @champion."""
    work = tmp_path_factory.mktemp("reid_predict")
    root = make_data.make_mmsports(work / "data", train_players=8, test_players=6, frames=5, challenge_players=2)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    r = _invoke(["finetune", "--plugin", "sports-reid", "--data", str(root), *TRAIN_FLAGS,
                 "--out", str(work / "outputs"), "--register", NAME, "--json", str(work / "ft.json")], env)
    assert r.exit_code == 0, r.stderr[-3000:]
    r = _invoke(["registry", "promote", NAME, "1", "--alias", "champion"], env)
    assert r.exit_code == 0, r.stderr[-3000:]
    return work, root, env, json.loads((work / "ft.json").read_text())


@pytest.fixture(scope="module")
def predicted(registered):
    work, root, env, _ = registered
    out = work / "pred"
    r = run_cli(["predict", "--model", f"models:/{NAME}@champion", str(root / "reid_test" / "query"),
                 "--gallery", str(root / "reid_test" / "gallery"), "--out", str(out), "--top-k", "4",
                 "--json", str(work / "pred.json")], env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((work / "pred.json").read_text())


def _registered_file(env) -> Path:
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}@champion"))
    return local


def test_registered_model_records_what_it_takes(registered):
    import mlflow
    import yaml

    from domainfm.backbones import input_normalization, read_metadata
    from domainfm.backbones.meta import InputSpec  # noqa: F401 - the core's own keys stay unused here

    work, _, env, ft = registered
    local = _registered_file(env)
    meta = read_metadata(next(local.rglob("backbone.safetensors")))
    mean, std = input_normalization("test_resnet")
    assert meta["plugin"] == "sports-reid" and meta["domainfm_name"] == "test_resnet"
    assert json.loads(meta["reid_input_size"]) == [32, 32]
    assert json.loads(meta["reid_mean"]) == pytest.approx(list(mean)) and json.loads(meta["reid_std"]) == pytest.approx(list(std))
    assert meta["reid_channels"] == "RGB" and meta["reid_pixel_scale"] == "0..1" and meta["reid_distance"] == "cosine"
    assert int(meta["embed_dim"]) > 0
    # the export beside the run records the same
    exported = read_metadata(ft["backbone_path"])
    for key in ("plugin", "reid_input_size", "reid_mean", "reid_std", "embed_dim", "domainfm_name"):
        assert exported[key] == meta[key], key
    # MLflow model metadata and the run tag name the plugin
    doc = yaml.safe_load((local / "MLmodel").read_text())
    assert doc["metadata"]["domainfm.plugin"] == "sports-reid"
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(ft["mlflow_run_id"]).data.tags["domainfm.plugin"] == "sports-reid"


def _independent(ft, root: Path):
    """Features of the exported backbone (core factory), flip TTA by hand, cosine distances in numpy."""
    import torch

    from domainfm.backbones import create_backbone, read_metadata
    from plugins.sports_reid.datasets import read_crop

    meta = read_metadata(ft["backbone_path"])
    backbone = create_backbone(ft["backbone_path"]).eval()
    size = json.loads(meta["reid_input_size"])[0]
    mean = np.array(json.loads(meta["reid_mean"]), np.float32)[:, None, None]
    std = np.array(json.loads(meta["reid_std"]), np.float32)[:, None, None]

    def feats(files):
        x = np.stack([(read_crop(f, size) - mean) / std for f in files]).astype(np.float32)
        with torch.no_grad():
            a = backbone(torch.from_numpy(x)).numpy()
            b = backbone(torch.from_numpy(np.ascontiguousarray(x[..., ::-1]))).numpy()
        return (a + b) / 2

    q_files = sorted((root / "reid_test" / "query").glob("*.jpeg"))
    g_files = sorted((root / "reid_test" / "gallery").glob("*.jpeg"))
    q, g = feats(q_files), feats(g_files)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return q_files, g_files, 1.0 - q @ g.T


def test_predict_ranks_the_gallery_as_an_independent_computation(registered, predicted):
    work, root, env, ft = registered
    out, summary = predicted
    q_files, g_files, dist = _independent(ft, root)
    rows = list(csv.DictReader((out / "ranking.csv").open()))
    assert list(rows[0]) == ["query", "rank", "gallery", "distance", "query_id", "gallery_id"]
    assert len(rows) == len(q_files) * 4
    for qi, qf in enumerate(q_files):
        mine = [r for r in rows if r["query"] == str(qf)]
        assert [int(r["rank"]) for r in mine] == [1, 2, 3, 4]
        order = np.argsort(dist[qi], kind="stable")[:4]
        assert [r["gallery"] for r in mine] == [g_files[i].name for i in order]
        assert [float(r["distance"]) for r in mine] == pytest.approx(dist[qi, order], abs=1e-5)
        # the player id comes from the name <player_id>_<sequence>_<frame>
        assert {r["query_id"] for r in mine} == {qf.stem.split("_")[0]}
        assert [r["gallery_id"] for r in mine] == [g_files[i].stem.split("_")[0] for i in order]
    assert summary["num_queries"] == len(q_files) and summary["num_gallery"] == len(g_files)


def test_predict_map_is_the_evaluation_map(registered, predicted):
    import torch  # noqa: F401

    from domainfm.backbones import create_backbone
    from domainfm.metrics import retrieval_metrics
    from plugins.sports_reid.retrieval import EvalSettings, run_retrieval

    work, root, env, ft = registered
    _, summary = predicted
    backbone = create_backbone(ft["backbone_path"])
    result = run_retrieval(backbone, root, "test", EvalSettings(), img_size=32, mean=backbone.normalization[0],
                           std=backbone.normalization[1])
    assert summary["mAP"] == pytest.approx(result.metrics["mAP"], abs=1e-6)
    assert summary["rank1"] == pytest.approx(result.metrics["cmc"][0], abs=1e-6)
    assert summary["mAP"] == pytest.approx(ft["mAP"], abs=1e-6)  # what fine-tuning reported for this model
    q_files, g_files, dist = _independent(ft, root)
    ref = retrieval_metrics(dist, [f.stem.split("_")[0] for f in q_files], [f.stem.split("_")[0] for f in g_files])
    assert summary["mAP"] == pytest.approx(ref["mAP"], abs=1e-5)


def test_predict_run_is_tagged_with_the_model_version_and_holds_the_files(registered, predicted):
    import mlflow

    work, _, env, _ = registered
    out, summary = predicted
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["domainfm.model_version"] == f"{NAME}/1"
    assert run.data.tags["domainfm.plugin"] == "sports-reid"
    assert run.data.metrics["mAP"] == pytest.approx(summary["mAP"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "predictions")}
    assert logged == {"predictions/ranking.csv", "predictions/retrieval_grid.png"}
    assert sorted(Path(f).name for f in summary["files"]) == ["ranking.csv", "retrieval_grid.png"]


def test_unknown_ids_give_a_ranking_without_metrics(registered, tmp_path):
    """Challenge crops are anonymous: a ranking, no mAP; single files work as queries."""
    work, root, env, _ = registered
    queries = sorted((root / "reid_challenge" / "query").glob("*.jpeg"))
    r = _invoke(["predict", "--model", f"models:/{NAME}@champion", *map(str, queries), "--gallery",
                 str(root / "reid_challenge" / "gallery"), "--out", str(tmp_path / "o"), "--no-flip-tta",
                 "--json", str(tmp_path / "s.json")], env)
    assert r.exit_code == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    n_gallery = len(list((root / "reid_challenge" / "gallery").glob("*.jpeg")))
    assert "mAP" not in summary and summary["num_queries"] == len(queries) and summary["top_k"] == min(10, n_gallery)
    rows = list(csv.DictReader((tmp_path / "o" / "ranking.csv").open()))
    assert len(rows) == min(10, n_gallery) * len(queries) and all(r["query_id"] == "" and r["gallery_id"] == "" for r in rows)


def test_empty_gallery_and_a_crop_that_is_not_an_image_are_one_line(registered, tmp_path):
    work, root, env, _ = registered
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(["predict", "--model", f"models:/{NAME}@champion", str(root / "reid_test" / "query"),
                 "--gallery", str(empty), "--out", str(tmp_path / "o1")], env=env, timeout=300)
    assert_one_line_error(r, str(empty), "no gallery crops")
    bad = tmp_path / "q" / "7_1_0.jpeg"
    bad.parent.mkdir()
    bad.write_text("not an image")
    r = _invoke(["predict", "--model", f"models:/{NAME}@champion", str(bad.parent),
                 "--gallery", str(root / "reid_test" / "gallery"), "--out", str(tmp_path / "o2")], env)
    assert_one_line_error(r, str(bad))
    assert not (tmp_path / "o2" / "ranking.csv").exists()
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    r = _invoke(["predict", "--model", f"models:/{NAME}@champion", str(txt),
                 "--gallery", str(root / "reid_test" / "gallery"), "--out", str(tmp_path / "o3")], env)
    assert_one_line_error(r, str(txt), "is not a crop image")
    r = _invoke(["predict", "--model", f"models:/{NAME}@champion", str(root / "reid_challenge" / "query"),
                 "--gallery", str(root / "reid_challenge" / "gallery"), "--out", str(tmp_path / "o4"), "--rerank"], env)
    assert_one_line_error(r, "re-ranking with k1=20 needs more than 20 images")


# ---------------------------------------------------------------- the loader refuses a disagreeing model

def _export(tmp_path, name: str, *, in_chans: int = 3, **meta) -> Path:
    from domainfm.backbones import create_backbone, save_backbone

    backbone = create_backbone("test_resnet", in_chans=in_chans, img_size=32, init="random")
    return save_backbone(backbone, tmp_path / name, extra_meta={k: str(v) for k, v in meta.items()})


def test_loader_names_the_setting_that_differs(tmp_path):
    from plugins.sports_reid.model import load_reid_model

    cases = [
        (_export(tmp_path, "eo.safetensors", in_chans=13), "in_chans = 13"),
        (_export(tmp_path, "other.safetensors", plugin="eo-sar"), "plugin = eo-sar"),
        (_export(tmp_path, "size.safetensors", plugin="sports-reid", reid_input_size="[64, 64]"),
         "reid_input_size"),
        (_export(tmp_path, "bgr.safetensors", plugin="sports-reid", reid_channels="BGR"), "reid_channels"),
        (_export(tmp_path, "scale.safetensors", plugin="sports-reid", reid_pixel_scale="0..255"),
         "reid_pixel_scale"),
        (_export(tmp_path, "dim.safetensors", plugin="sports-reid", embed_dim=7), "embed_dim"),
    ]
    for path, phrase in cases:
        with pytest.raises(DomainFMError) as e:
            load_reid_model(path)
        assert phrase in str(e.value) and "\n" not in str(e.value), (path.name, str(e.value))


def test_loader_falls_back_to_the_architecture_for_an_older_export(tmp_path):
    from domainfm.backbones import input_normalization
    from plugins.sports_reid.model import load_reid_model

    backbone, spec = load_reid_model(_export(tmp_path, "old.safetensors"))
    assert spec.input_size == (32, 32) and spec.embed_dim == backbone.embed_dim
    assert (spec.mean, spec.std) == input_normalization("test_resnet")


def test_a_foreign_model_through_predict_is_one_line(tmp_path):
    path = _export(tmp_path, "eo.safetensors", in_chans=13)
    root = make_data.make_generic(tmp_path / "g", train_players=2, test_players=2, frames=3)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    r = _invoke(["predict", "--model", str(path), "--plugin", "sports-reid", str(root / "query"),
                 "--gallery", str(root / "gallery"), "--out", str(tmp_path / "o")], env)
    assert_one_line_error(r, "in_chans = 13", "re-id crops are RGB")


# ---------------------------------------------------------------- the crop reader

def test_read_crops_reads_every_layout(tmp_path):
    from plugins.sports_reid.layout import read_crops

    root = make_data.make_generic(tmp_path / "g", train_players=2, test_players=2, frames=3)
    generic = read_crops([root / "query"])
    assert [(r.pid, r.camera) for r in generic] == [("player50", 1), ("player51", 1)]
    assert generic[0].item_id == "player50/c1_f000"
    mm = make_data.make_mmsports(tmp_path / "m", train_players=2, test_players=2, frames=2, challenge_players=1)
    flat = read_crops([mm / "reid_test" / "query", mm / "reid_challenge" / "query" / "0.jpeg"])
    assert [r.pid for r in flat] == ["1000", "1001", ""]
    (root / "query" / "stray.jpg").write_bytes((root / "query" / "player50" / "c1_f000.jpg").read_bytes())
    with pytest.raises(DomainFMError, match="both crops and player sub-folders"):
        read_crops([root / "query"])
    with pytest.raises(DomainFMError, match="query path not found"):
        read_crops([tmp_path / "nope"])


def test_flags_follow_the_vocabulary():
    """No spelling outside the one flag vocabulary among sports-reid's flags (COMMON: --max-epochs,
    --out, --model only for a trained model, --weights only for training's start)."""
    from plugins.sports_reid.commands import options

    banned = {"--epochs", "--output-dir", "--out-dir", "--max-tiles-per-slide", "--slides", "--weights", "--model"}
    for command in ("finetune", "evaluate", "predict"):
        flags = {f for o in options(command) for f in o.opts + o.secondary_opts}
        assert not flags & banned, (command, flags & banned)
