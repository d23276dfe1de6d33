"""Quiet, readable output (issue 13 item 7): third-party chatter silenced at its source, run names
that say what ran, and a pretrain summary that shows each loss from start to end with one warning
line when the total loss did not move. The end-to-end test runs a real two-step pretraining into
a real sqlite MLflow store and reads its output as a user sees it."""

from __future__ import annotations

import logging
import math
import os
import re
import warnings

import pytest
from conftest import run_cli

from domainfm.config import RunConfig
from domainfm.output import (STALLED_REL_CHANGE, loss_rows, quiet_third_parties, stalled_loss_warning)
from domainfm.tracking import default_run_name

# what the third parties used to print on every run (before this change all of these appeared)
NOISE = ("💡 Tip", "litlogger", "_pytree", "LeafSpec", "Add type hints", "type hint",
         "Downloading artifacts", "An input example was not provided")


# ---------------------------------------------------------------- the summary (pure)

def test_loss_rows_show_first_and_last_value_and_leave_other_keys():
    metrics = {"loss/soft": 2.78, "loss/total": 4.1, "global_step": 2, "train_seconds": 1.5}
    spans = {"loss/soft": (2.7726, 2.7801), "loss/total": (4.15888, 4.1)}
    assert loss_rows(metrics, spans) == {"loss/soft": "2.773 → 2.78", "loss/total": "4.159 → 4.1",
                                         "global_step": 2, "train_seconds": 1.5}
    # a loss without history keeps its final value; the input is not modified
    assert loss_rows({"loss/hard": 1.0}, {}) == {"loss/hard": 1.0}
    assert metrics["loss/soft"] == 2.78
    # the health monitor's figures get the same first → last form (README's demo table)
    assert loss_rows({"monitor/rankme": 2.0539}, {"monitor/rankme": (1.0029, 2.0539)}) == {
        "monitor/rankme": "1.003 → 2.054"}


def test_stalled_warning_only_when_the_total_did_not_move():
    # 2.7726 -> 2.7727: relative change 3.6e-5, below 1e-3
    line = stalled_loss_warning({"loss/total": (2.7726, 2.7727)})
    assert line is not None and line.startswith("loss/total did not move (2.773 → 2.773")
    assert "3.6e-05" in line and "\n" not in line
    # 2.773 -> 2.780 moved by 2.5e-3: no warning; neither when it went down a lot
    assert stalled_loss_warning({"loss/total": (2.773, 2.780)}) is None
    assert stalled_loss_warning({"loss/total": (4.0, 1.0)}) is None
    # just above the threshold counts as moved; just below it does not
    assert stalled_loss_warning({"loss/total": (1.0, 1.0 + 1.1 * STALLED_REL_CHANGE)}) is None
    assert stalled_loss_warning({"loss/total": (-2.0, -2.0 - 2.2 * STALLED_REL_CHANGE)}) is None
    assert stalled_loss_warning({"loss/total": (1.0, 1.0 + 0.9 * STALLED_REL_CHANGE)}) is not None
    # the other losses do not decide; no total logged, no warning
    assert stalled_loss_warning({"loss/soft": (1.0, 1.0), "loss/total": (3.0, 2.0)}) is None
    assert stalled_loss_warning({"loss/soft": (1.0, 1.0)}) is None


# ---------------------------------------------------------------- silencing at the source

