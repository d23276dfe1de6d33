"""A registry that tells the story (issue 13 item 4): a version knows its plugin, training run and
data; an evaluation of it writes its metrics onto it; `registry list` and `registry show` print
that lineage. A real sqlite MLflow store, a small random ViT, a small Plugin subclass."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from domainfm.backbones import create_backbone
from domainfm.plugins import Plugin


class ScorePlugin(Plugin):
    name = "scorer"
    description = "test plugin"

    def __init__(self, accuracy: float):
        self.accuracy = accuracy

    def evaluate(self, cfg):
        return {"accuracy": self.accuracy, "num_samples": 8, "note": "text is not a metric"}

    def predict(self, model, inputs, out, options):
        return {"num_inputs": len(inputs)}


def _files(root, sizes):
    for rel, n in sizes.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * n)
        os.utime(p, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000 + n))


def test_data_fingerprint_is_sha256_of_sorted_paths_sizes_and_mtimes(tmp_path):
    from domainfm.data import data_fingerprint

    root = tmp_path / "data"
    _files(root, {"b/x.tif": 7, "a.csv": 3, ".hidden/skip": 1})
    expected = hashlib.sha256(b"a.csv\x003\x001700000000000000003\n"
                              b"b/x.tif\x007\x001700000000000000007\n").hexdigest()
    assert data_fingerprint(root) == f"sha256:{expected}"
    (root / "b" / "x.tif").write_bytes(b"\0" * 8)  # a rewritten file changes it
    assert data_fingerprint(root) != f"sha256:{expected}"


@pytest.mark.timeout(900)
def test_registry_list_and_show_tell_the_story(mlflow_store, tmp_path):
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from domainfm import jobs, tracking
    from domainfm.cli import main
    from domainfm.config import RunConfig
    from domainfm.data import data_fingerprint
    from domainfm.predict import resolve_model

    data = tmp_path / "scenes"
    _files(data, {"s1.tif": 10, "s2.tif": 20})
    fp = data_fingerprint(data)
    plugin = ScorePlugin(0.5)
    train_cfg = RunConfig(plugin="scorer", data=str(data), experiment="story", run_name="train-story",
                          backbone="test_vit", register="story-bb")
    train_cfg.command = "pretrain"
    torch.manual_seed(0)
    b = create_backbone("test_vit", in_chans=3, img_size=32, init="random")
    with tracking.start_run(train_cfg) as run:
        tracking.set_tags({"domainfm.plugin": "scorer", "domainfm.command": "pretrain",
                           **jobs.data_tags(train_cfg, plugin)})
        tracking.log_config(train_cfg)
        jobs.export_and_register(b, tmp_path / "bb.safetensors", register="story-bb", alias="champion")
    train_id = run.info.run_id
    mv = tracking.model_version("models:/story-bb@champion")
    assert mv.tags["domainfm.data_root"] == str(data.resolve()) and mv.tags["domainfm.data_fingerprint"] == fp
    assert mv.tags["domainfm.training_run"] == train_id and mv.tags["domainfm.plugin"] == "scorer"

    # two evaluations of the version: the version keeps the latest one's metrics
    for acc in (0.5, 0.875):
        cfg = RunConfig(plugin="scorer", model="models:/story-bb@champion", experiment="story-eval")
        cfg.command = "evaluate"
        metrics = jobs.run_plugin_job(cfg, ScorePlugin(acc), ScorePlugin(acc).evaluate)
    eval_id = metrics["mlflow_run_id"]
    eval_run = MlflowClient().get_run(eval_id)
    assert eval_run.data.tags["domainfm.model_uri"] == "models:/story-bb@champion"
    assert eval_run.data.tags["domainfm.model_version"] == "story-bb/1"
    tags = tracking.model_version("models:/story-bb/1").tags
    assert {k: v for k, v in tags.items() if k.startswith("metric.")} == {
        "metric.accuracy": "0.875", "metric.num_samples": "8", "metric.run_id": eval_id}
    # and a prediction run of it, in another experiment
    pred = jobs.run_prediction(resolve_model("models:/story-bb@champion"), ["a", "b", "c"], tmp_path / "p", plugin, {})

    runner = CliRunner()
    r = runner.invoke(main, ["registry", "list"], terminal_width=250)
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if "story-bb" in line)
    for part in ("champion", train_id, "scorer", fp[:19], "accuracy=0.875"):
        assert part in row, (part, r.output)
    assert "num_samples" not in row  # a count is not a headline score (`registry show` has it)

    r = runner.invoke(main, ["registry", "show", "story-bb@champion"])
    assert r.exit_code == 0, r.output
    out = r.output
    assert out.splitlines()[0] == "models:/story-bb/1  aliases: @champion"
    assert f"training run: train-story ({train_id}) pretrain" in out
    assert "backbone: test_vit  start weights: dinov2" in out  # the run's --init
    assert f"data: {data.resolve()}  fingerprint: {fp}" in out
    assert f"latest metrics: accuracy=0.875, num_samples=8 (run {eval_id})" in out
    assert "evaluations and predictions (3):" in out
    assert f"predict predict-scorer-story-bb@champion ({pred['mlflow_run_id']}): num_inputs=3" in out
    assert f"({eval_id}): accuracy=0.875, num_samples=8" in out
    assert out == runner.invoke(main, ["registry", "show", "story-bb/1"]).output

    r = runner.invoke(main, ["registry", "show", "nosuch@champion"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        f"error: models:/nosuch@champion is not in the MLflow registry at {mlflow_store}. "
        "Fix: check the name and alias with `domainfm registry list`."]
