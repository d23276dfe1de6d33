"""sports-reid end to end through the real CLI: fine-tuning beats zero-shot on held-out players,
evaluate reproduces the scores from the export, the registered model writes the challenge CSV,
and bad input is one line on stderr with exit status 2.

One error case runs ``domainfm`` in a subprocess, as a user's shell does; the other runs call the
same click command in-process (CliRunner), which saves the start-up (imports) of each."""

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

_spec = importlib.util.spec_from_file_location("sports_reid_make_data",
                                               Path(__file__).parent / "data" / "sports_reid" / "make_data.py")
make_data = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = make_data
_spec.loader.exec_module(make_data)

# a tiny timm CNN (0.4M parameters), random init, 32 px: a few seconds per dozen steps on a CPU
TRAIN_FLAGS = ["--backbone", "test_resnet", "--init", "random", "--img-size", "32", "--batch-size", "8",
               "--max-steps", "50", "--lr", "3e-3", "--warmup-steps", "5", "--checkpoint-every", "25", "--seed", "0"]


def _invoke(args, env):
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("reid_e2e")
    root = make_data.make_mmsports(work / "data", train_players=16, test_players=8, frames=6, challenge_players=4)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    return work, root, env


@pytest.fixture(scope="module")
def finetuned(workdir):
    work, root, env = workdir
    r = _invoke(["finetune", "--plugin", "sports-reid", "--data", str(root), *TRAIN_FLAGS,
                 "--out", str(work / "outputs"), "--register", "reid-test", "--json", str(work / "ft.json")], env)
    assert r.exit_code == 0, r.stderr[-3000:]
    return json.loads((work / "ft.json").read_text())


def test_finetuned_beats_zero_shot_on_held_out_players(finetuned, workdir):
    work, _, env = workdir
    for key in ("mAP", "rank1", "rank5", "mINP", "zero_shot_mAP", "zero_shot_rank1"):
        assert 0.0 <= finetuned[key] <= 1.0, key
    # test players (ids 1000+) never appear in training: the model learned to look at the jersey
    assert finetuned["mAP"] > finetuned["zero_shot_mAP"] + 0.1, finetuned
    assert finetuned["rank1"] >= finetuned["zero_shot_rank1"]
    assert finetuned["global_step"] == 50
    # checkpoints every 25 steps, the export with its logit scale, the registered version
    export = Path(finetuned["backbone_path"])
    ckpts = sorted(p.name for p in export.parent.joinpath("checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step000025.ckpt", "step000050.ckpt"]
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as f:
        meta = f.metadata()
    assert meta["domainfm_name"] == "test_resnet" and meta["reid_start_weights"] == "random"
    assert float(meta["reid_logit_scale"]) == pytest.approx(finetuned["logit_scale"], rel=1e-5)
    assert finetuned["registered_model"] == "models:/reid-test@candidate"

    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(finetuned["mlflow_run_id"])
    assert run.data.metrics["mAP"] == pytest.approx(finetuned["mAP"])
    assert run.data.metrics["zero_shot_mAP"] == pytest.approx(finetuned["zero_shot_mAP"])
    assert "train/loss" in run.data.metrics
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/retrieval_grid_finetuned.png" in plots
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "tables")}
    assert {"tables/top1_finetuned.csv", "tables/top1_zero_shot.csv"} <= tables
    version = client.get_model_version_by_alias("reid-test", "candidate")
    assert version.run_id == run.info.run_id


def test_evaluate_reproduces_the_finetune_scores(finetuned, workdir):
    work, root, env = workdir
    out = work / "eval.json"
    r = _invoke(["evaluate", "--plugin", "sports-reid", "--model", finetuned["backbone_path"], "--data", str(root),
                 "--batch-size", "8", "--json", str(out)], env)
    assert r.exit_code == 0, r.stderr[-3000:]
    ev = json.loads(out.read_text())
    # the reloaded export gives the fine-tuned numbers; --zero-shot auto rebuilds the seeded random start
    for key in ("mAP", "rank1", "rank5", "mINP", "zero_shot_mAP"):
        assert ev[key] == pytest.approx(finetuned[key], abs=1e-6), key
    assert ev["mlflow_run_id"] != finetuned["mlflow_run_id"]


def test_registered_model_writes_the_challenge_submission_with_reranking(finetuned, workdir):
    work, root, env = workdir
    sub = work / "submission.csv"
    r = _invoke(["evaluate", "--plugin", "sports-reid", "--model", "models:/reid-test@candidate", "--data", str(root),
                 "--split", "challenge", "--submission", str(sub), "--rerank", "--distance", "euclidean",
                 "--json", str(work / "challenge.json")], env)
    assert r.exit_code == 0, r.stderr[-3000:]
    rows = list(csv.reader(sub.open()))
    gallery_ids = sorted(int(p.stem) for p in (root / "reid_challenge" / "gallery").glob("*.jpeg"))
    query_ids = sorted(int(p.stem) for p in (root / "reid_challenge" / "query").glob("*.jpeg"))
    assert rows[0] == [""] + [str(i) for i in gallery_ids]
    assert [int(row[0]) for row in rows[1:]] == query_ids
    dist = np.array([row[1:] for row in rows[1:]], dtype=float)
    assert dist.shape == (4, 20) and np.isfinite(dist).all() and (dist >= 0).all()
    info = json.loads((work / "challenge.json").read_text())
    assert info["num_queries"] == 4 and info["num_gallery"] == 20 and Path(info["submission"]) == sub.resolve()