def test_quiet_third_parties_drops_the_known_chatter_and_keeps_other_warnings(monkeypatch):
    # (set first, so that monkeypatch restores the variable's state, whatever quiet_third_parties does)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "unset")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.utils.warnings_utils import color_warning
    from torch.utils._pytree import LeafSpec

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_parties()
        LeafSpec()  # torch's deprecation, raised from inside Lightning on every fit
        color_warning("Add type hints to the `predict` method to enable data validation", stacklevel=1,
                      color="yellow")
        warnings.warn("a warning of our own", UserWarning)
        warnings.warn("some other deprecation", FutureWarning)
    assert [str(w.message) for w in caught] == ["a warning of our own", "some other deprecation"]
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is False
    # a user's own choice of the progress bar is kept
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    quiet_third_parties()
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"

    # Lightning's tip goes; its other messages stay
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    keep = Keep()
    from domainfm.output import _LIGHTNING_RANK_ZERO

    loggers = [logging.getLogger(n) for n in _LIGHTNING_RANK_ZERO]
    # Lightning fixes its rank when first imported (an earlier test may have set RANK) and an
    # earlier run may have disabled these loggers: this test is about our filter, so it starts from
    # rank 0 and enabled loggers, and puts both back after
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    saved_rank = rank_zero_only.rank
    rank_zero_only.rank = 0
    saved = [(lg.disabled, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(keep)
        lg.setLevel(logging.INFO)
        lg.disabled = False
    try:
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero_info("`Trainer.fit` stopped: `max_steps=2` reached.")
    finally:
        for lg, (disabled, level) in zip(loggers, saved):
            lg.removeHandler(keep)
            lg.disabled, lg.level = disabled, level
        rank_zero_only.rank = saved_rank
    assert keep.lines == ["`Trainer.fit` stopped: `max_steps=2` reached."]


# ---------------------------------------------------------------- run names

def test_default_run_name_says_command_plugin_modality_and_backbone():
    cfg = RunConfig(plugin="eo-sar", command="pretrain", options={"modality": "s2"})
    assert default_run_name(cfg) == "pretrain-eo-sar-s2-vit_small_patch14_dinov2"
    cfg = RunConfig(plugin="sports-reid", command="finetune", backbone="vit_base_patch16_clip_224.openai")
    assert default_run_name(cfg) == "finetune-sports-reid-vit_base_patch16_clip_224.openai"
    # evaluate names the model it scores, not the default --backbone
    cfg = RunConfig(plugin="sports-reid", command="evaluate", model="models:/reid@candidate")
    assert default_run_name(cfg) == "evaluate-sports-reid-reid@candidate"
    cfg = RunConfig(plugin="eo-sar", command="evaluate", model="/x/sar_model.safetensors", options={"modality": "s1"})
    assert default_run_name(cfg) == "evaluate-eo-sar-s1-sar_model"


def test_start_run_names_runs_in_a_real_store(mlflow_store):
    import mlflow

    from domainfm import tracking

    cfg = RunConfig(plugin="eo-sar", command="pretrain", options={"modality": "s1"}, backbone="resnet18")
    with tracking.start_run(cfg) as run:
        named_default = run.info.run_id
    with tracking.start_run(cfg.replace(run_name="my-try")) as run:
        named_explicit = run.info.run_id
    client = mlflow.MlflowClient(mlflow_store)
    assert client.get_run(named_default).info.run_name == "pretrain-eo-sar-s1-resnet18"
    assert client.get_run(named_explicit).info.run_name == "my-try"


# ---------------------------------------------------------------- a real run, as a user sees it

@pytest.mark.timeout(900)
def test_tiny_pretrain_prints_no_third_party_chatter_and_a_loss_span(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    # the subprocess starts as a user's shell does: MLflow's progress bars on by default
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "unset")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    r = run_cli(["pretrain", "--plugin", "eo-sar", "--init", "random", "--img-size", "28", "--max-steps", "2",
                 "--batch-size", "4", "--num-workers", "0", "--json", "out.json"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    for noise in NOISE:
        assert noise not in text, (noise, text)
    # no Python warning line (…Warning: message) from any library
    assert not re.search(r"\b[A-Za-z]*Warning\b", text), text
    # the default 10 warm-up steps do not fit 2 steps: said once, with what is used instead (1 = 2 // 2)
    warmup = [line for line in r.stderr.splitlines() if line.startswith("warning: --warmup-steps")]
    assert warmup == ["warning: --warmup-steps 10 is more than half of this run's 2 optimiser steps: warming up "
                      "over 1 step instead, so the learning rate reaches --lr at step 1 (pass --warmup-steps 1 or "
                      "fewer to silence this)"], r.stderr

    client = mlflow.MlflowClient(uri)
    import json

    run_id = json.loads((tmp_path / "out.json").read_text())["mlflow_run_id"]
    assert client.get_run(run_id).info.run_name == "pretrain-eo-sar-s2-vit_small_patch14_dinov2"

    # each loss from its first to its last logged value, as MLflow recorded them
    spans = {}
    for key in ("loss/hard", "loss/soft", "loss/total"):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in hist] == [0, 1]
        spans[key] = (hist[0].value, hist[-1].value)
        row = re.search(rf"{re.escape(key)}\s*│\s*(\S+) → (\S+)\s*│", r.stderr)
        assert row is not None, r.stderr
        assert float(row.group(1)) == pytest.approx(hist[0].value, rel=1e-3)
        assert float(row.group(2)) == pytest.approx(hist[-1].value, rel=1e-3)
    # the warning line appears exactly when the total moved by less than the threshold
    first, last = spans["loss/total"]
    stalled = abs(last - first) / abs(first) < STALLED_REL_CHANGE
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: loss/total did not move")]
    assert len(warned) == (1 if stalled else 0), (spans, r.stderr)
    assert math.isfinite(first) and math.isfinite(last)