def test_bad_training_name_isassert_one_line_error(workdir, tmp_path):
    _, _, env = workdir
    root = make_data.make_mmsports(tmp_path / "d", train_players=2, test_players=2, frames=2, challenge_players=1)
    bad = root / "reid_training" / "goalkeeper.jpeg"
    (root / "reid_training" / "0_0_0.jpeg").rename(bad)
    r = run_cli(["finetune", "--plugin", "sports-reid", "--data", str(root), *TRAIN_FLAGS], cwd=tmp_path, env=env)
    assert_one_line_error(r, str(bad), "<player_id>_<sequence>_<frame>.jpeg", "Fix: rename it")


def test_evaluate_input_errors(workdir, finetuned, tmp_path):
    work, root, env = workdir
    model = finetuned["backbone_path"]
    base = ["evaluate", "--plugin", "sports-reid"]
    assert_one_line_error(_invoke(base + ["--model", model, "--data", str(root), "--split", "challenge"], env),
                    "--submission PATH is missing")
    assert_one_line_error(_invoke(base + ["--model", model], env), "sports-reid needs --data ROOT")
    assert_one_line_error(_invoke(base + ["--data", str(root)], env), "evaluate needs --model")
    assert_one_line_error(_invoke(base + ["--model", str(tmp_path / "nope.safetensors"), "--data", str(root)], env),
                    "nope.safetensors: model file not found")
    # a query whose player has no gallery crop
    bad = make_data.make_mmsports(tmp_path / "d", train_players=2, test_players=2, frames=2, challenge_players=1)
    gallery = bad / "reid_test" / "gallery"
    for p in gallery.glob("1001_*"):
        p.unlink()
    assert_one_line_error(_invoke(base + ["--model", model, "--data", str(bad)], env),
                    "1001_500_0.jpeg: query player 1001 has no crop in the gallery")


def test_resume_continues_from_the_last_checkpoint(finetuned, workdir):
    work, root, env = workdir
    flags = [f if f != "50" else "56" for f in TRAIN_FLAGS]  # --max-steps 50 -> 56
    out = work / "resumed.json"
    r = _invoke(["finetune", "--plugin", "sports-reid", "--data", str(root), *flags, "--out",
                 str(work / "outputs"), "--resume", "--json", str(out)], env)
    assert r.exit_code == 0, r.stderr[-3000:]
    resumed = json.loads(out.read_text())
    assert resumed["global_step"] == 56
    assert resumed["zero_shot_mAP"] is None  # the starting weights are not those of this run
    assert 0.0 <= resumed["mAP"] <= 1.0
    import mlflow

    # 50 steps restored, 6 trained: the new run logged the loss of steps 50..55 only
    history = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(resumed["mlflow_run_id"],
                                                                                  "train/loss")
    assert sorted(m.step for m in history) == list(range(50, 56))


def _all_run_ids(uri):
    import mlflow

    client = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_id for r in client.search_runs(ids, max_results=10000)} if ids else set()


def test_bad_flags_fail_in_the_plugin_check_before_any_mlflow_run(workdir, finetuned, tmp_path):
    """Plugin.check refuses what the run would only find out later (after scoring or training):
    no run is opened in the store for any of these."""
    work, root, env = workdir
    model = finetuned["backbone_path"]
    before = _all_run_ids(env["MLFLOW_TRACKING_URI"])
    ev = ["evaluate", "--plugin", "sports-reid", "--model", model, "--data", str(root)]
    # token merging needs a ViT: the test model is a ResNet
    assert_one_line_error(_invoke(ev + ["--tome-r", "2"], env), "--tome-r", "ViT")
    # fp16 autocast exists on CUDA only
    assert_one_line_error(_invoke(ev + ["--accelerator", "cpu", "--precision", "16-mixed"], env),
                    "--precision 16-mixed needs a GPU")
    assert_one_line_error(_invoke(ev + ["--zero-shot", str(tmp_path / "start.safetensors")], env),
                    "start.safetensors: --zero-shot weights file not found")
    # re-ranking with k1=20 needs 21 crops in query + gallery: 2 players x 2 frames have 4 (2 + 2)
    small = make_data.make_mmsports(tmp_path / "small", train_players=2, test_players=2, frames=2, challenge_players=1)
    n_test = sum(1 for _ in (small / "reid_test").rglob("*.jpeg"))
    line = assert_one_line_error(_invoke(ev[:-1] + [str(small), "--rerank"], env),
                           f"needs more than 20 images in query + gallery, got {n_test}", "--no-rerank")
    assert line.startswith(f"error: {small}: ")
    # fine-tuning learns that before training, not after it
    assert_one_line_error(_invoke(["finetune", "--plugin", "sports-reid", "--data", str(small), "--rerank", *TRAIN_FLAGS,
                             "--out", str(tmp_path / "out")], env), "got {}".format(n_test))
    assert not (tmp_path / "out").exists()
    assert _all_run_ids(env["MLFLOW_TRACKING_URI"]) == before
